"""
Confinement attacks against the running service, in raw SFTP packets (so no
client library tidies a path up first), with both of the service's resolvers:
openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS) and the O_NOFOLLOW walk used
where openat2 is missing.

Next to the volume ``demo`` live a sentinel file and directory (``outside/``),
sibling volumes whose names extend this one's (``demo2``, ``demo-old``) and a
file ``x`` in the volumes folder.  Every test ends by comparing all of that
with its state before: content, mode, link count, mtime and atime (read here
with O_NOATIME, so any read or listing by the service shows), the listings,
and a search for the names the test tried to create.  Nothing may be read,
listed, created, changed or removed.

Covered: ``..`` in every spelling, backslashes, percent-encoding, NUL bytes,
invalid UTF-8, 256-byte names, 4 KiB paths, the empty path; sibling volumes;
links planted from outside (absolute and relative escapes, escaping
intermediate directories, dangling links then OPEN(CREAT), ``q -> ..`` chains,
``/proc/self/root``, ``/proc/self/cwd`` and ``/proc/self/fd/N``, and, as root,
the real magic links of a procfs mounted inside the volume; loops); every
request type through and onto those links; identical replies for existing and
missing outside paths; FIFOs, sockets and devices; and a 10-second race that
swaps a directory with links to the outside beneath a busy client.
"""

import ctypes
import hashlib
import os
import socket
import stat
import subprocess
import threading
import time
import uuid

from twisted.trial import unittest

from tests import harness
from tests.harness import (
    FX_EOF,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_FSTAT,
    FXP_HANDLE,
    FXP_LSTAT,
    FXP_MKDIR,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READDIR,
    FXP_READLINK,
    FXP_REALPATH,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_SETSTAT,
    FXP_STAT,
    FXP_STATUS,
    FXP_SYMLINK,
    FXP_WRITE,
    PFLAG_APPEND,
    PFLAG_CREAT,
    PFLAG_EXCL,
    PFLAG_READ,
    PFLAG_TRUNC,
    PFLAG_WRITE,
    Service,
    attrs,
    make_credentials,
    require_paramiko,
    string,
    uint32,
    uint64,
)
from tests.test_e2e_protocol import FXP_EXTENDED, FXP_EXTENDED_REPLY, Session

SECRET = b"TOP SECRET outside the volume: never to be read\n"
SIBLING = b"another container's file\n"
OUTSIDE_X = b"OUTSIDE-X: next to the volume\n"
INSIDE_X = b"x-inside\n"
OLD = 1_000_000_000
SUCCESS_REPLIES = (FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS, FXP_EXTENDED_REPLY)
OUTSIDE_NAMES = {b"secret.txt", b"subdir", b"inner.txt", b"outside-only.txt"}

ATTR_SIZE, ATTR_PERMISSIONS, ATTR_ACMODTIME = 1, 4, 8


def mode_attrs(mode):
    return uint32(ATTR_PERMISSIONS) + uint32(mode)


def time_attrs(when):
    return uint32(ATTR_ACMODTIME) + uint32(when) + uint32(when)


def size_attrs(size):
    return uint32(ATTR_SIZE) + uint64(size)


def tree_state(path):
    """Everything observable about ``path`` and below, read without changing any atime."""
    st = os.lstat(path)
    meta = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
            st.st_nlink, st.st_size, st.st_mtime_ns, st.st_atime_ns)
    if stat.S_ISLNK(st.st_mode):
        return {"link": os.readlink(path), "meta": meta}
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        return {"meta": meta, "entries": {n: tree_state(os.path.join(path, n)) for n in names}}
    if not stat.S_ISREG(st.st_mode):
        return {"meta": meta}
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 16):
            digest.update(chunk)
    finally:
        os.close(fd)
    return {"meta": meta, "sha256": digest.hexdigest()}


class WalkResolverService(Service):
    """
    The service with openat2 reported missing, as on kernels before 5.6 or
    under a seccomp filter: every path goes through the O_NOFOLLOW walk.
    """

    MARKER = "lightd-e2e: openat2 disabled, resolving with the O_NOFOLLOW walk"

    def start(self):
        original = harness.twistd_command

        def command(config_path, log_path):
            argv = original(config_path, log_path)
            assert argv[1] == "-c", argv
            argv[2] = (
                "import lightd_conch.fs as fs; fs.openat2Available = lambda: False; "
                f"print({self.MARKER!r}); " + argv[2]
            )
            return argv

        harness.twistd_command = command
        try:
            return super().start()
        finally:
            harness.twistd_command = original


