"""
The compatibility suite: the clients users come with, as real binaries against the real service.
OpenSSH ``sftp`` (defaults and ``-B 261120 -R 64``), ``scp`` (SFTP mode and legacy ``-O``),
sshfs, rclone, lftp, rsync over ssh, paramiko and asyncssh. Each test checks what the user sees
and what lands in the volume; the hostile cases check that nothing lands anywhere else.

A missing client skips its tests with the reason; CI installs them all and fails on a skip.
"""

import asyncio
import json
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
import unittest as pyunittest
from pathlib import Path

from twisted.trial import unittest

from tests.harness import (
    CLIENT_TIMEOUT,
    HOST,
    _askpass_env,
    make_credentials,
    paramiko_sftp,
    paramiko_transport,
    require_binary,
    run_scp,
    run_sftp,
    start_service,
    within,
)

OLD_MTIME = 1_000_000_000  # 2001-09-09T01:46:40Z


def ssh_command(service):
    """The ``ssh`` command line (as one string) that rsync, lftp and friends run."""
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


class ClientTestCase(unittest.TestCase):
    timeout = 600

    def setUp(self):
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.local = self.service.root / "local"
        self.local.mkdir()
        self.outside = Path(tempfile.mkdtemp(prefix="lightd-outside-"))
        self.addCleanup(shutil.rmtree, self.outside, ignore_errors=True)
        self.sentinel = self.outside / "secret"
        self.sentinel.write_bytes(b"host secret")

    def assertSentinelUntouched(self):
        self.assertEqual(self.sentinel.read_bytes(), b"host secret")
        self.assertEqual(sorted(p.name for p in self.outside.iterdir()), ["secret"])

    def local_file(self, name, data, mode=0o644, mtime=None):
        path = self.local / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def volume_file(self, name, data, mtime=None):
        path = self.volume / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def big_directory(self, name="many"):
        """
        A directory of 1,200 entries, 300 of them with 240-byte names: more
        than one READDIR reply, filled both by count and by size.
        """
        names = [f"entry-{i:04d}" for i in range(900)]
        names += [f"long-{i:03d}-" + "n" * 231 for i in range(300)]
        folder = self.volume / name
        folder.mkdir()
        for entry in names:
            (folder / entry).write_bytes(b"")
        return sorted(names)

    def sftp(self, *lines, options=()):
        rc, out, err = run_sftp_with(self.service, self.creds, list(lines), self.local, options)
        self.assertEqual(rc, 0, f"sftp batch failed\nstdout:\n{out}\nstderr:\n{err}")
        return out, err

    def askpass_env(self):
        return _askpass_env(self.service, self.creds["password"])


def run_sftp_with(service, creds, lines, cwd, options):
    """run_sftp with extra command-line options (e.g. -B, -R, -vvv) before the destination."""
    if not options:
        return run_sftp(service, creds, lines, cwd=cwd)
    sftp = require_binary("sftp")
    from tests.harness import _ssh_options

    batch = service.client_dir / f"batch-{time.monotonic_ns()}"
    batch.write_text("".join(line + "\n" for line in lines))
    argv = [sftp, *_ssh_options(service, False), *options, "-b", str(batch),
            f"{creds['username']}@{HOST}"]
    return run(argv, env=_askpass_env(service, creds["password"]), cwd=cwd)


# --- OpenSSH sftp -----------------------------------------------------------------------------


