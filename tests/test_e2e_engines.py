"""
The SSH engines under the clients users name first, each driven as its client drives it, against
the real service: PuTTY's psftp and pscp (the SSH code of WinSCP and FileZilla), FileZilla's own
``fzsftp`` through its stdin protocol, Node.js's ``ssh2`` with ``ssh2-sftp-client`` (VS Code's SFTP
extensions), curl's ``sftp://`` (libssh2), libssh (KDE's kio-sftp) and GNOME's gio/gvfs.

For each: a password login with the host key checked (the right key is accepted, a wrong one
refused where the client can be told the key), a listing with attributes, 20 MiB up and down with
the bytes compared, resuming both ways where the client can, mkdir/rename/delete/chmod/mtime,
names with spaces and non-ASCII letters, a folder of 1,000 entries listed whole, symlinks where the
client makes them, and no way out of the volume (``..``, absolute paths, a planted link to the
outside; a sentinel file outside stays untouched).

A missing client skips its tests with the reason; CI (.ci/run) installs them all and fails on a skip.
"""

import base64
import ctypes
import ctypes.util
import hashlib
import json
import mmap
import os
import select
import shutil
import stat
import subprocess
import tempfile
import time
import unittest as pyunittest
import urllib.parse
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from tests.harness import (CLIENT_TIMEOUT, HOST, REPO_ROOT, make_credentials, require_binary,
                           start_service, write_config)

BIG = 20 * 1024 * 1024
OLD_MTIME = 1_000_000_000  # 2001-09-09T01:46:40Z
FOLDER_ENTRIES = 1000
# Names a user types: spaces and letters outside ASCII, in a folder and in a file.
SPACED_DIR = "dossier été"
SPACED_FILE = "naïve file ü.txt"
WRONG_FINGERPRINT = "SHA256:" + base64.b64encode(b"\x00" * 32).decode().rstrip("=")
# Where .ci/run installs the npm packages (ssh2, ssh2-sftp-client); LIGHTD_NODE_MODULES overrides.
NODE_MODULES = Path(os.environ.get("LIGHTD_NODE_MODULES", REPO_ROOT / "tests" / "node" / "node_modules"))


