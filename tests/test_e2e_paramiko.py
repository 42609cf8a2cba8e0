"""
End to end with paramiko's SFTPClient: every v3 request a library user reaches, with the
attributes (sizes, modes, owners, times) checked against what is on disk.
"""

import errno
import hashlib
import os
import stat
import time

from twisted.trial import unittest

from tests.harness import (
    ATTR_ACMODTIME,
    ATTR_PERMISSIONS,
    ATTR_SIZE,
    ATTR_UIDGID,
    FX_EOF,
    FX_OK,
    FXP_DATA,
    FXP_HANDLE,
    FXP_MKDIR,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_READDIR,
    FXP_READLINK,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_STATUS,
    PFLAG_CREAT,
    PFLAG_EXCL,
    PFLAG_READ,
    PFLAG_WRITE,
    RawSFTP,
    attrs,
    make_credentials,
    paramiko_sftp,
    paramiko_transport,
    require_paramiko,
    start_service,
    string,
    uint32,
    uint64,
)


def skip_attrs(reader):
    """Step a Reader over one v3 ATTRS block."""
    flags = reader.uint32()
    if flags & ATTR_SIZE:
        reader.uint64()
    if flags & ATTR_UIDGID:
        reader.uint32(), reader.uint32()
    if flags & ATTR_PERMISSIONS:
        reader.uint32()
    if flags & ATTR_ACMODTIME:
        reader.uint32(), reader.uint32()
    if flags & 0x80000000:
        for _ in range(reader.uint32()):
            reader.string(), reader.string()


class ParamikoTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.sftp = paramiko_sftp(self, self.service, self.creds)

    def put_bytes(self, path, data):
        with self.sftp.open(path, "w") as f:
            f.write(data)

    def get_bytes(self, path):
        with self.sftp.open(path, "r") as f:
            return f.read()

    def assertMatchesDisk(self, attributes, host_path, follow=True):
        on_disk = os.stat(host_path, follow_symlinks=follow)
        self.assertEqual(attributes.st_size, on_disk.st_size)
        self.assertEqual(attributes.st_mode, on_disk.st_mode)
        self.assertEqual(attributes.st_uid, on_disk.st_uid)
        self.assertEqual(attributes.st_gid, on_disk.st_gid)
        self.assertEqual(attributes.st_mtime, int(on_disk.st_mtime))
        self.assertEqual(attributes.st_atime, int(on_disk.st_atime))


class PathTests(ParamikoTestCase):
    def test_normalize_dot_is_root(self):
        self.assertEqual(self.sftp.normalize("."), "/")
        self.assertEqual(self.sftp.normalize("/"), "/")
        self.assertEqual(self.sftp.normalize(""), "/")

    def test_normalize_resolves_dot_dot_lexically(self):
        (self.volume / "a" / "b").mkdir(parents=True)
        self.assertEqual(self.sftp.normalize("a/b/.."), "/a")
        self.assertEqual(self.sftp.normalize("/a/./b"), "/a/b")

    def test_chdir_and_relative_paths(self):
        self.sftp.mkdir("work", 0o755)
        self.sftp.chdir("work")
        self.assertEqual(self.sftp.getcwd(), "/work")
        self.put_bytes("rel.txt", b"relative")
        self.assertEqual((self.volume / "work" / "rel.txt").read_bytes(), b"relative")
        self.assertEqual(self.sftp.listdir("."), ["rel.txt"])


