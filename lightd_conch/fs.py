"""
The confined filesystem: a container's volume as the only tree a session can reach.

Client paths are normalised once, lexically, into a tuple of components beneath
the volume root (``..`` at the root stays at the root).  From then on the kernel
enforces the root: every operation starts from a directory fd held for the
volume and resolves with
``openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)``,
or, where openat2 is missing, with a component-by-component ``openat`` walk
using ``O_NOFOLLOW`` that gives symlinks the same chroot semantics.  Operations
on a name (unlink, rename, mkdir, lstat, ...) resolve its parent that way and
then act on ``(parent_fd, name)`` without following the name.  No host path is
ever built from client input.

Everything here raises L{OSError}; the SFTP layer maps errno to status codes.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
from typing import Optional, Tuple

Parts = Tuple[bytes, ...]

_O_PATH = getattr(os, "O_PATH", 0o10000000)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_SYS_openat2 = 437  # the same number on every architecture Linux added it to
_RENAME_NOREPLACE = 1
_AT_EMPTY_PATH = 0x1000
_MAX_SYMLINKS = 40  # the kernel's own limit (MAXSYMLINKS)
_PERMISSION_BITS = 0o777
# What a client creates gets the mode it asks for under a umask of 022, as from
# OpenSSH's server with its default umask: `mkdir` in OpenSSH's sftp and
# paramiko ask for 0777 and expect 0755.  SETSTAT sets exact bits.
_CREATION_MASK = 0o755

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


def _raiseErrno() -> None:
    code = ctypes.get_errno()
    raise OSError(code, os.strerror(code))


_syscall4 = ctypes.CDLL(None, use_errno=True).syscall
"""syscall(2) for openat2 alone, its arguments' types declared once."""
_syscall4.restype = ctypes.c_long
_syscall4.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_HOW_SIZE = ctypes.sizeof(_OpenHow)
_hows: dict = {}
"""(flags, mode) -> (struct open_how, its address), read-only once made: as many as the
flag sets this module opens with times the modes a client may ask for (under 0o7777)."""


def _openat2(dirfd: int, path: bytes, flags: int, mode: int = 0) -> int:
    key = (flags, mode)
    made = _hows.get(key)
    if made is None:
        how = _OpenHow(
            flags | os.O_CLOEXEC,
            mode,
            _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS | _RESOLVE_NO_XDEV,
        )
        made = _hows[key] = (how, ctypes.addressof(how))
    address = made[1]
    while True:
        fd = _syscall4(_SYS_openat2, dirfd, path, address, _HOW_SIZE)
        if fd >= 0:
            return fd
        # EAGAIN: a concurrent rename made the kernel's ".." check unsure; retry.
        if ctypes.get_errno() != errno.EAGAIN:
            _raiseErrno()


def _fchownEmpty(fd: int, uid: int, gid: int) -> None:
    """Change the owner of what C{fd} (O_PATH too) is, a symlink included."""
    if _libc.fchownat(
        ctypes.c_int(fd), b"", ctypes.c_uint(uid), ctypes.c_uint(gid), ctypes.c_int(_AT_EMPTY_PATH)
    ) != 0:
        _raiseErrno()


def _renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes) -> None:
    if (
        _libc.renameat2(
            ctypes.c_int(olddirfd),
            ctypes.c_char_p(old),
            ctypes.c_int(newdirfd),
            ctypes.c_char_p(new),
            ctypes.c_uint(_RENAME_NOREPLACE),
        )
        != 0
    ):
        _raiseErrno()


@functools.lru_cache(maxsize=None)
def openat2Available() -> bool:
    """
    Whether this kernel (and any seccomp filter around us) allows openat2.
    """
    root = os.open("/", _O_PATH | os.O_CLOEXEC)
    try:
        os.close(_openat2(root, b".", _O_PATH))
    except OSError:
        return False
    finally:
        os.close(root)
    return True


def normalize(path: bytes) -> Parts:
    """
    Turn a client path into components beneath the root, lexically.

    Relative paths are relative to the root (the session's home).  A NUL byte
    cannot name any file.
    """
    if b"\0" in path:
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part == b"" or part == b".":
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return tuple(parts)


