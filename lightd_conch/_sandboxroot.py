"""
Make the volume the root of a running rsync sandbox (run as its own
process: ``python3 -I -S _sandboxroot.py PID MNT_NS_INODE MOUNTPOINT``).

bubblewrap starts rsync in a root that holds rsync, its libraries and the
volume at MOUNTPOINT.  Once rsync has been loaded (it has written its first
bytes and waits for the client), this joins the sandbox's user (if it has
one) and mount namespaces and:

- remounts the volume nosuid, nodev and noexec in the sandbox (the host's
  mount is untouched): nothing in the volume can be mapped executable, so
  no library a client plants (an NSS module, a gconv module) ever runs in
  rsync, and no device node in it can be opened;
- calls pivot_root(2), which moves the root of every process of the
  sandbox whose root is the old one (rsync among them) to the volume;
- detaches the old root, with rsync's binary and libraries: from then on no
  path rsync is given reaches anything but the volume.

It exits 0 once all of that is done, 1 (with one line on stderr) if any
step failed.  Only the standard library is used, nothing is imported from
the package (it runs with ``-I -S``), and everything it needs is imported
before it joins the namespaces: once the volume is its root, a module or a
source line read by name would come from the volume.  So it ends with
C{os._exit}, without the interpreter's shutdown and without formatting a
traceback, whatever happens.
"""

import ctypes
import os
import platform
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MNT_DETACH = 2
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_SYNCHRONOUS, MS_MANDLOCK, MS_REMOUNT = 16, 64, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_RELATIME = 1024, 2048, 4096, 1 << 21
# statvfs's f_flag bits and the mount flags they stand for: in a user
# namespace a remount must keep every flag the mount already has.
_KEPT = {
    1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 16: MS_SYNCHRONOUS,
    64: MS_MANDLOCK, 1024: MS_NOATIME, 2048: MS_NODIRATIME, 4096: MS_RELATIME,
}
# glibc has no pivot_root() wrapper.
_SYS_PIVOT_ROOT = {
    "x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203,
    "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218, "armv8l": 218,
}


class _Failed(Exception):
    pass


def _check(result, what):
    if result != 0:
        raise _Failed("%s: %s" % (what, os.strerror(ctypes.get_errno())))


def main(argv):
    pid, namespace, mountpoint = int(argv[1]), int(argv[2]), argv[3].encode()
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise _Failed("pivot_root: unknown system call number on " + platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p
    ]
    user = os.open("/proc/%d/ns/user" % pid, os.O_RDONLY | os.O_CLOEXEC)
    mount = os.open("/proc/%d/ns/mnt" % pid, os.O_RDONLY | os.O_CLOEXEC)
    # The mount namespace bubblewrap reported, not one of a process that
    # took the pid since.
    if os.fstat(mount).st_ino != namespace:
        raise _Failed("the sandbox has gone")
    if os.fstat(user).st_ino != os.stat("/proc/self/ns/user").st_ino:
        _check(libc.setns(user, CLONE_NEWUSER), "setns (user)")
    _check(libc.setns(mount, CLONE_NEWNS), "setns (mount)")
    flags = os.statvfs(mountpoint).f_flag
    kept = 0
    for bit, flag in _KEPT.items():
        if flags & bit:
            kept |= flag
    _check(
        libc.mount(None, mountpoint, None,
                   MS_REMOUNT | MS_BIND | kept | MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
        "remount",
    )
    os.chdir(mountpoint)
    _check(libc.syscall(number, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "umount")


if __name__ == "__main__":
    try:
        main(sys.argv)
    except BaseException as e:
        try:
            kind = "" if isinstance(e, _Failed) else type(e).__name__ + ": "
            os.write(2, ("%s%s\n" % (kind, e)).encode("ascii", "replace"))
        finally:
            os._exit(1)
    os._exit(0)