class FileTests(ParamikoTestCase):
    def test_write_then_read_and_stat(self):
        self.put_bytes("hello.txt", b"hello\n")
        self.assertEqual((self.volume / "hello.txt").read_bytes(), b"hello\n")
        self.assertEqual(self.get_bytes("hello.txt"), b"hello\n")

        attributes = self.sftp.stat("hello.txt")
        self.assertEqual(attributes.st_mode, stat.S_IFREG | 0o644)
        self.assertLess(abs(attributes.st_mtime - time.time()), 60)
        self.assertMatchesDisk(attributes, self.volume / "hello.txt")
        self.assertMatchesDisk(self.sftp.lstat("hello.txt"), self.volume / "hello.txt")

    def test_new_file_without_mode_is_0644(self):
        self.put_bytes("plain.txt", b"")
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "plain.txt").st_mode), 0o644)

    def test_open_with_permissions_uses_them(self):
        raw = RawSFTP(self, self.service, self.creds)
        raw.request(FXP_OPEN, 1, string("private.txt"), uint32(PFLAG_WRITE | PFLAG_CREAT),
                    attrs(0o600))
        reply = raw.read_reply(1)
        self.assertIsNotNone(reply)
        self.assertEqual(reply[0], FXP_HANDLE)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "private.txt").st_mode), 0o600)

    def test_fstat_of_open_file(self):
        with self.sftp.open("grow.txt", "w") as f:
            f.write(b"12345")
            f.flush()
            self.assertEqual(f.stat().st_size, 5)

    def test_open_modes(self):
        self.put_bytes("f.txt", b"first")
        self.put_bytes("f.txt", b"2nd")  # 'w' truncates
        self.assertEqual((self.volume / "f.txt").read_bytes(), b"2nd")

        with self.sftp.open("f.txt", "a") as f:
            f.write(b"+more")
        self.assertEqual((self.volume / "f.txt").read_bytes(), b"2nd+more")

        self.sftp.open("empty.txt", "x").close()
        self.assertEqual((self.volume / "empty.txt").read_bytes(), b"")
        with self.sftp.open("new.txt", "wx") as f:
            f.write(b"exclusive")
        self.assertEqual((self.volume / "new.txt").read_bytes(), b"exclusive")

        for mode in ("x", "wx"):
            with self.assertRaises(IOError):
                self.sftp.open("new.txt", mode)
        self.assertEqual((self.volume / "new.txt").read_bytes(), b"exclusive")

        with self.sftp.open("f.txt", "r+") as f:
            f.seek(1)
            f.write(b"N")
        self.assertEqual((self.volume / "f.txt").read_bytes(), b"2Nd+more")

    def test_append_mode_on_missing_file_creates_it(self):
        with self.sftp.open("log.txt", "a") as f:
            f.write(b"line\n")
        self.assertEqual((self.volume / "log.txt").read_bytes(), b"line\n")

    def test_seek_and_partial_read(self):
        data = bytes(range(256)) * 400
        (self.volume / "data.bin").write_bytes(data)
        with self.sftp.open("data.bin", "r") as f:
            f.seek(5000)
            self.assertEqual(f.read(100), data[5000:5100])
            f.seek(len(data) - 10)
            self.assertEqual(f.read(100), data[-10:])
            self.assertEqual(f.read(100), b"")
            chunks = list(f.readv([(0, 10), (70000, 300), (102390, 10)]))
        self.assertEqual(chunks, [data[:10], data[70000:70300], data[102390:102400]])

    def test_put_and_get_a_multi_mebibyte_file(self):
        data = os.urandom(5 * 1024 * 1024 + 17)
        local = self.service.root / "local.bin"
        local.write_bytes(data)
        self.sftp.put(str(local), "/big.bin")
        self.assertEqual(
            hashlib.sha256((self.volume / "big.bin").read_bytes()).digest(),
            hashlib.sha256(data).digest(),
        )
        back = self.service.root / "back.bin"
        self.sftp.get("/big.bin", str(back))
        self.assertEqual(back.read_bytes(), data)

    def test_oversized_read_is_answered_with_capped_data(self):
        data = os.urandom(600_000)
        (self.volume / "r.bin").write_bytes(data)
        raw = RawSFTP(self, self.service, self.creds)
        raw.request(FXP_OPEN, 1, string("r.bin"), uint32(PFLAG_READ), attrs())
        ptype, reader = raw.read_reply(1)
        self.assertEqual(ptype, FXP_HANDLE)
        handle = reader.string()
        raw.request(FXP_READ, 2, string(handle), uint64(0), uint32(1_000_000))
        ptype, reader = raw.read_reply(2)
        self.assertEqual(ptype, FXP_DATA)
        chunk = reader.string()
        self.assertTrue(0 < len(chunk) <= 261120, len(chunk))
        self.assertEqual(chunk, data[: len(chunk)])
        raw.request(FXP_READ, 3, string(handle), uint64(len(data)), uint32(10))
        self.assertEqual(raw.status(3)[0], FX_EOF)

    def test_chmod_utime_truncate(self):
        self.put_bytes("meta.txt", b"0123456789")
        self.sftp.chmod("meta.txt", 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "meta.txt").st_mode), 0o600)

        self.sftp.utime("meta.txt", (1_100_000_000, 1_000_000_000))
        on_disk = os.stat(self.volume / "meta.txt")
        self.assertEqual(int(on_disk.st_mtime), 1_000_000_000)
        self.assertEqual(int(on_disk.st_atime), 1_100_000_000)
        self.assertEqual(self.sftp.stat("meta.txt").st_mtime, 1_000_000_000)

        self.sftp.truncate("meta.txt", 3)
        self.assertEqual((self.volume / "meta.txt").read_bytes(), b"012")
        self.sftp.truncate("meta.txt", 5)
        self.assertEqual((self.volume / "meta.txt").read_bytes(), b"012\0\0")

    def test_fsetstat_on_open_file(self):
        with self.sftp.open("h.txt", "w") as f:
            f.write(b"abcdef")
            f.flush()
            f.truncate(2)
            f.chmod(0o640)
            f.utime((1_000_000_000, 1_000_000_000))
        on_disk = os.stat(self.volume / "h.txt")
        self.assertEqual(stat.S_IMODE(on_disk.st_mode), 0o640)
        self.assertEqual(int(on_disk.st_mtime), 1_000_000_000)
        self.assertEqual(on_disk.st_size, 2)

    def test_rename_and_remove(self):
        self.put_bytes("old.txt", b"o")
        self.sftp.rename("old.txt", "new.txt")
        self.assertFalse((self.volume / "old.txt").exists())
        self.assertEqual((self.volume / "new.txt").read_bytes(), b"o")
        self.sftp.remove("new.txt")
        self.assertEqual(os.listdir(self.volume), [])