def expandHome(path: bytes) -> bytes:
    """
    C{path} with a leading C{~}, C{~/x} or C{~user/x} made absolute: the
    volume is every user's home.
    """
    if path.startswith(b"~"):
        slash = path.find(b"/")
        return b"/" if slash < 0 else path[slash:]
    return path


def namesAFolder(path: bytes) -> bool:
    """
    Whether a client path below the root ends as only a folder's can:
    C{x/}, C{x/.} or C{x/..}.  Normalisation drops that ending, so the operations that act on
    files check it: C{put a.txt dir/} must not replace a file named C{dir}.
    """
    last = path.rsplit(b"/", 1)[-1] if b"/" in path else None
    # The root itself is refused by name elsewhere (EPERM).
    return last in (b"", b".", b"..") and bool(normalize(path))


def virtualPath(parts: Parts) -> bytes:
    """
    The path a client sees for C{parts}.
    """
    return b"/" + b"/".join(parts)


def _relative(parts: Parts) -> bytes:
    return b"/".join(parts) or b"."


def mountId(fd: int) -> int:
    """
    The id of the mount C{fd} is on (st_dev cannot tell: btrfs subvolumes
    differ in st_dev on one mount).
    """
    with open(f"/proc/self/fdinfo/{fd}", "rb") as info:
        for line in info:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "mount ids are not available")


def _umask() -> int:
    # Read, not set and reset: os.umask would change it for every thread.
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o777  # unknown: always set modes explicitly


def _procPath(fd: int) -> str:
    # Re-opening or changing an inode through our own fd's /proc entry acts on
    # exactly the inode the fd pins, so no path can be swapped in between.
    return f"/proc/self/fd/{fd}"


class _Closing:
    """
    What a C{with} block gets (C{given}, by default the descriptor), the
    descriptor closed when the block ends: as a generator context manager
    would, for a third of its cost, on every request.
    """

    __slots__ = ("fd", "given")

    def __init__(self, fd: int, given=None) -> None:
        self.fd = fd
        self.given = fd if given is None else given

    def __enter__(self):
        return self.given

    def __exit__(self, *exc_info) -> None:
        os.close(self.fd)


