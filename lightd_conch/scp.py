"""
Legacy scp (the rcp protocol behind ``scp -O``): ``scp -t`` receives files into
the volume, ``scp -f`` sends them, served in-process over the confined
filesystem.

Nothing here runs a shell.  The command line is split into scp's own options
and one path; a path that is not a single shell word is taken verbatim, so
``$(touch /tmp/owned)``, backticks and ``;`` are just characters of a name, and
``..`` cannot climb above the root.  ``~`` and ``~/x`` are the volume root.

A record is one line, so a name that holds a newline could end it and write
records of its own into the client's stream.  The source skips such a file or
directory with an error and goes on (exit status 1), the sink refuses one, and
every message sent to the client has its control characters escaped.

Both directions are written as generators that ask for input (a line, or up
to N bytes) and write output; L{_Exchange} feeds them and stops them while the
channel's send side is full.

Every number in a record is checked against what the system can hold (a
time beyond C{time_t}, a size beyond C{off_t}, microseconds over 999999) and
refused as a protocol error before anything is done with it.  Whatever else
goes wrong ends the exchange the way scp ends: one fatal error line to the
client, exit status 1, and one line in the log; never a traceback, never a
channel closed without a word.
"""

from __future__ import annotations

import ctypes
import fnmatch
import os
import re
import shlex
import stat
from dataclasses import dataclass, field
from typing import Generator, List, Optional, Set, Tuple, Union

from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from .fs import expandHome, normalize, virtualPath
from .volume import OpenFile, Volume

CHUNK = 256 * 1024
MAX_LINE = 4096
MAX_DEPTH = 256
_FLAGS = set(b"tfrpdvq")
_GLOB = re.compile(rb"[*?\[]")
# The largest values the kernel's time_t and off_t hold (long on Linux): a
# bigger time or size in a record is refused, as OpenSSH's scp refuses it.
_TIME_MAX = _SIZE_MAX = (1 << (8 * ctypes.sizeof(ctypes.c_long) - 1)) - 1
_TIME_RECORD = re.compile(rb"T(\d{1,20}) (\d{1,6}) (\d{1,20}) (\d{1,6})")
_CONTROL_RECORD = re.compile(rb"([CD])([0-7]{4}) (\d{1,20}) (.*)", re.S)
_INTERNAL_ERROR = "internal error; the transfer stopped"

_log = Logger()


class ScpUsageError(ValueError):
    """
    An scp command line this service does not serve; the message says why.
    """


@dataclass
class ScpCommand:
    """
    A parsed ``scp -t``/``scp -f`` command line.

    @ivar paths: client paths (virtual, C{~} already mapped to the root).
    """

    sink: bool
    recursive: bool = False
    preserve: bool = False
    targetIsDirectory: bool = False
    paths: List[bytes] = field(default_factory=list)


def parseCommand(command: bytes) -> Optional[ScpCommand]:
    """
    Parse C{command} if it is an scp server command; None if it is not scp.

    @raise ScpUsageError: it is scp, with options or paths we refuse.
    """
    rest = command.lstrip(b" \t")
    program, _, rest = rest.partition(b" ")
    if program != b"scp":
        return None
    flags: Set[int] = set()
    while True:
        rest = rest.lstrip(b" ")
        word, _, after = rest.partition(b" ")
        if word == b"--":
            rest = after
            break
        if not word.startswith(b"-") or word == b"-":
            break
        unknown = set(word[1:]) - _FLAGS
        if unknown:
            raise ScpUsageError(
                "scp: unsupported option -%s" % bytes(sorted(unknown)).decode("ascii", "replace")
            )
        flags.update(word[1:])
        rest = after
    sink, source = ord("t") in flags, ord("f") in flags
    if sink == source:
        raise ScpUsageError("scp: exactly one of -t and -f is served")
    if not rest:
        raise ScpUsageError("scp: no path given")
    # One shell word (quoted or escaped as a shell would take it) is unquoted;
    # anything else is one name, verbatim: nothing is ever expanded or run.
    try:
        words = shlex.split(os.fsdecode(rest))
    except ValueError:
        words = []
    path = os.fsencode(words[0]) if len(words) == 1 else rest
    if b"\0" in path:
        raise ScpUsageError("scp: a path may not hold a NUL byte")
    return ScpCommand(
        sink=sink,
        recursive=ord("r") in flags,
        preserve=ord("p") in flags,
        targetIsDirectory=ord("d") in flags,
        paths=[expandHome(path)],
    )