class DirectoryTests(ParamikoTestCase):
    def test_mkdir_with_mode_and_rmdir(self):
        self.sftp.mkdir("private", mode=0o700)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "private").st_mode), 0o700)
        self.sftp.mkdir("public", mode=0o755)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "public").st_mode), 0o755)
        self.sftp.rmdir("private")
        self.sftp.rmdir("public")
        self.assertEqual(os.listdir(self.volume), [])

    def test_mkdir_without_permissions_is_0755(self):
        raw = RawSFTP(self, self.service, self.creds)
        raw.request(FXP_MKDIR, 1, string("plain-dir"), attrs())
        self.assertEqual(raw.status(1)[0], FX_OK)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "plain-dir").st_mode), 0o755)

    def test_readdir_replies_are_bounded_and_lose_nothing(self):
        # 900 short names and 300 of 240 bytes: the short ones fill replies
        # by count (500), the long ones by size (64 KiB).
        expected = [f"entry-{i:04d}" for i in range(900)]
        expected += [f"long-{i:03d}-" + "n" * 231 for i in range(300)]
        for name in expected:
            (self.volume / name).write_bytes(b"")
        raw = RawSFTP(self, self.service, self.creds)
        raw.request(FXP_OPENDIR, 1, string("/"))
        ptype, reader = raw.read_reply(1)
        self.assertEqual(ptype, FXP_HANDLE)
        handle = reader.string()
        names, counts, request_id = [], [], 2
        while True:
            raw.request(FXP_READDIR, request_id, string(handle))
            ptype, reader = raw.read_reply(request_id)
            if ptype == FXP_STATUS:
                self.assertEqual(reader.uint32(), FX_EOF)
                break
            self.assertEqual(ptype, FXP_NAME)
            count = reader.uint32()
            self.assertTrue(1 <= count <= 500, count)
            start = reader.pos
            for _ in range(count):
                names.append(reader.string().decode())
                reader.string()  # longname
                skip_attrs(reader)
            self.assertLessEqual(reader.pos - start, 64 * 1024)
            counts.append(count)
            request_id += 1
        self.assertEqual(sorted(n for n in names if n not in (".", "..")), sorted(expected))
        self.assertEqual(len(names), len(set(names)))
        self.assertLess(len(counts), 12, counts)  # not 100 at a time

    def test_mkdir_of_existing_name_fails(self):
        self.sftp.mkdir("twice", 0o755)
        with self.assertRaises(IOError):
            self.sftp.mkdir("twice", 0o755)

    def test_listdir_attr_reports_sizes_modes_and_times(self):
        (self.volume / "small.txt").write_bytes(b"x" * 10)
        (self.volume / "big.txt").write_bytes(b"y" * 70000)
        (self.volume / "dir").mkdir(mode=0o711)
        (self.volume / "dir").chmod(0o711)
        os.utime(self.volume / "small.txt", (1_000_000_000, 1_000_000_000))
        os.symlink("small.txt", self.volume / "link")

        entries = {a.filename: a for a in self.sftp.listdir_attr("/")}
        self.assertEqual(sorted(entries), ["big.txt", "dir", "link", "small.txt"])
        for name in ("small.txt", "big.txt", "dir"):
            self.assertMatchesDisk(entries[name], self.volume / name)
        self.assertEqual(entries["small.txt"].st_size, 10)
        self.assertEqual(entries["small.txt"].st_mtime, 1_000_000_000)
        self.assertEqual(entries["big.txt"].st_size, 70000)
        self.assertEqual(entries["dir"].st_mode, stat.S_IFDIR | 0o711)
        # A directory listing describes the entries themselves: a link is a link.
        self.assertTrue(stat.S_ISLNK(entries["link"].st_mode))
        self.assertTrue(entries["small.txt"].longname.startswith("-rw-r--r--"))
        self.assertTrue(entries["dir"].longname.startswith("drwx--x--x"))
        self.assertTrue(entries["small.txt"].longname.endswith("small.txt"))

    def test_listdir_of_many_entries(self):
        # More than one READDIR reply's worth, with long names.
        names = sorted(f"{i:04d}-" + "n" * 200 for i in range(350))
        for name in names:
            (self.volume / name).write_bytes(b"")
        self.assertEqual(sorted(self.sftp.listdir("/")), names)

    def test_listdir_of_empty_directory(self):
        self.assertEqual(self.sftp.listdir("/"), [])

    def test_rmdir_of_non_empty_directory_fails(self):
        self.sftp.mkdir("full", 0o755)
        self.put_bytes("full/keep.txt", b"keep")
        with self.assertRaises(IOError):
            self.sftp.rmdir("full")
        self.assertEqual((self.volume / "full" / "keep.txt").read_bytes(), b"keep")

    def test_remove_of_a_directory_fails(self):
        self.sftp.mkdir("adir", 0o755)
        with self.assertRaises(IOError):
            self.sftp.remove("adir")
        self.assertTrue((self.volume / "adir").is_dir())

    def test_rmdir_of_a_file_fails(self):
        self.put_bytes("afile", b"")
        with self.assertRaises(IOError):
            self.sftp.rmdir("afile")
        self.assertTrue((self.volume / "afile").is_file())


