"""
End to end, a container's policy against the real service: for each key (read_only, suspended,
quota_bytes, allowed_ips, denylist, password_login) and for write locks, what OpenSSH sftp, scp
(SFTP mode and legacy ``-O``), rsync, paramiko, asyncssh and raw SFTP packets see, and what lands
in the volume; changes are made with the API or the CLI, some while a session is live.
"""

import asyncio
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
import unittest as pyunittest

from twisted.trial import unittest

from tests.harness import (
    ATTR_PERMISSIONS,
    ATTR_SIZE,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_PERMISSION_DENIED,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED_REPLY,
    FXP_FSETSTAT,
    FXP_HANDLE,
    FXP_LSTAT,
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
    FXP_SETSTAT,
    FXP_STAT,
    FXP_ATTRS,
    FXP_SYMLINK,
    FXP_WRITE,
    HOST,
    PFLAG_APPEND,
    PFLAG_CREAT,
    PFLAG_READ,
    PFLAG_TRUNC,
    PFLAG_WRITE,
    RawSFTP,
    _askpass_env,
    _ssh_options,
    attrs,
    default_config,
    make_credentials,
    paramiko_sftp,
    require_binary,
    require_paramiko,
    run_scp,
    run_sftp,
    start_service,
    string,
    uint32,
    uint64,
)

API_LISTENING = re.compile(r"API listening on (\S+) port (\d+)")
# A change reaches live sessions within this (the service promises a few seconds).
LIVE = 5
QUOTA = 1024 * 1024
# The largest write OpenSSH sftp, scp and paramiko send: du may pass the quota by one at most.
ONE_WRITE = 256 * 1024
ST_RDONLY = 1


def ssh_command(service):
    """The ``ssh`` command line rsync runs."""
    return " ".join([
        "ssh", "-F", "/dev/null", "-p", str(service.port),
        "-o", "StrictHostKeyChecking=no",
        "-o", f"UserKnownHostsFile={service.client_dir / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "PubkeyAuthentication=no",
        "-o", "PreferredAuthentications=password",
        "-o", "NumberOfPasswordPrompts=1",
        "-o", "BatchMode=no",
    ])


def run(argv, env=None, cwd=None, timeout=120):
    try:
        result = subprocess.run(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout, start_new_session=True,
        )
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{argv[0]} did not finish within {timeout}s\n{e.stdout}\n{e.stderr}")
    return result.returncode, result.stdout, result.stderr


def snapshot(root):
    """
    What is in the folder ``root``: for every entry (the root too), its type, size, mode,
    mtime, link count and contents (a link's target).
    """
    found = {}
    for folder, folders, files in os.walk(root):
        for name in [None, *folders, *files]:
            if name is None and folder != str(root):
                continue
            path = folder if name is None else os.path.join(folder, name)
            st = os.lstat(path)
            content = None
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    content = f.read()
            found[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode), st.st_size, stat.S_IMODE(st.st_mode),
                st.st_mtime_ns, st.st_nlink, content,
            )
    return found


def du(path):
    """The bytes ``du -sB1`` counts for ``path``."""
    rc, out, err = run(["du", "-sB1", str(path)])
    assert rc == 0, err
    return int(out.split()[0])


def asyncssh_or_skip():
    try:
        import asyncssh
    except ImportError:
        raise pyunittest.SkipTest("asyncssh is not installed (pip install '.[test]')")
    return asyncssh


