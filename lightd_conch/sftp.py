"""
The SFTP v3 protocol (draft-ietf-secsh-filexfer-02) over a confined filesystem.

This replaces Conch's C{FileTransferServer}, whose gaps are known: an unbounded
input buffer, no reply on malformed packets or unknown handles (twisted#12140)
and status code 11 for EEXIST.  Here every request gets exactly one reply with a
v3 status code, packets over 256 KiB close the channel, READ lengths are capped,
READDIR replies are bounded, and replies are never held unboundedly: while the
transport is full, no further request is read (see L{SFTPServer.pauseProducing}).

The protocol translates bytes; what the bytes ask for is done, and allowed or
refused, by the session's L{lightd_conch.volume.Volume}, and L{statusForError}
is the one place that maps an C{OSError} to an SFTP status.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
import struct
import time
from collections import deque
from typing import Callable, Deque, Dict, List, Optional, Set, Tuple, Union

from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Cooperator, CooperativeTask, TaskStopped, cooperate
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from .fs import expandHome
from .limits import IContainerBudgets
from .volume import Directory, OpenFile, SameFile, Volume

# Packet types.
FXP_INIT = 1
FXP_VERSION = 2
FXP_OPEN = 3
FXP_CLOSE = 4
FXP_READ = 5
FXP_WRITE = 6
FXP_LSTAT = 7
FXP_FSTAT = 8
FXP_SETSTAT = 9
FXP_FSETSTAT = 10
FXP_OPENDIR = 11
FXP_READDIR = 12
FXP_REMOVE = 13
FXP_MKDIR = 14
FXP_RMDIR = 15
FXP_REALPATH = 16
FXP_STAT = 17
FXP_RENAME = 18
FXP_READLINK = 19
FXP_SYMLINK = 20
FXP_STATUS = 101
FXP_HANDLE = 102
FXP_DATA = 103
FXP_NAME = 104
FXP_ATTRS = 105
FXP_EXTENDED = 200
FXP_EXTENDED_REPLY = 201

# Status codes (v3 only).
FX_OK = 0
FX_EOF = 1
FX_NO_SUCH_FILE = 2
FX_PERMISSION_DENIED = 3
FX_FAILURE = 4
FX_BAD_MESSAGE = 5
FX_OP_UNSUPPORTED = 8

# OPEN pflags.
FXF_READ = 0x01
FXF_WRITE = 0x02
FXF_APPEND = 0x04
FXF_CREAT = 0x08
FXF_TRUNC = 0x10
FXF_EXCL = 0x20

# Attribute flags.
FILEXFER_ATTR_SIZE = 0x01
FILEXFER_ATTR_UIDGID = 0x02
FILEXFER_ATTR_PERMISSIONS = 0x04
FILEXFER_ATTR_ACMODTIME = 0x08
FILEXFER_ATTR_EXTENDED = 0x80000000

SFTP_VERSION = 3
MAX_PACKET_LENGTH = 256 * 1024
"""The largest SFTP packet accepted, as OpenSSH's sftp-server; larger ones close the channel."""
MAX_READ_LENGTH = MAX_PACKET_LENGTH - 1024
"""READ replies carry at most this many bytes (261120, as OpenSSH)."""
MAX_READDIR_ENTRIES = 500
MAX_READDIR_BYTES = 64 * 1024
"""A READDIR reply holds at most this many entries and, past its first entry,
at most this many bytes: large enough that listing a big directory takes few
round trips, small enough for every client's packet limit."""
MAX_WRITE_LENGTH = MAX_READ_LENGTH
"""The WRITE payload clients are told to stay under (limits@openssh.com)."""
MAX_COPIES = 4
"""copy-data requests of one session running at once."""
_MAX_OFFSET = 2**63 - 1
"""The largest file offset or size the kernel takes (off_t); SFTP's are uint64."""

# statvfs@openssh.com flag bits.
_FXE_STATVFS_ST_RDONLY = 0x1
_FXE_STATVFS_ST_NOSUID = 0x2

EXTENSIONS: Tuple[Tuple[bytes, bytes], ...] = (
    (b"posix-rename@openssh.com", b"1"),
    (b"statvfs@openssh.com", b"2"),
    (b"fstatvfs@openssh.com", b"2"),
    (b"hardlink@openssh.com", b"1"),
    (b"fsync@openssh.com", b"1"),
    (b"lsetstat@openssh.com", b"1"),
    (b"limits@openssh.com", b"1"),
    (b"expand-path@openssh.com", b"1"),
    (b"copy-data", b"1"),
    (b"home-directory", b"1"),
    (b"users-groups-by-id@openssh.com", b"1"),
)
"""The extensions advertised in VERSION, with their versions, in OpenSSH's order."""