class StatusCodeTests(ParamikoTestCase):
    def test_only_v3_status_codes(self):
        # v3 has codes 0-8 only; "already exists" (11 in later drafts) must be FAILURE (4).
        (self.volume / "exists").mkdir()
        (self.volume / "exists.txt").write_bytes(b"")
        raw = RawSFTP(self, self.service, self.creds)
        raw.request(FXP_MKDIR, 1, string("exists"), attrs())
        raw.request(FXP_OPEN, 2, string("exists.txt"),
                    uint32(PFLAG_WRITE | PFLAG_CREAT | PFLAG_EXCL), attrs())
        raw.request(FXP_RMDIR, 3, string("exists.txt"))
        raw.request(FXP_OPENDIR, 4, string("exists.txt"))
        raw.request(FXP_REMOVE, 5, string("exists"))
        raw.request(FXP_RENAME, 6, string("exists.txt"), string("exists"))
        raw.request(FXP_READLINK, 7, string("exists.txt"))
        for request_id in range(1, 8):
            code, message = raw.status(request_id)
            self.assertIn(code, range(2, 9), f"request {request_id}: code {code} {message!r}")


class NameTests(ParamikoTestCase):
    def test_unicode_and_odd_names_round_trip(self):
        names = ["h\u00e9llo w\u00f6rld \u2713.txt", "spaces  and\ttab", "new\nline",
                 "-dash", ".hidden", "a" * 255, "\u65e5\u672c\u8a9e"]
        for name in names:
            self.put_bytes(name, name.encode())
            self.assertEqual((self.volume / name).read_bytes(), name.encode())
        self.assertEqual(sorted(self.sftp.listdir("/")), sorted(names))
        self.assertEqual(sorted(os.listdir(self.volume)), sorted(names))
        with self.assertRaises(IOError):
            self.put_bytes("a" * 256, b"too long for the file system")