class PolicyTestCase(unittest.TestCase):
    timeout = 600

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self, self.config())
        text = self.service.wait_for_log(lambda text: API_LISTENING.search(text))
        self.api_port = int(API_LISTENING.search(text).group(2))
        self.token = (self.service.storage / "api_token").read_text().strip()
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.local = self.service.root / "local"
        self.local.mkdir()

    def config(self):
        return default_config()

    # -- changing the policy ----------------------------------------------------------------

    def api(self, method, body=None, container="demo"):
        connection = http.client.HTTPConnection(HOST, self.api_port, timeout=30)
        try:
            connection.request(
                method, f"/containers/{container}/sftp/policy",
                body=None if body is None else json.dumps(body),
                headers={"Authorization": f"Bearer {self.token}",
                         "Content-Type": "application/json"},
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()

    def patch(self, **changes):
        """Change the policy with the API, as an operator would."""
        status, body = self.api("PATCH", changes)
        self.assertEqual(status, 200, body)
        for key, value in changes.items():
            if key not in ("allowed_ips",):
                self.assertEqual(body[key], value)
        return body

    def cli_set(self, *settings):
        """Change the policy with ``lightd-sftp policy set``, as an operator would."""
        result = self.service.cli("policy", "set", "demo", *settings, "--json")
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout)

    # -- clients ----------------------------------------------------------------------------

    def sftp(self, *lines, options=()):
        """OpenSSH sftp in batch mode; (exit code, stdout, stderr)."""
        if not options:
            return run_sftp(self.service, self.creds, list(lines), cwd=self.local)
        batch = self.service.client_dir / f"batch-{time.monotonic_ns()}"
        batch.write_text("".join(line + "\n" for line in lines))
        argv = [require_binary("sftp"), *_ssh_options(self.service, False), *options,
                "-b", str(batch), f"{self.creds['username']}@{HOST}"]
        return run(argv, env=self.askpass_env(), cwd=self.local)

    def scp(self, *paths, legacy=False):
        return run_scp(self.service, self.creds, *paths, options=("-O",) if legacy else ())

    def askpass_env(self):
        return _askpass_env(self.service, self.creds["password"])

    def require_rsync(self):
        require_binary("rsync")
        require_binary("ssh")
        from lightd_conch.rsync import findSandbox

        if shutil.which("bwrap") is None or findSandbox() is None:
            raise pyunittest.SkipTest("bubblewrap (bwrap) is not installed: rsync is not served")

    def rsync(self, *args):
        self.require_rsync()
        return run([shutil.which("rsync"), "-e", ssh_command(self.service), *args],
                   env=self.askpass_env())

    def remote(self, path):
        return f"{self.creds['username']}@{HOST}:{path}"

    def asyncssh(self, exercise):
        """
        Run ``exercise(sftp_client)`` (a coroutine function) in an asyncssh session; return
        what it returns.
        """
        asyncssh = asyncssh_or_skip()

        async def session():
            async with asyncssh.connect(
                HOST, self.service.port, username=self.creds["username"],
                password=self.creds["password"], known_hosts=None, client_keys=None,
                preferred_auth="password",
            ) as conn:
                async with conn.start_sftp_client() as client:
                    return await exercise(client)

        return asyncio.run(asyncio.wait_for(session(), 60))

    def local_file(self, name, data):
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def volume_file(self, name, data):
        path = self.volume / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def eventually(self, check, what, timeout=LIVE):
        """``check()`` is true within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                self.fail(f"not within {timeout}s: {what}")
            time.sleep(0.1)


# --- raw SFTP helpers ----------------------------------------------------------------------------


class Raw(RawSFTP):
    """RawSFTP with the requests the policy tests send, each answering what the server said."""

    next_id = 100

    def ask(self, ptype, *fields):
        self.next_id += 1
        self.request(ptype, self.next_id, *fields)
        reply = self.read_reply(self.next_id)
        self.testcase.assertIsNotNone(reply, "the channel closed")
        return reply

    def ask_extended(self, name, *fields):
        self.next_id += 1
        self.extended(self.next_id, name, *fields)
        reply = self.read_reply(self.next_id)
        self.testcase.assertIsNotNone(reply, "the channel closed")
        return reply

    def code(self, reply):
        """The status code of ``reply``, or FX_OK for a non-status reply."""
        ptype, reader = reply
        if ptype != 101:
            return FX_OK
        return reader.uint32()

    def status(self, reply):
        ptype, reader = reply
        self.testcase.assertEqual(ptype, 101, "expected a STATUS")
        return reader.uint32(), reader.string().decode()

    def open(self, path, pflags, permissions=None):
        """A handle, or the (code, message) the OPEN was refused with."""
        ptype, reader = self.ask(FXP_OPEN, string(path), uint32(pflags), attrs(permissions))
        if ptype == FXP_HANDLE:
            return reader.string()
        return reader.uint32(), reader.string().decode()

    def handle(self, path, pflags=PFLAG_READ):
        result = self.open(path, pflags)
        self.testcase.assertIsInstance(result, bytes, f"OPEN {path} refused: {result}")
        return result

    def opendir(self, path):
        ptype, reader = self.ask(FXP_OPENDIR, string(path))
        self.testcase.assertEqual(ptype, FXP_HANDLE)
        return reader.string()

    def close(self, handle):
        self.testcase.assertEqual(self.status(self.ask(FXP_CLOSE, string(handle)))[0], FX_OK)

    def write(self, handle, offset, data):
        return self.status(self.ask(FXP_WRITE, string(handle), uint64(offset), string(data)))

    def read(self, handle, offset, length):
        ptype, reader = self.ask(FXP_READ, string(handle), uint64(offset), uint32(length))
        self.testcase.assertEqual(ptype, FXP_DATA)
        return reader.string()

    def listing(self, path):
        handle = self.opendir(path)
        names = self.read_names(handle)
        self.close(handle)
        return names

    def read_names(self, handle):
        """The names READDIR of ``handle`` gives until its end, sorted, without . and .."""
        names = []
        while True:
            ptype, reader = self.ask(FXP_READDIR, string(handle))
            if ptype != FXP_NAME:
                break
            for _ in range(reader.uint32()):
                names.append(reader.string().decode())
                reader.string()
                flags = reader.uint32()
                if flags & 1:
                    reader.uint64()
                if flags & 2:
                    reader.uint32(), reader.uint32()
                if flags & 4:
                    reader.uint32()
                if flags & 8:
                    reader.uint32(), reader.uint32()
        return sorted(n for n in names if n not in (".", ".."))

    def statvfs(self, path="/"):
        ptype, reader = self.ask_extended("statvfs@openssh.com", string(path))
        self.testcase.assertEqual(ptype, FXP_EXTENDED_REPLY)
        names = ("bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail",
                 "fsid", "flag", "namemax")
        return dict(zip(names, (reader.uint64() for _ in names)))

    def copy_data(self, source, target, length=0, read_offset=0, write_offset=0):
        return self.status(self.ask_extended(
            "copy-data", string(source), uint64(read_offset), uint64(length), string(target),
            uint64(write_offset)))


def size_attrs(size):
    return uint32(ATTR_SIZE) + uint64(size)


def mode_attrs(mode):
    return uint32(ATTR_PERMISSIONS) + uint32(mode)


# --- read_only -----------------------------------------------------------------------------------


class ReadOnlyTests(PolicyTestCase):
    def fill(self):
        self.volume_file("f.txt", b"original")
        self.volume_file("d/inner.txt", b"inner")
        (self.volume / "empty").mkdir()
        os.symlink("f.txt", self.volume / "link")

    def test_every_request_refused(self):
        """
        Request by request, every SFTP request and extension that would change the volume is
        refused with PERMISSION_DENIED and changes nothing; reads, listings, stat and statvfs
        work, fsync of a read handle too.
        """
        self.fill()
        raw = Raw(self, self.service, self.creds)
        # A handle open for writing from before the change.
        early = raw.handle("f.txt", PFLAG_READ | PFLAG_WRITE)
        self.patch(read_only=True)
        before = snapshot(self.volume)

        for name, pflags in [
            ("f.txt", PFLAG_WRITE),
            ("f.txt", PFLAG_READ | PFLAG_WRITE),
            ("new.txt", PFLAG_WRITE | PFLAG_CREAT),
            ("new.txt", PFLAG_READ | PFLAG_CREAT),
            ("f.txt", PFLAG_READ | PFLAG_TRUNC),
            ("f.txt", PFLAG_WRITE | PFLAG_TRUNC),
            ("f.txt", PFLAG_READ | PFLAG_APPEND),
            ("f.txt", PFLAG_WRITE | PFLAG_APPEND),
            ("f.txt", PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC),
            ("link", PFLAG_WRITE),
        ]:
            self.assertEqual(raw.open(name, pflags)[0], FX_PERMISSION_DENIED, (name, pflags))

        reader = raw.handle("f.txt")
        folder = raw.opendir("d")
        refused = {
            "SETSTAT mode": raw.ask(FXP_SETSTAT, string("f.txt"), mode_attrs(0o600)),
            "SETSTAT size": raw.ask(FXP_SETSTAT, string("f.txt"), size_attrs(0)),
            "SETSTAT folder": raw.ask(FXP_SETSTAT, string("d"), mode_attrs(0o700)),
            "FSETSTAT mode": raw.ask(FXP_FSETSTAT, string(reader), mode_attrs(0o600)),
            "FSETSTAT size": raw.ask(FXP_FSETSTAT, string(reader), size_attrs(0)),
            "FSETSTAT folder": raw.ask(FXP_FSETSTAT, string(folder), mode_attrs(0o700)),
            "FSETSTAT early": raw.ask(FXP_FSETSTAT, string(early), size_attrs(100)),
            "WRITE early": raw.ask(FXP_WRITE, string(early), uint64(0), string(b"CHANGED")),
            "REMOVE": raw.ask(FXP_REMOVE, string("f.txt")),
            "REMOVE link": raw.ask(FXP_REMOVE, string("link")),
            "MKDIR": raw.ask(FXP_MKDIR, string("newdir"), attrs()),
            "RMDIR": raw.ask(FXP_RMDIR, string("empty")),
            "RENAME": raw.ask(FXP_RENAME, string("f.txt"), string("g.txt")),
            "SYMLINK": raw.ask(FXP_SYMLINK, string("f.txt"), string("newlink")),
            "posix-rename": raw.ask_extended(
                "posix-rename@openssh.com", string("f.txt"), string("d/inner.txt")),
            "hardlink": raw.ask_extended(
                "hardlink@openssh.com", string("f.txt"), string("hard")),
            "lsetstat": raw.ask_extended(
                "lsetstat@openssh.com", string("link"),
                uint32(8) + uint32(1000) + uint32(2000)),
            "copy-data": raw.ask_extended(
                "copy-data", string(reader), uint64(0), uint64(0), string(early), uint64(0)),
        }
        for what, reply in refused.items():
            self.assertEqual(raw.code(reply), FX_PERMISSION_DENIED, what)

        # What reads works.
        self.assertEqual(raw.read(reader, 0, 100), b"original")
        self.assertEqual(raw.status(raw.ask_extended("fsync@openssh.com", string(reader))),
                         (FX_OK, "Success"))
        self.assertEqual(raw.ask(FXP_STAT, string("f.txt"))[0], FXP_ATTRS)
        self.assertEqual(raw.ask(FXP_LSTAT, string("link"))[0], FXP_ATTRS)
        self.assertEqual(raw.ask(FXP_READLINK, string("link"))[0], FXP_NAME)
        self.assertEqual(raw.listing("/"), ["d", "empty", "f.txt", "link"])
        vfs = raw.statvfs()
        self.assertTrue(vfs["flag"] & ST_RDONLY)
        for handle in (reader, folder, early):
            raw.close(handle)
        self.assertEqual(snapshot(self.volume), before)

    def test_clients(self):
        """
        OpenSSH sftp, scp in both modes, rsync, paramiko and asyncssh: downloads work, uploads
        are refused with one clear line, and nothing changes.
        """
        self.fill()
        self.local_file("up.txt", b"upload")
        self.cli_set("read_only=true")
        before = snapshot(self.volume)

        rc, out, err = self.sftp("get f.txt got.txt", "ls")
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.local / "got.txt").read_bytes(), b"original")
        for command in ("put up.txt", "mkdir x", "rm f.txt", "rename f.txt g.txt",
                        "chmod 600 f.txt", "ln -s f.txt l2", "ln f.txt h2"):
            rc, out, err = self.sftp(command)
            self.assertEqual(rc, 1, command)
            self.assertIn("Permission denied", err, command)

        for legacy in (False, True):
            got = self.local / f"scp-{legacy}.txt"
            rc, _, err = self.scp(":/f.txt", str(got), legacy=legacy)
            self.assertEqual((rc, got.read_bytes()), (0, b"original"), err)
            rc, _, err = self.scp(str(self.local / "up.txt"), ":/up.txt", legacy=legacy)
            self.assertEqual(rc, 1, err)
            if legacy:
                self.assertEqual(err.strip().splitlines()[-1], "scp: the volume is read-only")
            else:
                self.assertIn("Permission denied", err)

        rc, _, err = self.rsync("-a", str(self.local / "up.txt"), self.remote("/"))
        self.assertNotEqual(rc, 0)
        self.assertIn("lightd-sftp: rsync refused: the volume is read-only", err)
        rc, _, err = self.rsync("-a", self.remote("/d/"), str(self.local / "rsynced") + "/")
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.local / "rsynced" / "inner.txt").read_bytes(), b"inner")
        # --remove-source-files on a download: the sender cannot remove from a read-only volume.
        self.rsync("-a", "--remove-source-files", self.remote("/d/"),
                   str(self.local / "rsynced2") + "/")

        client = paramiko_sftp(self, self.service, self.creds)
        self.assertEqual(client.open("f.txt").read(), b"original")
        self.assertRaises(PermissionError, client.put, str(self.local / "up.txt"), "up.txt")
        self.assertRaises(PermissionError, client.remove, "f.txt")
        self.assertRaises(PermissionError, client.truncate, "f.txt", 0)

        asyncssh = asyncssh_or_skip()

        async def exercise(sftp):
            data = await (await sftp.open("f.txt", "rb")).read()
            refused = []
            for attempt in (
                lambda: sftp.put(str(self.local / "up.txt"), "up.txt"),
                lambda: sftp.remove("f.txt"),
                lambda: sftp.mkdir("x"),
                lambda: sftp.remote_copy("f.txt", "copy.txt"),
            ):
                try:
                    await attempt()
                except asyncssh.SFTPPermissionDenied:
                    refused.append(True)
            return data, refused

        self.assertEqual(self.asyncssh(exercise), (b"original", [True] * 4))
        self.assertEqual(snapshot(self.volume), before)

    def test_live_change(self):
        """
        A session open before the change: within a few seconds of the CLI's change its writes
        are refused; after the API turns it off they work again.
        """
        client = paramiko_sftp(self, self.service, self.creds)
        with client.open("a.txt", "w") as f:
            f.write(b"one")
        self.cli_set("read_only=true")

        def refused():
            try:
                with client.open("b.txt", "w") as f:
                    f.write(b"x")
            except PermissionError:
                return True
            (self.volume / "b.txt").unlink()
            return False

        self.eventually(refused, "read_only reaches the live session")
        self.assertFalse((self.volume / "b.txt").exists())
        self.patch(read_only=False)
        with client.open("b.txt", "w") as f:
            f.write(b"two")
        self.assertEqual((self.volume / "b.txt").read_bytes(), b"two")


# --- quota_bytes ---------------------------------------------------------------------------------


class QuotaTests(PolicyTestCase):
    """
    Files the tests put in the volume themselves (as the container would) are there before
    the quota is set, which measures the volume; what the container writes afterwards is
    counted at the next measurement, every two minutes.
    """

    def quota(self):
        self.patch(quota_bytes=QUOTA)

    def assertWithinQuota(self, slack=ONE_WRITE):
        used = du(self.volume)
        self.assertLessEqual(used, QUOTA + slack, f"du says {used}, the quota is {QUOTA}")
        return used

    def test_sequential_uploads_and_df(self):
        """
        OpenSSH sftp: uploads fit until the quota, the next is refused ("disk quota exceeded")
        and lands no further than the quota; removing a file frees room at once; ``df`` shows
        the quota as the size.
        """
        self.quota()
        self.local_file("600k", os.urandom(600 * 1024))
        rc, out, err = self.sftp("put 600k a", "df")
        self.assertEqual(rc, 0, err)
        # df: Size Used Avail (root) %Capacity, in KiB.
        numbers = out.split("%Capacity")[1].split()
        self.assertEqual(int(numbers[0]), QUOTA // 1024)
        self.assertLessEqual(int(numbers[2]), (QUOTA - 600 * 1024) // 1024)
        rc, out, err = self.sftp("put 600k b")
        self.assertEqual(rc, 1, out)
        # OpenSSH sftp shows the status code's name, not the server's message.
        self.assertIn('write remote "/b": Failure', err)
        self.assertWithinQuota()
        rc, out, err = self.sftp("rm a", "put 600k b")
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.volume / "b").read_bytes(), (self.local / "600k").read_bytes())
        self.assertFalse((self.volume / "a").exists())
        self.assertWithinQuota()

    def test_parallel_uploads(self):
        """
        Six paramiko sessions uploading at once: the volume stays within the quota.
        """
        self.quota()
        data = os.urandom(400 * 1024)
        clients = [paramiko_sftp(self, self.service, self.creds) for _ in range(6)]
        outcomes = [None] * len(clients)

        def upload(index):
            try:
                # Each WRITE waits for its answer (paramiko's pipelined writes can lose a
                # refusal at close); the sessions still write at once.
                with clients[index].open(f"p{index}", "w") as f:
                    for offset in range(0, len(data), 32768):
                        f.write(data[offset:offset + 32768])
                outcomes[index] = "done"
            except OSError as e:
                outcomes[index] = str(e)

        threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        # Interleaved, they may all run out of room: at most two can finish.
        self.assertLessEqual(outcomes.count("done"), 2)
        self.assertEqual(outcomes.count("done") + outcomes.count("disk quota exceeded"), 6,
                         outcomes)
        self.assertWithinQuota(slack=32768)
        landed = 0
        for index, outcome in enumerate(outcomes):
            written = (self.volume / f"p{index}").read_bytes()
            landed += len(written)
            # What landed is what was sent, up to where the quota stopped it.
            self.assertEqual(written, data[:len(written)])
            if outcome == "done":
                self.assertEqual(written, data)
        self.assertLessEqual(landed, QUOTA)

    def test_sparse_truncate_copy_hardlink(self):
        """
        A sparse write far past the end, a truncate that extends (SETSTAT and FSETSTAT), a
        copy-data past the quota: each refused with "disk quota exceeded", the file as it was.
        A hardlink takes no room; its blocks are freed once the last name goes.
        """
        self.volume_file("big", os.urandom(700 * 1024))
        # Set by the CLI with no session live: measured at the first login.
        self.cli_set("quota_bytes=1M")
        raw = Raw(self, self.service, self.creds)
        handle = raw.handle("small", PFLAG_READ | PFLAG_WRITE | PFLAG_CREAT)
        quota = (FX_FAILURE, "disk quota exceeded")
        self.assertEqual(raw.write(handle, 10 * 1024**3, b"x"), quota)
        self.assertEqual(raw.write(handle, 400 * 1024, b"x"), quota)
        self.assertEqual(raw.status(raw.ask(FXP_FSETSTAT, string(handle), size_attrs(2**40))),
                         quota)
        self.assertEqual(raw.status(raw.ask(FXP_SETSTAT, string("small"), size_attrs(2**40))),
                         quota)
        self.assertEqual(raw.status(raw.ask(FXP_SETSTAT, string("big"), size_attrs(2**30))),
                         quota)
        self.assertEqual((self.volume / "small").stat().st_size, 0)
        self.assertEqual((self.volume / "big").stat().st_size, 700 * 1024)
        source = raw.handle("big")
        self.assertEqual(raw.copy_data(source, handle), quota)
        self.assertEqual((self.volume / "small").stat().st_size, 0)
        # Within the room left, it works.
        self.assertEqual(raw.write(handle, 0, b"y" * 1000), (FX_OK, "Success"))
        self.assertEqual(raw.copy_data(source, handle, length=100_000, write_offset=1000),
                         (FX_OK, "Success"))
        self.assertEqual((self.volume / "small").stat().st_size, 101_000)
        self.assertWithinQuota(slack=0)

        # Hardlinks: no room taken, none given back until the last name goes.
        self.assertEqual(raw.status(raw.ask_extended(
            "hardlink@openssh.com", string("big"), string("big2"))), (FX_OK, "Success"))
        self.assertEqual(raw.status(raw.ask(FXP_REMOVE, string("big"))), (FX_OK, "Success"))
        self.assertEqual(raw.write(handle, 101_000, b"z" * 250_000), quota)
        self.assertEqual(raw.status(raw.ask(FXP_REMOVE, string("big2"))), (FX_OK, "Success"))
        self.assertEqual(raw.write(handle, 101_000, b"z" * 250_000), (FX_OK, "Success"))
        self.assertWithinQuota(slack=0)
        for h in (handle, source):
            raw.close(h)

    def test_truncating_a_sparse_file_frees_only_its_blocks(self):
        """
        Sparse files the container made take little room; truncating them through the service
        (SETSTAT, FSETSTAT, OPEN with TRUNC) gives back only that, not their size.
        """
        for name in ("s1", "s2", "s3"):
            with open(self.volume / name, "wb") as f:
                f.truncate(256 * 1024**2)
        self.volume_file("real", os.urandom(900 * 1024))
        self.quota()
        client = paramiko_sftp(self, self.service, self.creds)
        client.truncate("s1", 0)
        with client.open("s2", "r+") as f:
            f.truncate(10)
        client.open("s3", "w").close()
        with self.assertRaises(OSError) as caught:
            with client.open("up", "w") as f:
                f.write(os.urandom(200 * 1024))
        self.assertEqual(str(caught.exception), "disk quota exceeded")
        self.assertWithinQuota()

    def test_openssh_cp_uses_copy_data(self):
        self.quota()
        self.local_file("600k", os.urandom(600 * 1024))
        rc, out, err = self.sftp("put 600k a", "cp a b")
        self.assertEqual(rc, 1, out)
        self.assertIn('Couldn\'t copy file "/a" to "/b": Failure', err)
        self.assertWithinQuota()
        self.assertLessEqual((self.volume / "b").stat().st_size, QUOTA - 600 * 1024)

    def test_scp_both_modes_and_rsync(self):
        """
        scp uploads past the quota fail and land no further than the quota; rsync uploads
        are refused with one line, downloads work.
        """
        self.volume_file("small", b"abc")
        self.quota()
        self.local_file("2m", os.urandom(2 * 1024 * 1024))
        for legacy in (False, True):
            rc, out, err = self.scp(str(self.local / "2m"), ":/up", legacy=legacy)
            self.assertEqual(rc, 1, (legacy, out, err))
            if legacy:
                self.assertEqual(err.strip().splitlines()[-1], "scp: /up: disk quota exceeded")
            else:
                self.assertIn('write remote "/up": Failure', err)
            self.assertWithinQuota()
            (self.volume / "up").unlink()
        rc, out, err = self.rsync("-a", str(self.local / "2m"), self.remote("/"))
        self.assertNotEqual(rc, 0)
        self.assertIn(
            "lightd-sftp: rsync refused: rsync uploads are not served for a volume with a disk"
            " quota", err)
        self.assertFalse((self.volume / "2m").exists())
        rc, out, err = self.rsync("-a", self.remote("/small"), str(self.local / "small"))
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.local / "small").read_bytes(), b"abc")

    def test_asyncssh_and_statvfs(self):
        asyncssh = asyncssh_or_skip()
        self.quota()
        self.local_file("2m", os.urandom(2 * 1024 * 1024))

        async def exercise(sftp):
            vfs = await sftp.statvfs("/")
            try:
                await sftp.put(str(self.local / "2m"), "up")
                refused = None
            except asyncssh.SFTPFailure as e:
                refused = e.reason
            return vfs.blocks * vfs.frsize, vfs.bavail * vfs.frsize, refused

        size, free, refused = self.asyncssh(exercise)
        self.assertEqual(size, QUOTA)
        self.assertLessEqual(free, QUOTA)
        self.assertGreater(free, QUOTA - 64 * 1024)
        self.assertEqual(refused, "disk quota exceeded")
        self.assertWithinQuota()

    def test_quota_by_symlinks(self):
        """
        Symlinks with long targets take blocks too: they cannot fill the volume past the quota.
        """
        self.quota()
        raw = Raw(self, self.service, self.creds)
        target = "t" * 4000
        results = []
        for index in range(400):
            results.append(raw.code(raw.ask(FXP_SYMLINK, string(target), string(f"l{index}"))))
            if results[-1] != FX_OK:
                break
        self.assertIn(FX_FAILURE, results)
        self.assertWithinQuota()

    def fill_folder(self, kind):
        """
        Add thousands of long names of ``kind`` to one folder, 500 requests at a time, until
        the service refuses one; the volume stays within the quota.
        """
        self.volume_file("f", b"")
        self.quota()
        raw = Raw(self, self.service, self.creds)
        last = FX_OK
        for batch in range(0, 10000, 250):
            sent = []
            for index in range(batch, batch + 250):
                raw.next_id += 1
                sent.append(raw.next_id)
                name = string(f"{kind}-{index:05d}-" + "n" * 230)
                if kind == "symlink":
                    raw.request(FXP_SYMLINK, raw.next_id, string("f"), name)
                elif kind == "hardlink":
                    raw.extended(raw.next_id, "hardlink@openssh.com", string("f"), name)
                else:
                    raw.request(FXP_OPEN, raw.next_id, name, uint32(PFLAG_WRITE | PFLAG_CREAT),
                                attrs())
            handles = []
            for request_id in sent:
                ptype, reader = raw.read_reply(request_id)
                if ptype == FXP_HANDLE:
                    handles.append(reader.string())
                else:
                    last = reader.uint32()
            for handle in handles:
                raw.close(handle)
            if last != FX_OK:
                break
        self.assertEqual(last, FX_FAILURE, kind)
        self.assertWithinQuota(slack=4096)

    def test_quota_by_folder_entries_symlinks(self):
        """
        Names take room in their folder's blocks: thousands of long names cannot fill the
        volume past the quota, be they links with short targets, hardlinks or empty files.
        """
        self.fill_folder("symlink")

    def test_quota_by_folder_entries_hardlinks(self):
        self.fill_folder("hardlink")

    def test_quota_by_folder_entries_files(self):
        self.fill_folder("file")

    def test_set_again_after_writes_without_it(self):
        """
        What was written while the quota was lifted counts once it is set again.
        """
        self.quota()
        client = paramiko_sftp(self, self.service, self.creds)
        self.patch(quota_bytes=0)
        with client.open("meanwhile", "w") as f:
            f.write(os.urandom(QUOTA))
        self.quota()
        self.assertGreater(du(self.volume), QUOTA)

        def refused():
            try:
                with client.open("after", "w") as f:
                    f.write(os.urandom(100 * 1024))
            except OSError as e:
                self.assertEqual(str(e), "disk quota exceeded")
                return True
            client.remove("after")
            return False

        # The measurement a new quota starts runs in the background.
        self.eventually(refused, "what was written without a quota counts")

    def test_live_change(self):
        """
        A quota set by the CLI while a session is live holds for that session within a few
        seconds; lifted by the API, the upload works.
        """
        client = paramiko_sftp(self, self.service, self.creds)
        data = os.urandom(2 * 1024 * 1024)
        client.open("first", "w").write(b"x" * 1000)
        self.cli_set("quota_bytes=1M")

        def refused():
            try:
                with client.open("up", "w") as f:
                    f.write(data)
            except OSError as e:
                self.assertEqual(str(e), "disk quota exceeded")
                return True
            return False

        self.eventually(refused, "the quota reaches the live session")
        # Until the measurement the new quota starts has ended, what is freed is not yet
        # known to have been counted; once it has, a truncating upload is held to the quota.
        time.sleep(1.5)
        self.assertTrue(refused())
        self.assertWithinQuota()
        self.patch(quota_bytes=0)
        with client.open("up", "w") as f:
            f.write(data)
        self.assertEqual((self.volume / "up").read_bytes(), data)


# --- denylist ------------------------------------------------------------------------------------


class DenylistTests(PolicyTestCase):
    DENYLIST = ["*.jar", "config/secrets/"]

    def fill(self):
        self.volume_file("a.jar", b"jar")
        self.volume_file("lib/b.jar", b"jar b")
        self.volume_file("config/secrets/key", b"secret key")
        self.volume_file("config/public.txt", b"public")
        self.volume_file("ok.txt", b"ok")
        os.symlink("a.jar", self.volume / "to-jar")
        os.symlink("config/secrets", self.volume / "to-secrets")
        os.symlink("config", self.volume / "to-config")

    def test_hidden_by_every_alias(self):
        """
        Listings hide denied entries; every request on them, by any alias, answers
        NO_SUCH_FILE, and nothing denied changes.
        """
        self.fill()
        self.patch(denylist=self.DENYLIST)
        raw = Raw(self, self.service, self.creds)
        self.assertEqual(raw.listing("/"), ["config", "lib", "ok.txt", "to-config", "to-jar",
                                            "to-secrets"])
        self.assertEqual(raw.listing("config"), ["public.txt"])
        self.assertEqual(raw.listing("to-config"), ["public.txt"])
        self.assertEqual(raw.listing("lib"), [])
        before = snapshot(self.volume)
        aliases = ["a.jar", "./a.jar", "lib/../a.jar", "/a.jar", "//a.jar", "to-jar",
                   "lib/b.jar", "config/secrets", "config/secrets/", "config/secrets/key",
                   "config/./secrets/key", "lib/../config/secrets/key", "to-secrets/key",
                   "to-config/secrets/key", "to-secrets", "to-secrets/"]
        for alias in aliases:
            for what, reply in {
                "STAT": raw.ask(FXP_STAT, string(alias)),
                "OPEN": raw.ask(FXP_OPEN, string(alias), uint32(PFLAG_READ), attrs()),
                "OPEN write": raw.ask(FXP_OPEN, string(alias), uint32(PFLAG_WRITE), attrs()),
                "OPENDIR": raw.ask(FXP_OPENDIR, string(alias)),
                "SETSTAT": raw.ask(FXP_SETSTAT, string(alias), mode_attrs(0o600)),
                "statvfs": raw.ask_extended("statvfs@openssh.com", string(alias)),
            }.items():
                self.assertEqual(raw.code(reply), FX_NO_SUCH_FILE, (what, alias))
            if alias in ("to-jar", "to-secrets", "to-secrets/"):
                continue  # the link itself is no secret: it may be renamed
            for what, reply in {
                "RENAME away": raw.ask(FXP_RENAME, string(alias), string("stolen")),
                "posix-rename away": raw.ask_extended(
                    "posix-rename@openssh.com", string(alias), string("stolen")),
                "hardlink away": raw.ask_extended(
                    "hardlink@openssh.com", string(alias), string("stolen")),
            }.items():
                self.assertEqual(raw.code(reply), FX_NO_SUCH_FILE, (what, alias))
        for alias in ["a.jar", "./a.jar", "lib/b.jar", "config/secrets/key", "to-secrets/key"]:
            for what, reply in {
                "LSTAT": raw.ask(FXP_LSTAT, string(alias)),
                "REMOVE": raw.ask(FXP_REMOVE, string(alias)),
                "lsetstat": raw.ask_extended("lsetstat@openssh.com", string(alias),
                                             mode_attrs(0o600)),
                "READLINK": raw.ask(FXP_READLINK, string(alias)),
            }.items():
                self.assertEqual(raw.code(reply), FX_NO_SUCH_FILE, (what, alias))
        # Onto a denied name.
        for what, reply in {
            "OPEN CREAT": raw.ask(FXP_OPEN, string("new.jar"),
                                  uint32(PFLAG_WRITE | PFLAG_CREAT), attrs()),
            "MKDIR": raw.ask(FXP_MKDIR, string("dir.jar"), attrs()),
            "MKDIR in": raw.ask(FXP_MKDIR, string("to-secrets/more"), attrs()),
            "RENAME onto": raw.ask(FXP_RENAME, string("ok.txt"), string("ok.jar")),
            "RENAME into": raw.ask(FXP_RENAME, string("ok.txt"), string("to-secrets/ok")),
            "posix-rename onto": raw.ask_extended(
                "posix-rename@openssh.com", string("ok.txt"), string("a.jar")),
            "hardlink onto": raw.ask_extended(
                "hardlink@openssh.com", string("ok.txt"), string("x.jar")),
            "SYMLINK named": raw.ask(FXP_SYMLINK, string("ok.txt"), string("l.jar")),
            "RMDIR": raw.ask(FXP_RMDIR, string("config/secrets")),
        }.items():
            self.assertEqual(raw.code(reply), FX_NO_SUCH_FILE, what)
        self.assertEqual(snapshot(self.volume), before)
        # A link made to a denied file leads nowhere.
        self.assertEqual(raw.code(raw.ask(FXP_SYMLINK, string("a.jar"), string("new-link"))),
                         FX_OK)
        self.assertEqual(raw.code(raw.ask(FXP_STAT, string("new-link"))), FX_NO_SUCH_FILE)
        self.assertEqual(raw.open("new-link", PFLAG_READ)[0], FX_NO_SUCH_FILE)

    def test_listing_opened_before_the_change(self):
        """
        A folder opened for listing before the denylist was set lists what it hides now.
        """
        self.fill()
        raw = Raw(self, self.service, self.creds)
        handle = raw.opendir("config")
        self.patch(denylist=self.DENYLIST)
        self.assertEqual(raw.read_names(handle), ["public.txt"])

    def test_renaming_a_folder_cannot_uncover(self):
        """
        Renaming a folder that holds a denied entry (config holds config/secrets/) would take
        it from under its pattern: refused, and the secret stays hidden.
        """
        self.fill()
        self.patch(denylist=self.DENYLIST)
        raw = Raw(self, self.service, self.creds)
        for name in ("config", "config/", "lib/../config"):
            for reply in (
                raw.ask(FXP_RENAME, string(name), string("cfg")),
                raw.ask_extended("posix-rename@openssh.com", string(name), string("cfg")),
            ):
                self.assertEqual(
                    raw.status(reply),
                    (FX_PERMISSION_DENIED, "the folder holds entries the denylist hides"), name)
            self.assertEqual(raw.code(raw.ask(FXP_STAT, string("cfg/secrets/key"))),
                             FX_NO_SUCH_FILE)
        self.assertEqual((self.volume / "config" / "secrets" / "key").read_bytes(),
                         b"secret key")
        # A folder whose hidden entries stay hidden where it goes is renamed as ever.
        self.assertEqual(raw.code(raw.ask(FXP_RENAME, string("lib"), string("lib2"))), FX_OK)
        self.assertEqual(raw.code(raw.ask(FXP_STAT, string("lib2/b.jar"))), FX_NO_SUCH_FILE)
        self.assertEqual(raw.code(raw.ask(FXP_RENAME, string("to-config"), string("c2"))), FX_OK)

    def test_renaming_a_big_folder(self):
        """
        A folder holding more than 10,000 entries is not moved while a pattern of several
        components is set (what is under it cannot all be checked); with patterns of one name
        only, it is.
        """
        (self.volume / "data").mkdir()
        for index in range(10_001):
            (self.volume / "data" / f"n{index}").touch()
        self.patch(denylist=self.DENYLIST)
        raw = Raw(self, self.service, self.creds)
        self.assertEqual(
            raw.status(raw.ask(FXP_RENAME, string("data"), string("data2"))),
            (FX_PERMISSION_DENIED, "too many entries to check against the denylist"))
        self.patch(denylist=["*.jar"])
        self.assertEqual(raw.code(raw.ask(FXP_RENAME, string("data"), string("data2"))), FX_OK)

    def test_clients(self):
        self.fill()
        self.cli_set("denylist=*.jar,config/secrets/")
        self.local_file("up.jar", b"upload")
        rc, out, err = self.sftp("ls -1a", "ls -1 config")
        self.assertEqual(rc, 0, err)
        self.assertNotIn("a.jar", out)
        self.assertNotIn("config/secrets", out)
        self.assertIn("config/public.txt", out)
        for command in ("get a.jar", "get to-secrets/key", "put up.jar", "get config/secrets/key"):
            rc, out, err = self.sftp(command)
            self.assertEqual(rc, 1, command)
            self.assertRegex(err, r'^(File ".*" not found\.|dest open "/up.jar": No such file or'
                                  r' directory)$', command)
        for legacy in (False, True):
            rc, _, err = self.scp(":/a.jar", str(self.local / "got"), legacy=legacy)
            self.assertEqual(rc, 1, err)
            self.assertIn("No such file or directory", err)
            rc, _, err = self.scp(str(self.local / "up.jar"), ":/up.jar", legacy=legacy)
            self.assertEqual(rc, 1, err)
            self.assertIn("No such file or directory", err)
            rc, _, err = self.scp(":/config", str(self.local / f"cfg-{legacy}"), legacy=legacy)
            # scp -r of config: public.txt comes, the secrets do not.
            rc, _, err = run_scp(self.service, self.creds, ":/config",
                                 str(self.local / f"cfg-{legacy}"),
                                 options=("-r",) + (("-O",) if legacy else ()))
            self.assertEqual(rc, 0, err)
            self.assertEqual(sorted(os.listdir(self.local / f"cfg-{legacy}")), ["public.txt"])
        self.assertFalse((self.local / "got").exists())
        self.assertFalse((self.volume / "up.jar").exists())
        for args in (("-a", self.remote("/ok.txt"), str(self.local / "r")),
                     ("-a", str(self.local / "up.jar"), self.remote("/"))):
            rc, out, err = self.rsync(*args)
            self.assertNotEqual(rc, 0)
            self.assertIn("lightd-sftp: rsync refused: rsync is not served for a volume with a"
                          " denylist", err)
        client = paramiko_sftp(self, self.service, self.creds)
        self.assertNotIn("a.jar", client.listdir("/"))
        self.assertRaises(FileNotFoundError, client.stat, "to-jar")
        self.assertRaises(FileNotFoundError, client.open, "config/secrets/key")
        asyncssh = asyncssh_or_skip()

        async def exercise(sftp):
            names = await sftp.listdir("config")
            try:
                await sftp.stat("lib/../a.jar")
                found = True
            except asyncssh.SFTPNoSuchFile:
                found = False
            return sorted(names), found

        self.assertEqual(self.asyncssh(exercise), ([".", "..", "public.txt"], False))

    def test_live_change(self):
        self.fill()
        client = paramiko_sftp(self, self.service, self.creds)
        self.assertIn("a.jar", client.listdir("/"))
        self.cli_set("denylist=*.jar")
        self.eventually(lambda: "a.jar" not in client.listdir("/"),
                        "the denylist reaches the live session")
        self.assertRaises(FileNotFoundError, client.stat, "a.jar")
        self.patch(denylist=[])
        self.assertEqual(client.open("a.jar").read(), b"jar")


# --- write locks ---------------------------------------------------------------------------------


class WriteLockTests(PolicyTestCase):
    LOCKED = "file is locked by another writer"

    def test_one_writer_across_sessions(self):
        self.volume_file("f", b"original")
        first = paramiko_sftp(self, self.service, self.creds)
        second = paramiko_sftp(self, self.service, self.creds)
        writer = first.open("f", "r+")
        for mode in ("r+", "w", "a"):
            with self.assertRaises(OSError) as caught:
                second.open("f", mode)
            self.assertEqual(str(caught.exception), self.LOCKED, mode)
        self.assertEqual(second.open("f").read(), b"original")
        # TRUNC without WRITE cannot truncate a file another writer holds.
        raw = Raw(self, self.service, self.creds)
        self.assertEqual(raw.open("f", PFLAG_READ | PFLAG_TRUNC), (FX_FAILURE, self.LOCKED))
        self.assertEqual((self.volume / "f").read_bytes(), b"original")
        writer.write(b"ORIG")
        writer.close()
        with second.open("f", "r+") as f:
            f.write(b"o")
        self.assertEqual((self.volume / "f").read_bytes(), b"oRIGinal")

    def test_scp_and_asyncssh_are_kept_out(self):
        """
        While a paramiko session writes a file, scp (both modes) and asyncssh uploads to it
        are refused and the file is left as it was.
        """
        self.volume_file("f", b"original")
        self.local_file("up", b"uploaded")
        writer = paramiko_sftp(self, self.service, self.creds).open("f", "r+")
        for legacy in (False, True):
            rc, _, err = self.scp(str(self.local / "up"), ":/f", legacy=legacy)
            self.assertEqual(rc, 1, err)
            if legacy:
                self.assertEqual(err.strip().splitlines()[-1],
                                 "scp: /f: file is locked by another writer")
            else:
                self.assertIn('dest open "/f": Failure', err)
        asyncssh = asyncssh_or_skip()

        async def exercise(sftp):
            try:
                await sftp.put(str(self.local / "up"), "f")
            except asyncssh.SFTPFailure as e:
                return e.reason

        self.assertEqual(self.asyncssh(exercise), self.LOCKED)
        self.assertEqual((self.volume / "f").read_bytes(), b"original")
        writer.close()
        rc, _, err = self.scp(str(self.local / "up"), ":/f", legacy=True)
        self.assertEqual((rc, (self.volume / "f").read_bytes()), (0, b"uploaded"), err)

    def test_container_locks(self):
        """
        A process in the container holding a POSIX (lockf) or OFD lock keeps SFTP writers out
        and the file as it was; an SFTP writer makes a non-blocking lock fail; readers pass.
        """
        path = self.volume_file("f", b"original")
        client = paramiko_sftp(self, self.service, self.creds)
        ofd_lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        for kind in ("lockf", "ofd"):
            fd = os.open(path, os.O_RDWR)
            try:
                if kind == "lockf":
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, ofd_lock)
                for mode in ("w", "r+"):
                    with self.assertRaises(OSError) as caught:
                        client.open("f", mode)
                    self.assertEqual(str(caught.exception), self.LOCKED)
                self.assertEqual(client.open("f").read(), b"original")
                self.assertEqual(path.read_bytes(), b"original")
            finally:
                os.close(fd)
        writer = client.open("f", "r+")
        fd = os.open(path, os.O_RDWR)
        try:
            self.assertRaises(OSError, fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.assertRaises(OSError, fcntl.fcntl, fd, fcntl.F_OFD_SETLK, ofd_lock)
            # A reader's shared lock is blocked too, but reading is not.
            self.assertEqual(os.pread(fd, 100, 0), b"original")
            writer.close()
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)

    def test_reput_after_killed_client(self):
        """
        An OpenSSH sftp upload killed (SIGKILL) part way leaves no lock behind: ``reput``
        from a new client finishes it.
        """
        data = os.urandom(8 * 1024 * 1024)
        self.local_file("big", data)
        batch = self.service.client_dir / "put-batch"
        batch.write_text("put big big\n")
        argv = [require_binary("sftp"), *_ssh_options(self.service, False), "-l", "8000",
                "-b", str(batch), f"{self.creds['username']}@{HOST}"]
        process = subprocess.Popen(argv, env=self.askpass_env(), cwd=self.local,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        target = self.volume / "big"
        self.eventually(lambda: target.exists() and target.stat().st_size > 512 * 1024,
                        "part of the upload landed", timeout=60)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        self.assertLess(target.stat().st_size, len(data))
        rc, out, err = self.sftp("reput big big")
        self.assertEqual(rc, 0, err)
        self.assertEqual(target.read_bytes(), data)


class RsyncLiveChangeTests(PolicyTestCase):
    """
    rsync works in its sandbox, checked when it starts: a policy change made while it runs
    that would have refused it ends it, the file it was receiving is not left behind, and the
    file it was replacing stays as it was. A change that still admits it lets it finish.
    """

    SIZE = 8 * 1024 * 1024

    def slow_rsync(self, *args):
        """An rsync at 256 KiB/s in the background: the process."""
        self.require_rsync()
        argv = [shutil.which("rsync"), "-e", ssh_command(self.service), "--bwlimit=256", *args]
        process = subprocess.Popen(argv, env=self.askpass_env(), cwd=self.local,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.addCleanup(lambda: process.poll() is None and os.killpg(process.pid, signal.SIGKILL))
        return process

    def receiving(self):
        """The temporary files rsync is receiving into (``.big.bin.XXXXXX``)."""
        return [name for name in os.listdir(self.volume) if name.startswith(".big.bin.")]

    def upload_ended_by(self, *settings, why):
        (self.volume / "big.bin").write_bytes(b"the old file")
        self.local_file("big.bin", os.urandom(self.SIZE))
        process = self.slow_rsync(str(self.local / "big.bin"), self.remote("/"))
        self.eventually(lambda: any(os.path.getsize(self.volume / name) > 256 * 1024
                                    for name in self.receiving()),
                        "rsync receiving", timeout=60)
        changed = time.monotonic()
        self.cli_set(*settings)
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - changed
        self.assertNotEqual(process.returncode, 0, err)
        self.assertIn(f"lightd-sftp: rsync ended: {why}", err)
        self.assertLess(took, LIVE + 5, "rsync went on after the change")
        self.assertEqual((self.volume / "big.bin").read_bytes(), b"the old file")
        self.assertEqual(self.receiving(), [])

    def test_read_only_ends_an_upload(self):
        self.upload_ended_by("read_only=true", why="the volume is read-only")

    def test_quota_ends_an_upload(self):
        self.upload_ended_by("quota_bytes=100M",
                             why="rsync uploads are not served for a volume with a disk quota")

    def test_denylist_ends_a_download(self):
        (self.volume / "big.bin").write_bytes(os.urandom(self.SIZE))
        process = self.slow_rsync(self.remote("/big.bin"), str(self.local) + "/")
        self.eventually(lambda: any(name.startswith(".big.bin.") for name in os.listdir(self.local)),
                        "rsync receiving", timeout=60)
        self.cli_set("denylist=secret/")
        out, err = process.communicate(timeout=60)
        self.assertNotEqual(process.returncode, 0, err)
        self.assertIn("lightd-sftp: rsync ended: rsync is not served for a volume with a denylist",
                      err)
        self.assertFalse((self.local / "big.bin").exists())

    def test_read_only_lets_a_download_finish(self):
        data = os.urandom(2 * 1024 * 1024)
        (self.volume / "big.bin").write_bytes(data)
        process = self.slow_rsync(self.remote("/big.bin"), str(self.local) + "/")
        self.eventually(lambda: any(name.startswith(".big.bin.") for name in os.listdir(self.local)),
                        "rsync receiving", timeout=60)
        self.cli_set("read_only=true")
        out, err = process.communicate(timeout=60)
        self.assertEqual(process.returncode, 0, err)
        self.assertEqual((self.local / "big.bin").read_bytes(), data)


# --- the login gate: suspended, allowed_ips, password_login --------------------------------------


class LoginGateTests(PolicyTestCase):
    def config(self):
        config = default_config()
        # Three failed logins would ban the address: refused logins must not count.
        config["sftp"]["defender"] = {"threshold": 3}
        return config

    def assertRefused(self, why):
        """
        OpenSSH sftp, scp (both modes), rsync, paramiko and asyncssh are refused with ``why``,
        one log line each, no failed-login line; these eight refusals do not ban the address.
        """
        asyncssh = asyncssh_or_skip()
        refused_before = len(self.service.log_lines("login refused", why))
        for _ in range(2):
            rc, out, err = self.sftp("ls")
            self.assertEqual(rc, 255, out)
            self.assertIn(why, err)
        self.local_file("x", b"x")
        for legacy in (False, True):
            rc, out, err = self.scp(str(self.local / "x"), ":/x", legacy=legacy)
            self.assertNotEqual(rc, 0, err)
            self.assertIn(why, err)
        rc, out, err = self.rsync(str(self.local / "x"), self.remote("/"))
        self.assertNotEqual(rc, 0)
        self.assertIn(why, err)
        self.assertFalse((self.volume / "x").exists())
        transport = self.paramiko.Transport((HOST, self.service.port))
        self.addCleanup(transport.close)
        transport.start_client(timeout=30)
        self.assertRaises(Exception, transport.auth_password, self.creds["username"],
                          self.creds["password"])
        self.assertFalse(transport.is_authenticated())
        transport.close()

        async def login():
            try:
                async with asyncssh.connect(
                    HOST, self.service.port, username=self.creds["username"],
                    password=self.creds["password"], known_hosts=None, client_keys=None,
                    preferred_auth="password",
                ):
                    return None
            except asyncssh.DisconnectError as e:
                return e.reason

        for _ in range(2):
            self.assertEqual(asyncio.run(asyncio.wait_for(login(), 60)), why)
        self.service.wait_for_log(
            lambda text: len(self.service.log_lines("login refused", why)) >= refused_before + 8)
        self.assertEqual(len(self.service.log_lines("login refused", why)), refused_before + 8)
        self.assertEqual(self.service.log_lines("failed login"), [])

    def assertAdmitted(self):
        rc, out, err = self.sftp("ls")
        self.assertEqual(rc, 0, err)

    def assertLiveSessionEnds(self, change, why):
        client = paramiko_sftp(self, self.service, self.creds)
        client.listdir("/")
        change()
        transport = client.get_channel().get_transport()
        self.eventually(lambda: not transport.is_active(), f"the live session ends ({why})")
        self.assertTrue(self.service.log_lines("ending session", why))

    def test_suspended(self):
        self.patch(suspended=True)
        self.assertRefused("the container is suspended")
        self.patch(suspended=False)
        self.assertAdmitted()
        self.assertLiveSessionEnds(lambda: self.cli_set("suspended=true"),
                                   "the container is suspended")

    def test_allowed_ips(self):
        why = "logins from this address are not allowed for this container"
        self.patch(allowed_ips=["10.0.0.0/8"])
        self.assertRefused(why)
        self.assertEqual(self.patch(allowed_ips=["127.0.0.0/8"])["allowed_ips"], ["127.0.0.0/8"])
        self.assertAdmitted()
        self.assertEqual(self.patch(allowed_ips=["::ffff:127.0.0.1"])["allowed_ips"],
                         ["127.0.0.1/32"])
        self.assertAdmitted()
        self.patch(allowed_ips=["10.0.0.0/8", "::1"])
        self.assertRefused(why)
        self.patch(allowed_ips=[])
        self.assertLiveSessionEnds(lambda: self.cli_set("allowed_ips=10.0.0.0/8"), why)

    def test_password_login(self):
        why = "password logins are disabled for this container"
        self.patch(password_login=False)
        self.assertRefused(why)
        self.patch(password_login=True)
        self.assertAdmitted()
        self.assertLiveSessionEnds(lambda: self.patch(password_login=False), why)


class BandwidthTests(PolicyTestCase):
    """
    bandwidth_down and bandwidth_up: every protocol's transfers of the container are held to
    the rate, together; nothing is lost, and another container is not held back. Only lower
    bounds on the time are asserted (a busy machine makes transfers slower, never faster).
    """

    RATE = 1024 * 1024
    SIZE = 3 * 1024 * 1024
    # What may move above the rate: the bucket's burst (a quarter second, at least 64 KiB).
    SLACK = 0.5

    def minimum(self, size):
        return size / self.RATE - self.SLACK

    def timed(self, call, *args, **kwargs):
        start = time.monotonic()
        result = call(*args, **kwargs)
        return result, time.monotonic() - start

    def test_downloads_of_every_protocol(self):
        payload = os.urandom(self.SIZE)
        self.volume_file("big.bin", payload)
        self.patch(bandwidth_down=self.RATE)
        (rc, _, err), took = self.timed(self.sftp, "get big.bin sftp.bin")
        self.assertEqual(rc, 0, err)
        self.assertGreaterEqual(took, self.minimum(self.SIZE), "OpenSSH sftp")
        (rc, _, err), took = self.timed(
            self.scp, ":/big.bin", str(self.local / "scp.bin"), legacy=True
        )
        self.assertEqual(rc, 0, err)
        self.assertGreaterEqual(took, self.minimum(self.SIZE), "legacy scp")
        (rc, _, err), took = self.timed(self.rsync, self.remote("/big.bin"), str(self.local / "rsync.bin"))
        self.assertEqual(rc, 0, err)
        self.assertGreaterEqual(took, self.minimum(self.SIZE), "rsync")
        client = paramiko_sftp(self, self.service, self.creds)
        _, took = self.timed(client.get, "big.bin", str(self.local / "paramiko.bin"))
        self.assertGreaterEqual(took, self.minimum(self.SIZE), "paramiko")

        async def fetch(client):
            await client.get("big.bin", str(self.local / "asyncssh.bin"))

        _, took = self.timed(self.asyncssh, fetch)
        self.assertGreaterEqual(took, self.minimum(self.SIZE), "asyncssh")
        for name in ("sftp", "scp", "rsync", "paramiko", "asyncssh"):
            self.assertEqual((self.local / f"{name}.bin").read_bytes(), payload, name)

    def test_uploads_are_held_and_intact(self):
        payload = self.local_file("up.bin", os.urandom(self.SIZE * 2)).read_bytes()
        self.cli_set("bandwidth_up=1M")
        # The client's first window (2 MiB) goes out at once; the rest waits for the rate.
        window = 2 * 1024 * 1024
        (rc, _, err), took = self.timed(self.sftp, "put up.bin sftp.bin")
        self.assertEqual(rc, 0, err)
        self.assertGreaterEqual(took, self.minimum(len(payload) - window))
        (rc, _, err), took = self.timed(
            self.scp, str(self.local / "up.bin"), ":/scp.bin", legacy=True
        )
        self.assertEqual(rc, 0, err)
        self.assertGreaterEqual(took, self.minimum(len(payload) - window))
        for name in ("sftp.bin", "scp.bin"):
            self.assertEqual((self.volume / name).read_bytes(), payload, name)

    def test_shared_by_the_containers_sessions_not_by_others(self):
        payload = os.urandom(self.SIZE // 2)
        self.volume_file("a.bin", payload)
        self.volume_file("b.bin", payload)
        other = make_credentials(self.service, "other")
        (self.service.volume("other") / "c.bin").write_bytes(os.urandom(self.SIZE))
        clients = [paramiko_sftp(self, self.service, self.creds) for _ in range(2)]
        otherClient = paramiko_sftp(self, self.service, other)
        # Set while the sessions are live: it reaches them within the watcher's second.
        self.patch(bandwidth_down=self.RATE)
        time.sleep(1.5)
        results = {}

        def fetch(client, name):
            start = time.monotonic()
            client.get(f"{name}.bin", str(self.local / f"{name}.got"))
            results[name] = time.monotonic() - start

        threads = [threading.Thread(target=fetch, args=(c, n)) for c, n in zip(clients, "ab")]
        start = time.monotonic()
        for thread in threads:
            thread.start()
        fetch(otherClient, "c")
        for thread in threads:
            thread.join(120)
        both = time.monotonic() - start
        self.assertGreaterEqual(both, self.minimum(self.SIZE), "the two sessions share one rate")
        self.assertLess(results["c"], both, "the other container was held back")
        for name in "ab":
            self.assertEqual((self.local / f"{name}.got").read_bytes(), payload)
