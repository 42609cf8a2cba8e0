"""
End to end with the OpenSSH clients a user actually types: ``sftp`` in batch mode and ``scp``
(which speaks SFTP since OpenSSH 9.0). Each test checks what the user sees and what lands on disk.
"""

import hashlib
import os
import re
import stat
import struct
import time

from twisted.trial import unittest

from tests.harness import make_credentials, require_binary, run_scp, run_sftp, start_service

OLD_MTIME = 1_000_000_000  # 2001-09-09, far from "now" so a lost mtime cannot pass by accident


class OpenSSHTestCase(unittest.TestCase):
    timeout = 300

    def setUp(self):
        require_binary("sftp")
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.local = self.service.root / "local"
        self.local.mkdir()

    def sftp(self, *lines, **kwargs):
        """Run a batch that must fully succeed; returns its stdout."""
        rc, out, err = run_sftp(self.service, self.creds, list(lines), cwd=self.local, **kwargs)
        self.assertEqual(rc, 0, f"sftp batch failed\nstdout:\n{out}\nstderr:\n{err}")
        return out

    @staticmethod
    def listing_lines(out, name_pattern):
        """Lines of ``ls -l`` output for one name (not the echoed "sftp> ..." commands)."""
        return [
            line for line in out.splitlines()
            if not line.startswith("sftp>") and re.search(rf"\s{name_pattern}$", line)
        ]

    def local_file(self, name, data, mode=0o644, mtime=None):
        path = self.local / name
        path.write_bytes(data)
        path.chmod(mode)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path