class SymlinkTests(ParamikoTestCase):
    def test_symlink_readlink_lstat(self):
        self.put_bytes("target.txt", b"target data")
        self.sftp.symlink("target.txt", "link")  # OpenSSH order: target, then link path
        self.assertEqual(os.readlink(self.volume / "link"), "target.txt")
        self.assertEqual(self.sftp.readlink("link"), "target.txt")

        self.assertTrue(stat.S_ISLNK(self.sftp.lstat("link").st_mode))
        self.assertMatchesDisk(self.sftp.lstat("link"), self.volume / "link", follow=False)
        self.assertEqual(self.sftp.stat("link").st_size, len(b"target data"))
        self.assertEqual(self.get_bytes("link"), b"target data")

    def test_symlink_target_text_is_verbatim(self):
        for target in ("/abs/target", "../../up", "a//b/./c", "dangling"):
            name = "l" + str(abs(hash(target)))
            self.sftp.symlink(target, name)
            self.assertEqual(os.readlink(self.volume / name), target)
            self.assertEqual(self.sftp.readlink(name), target)

    def test_absolute_link_target_is_inside_the_volume(self):
        (self.volume / "d").mkdir()
        (self.volume / "d" / "f.txt").write_bytes(b"inside")
        self.sftp.symlink("/d/f.txt", "abs")
        self.assertEqual(self.get_bytes("abs"), b"inside")

    def test_remove_a_link_keeps_its_target(self):
        self.put_bytes("t.txt", b"t")
        self.sftp.symlink("t.txt", "link")
        self.sftp.remove("link")
        self.assertFalse(os.path.lexists(self.volume / "link"))
        self.assertEqual((self.volume / "t.txt").read_bytes(), b"t")

    def test_readlink_of_a_regular_file_fails(self):
        self.put_bytes("plain", b"")
        with self.assertRaises(IOError):
            self.sftp.readlink("plain")


