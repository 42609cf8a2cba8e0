"""
What one login may do to its container's volume.

Every protocol a session runs (the SFTP subsystem, legacy scp, rsync) reaches
the volume through one L{Volume}.  It answers queries through the confined
filesystem (L{lightd_conch.fs}, the one resolver), lets every change through one
check (L{Volume.mayChange}), and hands out L{OpenFile}s and L{Directory}s that
own the reading, writing and attribute changes of what was opened.  So what a
container's policy asks for (read-only, quota, locks, bandwidth, the audit)
is decided here, once, for every protocol; the protocols translate bytes and
never touch a descriptor of the volume themselves.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
import sys
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

from .containers import ContainerState
from .fs import ConfinedFilesystem, Parts, namesAFolder, normalize, virtualPath
from .policy import Policy
from .quota import BLOCK, QuotaExceeded, allocated

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

_WRITING = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
"""Open flags that change the volume (a new file, a truncation, writes)."""

COPY_CHUNK = 8 * 1024 * 1024
"""Bytes one copy step moves in the kernel before other work gets a turn."""
_COPY_FALLBACK_CHUNK = 256 * 1024

Times = Optional[Tuple[int, int]]
_T = TypeVar("_T")

MAX_UNCOVER_CHECK = 10_000
"""Entries read under a folder to be renamed, with a denylist of nested
patterns, to be sure none is hidden; a folder holding more is not moved."""
_MAX_UNCOVER_DEPTH = 64

_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
_WRITE_LOCK = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
"""A struct flock for the whole file (l_len 0), l_pid 0 as OFD locks need."""


STALE_WRITER = 15.0
"""Seconds of silence after which a writer's session may be superseded by a
new session of the same login from the same address that opens its file."""


class LoginOwner:
    """
    Who a volume serves, as write locks need to know: L{supersedes} says
    whether this login may take over a writer of another session.  The
    default serves no one in particular and supersedes nobody.
    """

    def supersedes(self, other: "LoginOwner") -> bool:
        return False

    def endStale(self, path: bytes) -> None:
        pass

    def audit(self, event: str, **fields) -> None:
        """
        Record C{event} of this login in the audit log.
        """


_NO_OWNER = LoginOwner()


class ReadOnly(PermissionError):
    """A change to a read-only volume."""

    def __init__(self) -> None:
        super().__init__(errno.EACCES, "the volume is read-only")


class FileLocked(OSError):
    """An open for writing of a file another writer holds."""

    def __init__(self) -> None:
        super().__init__(errno.EAGAIN, "file is locked by another writer")


def _hidden() -> OSError:
    # What a denied name answers, as if nothing were there.
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))


class _StatVFS:
    """A statvfs result with the quota as the size and the room left as free."""

    __slots__ = (
        "f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
        "f_files", "f_ffree", "f_favail", "f_fsid", "f_flag", "f_namemax",
    )

    def __init__(self, st, **changes) -> None:
        for name in self.__slots__:
            setattr(self, name, changes.get(name, getattr(st, name)))


class Volume:
    """
    One login's view of its container's volume, and the one gate for what
    that login may do to it: every protocol's requests reach the volume
    through here, and the container's policy (L{ContainerState.policy},
    read at each call, so a change reaches live sessions) is applied here
    and nowhere else.

    @ivar containerId: whose volume this is.
    @cvar fileClass: what L{openFile} returns.
    """

    fileClass: type = None  # OpenFile, once defined below

    def __init__(
        self,
        filesystem: ConfinedFilesystem,
        containerId: str = "",
        state: Optional[ContainerState] = None,
        owner: Optional["LoginOwner"] = None,
    ) -> None:
        self._fs = filesystem
        self.containerId = containerId
        self._state = ContainerState(containerId) if state is None else state
        self._owner = _NO_OWNER if owner is None else owner
        self._closers: List[Callable[[], None]] = []

    @classmethod
    def open(
        cls,
        root: str,
        containerId: str = "",
        useOpenat2: Optional[bool] = None,
        state: Optional[ContainerState] = None,
        owner: Optional["LoginOwner"] = None,
    ) -> "Volume":
        """
        The volume directory at C{root}, held by a descriptor from now on.

        @raise OSError: it is missing or not a directory.
        """
        return cls(ConfinedFilesystem(root, useOpenat2), containerId, state, owner)

    @property
    def policy(self) -> Policy:
        return self._state.policy

    @property
    def hostPath(self) -> str:
        """
        Where the volume is on the host: only for the rsync sandbox, which
        binds it by path.  Never shown to a client.
        """
        return os.readlink(f"/proc/self/fd/{self._fs.rootFD}")

    def sandboxRoot(self) -> int:
        """
        A new C{O_PATH} descriptor of the volume directory this session
        holds, for the rsync sandbox to bind; the caller closes it.
        """
        return os.dup(self._fs.rootFD)

    def mayRunRsync(self, upload: bool) -> None:
        """
        Whether rsync's server may run for this login, uploading (C{upload})
        or sending.  rsync works inside its sandbox, beyond the reach of
        this object's checks: where a policy key cannot be held there, it
        is refused, with why.

        @raise PermissionError: with the reason as its message.
        """
        policy = self.policy
        if policy.denylist:
            raise PermissionError(errno.EACCES, "rsync is not served for a volume with a denylist")
        if upload and policy.read_only:
            raise PermissionError(errno.EACCES, "the volume is read-only")
        if upload and policy.quota_bytes:
            raise PermissionError(
                errno.EACCES, "rsync uploads are not served for a volume with a disk quota"
            )

    def whenClosed(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once, when this volume is closed.
        """
        self._closers.append(callback)

    def whenPolicyChanges(self, callback: Callable[[Policy], None]) -> None:
        """
        Call C{callback} with the container's new policy each time it
        changes, until this volume is closed: for work that is checked once,
        when it starts, and must be checked again (rsync in its sandbox).
        """
        watchers = self._state.watchers
        watchers.append(callback)

        def forget() -> None:
            if callback in watchers:
                watchers.remove(callback)

        self._closers.append(forget)

    def close(self) -> None:
        self._fs.close()
        closers, self._closers = self._closers, []
        for callback in closers:
            callback()

    # -- the gate -----------------------------------------------------------

    def mayChange(self, *paths: bytes) -> None:
        """
        The one check every change to the volume passes, by any protocol,
        before anything is touched.

        @raise OSError: mapped to each protocol's error: L{ReadOnly}, or
            C{ENOENT} for a name the denylist hides.
        """
        policy = self._state.policy
        if policy.read_only:
            raise ReadOnly()
        if policy.denylist:
            for path in paths:
                self._checkVisible(policy, path, follow=False)

    def _mayQuery(self, path: bytes, follow: bool = True) -> None:
        policy = self._state.policy
        if policy.denylist:
            self._checkVisible(policy, path, follow)

    def _checkVisible(self, policy: Policy, path: bytes, follow: bool) -> None:
        """
        Refuse C{path} if the denylist hides it by the name given or by
        where it truly is (through any symlink of its folders, or of
        itself with C{follow}).
        """
        given = normalize(path)
        if self._denies(policy, given, namesAFolder(path)):
            raise _hidden()
        try:
            where = self._fs.located(path, follow)
        except FileNotFoundError:
            return  # its folder is missing: the call fails on its own
        if where != given and self._denies(policy, where, False):
            raise _hidden()

    def _denies(self, policy: Policy, parts: Parts, isFolder: bool) -> bool:
        if policy.denies(parts, isFolder):
            return True
        if not isFolder and parts and policy.denies(parts, True):
            # A pattern only for folders ("build/"): hides it if it is one.
            try:
                return stat.S_ISDIR(self._fs.lstat(virtualPath(parts)).st_mode)
            except OSError:
                return False
        return False

    def _refuseUncovering(self, policy: Policy, path: bytes, new: bytes) -> None:
        """
        Refuse to move the folder C{path} to C{new} if something under it
        that is hidden would not be once moved: it would leave its pattern
        (C{config/secrets/} once C{config} is C{cfg}).  Reads at most
        L{MAX_UNCOVER_CHECK} entries.

        @raise PermissionError: something under it would be uncovered, or
            it holds too much to tell.
        """
        old = self._fs.located(path, follow=False)
        moved = self._fs.located(new, follow=False)
        top = self._fs.openDirectory(path)
        stack = [(top, old, os.scandir(top))]
        left = MAX_UNCOVER_CHECK
        try:
            while stack:
                fd, where, entries = stack[-1]
                entry = next(entries, None)
                if entry is None:
                    entries.close()
                    os.close(fd)
                    stack.pop()
                    continue
                left -= 1
                if left < 0:
                    raise PermissionError(
                        errno.EACCES, "too many entries to check against the denylist"
                    )
                isFolder = entry.is_dir(follow_symlinks=False)
                parts = where + (os.fsencode(entry.name),)
                if policy.denies(parts, isFolder) and not policy.denies(
                    moved + parts[len(old):], isFolder
                ):
                    raise PermissionError(
                        errno.EACCES, "the folder holds entries the denylist hides"
                    )
                if isFolder:
                    if len(stack) >= _MAX_UNCOVER_DEPTH:
                        raise PermissionError(
                            errno.EACCES, "too many entries to check against the denylist"
                        )
                    try:
                        child = os.open(
                            entry.name,
                            os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd,
                        )
                    except OSError:
                        continue
                    try:
                        stack.append((child, parts, os.scandir(child)))
                    except BaseException:
                        os.close(child)
                        raise
        finally:
            for fd, _, entries in stack:
                entries.close()
                os.close(fd)

    def _checkOpened(self, policy: Policy, fd: int) -> None:
        # Where an opened file or folder truly is, whatever led to it.
        if policy.denylist:
            try:
                where = self._fs.partsOf(fd)
            except OSError:
                return
            if policy.denies(where, stat.S_ISDIR(os.fstat(fd).st_mode)):
                raise _hidden()

    def visible(self, folder: Parts, name: bytes, st: os.stat_result) -> bool:
        """
        Whether the entry C{name} of the folder at C{folder} is listed.
        """
        policy = self._state.policy
        return not policy.denylist or not policy.denies(
            folder + (name,), stat.S_ISDIR(st.st_mode)
        )

    # -- the quota ----------------------------------------------------------

    def _charge(self, delta: int) -> None:
        """
        Count C{delta} bytes more (or fewer) against the quota.

        @raise QuotaExceeded: the volume would pass its quota; nothing is
            counted.
        """
        if delta:
            self._state.quota.charge(self._state.policy.quota_bytes, delta)

    def _mayWrite(self) -> None:
        """
        The check of each write into a file already open for writing (a
        WRITE, a copy step): the policy may have changed since the open.

        @raise ReadOnly: the volume became read-only.
        """
        if self._state.policy.read_only:
            raise ReadOnly()

    def _freeEntry(self, st: os.stat_result) -> None:
        # What removing an entry gives back: its blocks, once its last name goes.
        if stat.S_ISDIR(st.st_mode) or st.st_nlink <= 1:
            self._state.quota.free(st.st_blocks * 512)

    def _chargeGrowth(self, before: os.stat_result, size: int) -> None:
        # What making a file of before's size size bytes long is charged.
        grow = allocated(size) - allocated(before.st_size)
        if grow > 0:
            self._charge(grow)

    def _freeShrink(self, before: os.stat_result, after: os.stat_result) -> None:
        # What a truncation gives back: the blocks it released, as du
        # counts them (a sparse file's size was never all on disk).
        self._state.quota.free((before.st_blocks - after.st_blocks) * 512)

    def _truncate(self, fd: int, size: int) -> None:
        """
        Truncate the file open as C{fd} to C{size}, charging its growth
        first.

        @raise QuotaExceeded: nothing was changed.
        """
        if not self._quotaOn:
            os.ftruncate(fd, size)
            return
        before = os.fstat(fd)
        self._chargeGrowth(before, size)
        os.ftruncate(fd, size)
        self._freeShrink(before, os.fstat(fd))

    def _naming(self, path: bytes, make: Callable[[], _T]) -> _T:
        """
        C{make()}, which adds the name C{path} to its folder.  With a quota,
        what the folder's own blocks grow by is counted (du counts them:
        thousands of long names fill blocks), and no name is added once
        less than a block is left.

        @raise QuotaExceeded: nothing was made.
        """
        if not self._quotaOn:
            return make()
        if self._state.quota.room(self._state.policy.quota_bytes) < BLOCK:
            raise QuotaExceeded()
        folder = virtualPath(normalize(path)[:-1])
        try:
            before = self._fs.stat(folder).st_blocks
        except OSError:
            return make()  # the call fails on its own
        result = make()
        try:
            grown = (self._fs.stat(folder).st_blocks - before) * 512
        except OSError:
            grown = 0
        if grown > 0:
            # Made already: counted even past the quota, which then
            # refuses what comes next.
            self._state.quota.charge(0, grown)
        return result

    def _exists(self, path: bytes) -> bool:
        try:
            self._fs.lstat(path)
        except OSError:
            return False
        return True

    @property
    def _quotaOn(self) -> bool:
        return self._state.policy.quota_bytes > 0

    # -- queries ------------------------------------------------------------

    def realpath(self, path: bytes) -> bytes:
        resolved = self._fs.realpath(path)
        self._mayQuery(resolved)
        return resolved

    def stat(self, path: bytes) -> os.stat_result:
        self._mayQuery(path)
        return self._fs.stat(path)

    def lstat(self, path: bytes) -> os.stat_result:
        self._mayQuery(path, follow=False)
        return self._fs.lstat(path)

    def readlink(self, path: bytes) -> bytes:
        self._mayQuery(path, follow=False)
        return self._fs.readlink(path)

    def statvfs(self, path: bytes):
        self._mayQuery(path)
        return self._figures(self._fs.statvfs(path))

    def _figures(self, st):
        """
        C{st} as this login sees it: read-only if the volume is, and with a
        quota, the quota as the size and what is left of it as free.
        """
        policy = self._state.policy
        changes = {}
        if policy.read_only:
            changes["f_flag"] = st.f_flag | os.ST_RDONLY
        if policy.quota_bytes:
            unit = st.f_frsize or st.f_bsize or 4096
            free = min(self._state.quota.room(policy.quota_bytes) // unit, st.f_bavail)
            changes.update(
                f_blocks=policy.quota_bytes // unit,
                f_bfree=free,
                f_bavail=free,
            )
        return _StatVFS(st, **changes) if changes else st

    def openDirectory(self, path: bytes) -> "Directory":
        self._mayQuery(path)
        fd = self._fs.openDirectory(path)
        try:
            self._checkOpened(self._state.policy, fd)
            where = self._fs.partsOf(fd) if self._state.policy.denylist else None
        except BaseException:
            os.close(fd)
            raise
        return Directory(self, fd, path, where)

    def names(self, path: bytes) -> List[bytes]:
        """
        The names listed in the folder C{path}, sorted, without "." and "..".
        """
        directory = self.openDirectory(path)
        try:
            names = []
            while True:
                batch = directory.read(1000)
                if not batch:
                    return sorted(name for name, _ in names if name not in (b".", b".."))
                names.extend(batch)
        finally:
            directory.close()

    # -- changes ------------------------------------------------------------

    def openFile(self, path: bytes, flags: int, mode: Optional[int] = None) -> "OpenFile":
        """
        Open the regular file C{path} with C{os.open} flags (see
        L{ConfinedFilesystem.openFile}).  A file opened for writing is
        write-locked (an OFD lock, which the container's own POSIX and OFD
        locks see) before anything in it changes.

        @raise FileLocked: another writer holds it.
        """
        if flags & os.O_TRUNC and not flags & (os.O_WRONLY | os.O_RDWR):
            # Linux truncates on O_RDONLY | O_TRUNC too: a write like any
            # other, so it takes the lock first (which needs write access).
            flags = (flags & ~os.O_ACCMODE) | os.O_RDWR
        writing = flags & (os.O_WRONLY | os.O_RDWR)
        if flags & _WRITING:
            self.mayChange(path)
            self._mayQuery(path)  # where it leads, too
        else:
            self._mayQuery(path)
        truncate = flags & os.O_TRUNC
        def opening() -> Tuple[int, bool]:
            return self._fs.openOrCreate(path, flags & ~os.O_TRUNC if writing else flags, mode)

        if flags & os.O_CREAT and self._quotaOn and not self._exists(path):
            fd, created = self._naming(path, opening)
        else:
            fd, created = opening()
        try:
            policy = self._state.policy
            self._checkOpened(policy, fd)
            if writing:
                identity = self._lock(fd)
                if truncate and not created:
                    # A file this open created is empty already.  Truncating
                    # it anyway would cost a flush at its close: ext4 (its
                    # auto_da_alloc) writes out at close any file truncated
                    # to 0 since it was opened, as for a rewrite in place.
                    self._truncate(fd, 0)
        except BaseException:
            os.close(fd)
            raise
        opened = self.fileClass(self, fd, path, bool(flags & os.O_APPEND))
        if writing:
            opened._identity = identity
            self._state.writers[identity] = opened
        return opened

    def _lock(self, fd: int) -> tuple:
        """
        Take the write lock of the file open as C{fd}; return its identity.

        A writer of this service in another session of the same login from
        the same address, silent for L{STALE_WRITER} seconds, is a session
        the client has left (its connection dropped without a word, and it
        is resuming the upload): that session is ended and its lock taken.

        @raise FileLocked: another writer holds it.
        """
        st = os.fstat(fd)
        identity = (st.st_dev, st.st_ino)
        for attempt in (0, 1):
            try:
                fcntl.fcntl(fd, _F_OFD_SETLK, _WRITE_LOCK)
                return identity
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            holder = self._state.writers.get(identity)
            if attempt or holder is None or not self._owner.supersedes(holder._volume._owner):
                raise FileLocked()
            holder._volume._owner.endStale(holder.path)
            holder.close()
        raise FileLocked()

    def mkdir(self, path: bytes, mode: Optional[int] = None) -> None:
        self.mayChange(path)
        quota = self._quotaOn
        if quota:
            self._charge(allocated(1))
        try:
            self._naming(path, lambda: self._fs.mkdir(path, mode))
        except BaseException:
            if quota:
                self._state.quota.free(allocated(1))
            raise

    def rmdir(self, path: bytes) -> None:
        self.mayChange(path)
        st = self._fs.lstat(path) if self._quotaOn else None
        self._fs.rmdir(path)
        if st is not None:
            self._freeEntry(st)

    def remove(self, path: bytes) -> None:
        self.mayChange(path)
        st = self._fs.lstat(path) if self._quotaOn else None
        self._fs.remove(path)
        if st is not None:
            self._freeEntry(st)

    def rename(self, old: bytes, new: bytes, replace: bool = False) -> None:
        self.mayChange(old, new)
        policy = self._state.policy
        if policy.denylistNested and stat.S_ISDIR(self._fs.lstat(old).st_mode):
            self._refuseUncovering(policy, old, new)
        replaced = None
        if replace and self._quotaOn:
            try:
                replaced = self._fs.lstat(new)
            except OSError:
                pass
        self._naming(new, lambda: self._fs.rename(old, new, replace))
        if replaced is not None and not stat.S_ISDIR(replaced.st_mode):
            self._freeEntry(replaced)

    def hardlink(self, old: bytes, new: bytes) -> None:
        # Another name of the same blocks: du counts them once.
        self.mayChange(old, new)
        self._naming(new, lambda: self._fs.hardlink(old, new))

    def symlink(self, target: bytes, linkpath: bytes) -> None:
        self.mayChange(linkpath)
        if not self._quotaOn:
            self._fs.symlink(target, linkpath)
            return
        # A long target takes a block of its own: charged as if it did,
        # then what it really took is kept.
        charged = allocated(len(target))
        self._charge(charged)
        try:
            self._naming(linkpath, lambda: self._fs.symlink(target, linkpath))
            taken = self._fs.lstat(linkpath).st_blocks * 512
        except BaseException:
            self._state.quota.free(charged)
            raise
        self._state.quota.free(charged - taken)

    def setattrs(
        self,
        path: bytes,
        size: Optional[int] = None,
        mode: Optional[int] = None,
        times: Times = None,
    ) -> None:
        self.mayChange(path)
        self._mayQuery(path)
        if size is None or not self._quotaOn:
            self._fs.setattrs(path, size, mode, times)
            return
        before = self._fs.stat(path)
        self._chargeGrowth(before, size)
        self._fs.setattrs(path, size, mode, times)
        self._freeShrink(before, self._fs.stat(path))

    def lsetattrs(self, path: bytes, mode: Optional[int] = None, times: Times = None) -> None:
        self.mayChange(path)
        self._fs.lsetattrs(path, mode, times)

    def copy(
        self,
        source: "OpenFile",
        readOffset: int,
        length: int,
        target: "OpenFile",
        writeOffset: int,
    ) -> "Copy":
        """
        A copy of C{length} bytes (0: to the end) of C{source} into
        C{target}, done in bounded steps (L{Copy.steps}), each charged to
        the quota before it runs.

        @raise OSError: L{SameFile} when both are the same file.
        """
        self.mayChange(target.path)
        sourceStat, targetStat = source.stat(), target.stat()
        if (sourceStat.st_dev, sourceStat.st_ino) == (targetStat.st_dev, targetStat.st_ino):
            raise SameFile()
        # The copy owns duplicates of both descriptors: a close meanwhile
        # cannot make it write into whatever file reuses the number.
        return Copy(
            os.dup(source._fd), readOffset, length, os.dup(target._fd), writeOffset,
            self._chargeCopyStep,
        )

    def _chargeCopyStep(self, delta: int) -> None:
        # Each step of a copy is a write: the policy of now applies to it.
        self._mayWrite()
        if self._quotaOn:
            self._charge(delta)


class SameFile(OSError):
    """A copy whose source and destination are the same file."""

    def __init__(self) -> None:
        super().__init__("Source and destination are the same file")


class OpenFile:
    """
    A regular file of the volume, open for one session.

    @ivar path: the virtual path it was opened by.
    @ivar moved: the bytes read and written through it so far (the audit's
        count: kept here, where an addition costs less than a wrapper's call).
    """

    __slots__ = ("_volume", "_fd", "path", "_appending", "_identity", "moved")

    def __init__(self, volume: Volume, fd: int, path: bytes, appending: bool = False) -> None:
        self._volume = volume
        self._fd = fd
        self.path = path
        self._appending = appending
        self._identity = None
        self.moved = 0

    def read(self, length: int, offset: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        self.moved += len(data)
        return data

    def write(self, data, offset: int) -> None:
        """
        Write all of C{data} (bytes or a memoryview) at C{offset}; with a
        quota, only if the file's growth fits in it.
        """
        fd = self._fd
        volume = self._volume
        volume._mayWrite()
        if volume._state.policy.quota_bytes:
            self._reserve(offset, len(data))
        length = len(data)
        while data:
            written = os.pwrite(fd, data, offset)
            data = data[written:]
            offset += written
        self.moved += length

    def _reserve(self, offset: int, length: int) -> None:
        # Charge the growth a write of length bytes at offset would give.
        size = os.fstat(self._fd).st_size
        end = size + length if self._appending else offset + length
        if end > size:
            self._volume._charge(allocated(end) - allocated(size))

    def truncate(self, size: int) -> None:
        volume = self._volume
        volume._mayWrite()
        volume._truncate(self._fd, size)

    def setattrs(
        self, size: Optional[int] = None, mode: Optional[int] = None, times: Times = None
    ) -> None:
        self._volume.mayChange(self.path)
        if size is not None:
            self.truncate(size)
        ConfinedFilesystem.fsetattrs(self._fd, None, mode, times)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def stat(self) -> os.stat_result:
        return os.fstat(self._fd)

    def statvfs(self):
        return self._volume._figures(os.fstatvfs(self._fd))

    def close(self) -> None:
        """
        Close the file (and let its write lock go); closing it again, or
        any other call after, fails as on a closed descriptor.
        """
        fd, self._fd = self._fd, -1
        if fd < 0:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        writers = self._volume._state.writers
        if self._identity is not None and writers.get(self._identity) is self:
            del writers[self._identity]
        os.close(fd)


Volume.fileClass = OpenFile


class Directory:
    """
    A folder of the volume, open for listing; what the denylist hides is
    not listed.

    @ivar path: the virtual path it was opened by.
    """

    __slots__ = ("_volume", "_fd", "path", "_where", "_entries", "_dots", "_held")

    def __init__(
        self, volume: Volume, fd: int, path: bytes, where: Optional[Parts] = None
    ) -> None:
        self._volume = volume
        self._fd = fd
        self.path = path
        self._where = where
        self._entries: Optional[Iterator[os.DirEntry]] = None
        self._dots = True
        self._held: List[Tuple[bytes, os.stat_result]] = []

    def unread(self, entries: List[Tuple[bytes, os.stat_result]]) -> None:
        """
        Give back entries read but not sent: the next read starts with them.
        """
        self._held = entries + self._held

    def read(self, limit: int) -> List[Tuple[bytes, os.stat_result]]:
        """
        The next entries with their lstat, at most C{limit}; empty at the end.

        "." and ".." come first, as from OpenSSH's server; ".." of the root is
        the root itself.
        """
        batch, self._held = self._held[:limit], self._held[limit:]
        if len(batch) >= limit:
            return batch
        if self._dots:
            self._dots = False
            batch.append((b".", os.fstat(self._fd)))
            parent = virtualPath(normalize(self.path)[:-1])
            try:
                batch.append((b"..", self._volume._fs.stat(parent)))
            except OSError:
                pass
            self._entries = os.scandir(self._fd)
        assert self._entries is not None
        volume = self._volume
        where = self._place()
        for entry in self._entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed since it was listed
            name = entry.name.encode(_FS_ENCODING, _FS_ERRORS)
            if not volume.visible(where, name, st):
                continue
            batch.append((name, st))
            if len(batch) >= limit:
                break
        return batch

    def _place(self) -> Parts:
        # Where the folder is, which the denylist compares: learnt once a
        # denylist needs it, even one set after the folder was opened.
        if self._where is None:
            if not self._volume.policy.denylist:
                return ()
            try:
                self._where = self._volume._fs.partsOf(self._fd)
            except OSError:
                self._where = normalize(self.path)
        return self._where

    def setattrs(
        self, size: Optional[int] = None, mode: Optional[int] = None, times: Times = None
    ) -> None:
        self._volume.mayChange(self.path)
        ConfinedFilesystem.fsetattrs(self._fd, size, mode, times)

    def stat(self) -> os.stat_result:
        return os.fstat(self._fd)

    def statvfs(self):
        return self._volume._figures(os.fstatvfs(self._fd))

    def close(self) -> None:
        if self._entries is not None:
            self._entries.close()
        os.close(self._fd)


class Copy:
    """
    One copy between two open files: bytes moved in bounded steps, in the
    kernel (copy_file_range) where it can, else by pread and write.
    C{charge}, if given, is called before each step with what the step may
    add to the target's allocated size (0 for none), and stops the copy by
    raising.

    @ivar shortRead: the source ended before C{length} bytes were copied.
    """

    def __init__(
        self,
        source: int,
        readOffset: int,
        length: int,
        target: int,
        writeOffset: int,
        charge: Optional[Callable[[int], None]] = None,
    ) -> None:
        self._charge = charge
        self.source = source
        self.readOffset = readOffset
        self.remaining: Optional[int] = length or None  # 0 means "to the end"
        self.target = target
        self.writeOffset = writeOffset
        self.shortRead = False

    def steps(self) -> Iterator[None]:
        appending = bool(fcntl.fcntl(self.target, fcntl.F_GETFL) & os.O_APPEND)
        # copy_file_range cannot append, nor cross some filesystems.
        inKernel = not appending
        while self.remaining is None or self.remaining > 0:
            want = COPY_CHUNK if self.remaining is None else min(COPY_CHUNK, self.remaining)
            if self._charge is not None:
                want = self._reserve(want, appending)
            if not want:
                moved = 0
            elif inKernel:
                try:
                    moved = os.copy_file_range(
                        self.source, self.target, want, self.readOffset, self.writeOffset
                    )
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    inKernel = False
                    continue
            else:
                data = os.pread(self.source, min(want, _COPY_FALLBACK_CHUNK), self.readOffset)
                moved = len(data)
                self._writeAll(data, appending)
            if not moved:
                self.shortRead = self.remaining is not None
                return
            self.readOffset += moved
            self.writeOffset += moved
            if self.remaining is not None:
                self.remaining -= moved
            yield None

    def _reserve(self, want: int, appending: bool) -> int:
        # At most what the source still holds, charged before it is moved.
        want = max(0, min(want, os.fstat(self.source).st_size - self.readOffset))
        size = os.fstat(self.target).st_size
        end = size + want if appending else self.writeOffset + want
        self._charge(max(0, allocated(end) - allocated(size)))
        return want

    def _writeAll(self, data: bytes, appending: bool) -> None:
        view = memoryview(data)
        while view:
            if appending:
                written = os.write(self.target, view)
            else:
                written = os.pwrite(self.target, view, self.writeOffset + len(data) - len(view))
            view = view[written:]

    def close(self) -> None:
        for fd in (self.source, self.target):
            try:
                os.close(fd)
            except OSError:
                pass