class BatchCommandsTests(OpenSSHTestCase):
    def test_credentials_point_at_the_volume(self):
        self.assertEqual(self.creds["username"], "demo")
        self.assertEqual(self.creds["volume_path"], "/")
        self.assertTrue(self.volume.is_dir())

    def test_put_get_and_ls_long(self):
        self.local_file("hello.txt", b"hello, volume\n")
        out = self.sftp("put hello.txt", "ls -l", "get hello.txt fetched.txt", "pwd")
        self.assertEqual((self.volume / "hello.txt").read_bytes(), b"hello, volume\n")
        self.assertEqual((self.local / "fetched.txt").read_bytes(), b"hello, volume\n")
        self.assertIn("Remote working directory: /", out)
        listing = self.listing_lines(out, "hello.txt")
        self.assertEqual(len(listing), 1, out)
        # The link count is "?" when OpenSSH formats the line itself (it does once the server
        # offers users-groups-by-id@openssh.com), a number when it shows the server's longname.
        self.assertRegex(
            listing[0],
            r"^-rw-r--r--\s+(\d+|\?)\s+\S+\s+\S+\s+14\s+\w{3}\s+\d+\s+[\d:]+\s+hello\.txt$",
        )

    def test_ls_long_shows_directories_and_links(self):
        (self.volume / "sub").mkdir()
        (self.volume / "sub").chmod(0o750)
        os.symlink("sub", self.volume / "link")
        out = self.sftp("ls -l")
        sub = self.listing_lines(out, "sub")
        link = self.listing_lines(out, r"link( -> sub)?")
        self.assertEqual(len(sub), 1, out)
        self.assertTrue(sub[0].startswith("drwxr-x---"), sub[0])
        self.assertEqual(len(link), 1, out)
        self.assertTrue(link[0].startswith("l"), link[0])

    def test_mkdir_rename_rm_rmdir(self):
        self.local_file("a.txt", b"A" * 1000)
        self.sftp("mkdir d", "put a.txt d/a.txt", "rename d/a.txt d/b.txt", "mkdir d/empty")
        self.assertTrue((self.volume / "d").is_dir())
        self.assertFalse((self.volume / "d" / "a.txt").exists())
        self.assertEqual((self.volume / "d" / "b.txt").read_bytes(), b"A" * 1000)
        self.assertTrue((self.volume / "d" / "empty").is_dir())

        self.sftp("rmdir d/empty", "rm d/b.txt", "rmdir d")
        self.assertEqual(os.listdir(self.volume), [])

    def test_rmdir_of_non_empty_directory_fails(self):
        (self.volume / "full").mkdir()
        (self.volume / "full" / "keep.txt").write_bytes(b"keep")
        rc, out, err = run_sftp(self.service, self.creds, ["rmdir full"])
        self.assertNotEqual(rc, 0, out)
        self.assertEqual((self.volume / "full" / "keep.txt").read_bytes(), b"keep")

    def test_put_into_a_folder_that_is_a_file_fails(self):
        # "put a.txt dest/" where dest is a file: OpenSSH's server refuses,
        # and so must this one, leaving the file as it was.
        self.local_file("a.txt", b"new content")
        (self.volume / "dest").write_bytes(b"precious")
        for command in ("put a.txt dest/", "put a.txt newdir/"):
            rc, out, err = run_sftp(self.service, self.creds, [command], cwd=self.local)
            self.assertNotEqual(rc, 0, command)
        self.assertEqual((self.volume / "dest").read_bytes(), b"precious")
        self.assertFalse((self.volume / "newdir").exists())
        rc, out, err = run_scp(self.service, self.creds, str(self.local / "a.txt"), ":dest/")
        self.assertNotEqual(rc, 0)
        self.assertEqual((self.volume / "dest").read_bytes(), b"precious")

    def test_get_of_missing_file_fails(self):
        rc, out, err = run_sftp(self.service, self.creds, ["get nothing-here.txt"], cwd=self.local)
        self.assertNotEqual(rc, 0)
        self.assertIn("not found", err.lower() + out.lower())
        self.assertFalse((self.local / "nothing-here.txt").exists())

    def test_chmod(self):
        self.local_file("f.txt", b"x")
        self.sftp("put f.txt", "mkdir d", "chmod 600 f.txt", "chmod 700 d")
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "f.txt").st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "d").st_mode), 0o700)
        self.assertTrue(stat.S_ISREG(os.stat(self.volume / "f.txt").st_mode))
        self.sftp("chmod 640 f.txt")
        self.assertEqual(stat.S_IMODE(os.stat(self.volume / "f.txt").st_mode), 0o640)

    def test_symlink_stores_target_verbatim(self):
        self.local_file("target.txt", b"through the link\n")
        self.sftp(
            "mkdir d",
            "put target.txt d/target.txt",
            "ln -s d/target.txt rel-link",
            "ln -s /d/target.txt abs-link",
            "ln -s ../../nowhere/../x dotted-link",
            "get rel-link via-rel.txt",
            "get abs-link via-abs.txt",
        )
        self.assertEqual(os.readlink(self.volume / "rel-link"), "d/target.txt")
        self.assertEqual(os.readlink(self.volume / "abs-link"), "/d/target.txt")
        self.assertEqual(os.readlink(self.volume / "dotted-link"), "../../nowhere/../x")
        # An absolute target means "from the volume root" (chroot semantics).
        self.assertEqual((self.local / "via-rel.txt").read_bytes(), b"through the link\n")
        self.assertEqual((self.local / "via-abs.txt").read_bytes(), b"through the link\n")

    def test_cd_and_relative_paths(self):
        self.local_file("one.txt", b"1")
        out = self.sftp(
            "mkdir top",
            "cd top",
            "mkdir inner",
            "cd inner",
            "pwd",
            "put one.txt",
            "rename one.txt two.txt",
            "cd ..",
            "pwd",
            "get inner/two.txt back.txt",
            "cd /",
            "ls top/inner",
        )
        self.assertIn("Remote working directory: /top/inner", out)
        self.assertIn("Remote working directory: /top", out)
        self.assertEqual((self.volume / "top" / "inner" / "two.txt").read_bytes(), b"1")
        self.assertEqual((self.local / "back.txt").read_bytes(), b"1")

    def test_cd_into_missing_directory_fails(self):
        rc, out, err = run_sftp(self.service, self.creds, ["cd no-such-dir"])
        self.assertNotEqual(rc, 0)

    def test_put_p_and_get_p_keep_mtime_and_mode(self):
        self.local_file("old.txt", b"from 2001\n", mode=0o640, mtime=OLD_MTIME)
        self.sftp("put -p old.txt kept.txt", "put old.txt fresh.txt", "get -p kept.txt back.txt")

        on_disk = os.stat(self.volume / "kept.txt")
        self.assertEqual(int(on_disk.st_mtime), OLD_MTIME)
        self.assertEqual(stat.S_IMODE(on_disk.st_mode), 0o640)
        # Without -p the server sets the time itself.
        self.assertGreater(os.stat(self.volume / "fresh.txt").st_mtime, time.time() - 3600)

        back = os.stat(self.local / "back.txt")
        self.assertEqual(int(back.st_mtime), OLD_MTIME)
        self.assertEqual((self.local / "back.txt").read_bytes(), b"from 2001\n")


    def test_reput_and_reget_resume_transfers(self):
        data = os.urandom(200_000)
        self.local_file("resume.bin", data)
        (self.volume / "resume.bin").write_bytes(data[:70_000])
        (self.local / "partial.bin").write_bytes(data[:123_457])
        (self.volume / "partial.bin").write_bytes(data)
        self.sftp("reput resume.bin", "reget partial.bin")
        self.assertEqual((self.volume / "resume.bin").read_bytes(), data)
        self.assertEqual((self.local / "partial.bin").read_bytes(), data)

    def test_unicode_names(self):
        name = "r\u00e9sum\u00e9 \u2713.txt"
        self.local_file(name, b"unicode\n")
        out = self.sftp(f'put "{name}"', "ls", f'get "{name}" back.txt')
        self.assertEqual((self.volume / name).read_bytes(), b"unicode\n")
        self.assertEqual((self.local / "back.txt").read_bytes(), b"unicode\n")
        self.assertIn(name, out)