class ErrorTests(ParamikoTestCase):
    def test_missing_file_is_enoent(self):
        for call in (
            lambda: self.sftp.open("missing.txt", "r"),
            lambda: self.sftp.stat("missing.txt"),
            lambda: self.sftp.lstat("missing.txt"),
            lambda: self.sftp.remove("missing.txt"),
            lambda: self.sftp.listdir("missing-dir"),
            lambda: self.sftp.rename("missing.txt", "other.txt"),
            lambda: self.sftp.chmod("missing.txt", 0o600),
            lambda: self.sftp.open("missing-dir/new.txt", "w"),
        ):
            with self.assertRaises(FileNotFoundError) as caught:
                call()
            self.assertEqual(caught.exception.errno, errno.ENOENT)

    def test_opening_a_directory_for_writing_fails(self):
        self.sftp.mkdir("d", 0o755)
        with self.assertRaises(IOError):
            self.sftp.open("d", "w")

    def test_errors_leave_the_session_usable(self):
        with self.assertRaises(IOError):
            self.sftp.stat("nope")
        self.put_bytes("after.txt", b"still working")
        self.assertEqual(self.get_bytes("after.txt"), b"still working")


class AuthenticationTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")

    def test_wrong_password_is_refused(self):
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "demo", self.creds["password"] + "x")

    def test_overlong_password_is_a_plain_failure(self):
        # bcrypt only looks at 72 bytes: a longer password must fail, not crash or match.
        long_creds = make_credentials(self.service, "long", password="p" * 72)
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "long", "p" * 72 + "extra")
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "demo", "x" * 5000)
        paramiko_sftp(self, self.service, long_creds).listdir("/")

    def test_odd_usernames_are_plain_failures(self):
        # Five unknown users score 10 with the brute-force defender (bans at 15): still served.
        for username in ("../demo", "", "x" * 2000, "d\u00e9mo", "demo\x00"):
            with self.assertRaises(self.paramiko.AuthenticationException):
                paramiko_transport(self, self.service, username, self.creds["password"])
        paramiko_sftp(self, self.service, self.creds).listdir("/")

    def test_unknown_user_is_refused(self):
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "nobody-here", self.creds["password"])

    def test_custom_username_and_password(self):
        creds = make_credentials(
            self.service, "web-1", username="alice", password="correct horse battery"
        )
        self.assertEqual(creds["username"], "alice")
        sftp = paramiko_sftp(self, self.service, creds)
        sftp.open("hi.txt", "w").close()
        self.assertTrue((self.service.volume("web-1") / "hi.txt").is_file())
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "web-1", "correct horse battery")

    def test_each_container_sees_only_its_volume(self):
        other = make_credentials(self.service, "other")
        (self.service.volume("demo") / "mine.txt").write_bytes(b"demo's")
        (self.service.volume("other") / "theirs.txt").write_bytes(b"other's")
        self.assertEqual(paramiko_sftp(self, self.service, self.creds).listdir("/"), ["mine.txt"])
        self.assertEqual(paramiko_sftp(self, self.service, other).listdir("/"), ["theirs.txt"])

    def test_concurrent_sessions_of_one_user(self):
        sessions = [paramiko_sftp(self, self.service, self.creds) for _ in range(4)]
        files = [s.open(f"f{i}.bin", "w") for i, s in enumerate(sessions)]
        blocks = [os.urandom(40_000) for _ in sessions]
        for _ in range(5):
            for f, block in zip(files, blocks):
                f.write(block)
        for f in files:
            f.close()
        for i, block in enumerate(blocks):
            self.assertEqual((self.service.volume("demo") / f"f{i}.bin").read_bytes(), block * 5)

    def test_regenerated_password_replaces_the_old_one(self):
        new = make_credentials(self.service, "demo")
        self.assertNotEqual(new["password"], self.creds["password"])
        with self.assertRaises(self.paramiko.AuthenticationException):
            paramiko_transport(self, self.service, "demo", self.creds["password"])
        paramiko_sftp(self, self.service, new).listdir("/")
