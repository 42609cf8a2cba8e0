"""
What one container may hold of the service's shared resources, so that a
container at its limits slows only itself.

L{IContainerBudgets} is the one interface the SSH side, the protocols and
the avatar go through: logged-in sessions (per container and per source
address), file descriptors, output queued for clients that do not read it,
and the receive windows its channels are given.  L{MemoryContainerBudgets}
keeps the counts in this process.
"""

from __future__ import annotations

import errno
from typing import Callable, Dict, Optional, Set

from zope.interface import Interface, implementer


class OverLimit(OSError):
    """
    A container (or a source address) is at one of its limits.

    An C{OSError} (EMFILE for descriptors, EUSERS for sessions) so that code
    opening files treats it as any failure to open; C{reason} is the short
    sentence a client or the log is told.  C{first} is false when the same
    limit refused the container before and it has not gone under it since:
    a refusal worth one log line, not one per attempt.
    """

    def __init__(self, code: int, reason: str, first: bool = True) -> None:
        super().__init__(code, reason)
        self.reason = reason
        self.first = first


class IContainerBudgets(Interface):
    """
    Counters of what each container holds, each under a limit.

    Every C{take} or C{open} that succeeds is matched by one C{give} or
    C{close} with the same arguments; counts never go below zero.
    """

    def sessionLimit(containerId: str) -> int:
        """
        How many logged-in sessions C{containerId} may have at once.
        """

    def openSession(containerId: str, address: Optional[str]) -> None:
        """
        Count a new logged-in session of C{containerId} from C{address}
        (an IP address, or None if it has none), with its connection's
        descriptor.

        @raise OverLimit: the container has L{sessionLimit} sessions, the
            address has its limit of sessions, or the container has no
            descriptor left; nothing is counted then.
        """

    def closeSession(containerId: str, address: Optional[str]) -> None:
        """
        A session counted by L{openSession} has ended.
        """

    def descriptorsFull(containerId: str, count: int = 1) -> bool:
        """
        Whether taking C{count} more descriptors would pass the limit.
        """

    def takeDescriptors(containerId: str, count: int = 1) -> None:
        """
        Count C{count} descriptors now held for C{containerId}.

        @raise OverLimit: they would pass the limit; nothing is counted.
        """

    def giveDescriptors(containerId: str, count: int = 1) -> None:
        """
        C{count} descriptors counted by L{takeDescriptors} are closed.
        """

    def queueOutput(containerId: str, size: int) -> None:
        """
        C{size} bytes (negative once sent or dropped) more wait in the
        output queues of C{containerId}'s channels.
        """

    def outputFull(containerId: str) -> bool:
        """
        Whether C{containerId}'s channels are held back: they queued more
        output than it may, and have not yet drained enough to go on.
        """

    def grantWindow(containerId: str, wanted: int, minimum: int) -> int:
        """
        The receive window a new channel of C{containerId} is given: what
        a client may send it that the daemon may have to hold.  C{wanted}
        while the container's channels hold little, less once they hold a
        lot, never under C{minimum}.  Counted until L{returnWindow}.
        """

    def returnWindow(containerId: str, granted: int) -> None:
        """
        A channel given C{granted} by L{grantWindow} takes no more input.
        """

    def watchOutput(containerId: str, watcher: "IOutputWatcher") -> None:
        """
        Tell C{watcher} when C{containerId}'s output becomes full and when
        it is low again, until L{unwatchOutput}.
        """

    def unwatchOutput(containerId: str, watcher: "IOutputWatcher") -> None:
        """
        Stop telling C{watcher}.
        """


class IOutputWatcher(Interface):
    """
    A channel whose protocol is held back while its container's queued
    output is full.
    """

    def containerOutputFull() -> None:
        """
        The container's channels queued all it may: read no more requests.
        Called from within the write that filled it.
        """

    def containerOutputLow() -> None:
        """
        The container's queues have drained: go on.  Called soon after the
        send that drained them, not from within it.
        """


def _take(counts: Dict, key, count: int) -> None:
    counts[key] = counts.get(key, 0) + count