class SCPTests(OpenSSHTestCase):
    def setUp(self):
        require_binary("scp")
        super().setUp()

    def test_scp_put_and_get(self):
        source = self.local_file("up.bin", os.urandom(300_000))
        rc, out, err = run_scp(self.service, self.creds, str(source), ":/up.bin")
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.volume / "up.bin").read_bytes(), source.read_bytes())

        download = self.local / "down.bin"
        rc, out, err = run_scp(self.service, self.creds, ":/up.bin", str(download))
        self.assertEqual(rc, 0, err)
        self.assertEqual(download.read_bytes(), source.read_bytes())

    def test_scp_p_keeps_mtime(self):
        source = self.local_file("old.txt", b"old\n", mtime=OLD_MTIME)
        rc, out, err = run_scp(self.service, self.creds, str(source), ":/old.txt", options=["-p"])
        self.assertEqual(rc, 0, err)
        self.assertEqual(int(os.stat(self.volume / "old.txt").st_mtime), OLD_MTIME)

    def test_scp_recursive_directory(self):
        tree = self.local / "tree"
        (tree / "nested").mkdir(parents=True)
        (tree / "a.txt").write_bytes(b"a")
        (tree / "nested" / "b.txt").write_bytes(b"b")
        rc, out, err = run_scp(self.service, self.creds, str(tree), ":/", options=["-r"])
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.volume / "tree" / "a.txt").read_bytes(), b"a")
        self.assertEqual((self.volume / "tree" / "nested" / "b.txt").read_bytes(), b"b")

    def test_scp_wrong_password_fails(self):
        source = self.local_file("x.txt", b"x")
        wrong = dict(self.creds, password="not-the-password")
        rc, out, err = run_scp(self.service, wrong, str(source), ":/x.txt")
        self.assertNotEqual(rc, 0)
        self.assertIn("Permission denied", err)
        self.assertFalse((self.volume / "x.txt").exists())


class LargeFileTests(OpenSSHTestCase):
    timeout = 1800
    SIZE_MIB = 1024

    def write_big_file(self, path):
        """SIZE_MIB MiB of incompressible data, each MiB distinct; returns its sha256."""
        digest = hashlib.sha256()
        block = bytearray(os.urandom(1 << 20))
        with open(path, "wb") as f:
            for index in range(self.SIZE_MIB):
                block[:8] = struct.pack(">Q", index)
                f.write(block)
                digest.update(block)
        return digest.hexdigest()

    @staticmethod
    def sha256_of(path):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def test_one_gib_round_trip(self):
        source = self.local / "big.bin"
        download = self.local / "big.back"
        remote = self.volume / "big.bin"
        for path in (source, download, remote):
            self.addCleanup(lambda p=path: p.unlink(missing_ok=True))
        expected = self.write_big_file(source)

        self.sftp("put big.bin", "get big.bin big.back", timeout=1200)

        self.assertEqual(os.stat(remote).st_size, self.SIZE_MIB << 20)
        self.assertEqual(self.sha256_of(remote), expected)
        self.assertEqual(self.sha256_of(download), expected)
