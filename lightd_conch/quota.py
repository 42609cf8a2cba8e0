"""
Disk quotas: the space a container's volume takes, as C{du} counts it.

L{QuotaUsage} is one container's figure, kept current by every change made
through the service (L{lightd_conch.volume} charges and frees it) and set
again by a measurement of the whole volume (L{measure}, blocking, bounded in
how many entries it reads per second) that runs at the first login of a
container with a quota and again in the background for what the container
writes itself.  Sizes are Python integers: no sum can overflow.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Callable, List, Optional, Set, Tuple

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from .fs import mountId

_log = Logger()

BLOCK = 4096
"""What a file's size is rounded up to when a write is charged: ext4's,
XFS's and most file systems' block, so a charge is what C{du} would count."""

MEASURE_RATE = 20_000
"""Entries a measurement reads per second at most, so a volume of a million
files neither stalls the reactor (which shares the interpreter) nor the disk."""

_BATCH = 500
MAX_DEPTH = 256
"""Folders deeper than this are not measured: each level holds a descriptor."""


class QuotaExceeded(OSError):
    """A change that would take the volume past its quota."""

    def __init__(self) -> None:
        super().__init__(errno.EDQUOT, "disk quota exceeded")


def allocated(size: int) -> int:
    """
    The space a file of C{size} bytes is charged: its size in whole blocks
    (a sparse file is charged as if it were written out).
    """
    return -(-size // BLOCK) * BLOCK


class QuotaUsage:
    """
    The bytes one container's volume takes.

    @ivar used: the figure, or None before the first measurement.
    @ivar measuring: whether a measurement is running; what is charged
        meanwhile is added to its result, since the walk may have passed the
        place already (an over-count until the next measurement, never an
        under-count).
    """

    def __init__(self) -> None:
        self.used: Optional[int] = None
        self.measuring = False
        self.measuredAt: Optional[float] = None
        self._duringMeasure = 0

    def charge(self, limit: int, delta: int) -> None:
        """
        Count C{delta} more bytes, or refuse: with C{limit} > 0, nothing
        that would take the figure past it is counted.

        @raise QuotaExceeded: nothing was counted.
        """
        if delta <= 0:
            self.free(-delta)
            return
        used = self.used or 0
        if limit and used + delta > limit:
            raise QuotaExceeded()
        self.used = used + delta
        if self.measuring:
            self._duringMeasure += delta

    def room(self, limit: int) -> int:
        """
        The bytes left under C{limit}.
        """
        return max(0, limit - (self.used or 0))

    def free(self, size: int) -> None:
        if size > 0 and self.used is not None:
            self.used = max(0, self.used - size)

    def forget(self) -> None:
        """
        The figure is no longer known: what was written while no quota was
        set went uncounted.  The next login or check measures again.
        """
        if not self.measuring:
            self.used = None
        self.measuredAt = None

    def startMeasure(self) -> None:
        self.measuring = True
        self._duringMeasure = 0

    def measured(self, total: int, now: float) -> None:
        """
        A measurement found C{total} bytes.
        """
        self.used = total + self._duringMeasure
        self.measuring = False
        self.measuredAt = now
        self._duringMeasure = 0

    def measureFailed(self) -> None:
        self.measuring = False


def measure(
    rootFD: int, rate: int = MEASURE_RATE, sleep: Callable[[float], None] = time.sleep
) -> int:
    """
    The bytes the files under the folder C{rootFD} (any kind of descriptor
    of it) take on disk, counted as C{du -x} does: every entry's allocated
    blocks, a file with several names once, nothing on another mount, no
    symlink followed, folders down to L{MAX_DEPTH}.  Reads at most C{rate}
    entries a second.  Blocks: run it in a thread.
    """
    top = os.open(f"/proc/self/fd/{rootFD}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    mount = mountId(top)
    seen: Set[Tuple[int, int]] = set()
    counted = [0]
    started = time.monotonic()

    def scan(fd: int) -> Tuple[int, List[bytes]]:
        # The space of a folder's entries, and the names of its subfolders.
        size = 0
        folders = []
        with os.scandir(fd) as entries:
            for entry in entries:
                counted[0] += 1
                if counted[0] % _BATCH == 0:
                    ahead = counted[0] / rate - (time.monotonic() - started)
                    if ahead > 0:
                        sleep(ahead)
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    folders.append(entry.name)
                    continue  # counted once opened: it may be another mount
                if st.st_nlink > 1:
                    identity = (st.st_dev, st.st_ino)
                    if identity in seen:
                        continue
                    seen.add(identity)
                size += st.st_blocks * 512
        return size, folders

    total = os.fstat(top).st_blocks * 512
    stack = []
    try:
        size, folders = scan(top)
        total += size
        stack.append((top, iter(folders)))
        while stack:
            fd, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                os.close(fd)
                continue
            if len(stack) > MAX_DEPTH:
                continue
            try:
                child = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError:
                continue
            try:
                if mountId(child) != mount:
                    os.close(child)
                    continue
                total += os.fstat(child).st_blocks * 512
                size, folders = scan(child)
            except OSError:
                os.close(child)
                continue
            total += size
            stack.append((child, iter(folders)))
    finally:
        for fd, _ in stack:
            os.close(fd)
    return total


REMEASURE_AFTER = 120.0
"""Seconds from one measurement of a live container's volume to the next."""


class QuotaMeasurer:
    """
    Runs the measurements of volumes with a quota, in threads, one at a time
    per container.

    @param run: C{run(f, *args)} calls C{f(*args)} in a thread and returns a
        Deferred of its result.
    @param clock: the reactor's time.
    """

    def __init__(self, run, clock, measure=measure) -> None:
        self._run = run
        self._clock = clock
        self._measure = measure
        self._pending: dict = {}

    def ensure(self, state, volumePath: str):
        """
        A Deferred that fires once C{state}'s quota usage is known: at once
        if it is, else when the measurement (started now if none runs) ends.
        """
        if state.quota.used is not None:
            return succeed(None)
        waiting = Deferred()
        self._start(state, volumePath).addBoth(lambda _: waiting.callback(None))
        return waiting

    def refresh(self, state, volumePath: str) -> None:
        """
        Measure C{state}'s volume again if its last measurement is
        L{REMEASURE_AFTER} seconds old (or it has none).
        """
        quota = state.quota
        if quota.measuring:
            return
        if quota.measuredAt is None or self._clock.seconds() - quota.measuredAt >= REMEASURE_AFTER:
            self._start(state, volumePath)

    def _start(self, state, volumePath: str):
        pending = self._pending.get(state.containerId)
        if pending is not None:
            # Another waiter of the running measurement.
            d = Deferred()
            pending.append(d)
            return d
        waiters = self._pending[state.containerId] = []
        state.quota.startMeasure()

        def walk() -> int:
            fd = os.open(volumePath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                return self._measure(fd)
            finally:
                os.close(fd)

        def done(total: int) -> None:
            state.quota.measured(total, self._clock.seconds())

        def failed(failure) -> None:
            state.quota.measureFailed()
            if state.quota.measuredAt is None:
                # Never measured: count from nothing rather than stop writes.
                state.quota.measured(0, self._clock.seconds())
            _log.failure(
                "cannot measure the volume of container {container}",
                failure,
                container=state.containerId,
            )

        def finished(_: object) -> None:
            del self._pending[state.containerId]
            for d in waiters:
                d.callback(None)

        d = self._run(walk)
        d.addCallbacks(done, failed).addBoth(finished)
        return d
