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
import sys
from typing import Iterator, List, Optional, Tuple

from .fs import ConfinedFilesystem, normalize, virtualPath

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()

_WRITING = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
"""Open flags that change the volume (a new file, a truncation, writes)."""

COPY_CHUNK = 8 * 1024 * 1024
"""Bytes one copy step moves in the kernel before other work gets a turn."""
_COPY_FALLBACK_CHUNK = 256 * 1024

Times = Optional[Tuple[int, int]]


class Volume:
    """
    One login's view of its container's volume, and the one gate for what
    that login may do to it.

    @ivar containerId: whose volume this is.
    """

    def __init__(self, filesystem: ConfinedFilesystem, containerId: str = "") -> None:
        self._fs = filesystem
        self.containerId = containerId

    @classmethod
    def open(
        cls, root: str, containerId: str = "", useOpenat2: Optional[bool] = None
    ) -> "Volume":
        """
        The volume directory at C{root}, held by a descriptor from now on.

        @raise OSError: it is missing or not a directory.
        """
        return cls(ConfinedFilesystem(root, useOpenat2), containerId)

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

    def close(self) -> None:
        self._fs.close()

    # -- the gate -----------------------------------------------------------

    def mayChange(self, *paths: bytes) -> None:
        """
        The one check every change to the volume passes, by any protocol,
        before anything is touched: raises C{OSError} (mapped to each
        protocol's error) when the login may not change C{paths}.  Today
        every login may change everything its volume holds.
        """

    # -- queries ------------------------------------------------------------

    def realpath(self, path: bytes) -> bytes:
        return self._fs.realpath(path)

    def stat(self, path: bytes) -> os.stat_result:
        return self._fs.stat(path)

    def lstat(self, path: bytes) -> os.stat_result:
        return self._fs.lstat(path)

    def readlink(self, path: bytes) -> bytes:
        return self._fs.readlink(path)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        return self._fs.statvfs(path)

    def openDirectory(self, path: bytes) -> "Directory":
        return Directory(self, self._fs.openDirectory(path), path)

    def names(self, path: bytes) -> List[bytes]:
        """
        The names in the folder C{path}, sorted, without "." and "..".
        """
        fd = self._fs.openDirectory(path)
        try:
            return sorted(os.fsencode(name) for name in os.listdir(fd))
        finally:
            os.close(fd)

    # -- changes ------------------------------------------------------------

    def openFile(self, path: bytes, flags: int, mode: Optional[int] = None) -> "OpenFile":
        """
        Open the regular file C{path} with C{os.open} flags (see
        L{ConfinedFilesystem.openFile}).
        """
        if flags & _WRITING:
            self.mayChange(path)
        return OpenFile(self, self._fs.openFile(path, flags, mode), path)

    def mkdir(self, path: bytes, mode: Optional[int] = None) -> None:
        self.mayChange(path)
        self._fs.mkdir(path, mode)

    def rmdir(self, path: bytes) -> None:
        self.mayChange(path)
        self._fs.rmdir(path)

    def remove(self, path: bytes) -> None:
        self.mayChange(path)
        self._fs.remove(path)

    def rename(self, old: bytes, new: bytes, replace: bool = False) -> None:
        self.mayChange(old, new)
        self._fs.rename(old, new, replace)

    def hardlink(self, old: bytes, new: bytes) -> None:
        self.mayChange(old, new)
        self._fs.hardlink(old, new)

    def symlink(self, target: bytes, linkpath: bytes) -> None:
        self.mayChange(linkpath)
        self._fs.symlink(target, linkpath)

    def setattrs(
        self,
        path: bytes,
        size: Optional[int] = None,
        mode: Optional[int] = None,
        times: Times = None,
    ) -> None:
        self.mayChange(path)
        self._fs.setattrs(path, size, mode, times)

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
        C{target}, done in bounded steps (L{Copy.steps}).

        @raise OSError: C{EINVAL} when both are the same file.
        """
        self.mayChange(target.path)
        sourceStat, targetStat = source.stat(), target.stat()
        if (sourceStat.st_dev, sourceStat.st_ino) == (targetStat.st_dev, targetStat.st_ino):
            raise SameFile()
        # The copy owns duplicates of both descriptors: a close meanwhile
        # cannot make it write into whatever file reuses the number.
        return Copy(os.dup(source._fd), readOffset, length, os.dup(target._fd), writeOffset)


class SameFile(OSError):
    """A copy whose source and destination are the same file."""

    def __init__(self) -> None:
        super().__init__("Source and destination are the same file")


class OpenFile:
    """
    A regular file of the volume, open for one session.

    @ivar path: the virtual path it was opened by.
    """

    __slots__ = ("_volume", "_fd", "path")

    def __init__(self, volume: Volume, fd: int, path: bytes) -> None:
        self._volume = volume
        self._fd = fd
        self.path = path

    def read(self, length: int, offset: int) -> bytes:
        return os.pread(self._fd, length, offset)

    def write(self, data, offset: int) -> None:
        """
        Write all of C{data} (bytes or a memoryview) at C{offset}.
        """
        fd = self._fd
        while data:
            written = os.pwrite(fd, data, offset)
            data = data[written:]
            offset += written

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)

    def setattrs(
        self, size: Optional[int] = None, mode: Optional[int] = None, times: Times = None
    ) -> None:
        self._volume.mayChange(self.path)
        ConfinedFilesystem.fsetattrs(self._fd, size, mode, times)

    def fsync(self) -> None:
        os.fsync(self._fd)

    def stat(self) -> os.stat_result:
        return os.fstat(self._fd)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class Directory:
    """
    A folder of the volume, open for listing.

    @ivar path: the virtual path it was opened by.
    """

    __slots__ = ("_volume", "_fd", "path", "_entries", "_dots", "_held")

    def __init__(self, volume: Volume, fd: int, path: bytes) -> None:
        self._volume = volume
        self._fd = fd
        self.path = path
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
                batch.append((b"..", self._volume.stat(parent)))
            except OSError:
                pass
            self._entries = os.scandir(self._fd)
        assert self._entries is not None
        for entry in self._entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed since it was listed
            batch.append((entry.name.encode(_FS_ENCODING, _FS_ERRORS), st))
            if len(batch) >= limit:
                break
        return batch

    def setattrs(
        self, size: Optional[int] = None, mode: Optional[int] = None, times: Times = None
    ) -> None:
        self._volume.mayChange(self.path)
        ConfinedFilesystem.fsetattrs(self._fd, size, mode, times)

    def stat(self) -> os.stat_result:
        return os.fstat(self._fd)

    def statvfs(self) -> os.statvfs_result:
        return os.fstatvfs(self._fd)

    def close(self) -> None:
        if self._entries is not None:
            self._entries.close()
        os.close(self._fd)


class Copy:
    """
    One copy between two open files: bytes moved in bounded steps, in the
    kernel (copy_file_range) where it can, else by pread and write.

    @ivar shortRead: the source ended before C{length} bytes were copied.
    """

    def __init__(
        self, source: int, readOffset: int, length: int, target: int, writeOffset: int
    ) -> None:
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
            if inKernel:
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