def run(argv, env=None, cwd=None, stdin=None, timeout=CLIENT_TIMEOUT):
    try:
        result = subprocess.run(
            argv, env=env, cwd=cwd, input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True, text=True, timeout=timeout, start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{argv[0]} did not finish within {timeout}s\n{e.stdout}\n{e.stderr}")
    return result.returncode, result.stdout, result.stderr


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class EngineTestCase(unittest.TestCase):
    """
    A fresh service and container per test, a local folder for the client's side, a home folder
    for the client's own state (so nothing of the machine's user leaks in), and a sentinel file
    outside the volume.
    """

    timeout = 600

    def setUp(self):
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.user, self.password = self.creds["username"], self.creds["password"]
        self.port = self.service.port
        self.volume = self.service.volume("demo")
        self.local = self.service.root / "local"
        self.local.mkdir()
        self.home = self.service.root / "home"
        self.home.mkdir()
        self.env = dict(os.environ, HOME=str(self.home))
        self.outside = Path(tempfile.mkdtemp(prefix="lightd-outside-"))
        self.addCleanup(shutil.rmtree, self.outside, ignore_errors=True)
        self.sentinel = self.outside / "secret"
        self.sentinel.write_bytes(b"host secret")
        # Cleanups run last-in first-out: this check runs before the folder goes.
        self.addCleanup(self.assertSentinelUntouched)
        # A link planted in the volume (by the container, say) that names the outside folder.
        os.symlink(self.outside, self.volume / "out")
        key = serialization.load_ssh_private_key(self.service.host_key_path.read_bytes(), None)
        self.host_key_line = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        blob = base64.b64decode(self.host_key_line.split()[1])
        self.fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        self.pwfile = self.service.client_dir / "password"
        self.pwfile.write_text(self.password + "\n")
        self.pwfile.chmod(0o600)

    # --- what the tests plant and check ---

    def assertSentinelUntouched(self):
        self.assertEqual(self.sentinel.read_bytes(), b"host secret")
        self.assertEqual(sorted(p.name for p in self.outside.iterdir()), ["secret"])

    def big_local(self, name="big.bin"):
        path = self.local / name
        path.write_bytes(os.urandom(BIG))
        return path

    def big_volume(self, name="big.bin"):
        path = self.volume / name
        path.write_bytes(os.urandom(BIG))
        return path

    def partial_copy(self, source, target, size):
        with open(source, "rb") as f:
            Path(target).write_bytes(f.read(size))
        return Path(target)

    def assertSameBytes(self, a, b):
        self.assertEqual(os.path.getsize(a), os.path.getsize(b), f"{a} and {b} differ in size")
        self.assertEqual(sha256(a), sha256(b), f"{a} and {b} differ")

    def listed_file(self, name="listed.txt", size=1234, mode=0o640, mtime=OLD_MTIME):
        """A file whose attributes a listing must show: its size, its mode and a 2001 mtime."""
        path = self.volume / name
        path.write_bytes(b"x" * size)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
        return path

    def big_folder(self, name="many"):
        folder = self.volume / name
        folder.mkdir()
        names = [f"entry-{i:04d}" for i in range(FOLDER_ENTRIES)]
        for entry in names:
            (folder / entry).write_bytes(b"")
        return names

    def tree_fixture(self):
        """What the tree operations start from: a file to delete and an empty folder to remove."""
        (self.volume / "doomed.txt").write_bytes(b"bye")
        (self.volume / "empty").mkdir()
        small = self.local / SPACED_FILE
        small.write_bytes(b"small file\n")
        return small

    def assertTreeResult(self, chmod=True, mtime=True):
        """After: SPACED_DIR/renamed ü.txt (0640, 2001 mtime) exists, the originals are gone."""
        renamed = self.volume / SPACED_DIR / "renamed ü.txt"
        self.assertEqual(renamed.read_bytes(), b"small file\n")
        self.assertFalse((self.volume / SPACED_DIR / SPACED_FILE).exists())
        self.assertFalse((self.volume / "doomed.txt").exists())
        self.assertFalse((self.volume / "empty").exists())
        st = renamed.stat()
        if chmod:
            self.assertEqual(stat.S_IMODE(st.st_mode), 0o640)
        if mtime:
            self.assertEqual(int(st.st_mtime), OLD_MTIME)

    def assertLongnameShows(self, text, name="listed.txt"):
        """An ``ls -l`` line of listed_file: its mode, size, date and name."""
        lines = [line for line in text.splitlines() if line.rstrip().endswith(name)]
        self.assertEqual(len(lines), 1, text)
        self.assertTrue(lines[0].startswith("-rw-r-----"), lines[0])
        self.assertIn(" 1234 ", lines[0])
        self.assertIn("Sep  9  2001", lines[0])

    def assertConfinedResult(self):
        """After the escape attempts: nothing read, and an upload to ``../..`` landed in the volume."""
        self.assertSentinelUntouched()
        # Some clients create the local file before the server refuses: it must stay empty.
        for name in ("stolen", "passwd"):
            path = self.local / name
            self.assertFalse(path.exists() and path.stat().st_size, f"{name} got bytes")
        self.assertEqual((self.volume / "escaped.txt").read_bytes(), b"stay inside\n")


# --- PuTTY: psftp and pscp ----------------------------------------------------------------------


class PuTTYTests(EngineTestCase):
    """
    PuTTY 0.78's psftp and pscp: the SSH and SFTP code that WinSCP (with its own SFTP layer on
    top) and FileZilla (fzsftp) are built on. Neither has a command that makes links.
    """

    def setUp(self):
        self.psftp_path = require_binary("psftp")
        self.pscp_path = require_binary("pscp")
        super().setUp()

    def putty_options(self, fingerprint=None):
        # -hostkey pins the key (anything else is fatal under -batch); HOME keeps PuTTY's own
        # host key cache out of it.
        return ["-batch", "-P", str(self.port), "-l", self.user, "-pwfile", str(self.pwfile),
                "-hostkey", fingerprint or self.fingerprint]

    def psftp(self, *lines, fingerprint=None, keep_going=False):
        batch = self.service.client_dir / f"psftp-{time.monotonic_ns()}"
        batch.write_text("".join(line + "\n" for line in lines))
        argv = [self.psftp_path, *self.putty_options(fingerprint), "-b", str(batch)]
        if keep_going:
            argv.append("-be")
        return run([*argv, HOST], env=self.env, cwd=self.local)

    def assertPsftp(self, *lines):
        rc, out, err = self.psftp(*lines)
        self.assertEqual(rc, 0, f"psftp failed\nstdout:\n{out}\nstderr:\n{err}")
        return out

    def pscp(self, *args, fingerprint=None):
        return run([self.pscp_path, *self.putty_options(fingerprint), *args], env=self.env, cwd=self.local)

    def assertPscp(self, *args):
        rc, out, err = self.pscp(*args)
        self.assertEqual(rc, 0, f"pscp failed\nstdout:\n{out}\nstderr:\n{err}")
        return out

    def test_host_key_and_listing(self):
        self.listed_file()
        rc, out, err = self.psftp("dir", fingerprint=WRONG_FINGERPRINT)
        self.assertNotEqual(rc, 0)
        self.assertIn("Host key not in manually configured list", out + err)
        self.assertNotIn("listed.txt", out)
        out = self.assertPsftp("dir")
        self.assertLongnameShows(out)
        out = self.assertPscp("-ls", f"{HOST}:/")
        self.assertLongnameShows(out)

    def test_psftp_transfers_and_resume(self):
        big = self.big_local()
        self.assertPsftp("put big.bin big.bin", "get big.bin back.bin")
        self.assertSameBytes(big, self.volume / "big.bin")
        self.assertSameBytes(big, self.local / "back.bin")
        # Resume both ways from a cut that is not on a request boundary.
        self.partial_copy(big, self.volume / "half.bin", 7 * 1024 * 1024 + 123)
        self.partial_copy(big, self.local / "half-back.bin", 5 * 1024 * 1024 + 45)
        out = self.assertPsftp("reput big.bin half.bin", "reget half.bin half-back.bin")
        self.assertIn("restarting at file position 7340155", out)
        self.assertSameBytes(big, self.volume / "half.bin")
        self.assertSameBytes(big, self.local / "half-back.bin")

    def test_pscp_both_protocols_keep_times(self):
        big = self.big_local()
        os.utime(big, (OLD_MTIME, OLD_MTIME))
        self.assertPscp("-sftp", "-p", str(big), f"{HOST}:/sftp.bin")
        self.assertPscp("-scp", "-p", str(big), f"{HOST}:/scp.bin")
        for name in ("sftp.bin", "scp.bin"):
            self.assertSameBytes(big, self.volume / name)
            self.assertEqual(int((self.volume / name).stat().st_mtime), OLD_MTIME, name)
        self.listed_file(SPACED_FILE)
        for mode in ("-sftp", "-scp"):
            target = self.local / mode
            target.mkdir()
            self.assertPscp(mode, "-p", f"{HOST}:/{SPACED_FILE}", str(target))
            self.assertPscp(mode, f"{HOST}:/sftp.bin", str(target))
            self.assertSameBytes(big, target / "sftp.bin")
            self.assertEqual((target / SPACED_FILE).read_bytes(), b"x" * 1234)
            self.assertEqual(int((target / SPACED_FILE).stat().st_mtime), OLD_MTIME, mode)

    def test_tree_operations_and_names(self):
        self.tree_fixture()
        names = self.big_folder()
        out = self.assertPsftp(
            f'mkdir "{SPACED_DIR}"',
            f'put "{SPACED_FILE}" "{SPACED_DIR}/{SPACED_FILE}"',
            f'mv "{SPACED_DIR}/{SPACED_FILE}" "{SPACED_DIR}/renamed ü.txt"',
            f'chmod 640 "{SPACED_DIR}/renamed ü.txt"',
            "rm doomed.txt",
            "rmdir empty",
            f'ls "{SPACED_DIR}"',
            "ls many",
        )
        self.assertIn("renamed ü.txt", out)
        self.assertEqual(sorted(n for n in names if n in out), names)
        # psftp cannot set a time; pscp -p does (SETSTAT after the upload).
        self.assertTreeResult(mtime=False)
        os.utime(self.local / SPACED_FILE, (OLD_MTIME, OLD_MTIME))
        self.assertPscp("-p", str(self.local / SPACED_FILE), f"{HOST}:/{SPACED_DIR}/renamed ü.txt")
        self.assertEqual(int((self.volume / SPACED_DIR / "renamed ü.txt").stat().st_mtime), OLD_MTIME)

    def test_no_way_out(self):
        (self.local / "escape.txt").write_bytes(b"stay inside\n")
        rc, out, err = self.psftp(
            "cd ../../..", "pwd",
            "get ../../etc/passwd passwd",
            "get /../../../etc/passwd passwd",
            "get out/secret stolen",
            "put escape.txt ../../../escaped.txt",
            f"get {self.sentinel} stolen",
            keep_going=True,
        )
        self.assertIn('Remote directory is /', out)
        rc, out, err = self.pscp(f"{HOST}:/../../out/secret", str(self.local / "stolen"))
        self.assertNotEqual(rc, 0)
        self.assertConfinedResult()


# --- curl (libssh2) -----------------------------------------------------------------------------


class CurlTests(EngineTestCase):
    """
    Debian 12's curl on libssh2 1.10, with the service's default algorithms: libssh2 1.10 has no
    AEAD cipher and no -etm MAC, so this is the client that needs the plain HMACs.
    """

    def setUp(self):
        self.curl_path = require_binary("curl")
        super().setUp()

    def url(self, path):
        return f"sftp://{HOST}:{self.port}" + urllib.parse.quote(path)

    def curl(self, *args, fingerprint=None):
        argv = [self.curl_path, "--silent", "--show-error", "--path-as-is",
                "--hostpubsha256", (fingerprint or self.fingerprint).removeprefix("SHA256:"),
                "--user", f"{self.user}:{self.password}", *args]
        return run(argv, env=self.env, cwd=self.local)

    def assertCurl(self, *args):
        rc, out, err = self.curl(*args)
        self.assertEqual(rc, 0, f"curl failed ({rc})\nstdout:\n{out}\nstderr:\n{err}")
        return out

    def test_needs_the_plain_macs(self):
        # The offer before the plain HMACs were added: libssh2 1.10 finds no MAC it knows.
        self.service.stop()
        self.service.config["sftp"]["macs"] = ["hmac-sha2-256-etm@openssh.com",
                                               "hmac-sha2-512-etm@openssh.com"]
        write_config(self.service.root, self.service.config)
        self.service.start()
        self.port = self.service.port
        rc, out, err = self.curl(self.url("/"))
        self.assertNotEqual(rc, 0)
        self.assertIn("Unable to exchange encryption keys", err)

    def test_host_key_and_listing(self):
        self.listed_file()
        rc, out, err = self.curl(self.url("/"), fingerprint=WRONG_FINGERPRINT)
        self.assertNotEqual(rc, 0)
        self.assertNotIn("listed.txt", out)
        self.assertLongnameShows(self.assertCurl(self.url("/")))
        self.assertEqual(sorted(self.assertCurl("--list-only", self.url("/")).split()),
                         [".", "..", "listed.txt", "out"])

    def test_transfers_and_resume(self):
        big = self.big_local()
        self.assertCurl("--upload-file", str(big), self.url("/big.bin"))
        self.assertCurl("--output", str(self.local / "back.bin"), self.url("/big.bin"))
        self.assertSameBytes(big, self.volume / "big.bin")
        self.assertSameBytes(big, self.local / "back.bin")
        self.partial_copy(big, self.volume / "half.bin", 7 * 1024 * 1024 + 123)
        self.partial_copy(big, self.local / "half-back.bin", 5 * 1024 * 1024 + 45)
        self.assertCurl("--continue-at", "-", "--upload-file", str(big), self.url("/half.bin"))
        self.assertCurl("--continue-at", "-", "--output", str(self.local / "half-back.bin"),
                        self.url("/half.bin"))
        self.assertSameBytes(big, self.volume / "half.bin")
        self.assertSameBytes(big, self.local / "half-back.bin")

    def test_tree_operations_names_and_links(self):
        small = self.tree_fixture()
        names = self.big_folder()
        (self.volume / "target.txt").write_bytes(b"pointed at\n")
        self.assertCurl(
            "--quote", f'mkdir "/{SPACED_DIR}"',
            "--upload-file", str(small), self.url(f"/{SPACED_DIR}/{SPACED_FILE}"),
        )
        self.assertCurl(
            "--quote", f'rename "/{SPACED_DIR}/{SPACED_FILE}" "/{SPACED_DIR}/renamed ü.txt"',
            "--quote", f'chmod 640 "/{SPACED_DIR}/renamed ü.txt"',
            "--quote", f'mtime "Sun, 09 Sep 2001 01:46:40 GMT" "/{SPACED_DIR}/renamed ü.txt"',
            "--quote", "rm /doomed.txt",
            "--quote", "rmdir /empty",
            # curl's symlink: the target, then the link (libssh2 sends them in that order).
            "--quote", f'symlink target.txt "/{SPACED_DIR}/link to target"',
            "--list-only", self.url(f"/{SPACED_DIR}/"),
        )
        self.assertTreeResult()
        link = self.volume / SPACED_DIR / "link to target"
        self.assertEqual(os.readlink(link), "target.txt")
        self.assertFalse((self.volume / "target.txt").is_symlink())
        listed = self.assertCurl("--list-only", self.url("/many/")).split()
        self.assertEqual(sorted(n for n in listed if n.startswith("entry-")), names)

    def test_no_way_out(self):
        (self.local / "escape.txt").write_bytes(b"stay inside\n")
        for path in ("/../../etc/passwd", "/out/secret", str(self.sentinel), "/out/../out/secret"):
            rc, out, err = self.curl("--output", str(self.local / "stolen"), self.url(path))
            self.assertNotEqual(rc, 0, path)
        rc, out, err = self.curl("--quote", "symlink /out/secret /peek", self.url("/"))
        self.assertEqual(rc, 0, err)
        rc, out, err = self.curl("--output", str(self.local / "stolen"), self.url("/peek"))
        self.assertNotEqual(rc, 0)
        self.assertCurl("--upload-file", str(self.local / "escape.txt"), self.url("/../../../escaped.txt"))
        self.assertConfinedResult()


# --- Node.js: ssh2 + ssh2-sftp-client -------------------------------------------------------------


class Ssh2Tests(EngineTestCase):
    """
    ssh2-sftp-client on ssh2 (npm), as VS Code's SFTP extensions use them, driven by
    tests/ssh2_driver.js. ssh2 sends SYMLINK in the drafts' order to a server that is not OpenSSH.
    """

    def setUp(self):
        self.node = require_binary("node")
        if not (NODE_MODULES / "ssh2-sftp-client").is_dir():
            raise pyunittest.SkipTest(f"ssh2-sftp-client is not installed in {NODE_MODULES} "
                                      "(.ci/run installs it with npm)")
        super().setUp()

    def ssh2(self, *ops, fingerprint=None):
        request = {"host": HOST, "port": self.port, "username": self.user, "password": self.password,
                   "fingerprint": fingerprint or self.fingerprint, "ops": [list(op) for op in ops]}
        env = dict(self.env, NODE_PATH=str(NODE_MODULES))
        rc, out, err = run([self.node, str(REPO_ROOT / "tests" / "ssh2_driver.js")], env=env,
                           cwd=self.local, stdin=json.dumps(request))
        # ssh2-sftp-client prints notes of its own ("Global end listener...") on stdout.
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        self.assertTrue(lines, f"the ssh2 driver printed nothing (exit {rc})\n{err}")
        return lines[0], lines[1:], err

    def assertSsh2(self, *ops):
        login, results, err = self.ssh2(*ops)
        self.assertEqual(login, {"login": True}, err)
        self.assertEqual(len(results), len(ops), f"{results}\n{err}")
        for op, result in zip(ops, results):
            self.assertTrue(result["ok"], f"{op}: {result}")
        return [result["result"] for result in results]

    def test_host_key_and_listing(self):
        self.listed_file()
        login, results, err = self.ssh2(("list", "/"), fingerprint=WRONG_FINGERPRINT)
        self.assertFalse(login["login"])
        self.assertEqual(results, [])
        [listing] = self.assertSsh2(("list", "/"))
        entries = {e["name"]: e for e in listing}
        self.assertEqual(sorted(entries), ["listed.txt", "out"])
        self.assertEqual(entries["listed.txt"]["type"], "-")
        self.assertEqual(entries["listed.txt"]["size"], 1234)
        self.assertEqual(entries["listed.txt"]["modifyTime"], OLD_MTIME * 1000)
        self.assertEqual(entries["listed.txt"]["rights"], {"user": "rw", "group": "r", "other": ""})
        self.assertEqual(entries["out"]["type"], "l")

    def test_transfers_and_resume(self):
        big = self.big_local()
        self.assertSsh2(("put", str(big), "/big.bin"), ("get", "/big.bin", str(self.local / "back.bin")),
                        ("fastPut", str(big), "/fast.bin"),
                        ("fastGet", "/fast.bin", str(self.local / "fast-back.bin")))
        for path in (self.volume / "big.bin", self.local / "back.bin", self.volume / "fast.bin",
                     self.local / "fast-back.bin"):
            self.assertSameBytes(big, path)
        up, down = 7 * 1024 * 1024 + 123, 5 * 1024 * 1024 + 45
        self.partial_copy(big, self.volume / "half.bin", up)
        self.partial_copy(big, self.local / "half-back.bin", down)
        self.assertSsh2(("resumePut", str(big), "/half.bin", up),
                        ("resumeGet", "/half.bin", str(self.local / "half-back.bin"), down))
        self.assertSameBytes(big, self.volume / "half.bin")
        self.assertSameBytes(big, self.local / "half-back.bin")

    def test_tree_operations_names_and_links(self):
        small = self.tree_fixture()
        names = self.big_folder()
        (self.volume / "target.txt").write_bytes(b"pointed at\n")
        renamed = f"/{SPACED_DIR}/renamed ü.txt"
        results = self.assertSsh2(
            ("mkdir", f"/{SPACED_DIR}"),
            ("put", str(small), f"/{SPACED_DIR}/{SPACED_FILE}"),
            ("rename", f"/{SPACED_DIR}/{SPACED_FILE}", renamed),
            ("chmod", renamed, 0o640),
            ("utimes", renamed, OLD_MTIME, OLD_MTIME),
            ("delete", "/doomed.txt"),
            ("rmdir", "/empty"),
            ("symlink", "../target.txt", f"/{SPACED_DIR}/link to target"),
            ("readlink", f"/{SPACED_DIR}/link to target"),
            ("list", "/many"),
            ("stat", renamed),
        )
        self.assertTreeResult()
        self.assertEqual(os.readlink(self.volume / SPACED_DIR / "link to target"), "../target.txt")
        self.assertEqual(results[8], "../target.txt")
        self.assertEqual(sorted(e["name"] for e in results[9]), names)
        self.assertEqual(results[10]["mode"], stat.S_IFREG | 0o640)

    def test_no_way_out(self):
        (self.local / "escape.txt").write_bytes(b"stay inside\n")
        for op in (("get", "/../../etc/passwd", str(self.local / "passwd")),
                   ("get", "/out/secret", str(self.local / "stolen")),
                   ("get", str(self.sentinel), str(self.local / "stolen")),
                   ("symlink", str(self.sentinel), "/peek")):
            login, results, err = self.ssh2(op)
            self.assertTrue(login["login"], err)
            if op[0] == "symlink":
                self.assertTrue(results[0]["ok"], results)
        login, results, err = self.ssh2(("get", "/peek", str(self.local / "stolen")))
        self.assertFalse(results[0]["ok"])
        results = self.assertSsh2(("realpath", "/../.."), ("put", str(self.local / "escape.txt"),
                                                          "../../../escaped.txt"))
        self.assertEqual(results[0], "/")
        self.assertConfinedResult()


# --- FileZilla: fzsftp --------------------------------------------------------------------------


class FzSftp:
    """
    FileZilla's ``fzsftp`` (PuTTY's SSH code with FileZilla's command loop), driven over stdin
    and stdout the way FileZilla's engine drives it (src/engine/sftp and src/putty/psftp.c,
    fzprintf.h and unix/uxsftp.c of FileZilla 3.63, protocol version 11):

    - each output line starts with one character, ``'0'`` + the event number, then its text;
    - commands are lines (``open "user@host" port``, ``ls``, ``put``, ``mkdir``...), arguments in
      double quotes; each command ends with a Reply event (success) or a Done event (whose text
      is 1 on success);
    - answers to prompts (host key, password) are plain lines; answers to file-data requests are
      lines starting with ``-``;
    - file data never touches a path: fzsftp asks for a buffer (io_open), and the engine hands it
      a shared-memory descriptor and its size, then fills or drains it on each io_nextbuf.
    """

    EVENTS = ("Reply Done Error Verbose Info Status Recv Send Listentry AskHostkey "
              "AskHostkeyChanged AskHostkeyBetteralg AskPassword Transfer RequestPreamble "
              "RequestInstruction UsedQuotaRecv UsedQuotaSend KexAlgorithm KexHash KexCurve "
              "CipherClientToServer CipherServerToClient MacClientToServer MacServerToClient "
              "Hostkey io_size io_open io_nextbuf io_finalize").split()
    BUFFER = 256 * 1024
    TIMEOUT = 60

    def __init__(self, testcase, path, env, cwd):
        self.testcase = testcase
        self.memfd = os.memfd_create("fzsftp-buffer")
        os.ftruncate(self.memfd, self.BUFFER)
        self.memory = mmap.mmap(self.memfd, self.BUFFER)
        self.stderr = open(cwd / "fzsftp.stderr", "wb")
        self.process = subprocess.Popen(
            [path, "-v"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
            pass_fds=[self.memfd], env=env, cwd=cwd, start_new_session=True)
        testcase.addCleanup(self.close)
        self.pending = b""
        self.host_key = None
        event, text = self.event()
        testcase.assertEqual((event, text), ("Reply", "fzSftp started, protocol_version=11"))

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self.process.stdin.close()
        self.process.stdout.close()
        self.stderr.close()
        self.memory.close()
        os.close(self.memfd)

    def line(self):
        deadline = time.monotonic() + self.TIMEOUT
        while True:
            # Asking for a transfer quota (UsedQuotaRecv "@", UsedQuotaSend "A") is one
            # character without a newline, and fzsftp waits for the answer: "-0-" / "-1-" is
            # "no limit" for receiving / sending.
            while self.pending[:1] in (b"@", b"A"):
                self.send(f"-{self.pending[0] - ord('@')}-")
                self.pending = self.pending[1:]
            if b"\n" in self.pending:
                break
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"fzsftp said nothing for {self.TIMEOUT}s")
            data = os.read(self.process.stdout.fileno(), 65536)
            if not data:
                raise AssertionError(f"fzsftp exited ({self.process.poll()}) mid-command")
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return line.decode("utf-8", "replace")

    def event(self):
        line = self.line()
        return self.EVENTS[ord(line[0]) - ord("0")], line[1:]

    def send(self, line):
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def command(self, line, password=None, fingerprint=None, source=None, target=None):
        """
        Run one command; returns (ok, events). ``source`` is the local file an upload reads,
        ``target`` the local file a download writes.
        """
        self.send(line)
        events, listing = [], []
        local = None
        while True:
            event, text = self.event()
            # A command ends with a Reply (success, with its text) or, when it has none, a Done.
            if event in ("Done", "Reply"):
                if local is not None:
                    local.close()
                if event == "Reply":
                    events.append((event, text))
                return event == "Reply" or text == "1", events, listing
            if event == "Listentry":
                listing.append((text, int(self.line()), self.line()))
                continue
            events.append((event, text))
            if event == "Hostkey":
                self.host_key = text
            elif event in ("AskHostkey", "AskHostkeyChanged"):
                self.line()  # the port, on a line of its own
                # FileZilla shows the fingerprint and asks; "n" trusts it this once, "" refuses.
                self.send("n" if self.host_key.endswith(" " + fingerprint) else "")
            elif event == "AskPassword":
                self.send(password)
            elif event == "io_open" and source is not None:
                local = open(source, "rb")
                local.seek(int(text))
                self.send(f"-{self.memfd} {self.BUFFER}")
            elif event == "io_open":
                existing = text != "0"
                local = open(target, "r+b" if existing else "wb")
                local.seek(0, os.SEEK_END)
                self.send(f"-{self.memfd} {self.BUFFER}" + (f" {local.tell()}" if existing else ""))
            elif event == "io_nextbuf" and source is not None:
                chunk = local.read(self.BUFFER)
                self.memory[:len(chunk)] = chunk
                self.send(f"-0 {len(chunk)}" if chunk else "-")
            elif event == "io_nextbuf":
                local.write(self.memory[:int(text)])
                self.send(f"-0 {self.BUFFER}")
            elif event == "io_finalize":
                local.write(self.memory[:int(text)])
                self.send("-1")


def fz_quote(path):
    return '"' + path.replace('"', '""') + '"'


class FileZillaTests(EngineTestCase):
    """FileZilla 3.63's fzsftp, through its own protocol. FileZilla has no command that makes links."""

    def setUp(self):
        self.fzsftp_path = require_binary("fzsftp")
        super().setUp()

    def connect(self, fingerprint=None):
        fz = FzSftp(self, self.fzsftp_path, self.env, self.local)
        ok, events, _ = fz.command(f'open {fz_quote(f"{self.user}@{HOST}")} {self.port}',
                                   password=self.password, fingerprint=fingerprint or self.fingerprint)
        return fz, ok, events

    def fz(self):
        fz, ok, events = self.connect()
        self.assertTrue(ok, events)
        self.assertEqual(fz.host_key, f"ssh-ed25519 255 {self.fingerprint}")
        return fz

    def assertCommand(self, fz, line, **kwargs):
        ok, events, listing = fz.command(line, **kwargs)
        self.assertTrue(ok, f"{line}: {events}")
        return events, listing

    def test_host_key_and_listing(self):
        self.listed_file()
        fz, ok, events = self.connect(fingerprint=WRONG_FINGERPRINT)
        self.assertFalse(ok)
        self.assertNotIn("AskPassword", [e for e, _ in events])
        fz = self.fz()
        _, listing = self.assertCommand(fz, 'ls "/"')
        entries = {name: (longname, mtime) for longname, mtime, name in listing}
        self.assertEqual(sorted(entries), [".", "..", "listed.txt", "out"])
        self.assertLongnameShows(entries["listed.txt"][0])
        self.assertEqual(entries["listed.txt"][1], OLD_MTIME)

    def test_transfers_and_resume(self):
        big = self.big_local()
        fz = self.fz()
        self.assertCommand(fz, f'put {fz_quote(str(big))} "/big.bin"', source=big)
        self.assertCommand(fz, f'get "/big.bin" {fz_quote(str(self.local / "back.bin"))}',
                           target=self.local / "back.bin")
        self.assertSameBytes(big, self.volume / "big.bin")
        self.assertSameBytes(big, self.local / "back.bin")
        self.partial_copy(big, self.volume / "half.bin", 7 * 1024 * 1024 + 123)
        self.partial_copy(big, self.local / "half-back.bin", 5 * 1024 * 1024 + 45)
        events, _ = self.assertCommand(fz, f'reput {fz_quote(str(big))} "/half.bin"', source=big)
        self.assertIn(("Info", "reput: restarting at file position 7340155"), events)
        self.assertCommand(fz, f'reget "/half.bin" {fz_quote(str(self.local / "half-back.bin"))}',
                           target=self.local / "half-back.bin")
        self.assertSameBytes(big, self.volume / "half.bin")
        self.assertSameBytes(big, self.local / "half-back.bin")

    def test_tree_operations_and_names(self):
        small = self.tree_fixture()
        names = self.big_folder()
        fz = self.fz()
        renamed = fz_quote(f"/{SPACED_DIR}/renamed ü.txt")
        for line in (f"mkdir {fz_quote('/' + SPACED_DIR)}",
                     f"cd {fz_quote('/' + SPACED_DIR)}",
                     f"put {fz_quote(str(small))} {fz_quote(SPACED_FILE)}",
                     f"mv {fz_quote(SPACED_FILE)} {renamed}",
                     f"chmtime {OLD_MTIME} {renamed}",
                     'rm "/doomed.txt"',
                     'rmdir "/empty"'):
            self.assertCommand(fz, line, source=small)
        # fzsftp's chmod ends with Done 0 whatever happened (FileZilla reads the Status line).
        ok, events, _ = fz.command(f"chmod 640 {renamed}")
        self.assertNotIn("Error", [event for event, _ in events], events)
        self.assertIn(("Status", f"/{SPACED_DIR}/renamed ü.txt: 0644 -> 0640"), events)
        events, _ = self.assertCommand(fz, f"mtime {renamed}")
        self.assertIn(("Reply", str(OLD_MTIME)), events)
        self.assertTreeResult()
        _, listing = self.assertCommand(fz, 'ls "/many"')
        self.assertEqual(sorted(name for _, _, name in listing), [".", ".."] + names)

    def test_no_way_out(self):
        escape = self.local / "escape.txt"
        escape.write_bytes(b"stay inside\n")
        fz = self.fz()
        events, _ = self.assertCommand(fz, 'cd "../../.."')
        self.assertIn(("Reply", 'New directory is: "/"'), events)
        for line in ('get "/../../etc/passwd" passwd', 'get "/out/secret" stolen',
                     f"get {fz_quote(str(self.sentinel))} stolen"):
            ok, events, _ = fz.command(line, target=self.local / "stolen")
            self.assertFalse(ok, line)
        self.assertCommand(fz, f'put {fz_quote(str(escape))} "../../../escaped.txt"', source=escape)
        self.assertConfinedResult()


# --- libssh ---------------------------------------------------------------------------------------


def find_libssh():
    """
    The libssh that ansible-pylibssh (PyPI) ships inside its wheel: libssh 0.12, the library
    KDE's kio-sftp is built on. Called through ctypes, as its C API is.
    """
    try:
        import pylibsshext
    except ImportError:
        raise pyunittest.SkipTest("ansible-pylibssh is not installed (.ci/run installs it with pip)")
    libs = Path(pylibsshext.__file__).resolve().parent.parent / "ansible_pylibssh.libs"
    found = sorted(libs.glob("libssh-*.so*")) or [ctypes.util.find_library("ssh")]
    if not found or found[0] is None:
        raise pyunittest.SkipTest(f"no libssh in {libs}")
    return str(found[0])


class SftpAttributes(ctypes.Structure):
    # struct sftp_attributes_struct (include/libssh/sftp.h, libssh 0.10 to 0.12).
    _fields_ = [
        ("name", ctypes.c_char_p), ("longname", ctypes.c_char_p), ("flags", ctypes.c_uint32),
        ("type", ctypes.c_uint8), ("size", ctypes.c_uint64), ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32), ("owner", ctypes.c_char_p), ("group", ctypes.c_char_p),
        ("permissions", ctypes.c_uint32), ("atime64", ctypes.c_uint64), ("atime", ctypes.c_uint32),
        ("atime_nseconds", ctypes.c_uint32), ("createtime", ctypes.c_uint64),
        ("createtime_nseconds", ctypes.c_uint32), ("mtime64", ctypes.c_uint64),
        ("mtime", ctypes.c_uint32), ("mtime_nseconds", ctypes.c_uint32), ("acl", ctypes.c_void_p),
        ("extended_count", ctypes.c_uint32), ("extended_type", ctypes.c_void_p),
        ("extended_data", ctypes.c_void_p),
    ]


class Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class LibSSH:
    """
    A libssh client session and its SFTP session, as kio-sftp opens them: options, connect,
    ``ssh_session_is_known_server`` against a known_hosts file, password, ``sftp_init``. Every
    call blocks; libssh's SFTP calls wait for each reply (``sftp_write`` of 32 KiB, then the next).
    """

    OPTIONS_HOST, OPTIONS_PORT, OPTIONS_USER, OPTIONS_KNOWNHOSTS, OPTIONS_TIMEOUT = 0, 1, 4, 8, 9
    OPTIONS_CIPHERS_C_S, OPTIONS_CIPHERS_S_C, OPTIONS_HMAC_C_S, OPTIONS_HMAC_S_C = 15, 16, 29, 30
    OPTIONS_GLOBAL_KNOWNHOSTS, OPTIONS_PROCESS_CONFIG = 35, 38
    KNOWN_HOSTS_OK = 1
    CHUNK = 32 * 1024

    _lib = None

    @classmethod
    def library(cls):
        if cls._lib is None:
            lib = ctypes.CDLL(find_libssh())
            p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p
            for name, restype, argtypes in [
                ("ssh_new", p, []), ("ssh_free", None, [p]), ("ssh_options_set", i, [p, i, p]),
                ("ssh_connect", i, [p]), ("ssh_disconnect", None, [p]),
                ("ssh_get_error", s, [p]), ("ssh_session_is_known_server", i, [p]),
                ("ssh_userauth_password", i, [p, s, s]), ("ssh_get_issue_banner", s, [p]),
                ("sftp_new", p, [p]), ("sftp_init", i, [p]), ("sftp_free", None, [p]),
                ("sftp_get_error", i, [p]),
                ("sftp_open", p, [p, s, i, ctypes.c_uint32]), ("sftp_close", i, [p]),
                ("sftp_read", ctypes.c_ssize_t, [p, p, ctypes.c_size_t]),
                ("sftp_write", ctypes.c_ssize_t, [p, p, ctypes.c_size_t]),
                ("sftp_seek64", i, [p, ctypes.c_uint64]),
                ("sftp_mkdir", i, [p, s, ctypes.c_uint32]), ("sftp_rmdir", i, [p, s]),
                ("sftp_unlink", i, [p, s]), ("sftp_rename", i, [p, s, s]),
                ("sftp_chmod", i, [p, s, ctypes.c_uint32]),
                ("sftp_utimes", i, [p, s, ctypes.POINTER(Timeval)]),
                ("sftp_symlink", i, [p, s, s]), ("sftp_readlink", p, [p, s]),
                ("sftp_canonicalize_path", p, [p, s]), ("ssh_string_free_char", None, [p]),
                ("sftp_opendir", p, [p, s]), ("sftp_readdir", ctypes.POINTER(SftpAttributes), [p, p]),
                ("sftp_dir_eof", i, [p]), ("sftp_closedir", i, [p]),
                ("sftp_stat", ctypes.POINTER(SftpAttributes), [p, s]),
                ("sftp_lstat", ctypes.POINTER(SftpAttributes), [p, s]),
                ("sftp_attributes_free", None, [p]),
                ("ssh_pki_import_privkey_file", i, [s, s, p, p, ctypes.POINTER(p)]),
                ("ssh_userauth_publickey", i, [p, s, p]), ("ssh_key_free", None, [p]),
            ]:
                function = getattr(lib, name)
                function.restype, function.argtypes = restype, argtypes
            cls._lib = lib
        return cls._lib

    def __init__(self, testcase, port, user, known_hosts):
        self.testcase = testcase
        self.lib = lib = self.library()
        self.session = lib.ssh_new()
        testcase.addCleanup(self.close)
        self.sftp = None
        self.option(self.OPTIONS_HOST, HOST.encode())
        self.option(self.OPTIONS_PORT, ctypes.c_uint(port))
        self.option(self.OPTIONS_USER, user.encode())
        self.option(self.OPTIONS_KNOWNHOSTS, str(known_hosts).encode())
        self.option(self.OPTIONS_GLOBAL_KNOWNHOSTS, b"/dev/null")
        self.option(self.OPTIONS_TIMEOUT, ctypes.c_long(30))
        self.option(self.OPTIONS_PROCESS_CONFIG, ctypes.c_bool(False))

    def option(self, which, value):
        pointer = ctypes.c_char_p(value) if isinstance(value, bytes) else ctypes.byref(value)
        self.testcase.assertEqual(self.lib.ssh_options_set(self.session, which, pointer), 0, which)

    def error(self):
        return self.lib.ssh_get_error(self.session).decode(errors="replace")

    def connect(self):
        """Connects and checks the host key; returns ssh_session_is_known_server's answer."""
        self.testcase.assertEqual(self.lib.ssh_connect(self.session), 0, self.error())
        return self.lib.ssh_session_is_known_server(self.session)

    def login(self, password=None, key_file=None):
        """Password or key login, then the SFTP session."""
        if key_file is None:
            result = self.lib.ssh_userauth_password(self.session, None, password.encode())
        else:
            key = ctypes.c_void_p()
            self.testcase.assertEqual(self.lib.ssh_pki_import_privkey_file(
                str(key_file).encode(), None, None, None, ctypes.byref(key)), 0)
            result = self.lib.ssh_userauth_publickey(self.session, None, key)
            self.lib.ssh_key_free(key)
        self.testcase.assertEqual(result, 0, self.error())
        self.sftp = self.lib.sftp_new(self.session)
        self.testcase.assertTrue(self.sftp, self.error())
        self.testcase.assertEqual(self.lib.sftp_init(self.sftp), 0, self.error())
        return self

    def close(self):
        if self.sftp:
            self.lib.sftp_free(self.sftp)
            self.sftp = None
        if self.session:
            self.lib.ssh_disconnect(self.session)
            self.lib.ssh_free(self.session)
            self.session = None

    def put(self, local, remote, offset=0):
        flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if offset == 0 else 0)
        handle = self.lib.sftp_open(self.sftp, remote.encode(), flags, 0o644)
        self.testcase.assertTrue(handle, f"open {remote}: {self.error()}")
        try:
            self.testcase.assertEqual(self.lib.sftp_seek64(handle, offset), 0)
            with open(local, "rb") as f:
                f.seek(offset)
                for chunk in iter(lambda: f.read(self.CHUNK), b""):
                    written = self.lib.sftp_write(handle, chunk, len(chunk))
                    self.testcase.assertEqual(written, len(chunk), self.error())
        finally:
            self.testcase.assertEqual(self.lib.sftp_close(handle), 0, self.error())

    def get(self, remote, local, offset=0):
        """Returns False if the server refused to open ``remote`` (nothing is written then)."""
        handle = self.lib.sftp_open(self.sftp, remote.encode(), os.O_RDONLY, 0)
        if not handle:
            return False
        buffer = ctypes.create_string_buffer(self.CHUNK)
        try:
            self.testcase.assertEqual(self.lib.sftp_seek64(handle, offset), 0)
            with open(local, "r+b" if offset else "wb") as f:
                f.seek(offset)
                while True:
                    n = self.lib.sftp_read(handle, buffer, self.CHUNK)
                    self.testcase.assertGreaterEqual(n, 0, self.error())
                    if n == 0:
                        return True
                    f.write(buffer.raw[:n])
        finally:
            self.lib.sftp_close(handle)

    def listdir(self, path):
        handle = self.lib.sftp_opendir(self.sftp, path.encode())
        self.testcase.assertTrue(handle, f"opendir {path}: {self.error()}")
        entries = {}
        try:
            while True:
                attributes = self.lib.sftp_readdir(self.sftp, handle)
                if not attributes:
                    self.testcase.assertTrue(self.lib.sftp_dir_eof(handle), self.error())
                    return entries
                a = attributes.contents
                entries[a.name.decode()] = {"longname": a.longname.decode(), "size": a.size,
                                            "permissions": a.permissions, "mtime": a.mtime}
                self.lib.sftp_attributes_free(attributes)
        finally:
            self.lib.sftp_closedir(handle)

    def stat(self, path, follow=True):
        attributes = (self.lib.sftp_stat if follow else self.lib.sftp_lstat)(self.sftp, path.encode())
        if not attributes:
            return None
        a = attributes.contents
        result = {"size": a.size, "permissions": a.permissions, "mtime": a.mtime}
        self.lib.sftp_attributes_free(attributes)
        return result

    def text(self, pointer):
        if not pointer:
            return None
        value = ctypes.string_at(pointer).decode()
        self.lib.ssh_string_free_char(pointer)
        return value

    def readlink(self, path):
        return self.text(self.lib.sftp_readlink(self.sftp, path.encode()))

    def realpath(self, path):
        return self.text(self.lib.sftp_canonicalize_path(self.sftp, path.encode()))

    def call(self, name, *args):
        """One of sftp_mkdir/rmdir/unlink/rename/chmod/symlink, paths as str; True on success."""
        encoded = [a.encode() if isinstance(a, str) else a for a in args]
        return getattr(self.lib, name)(self.sftp, *encoded) == 0

    def utimes(self, path, atime, mtime):
        times = (Timeval * 2)(Timeval(atime, 0), Timeval(mtime, 0))
        return self.lib.sftp_utimes(self.sftp, path.encode(), times) == 0