class ConfinedFilesystem:
    """
    The volume of one container, as seen by one session.

    @ivar rootFD: an C{O_PATH} fd on the volume directory, held for the
        session's lifetime, from which every resolution starts.
    """

    def __init__(self, root: str, useOpenat2: Optional[bool] = None) -> None:
        self.rootFD = os.open(root, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        # The volume's host path, only to tell where a link's folder is.
        self._rootPath = os.readlink(_procPath(self.rootFD).encode())
        if useOpenat2 is None:
            useOpenat2 = openat2Available()
        self._resolve = self._resolveOpenat2 if useOpenat2 else self._resolveWalk
        self._useOpenat2 = useOpenat2
        st = os.fstat(self.rootFD)
        # When the service runs as root, what a client creates belongs to the
        # volume's owner, as if the container had created it.  None: nothing
        # to change, creation already gives the right owner.
        owner = (st.st_uid, st.st_gid)
        self._owner: Optional[Tuple[int, int]] = (
            owner if os.geteuid() == 0 and owner != (os.geteuid(), os.getegid()) else None
        )
        self._umask = _umask()

    def _adopt(self, fd: int, mode: int, pathOnly: bool = False) -> None:
        """
        Give what was just created (as C{fd}; an C{O_PATH} one if
        C{pathOnly}) exactly C{mode} and the volume's owner, with no call
        where creation already got it right.
        """
        if mode & ~self._umask != mode:
            if pathOnly:
                os.chmod(_procPath(fd), mode)  # fchmod refuses an O_PATH fd
            else:
                os.fchmod(fd, mode)
        if self._owner is not None:
            if pathOnly:
                _fchownEmpty(fd, *self._owner)
            else:
                os.fchown(fd, *self._owner)

    def close(self) -> None:
        if self.rootFD >= 0:
            os.close(self.rootFD)
            self.rootFD = -1

    # -- resolution -------------------------------------------------------

    def _resolveOpenat2(self, parts: Parts, flags: int, mode: int = 0) -> int:
        return _openat2(self.rootFD, _relative(parts), flags, mode)

    def _resolveWalk(self, parts: Parts, flags: int, mode: int = 0) -> int:
        """
        Resolve like RESOLVE_IN_ROOT, one component at a time with O_NOFOLLOW.

        Symlinks met on the way are read and spliced into the remaining
        components; absolute targets restart at the root, and ".." never
        climbs above it.
        """
        stack = [os.dup(self.rootFD)]
        pending = list(parts)
        links = 0
        rootMount = mountId(self.rootFD)

        def sameMount(fd: int) -> int:
            # As RESOLVE_NO_XDEV: never cross into a mount inside the volume.
            if mountId(fd) != rootMount:
                os.close(fd)
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            return fd

        try:
            while pending:
                name = pending.pop(0)
                if name in (b"", b"."):
                    continue
                if name == b"..":
                    if len(stack) > 1:
                        os.close(stack.pop())
                    continue
                last = not pending
                if last:
                    try:
                        fd = os.open(
                            name,
                            flags | os.O_NOFOLLOW | os.O_CLOEXEC,
                            mode,
                            dir_fd=stack[-1],
                        )
                    except OSError as e:
                        if e.errno not in (errno.ELOOP, errno.EEXIST, errno.ENOTDIR):
                            raise
                        if not self._isLink(stack[-1], name):
                            raise
                        if flags & os.O_EXCL:
                            raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
                    else:
                        # O_PATH | O_NOFOLLOW opens a symlink itself: follow it.
                        if not stat.S_ISLNK(os.fstat(fd).st_mode):
                            return sameMount(fd)
                        os.close(fd)
                else:
                    fd = os.open(
                        name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1]
                    )
                    if stat.S_ISDIR(os.fstat(fd).st_mode):
                        stack.append(sameMount(fd))
                        continue
                    os.close(fd)
                    if not self._isLink(stack[-1], name):
                        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                links += 1
                if links > _MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
                target = os.readlink(name, dir_fd=stack[-1])
                if target.startswith(b"/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending[:0] = target.split(b"/")
            # Nothing left to open: the walk ended on a directory (or the root).
            return os.open(".", flags | os.O_CLOEXEC, mode, dir_fd=stack[-1])
        finally:
            for fd in stack:
                os.close(fd)

    def _openEntry(self, dirfd: int, name: bytes) -> int:
        """
        An C{O_PATH} fd on the entry C{name} of C{dirfd} itself (a symlink
        is not followed), refused with C{EXDEV} when a mount sits there: what
        is mounted inside the volume is never entered, by name either.
        """
        if self._useOpenat2:
            return _openat2(dirfd, name, _O_PATH | os.O_NOFOLLOW)
        fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        if mountId(fd) != mountId(dirfd):
            os.close(fd)
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return fd

    @staticmethod
    def _isLink(dirfd: int, name: bytes) -> bool:
        try:
            return stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _opened(self, parts: Parts, flags: int, mode: int = 0) -> "_Closing":
        """
        The descriptor C{parts} resolves to, for a C{with} block that
        closes it.
        """
        return _Closing(self._resolve(parts, flags, mode))

    def _parent(self, path: bytes) -> "_Closing":
        """
        Resolve the directory holding the last component of C{path}.

        Gives C{(dirfd, name)} to a C{with} block, which closes C{dirfd};
        C{name} is never empty, "." or "..".  The root itself has no name in
        any directory, so acting on it by name is refused.
        """
        parts = normalize(path)
        if not parts:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        fd = self._resolve(parts[:-1], _O_PATH | os.O_DIRECTORY)
        return _Closing(fd, (fd, parts[-1]))

    # -- queries ----------------------------------------------------------

    def located(self, path: bytes, follow: bool = True, _links: int = 0) -> Parts:
        """
        Where C{path} leads, as components beneath the root: with C{follow},
        what it names after every symlink (a dangling one: where the link
        leads); otherwise, or if nothing is there, its folder's true place
        and its last name.  The names a policy compares, whatever alias
        (a link, a link to a folder) the client used.
        """
        parts = normalize(path)
        if not parts:
            return ()
        if follow:
            try:
                with self._opened(parts, _O_PATH) as fd:
                    return self._partsOf(fd)
            except FileNotFoundError:
                target = self._linkTarget(parts) if _links < _MAX_SYMLINKS else None
                if target is not None:
                    return self.located(virtualPath(target), True, _links + 1)
        with self._parent(path) as (dirfd, name):
            return self._partsOf(dirfd) + (name,)

    def partsOf(self, fd: int) -> Parts:
        """
        Where what C{fd} is open on is now, as components beneath the root.
        """
        return self._partsOf(fd)

    def realpath(self, path: bytes) -> bytes:
        return virtualPath(normalize(path))

    def _asFolder(self, path: bytes) -> int:
        """
        C{_O_PATH}, with C{O_DIRECTORY} when C{path} ends as a folder's:
        then anything else is ENOTDIR, as the kernel says of C{file/}.
        """
        return _O_PATH | os.O_DIRECTORY if namesAFolder(path) else _O_PATH

    def _refuseFolderEnding(self, path: bytes) -> None:
        """
        For an operation on a file: C{path} ending as a folder's names a
        folder (EISDIR), or nothing this operation can act on (ENOTDIR, or
        ENOENT when nothing is there).
        """
        if namesAFolder(path):
            with self._opened(normalize(path), _O_PATH | os.O_DIRECTORY):
                pass
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))

    def stat(self, path: bytes) -> os.stat_result:
        fd = self._resolve(normalize(path), self._asFolder(path))
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def lstat(self, path: bytes) -> os.stat_result:
        parts = normalize(path)
        if not parts:
            return os.fstat(self.rootFD)
        if namesAFolder(path):
            return self.stat(path)  # "link/" is the folder it leads to
        with self._parent(path) as (dirfd, name):
            return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def readlink(self, path: bytes) -> bytes:
        with self._parent(path) as (dirfd, name):
            return os.readlink(name, dir_fd=dirfd)

    # -- files and directories --------------------------------------------

    def openFile(self, path: bytes, flags: int, mode: Optional[int] = None) -> int:
        """
        Open a regular file with C{os.open} flags and return its fd (see
        L{openOrCreate}).
        """
        return self.openOrCreate(path, flags, mode)[0]

    def openOrCreate(
        self, path: bytes, flags: int, mode: Optional[int] = None, _links: int = 0
    ) -> Tuple[int, bool]:
        """
        Open a regular file with C{os.open} flags; return its fd and whether
        this call created it (then it is empty, and C{O_TRUNC} had nothing
        to do).

        Anything that is not a regular file (directory, FIFO, socket, device)
        is refused before it is opened for reading or writing, so a FIFO can
        never block the reactor and a device never sees an open.  A file this
        call creates gets C{mode} (default 0644) under L{_CREATION_MASK},
        whatever the process umask.
        """
        if namesAFolder(path):
            try:
                self._refuseFolderEnding(path)
            except FileNotFoundError:
                if flags & os.O_CREAT:
                    # "new/": a file cannot be made under a folder's name.
                    raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
                raise
        parts = normalize(path)
        access = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_TRUNC)
        access |= os.O_NONBLOCK | os.O_NOCTTY
        mode = 0o644 if mode is None else mode & _CREATION_MASK
        if flags & os.O_CREAT:
            # A new file first: O_EXCL makes a regular file or nothing, so it
            # needs no type check.
            try:
                fd = self._resolve(parts, access | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                if flags & os.O_EXCL:
                    raise
            else:
                return self._adoptOrClose(fd, mode), True
        try:
            probe = self._resolve(parts, _O_PATH)
        except FileNotFoundError:
            if not flags & os.O_CREAT:
                raise
            # It exists but leads nowhere (a dangling symlink), or it was
            # removed in between.  Create what the link names, beneath the
            # root, again exclusively: nothing that appears meanwhile (a
            # device node, a mount point) is opened before its type is known.
            if _links >= _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP))
            target = self._linkTarget(parts)
            return self.openOrCreate(
                virtualPath(parts if target is None else target), flags, mode, _links + 1
            )
        try:
            self._checkRegular(probe)
            fd = os.open(_procPath(probe), access | os.O_CLOEXEC)
        finally:
            os.close(probe)
        return fd, False

    def _linkTarget(self, parts: Parts) -> Optional[Parts]:
        """
        Where the symlink at C{parts} leads, as components beneath the root
        (chroot semantics: an absolute target starts at the root, a relative
        one at the link's folder); None if no link is there.

        The target's folder is resolved as the kernel resolves it (a ".."
        after a link climbs from where the link leads, and a missing name
        before ".." is ENOENT); only its last name is taken as written.
        """
        with self._parent(virtualPath(parts)) as (dirfd, name):
            try:
                target = os.readlink(name, dir_fd=dirfd)
            except OSError:
                return None
            head, _, last = target.rpartition(b"/")
            if last in (b"", b".", b".."):
                raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))  # names a folder
            start = () if target.startswith(b"/") else self._partsOf(dirfd)
        # Unnormalised: the resolver (openat2, or the walk) gives "." and ".."
        # their meaning, beneath the root.
        within = start + tuple(part for part in head.split(b"/") if part)
        with self._opened(within, _O_PATH | os.O_DIRECTORY) as fd:
            return self._partsOf(fd) + (last,)

    def _partsOf(self, fd: int) -> Parts:
        """
        The components beneath the root of the folder C{fd} is open on.
        """
        where = os.readlink(_procPath(fd).encode())
        if where == self._rootPath:
            return ()
        if where.startswith(self._rootPath + b"/"):
            return normalize(where[len(self._rootPath) :])
        raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))  # moved away meanwhile

    def _adoptOrClose(self, fd: int, mode: int) -> int:
        """
        C{fd}, a file just created (O_CREAT | O_EXCL), adopted (L{_adopt});
        closed if that fails.
        """
        try:
            self._adopt(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _checkRegular(fd: int) -> None:
        st_mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(st_mode):
            raise OSError(errno.EISDIR, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(st_mode):
            raise OSError(errno.EINVAL, "Not a regular file")

    def openDirectory(self, path: bytes) -> int:
        return self._resolve(
            normalize(path), os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK
        )

    def mkdir(self, path: bytes, mode: Optional[int] = None) -> None:
        mode = 0o755 if mode is None else mode & _CREATION_MASK
        with self._parent(path) as (dirfd, name):
            os.mkdir(name, mode, dir_fd=dirfd)
            if mode & ~self._umask == mode and self._owner is None:
                return
            # Set the exact mode (and owner) on what we just made, through an
            # fd on the entry itself: neither a symlink nor a mount point
            # swapped in meanwhile (a container can rename a host mount point
            # it does not see as one) redirects us.
            fd = self._openEntry(dirfd, name)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    return  # replaced meanwhile: not ours to adopt
                self._adopt(fd, mode, pathOnly=True)
            finally:
                os.close(fd)

    def rmdir(self, path: bytes) -> None:
        with self._parent(path) as (dirfd, name):
            os.rmdir(name, dir_fd=dirfd)

    def remove(self, path: bytes) -> None:
        self._refuseFolderEnding(path)
        with self._parent(path) as (dirfd, name):
            os.unlink(name, dir_fd=dirfd)

    def rename(self, old: bytes, new: bytes, replace: bool = False) -> None:
        """
        Rename C{old} to C{new}; unless C{replace}, an existing C{new} is an
        error (SFTP v3 semantics), checked atomically by the kernel.
        """
        if namesAFolder(old) or namesAFolder(new):
            # Either ending as a folder's: only a folder may be renamed.
            with self._opened(normalize(old), _O_PATH | os.O_DIRECTORY):
                pass
        with self._parent(old) as (olddir, oldname), self._parent(new) as (newdir, newname):
            if not replace:
                try:
                    _renameat2(olddir, oldname, newdir, newname)
                    return
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                # A file system without RENAME_NOREPLACE (some FUSE and
                # network ones): check, then rename, as OpenSSH's server does
                # where it cannot link.
                try:
                    os.stat(newname, dir_fd=newdir, follow_symlinks=False)
                except FileNotFoundError:
                    pass
                else:
                    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
            os.rename(oldname, newname, src_dir_fd=olddir, dst_dir_fd=newdir)

    def hardlink(self, old: bytes, new: bytes) -> None:
        """
        Make C{new} another name of the regular file C{old}.

        C{old} itself must be a regular file: a symlink is not followed and a
        directory is refused.  The inode checked is pinned by an fd and linked
        through it, so nothing swapped in after the check can be linked.
        """
        if namesAFolder(new):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        self._refuseFolderEnding(old)
        with self._parent(old) as (olddir, oldname):
            fd = self._openEntry(olddir, oldname)
        try:
            self._checkRegular(fd)
            with self._parent(new) as (newdir, newname):
                os.link(_procPath(fd), newname, dst_dir_fd=newdir, follow_symlinks=True)
        finally:
            os.close(fd)

    def symlink(self, target: bytes, linkpath: bytes) -> None:
        """
        Create C{linkpath} holding C{target} verbatim.  An absolute target
        means "from the volume root" whenever this service follows it.
        """
        if b"\0" in target:
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
        with self._parent(linkpath) as (dirfd, name):
            os.symlink(target, name, dir_fd=dirfd)
            if self._owner is None:
                return
            # The owner goes to the link just made, through an fd: whatever
            # is swapped in under its name meanwhile is left alone.
            fd = self._openEntry(dirfd, name)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    _fchownEmpty(fd, *self._owner)
            finally:
                os.close(fd)

    # -- attributes -------------------------------------------------------

    def setattrs(
        self,
        path: bytes,
        size: Optional[int] = None,
        mode: Optional[int] = None,
        times: Optional[Tuple[int, int]] = None,
    ) -> None:
        """
        Change the attributes of what C{path} leads to (following symlinks,
        beneath the root).
        """
        with self._opened(normalize(path), self._asFolder(path)) as fd:
            target = _procPath(fd)
            if size is not None:
                os.truncate(target, size)
            if mode is not None:
                os.chmod(target, mode & _PERMISSION_BITS)
            if times is not None:
                os.utime(target, times)

    def lsetattrs(
        self,
        path: bytes,
        mode: Optional[int] = None,
        times: Optional[Tuple[int, int]] = None,
    ) -> None:
        """
        Change the attributes of C{path} itself, never following a final
        symlink.  Linux keeps no permissions on a symlink, so a mode for one
        is refused with C{EOPNOTSUPP} before anything changes.
        """
        if not normalize(path) or namesAFolder(path):
            # The root, or "x/": what it leads to, as SETSTAT does.
            self.setattrs(path, mode=mode, times=times)
            return
        with self._parent(path) as (dirfd, name):
            fd = self._openEntry(dirfd, name)
            try:
                if stat.S_ISLNK(os.fstat(fd).st_mode):
                    if mode is not None:
                        raise OSError(errno.EOPNOTSUPP, "Symbolic links have no permissions")
                    if times is not None:
                        # Through the fd's /proc entry, which leads to the
                        # link itself (and no further), never by name: a
                        # mount point renamed in meanwhile is never touched.
                        os.utime(_procPath(fd), times)
                    return
                target = _procPath(fd)
                if mode is not None:
                    os.chmod(target, mode & _PERMISSION_BITS)
                if times is not None:
                    os.utime(target, times)
            finally:
                os.close(fd)

    def statvfs(self, path: bytes) -> os.statvfs_result:
        """
        The figures of the filesystem holding what C{path} leads to.
        """
        with self._opened(normalize(path), self._asFolder(path)) as fd:
            return os.fstatvfs(fd)

    @staticmethod
    def fsetattrs(
        fd: int,
        size: Optional[int] = None,
        mode: Optional[int] = None,
        times: Optional[Tuple[int, int]] = None,
    ) -> None:
        if size is not None:
            os.ftruncate(fd, size)
        if mode is not None:
            os.fchmod(fd, mode & _PERMISSION_BITS)
        if times is not None:
            os.utime(fd, times)