_STATUS_MESSAGES = {
    FX_OK: "Success",
    FX_EOF: "End of file",
    FX_NO_SUCH_FILE: "No such file",
    FX_PERMISSION_DENIED: "Permission denied",
    FX_FAILURE: "Failure",
    FX_BAD_MESSAGE: "Bad message",
    FX_OP_UNSUPPORTED: "Operation unsupported",
}

_ERRNO_STATUS = {
    errno.ENOENT: FX_NO_SUCH_FILE,
    errno.ENOTDIR: FX_NO_SUCH_FILE,
    errno.EBADF: FX_FAILURE,
    errno.EACCES: FX_PERMISSION_DENIED,
    errno.EPERM: FX_PERMISSION_DENIED,
    errno.EROFS: FX_PERMISSION_DENIED,
    errno.ENOSYS: FX_OP_UNSUPPORTED,
    errno.EOPNOTSUPP: FX_OP_UNSUPPORTED,
}


def statusForError(error: OSError) -> Tuple[int, str]:
    """
    The SFTP status code and message for a failed filesystem call.

    The message comes from the errno alone, never from a path, so no host path
    can reach a client.
    """
    code = _ERRNO_STATUS.get(error.errno, FX_FAILURE)
    if error.errno is None:
        return code, str(error.strerror or "Failure")
    return code, error.strerror or os.strerror(error.errno)


def _checkOffsets(*values: Optional[int]) -> None:
    """
    Refuse offsets and sizes past off_t as the kernel would (EINVAL), rather
    than let the os call raise OverflowError.  Called once the packet is
    parsed, so a truncated one still gets BAD_MESSAGE.
    """
    for value in values:
        if value is not None and value > _MAX_OFFSET:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))


class SFTPError(Exception):
    """
    A request that ends in a status other than an C{OSError}'s.
    """

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message or _STATUS_MESSAGES[code]


class _Malformed(Exception):
    """
    A packet whose fields run past its end.
    """


