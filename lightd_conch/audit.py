"""
The audit log: one JSON object per line for every login, failed login,
logout and change of credentials, at C{sftp.audit_log}.

Each line holds C{time} (RFC 3339, UTC), C{event}, C{session},
C{container}, C{username}, C{ip} and the event's own fields.  It never holds
a password, a key or a token: callers pass names and counts, and L{record}
refuses a field named like a secret.

Two processes write the file: the daemon, through L{AuditLog} (lines kept in
memory and written off the reactor thread at least every second), and the
CLI, through L{appendEvent} (one line, one C{write()}).  Both open it with
C{O_APPEND}, so lines never interleave; both rotate it through
L{AuditFile}, which renames under an exclusive C{flock} on
C{<audit_log>.lock} and checks the size again once it holds the lock, so two
writers never shift the old files twice.  A writer whose file was renamed
away (by the other process, or by logrotate) reopens the path before its
next write; SIGHUP asks for that at once.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from datetime import datetime, timezone

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()

# How often buffered lines are written.
FLUSH_INTERVAL = 1.0
# Events kept before they are made into lines (see AuditLog).
ENCODE_BATCH = 512
# Lines kept while the disk does not keep up; past this, lines are dropped
# (and counted in the service log) rather than filling memory.
MAX_BUFFERED = 16 * 1024 * 1024

_BASE = ("time", "event", "session", "container", "username", "ip")
_SECRET_WORDS = ("password", "secret", "token", "totp_code", "private")


_second = (None, "")
"""The last whole second L{_timestamp} wrote, and its text up to the seconds."""


def _timestamp(seconds: float) -> str:
    # As datetime.fromtimestamp(seconds, utc).isoformat(timespec="milliseconds")
    # with a Z (the fraction rounded to microseconds half to even, as
    # fromtimestamp does, then cut to milliseconds), the date and time of
    # day made once a second: events come in thousands a second.
    global _second
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro >= 1000000:
        micro -= 1000000
        whole += 1
    elif micro < 0:
        micro += 1000000
        whole -= 1
    second, text = _second
    if whole != second:
        text = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (whole, text)
    return f"{text}.{micro // 1000:03d}Z"


_ALLOWED = set()
"""Field names L{record} has let through (they are few: the code's own)."""


_EVENT_NAMES = {"container", "username", "ip"}
"""Names AuditLog.event takes among the fields, for record's own parameters,
and the field names it has let through."""


def _checkNames(fields, known=_ALLOWED) -> None:
    for name in fields:
        if name not in known:
            if name in _BASE or any(word in name for word in _SECRET_WORDS):
                raise ValueError(f"audit field {name!r} is not allowed")
            known.add(name)


def record(
    seconds: float,
    event: str,
    session=None,
    container=None,
    username=None,
    ip=None,
    **fields,
) -> dict:
    """
    The object one event is written as.

    @raise ValueError: if a field is named like a secret, or like one of the
        fields every event has.
    """
    _checkNames(fields)
    return {
        "time": _timestamp(seconds),
        "event": event,
        "session": session,
        "container": container,
        "username": username,
        "ip": ip,
        **fields,
    }


def encode(entry: dict) -> bytes:
    """
    One line of the file.
    """
    return _ENCODER.encode(entry).encode("utf-8") + b"\n"


_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""What json.dumps(entry, separators=(",", ":")) makes anew for each call."""


class AuditFile:
    """
    The audit log file, rotated by size and shared with other writers.

    Blocking: the daemon calls it from a thread, the CLI directly.

    @param maxBytes: rotate before a write would take the file past this
        size; 0 never rotates.
    @param keep: rotated files kept (C{path.1} the newest ... C{path.keep}).
    """

    def __init__(self, path: str, maxBytes: int, keep: int) -> None:
        self.path = path
        self.maxBytes = maxBytes
        self.keep = keep
        self._fd = None

    def write(self, data: bytes) -> None:
        """
        Append C{data} (whole lines) in one C{write()}, rotating first if
        it would not fit.
        """
        fd = self._current()
        if self.maxBytes and self._tooBig(os.fstat(fd).st_size, len(data)):
            self._rotate(len(data))
            fd = self._current()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def reopen(self) -> None:
        """
        Close the file and open the path again (creating it).
        """
        self.close()
        self._current()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def _tooBig(self, size: int, adding: int) -> bool:
        return size > 0 and size + adding > self.maxBytes

    def _current(self) -> int:
        if self._fd is not None:
            # Renamed away (rotated by another writer, or logrotate): follow
            # the path.
            try:
                named = os.stat(self.path)
            except FileNotFoundError:
                named = None
            held = os.fstat(self._fd)
            if named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
                self.close()
        if self._fd is None:
            self._fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                0o600,
            )
        return self._fd

    def _rotate(self, adding: int) -> None:
        lock = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                size = os.stat(self.path).st_size
            except FileNotFoundError:
                return
            if not self._tooBig(size, adding):
                return  # another writer rotated it while we waited
            for number in range(self.keep - 1, 0, -1):
                older = f"{self.path}.{number}"
                if os.path.lexists(older):
                    os.replace(older, f"{self.path}.{number + 1}")
            os.replace(self.path, f"{self.path}.1")
        finally:
            os.close(lock)  # releases the flock
            self.close()


def appendEvent(config, event: str, **fields) -> None:
    """
    Write one event now, for a process without a reactor (the CLI).  Does
    nothing when C{sftp.audit_log} is C{""}.

    @raise OSError: if the file cannot be written.
    """
    settings = config.sftp
    if not settings.audit_log:
        return
    import time

    auditFile = AuditFile(settings.audit_log, settings.audit_log_max_bytes, settings.audit_log_keep)
    try:
        auditFile.write(encode(record(time.time(), event, **fields)))
    finally:
        auditFile.close()


class NullAudit:
    """
    An audit log that writes nothing (C{sftp.audit_log} is C{""}).
    """

    def event(self, event: str, session=None, **fields) -> None:
        pass


class AuditLog:
    """
    The daemon's audit log.  L{event} is cheap and never blocks: it checks
    the fields' names and keeps the event; events are made into lines
    L{ENCODE_BATCH} at a time, and at each L{flush}, called every
    L{FLUSH_INTERVAL} seconds by L{AuditService}, which hands the lines to
    C{run}, which writes them where blocking is allowed.  One write is in
    progress at a time, so lines keep their order.

    Encoding in batches, not one line per event: a session writing small
    files makes an event for each, between whose the SSH and SFTP code runs;
    encoded one at a time, each event's encoding ran with the caches cold,
    several times slower than the same encoding in a loop.

    @param clock: gives the events' time.
    @param run: C{run(f, *args)} calls C{f(*args)} where blocking is allowed
        and returns a Deferred of its result.
    """

    def __init__(self, auditFile: AuditFile, clock, run) -> None:
        self._file = auditFile
        self._clock = clock
        self._run = run
        self._events: list = []
        self._lines: list = []
        self._size = 0
        self._dropped = 0
        self._reopen = False
        self._writing = None

    def event(self, event: str, session=None, **fields) -> None:
        """
        Record C{event} of C{session} (its id, or None) with C{fields};
        C{container}, C{username} and C{ip} are fields every event has.
        """
        _checkNames(fields, _EVENT_NAMES)
        events = self._events
        events.append((self._clock.seconds(), event, session, fields))
        if len(events) >= ENCODE_BATCH:
            self._encode()

    def _encode(self) -> None:
        # The events kept, as lines, in their order.
        events, self._events = self._events, []
        lines = self._lines
        for seconds, event, session, fields in events:
            try:
                line = encode(record(seconds, event, session, **fields))
            except Exception:
                log.failure("audit event {event} cannot be written", event=event)
                continue
            if self._size + len(line) > MAX_BUFFERED:
                self._dropped += 1
                continue
            lines.append(line)
            self._size += len(line)

    def open(self) -> None:
        """
        Open the file now (blocking, once, at start): the service holds its
        descriptor from the start, and a file that cannot be opened says so
        before the first event.
        """
        self._file.reopen()

    def reopen(self) -> None:
        """
        Open the path again before the next write (after logrotate renamed
        it).
        """
        self._reopen = True

    def flush(self):
        """
        Start writing what is kept, unless a write is in progress; return a
        Deferred that fires when the write started now (or the one in
        progress) is done.
        """
        if self._events:
            self._encode()
        if self._writing is not None:
            return self._writing
        if not self._lines and not self._reopen:
            return succeed(None)
        data, self._lines, self._size = b"".join(self._lines), [], 0
        reopen, self._reopen = self._reopen, False
        dropped, self._dropped = self._dropped, 0
        if dropped:
            log.warn(
                "audit log: {count} events dropped, the disk did not keep up",
                count=dropped,
            )
        d = self._run(self._writeOut, data, reopen)
        self._writing = d

        def done(result):
            self._writing = None

        d.addErrback(
            lambda failure: log.failure(
                "cannot write the audit log {path}", failure, path=self._file.path
            )
        )
        d.addBoth(done)
        return d

    def _writeOut(self, data: bytes, reopen: bool) -> None:
        if reopen:
            self._file.reopen()
        if data:
            self._file.write(data)

    def close(self):
        """
        Write everything kept, then close the file; returns a Deferred.
        """

        def writeRest(ignored):
            if self._writing is not None:
                return self._writing.addCallback(writeRest)
            return self.flush().addCallback(lambda ignored: self._file.close())

        return maybeDeferred(lambda: None).addCallback(writeRest)


class AuditService(Service):
    """
    Flushes an L{AuditLog} every L{FLUSH_INTERVAL} seconds, and at stop
    writes what is left and closes the file.
    """

    def __init__(self, audit: AuditLog, clock, interval: float = FLUSH_INTERVAL) -> None:
        self.audit = audit
        self._clock = clock
        self._interval = interval
        self._loop = None

    def startService(self) -> None:
        super().startService()
        self.audit.open()
        self._loop = LoopingCall(self.audit.flush)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self):
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return self.audit.close()