def _give(counts: Dict, key, count: int) -> None:
    left = counts.get(key, 0) - count
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@implementer(IContainerBudgets)
class MemoryContainerBudgets:
    """
    The budgets of the containers served by this process.

    @ivar maxSessions: logged-in sessions per container, unless
        C{sessionLimits} gives a lower one.
    @ivar maxSessionsPerAddress: logged-in sessions per source address.
    @ivar maxDescriptors: descriptors per container: its connections,
        volume descriptors, open handles, scp's open file, rsync's pipes,
        copy-data's duplicates.
    @param sessionLimits: the container's own limit of sessions (its
        policy's C{max_sessions}), 0 for none; it can only lower
        C{maxSessions}.
    @ivar maxQueuedOutput: bytes queued in all of one container's channels
        past which they all read no more requests; they go on once it is
        down to three quarters of that.
    @ivar maxWindow: the receive windows of all of one container's channels
        together, past which a new channel gets the minimum.
    """

    def __init__(
        self,
        maxSessions: int = 32,
        maxSessionsPerAddress: int = 64,
        maxDescriptors: int = 4096,
        maxQueuedOutput: int = 64 * 1024 * 1024,
        sessionLimits: Optional[Callable[[str], int]] = None,
        clock=None,
        maxWindow: Optional[int] = None,
    ) -> None:
        self.maxSessions = maxSessions
        self.maxSessionsPerAddress = maxSessionsPerAddress
        self.maxDescriptors = maxDescriptors
        self.maxQueuedOutput = maxQueuedOutput
        self.maxWindow = maxQueuedOutput if maxWindow is None else maxWindow
        self._sessionLimits = sessionLimits
        self._clock = clock
        self._sessions: Dict[str, int] = {}
        self._addresses: Dict[str, int] = {}
        self._descriptors: Dict[str, int] = {}
        self._queued: Dict[str, int] = {}
        self._watchers: Dict[str, Set[IOutputWatcher]] = {}
        self._full: Set[str] = set()
        self._wakeScheduled: Set[str] = set()
        self._outOfDescriptors: Set[str] = set()
        self._windows: Dict[str, int] = {}

    @classmethod
    def fromConfig(cls, settings, clock=None, sessionLimits=None) -> "MemoryContainerBudgets":
        """
        The budgets the C{sftp} section of the configuration sets.
        """
        return cls(
            maxSessions=settings.max_sessions_per_container,
            maxSessionsPerAddress=settings.max_sessions_per_ip,
            maxDescriptors=settings.max_handles_per_container,
            maxQueuedOutput=settings.max_queued_output_per_container,
            sessionLimits=sessionLimits,
            clock=clock,
        )

    # -- sessions ----------------------------------------------------------

    def sessionLimit(self, containerId: str) -> int:
        # A container's own limit (its policy's max_sessions) only lowers
        # the service's; 0 means none of its own.
        own = self._sessionLimits(containerId) if self._sessionLimits is not None else 0
        return min(own, self.maxSessions) if own else self.maxSessions

    def sessions(self, containerId: str) -> int:
        return self._sessions.get(containerId, 0)

    def openSession(self, containerId: str, address: Optional[str]) -> None:
        if self._sessions.get(containerId, 0) >= self.sessionLimit(containerId):
            raise OverLimit(errno.EUSERS, "too many sessions for this container")
        if address is not None and self._addresses.get(address, 0) >= self.maxSessionsPerAddress:
            raise OverLimit(errno.EUSERS, "too many sessions from this address")
        self.takeDescriptors(containerId)
        _take(self._sessions, containerId, 1)
        if address is not None:
            _take(self._addresses, address, 1)

    def closeSession(self, containerId: str, address: Optional[str]) -> None:
        _give(self._sessions, containerId, 1)
        if address is not None:
            _give(self._addresses, address, 1)
        self.giveDescriptors(containerId)

    # -- descriptors -------------------------------------------------------

    def descriptors(self, containerId: str) -> int:
        return self._descriptors.get(containerId, 0)

    def descriptorsFull(self, containerId: str, count: int = 1) -> bool:
        return self._descriptors.get(containerId, 0) + count > self.maxDescriptors

    def takeDescriptors(self, containerId: str, count: int = 1) -> None:
        if self.descriptorsFull(containerId, count):
            first = containerId not in self._outOfDescriptors
            self._outOfDescriptors.add(containerId)
            raise OverLimit(errno.EMFILE, "too many open files for this container", first)
        _take(self._descriptors, containerId, count)

    def giveDescriptors(self, containerId: str, count: int = 1) -> None:
        _give(self._descriptors, containerId, count)
        self._outOfDescriptors.discard(containerId)

    # -- receive windows ---------------------------------------------------

    def windows(self, containerId: str) -> int:
        return self._windows.get(containerId, 0)

    def grantWindow(self, containerId: str, wanted: int, minimum: int) -> int:
        room = self.maxWindow - self._windows.get(containerId, 0)
        granted = max(min(minimum, wanted), min(wanted, room))
        _take(self._windows, containerId, granted)
        return granted

    def returnWindow(self, containerId: str, granted: int) -> None:
        _give(self._windows, containerId, granted)

    # -- queued output -----------------------------------------------------

    def queued(self, containerId: str) -> int:
        return self._queued.get(containerId, 0)

    def queueOutput(self, containerId: str, size: int) -> None:
        total = self._queued.get(containerId, 0) + size
        if total > 0:
            self._queued[containerId] = total
        else:
            self._queued.pop(containerId, None)
        if containerId in self._full:
            if size < 0 and not self._outputHigh(total):
                self._scheduleWake(containerId)
        elif total > self.maxQueuedOutput:
            # Every channel of the container stops at once, before it reads
            # one more request: the bound is this, plus one reply.
            self._full.add(containerId)
            for watcher in list(self._watchers.get(containerId, ())):
                watcher.containerOutputFull()

    def outputFull(self, containerId: str) -> bool:
        return containerId in self._full

    def _outputHigh(self, total: int) -> bool:
        return total > self.maxQueuedOutput * 3 // 4

    def watchOutput(self, containerId: str, watcher: IOutputWatcher) -> None:
        self._watchers.setdefault(containerId, set()).add(watcher)

    def unwatchOutput(self, containerId: str, watcher: IOutputWatcher) -> None:
        watchers = self._watchers.get(containerId)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self._watchers[containerId]

    def _scheduleWake(self, containerId: str) -> None:
        # Later, not now: the channel that freed the room may be in the
        # middle of sending, and the ones woken write into the same
        # connection.
        if containerId in self._wakeScheduled:
            return
        self._wakeScheduled.add(containerId)
        clock = self._clock
        if clock is None:
            from twisted.internet import reactor as clock
        clock.callLater(0, self._wake, containerId)

    def _wake(self, containerId: str) -> None:
        self._wakeScheduled.discard(containerId)
        if containerId not in self._full or self._outputHigh(self._queued.get(containerId, 0)):
            return  # filled again meanwhile; the next drain wakes them
        self._full.discard(containerId)
        for watcher in list(self._watchers.get(containerId, ())):
            watcher.containerOutputLow()