# Control characters, shown escaped in messages: a message is exactly one
# line of the protocol, and prints as plain text on the user's terminal.
_ESCAPES = {c: "\\x%02x" % c for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def _message(kind: bytes, text: str) -> bytes:
    """An error (C{\\x01}) or fatal (C{\\x02}) record carrying C{text}."""
    return kind + b"scp: " + text.translate(_ESCAPES).encode("utf-8", "replace") + b"\n"


def _reason(error: OSError) -> str:
    # The errno's text, or what the volume said (never a host path).
    return error.strerror or (os.strerror(error.errno) if error.errno else str(error))


def _display(path: bytes) -> str:
    return os.fsdecode(virtualPath(normalize(path)))


def _name(path: bytes) -> bytes:
    return normalize(path)[-1] if normalize(path) else b"/"


def _join(directory: bytes, name: bytes) -> bytes:
    return virtualPath(normalize(directory) + (name,))


def _isPlainName(name: bytes) -> bool:
    """
    Whether C{name} can stand in a C or D record: one entry of a directory,
    on one line.
    """
    return bool(name) and name not in (b".", b"..") and not any(
        c in name for c in (b"/", b"\0", b"\n")
    )


class _Line:
    """Ask for the next line (without its newline); None at end of input."""


class _Wait:
    """What L{_Exchange._take} returns while the input asked for is not there."""


_WAIT = _Wait()


class _Yield:
    """Let the reactor run before going on."""


_LINE = _Line()
_YIELD = _Yield()
_Request = Union[_Line, _Yield, int]  # an int asks for 1..n bytes (b"" at end)


class _Fatal(Exception):
    """The transfer cannot go on: end with exit status 1."""


class _Exchange(Protocol):
    """
    Runs one generator over a channel that offers C{write}, C{writeStderr}
    and C{exit(code)} (see L{lightd_conch.ssh.SessionChannel}).
    """

    yieldEvery = 8
    clock = None

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._eof = False
        self._want: Optional[_Request] = None
        self._flowPaused = False
        self._done = False
        self._errors = 0
        self._run: Optional[Generator[_Request, object, None]] = None
        self._pendingValue: object = None
        self._blockedOnFlow = False

    @property
    def paused(self) -> bool:
        return self._flowPaused

    def connectionMade(self) -> None:
        if self.clock is None:
            from twisted.internet import reactor

            self.clock = reactor
        self._run = self.exchange()
        self._step(None)

    def exchange(self) -> Generator[_Request, object, None]:
        raise NotImplementedError()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if self._run is None:
            return  # not started yet: keep it for the exchange
        if self._want is not None:
            self._feedWanted()
        elif len(self._buffer) > MAX_LINE + CHUNK:
            self._fail("protocol error: unexpected input")

    def eofReceived(self) -> None:
        self._eof = True
        if self._run is not None and self._want is not None:
            self._feedWanted()

    def _take(self, request: _Request) -> object:
        buffer = self._buffer
        if isinstance(request, _Line):
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > MAX_LINE:
                    raise _Fatal("protocol error: line too long")
                return None if self._eof else _WAIT
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            return line
        if not buffer:
            return b"" if self._eof else _WAIT
        chunk = bytes(buffer[:request])
        del buffer[:request]
        return chunk

    def _feedWanted(self) -> None:
        request, self._want = self._want, None
        try:
            value = self._take(request)
        except _Fatal as e:
            self._fail(str(e))
            return
        except Exception as e:
            self._unexpected(e)
            return
        if value is _WAIT:
            self._want = request
            return
        self._step(value)

    # -- driving ------------------------------------------------------------

    def _step(self, value: object) -> None:
        steps = 0
        while not self._done:
            if self._flowPaused:
                self._pendingValue, self._blockedOnFlow = value, True
                return
            try:
                request = self._run.send(value)
            except StopIteration:
                self._finish(1 if self._errors else 0)
                return
            except _Fatal as e:
                self._fail(str(e))
                return
            except OSError as e:
                self._fail(_reason(e))
                return
            except Exception as e:
                self._unexpected(e)
                return
            if isinstance(request, _Yield):
                steps += 1
                value = None
                if steps >= self.yieldEvery:
                    # Let other sessions run between bursts of a big file.
                    self.clock.callLater(0, self._step, None)
                    return
                continue
            try:
                value = self._take(request)
            except _Fatal as e:
                self._fail(str(e))
                return
            except Exception as e:
                self._unexpected(e)
                return
            if value is _WAIT:
                self._want = request
                return

    def pauseProducing(self) -> None:
        self._flowPaused = True

    def resumeProducing(self) -> None:
        self._flowPaused = False
        if self._blockedOnFlow:
            self._blockedOnFlow = False
            self._step(self._pendingValue)

    def stopProducing(self) -> None:
        self._done = True

    # -- ending -------------------------------------------------------------

    def error(self, message: str) -> None:
        """
        Report a problem with one file to the client (scp's run_err) and go on.
        """
        self._errors += 1
        self.transport.write(_message(b"\x01", message))

    def _fail(self, message: str) -> None:
        if self._done:
            return
        self.transport.write(_message(b"\x02", message))
        self._finish(1)

    def _unexpected(self, error: Exception) -> None:
        """
        A failure no check foresaw: the client gets scp's fatal line and exit
        status 1, the log one line that says where, and the session goes on.
        """
        _log.error(
            "scp: unexpected {kind} at {where}: {error}",
            kind=type(error).__name__,
            where=_origin(error),
            error=str(error)[:200],
        )
        self._fail(_INTERNAL_ERROR)

    def _finish(self, code: int) -> None:
        if self._done:
            return
        self._done = True
        try:
            self._cleanup()
        except Exception as e:
            _log.error(
                "scp: unexpected {kind} at {where} while closing: {error}",
                kind=type(e).__name__,
                where=_origin(e),
                error=str(e)[:200],
            )
        self.transport.exit(code)

    def _cleanup(self) -> None:
        pass

    def connectionLost(self, reason: object = None) -> None:
        self._done = True
        if self._run is not None:
            self._run.close()
        self._cleanup()


def _origin(error: BaseException) -> str:
    """Where C{error} was raised, as C{file:line}, for a one-line log entry."""
    trace = error.__traceback__
    if trace is None:
        return "?"
    while trace.tb_next is not None:
        trace = trace.tb_next
    return "%s:%d" % (os.path.basename(trace.tb_frame.f_code.co_filename), trace.tb_lineno)


def _parseTimes(line: bytes) -> Tuple[int, int]:
    """
    C{(atime, mtime)} from a C{T<mtime> <usec> <atime> <usec>} record.

    @raise _Fatal: the record is malformed or a value is out of range.
    """
    match = _TIME_RECORD.fullmatch(line)
    if match is None:
        raise _Fatal("protocol error: bad time record")
    mtime, mtimeUsec, atime, atimeUsec = (int(g) for g in match.groups())
    if mtime > _TIME_MAX:
        raise _Fatal("protocol error: mtime.sec out of range")
    if atime > _TIME_MAX:
        raise _Fatal("protocol error: atime.sec out of range")
    if mtimeUsec > 999999 or atimeUsec > 999999:
        raise _Fatal("protocol error: usec out of range")
    return (atime, mtime)


class ScpSink(_Exchange):
    """
    ``scp -t TARGET``: receive files (and with -r, directories) into the volume.
    """

    def __init__(self, volume: Volume, command: ScpCommand) -> None:
        super().__init__()
        self.volume = volume
        self.command = command
        self._file: Optional[OpenFile] = None

    def _cleanup(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass  # closed already: its session was superseded
        self.volume.close()

    def _isDirectory(self, path: bytes) -> bool:
        try:
            return stat.S_ISDIR(self.volume.stat(path).st_mode)
        except OSError:
            return False

    def exchange(self) -> Generator[_Request, object, None]:
        target = self.command.paths[0]
        targetIsDirectory = self._isDirectory(target)
        if self.command.targetIsDirectory and not targetIsDirectory:
            raise _Fatal(f"{_display(target)}: Not a directory")
        # Refused at once, with one line, when the volume takes no uploads.
        self.volume.mayChange(target)
        self.transport.write(b"\0")
        yield from self._receive(target, targetIsDirectory, 0)

    def _receive(
        self, target: bytes, targetIsDirectory: bool, depth: int
    ) -> Generator[_Request, object, None]:
        times: Optional[Tuple[int, int]] = None
        while True:
            line = yield _LINE
            if line is None:
                if depth:
                    raise _Fatal("unexpected end of input")
                return
            if not line:
                raise _Fatal("protocol error: empty line")
            kind = line[:1]
            if kind in (b"\x01", b"\x02"):
                # The client reports its own trouble; a fatal one ends the copy.
                self._errors += 1
                if kind == b"\x02":
                    raise _Fatal(line[1:].decode("utf-8", "replace"))
                continue
            if kind == b"E":
                self.transport.write(b"\0")
                return
            if kind == b"T":
                times = _parseTimes(line)
                self.transport.write(b"\0")
                continue
            match = _CONTROL_RECORD.fullmatch(line)
            if match is None:
                raise _Fatal("protocol error: expected control record")
            mode = int(match.group(2), 8)
            size = int(match.group(3))
            if size > _SIZE_MAX:
                raise _Fatal("protocol error: size out of range")
            name = match.group(4)
            if not _isPlainName(name):
                raise _Fatal(f"error: unexpected filename: {os.fsdecode(name)}")
            path = _join(target, name) if targetIsDirectory else target
            if match.group(1) == b"D":
                if not self.command.recursive:
                    raise _Fatal("received directory without -r")
                if depth >= MAX_DEPTH:
                    raise _Fatal("directories nested too deep")
                self._makeDirectory(path, mode)
                yield from self._receive(path, True, depth + 1)
                self._finishDirectory(path, mode, times)
            else:
                yield from self._receiveFile(path, mode, size, times)
            times = None

    def _makeDirectory(self, path: bytes, mode: int) -> None:
        try:
            self.volume.mkdir(path, mode | 0o700)
        except FileExistsError:
            if not self._isDirectory(path):
                raise _Fatal(f"{_display(path)}: Not a directory")
        except OSError as e:
            raise _Fatal(f"{_display(path)}: {_reason(e)}")
        self.transport.write(b"\0")

    def _finishDirectory(
        self, path: bytes, mode: int, times: Optional[Tuple[int, int]]
    ) -> None:
        try:
            self.volume.setattrs(
                path,
                mode=mode if self.command.preserve else None,
                times=times if self.command.preserve else None,
            )
        except OSError as e:
            self.error(f"{_display(path)}: {_reason(e)}")

    def _receiveFile(
        self, path: bytes, mode: int, size: int, times: Optional[Tuple[int, int]]
    ) -> Generator[_Request, object, None]:
        try:
            self._file = self.volume.openFile(path, os.O_WRONLY | os.O_CREAT, mode | 0o200)
        except OSError as e:
            # The client sends no data after an error in place of the ack.
            self.error(f"{_display(path)}: {_reason(e)}")
            return
        self.transport.write(b"\0")
        problem: Optional[OSError] = None
        offset = 0
        while offset < size:
            chunk = yield min(CHUNK, size - offset)
            if not chunk:
                raise _Fatal("unexpected end of input")
            if problem is None:
                try:
                    self._file.write(chunk, offset)
                except OSError as e:
                    problem = e
            offset += len(chunk)
        status = yield 1
        if status in (b"\x01", b"\x02"):
            message = yield _LINE
            self._errors += 1
            if status == b"\x02":
                raise _Fatal((message or b"").decode("utf-8", "replace"))
        elif status != b"\0":
            raise _Fatal("protocol error: expected end of file")
        file, self._file = self._file, None
        try:
            if problem is None:
                file.truncate(size)
                file.setattrs(
                    mode=mode if self.command.preserve else None,
                    times=times if self.command.preserve else None,
                )
        except OSError as e:
            problem = e
        finally:
            file.close()
        if problem is not None:
            self.error(f"{_display(path)}: {_reason(problem)}")
        else:
            self.transport.write(b"\0")


class ScpSource(_Exchange):
    """
    ``scp -f PATH``: send a file (with -r, a tree) from the volume.
    """

    def __init__(self, volume: Volume, command: ScpCommand) -> None:
        super().__init__()
        self.volume = volume
        self.command = command

    def _cleanup(self) -> None:
        self.volume.close()

    def _response(self) -> Generator[_Request, object, bool]:
        status = yield 1
        if status == b"\0":
            return True
        if status in (b"\x01", b"\x02"):
            message = yield _LINE
            self._errors += 1
            if status == b"\x02":
                raise _Fatal((message or b"").decode("utf-8", "replace"))
            return False
        raise _Fatal("protocol error: expected a response")

    def _expand(self, path: bytes) -> List[bytes]:
        """
        The paths C{path} names: itself if it exists, else the matches of a
        glob in its last component, as a remote shell would have expanded.
        """
        parts = normalize(path)
        if not parts or not _GLOB.search(parts[-1]):
            return [path]
        try:
            self.volume.lstat(path)
            return [path]
        except OSError:
            pass
        directory = virtualPath(parts[:-1])
        try:
            names = self.volume.names(directory)
        except OSError:
            return [path]
        pattern = parts[-1]
        matches = [
            _join(directory, n)
            for n in names
            if fnmatch.fnmatchcase(n, pattern) and not (n.startswith(b".") and not pattern.startswith(b"."))
        ]
        return matches or [path]

    def exchange(self) -> Generator[_Request, object, None]:
        if not (yield from self._response()):
            return
        for pattern in self.command.paths:
            for path in self._expand(pattern):
                yield from self._send(path, set(), 0)

    def _send(
        self, path: bytes, ancestors: Set[Tuple[int, int]], depth: int
    ) -> Generator[_Request, object, None]:
        if b"\n" in _name(path):
            # Checked before anything is sent, a T record included.
            self.error(f"{_display(path)}: skipping, filename contains a newline")
            return
        try:
            st = self.volume.stat(path)
        except OSError as e:
            self.error(f"{_display(path)}: {_reason(e)}")
            return
        if stat.S_ISDIR(st.st_mode):
            if not self.command.recursive:
                self.error(f"{_display(path)}: not a regular file")
                return
            yield from self._sendDirectory(path, st, ancestors, depth)
        elif stat.S_ISREG(st.st_mode):
            yield from self._sendFile(path)
        else:
            self.error(f"{_display(path)}: not a regular file")

    def _timeRecord(self, st: os.stat_result) -> Generator[_Request, object, bool]:
        if not self.command.preserve:
            return True
        # A time before 1970 goes out as 0, as OpenSSH sends it: its sink
        # refuses a negative one.
        self.transport.write(
            b"T%d 0 %d 0\n" % (max(int(st.st_mtime), 0), max(int(st.st_atime), 0))
        )
        return (yield from self._response())

    def _sendFile(self, path: bytes) -> Generator[_Request, object, None]:
        try:
            file = self.volume.openFile(path, os.O_RDONLY)
        except OSError as e:
            self.error(f"{_display(path)}: {_reason(e)}")
            return
        try:
            st = file.stat()
            if not (yield from self._timeRecord(st)):
                return
            size = st.st_size
            self.transport.write(
                b"C%04o %d %s\n" % (stat.S_IMODE(st.st_mode), size, _name(path))
            )
            if not (yield from self._response()):
                return
            offset = 0
            problem: Optional[str] = None
            while offset < size:
                want = min(CHUNK, size - offset)
                try:
                    chunk = file.read(want, offset) if problem is None else b""
                except OSError as e:
                    problem, chunk = _reason(e), b""
                if not chunk:
                    # The file shrank or failed: keep the promised size.
                    problem = problem or "file changed size while being sent"
                    chunk = bytes(want)
                self.transport.write(chunk)
                offset += len(chunk)
                yield _YIELD
        finally:
            file.close()
        if problem is None:
            self.transport.write(b"\0")
        else:
            self.error(f"{_display(path)}: {problem}")
        yield from self._response()

    def _sendDirectory(
        self,
        path: bytes,
        st: os.stat_result,
        ancestors: Set[Tuple[int, int]],
        depth: int,
    ) -> Generator[_Request, object, None]:
        identity = (st.st_dev, st.st_ino)
        if identity in ancestors or depth >= MAX_DEPTH:
            self.error(f"{_display(path)}: directory loop")
            return
        try:
            names = self.volume.names(path)
        except OSError as e:
            self.error(f"{_display(path)}: {_reason(e)}")
            return
        if not (yield from self._timeRecord(st)):
            return
        self.transport.write(b"D%04o 0 %s\n" % (stat.S_IMODE(st.st_mode), _name(path)))
        if not (yield from self._response()):
            return
        for name in names:
            yield from self._send(_join(path, name), ancestors | {identity}, depth + 1)
        self.transport.write(b"E\n")
        yield from self._response()


def scpProtocol(volume: Volume, command: ScpCommand) -> _Exchange:
    return (ScpSink if command.sink else ScpSource)(volume, command)