class LibSSHTests(EngineTestCase):
    """libssh 0.12 (KDE's kio-sftp is built on libssh), which sends SYMLINK in the drafts' order here."""

    def setUp(self):
        find_libssh()
        super().setUp()
        self.known_hosts = self.home / "known_hosts"
        self.known_hosts.write_text(f"[{HOST}]:{self.port} {self.host_key_line}\n")

    def libssh(self):
        client = LibSSH(self, self.port, self.user, self.known_hosts)
        self.assertEqual(client.connect(), LibSSH.KNOWN_HOSTS_OK)
        return client.login(self.password)

    def test_host_key_and_listing(self):
        self.listed_file()
        # Another key recorded for this host: libssh says it changed, and kio-sftp stops there.
        other = Path(self.home / "other_known_hosts")
        other.write_text(f"[{HOST}]:{self.port} ssh-ed25519 "
                         "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
        client = LibSSH(self, self.port, self.user, other)
        self.assertNotEqual(client.connect(), LibSSH.KNOWN_HOSTS_OK)
        client.close()
        entries = self.libssh().listdir("/")
        self.assertEqual(sorted(entries), [".", "..", "listed.txt", "out"])
        listed = entries["listed.txt"]
        self.assertEqual((listed["size"], listed["permissions"], listed["mtime"]),
                         (1234, stat.S_IFREG | 0o640, OLD_MTIME))
        self.assertLongnameShows(listed["longname"])

    def test_transfers_and_resume(self):
        big = self.big_local()
        client = self.libssh()
        client.put(big, "/big.bin")
        self.assertTrue(client.get("/big.bin", self.local / "back.bin"))
        self.assertSameBytes(big, self.volume / "big.bin")
        self.assertSameBytes(big, self.local / "back.bin")
        up, down = 7 * 1024 * 1024 + 123, 5 * 1024 * 1024 + 45
        self.partial_copy(big, self.volume / "half.bin", up)
        self.partial_copy(big, self.local / "half-back.bin", down)
        client.put(big, "/half.bin", offset=up)
        self.assertTrue(client.get("/half.bin", self.local / "half-back.bin", offset=down))
        self.assertSameBytes(big, self.volume / "half.bin")
        self.assertSameBytes(big, self.local / "half-back.bin")

    def test_tree_operations_names_and_links(self):
        small = self.tree_fixture()
        names = self.big_folder()
        (self.volume / "target.txt").write_bytes(b"pointed at\n")
        client = self.libssh()
        renamed = f"/{SPACED_DIR}/renamed ü.txt"
        self.assertTrue(client.call("sftp_mkdir", f"/{SPACED_DIR}", 0o755))
        client.put(small, f"/{SPACED_DIR}/{SPACED_FILE}")
        self.assertTrue(client.call("sftp_rename", f"/{SPACED_DIR}/{SPACED_FILE}", renamed))
        self.assertTrue(client.call("sftp_chmod", renamed, 0o640))
        self.assertTrue(client.utimes(renamed, OLD_MTIME, OLD_MTIME))
        self.assertTrue(client.call("sftp_unlink", "/doomed.txt"))
        self.assertTrue(client.call("sftp_rmdir", "/empty"))
        # sftp_symlink(target, dest): what to point at, then the link to make.
        self.assertTrue(client.call("sftp_symlink", "../target.txt", f"/{SPACED_DIR}/link to target"))
        self.assertTreeResult()
        self.assertEqual(os.readlink(self.volume / SPACED_DIR / "link to target"), "../target.txt")
        self.assertEqual(client.readlink(f"/{SPACED_DIR}/link to target"), "../target.txt")
        self.assertEqual(client.stat(f"/{SPACED_DIR}/link to target")["size"], len(b"pointed at\n"))
        self.assertEqual(sorted(n for n in client.listdir("/many") if n.startswith("entry-")), names)

    def test_no_way_out(self):
        escape = self.local / "escape.txt"
        escape.write_bytes(b"stay inside\n")
        client = self.libssh()
        self.assertEqual(client.realpath("/../../.."), "/")
        for path in ("/../../etc/passwd", "/out/secret", str(self.sentinel)):
            self.assertFalse(client.get(path, self.local / "stolen"), path)
        self.assertTrue(client.call("sftp_symlink", str(self.sentinel), "/peek"))
        self.assertFalse(client.get("/peek", self.local / "stolen"))
        self.assertIsNone(client.stat("/out/secret"))
        client.put(escape, "../../../escaped.txt")
        self.assertConfinedResult()


# --- GNOME: gio and gvfs --------------------------------------------------------------------------


class GioTests(EngineTestCase):
    """
    GNOME's gio over gvfs's sftp backend (gvfsd-sftp), which speaks SFTP itself over OpenSSH's
    ``ssh``. Each test has its own D-Bus session bus, on which gvfs's daemons start.

    Not tested here, because the client cannot be made to do it: the host key check (gvfsd-sftp
    runs ssh with NoHostAuthenticationForLocalhost=yes, so a server on loopback, the only place
    these tests may reach, is never checked; ssh reads its known_hosts from the passwd home, not
    $HOME), resuming and making links (the ``gio`` command has neither; gvfs sends SYMLINK in
    OpenSSH's order, always).
    """

    def setUp(self):
        self.gio_path = require_binary("gio")
        dbus = require_binary("dbus-daemon")
        if not Path("/usr/libexec/gvfsd-sftp").exists():
            raise pyunittest.SkipTest("gvfsd-sftp is missing (install gvfs-backends)")
        super().setUp()
        runtime = self.home / "runtime"
        runtime.mkdir(mode=0o700)
        self.env.update(XDG_RUNTIME_DIR=str(runtime), GVFS_DISABLE_FUSE="1",
                        GIO_USE_VOLUME_MONITOR="unix", XDG_CONFIG_HOME=str(self.home / ".config"))
        self.bus = subprocess.Popen(
            [dbus, "--session", "--nofork", "--nosyslog", "--print-address=1"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env, start_new_session=True)
        self.addCleanup(self.stop_bus)
        address = self.bus.stdout.readline().decode().strip()
        self.assertTrue(address, "dbus-daemon printed no address")
        self.env["DBUS_SESSION_BUS_ADDRESS"] = address
        self.root_uri = f"sftp://{self.user}@{HOST}:{self.port}"

    def stop_bus(self):
        # The bus and the gvfs daemons it started share the process group made for the bus.
        try:
            os.killpg(self.bus.pid, 15)
        except ProcessLookupError:
            pass
        self.bus.wait(10)
        self.bus.stdout.close()

    def uri(self, path):
        return self.root_uri + urllib.parse.quote(path)

    def gio(self, *args, stdin=None):
        return run([self.gio_path, *args], env=self.env, cwd=self.local, stdin=stdin)

    def assertGio(self, *args):
        rc, out, err = self.gio(*args)
        self.assertEqual(rc, 0, f"gio {args[0]} failed\nstdout:\n{out}\nstderr:\n{err}")
        return out

    def mount(self):
        rc, out, err = self.gio("mount", self.uri("/"), stdin=self.password + "\n")
        self.assertEqual(rc, 0, f"gio mount failed\nstdout:\n{out}\nstderr:\n{err}")
        self.addCleanup(self.gio, "mount", "--unmount", self.uri("/"))

    def listing(self, path):
        """gio list -l: {name: {"size": n, attribute: value...}}."""
        out = self.assertGio("list", "-l", "-a", "standard::name,standard::size,unix::mode,time::modified",
                             self.uri(path))
        entries = {}
        for line in out.splitlines():
            name, size, kind, *attributes = line.split("\t")
            entries[name] = dict(a.split("=", 1) for a in " ".join(attributes).split())
            entries[name].update(size=int(size), kind=kind)
        return entries

    def test_login_and_listing(self):
        self.listed_file()
        self.mount()
        entries = self.listing("/")
        self.assertEqual(sorted(entries), ["listed.txt", "out"])
        listed = entries["listed.txt"]
        self.assertIn("unix::mode", listed, entries)
        self.assertEqual((listed["size"], listed["kind"], int(listed["unix::mode"]),
                          int(listed["time::modified"])), (1234, "(regular)", stat.S_IFREG | 0o640, OLD_MTIME))

    def test_transfers(self):
        big = self.big_local()
        self.mount()
        self.assertGio("copy", str(big), self.uri("/big.bin"))
        self.assertGio("copy", self.uri("/big.bin"), str(self.local / "back.bin"))
        self.assertSameBytes(big, self.volume / "big.bin")
        self.assertSameBytes(big, self.local / "back.bin")

    def test_tree_operations_and_names(self):
        small = self.tree_fixture()
        names = self.big_folder()
        self.mount()
        renamed = f"/{SPACED_DIR}/renamed ü.txt"
        self.assertGio("mkdir", self.uri(f"/{SPACED_DIR}"))
        self.assertGio("copy", str(small), self.uri(f"/{SPACED_DIR}/{SPACED_FILE}"))
        self.assertGio("rename", self.uri(f"/{SPACED_DIR}/{SPACED_FILE}"), "renamed ü.txt")
        self.assertGio("set", "-t", "uint32", self.uri(renamed), "unix::mode", str(0o640))
        self.assertGio("set", "-t", "uint64", self.uri(renamed), "time::modified", str(OLD_MTIME))
        self.assertGio("remove", self.uri("/doomed.txt"))
        self.assertGio("remove", self.uri("/empty"))
        self.assertTreeResult()
        self.assertEqual(sorted(self.listing("/many")), names)

    def test_no_way_out(self):
        escape = self.local / "escape.txt"
        escape.write_bytes(b"stay inside\n")
        self.mount()
        for path in ("/../../etc/passwd", "/out/secret", str(self.sentinel)):
            rc, out, err = self.gio("copy", self.root_uri + path, str(self.local / "stolen"))
            self.assertNotEqual(rc, 0, path)
        self.assertGio("copy", str(escape), self.root_uri + "/../../../escaped.txt")
        self.assertConfinedResult()


# --- the algorithms on offer --------------------------------------------------------------------


class AuditTests(EngineTestCase):
    """
    ssh-audit (PyPI) against the default configuration: it may warn (the plain HMACs that
    libssh2 1.10 needs are encrypt-and-MAC; curve25519 is not post-quantum) but fails nothing.
    """

    def test_no_fail(self):
        audit = require_binary("ssh-audit")
        rc, out, err = run([audit, "--json", "-p", str(self.port), HOST], env=self.env)
        report = json.loads(out)
        notes = {(kind, entry["algorithm"]): entry.get("notes", {})
                 for kind in ("kex", "key", "enc", "mac") for entry in report[kind]}
        self.assertIn(("mac", "hmac-sha2-256"), notes)
        self.assertEqual({name: note["fail"] for name, note in notes.items() if note.get("fail")}, {})
        self.assertEqual(report["cves"], [])
        warned = {name for name, note in notes.items() if note.get("warn")}
        self.assertEqual(warned, {("kex", "curve25519-sha256"), ("kex", "curve25519-sha256@libssh.org"),
                                  ("mac", "hmac-sha2-256"), ("mac", "hmac-sha2-512")})