_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def exchange(a, b):
    """Atomically swap two names (renameat2 RENAME_EXCHANGE)."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class AttackTestCase(unittest.TestCase):
    """
    A service, a volume full of hostile links, and the sentinels around it;
    after every test, the sentinels must be exactly as they were.
    """

    timeout = 180
    walk = False

    def setUp(self):
        require_paramiko()
        service_class = WalkResolverService if self.walk else Service
        self.service = service_class(self).start()
        if self.walk:
            self.assertIn(WalkResolverService.MARKER, self.service.output_text())
        self.creds = make_credentials(self.service, "demo")
        self.root = self.service.root
        self.volumes = self.service.volumes
        self.volume = self.service.volume("demo")
        self.probe = "lightd-probe-" + uuid.uuid4().hex[:12]

        self.outside = self.root / "outside"
        self.secret = self.outside / "secret.txt"
        (self.outside / "subdir").mkdir(parents=True)
        self.secret.write_bytes(SECRET)
        (self.outside / "subdir" / "inner.txt").write_bytes(SECRET)
        (self.outside / "outside-only.txt").write_bytes(SECRET)
        for name, content in (("demo2", "other.txt"), ("demo-old", "old.txt")):
            (self.volumes / name).mkdir()
            (self.volumes / name / content).write_bytes(SIBLING)
        (self.volumes / "x").write_bytes(OUTSIDE_X)

        (self.volume / "inside.txt").write_bytes(b"inside\n")
        (self.volume / "x").write_bytes(INSIDE_X)
        (self.volume / "a" / "b").mkdir(parents=True)
        links = {
            "abs": str(self.secret),
            "absmissing": str(self.outside / "absent.txt"),
            "rel": "../../../outside/secret.txt",
            "relmissing": "../../../outside/absent.txt",
            "mid": str(self.outside),
            "relmid": "../../../outside",
            "dangle": str(self.outside / self.probe),
            "rdangle": f"../../../outside/{self.probe}-r",
            "q": "..",
            "a/q": "..",
            "a/b/q": "../..",
            "root": "/",
            "sib": "../demo2",
            "sibabs": str(self.volumes / "demo2"),
            "sibold": "../demo-old/",
            "procroot": "/proc/self/root",
            "proccwd": "/proc/self/cwd",
            "loop1": "loop2",
            "loop2": "loop1",
            "self": "self",
            "deeploop": "deeploop/x",
        }
        for n in range(24):
            links[f"procfd{n}"] = f"/proc/self/fd/{n}"
        for name, target in links.items():
            os.symlink(target, self.volume / name)
        for name in ("abs", "absmissing", "rel", "relmissing"):
            os.utime(self.volume / name, (OLD, OLD), follow_symlinks=False)

        for path in [self.outside, *self.outside.rglob("*"), self.volumes / "x",
                     *(self.volumes / "demo2").rglob("*"), *(self.volumes / "demo-old").rglob("*")]:
            os.utime(path, (OLD, OLD), follow_symlinks=False)
        self.before = self.outside_state()
        self.addCleanup(self.assertOutsideUnchanged)
        self.sftp = self.session()

    def session(self, creds=None):
        return Session(self, self.service, creds or self.creds)

    # -- the sentinels ----------------------------------------------------------

    def outside_state(self):
        storage = self.service.storage
        return {
            "outside": tree_state(self.outside),
            "volumes": {
                name: tree_state(self.volumes / name)
                for name in sorted(os.listdir(self.volumes)) if name != "demo"
            },
            "storage": sorted(os.listdir(storage)),
            "root": sorted(n for n in os.listdir(self.root) if not n.startswith("service.log")),
        }

    def probes_outside(self):
        """Places outside the volume where a name this test tried to create exists."""
        found = []
        for folder, dirs, files in os.walk(self.root):
            if os.path.samefile(folder, self.volume):
                dirs[:] = []
                continue
            found += [os.path.join(folder, n) for n in dirs + files if self.probe in n]
        for folder in (self.root.parent, "/", "/tmp", "/root", os.getcwd()):
            try:
                found += [os.path.join(folder, n) for n in os.listdir(folder) if self.probe in n]
            except OSError:
                pass
        return found

    def assertOutsideUnchanged(self):
        self.assertEqual(self.outside_state(), self.before,
                         "something outside the volume was read, listed or changed")
        self.assertEqual(self.probes_outside(), [], "something was created outside the volume")

    # -- requests and what their replies may be ---------------------------------

    def reply(self, ptype, *fields, session=None):
        """(reply type, Reader after the id) for one request."""
        session = session or self.sftp
        return session.call(ptype, *fields)

    def refused(self, what, ptype, *fields, session=None):
        """The request must get a STATUS other than OK; returns (code, message)."""
        reply_type, reader = self.reply(ptype, *fields, session=session)
        if reply_type != FXP_STATUS:
            self.fail(f"{what}: answered with type {reply_type}, must be refused")
        code, message = reader.uint32(), reader.string().decode("utf-8")
        self.assertNotIn(code, (FX_OK, FX_EOF), f"{what} succeeded: must be refused")
        self.assertNotIn(str(self.root), message, f"{what}: a host path in the message")
        return code, message

    def not_found(self, what, ptype, *fields, session=None):
        code, message = self.refused(what, ptype, *fields, session=session)
        self.assertEqual(code, FX_NO_SUCH_FILE, f"{what}: {message}")

    def data_of(self, path, session=None):
        """The whole content read through SFTP; fails if the file cannot be opened."""
        session = session or self.sftp
        handle = session.open(path)
        chunks, offset = [], 0
        while True:
            reply_type, reader = session.read(handle, offset, 65536)
            if reply_type == FXP_STATUS:
                self.assertEqual(reader.uint32(), FX_EOF)
                break
            chunk = reader.string()
            chunks.append(chunk)
            offset += len(chunk)
        self.assertEqual(session.status_of(FXP_CLOSE, string(handle))[0], FX_OK)
        data = b"".join(chunks)
        for sentinel in (SECRET, SIBLING, OUTSIDE_X):
            self.assertNotIn(sentinel, data, f"read {path!r}: outside data")
        return data

    def listing(self, path, session=None):
        """The names READDIR gives for ``path``, without "." and ".."."""
        session = session or self.sftp
        handle = session.opendir(path)
        names = []
        while True:
            reply_type, reader = session.call(FXP_READDIR, string(handle))
            if reply_type == FXP_STATUS:
                self.assertEqual(reader.uint32(), FX_EOF)
                break
            self.assertEqual(reply_type, FXP_NAME)
            for _ in range(reader.uint32()):
                names.append(reader.string())
                reader.string()
                _skip_attrs(reader)
        session.status_of(FXP_CLOSE, string(handle))
        names = sorted(n for n in names if n not in (b".", b".."))
        self.assertFalse(OUTSIDE_NAMES & set(names) - set(os.listdir(os.fsencode(self.volume))),
                         f"listing {path!r} shows outside names: {names}")
        return names

    def volume_names(self):
        return sorted(os.listdir(os.fsencode(self.volume)))

    def every_request_on(self, path, inside="inside.txt"):
        """
        Every request that names ``path`` (as the thing acted on, or as either
        side of a rename or link), with a label.  ``inside`` is an existing
        file inside the volume for the other side.
        """
        p, i, new = string(path), string(inside), string(f"{self.probe}-new")
        return [
            ("OPEN read", FXP_OPEN, p + uint32(PFLAG_READ) + attrs()),
            ("OPEN write", FXP_OPEN, p + uint32(PFLAG_WRITE) + attrs()),
            ("OPEN append", FXP_OPEN, p + uint32(PFLAG_READ | PFLAG_WRITE | PFLAG_APPEND) + attrs()),
            ("OPEN create", FXP_OPEN, p + uint32(PFLAG_WRITE | PFLAG_CREAT) + attrs()),
            ("OPEN create+trunc", FXP_OPEN, p + uint32(PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC) + attrs()),
            ("OPEN create+excl", FXP_OPEN, p + uint32(PFLAG_WRITE | PFLAG_CREAT | PFLAG_EXCL) + attrs()),
            ("STAT", FXP_STAT, p),
            ("LSTAT", FXP_LSTAT, p),
            ("SETSTAT mode", FXP_SETSTAT, p + mode_attrs(0o777)),
            ("SETSTAT times", FXP_SETSTAT, p + time_attrs(2_000_000_000)),
            ("SETSTAT size", FXP_SETSTAT, p + size_attrs(0)),
            ("lsetstat times", FXP_EXTENDED, string("lsetstat@openssh.com") + p + time_attrs(2_000_000_000)),
            ("OPENDIR", FXP_OPENDIR, p),
            ("REMOVE", FXP_REMOVE, p),
            ("RMDIR", FXP_RMDIR, p),
            ("MKDIR", FXP_MKDIR, p + attrs()),
            ("RENAME from", FXP_RENAME, p + new),
            ("RENAME to", FXP_RENAME, i + p),
            ("posix-rename from", FXP_EXTENDED, string("posix-rename@openssh.com") + p + new),
            ("posix-rename to", FXP_EXTENDED, string("posix-rename@openssh.com") + i + p),
            ("hardlink from", FXP_EXTENDED, string("hardlink@openssh.com") + p + new),
            ("hardlink to", FXP_EXTENDED, string("hardlink@openssh.com") + i + p),
            ("SYMLINK at", FXP_SYMLINK, string("/") + p),
            ("READLINK", FXP_READLINK, p),
            ("statvfs", FXP_EXTENDED, string("statvfs@openssh.com") + p),
        ]

    def assertEveryRequestRefused(self, paths, allowed=()):
        """Each request on each of ``paths`` is refused, except the labels in ``allowed``."""
        for path in paths:
            for label, ptype, fields in self.every_request_on(path):
                if label in allowed:
                    self.reply(ptype, fields)
                    continue
                self.refused(f"{label} {path!r}", ptype, fields)
        self.assertEqual((self.volume / "inside.txt").read_bytes(), b"inside\n")


def _skip_attrs(reader):
    flags = reader.uint32()
    reader.take((8 if flags & 1 else 0) + (8 if flags & 2 else 0)
                + (4 if flags & 4 else 0) + (8 if flags & 8 else 0))
    if flags & 0x80000000:
        for _ in range(reader.uint32()):
            reader.string(), reader.string()


# -- the tests, run once per resolver ------------------------------------------


class LexicalAttacks:
    def test_dot_dot_in_every_spelling_stays_at_the_root(self):
        for path in ("../x", "/../../x", "a/../../x", "//..//x", "./../x", "a/./../../a/../x",
                     "/a/b/../../../../x", "../" * 1400 + "x", "/" * 4000 + "../x",
                     "a/b/" + "../" * 50 + "x"):
            self.assertEqual(self.data_of(path), INSIDE_X, path[:40])
            reply_type, reader = self.reply(FXP_REALPATH, string(path))
            self.assertEqual((reply_type, reader.uint32(), reader.string()), (FXP_NAME, 1, b"/x"))
        for path in ("..", "../..", "/..", "a/../..", "//..//", "a/b/../../../.."):
            self.assertEqual(self.listing(path), self.volume_names(), path)
        for path in ("../demo2/other.txt", "../../volumes/demo2/other.txt", "../outside/secret.txt",
                     "../../../outside/secret.txt", "/../../../../outside/secret.txt"):
            self.not_found(path, FXP_STAT, string(path))
            self.not_found(path, FXP_OPEN, string(path), uint32(PFLAG_READ), attrs())

    def test_backslashes_and_percent_encoding_are_plain_characters(self):
        for path in ("..\\x", "..\\..\\outside\\secret.txt", "\\..\\x", "a\\..\\..\\x",
                     "%2e%2e/x", "%2e%2e%2fx", "..%2fx", "%2E%2E/%2E%2E/outside/secret.txt",
                     "%252e%252e/x", "..%5cx", "..\\/x", "..%c0%afx"):
            self.not_found(path, FXP_STAT, string(path))
            self.not_found(path, FXP_OPEN, string(path), uint32(PFLAG_READ), attrs())
        # Created, they are names inside the volume, taken literally.
        for name in ("..\\" + self.probe, "%2e%2e%2f" + self.probe, "..%5c" + self.probe):
            handle = self.sftp.open(name, PFLAG_WRITE | PFLAG_CREAT)
            self.sftp.status_of(FXP_CLOSE, string(handle))
            self.assertTrue((self.volume / name).is_file(), name)
        self.assertEqual(self.data_of("x"), INSIDE_X)

    def test_nul_bytes_never_truncate_a_path(self):
        names = [b"x\0", b"x\0/../../outside/secret.txt", b"../outside/secret.txt\0",
                 b"inside.txt\0.jpg", b"\0", b"a\0/b", b"x\0" + self.probe.encode()]
        for path in names:
            self.assertEveryRequestRefused([path])
            self.refused(f"REALPATH {path!r}", FXP_REALPATH, string(path))
            self.refused(f"SYMLINK to {path!r}", FXP_SYMLINK, string(path),
                         string(f"{self.probe}-link"))
        self.assertEqual((self.volume / "x").read_bytes(), INSIDE_X)
        self.assertFalse(os.path.lexists(self.volume / f"{self.probe}-link"))
        self.assertFalse(os.path.lexists(self.volume / f"{self.probe}-new"))

    def test_invalid_utf8(self):
        for path in (b"\xff", b"\xc0\xae\xc0\xae/x", b"\xc0\xae\xc0\xae/\xc0\xae\xc0\xae/outside",
                     b"..\xc0\xafx", b"\xc0\xaf..\xc0\xaf..\xc0\xafoutside", b"\xed\xa0\x80",
                     b"\xe0\x80\xae\xe0\x80\xae/x", b"\xfe\xfe/../../x"):
            if path.endswith(b"/../../x"):
                self.assertEqual(self.data_of(path), INSIDE_X)
                continue
            self.not_found(repr(path), FXP_STAT, string(path))
            self.not_found(repr(path), FXP_OPEN, string(path), uint32(PFLAG_READ), attrs())
        name = b"\xff\xfe" + self.probe.encode()
        handle = self.sftp.open(name, PFLAG_WRITE | PFLAG_CREAT)
        self.sftp.status_of(FXP_CLOSE, string(handle))
        self.assertEqual(self.sftp.status_of(FXP_MKDIR, string(name + b"-dir"), attrs())[0], FX_OK)
        self.assertIn(name, self.listing("/"))
        self.assertIn(name + b"-dir", os.listdir(os.fsencode(self.volume)))
        reply_type, reader = self.reply(FXP_REALPATH, string(b"../" + name))
        self.assertEqual((reply_type, reader.uint32(), reader.string()), (FXP_NAME, 1, b"/" + name))
        self.assertEqual(self.sftp.status_of(FXP_RENAME, string(name), string(name + b"\xc0"))[0],
                         FX_OK)

    def test_long_names_and_paths(self):
        name255 = (self.probe + "n" * 255)[:255]
        handle = self.sftp.open(name255, PFLAG_WRITE | PFLAG_CREAT)
        self.sftp.status_of(FXP_CLOSE, string(handle))
        self.assertTrue((self.volume / name255).is_file())
        for path in ("n" * 256, "../" + "n" * 256, "a/" + "n" * 256 + "/x", "a/" * 2048,
                     "a/b/" * 1100, "n" * 65536):
            for label, ptype, fields in (
                ("STAT", FXP_STAT, string(path)),
                ("OPEN create", FXP_OPEN, string(path) + uint32(PFLAG_WRITE | PFLAG_CREAT) + attrs()),
                ("MKDIR", FXP_MKDIR, string(path) + attrs()),
                ("OPENDIR", FXP_OPENDIR, string(path)),
                ("RENAME", FXP_RENAME, string("inside.txt") + string(path)),
                ("SYMLINK at", FXP_SYMLINK, string("/") + string(path)),
            ):
                self.refused(f"{label} of a {len(path)}-byte path", ptype, fields)
        self.assertEqual(self.data_of("inside.txt"), b"inside\n")

    def test_the_empty_path_is_the_root(self):
        reply_type, reader = self.reply(FXP_STAT, string(""))
        self.assertEqual(reply_type, FXP_ATTRS)
        reply_type, reader = self.reply(FXP_REALPATH, string(""))
        self.assertEqual((reply_type, reader.uint32(), reader.string()), (FXP_NAME, 1, b"/"))
        self.assertEqual(self.listing(""), self.volume_names())
        for label, ptype, fields in (
            ("OPEN read", FXP_OPEN, string("") + uint32(PFLAG_READ) + attrs()),
            ("OPEN create", FXP_OPEN, string("") + uint32(PFLAG_WRITE | PFLAG_CREAT) + attrs()),
            ("REMOVE", FXP_REMOVE, string("")),
            ("RMDIR", FXP_RMDIR, string("")),
            ("MKDIR", FXP_MKDIR, string("") + attrs()),
            ("RENAME from", FXP_RENAME, string("") + string(self.probe)),
            ("RENAME to", FXP_RENAME, string("inside.txt") + string("")),
            ("posix-rename to", FXP_EXTENDED, string("posix-rename@openssh.com")
             + string("inside.txt") + string("")),
            ("SYMLINK at", FXP_SYMLINK, string("/") + string("")),
            ("READLINK", FXP_READLINK, string("")),
            ("hardlink to", FXP_EXTENDED, string("hardlink@openssh.com") + string("inside.txt")
             + string("")),
        ):
            self.refused(f"{label} of the empty path", ptype, fields)
        self.assertTrue(self.volume.is_dir())
        self.assertEqual(self.data_of("inside.txt"), b"inside\n")


class SiblingVolumeAttacks:
    def test_sibling_volumes_whose_names_extend_this_one(self):
        paths = ["../demo2/other.txt", "/../demo-old/old.txt", "../../volumes/demo2/other.txt",
                 str(self.volumes / "demo2" / "other.txt"), str(self.volumes / "demo-old"),
                 "sib/other.txt", "sibabs/other.txt", "sibold/old.txt", "sib",
                 "sibabs", "sibold/"]
        for path in paths:
            link_itself = path in ("sib", "sibabs", "sibold/")
            for label, ptype, fields in self.every_request_on(path):
                if link_itself and label in ("LSTAT", "READLINK", "lsetstat times"):
                    continue
                if link_itself and label in ("REMOVE", "RENAME from", "posix-rename from",
                                             "posix-rename to", "OPEN create",
                                             "OPEN create+trunc"):
                    continue  # acts on the link, or creates through it, inside: below
                self.refused(f"{label} {path!r}", ptype, fields)
        # "../demo2" read from the volume root is "/demo2": creating through "sib" makes
        # that name inside the volume.
        handle = self.sftp.open("sib", PFLAG_WRITE | PFLAG_CREAT)
        self.sftp.status_of(FXP_WRITE, string(handle), uint64(0), string(b"mine\n"))
        self.sftp.status_of(FXP_CLOSE, string(handle))
        self.assertEqual((self.volume / "demo2").read_bytes(), b"mine\n")
        self.not_found("sibabs", FXP_OPEN, string("sibabs"), uint32(PFLAG_WRITE | PFLAG_CREAT),
                       attrs())
        self.sftp.status_of(FXP_REMOVE, string("sibabs"))
        self.assertFalse(os.path.lexists(self.volume / "sibabs"))

    def test_the_other_containers_cannot_reach_this_one(self):
        (self.volume / "mine.txt").write_bytes(b"demo's own\n")
        for container in ("demo2", "demo-old"):
            creds = make_credentials(self.service, container)
            other = self.session(creds)
            # Logged in to its own volume (STAT, unlike a read, leaves its atime alone).
            own = "other.txt" if container == "demo2" else "old.txt"
            self.assertEqual(self.reply(FXP_STAT, string(own), session=other)[0], FXP_ATTRS)
            for path in ("../demo/mine.txt", "../../volumes/demo/mine.txt",
                         str(self.volume / "mine.txt"), "/../demo/mine.txt"):
                self.not_found(f"{container}: {path}", FXP_STAT, string(path), session=other)
                self.not_found(f"{container}: {path}", FXP_OPEN, string(path),
                               uint32(PFLAG_READ), attrs(), session=other)
        self.assertEqual(self.data_of("mine.txt"), b"demo's own\n")


class PlantedLinkAttacks:
    THROUGH = [
        "abs", "rel", "mid/secret.txt", "relmid/secret.txt", "mid/subdir/inner.txt",
        "relmid/subdir", "mid/subdir", "q/q/q/outside/secret.txt", "q/q/../outside/secret.txt",
        "a/q/q/outside/secret.txt", "a/b/q/../outside/secret.txt", "root/../outside/secret.txt",
        "procroot/{secret}", "proccwd/outside/secret.txt", "proccwd/outside",
        "mid/outside-only.txt",
    ]

    def through_paths(self):
        paths = [p.format(secret=str(self.secret).lstrip("/")) for p in self.THROUGH]
        paths += [f"procfd{n}" for n in range(24)] + [f"procfd{n}/x" for n in range(24)]
        return paths

    def test_every_request_through_an_escaping_link_is_refused(self):
        # On "abs", "rel" and the procfdN links these act on the link itself.
        on_the_link = {"LSTAT", "READLINK", "lsetstat times", "REMOVE", "RENAME from",
                       "posix-rename from", "posix-rename to", "hardlink from"}
        for path in self.through_paths():
            link_itself = "/" not in path
            for label, ptype, fields in self.every_request_on(path):
                if link_itself and label in on_the_link:
                    continue
                self.refused(f"{label} {path!r}", ptype, fields)
            # REALPATH is lexical: it names the path inside, whatever the links say.
            reply_type, reader = self.reply(FXP_REALPATH, string(path))
            self.assertEqual((reply_type, reader.uint32()), (FXP_NAME, 1))
            self.assertEqual(reader.string(), b"/" + os.path.normpath(path).encode().lstrip(b"/"))
        self.assertEqual((self.volume / "inside.txt").read_bytes(), b"inside\n")

    def test_requests_on_the_link_itself_stay_inside(self):
        self.assertEqual(self.reply(FXP_LSTAT, string("abs"))[0], FXP_ATTRS)
        reply_type, reader = self.reply(FXP_READLINK, string("abs"))
        self.assertEqual((reply_type, reader.uint32(), reader.string()),
                         (FXP_NAME, 1, os.fsencode(self.secret)))
        reply_type, reader = self.reply(FXP_REALPATH, string("abs"))
        self.assertEqual((reply_type, reader.uint32(), reader.string()), (FXP_NAME, 1, b"/abs"))
        # A hardlink of a symlink would be a second name for it, or for its target: refused.
        self.refused("hardlink of abs", FXP_EXTENDED, string("hardlink@openssh.com"),
                     string("abs"), string(f"{self.probe}-hl"))
        # lsetstat changes the link's own times; a mode means nothing for a link.
        self.assertEqual(self.sftp.status_of(FXP_EXTENDED, string("lsetstat@openssh.com"),
                                             string("abs"), time_attrs(1_500_000_000))[0], FX_OK)
        self.assertEqual(os.lstat(self.volume / "abs").st_mtime, 1_500_000_000)
        code, _ = self.sftp.status_of(FXP_EXTENDED, string("lsetstat@openssh.com"),
                                      string("rel"), mode_attrs(0o600))
        self.assertEqual(code, FX_OP_UNSUPPORTED)
        # RENAME onto a link refuses (v3 never replaces); posix-rename replaces the link only.
        self.refused("RENAME onto abs", FXP_RENAME, string("inside.txt"), string("abs"))
        self.assertEqual(self.sftp.status_of(FXP_EXTENDED, string("posix-rename@openssh.com"),
                                             string("inside.txt"), string("abs"))[0], FX_OK)
        self.assertEqual((self.volume / "abs").read_bytes(), b"inside\n")
        self.assertEqual(self.sftp.status_of(FXP_RENAME, string("rel"), string(f"{self.probe}-rel"))[0],
                         FX_OK)
        self.assertEqual(os.readlink(self.volume / f"{self.probe}-rel"), "../../../outside/secret.txt")
        self.assertEqual(self.sftp.status_of(FXP_REMOVE, string("mid"))[0], FX_OK)
        self.assertFalse(os.path.lexists(self.volume / "mid"))

    def test_dangling_links_then_open_create(self):
        create = uint32(PFLAG_WRITE | PFLAG_CREAT)
        for link in ("dangle", "rdangle"):
            # The target's folder does not exist inside the volume: nothing is created anywhere.
            self.not_found(link, FXP_OPEN, string(link), create, attrs())
            self.refused(link, FXP_OPEN, string(link), uint32(PFLAG_WRITE | PFLAG_CREAT | PFLAG_EXCL),
                         attrs())
            self.refused(link, FXP_MKDIR, string(link), attrs())
            self.refused(link, FXP_SYMLINK, string("/"), string(link))
        # Once that folder exists inside, the link's target is created there, inside.
        inner = self.volume / str(self.outside).lstrip("/")
        inner.mkdir(parents=True)
        (self.volume / "outside").mkdir(exist_ok=True)
        for link, made in (("dangle", inner / self.probe),
                           ("rdangle", self.volume / "outside" / f"{self.probe}-r")):
            handle = self.sftp.open(link, PFLAG_WRITE | PFLAG_CREAT)
            self.sftp.status_of(FXP_WRITE, string(handle), uint64(0), string(b"made inside\n"))
            self.sftp.status_of(FXP_CLOSE, string(handle))
            self.assertEqual(made.read_bytes(), b"made inside\n")
        self.assertEqual(self.data_of(str(self.outside / self.probe)), b"made inside\n")

    def test_dot_dot_link_chains_lead_to_the_root(self):
        for path in ("q", "q/q", "q/q/q/q", "a/q", "a/q/q", "a/b/q", "a/b/q/q/a/b/q", "root",
                     "root/root/q"):
            self.assertEqual(self.listing(path), self.volume_names(), path)
            self.assertEqual(self.data_of(f"{path}/inside.txt"), b"inside\n")
            self.assertEqual(self.data_of(f"{path}/x"), INSIDE_X)
        handle = self.sftp.open(f"q/q/a/b/q/{self.probe}", PFLAG_WRITE | PFLAG_CREAT)
        self.sftp.status_of(FXP_CLOSE, string(handle))
        self.assertTrue((self.volume / self.probe).is_file())

    def test_proc_magic_links_planted_as_links_lead_nowhere(self):
        for link in ["procroot", "proccwd"] + [f"procfd{n}" for n in range(24)]:
            self.not_found(link, FXP_STAT, string(link))
            self.not_found(link, FXP_OPENDIR, string(link))
            self.not_found(link, FXP_OPEN, string(link), uint32(PFLAG_READ), attrs())

    def test_loops_are_answered(self):
        for path in ("loop1", "loop2", "self", "deeploop", "loop1/x", "self/self", "deeploop/x"):
            for label, ptype, fields in (
                ("STAT", FXP_STAT, string(path)),
                ("OPEN", FXP_OPEN, string(path) + uint32(PFLAG_READ) + attrs()),
                ("OPEN create", FXP_OPEN, string(path) + uint32(PFLAG_WRITE | PFLAG_CREAT) + attrs()),
                ("OPENDIR", FXP_OPENDIR, string(path)),
                ("SETSTAT", FXP_SETSTAT, string(path) + mode_attrs(0o600)),
                ("statvfs", FXP_EXTENDED, string("statvfs@openssh.com") + string(path)),
            ):
                self.refused(f"{label} {path!r}", ptype, fields)
            self.refused(f"MKDIR {path}/d", FXP_MKDIR, string(f"{path}/d"), attrs())
        self.assertEqual(self.reply(FXP_LSTAT, string("loop1"))[0], FXP_ATTRS)
        self.assertEqual(self.data_of("x"), INSIDE_X)

    def test_open_handles_stay_on_what_they_opened(self):
        (self.volume / "a" / "inner.txt").write_bytes(b"a's file\n")
        dh = self.sftp.opendir("a")
        fh = self.sftp.open("inside.txt")
        # Swapped from outside for links to the outside while the handles are open.
        os.rename(self.volume / "a", self.volume / "a-moved")
        os.symlink(str(self.outside), self.volume / "a")
        os.rename(self.volume / "inside.txt", self.volume / "inside-moved.txt")
        os.symlink(str(self.secret), self.volume / "inside.txt")
        names = []
        while True:
            reply_type, reader = self.reply(FXP_READDIR, string(dh))
            if reply_type == FXP_STATUS:
                break
            for _ in range(reader.uint32()):
                names.append(reader.string())
                reader.string()
                _skip_attrs(reader)
        self.assertEqual(sorted(n for n in names if n not in (b".", b"..")),
                         [b"b", b"inner.txt", b"q"])
        reply_type, reader = self.sftp.read(fh, 0, 100)
        self.assertEqual((reply_type, reader.string()), (FXP_DATA, b"inside\n"))
        self.not_found("a/secret.txt", FXP_STAT, string("a/secret.txt"))
        self.not_found("inside.txt", FXP_OPEN, string("inside.txt"), uint32(PFLAG_READ), attrs())


class IdenticalReplyAttacks:
    """
    Whether an outside path exists must not show: the replies for an existing
    and a missing one are byte for byte the same (apart from the id).
    """

    def test_existing_and_missing_outside_paths_get_the_same_replies(self):
        secret, absent = str(self.secret), str(self.outside / "absent.txt")
        pairs = [
            ("../outside/secret.txt", "../outside/absent.txt"),
            ("../../../outside/secret.txt", "../../../outside/absent.txt"),
            (secret, absent),
            ("mid/secret.txt", "mid/absent.txt"),
            ("relmid/secret.txt", "relmid/absent.txt"),
            ("mid/subdir", "mid/absentdir"),
            ("../outside/subdir", "../outside/absentdir"),
            ("../demo2/other.txt", "../demo2/absent.txt"),
            ("sib/other.txt", "sib/absent.txt"),
            ("q/q/outside/secret.txt", "q/q/outside/absent.txt"),
            ("proccwd/outside/secret.txt", "proccwd/outside/absent.txt"),
            ("abs/x", "absmissing/x"),
            ("abs", "absmissing"),
            ("rel", "relmissing"),
        ]
        # Acting on the links themselves is acting inside: their replies differ by design
        # only where the links differ, which they do not.
        for existing, missing in pairs:
            for (label, ptype, fields), (_, _, other) in zip(
                self.every_request_on(existing), self.every_request_on(missing)
            ):
                if existing in ("abs", "rel") and label in (
                    "READLINK", "REMOVE", "RENAME from", "posix-rename from", "hardlink from",
                    "posix-rename to", "lsetstat times",
                ):
                    continue
                first = self.reply(ptype, fields)
                second = self.reply(ptype, other)
                self.assertEqual(
                    (first[0], first[1].data[first[1].pos:]),
                    (second[0], second[1].data[second[1].pos:]),
                    f"{label}: {existing!r} and {missing!r} answered differently",
                )
                if first[0] == FXP_STATUS:
                    self.assertNotEqual(first[1].uint32(), FX_OK, f"{label} {existing!r}")


class SpecialFileAttacks:
    def plant_special_files(self):
        os.mkfifo(self.volume / "fifo")
        listener = socket.socket(socket.AF_UNIX)
        self.addCleanup(listener.close)
        listener.bind(str(self.volume / "sock"))
        listener.listen(1)
        names = ["fifo", "sock"]
        if os.geteuid() == 0:  # as in CI; elsewhere the FIFO and the socket still count
            root_device = os.stat("/").st_dev
            for name, kind, device in (
                ("null", stat.S_IFCHR, os.makedev(1, 3)),
                ("zero", stat.S_IFCHR, os.makedev(1, 5)),
                ("mem", stat.S_IFCHR, os.makedev(1, 1)),
                ("disk", stat.S_IFBLK, os.makedev(os.major(root_device), os.minor(root_device))),
            ):
                os.mknod(self.volume / name, kind | 0o666, device)
                names.append(name)
        for name in list(names):
            os.symlink(f"/{name}", self.volume / f"to-{name}")
            names.append(f"to-{name}")
        return names

    def test_fifo_socket_and_devices_are_never_opened(self):
        names = self.plant_special_files()
        bystander = self.session()
        for name in names:
            for label, pflags in (
                ("read", PFLAG_READ), ("write", PFLAG_WRITE), ("read-write", PFLAG_READ | PFLAG_WRITE),
                ("append", PFLAG_WRITE | PFLAG_APPEND), ("create", PFLAG_WRITE | PFLAG_CREAT),
                ("truncate", PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC),
            ):
                started = time.monotonic()
                self.refused(f"OPEN {label} {name}", FXP_OPEN, string(name), uint32(pflags), attrs())
                # Refused at once (generous bound: never a blocked open), and the
                # daemon serves another session meanwhile.
                self.assertLess(time.monotonic() - started, 10)
                self.assertEqual(bystander.realpath(bystander.nextId(), name), f"/{name}")
            self.refused(f"OPENDIR {name}", FXP_OPENDIR, string(name))
            self.refused(f"SETSTAT size {name}", FXP_SETSTAT, string(name), size_attrs(0))
            self.refused(f"hardlink {name}", FXP_EXTENDED, string("hardlink@openssh.com"),
                         string(name), string(f"{self.probe}-{name}"))
        for name in names:
            reply_type, reader = self.reply(FXP_STAT, string(name))
            self.assertEqual(reply_type, FXP_ATTRS, name)
        self.assertEqual(self.listing("/"), self.volume_names())
        self.assertEqual(self.data_of("inside.txt"), b"inside\n")


class RaceAttacks:
    RACE_SECONDS = 10
    INSIDE = b"inside race\n"

    def swap_until(self, stop, counter):
        race, alts = self.volume / "race", [self.volume / "alt-abs", self.volume / "alt-rel",
                                           self.volume / "alt-up"]
        while not stop.is_set():
            for alt in alts:
                exchange(race, alt)  # race becomes the link ...
                exchange(race, alt)  # ... and the directory again
                counter[0] += 2

    def test_a_directory_swapped_with_links_to_the_outside(self):
        race = self.volume / "race"
        (race / "subdir").mkdir(parents=True)
        (race / "secret.txt").write_bytes(self.INSIDE)
        (race / "subdir" / "inner.txt").write_bytes(self.INSIDE)
        os.symlink(str(self.outside), self.volume / "alt-abs")
        os.symlink("../../../outside", self.volume / "alt-rel")
        os.symlink("q/..", self.volume / "alt-up")
        stop, counter = threading.Event(), [0]
        swapper = threading.Thread(target=self.swap_until, args=(stop, counter), daemon=True)
        swapper.start()
        self.addCleanup(swapper.join, 10)
        self.addCleanup(stop.set)

        s = self.sftp
        outcomes = {"ok": 0, "refused": 0}
        deadline = time.monotonic() + self.RACE_SECONDS
        round_ = 0
        while time.monotonic() < deadline:
            round_ += 1
            new, moved = f"race/new-{round_}", f"race/moved-{round_}"
            batch = [
                (FXP_OPEN, string("race/secret.txt") + uint32(PFLAG_READ) + attrs()),
                (FXP_OPEN, string("race/secret.txt") + uint32(PFLAG_READ | PFLAG_WRITE) + attrs()),
                (FXP_OPEN, string(new) + uint32(PFLAG_WRITE | PFLAG_CREAT) + attrs()),
                (FXP_OPEN, string("race/subdir/inner.txt") + uint32(PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC) + attrs()),
                (FXP_OPENDIR, string("race")),
                (FXP_OPENDIR, string("race/subdir")),
                (FXP_STAT, string("race/secret.txt")),
                (FXP_LSTAT, string("race/secret.txt")),
                (FXP_STAT, string("race/subdir/../secret.txt")),
                (FXP_SETSTAT, string("race/secret.txt") + mode_attrs(0o640)),
                (FXP_SETSTAT, string("race/secret.txt") + time_attrs(1_600_000_000)),
                (FXP_SETSTAT, string("race/subdir") + mode_attrs(0o750)),
                (FXP_SETSTAT, string("race/subdir/inner.txt") + size_attrs(3)),
                (FXP_EXTENDED, string("lsetstat@openssh.com") + string("race/secret.txt")
                 + time_attrs(1_600_000_000)),
                (FXP_MKDIR, string(f"race/dir-{round_}") + attrs()),
                (FXP_RMDIR, string(f"race/dir-{round_}")),
                (FXP_RENAME, string(new) + string(moved)),
                (FXP_EXTENDED, string("posix-rename@openssh.com") + string(moved)
                 + string(f"race/{self.probe}")),
                (FXP_EXTENDED, string("posix-rename@openssh.com") + string("race/secret.txt")
                 + string("race/secret.tmp")),
                (FXP_EXTENDED, string("posix-rename@openssh.com") + string("race/secret.tmp")
                 + string("race/secret.txt")),
                (FXP_RENAME, string("race/outside-only.txt") + string(f"{self.probe}-stolen")),
                (FXP_EXTENDED, string("hardlink@openssh.com") + string("race/secret.txt")
                 + string(f"race/hl-{round_}")),
                (FXP_REMOVE, string(f"race/hl-{round_}")),
                (FXP_REMOVE, string("race/outside-only.txt")),
                (FXP_SYMLINK, string("/") + string(f"race/{self.probe}-link")),
                (FXP_REMOVE, string(f"race/{self.probe}-link")),
                (FXP_READLINK, string("race")),
                (FXP_EXTENDED, string("statvfs@openssh.com") + string("race/subdir")),
            ]
            first = s.lastId + 1
            for request_id, (ptype, fields) in enumerate(batch, start=first):
                s.request(ptype, request_id, fields)
            s.lastId = first + len(batch) - 1
            handles = []
            for request_id, (ptype, _) in enumerate(batch, start=first):
                reply = s.read_reply(request_id)
                self.assertIsNotNone(reply, "the channel closed during the race")
                reply_type, reader = reply
                if reply_type == FXP_STATUS:
                    code = reader.uint32()
                    outcomes["ok" if code == FX_OK else "refused"] += 1
                    continue
                outcomes["ok"] += 1
                if reply_type == FXP_HANDLE:
                    handles.append((ptype, reader.string()))
                elif reply_type == FXP_ATTRS:
                    flags = reader.uint32()
                    if flags & ATTR_SIZE:
                        self.assertNotEqual(reader.uint64(), len(SECRET), "stat saw the sentinel")
            # Then use every handle the race gave.
            for ptype, handle in handles:
                if ptype == FXP_OPEN:
                    reply_type, reader = s.read(handle, 0, 4096)
                    if reply_type == FXP_DATA:
                        data = reader.string()
                        self.assertNotIn(SECRET[:16], data, "read the sentinel through the race")
                        self.assertTrue(self.INSIDE.startswith(data) or not data.strip(b"\0"), data)
                    reply_type, reader = s.call(FXP_FSTAT, string(handle))
                    self.assertEqual(reply_type, FXP_ATTRS)
                    s.status_of(FXP_WRITE, string(handle), uint64(0), string(self.INSIDE[:4]))
                else:
                    while True:
                        reply_type, reader = s.call(FXP_READDIR, string(handle))
                        if reply_type != FXP_NAME:
                            break
                        for _ in range(reader.uint32()):
                            name = reader.string()
                            reader.string()
                            _skip_attrs(reader)
                            self.assertNotIn(name, (b"outside-only.txt",), "listed the outside")
                self.assertEqual(s.status_of(FXP_CLOSE, string(handle))[0], FX_OK)
        stop.set()
        swapper.join(10)
        self.assertFalse(swapper.is_alive())
        self.assertGreater(counter[0], 1000, "the swapper barely ran")
        self.assertGreater(outcomes["ok"], 100, f"the race never let a request through: {outcomes}")
        self.assertGreater(outcomes["refused"], 100, f"the race never bit: {outcomes}")
        self.assertEqual(self.data_of("inside.txt"), b"inside\n")


class MountedProcfsAttacks:
    """
    The real magic links: a procfs mounted inside the volume (root only).  With
    openat2 RESOLVE_NO_MAGICLINKS refuses them; the walk reads their text and
    resolves it inside the volume.  ``proc/self/cwd`` of the service is its
    working directory, the folder that holds ``outside/``.
    """

    def mount_procfs(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("mounting a procfs needs root (CI runs as root)")
        mountpoint = self.volume / "proc"
        mountpoint.mkdir()
        result = subprocess.run(["mount", "-t", "proc", "proc", str(mountpoint)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise unittest.SkipTest(f"cannot mount a procfs here: {result.stderr.strip()}")
        # Before the temporary folder is removed (cleanups run last-in first-out).
        self.addCleanup(subprocess.run, ["umount", "-l", str(mountpoint)], check=True)

    def test_files_of_a_mounted_procfs_are_not_served(self):
        # Mounts inside the volume are never crossed (RESOLVE_NO_XDEV, or the
        # walk's mount-id check): the service's environment and memory, and
        # kernel settings, stay out of reach.
        self.mount_procfs()
        for path, flags in (("proc/self/environ", PFLAG_READ), ("proc/self/mem", PFLAG_READ | PFLAG_WRITE),
                            ("proc/sys/kernel/hostname", PFLAG_WRITE), ("proc/self/status", PFLAG_READ)):
            reply_type, reader = self.reply(FXP_OPEN, string(path) + uint32(flags) + attrs())
            self.assertNotEqual(reply_type, FXP_HANDLE, path)
        reply_type, reader = self.reply(FXP_OPENDIR, string("proc"))
        self.assertNotEqual(reply_type, FXP_HANDLE)

    def test_magic_links_of_a_mounted_procfs_never_lead_out(self):
        self.mount_procfs()
        secret = str(self.secret).lstrip("/")
        paths = [f"proc/self/root/{secret}", "proc/self/cwd/outside/secret.txt",
                 f"proc/thread-self/root/{secret}", f"proc/1/root/{secret}",
                 "proc/self/cwd/outside", "proc/self/root", "proc/self/cwd", "proc/self/exe"]
        paths += [f"proc/self/fd/{n}" for n in range(40)]
        paths += [f"proc/self/fd/{n}/secret.txt" for n in range(40)]
        for path in paths:
            for label, ptype, fields in (
                ("OPEN read", FXP_OPEN, string(path) + uint32(PFLAG_READ) + attrs()),
                ("OPEN write", FXP_OPEN, string(path) + uint32(PFLAG_WRITE) + attrs()),
                ("OPENDIR", FXP_OPENDIR, string(path)),
            ):
                reply_type, reader = self.reply(ptype, fields)
                if reply_type == FXP_HANDLE:
                    handle = reader.string()
                    # The walk may resolve the link's text inside the volume: then it
                    # is an inside file or folder, never the outside one.
                    if ptype == FXP_OPENDIR:
                        names = []
                        while True:
                            kind, r = self.reply(FXP_READDIR, string(handle))
                            if kind != FXP_NAME:
                                break
                            for _ in range(r.uint32()):
                                names.append(r.string())
                                r.string()
                                _skip_attrs(r)
                        self.assertFalse(OUTSIDE_NAMES & set(names), f"{label} {path}: {names}")
                    else:
                        kind, r = self.sftp.read(handle, 0, 4096)
                        if kind == FXP_DATA:
                            self.assertNotIn(SECRET, r.string(), f"{label} {path}")
                    self.sftp.status_of(FXP_CLOSE, string(handle))
                    self.assertTrue(self.walk, f"{label} {path}: openat2 followed a magic link")
            reply_type, reader = self.reply(FXP_SETSTAT, string(path), time_attrs(1_500_000_000))
            if reply_type == FXP_STATUS and reader.uint32() == FX_OK:
                # The walk reads "/" from proc/self/root: the volume root, inside.
                self.assertTrue(self.walk, f"SETSTAT {path}: openat2 followed a magic link")
        self.assertEqual(self.data_of("inside.txt"), b"inside\n")


class BindMountAttacks:
    """
    A host folder and a host file bind-mounted inside the volume (root only),
    as an operator might: never entered, by path or by name, so nothing
    outside changes, whatever request names them.
    """

    def bind(self, source, name):
        if os.geteuid() != 0:
            raise unittest.SkipTest("bind mounts need root (CI runs as root)")
        target = self.volume / name
        if source.is_dir():
            target.mkdir()
        else:
            target.write_bytes(b"")
        result = subprocess.run(["mount", "--bind", str(source), str(target)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise unittest.SkipTest(f"cannot bind-mount here: {result.stderr.strip()}")
        # Before the sentinels are compared (cleanups run last-in first-out).
        self.addCleanup(subprocess.run, ["umount", "-l", str(target)], check=True)

    def test_mounts_are_never_changed(self):
        self.bind(self.outside, "mnt")
        self.bind(self.secret, "mntfile")
        for name in ("mnt", "mntfile", "mnt/secret.txt"):
            for label, ptype, fields in (
                ("lsetstat mode", FXP_EXTENDED, (string("lsetstat@openssh.com"), string(name),
                                                 mode_attrs(0o777))),
                ("lsetstat times", FXP_EXTENDED, (string("lsetstat@openssh.com"), string(name),
                                                  time_attrs(12345))),
                ("SETSTAT mode", FXP_SETSTAT, (string(name), mode_attrs(0o777))),
                ("SETSTAT times", FXP_SETSTAT, (string(name), time_attrs(12345))),
                ("hardlink", FXP_EXTENDED, (string("hardlink@openssh.com"), string(name),
                                            string(f"{self.probe}-{name.replace('/', '-')}"))),
                ("OPEN write", FXP_OPEN, (string(name), uint32(PFLAG_WRITE), attrs())),
                ("REMOVE", FXP_REMOVE, (string(name),)),
            ):
                self.refused(f"{label} {name}", ptype, *fields)
        self.assertEqual(self.data_of("inside.txt"), b"inside\n")


# -- both resolvers --------------------------------------------------------------

_SUITES = (LexicalAttacks, SiblingVolumeAttacks, PlantedLinkAttacks, IdenticalReplyAttacks,
           SpecialFileAttacks, RaceAttacks, MountedProcfsAttacks, BindMountAttacks)

for _suite in _SUITES:
    for _walk, _resolver in ((False, "Openat2"), (True, "Walk")):
        _name = f"{_resolver}{_suite.__name__}Tests"
        globals()[_name] = type(_name, (_suite, AttackTestCase), {"walk": _walk,
                                                                 "__module__": __name__})
del _suite, _walk, _resolver, _name


class AtimeCanaryTests(unittest.TestCase):
    """The sentinel checks rely on reads showing in atime: make sure they do here."""

    def test_a_read_changes_atime_on_this_filesystem(self):
        folder = harness.make_temp_root(self)
        canary = folder / "canary"
        canary.write_bytes(b"canary")
        os.utime(canary, (OLD, OLD))
        canary.read_bytes()
        self.assertNotEqual(os.stat(canary).st_atime, OLD,
                            "this filesystem does not record reads in atime (noatime?)")