class OpenSSHSftpTests(ClientTestCase):
    def setUp(self):
        require_binary("sftp")
        super().setUp()

    def test_extensions_and_255k_reads(self):
        """
        ``sftp -vvv`` shows every extension and that limits@ raised its buffers to 255 KiB;
        a 2 MiB download then takes 9 reads of 261120 bytes.
        """
        data = os.urandom(2 * 1024 * 1024)
        self.volume_file("big", data)
        _, err = self.sftp("get big", options=("-vvv",))
        for name in ("posix-rename@openssh.com", "statvfs@openssh.com", "fstatvfs@openssh.com",
                     "hardlink@openssh.com", "fsync@openssh.com", "lsetstat@openssh.com",
                     "limits@openssh.com", "expand-path@openssh.com", "copy-data",
                     "users-groups-by-id@openssh.com"):
            self.assertIn(f'Server supports extension "{name}"', err)
        self.assertIn("server upload/download buffer sizes 261120 / 261120; using 261120 / 261120",
                      err)
        self.assertIn("Received data 0 -> 261119", err)
        self.assertEqual(err.count("Received data "), 9)
        self.assertEqual((self.local / "big").read_bytes(), data)

    def check_batch(self, options):
        upload = self.local_file("up.bin", os.urandom(700_000), mode=0o640, mtime=OLD_MTIME)
        self.volume_file("down.bin", b"d" * 300_000, mtime=OLD_MTIME)
        self.volume_file("old.txt", b"to be replaced")
        partial = os.urandom(600_000)
        self.volume_file("resume-up.bin", partial[:100_000])
        self.local_file("resume-up.bin", partial)
        self.volume_file("resume-down.bin", partial)
        self.local_file("resume-down.bin", partial[:250_000])
        out, _ = self.sftp(
            "put -p up.bin",
            "get -p down.bin",
            "reput resume-up.bin",
            "reget resume-down.bin",
            "df -h",
            "ln up.bin hard.bin",
            "ln -s up.bin soft.bin",
            "cp up.bin copy.bin",
            "chmod 600 copy.bin",
            "put up.bin new.txt",
            "rename new.txt old.txt",
            "mkdir dir",
            "mkdir dir/gone",
            "rmdir dir/gone",
            options=options,
        )
        up = self.volume / "up.bin"
        self.assertEqual(up.read_bytes(), upload.read_bytes())
        self.assertEqual(stat.S_IMODE(up.stat().st_mode), 0o640)
        self.assertEqual(up.stat().st_mtime, OLD_MTIME)
        down = self.local / "down.bin"
        self.assertEqual(down.read_bytes(), b"d" * 300_000)
        self.assertEqual(down.stat().st_mtime, OLD_MTIME)
        self.assertEqual((self.volume / "resume-up.bin").read_bytes(), partial)
        self.assertEqual((self.local / "resume-down.bin").read_bytes(), partial)
        self.assertRegex(out, r"Size\s+Used\s+Avail\s+\(root\)\s+%Capacity")
        self.assertEqual((self.volume / "hard.bin").stat().st_ino, up.stat().st_ino)
        self.assertEqual(os.readlink(self.volume / "soft.bin"), "up.bin")
        copy = self.volume / "copy.bin"
        self.assertEqual(copy.read_bytes(), upload.read_bytes())
        self.assertNotEqual(copy.stat().st_ino, up.stat().st_ino)
        self.assertEqual(stat.S_IMODE(copy.stat().st_mode), 0o600)
        self.assertEqual((self.volume / "old.txt").read_bytes(), upload.read_bytes())
        self.assertFalse((self.volume / "new.txt").exists())
        self.assertTrue((self.volume / "dir").is_dir())
        self.assertFalse((self.volume / "dir" / "gone").exists())

    def test_batch_with_defaults(self):
        self.check_batch(())

    def test_batch_with_big_buffers(self):
        self.check_batch(("-B", "261120", "-R", "64"))

    def test_ls_long_of_10000_entries(self):
        many = self.volume / "many"
        many.mkdir()
        for i in range(10_000):
            (many / f"f{i:05d}").write_bytes(b"")
        out, _ = self.sftp("ls -l many")
        lines = [line for line in out.splitlines() if line.startswith("-rw-r--r--")]
        self.assertEqual(len(lines), 10_000)
        self.assertTrue(lines[0].endswith("many/f00000"), lines[0])
        self.assertTrue(lines[-1].endswith("many/f09999"), lines[-1])

    def test_df_shows_the_volumes_filesystem(self):
        out, _ = self.sftp("df")
        size = int(out.splitlines()[-1].split()[0])  # 1 KiB blocks
        real = os.statvfs(self.volume)
        self.assertEqual(size, real.f_blocks * real.f_frsize // 1024)

    def test_ln_cannot_reach_outside(self):
        os.symlink(self.outside, self.volume / "out")
        rc, out, err = run_sftp(self.service, self.creds,
                                ["-ln out/secret stolen", "-cp out/secret copied",
                                 "-rename out/secret moved", "-ln -s /etc/passwd pw", "get pw"],
                                cwd=self.local)
        self.assertFalse((self.volume / "stolen").exists())
        self.assertFalse((self.volume / "copied").exists())
        self.assertNotEqual(rc, 0, "the link to /etc/passwd leads to the volume's /etc/passwd")
        self.assertFalse((self.local / "pw").exists())
        self.assertSentinelUntouched()


# --- scp ---------------------------------------------------------------------------------------


class ScpTests(ClientTestCase):
    def setUp(self):
        require_binary("scp")
        super().setUp()

    def scp(self, *paths, options=()):
        rc, out, err = run_scp(self.service, self.creds, *paths, options=options)
        self.assertEqual(rc, 0, f"scp {options} {paths} failed\nstdout:\n{out}\nstderr:\n{err}")

    def check_files_tree_and_home(self, legacy):
        options = ("-O",) if legacy else ()
        self.local_file("a.txt", b"alpha", mode=0o600, mtime=OLD_MTIME)
        self.local_file("tree/one", b"1")
        self.local_file("tree/sub/two", b"22", mtime=OLD_MTIME)
        self.scp(str(self.local / "a.txt"), ":/a.txt", options=options)
        self.scp(str(self.local / "a.txt"), ":~/p.txt", options=(*options, "-p"))
        self.scp(str(self.local / "tree"), ":~/tree", options=(*options, "-r", "-p"))
        self.assertEqual((self.volume / "a.txt").read_bytes(), b"alpha")
        preserved = (self.volume / "p.txt").stat()
        self.assertEqual((preserved.st_mtime, stat.S_IMODE(preserved.st_mode)), (OLD_MTIME, 0o600))
        self.assertEqual((self.volume / "tree" / "sub" / "two").read_bytes(), b"22")
        self.assertEqual((self.volume / "tree" / "sub" / "two").stat().st_mtime, OLD_MTIME)
        back = self.local / "back"
        self.scp(":~/tree", str(back), options=(*options, "-r", "-p"))
        self.assertEqual((back / "one").read_bytes(), b"1")
        self.assertEqual((back / "sub" / "two").stat().st_mtime, OLD_MTIME)
        self.scp(":/p.txt", str(self.local / "p-back.txt"), options=(*options, "-p"))
        self.assertEqual((self.local / "p-back.txt").stat().st_mtime, OLD_MTIME)

    def test_sftp_mode(self):
        self.check_files_tree_and_home(legacy=False)

    def test_legacy_mode(self):
        self.check_files_tree_and_home(legacy=True)

    def test_legacy_missing_file(self):
        rc, _, err = run_scp(self.service, self.creds, ":/nope", str(self.local / "x"),
                             options=("-O",))
        self.assertEqual(rc, 1)
        self.assertIn("/nope: No such file or directory", err)

    def test_legacy_hostile_names_are_plain_names(self):
        """
        ``scp -O`` sends the remote path to be read by a shell. Here it is a plain name: a path
        inside the volume, never a command, and nothing appears in /tmp.
        """
        owned = Path("/tmp/owned")
        self.assertFalse(owned.exists(), "/tmp/owned exists before the test")
        self.addCleanup(lambda: owned.unlink() if owned.exists() else None)
        source = self.local_file("payload", b"payload")
        # No directory "$(touch " in the volume: the copy fails like any missing directory.
        rc, _, err = run_scp(self.service, self.creds, str(source), ":$(touch /tmp/owned)",
                             options=("-O",))
        self.assertEqual(rc, 1, err)
        self.assertIn("/$(touch /tmp/owned): No such file or directory", err)
        self.assertFalse(owned.exists())
        # Given that directory, the file lands under that literal name, inside the volume.
        (self.volume / "$(touch " / "tmp").mkdir(parents=True)
        self.scp(str(source), ":$(touch /tmp/owned)", options=("-O",))
        self.assertEqual((self.volume / "$(touch " / "tmp" / "owned)").read_bytes(), b"payload")
        for name in ("`touch owned2`", "a;touch owned3", "$(touch owned4)"):
            self.scp(str(source), ":" + name, options=("-O",))
            self.assertEqual((self.volume / name).read_bytes(), b"payload")
        self.scp(str(source), ":../../../escaped", options=("-O",))
        self.assertEqual((self.volume / "escaped").read_bytes(), b"payload")
        self.assertFalse(owned.exists())
        for name in ("owned2", "owned3", "owned4"):
            self.assertFalse((self.service.root / name).exists())
            self.assertFalse(Path("/", name).exists())

    def test_legacy_through_planted_link(self):
        os.symlink(self.outside, self.volume / "out")
        source = self.local_file("payload", b"payload")
        rc, _, _ = run_scp(self.service, self.creds, str(source), ":out/new", options=("-O",))
        self.assertEqual(rc, 1)
        rc, _, _ = run_scp(self.service, self.creds, ":out/secret", str(self.local / "s"),
                           options=("-O",))
        self.assertEqual(rc, 1)
        self.assertFalse((self.local / "s").exists())
        self.assertSentinelUntouched()

    def test_other_commands_refused(self):
        ssh = require_binary("ssh")
        argv = shlex.split(ssh_command(self.service)) + [f"{self.creds['username']}@{HOST}",
                                                          "cat /etc/passwd; touch /tmp/owned2"]
        rc, out, err = run([ssh, *argv[1:]], env=self.askpass_env())
        self.assertEqual(rc, 127)
        self.assertEqual(out, "")
        self.assertIn("lightd-sftp: only sftp, scp and rsync are served", err)
        self.assertFalse(Path("/tmp/owned2").exists())


# --- sshfs -------------------------------------------------------------------------------------


class SshfsTests(ClientTestCase):
    def setUp(self):
        require_binary("sshfs")
        self.fusermount = shutil.which("fusermount3") or require_binary("fusermount")
        if not os.path.exists("/dev/fuse"):
            raise pyunittest.SkipTest("/dev/fuse is missing: sshfs cannot mount here")
        super().setUp()

    def mount(self):
        """The volume mounted with sshfs (unmounted at cleanup); its path."""
        mount = self.service.root / "mnt"
        mount.mkdir()
        rc, out, err = run(
            ["sshfs", "-p", str(self.service.port), f"{self.creds['username']}@{HOST}:/",
             str(mount), "-o", "password_stdin", "-F", "/dev/null",
             "-o", "StrictHostKeyChecking=no",
             "-o", f"UserKnownHostsFile={self.service.client_dir / 'known_hosts'}",
             "-o", "PubkeyAuthentication=no"],
            stdin=self.creds["password"] + "\n", timeout=60,
        )
        self.assertEqual(rc, 0, f"sshfs failed\n{out}\n{err}")
        self.addCleanup(run, [self.fusermount, "-u", "-z", str(mount)])
        return mount

    def test_mount_and_use(self):
        mount = self.mount()
        self.local_file("src.bin", os.urandom(300_000))
        self.assertEqual(run(["cp", str(self.local / "src.bin"), str(mount / "copied.bin")])[0], 0)
        (mount / "old").write_bytes(b"old")
        (mount / "new").write_bytes(b"new")
        rc, _, err = run(["mv", "-f", str(mount / "new"), str(mount / "old")])
        self.assertEqual(rc, 0, err)
        rc, _, err = run(["touch", "-d", "2001-09-09 01:46:40 UTC", str(mount / "old")])
        self.assertEqual(rc, 0, err)
        rc, _, err = run(["truncate", "-s", "1000", str(mount / "copied.bin")])
        self.assertEqual(rc, 0, err)
        os.symlink("old", mount / "link")
        rc, out, err = run(["df", "-P", str(mount)])
        self.assertEqual(rc, 0, err)
        blocks = int(out.splitlines()[-1].split()[1])
        real = os.statvfs(self.volume)
        self.assertAlmostEqual(blocks, real.f_blocks * real.f_frsize // 1024, delta=1)
        self.assertEqual(run(["sync"])[0], 0)
        rc, _, err = run([self.fusermount, "-u", str(mount)])
        self.assertEqual(rc, 0, err)
        self.assertEqual((self.volume / "copied.bin").read_bytes(),
                         (self.local / "src.bin").read_bytes()[:1000])
        self.assertEqual((self.volume / "old").read_bytes(), b"new")
        self.assertFalse((self.volume / "new").exists())
        self.assertEqual((self.volume / "old").stat().st_mtime, OLD_MTIME)
        self.assertEqual(os.readlink(self.volume / "link"), "old")


    def test_list_a_big_directory(self):
        expected = self.big_directory()
        mount = self.mount()
        self.assertEqual(sorted(os.listdir(mount / "many")), expected)
        rc, _, err = run([self.fusermount, "-u", str(mount)])
        self.assertEqual(rc, 0, err)


# --- rclone ------------------------------------------------------------------------------------


class RcloneTests(ClientTestCase):
    def setUp(self):
        self.rclone = require_binary("rclone")
        super().setUp()
        rc, obscured, err = run([self.rclone, "obscure", self.creds["password"]])
        self.assertEqual(rc, 0, err)
        self.env = dict(os.environ)
        self.env.update(
            RCLONE_CONFIG=str(self.service.client_dir / "rclone.conf"),
            RCLONE_CONFIG_LD_TYPE="sftp",
            RCLONE_CONFIG_LD_HOST=HOST,
            RCLONE_CONFIG_LD_PORT=str(self.service.port),
            RCLONE_CONFIG_LD_USER=self.creds["username"],
            RCLONE_CONFIG_LD_PASS=obscured.strip(),
        )

    def rclone_run(self, *args):
        rc, out, err = run([self.rclone, *args], env=self.env)
        self.assertEqual(rc, 0, f"rclone {args} failed\n{out}\n{err}")
        return out

    def test_copy_sync_moveto_about_lsjson(self):
        self.local_file("src/a.txt", b"alpha", mtime=OLD_MTIME)
        self.local_file("src/sub/b.txt", b"beta")
        self.volume_file("dst/stale.txt", b"stale")
        self.rclone_run("copy", str(self.local / "src"), "LD:dst")
        self.assertEqual((self.volume / "dst" / "sub" / "b.txt").read_bytes(), b"beta")
        self.assertTrue((self.volume / "dst" / "stale.txt").exists())
        listing = json.loads(self.rclone_run("lsjson", "LD:dst"))
        times = {entry["Name"]: entry["ModTime"] for entry in listing}
        self.assertTrue(times["a.txt"].startswith("2001-09-09T01:46:40"), times)
        self.rclone_run("sync", str(self.local / "src"), "LD:dst")
        self.assertFalse((self.volume / "dst" / "stale.txt").exists())
        self.rclone_run("moveto", "LD:dst/a.txt", "LD:moved.txt")
        self.assertEqual((self.volume / "moved.txt").read_bytes(), b"alpha")
        self.assertFalse((self.volume / "dst" / "a.txt").exists())
        about = json.loads(self.rclone_run("about", "--json", "LD:"))
        real = os.statvfs(self.volume)
        self.assertEqual(about["total"], real.f_blocks * real.f_frsize)


    def test_list_a_big_directory(self):
        expected = self.big_directory()
        names = self.rclone_run("lsf", "LD:many").splitlines()
        self.assertEqual(sorted(names), expected)


# --- lftp --------------------------------------------------------------------------------------


class LftpTests(ClientTestCase):
    def setUp(self):
        self.lftp = require_binary("lftp")
        require_binary("ssh")
        super().setUp()

    def run_lftp(self, *commands):
        """Run lftp with these commands against the service; its output."""
        script = "; ".join([
            "set sftp:auto-confirm yes",
            f"set sftp:connect-program {shlex.quote(ssh_command(self.service) + ' -a -x')}",
            "set net:max-retries 1",
            "set net:timeout 30",
            *commands,
            "bye",
        ])
        rc, out, err = run(
            [self.lftp, "-u", f"{self.creds['username']},{self.creds['password']}",
             "-e", script, f"sftp://{HOST}:{self.service.port}"],
            env=self.askpass_env(),
        )
        self.assertEqual(rc, 0, f"lftp failed\n{out}\n{err}")
        return out

    def test_ls_mirror_mv(self):
        self.local_file("up/a.txt", b"alpha")
        self.local_file("up/sub/b.txt", b"beta")
        self.volume_file("listed.txt", b"x")
        out = self.run_lftp(
            "ls /",
            f"mirror -R {shlex.quote(str(self.local / 'up'))} /mirrored",
            "mv /mirrored/a.txt /mirrored/renamed.txt",
        )
        self.assertRegex(out, r"(?m)^-rw-r--r--.* listed\.txt$")
        self.assertEqual((self.volume / "mirrored" / "renamed.txt").read_bytes(), b"alpha")
        self.assertEqual((self.volume / "mirrored" / "sub" / "b.txt").read_bytes(), b"beta")
        self.assertFalse((self.volume / "mirrored" / "a.txt").exists())

    def test_list_a_big_directory(self):
        expected = self.big_directory()
        out = self.run_lftp("cls -1 /many")
        # cls prints each path as given: /many/NAME.
        got = sorted(line.removeprefix("/many/") for line in out.splitlines() if line)
        self.assertEqual(len(got), len(expected))
        self.assertEqual(got, expected)


# --- rsync over ssh ----------------------------------------------------------------------------


class RsyncTests(ClientTestCase):
    def setUp(self):
        self.rsync = require_binary("rsync")
        require_binary("ssh")
        from lightd_conch.rsync import findSandbox

        if shutil.which("bwrap") is None or findSandbox() is None:
            raise pyunittest.SkipTest("bubblewrap (bwrap) is not installed: rsync is not served")
        super().setUp()

    def rsync_run(self, *args, expect=0):
        rc, out, err = run([self.rsync, "-e", ssh_command(self.service), *args],
                           env=self.askpass_env())
        if expect is not None:
            self.assertEqual(rc, expect, f"rsync {args}\n{out}\n{err}")
        return rc, out, err

    def remote(self, path):
        return f"{self.creds['username']}@{HOST}:{path}"

    def test_upload_download_delete(self):
        self.local_file("src/a.txt", b"alpha", mode=0o640, mtime=OLD_MTIME)
        self.local_file("src/sub/b.bin", os.urandom(1_000_000))
        self.rsync_run("-a", str(self.local / "src") + "/", self.remote("/dst/"))
        self.assertEqual((self.volume / "dst" / "a.txt").read_bytes(), b"alpha")
        self.assertEqual((self.volume / "dst" / "a.txt").stat().st_mtime, OLD_MTIME)
        self.assertEqual(stat.S_IMODE((self.volume / "dst" / "a.txt").stat().st_mode), 0o640)
        self.assertEqual((self.volume / "dst" / "sub" / "b.bin").read_bytes(),
                         (self.local / "src" / "sub" / "b.bin").read_bytes())
        self.volume_file("dst/extra.txt", b"extra")
        self.rsync_run("-a", "--delete", str(self.local / "src") + "/", self.remote("dst/"))
        self.assertFalse((self.volume / "dst" / "extra.txt").exists())
        self.volume_file("dst/new-remote.txt", b"remote")
        self.rsync_run("-a", "--delete", self.remote("~/dst/"), str(self.local / "down") + "/")
        self.assertEqual((self.local / "down" / "new-remote.txt").read_bytes(), b"remote")
        self.assertEqual((self.local / "down" / "a.txt").stat().st_mtime, OLD_MTIME)
        (self.local / "down" / "a.txt").unlink()
        self.rsync_run("-a", "--delete", str(self.local / "down") + "/", self.remote("dst"))
        self.assertFalse((self.volume / "dst" / "a.txt").exists())

    def test_files_belong_to_the_volume_owner(self):
        os.chown(self.volume, 65534, 65534)
        self.local_file("owned.txt", b"x")
        self.rsync_run("-rt", str(self.local / "owned.txt"), self.remote("/"))
        st = (self.volume / "owned.txt").stat()
        self.assertEqual((st.st_uid, st.st_gid), (65534, 65534))

    def test_escapes_stay_in_the_volume(self):
        """
        Escaping argv and a planted symlink: refused, or confined to the volume.
        """
        owned = Path("/tmp/owned-rsync")
        self.addCleanup(lambda: owned.unlink() if owned.exists() else None)
        self.local_file("f.txt", b"data")
        rc, _, err = self.rsync_run("--rsync-path=touch /tmp/owned-rsync; rsync",
                                    str(self.local / "f.txt"), self.remote("x"), expect=None)
        self.assertNotEqual(rc, 0)
        self.assertIn("lightd-sftp:", err)
        rc, _, err = self.rsync_run("-e", "ssh", "--protect-args", str(self.local / "f.txt"),
                                    self.remote("x"), expect=None)
        self.assertNotEqual(rc, 0)
        # A remote path climbing out lands in the volume.
        self.rsync_run("-r", str(self.local / "f.txt"), self.remote("../../etc/"))
        self.assertEqual((self.volume / "etc" / "f.txt").read_bytes(), b"data")
        rc, _, _ = self.rsync_run("-r", str(self.local / "f.txt"),
                                  self.remote("$(touch /tmp/owned-rsync)"), expect=None)
        self.assertNotEqual(rc, 0)  # no directory "$(touch " in the volume
        self.rsync_run("-r", str(self.local / "f.txt"), self.remote("$(touch owned-rsync)"))
        self.assertEqual((self.volume / "$(touch owned-rsync)").read_bytes(), b"data")
        self.assertFalse(owned.exists())
        self.assertFalse((self.service.root / "owned-rsync").exists())
        # A symlink to the host: rsync in its sandbox cannot see past the volume.
        os.symlink(self.outside, self.volume / "out")
        os.symlink(str(self.sentinel), self.volume / "secret-link")
        rc, _, _ = self.rsync_run("-r", self.remote("out/secret"), str(self.local / "got"),
                                  expect=None)
        self.assertNotEqual(rc, 0)
        self.assertFalse((self.local / "got").exists())
        rc, _, _ = self.rsync_run("-rL", self.remote("secret-link"), str(self.local / "got2"),
                                  expect=None)
        self.assertNotEqual(rc, 0)
        self.assertFalse((self.local / "got2").exists())
        rc, _, _ = self.rsync_run("-r", str(self.local / "f.txt"), self.remote("out/planted"),
                                  expect=None)
        self.assertNotEqual(rc, 0)
        self.assertFalse(owned.exists())
        self.assertSentinelUntouched()


# --- paramiko and asyncssh ---------------------------------------------------------------------


class LibraryTests(ClientTestCase):
    def test_paramiko_posix_rename_and_keepalive(self):
        client = paramiko_sftp(self, self.service, self.creds)
        self.volume_file("a", b"new")
        self.volume_file("b", b"old")
        client.posix_rename("/a", "/b")
        self.assertEqual((self.volume / "b").read_bytes(), b"new")
        self.assertFalse((self.volume / "a").exists())
        transport = client.get_channel().get_transport()
        # Answered with REQUEST_FAILURE, as OpenSSH does: the connection stays up.
        reply = within(transport, 10, "keepalive", transport.global_request,
                       "keepalive@openssh.com", None, True)
        self.assertIsNone(reply)
        self.assertEqual(client.listdir("/"), ["b"])

    def test_paramiko_exec_refused_with_127(self):
        transport = paramiko_transport(self, self.service, self.creds["username"],
                                       self.creds["password"])
        channel = within(transport, 10, "open_session", transport.open_session)
        channel.settimeout(10)
        within(transport, 10, "exec", channel.exec_command, "id")
        self.assertEqual(within(transport, 10, "exit status", channel.recv_exit_status), 127)
        self.assertEqual(channel.makefile_stderr().read(),
                         b"lightd-sftp: only sftp, scp and rsync are served\n")

    def test_asyncssh_extensions(self):
        try:
            import asyncssh
        except ImportError:
            raise pyunittest.SkipTest("asyncssh is not installed (pip install '.[test]')")
        self.volume_file("a", b"0123456789")
        self.volume_file("b", b"old")
        target = self.volume_file("target", b"t", mtime=2_000_000_000)
        os.symlink("target", self.volume / "link")

        async def exercise():
            async with asyncssh.connect(
                HOST, self.service.port, username=self.creds["username"],
                password=self.creds["password"], known_hosts=None, client_keys=None,
                preferred_auth="password",
            ) as conn:
                async with conn.start_sftp_client() as client:
                    found = {}
                    found["limits"] = (client.limits.max_read_len, client.limits.max_write_len)
                    await client.posix_rename("a", "b")
                    vfs = await client.statvfs("/")
                    found["statvfs"] = (vfs.blocks, vfs.frsize)
                    await client.link("b", "hard")
                    async with client.open("synced", "wb") as f:
                        await f.write(b"sync me")
                        await f.fsync()
                    await client.utime("link", (1000, 2000), follow_symlinks=False)
                    await client.remote_copy("b", "copy", src_offset=2, src_length=5)
                    await client.symlink("target", "made-link")
                    await client.symlink("/abs/target", "dir-link")
                    found["readlink"] = await client.readlink("made-link")
                    return found

        found = asyncio.run(asyncio.wait_for(exercise(), 60))
        self.assertEqual(found["limits"], (261120, 261120))
        real = os.statvfs(self.volume)
        self.assertEqual(found["statvfs"], (real.f_blocks, real.f_frsize))
        self.assertEqual((self.volume / "b").read_bytes(), b"0123456789")
        self.assertEqual((self.volume / "hard").stat().st_ino, (self.volume / "b").stat().st_ino)
        self.assertEqual((self.volume / "synced").read_bytes(), b"sync me")
        self.assertEqual(os.lstat(self.volume / "link").st_mtime, 2000)
        self.assertEqual(target.stat().st_mtime, 2_000_000_000)
        self.assertEqual((self.volume / "copy").read_bytes(), b"23456")
        # asyncssh's symlink(target, link), made as asked: asyncssh sends the
        # drafts' order to a server that does not call itself OpenSSH.
        self.assertEqual(os.readlink(self.volume / "made-link"), "target")
        self.assertEqual(os.readlink(self.volume / "dir-link"), "/abs/target")
        self.assertEqual(found["readlink"], "target")