class _Reader:
    """
    Reads the fields of one packet; a short packet raises L{_Malformed}.
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def uint32(self) -> int:
        end = self.pos + 4
        if end > len(self.data):
            raise _Malformed()
        (value,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos = end
        return value

    def uint64(self) -> int:
        end = self.pos + 8
        if end > len(self.data):
            raise _Malformed()
        (value,) = struct.unpack_from(">Q", self.data, self.pos)
        self.pos = end
        return value

    def view(self):
        """
        A string field as a slice of the packet, without a copy (for WRITE
        data); the packet may be a memoryview.
        """
        length = self.uint32()
        end = self.pos + length
        if end > len(self.data):
            raise _Malformed()
        value = self.data[self.pos : end]
        self.pos = end
        return value

    def string(self) -> bytes:
        return bytes(self.view())

    def attrs(self) -> "Attributes":
        flags = self.uint32()
        attrs = Attributes()
        if flags & FILEXFER_ATTR_SIZE:
            attrs.size = self.uint64()
        if flags & FILEXFER_ATTR_UIDGID:
            attrs.uid = self.uint32()
            attrs.gid = self.uint32()
        if flags & FILEXFER_ATTR_PERMISSIONS:
            attrs.permissions = self.uint32()
        if flags & FILEXFER_ATTR_ACMODTIME:
            attrs.atime = self.uint32()
            attrs.mtime = self.uint32()
        if flags & FILEXFER_ATTR_EXTENDED:
            for _ in range(self.uint32()):
                self.string()
                self.string()
        return attrs


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


class Attributes:
    """
    The attributes a client asked to set.
    """

    __slots__ = ("size", "uid", "gid", "permissions", "atime", "mtime")

    def __init__(self) -> None:
        self.size: Optional[int] = None
        self.uid: Optional[int] = None
        self.gid: Optional[int] = None
        self.permissions: Optional[int] = None
        self.atime: Optional[int] = None
        self.mtime: Optional[int] = None

    @property
    def times(self) -> Optional[Tuple[int, int]]:
        if self.atime is None or self.mtime is None:
            return None
        return (self.atime, self.mtime)


_ALL_ATTRS = (
    FILEXFER_ATTR_SIZE
    | FILEXFER_ATTR_UIDGID
    | FILEXFER_ATTR_PERMISSIONS
    | FILEXFER_ATTR_ACMODTIME
)
_ATTRS = struct.Struct(">IQIIIII")
_UINT32 = struct.Struct(">I")
_NO_ATTRS = b"\0\0\0\0"


def _clip32(value: int) -> int:
    return value if 0 <= value <= 0xFFFFFFFF else min(max(value, 0), 0xFFFFFFFF)


def encodeAttrs(st: os.stat_result) -> bytes:
    # st[7] and st[8] are the whole seconds of st_atime and st_mtime.
    return _ATTRS.pack(
        _ALL_ATTRS,
        st.st_size,
        st.st_uid,
        st.st_gid,
        st.st_mode,
        _clip32(st[7]),
        _clip32(st[8]),
    )


_OK_TAIL = struct.pack(">I", FX_OK) + _string(_STATUS_MESSAGES[FX_OK].encode()) + _string(b"")
_OK_HEAD = struct.pack(">IB", 5 + len(_OK_TAIL), FXP_STATUS)

# SYMLINK's two paths come in two orders: the drafts' (the link, then its
# target) and OpenSSH's (the target, then the link; its PROTOCOL file, 4.1).
# This server reads OpenSSH's order and turns the drafts' around for the
# clients below, found by their SSH version string.  What each client family
# sends to a server whose version string does not name OpenSSH (this one's is
# "SSH-2.0-lightd_sftp_...", on purpose: clients apply OpenSSH-specific
# workarounds to any server that claims to be OpenSSH), read from its source:
#
#   client (version string)        order sent here   switches on the server's banner
#   OpenSSH sftp (OpenSSH_)        target, link      no: always OpenSSH's order
#   paramiko (paramiko_)           target, link      no
#   Go x/crypto + pkg/sftp (Go),   target, link      no (pkg/sftp marshals the target first)
#     rclone, restic
#   libssh2 (libssh2_), curl       target, link      no (libssh2_sftp_symlink(orig, linkpath))
#   sshj (SSHJ_)                   link, target      no: always the drafts' order
#   Cyberduck (its own name,       target, link      no: it calls sshj's symlink with the
#     on sshj)                                       two arguments swapped
#   libssh (libssh_), KDE          link, target      yes: OpenSSH's order if "OpenSSH" is
#                                                    anywhere in the banner
#   asyncssh (AsyncSSH_)           link, target      yes: "OpenSSH" or "paramiko" in it
#   ssh2 for Node.js (ssh2js)      link, target      yes: banner starts "SSH-2.0-OpenSSH"
#     VS Code's SFTP extensions                      or "SSH-2.0-dropbear"
#   WinSCP (WinSCP_)               link, target      yes: software version starts "OpenSSH"
#   PuTTY psftp/pscp, FileZilla    (none)            they have no command that makes links
#     (fzsftp, built on PuTTY)
#
# libssh's prefix ends in "_" so that libssh2 ("libssh2_") is not taken for it.
_LINK_FIRST_CLIENTS = (
    b"SSH-2.0-AsyncSSH_",
    b"SSH-2.0-WinSCP_",
    b"SSH-2.0-ssh2js",
    b"SSH-2.0-libssh_",
    b"SSH-2.0-SSHJ_",
)

_SIX_MONTHS = 182 * 24 * 3600
# os.fsencode, without its call: scandir decodes names this way.
_MODE_STRINGS: Dict[int, bytes] = {}


class _Listing:
    """
    What the entries of one READDIR reply share: the time "now" for the
    six-months rule of C{ls -l} dates, and the dates and mode strings already
    formatted (entries made together share their minute and their mode).
    """

    __slots__ = ("now", "dates")

    def __init__(self, now: Optional[float] = None) -> None:
        self.now = time.time() if now is None else now
        self.dates: Dict[int, bytes] = {}

    def date(self, mtime: float) -> bytes:
        minute = int(mtime) // 60
        when = self.dates.get(minute)
        if when is None:
            try:
                local = time.localtime(mtime)
            except (OverflowError, OSError, ValueError):
                # Beyond what the C library can show (a file system can hold
                # times like 2**62): no date, as OpenSSH's server does, and
                # the rest of the listing unharmed.
                when = b""
            else:
                if abs(self.now - mtime) < _SIX_MONTHS:
                    when = time.strftime("%b %e %H:%M", local).encode("ascii")
                else:
                    when = time.strftime("%b %e  %Y", local).encode("ascii")
            self.dates[minute] = when
        return when

    def entry(self, name: bytes, st: os.stat_result) -> bytes:
        """
        One READDIR entry: the name, its C{ls -l} line and its attributes.

        The long name has the form OpenSSH's server sends, with owners as
        numbers: the names on the host mean nothing inside a container.
        """
        mode = st.st_mode
        modeString = _MODE_STRINGS.get(mode)
        if modeString is None:
            modeString = _MODE_STRINGS[mode] = stat.filemode(mode).encode("ascii")
        head = b"%s %3d %-8d %-8d %8d %s " % (
            modeString,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_size,
            self.date(st.st_mtime),
        )
        size = len(name)
        return b"".join(
            (_UINT32.pack(size), name, _UINT32.pack(len(head) + size), head, name, encodeAttrs(st))
        )


_Handle = Union[OpenFile, Directory]


@implementer(IPushProducer)
class SFTPServer(Protocol):
    """
    One SFTP session over one channel.

    @ivar maxHandles: open file and directory handles allowed at once.
    @ivar extensions: the FXP_EXTENDED requests served, by name.
    """

    _log = Logger()
    acceptsViews = True
    """L{dataReceived} takes memoryviews, so channel data arrives uncopied."""
    requestCounts: "collections.Counter[int]" = collections.Counter()
    """Requests received by packet type; the service sets its metrics' own."""

    # The handlers by request type and by extension name: functions of the
    # class (see L{_bindHandlers}), shared by every session rather than a
    # dictionary of bound methods each.
    _handlers: Dict[int, str] = {
        FXP_OPEN: "_open",
        FXP_CLOSE: "_close",
        FXP_READ: "_read",
        FXP_WRITE: "_write",
        FXP_LSTAT: "_lstat",
        FXP_FSTAT: "_fstat",
        FXP_SETSTAT: "_setstat",
        FXP_FSETSTAT: "_fsetstat",
        FXP_OPENDIR: "_opendir",
        FXP_READDIR: "_readdir",
        FXP_REMOVE: "_remove",
        FXP_MKDIR: "_mkdir",
        FXP_RMDIR: "_rmdir",
        FXP_REALPATH: "_realpath",
        FXP_STAT: "_stat",
        FXP_RENAME: "_rename",
        FXP_READLINK: "_readlink",
        FXP_SYMLINK: "_symlink",
        FXP_EXTENDED: "_extended",
    }
    _extensionHandlers: Dict[bytes, str] = {
        b"posix-rename@openssh.com": "_posixRename",
        b"statvfs@openssh.com": "_statvfs",
        b"fstatvfs@openssh.com": "_fstatvfs",
        b"hardlink@openssh.com": "_hardlink",
        b"fsync@openssh.com": "_fsync",
        b"lsetstat@openssh.com": "_lsetstat",
        b"limits@openssh.com": "_limits",
        b"expand-path@openssh.com": "_expandPath",
        b"copy-data": "_copyData",
        b"home-directory": "_homeDirectory",
        b"users-groups-by-id@openssh.com": "_usersGroupsById",
    }
    _dispatch: Dict[int, Callable[["SFTPServer", int, _Reader], bytes]]
    extensions: Dict[bytes, Callable[["SFTPServer", int, _Reader], Optional[bytes]]]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._bindHandlers()

    @classmethod
    def _bindHandlers(cls) -> None:
        """
        Look the handlers up on C{cls}, so that a subclass's own are used.
        """
        cls._dispatch = {kind: getattr(cls, name) for kind, name in cls._handlers.items()}
        cls.extensions = {
            name: getattr(cls, method) for name, method in cls._extensionHandlers.items()
        }

    def __init__(
        self,
        volume: Volume,
        maxHandles: int = 512,
        cooperator: Optional[Cooperator] = None,
        clientVersion: bytes = b"",
        budget: Optional[IContainerBudgets] = None,
        owner: str = "",
    ) -> None:
        self.volume = volume
        self.maxHandles = maxHandles
        self._budget = budget
        self._owner = owner
        self._linkFirst = clientVersion.startswith(_LINK_FIRST_CLIENTS)
        self._cooperate = cooperate if cooperator is None else cooperator.cooperate
        self._copies: Set[CooperativeTask] = set()
        self._chunks: Deque = deque()
        self._size = 0
        self._needed = 4
        self._handles: Dict[bytes, _Handle] = {}
        self._nextHandle = 0
        self._version: Optional[int] = None
        self._paused = False
        self._closed = False
        self._eof = False

    # -- framing ----------------------------------------------------------

    def dataReceived(self, data) -> None:
        """
        Take bytes or a memoryview (see L{acceptsViews}).  They are kept as
        they came, and each packet is cut from the front of them: a packet
        inside one chunk is a view of it, one across chunks is joined from
        just its own bytes.  Whatever the client sends and however often
        the session pauses, each byte is copied at most once.  Once the
        session has ended, input is dropped.
        """
        if self._closed:
            return
        self._chunks.append(data)
        self._size += len(data)
        if self._size >= self._needed and not self._paused:
            self._processBuffer()

    def _cut(self, count: int):
        """
        The first C{count} bytes of the input (all there), taken off it.
        """
        chunks = self._chunks
        self._size -= count
        first = chunks[0]
        size = len(first)
        if size > count:
            view = memoryview(first)
            chunks[0] = view[count:]
            return view[:count]
        if size == count:
            chunks.popleft()
            return memoryview(first)
        parts = []
        while count:
            chunk = chunks.popleft()
            size = len(chunk)
            if size > count:
                view = memoryview(chunk)
                parts.append(view[:count])
                chunks.appendleft(view[count:])
                break
            parts.append(chunk)
            count -= size
        return memoryview(b"".join(parts))

    def _peekLength(self) -> int:
        chunks = self._chunks
        first = chunks[0]
        if len(first) >= 4:
            return struct.unpack_from(">I", first)[0]
        head = b""
        for chunk in chunks:
            head += bytes(chunk[: 4 - len(head)])
            if len(head) == 4:
                break
        return struct.unpack(">I", head)[0]

    def _processBuffer(self) -> None:
        chunks = self._chunks
        needed = 4
        while chunks and not self._paused and not self._closed:
            # The packets wholly inside the first chunk, as views of it.
            first = chunks[0]
            view = first if first.__class__ is memoryview else memoryview(first)
            size = len(view)
            position = 0
            # self._size is brought up to date after the loop: nothing a
            # request does reads it meanwhile (resuming is never synchronous).
            while size - position >= 4 and not self._paused and not self._closed:
                (length,) = struct.unpack_from(">I", view, position)
                if length > MAX_PACKET_LENGTH or length < 5:
                    # Too big to take, or too short to hold a type and an id
                    # we could answer: nothing sensible can follow.
                    self._abort()
                    return
                end = position + 4 + length
                if end > size:
                    break
                self._packetReceived(view[position + 4 : end])
                position = end
            if self._closed:
                return
            if position:
                self._size -= position
                if position == size:
                    chunks.popleft()
                else:
                    chunks[0] = view[position:]
            if self._paused:
                break
            # The next packet runs past the first chunk: joined from just
            # its own bytes once it is all here.
            if self._size < 4:
                needed = 4
                break
            length = self._peekLength()
            if length > MAX_PACKET_LENGTH or length < 5:
                self._abort()
                return
            if self._size < 4 + length:
                needed = 4 + length
                break
            self._packetReceived(self._cut(4 + length)[4:])
        if not self._closed:
            self._needed = needed

    def _abort(self) -> None:
        self._closed = True
        self._chunks.clear()
        self._size = 0
        self.transport.loseConnection()

    def _send(self, kind: int, payload: bytes) -> None:
        self.transport.write(struct.pack(">IB", len(payload) + 1, kind) + payload)

    def _packetReceived(self, packet: bytes) -> None:
        kind = packet[0]
        self.requestCounts[kind] += 1
        if kind == FXP_INIT:
            if self._version is not None:
                self._abort()  # INIT carries no id to answer with
                return
            self._version = struct.unpack_from(">I", packet, 1)[0]
            self._send(FXP_VERSION, self._versionPayload())
            return
        if self._version is None:
            self._abort()  # OpenSSH's server closes too: no session yet
            return
        (requestId,) = struct.unpack_from(">I", packet, 1)
        handler = self._dispatch.get(kind)
        if handler is None:
            self._status(requestId, FX_OP_UNSUPPORTED)
            return
        try:
            reply = handler(self, requestId, _Reader(packet, 5))
        except _Malformed:
            self._status(requestId, FX_BAD_MESSAGE)
        except SFTPError as e:
            self._status(requestId, e.code, e.message)
        except OSError as e:
            self._status(requestId, *statusForError(e))
        except Exception:
            self._log.failure("SFTP request type {kind} failed", kind=kind)
            self._status(requestId, FX_FAILURE)
        else:
            # None: the reply follows later (a copy-data still running).
            if reply.__class__ is list:
                self.transport.writeSequence(reply)
            elif reply is not None:
                self.transport.write(reply)

    def _versionPayload(self) -> bytes:
        payload = [struct.pack(">I", SFTP_VERSION)]
        for name, version in self.advertisedExtensions():
            payload.append(_string(name) + _string(version))
        return b"".join(payload)

    def advertisedExtensions(self) -> List[Tuple[bytes, bytes]]:
        return [(name, version) for name, version in EXTENSIONS if name in self.extensions]

    # -- replies ----------------------------------------------------------

    @staticmethod
    def _packet(kind: int, requestId: int, payload: bytes) -> bytes:
        return struct.pack(">IBI", len(payload) + 5, kind, requestId) + payload

    def _statusPacket(self, requestId: int, code: int, message: str = "") -> bytes:
        text = (message or _STATUS_MESSAGES[code]).encode("utf-8")
        return self._packet(
            FXP_STATUS, requestId, struct.pack(">I", code) + _string(text) + _string(b"")
        )

    def _status(self, requestId: int, code: int, message: str = "") -> None:
        self.transport.write(self._statusPacket(requestId, code, message))

    def _ok(self, requestId: int) -> bytes:
        # The commonest reply, from parts made once.
        return _OK_HEAD + struct.pack(">I", requestId) + _OK_TAIL

    def _names(self, requestId: int, entries: List[Tuple[bytes, bytes, bytes]]) -> bytes:
        body = [struct.pack(">I", len(entries))]
        for name, long, attrs in entries:
            body.append(_string(name) + _string(long) + attrs)
        return self._packet(FXP_NAME, requestId, b"".join(body))

    # -- handles ----------------------------------------------------------

    def _addHandle(self, requestId: int, handle: _Handle) -> bytes:
        self._nextHandle += 1
        key = str(self._nextHandle).encode("ascii")
        self._handles[key] = handle
        if self._budget is not None:
            self._budget.takeDescriptors(self._owner)
        return self._packet(FXP_HANDLE, requestId, _string(key))

    def _checkHandleRoom(self) -> None:
        # Before anything is opened: this session's limit, then its
        # container's, across all the container's sessions.
        if len(self._handles) >= self.maxHandles or (
            self._budget is not None and self._budget.descriptorsFull(self._owner)
        ):
            raise SFTPError(FX_FAILURE, "Too many open handles")

    def _dropHandle(self, key: bytes) -> Optional[_Handle]:
        handle = self._handles.pop(key, None)
        if handle is not None and self._budget is not None:
            self._budget.giveDescriptors(self._owner)
        return handle

    # Both take the handle's key once every field of the request is read, so
    # a short packet is BAD_MESSAGE whatever handle it names.

    def _handle(self, key: bytes, kind: type) -> _Handle:
        handle = self._handles.get(key)
        if not isinstance(handle, kind):
            raise SFTPError(FX_FAILURE, "Invalid handle")
        return handle

    def _anyHandle(self, key: bytes) -> _Handle:
        handle = self._handles.get(key)
        if handle is None:
            raise SFTPError(FX_FAILURE, "Invalid handle")
        return handle

    # -- requests ---------------------------------------------------------

    def _open(self, requestId: int, reader: _Reader) -> bytes:
        path = reader.string()
        pflags = reader.uint32()
        attrs = reader.attrs()
        self._checkHandleRoom()
        if pflags & FXF_READ and pflags & FXF_WRITE:
            flags = os.O_RDWR
        elif pflags & FXF_WRITE:
            flags = os.O_WRONLY
        else:
            flags = os.O_RDONLY
        if pflags & FXF_APPEND:
            flags |= os.O_APPEND
        if pflags & FXF_CREAT:
            flags |= os.O_CREAT
        if pflags & FXF_TRUNC:
            flags |= os.O_TRUNC
        if pflags & FXF_EXCL:
            flags |= os.O_EXCL
        return self._addHandle(requestId, self.volume.openFile(path, flags, attrs.permissions))

    def _close(self, requestId: int, reader: _Reader) -> bytes:
        key = reader.string()
        handle = self._dropHandle(key)
        if handle is None:
            raise SFTPError(FX_FAILURE, "Invalid handle")
        handle.close()
        return self._ok(requestId)

    def _read(self, requestId: int, reader: _Reader) -> bytes:
        key = reader.string()
        offset = reader.uint64()
        length = min(reader.uint32(), MAX_READ_LENGTH)
        handle = self._handle(key, OpenFile)
        _checkOffsets(offset)
        data = handle.read(length, offset)
        if not data and length:
            return self._statusPacket(requestId, FX_EOF)
        # Header and data go out as two parts: the data is never copied
        # into a joined reply.
        return [
            struct.pack(">IBII", len(data) + 9, FXP_DATA, requestId, len(data)),
            data,
        ]

    def _write(self, requestId: int, reader: _Reader) -> bytes:
        key = reader.string()
        offset = reader.uint64()
        data = memoryview(reader.view())
        handle = self._handle(key, OpenFile)
        _checkOffsets(offset)
        handle.write(data, offset)
        return self._ok(requestId)

    def _attrsReply(self, requestId: int, st: os.stat_result) -> bytes:
        return self._packet(FXP_ATTRS, requestId, encodeAttrs(st))

    def _lstat(self, requestId: int, reader: _Reader) -> bytes:
        return self._attrsReply(requestId, self.volume.lstat(reader.string()))

    def _stat(self, requestId: int, reader: _Reader) -> bytes:
        return self._attrsReply(requestId, self.volume.stat(reader.string()))

    def _fstat(self, requestId: int, reader: _Reader) -> bytes:
        return self._attrsReply(requestId, self._anyHandle(reader.string()).stat())

    def _checkOwnership(self, attrs: Attributes, st: os.stat_result) -> None:
        # Ownership belongs to the host: a client may restate it, not change it.
        if attrs.uid is not None and (attrs.uid, attrs.gid) != (st.st_uid, st.st_gid):
            raise SFTPError(FX_PERMISSION_DENIED, "Changing owners is not allowed")

    def _setstat(self, requestId: int, reader: _Reader) -> bytes:
        path = reader.string()
        attrs = reader.attrs()
        if attrs.uid is not None:
            self._checkOwnership(attrs, self.volume.stat(path))
        _checkOffsets(attrs.size)
        self.volume.setattrs(path, attrs.size, attrs.permissions, attrs.times)
        return self._ok(requestId)

    def _fsetstat(self, requestId: int, reader: _Reader) -> bytes:
        key = reader.string()
        attrs = reader.attrs()
        handle = self._anyHandle(key)
        if attrs.uid is not None:
            self._checkOwnership(attrs, handle.stat())
        _checkOffsets(attrs.size)
        handle.setattrs(attrs.size, attrs.permissions, attrs.times)
        return self._ok(requestId)

    def _opendir(self, requestId: int, reader: _Reader) -> bytes:
        path = reader.string()
        self._checkHandleRoom()
        return self._addHandle(requestId, self.volume.openDirectory(path))

    def _readdir(self, requestId: int, reader: _Reader) -> bytes:
        handle = self._handle(reader.string(), Directory)
        batch = handle.read(MAX_READDIR_ENTRIES)
        if not batch:
            return self._statusPacket(requestId, FX_EOF)
        listing = _Listing()
        entries = []
        size = 0
        for index, (name, st) in enumerate(batch):
            entry = listing.entry(name, st)
            size += len(entry)
            if size > MAX_READDIR_BYTES and entries:
                handle.unread(batch[index:])
                break
            entries.append(entry)
        return self._packet(
            FXP_NAME, requestId, struct.pack(">I", len(entries)) + b"".join(entries)
        )

    def _remove(self, requestId: int, reader: _Reader) -> bytes:
        self.volume.remove(reader.string())
        return self._ok(requestId)

    def _mkdir(self, requestId: int, reader: _Reader) -> bytes:
        path = reader.string()
        attrs = reader.attrs()
        self.volume.mkdir(path, attrs.permissions)
        return self._ok(requestId)

    def _rmdir(self, requestId: int, reader: _Reader) -> bytes:
        self.volume.rmdir(reader.string())
        return self._ok(requestId)

    def _realpath(self, requestId: int, reader: _Reader) -> bytes:
        path = self.volume.realpath(reader.string())
        return self._names(requestId, [(path, path, _NO_ATTRS)])

    def _rename(self, requestId: int, reader: _Reader) -> bytes:
        old = reader.string()
        new = reader.string()
        self.volume.rename(old, new)
        return self._ok(requestId)

    def _readlink(self, requestId: int, reader: _Reader) -> bytes:
        target = self.volume.readlink(reader.string())
        return self._names(requestId, [(target, target, _NO_ATTRS)])

    def _symlink(self, requestId: int, reader: _Reader) -> bytes:
        # OpenSSH's argument order (its PROTOCOL file): target first, then
        # the link to create; the drafts' order for the clients that send it
        # (L{_LINK_FIRST_CLIENTS}).
        target = reader.string()
        linkpath = reader.string()
        if self._linkFirst:
            target, linkpath = linkpath, target
        self.volume.symlink(target, linkpath)
        return self._ok(requestId)

    def _extended(self, requestId: int, reader: _Reader) -> Optional[bytes]:
        name = reader.string()
        handler = self.extensions.get(name)
        if handler is None:
            raise SFTPError(FX_OP_UNSUPPORTED, "Unsupported extension")
        return handler(self, requestId, reader)

    # -- extensions (formats: OpenSSH's PROTOCOL, section 4) ----------------

    def _extendedReply(self, requestId: int, payload: bytes) -> bytes:
        return self._packet(FXP_EXTENDED_REPLY, requestId, payload)

    def _posixRename(self, requestId: int, reader: _Reader) -> bytes:
        old = reader.string()
        new = reader.string()
        self.volume.rename(old, new, replace=True)
        return self._ok(requestId)

    def _statvfsReply(self, requestId: int, st: os.statvfs_result) -> bytes:
        flag = 0
        if st.f_flag & os.ST_RDONLY:
            flag |= _FXE_STATVFS_ST_RDONLY
        if st.f_flag & os.ST_NOSUID:
            flag |= _FXE_STATVFS_ST_NOSUID
        return self._extendedReply(
            requestId,
            struct.pack(
                ">11Q",
                st.f_bsize,
                st.f_frsize,
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_favail,
                st.f_fsid & 0xFFFFFFFFFFFFFFFF,
                flag,
                st.f_namemax,
            ),
        )

    def _statvfs(self, requestId: int, reader: _Reader) -> bytes:
        return self._statvfsReply(requestId, self.volume.statvfs(reader.string()))

    def _fstatvfs(self, requestId: int, reader: _Reader) -> bytes:
        return self._statvfsReply(requestId, self._anyHandle(reader.string()).statvfs())

    def _hardlink(self, requestId: int, reader: _Reader) -> bytes:
        old = reader.string()
        new = reader.string()
        self.volume.hardlink(old, new)
        return self._ok(requestId)

    def _fsync(self, requestId: int, reader: _Reader) -> bytes:
        self._handle(reader.string(), OpenFile).fsync()
        return self._ok(requestId)

    def _lsetstat(self, requestId: int, reader: _Reader) -> bytes:
        path = reader.string()
        attrs = reader.attrs()
        if attrs.size is not None:
            # A size means nothing for a link; OpenSSH answers the same.
            raise SFTPError(FX_BAD_MESSAGE, "lsetstat cannot set a size")
        if attrs.uid is not None:
            self._checkOwnership(attrs, self.volume.lstat(path))
        self.volume.lsetattrs(path, attrs.permissions, attrs.times)
        return self._ok(requestId)

    def _limits(self, requestId: int, reader: _Reader) -> bytes:
        return self._extendedReply(
            requestId,
            struct.pack(
                ">4Q", MAX_PACKET_LENGTH, MAX_READ_LENGTH, MAX_WRITE_LENGTH, self.maxHandles
            ),
        )

    def _expandPath(self, requestId: int, reader: _Reader) -> bytes:
        # The volume is every user's home (L{expandHome}); otherwise
        # REALPATH's lexical rules apply.
        resolved = self.volume.realpath(expandHome(reader.string()))
        return self._names(requestId, [(resolved, resolved, _NO_ATTRS)])

    def _homeDirectory(self, requestId: int, reader: _Reader) -> bytes:
        reader.string()  # whose home: every one is the volume root here
        return self._names(requestId, [(b"/", b"/", _NO_ATTRS)])

    def _usersGroupsById(self, requestId: int, reader: _Reader) -> bytes:
        # Host account names mean nothing inside a container and are not ours
        # to show: every id is answered with an empty name ("unknown"), and
        # clients fall back to the numbers, as in the longnames.
        uids = reader.string()
        gids = reader.string()
        if len(uids) % 4 or len(gids) % 4:
            raise _Malformed()
        unknown = _string(b"")
        return self._extendedReply(
            requestId,
            _string(unknown * (len(uids) // 4)) + _string(unknown * (len(gids) // 4)),
        )

    def _copyData(self, requestId: int, reader: _Reader) -> None:
        readKey = reader.string()
        readOffset = reader.uint64()
        length = reader.uint64()
        writeKey = reader.string()
        writeOffset = reader.uint64()
        _checkOffsets(readOffset, writeOffset)
        source = self._handles.get(readKey)
        target = self._handles.get(writeKey)
        if (
            not isinstance(source, OpenFile)
            or not isinstance(target, OpenFile)
            or readKey == writeKey
        ):
            raise SFTPError(FX_FAILURE, "Invalid handle")
        try:
            job = self.volume.copy(source, readOffset, length, target, writeOffset)
        except SameFile as e:
            raise SFTPError(FX_FAILURE, str(e))
        if len(self._copies) >= MAX_COPIES:
            job.close()
            raise SFTPError(FX_FAILURE, "Too many copies in progress")
        # The copy's two descriptors (duplicates of the handles') are the
        # container's until it ends.
        if self._budget is not None:
            if self._budget.descriptorsFull(self._owner, 2):
                job.close()
                raise SFTPError(FX_FAILURE, "Too many open handles")
            self._budget.takeDescriptors(self._owner, 2)
        task = self._cooperate(job.steps())
        self._copies.add(task)

        def finished(_: object) -> None:
            if job.shortRead:
                self._reply(self._statusPacket(requestId, FX_EOF))
            else:
                self._reply(self._ok(requestId))

        def failed(failure) -> None:
            if failure.check(TaskStopped):
                return  # the session ended
            if failure.check(OSError):
                self._reply(self._statusPacket(requestId, *statusForError(failure.value)))
                return
            self._log.failure("copy-data failed", failure)
            self._reply(self._statusPacket(requestId, FX_FAILURE))

        def cleanup(_: object) -> None:
            self._copies.discard(task)
            job.close()
            if self._budget is not None:
                self._budget.giveDescriptors(self._owner, 2)
            self._endIfAnswered()

        task.whenDone().addCallbacks(finished, failed).addBoth(cleanup)
        return None

    def _reply(self, packet: bytes) -> None:
        if not self._closed:
            self.transport.write(packet)

    # -- flow control -----------------------------------------------------

    def pauseProducing(self) -> None:
        """
        The channel's send side is full: read no more requests until it drains.
        """
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._processBuffer()
        self._endIfAnswered()

    def eofReceived(self) -> None:
        """
        The client sends no more requests.  Those it sent before are all
        answered (some may wait for the send side to drain, or for a copy),
        then the session ends with exit status 0, as OpenSSH's server's does.
        """
        self._eof = True
        self._endIfAnswered()

    def _endIfAnswered(self) -> None:
        if not self._eof or self._closed or self._paused or self._copies:
            return
        if self._size >= self._needed:
            return  # a whole request is still to be read (resumeProducing)
        # What is left, if anything, is part of a request that never came.
        self._closed = True
        self.transport.exit(0)

    def stopProducing(self) -> None:
        self._closed = True

    @property
    def paused(self) -> bool:
        return self._paused

    def connectionLost(self, reason: object = None) -> None:
        self._closed = True
        for task in list(self._copies):
            task.stop()
        handles, self._handles = self._handles, {}
        if self._budget is not None:
            self._budget.giveDescriptors(self._owner, len(handles))
        for handle in handles.values():
            try:
                handle.close()
            except OSError:
                pass
        self.volume.close()


SFTPServer._bindHandlers()
