"""
rsync's server side may never hand out privilege: tests of what rsync runs as
(no capability, whoever owns the volume), of the options it always gets
(no super-user mode, no setuid, setgid or sticky bits), and of paths that
start with "-" (names, never options).  The end-to-end tests drive the real
rsync client against the real service and its real bubblewrap sandbox.
"""

import os
import shutil
import stat
import struct
import subprocess
import time
import unittest as pyunittest
from pathlib import Path

from twisted.trial.unittest import TestCase

from lightd_conch import commands, rsync
from lightd_conch.testing import FakeSessionChannel
from lightd_conch.volume import Volume

from tests.harness import (
    HOST,
    _askpass_env,
    make_credentials,
    paramiko_transport,
    require_binary,
    start_service,
    within,
)
from tests.test_e2e_clients import run, ssh_command

# A security.capability value (VFS_CAP_REVISION_2, effective) granting
# cap_dac_override and cap_sys_admin: what `setcap cap_dac_override,cap_sys_admin+ep` writes.
FILE_CAPABILITY = struct.pack("<IIIII", 0x02000001, (1 << 1) | (1 << 21), 0, 0, 0)
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


def require_sandbox():
    require_binary("rsync")
    require_binary("ssh")
    if rsync.findSandbox() is None:
        raise pyunittest.SkipTest("bubblewrap (bwrap) is not installed: rsync is not served")


def require_root(why):
    if os.geteuid() != 0:
        raise pyunittest.SkipTest(f"needs root: {why}")


class ArgvTests(TestCase):
    """
    The command lines built for rsync, without running anything.
    """

    def test_pathsStartingWithDashAreNames(self):
        """
        rsync parses words after "." that start with "-" as options: every
        such path reaches it as "./-...", a name in the volume.
        """
        self.assertEqual(
            rsync.parseCommand(b"rsync --server -e.LsfxCIvu . --log-file=srv.log up/"),
            ["rsync", "--server", "-e.LsfxCIvu", ".", "./--log-file=srv.log", "up/"],
        )
        self.assertEqual(
            rsync.parseCommand(b"rsync --server -r . --daemon --config=/x up/")[-3:],
            ["./--daemon", "./--config=/x", "up/"],
        )
        for path, expected in [
            ("-x", "./-x"), ("/-x", "./-x"), ("~/-x/", "./-x/"), ("../-x", "./-x"),
            ("-", "./-"), ("--", "./--"), ("a/-x", "a/-x"), ("/", "."),
        ]:
            argv = rsync.parseCommand(f"rsync --server --sender -r . {path}".encode())
            self.assertEqual(argv[-1], expected, path)

    def test_enforcedOptions(self):
        """
        --no-super goes first (a client's --fake-super, which never chowns,
        may still follow it); --chmod=a-st goes last before ".", after any
        --chmod of the client's, so it has the final word.
        """
        self.assertEqual(
            rsync.enforced(["rsync", "--server", "-logDtpre.iLsfxCIvu", "--chmod=u+s", ".", "d"]),
            ["rsync", "--server", "--no-super", "-logDtpre.iLsfxCIvu", "--chmod=u+s",
             "--chmod=a-st", ".", "d"],
        )

    def test_servedArgvIsEnforced(self):
        self.patch(rsync, "findSandbox", lambda: rsync.Sandbox("/bwrap", "/rsync", [], []))
        volume = self.mktemp()
        os.makedirs(volume)

        class Avatar:
            containerId = "c"

            def openVolume(self, extraDescriptors=0):
                return Volume.open(volume)

        protocol = commands.execProtocol(b"rsync --server -pe.LsfxCIvu . -x", Avatar())
        self.addCleanup(protocol.volume.close)
        self.assertEqual(
            protocol.argv,
            ["rsync", "--server", "--no-super", "-pe.LsfxCIvu", "--chmod=a-st", ".", "./-x"],
        )

    def test_sandboxArgvHoldsNoCapability(self):
        sandbox = rsync.Sandbox(
            "/usr/bin/bwrap", "/usr/bin/rsync", [("/usr/bin/rsync", "/usr/bin/rsync")], [],
            "/usr/bin/setpriv",
        )
        unprivileged = sandbox.argv(3, ["rsync", "--server", ".", "d"])
        self.assertEqual(unprivileged[1:4], ["--unshare-all", "--cap-drop", "ALL"])
        for uid in (0, 1000):
            argv = sandbox.argv(3, ["rsync", "--server", ".", "d"], (uid, uid))
            tail = argv[argv.index("--") + 1:]
            self.assertEqual(tail, [
                "/usr/bin/setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups",
                "--no-new-privs", "--bounding-set", "-all", "--inh-caps", "-all", "--",
                "/usr/bin/rsync", "--server", ".", "d",
            ])


class _FinishedProcess:
    pid = None

    def registerProducer(self, producer, streaming):
        pass

    def write(self, data):
        pass

    def closeStdin(self):
        pass


class _NoCall:
    def active(self):
        return False


class _ProbeReactor:
    """
    Runs what an RsyncServer spawns, at once and to the end, with /proc
    mounted in the sandbox (rsync's sandbox has none) so the program inside
    can report its own credentials.
    """

    result = None

    def callLater(self, delay, f, *args):
        return _NoCall()

    def spawnProcess(self, protocol, executable, args, env, path, childFDs):
        args = list(args)
        # Run to the end at once: nobody reads bwrap's information.
        info = args.index("--info-fd")
        del args[info:info + 2]
        volumeFD = childFDs[3]
        args[args.index("--bind-fd") + 1] = str(volumeFD)
        dev = args.index("--dev")
        args[dev:dev] = ["--proc", "/proc"]
        self.result = subprocess.run(
            args, env=env, cwd=path, pass_fds=(volumeFD,), capture_output=True, timeout=60,
        )
        return _FinishedProcess()


class SandboxCredentialsTests(TestCase):
    """
    What the program in the sandbox runs as, exactly as RsyncServer starts
    it, with ``cat /proc/self/status`` in rsync's place.
    """

    def setUp(self):
        require_sandbox()
        require_root("bubblewrap must set the sandbox up as root, as the service does")
        real = rsync.findSandbox()
        cat = rsync._merged(shutil.which("cat", path="/usr/bin:/bin"))
        bound = {dest for _, dest in real.binds}
        if not set(map(rsync._merged, rsync._libraries(cat))) <= bound:
            raise pyunittest.SkipTest("cat needs libraries rsync does not")
        self.probe = rsync.Sandbox(
            real.bwrap, cat, real.binds + [(os.path.realpath(cat), cat)], real.links, real.setpriv,
        )
        self.volume = Path(self.mktemp()).resolve()
        self.volume.mkdir()

    def status(self, owner, serviceUid=None):
        os.chown(self.volume, *owner)
        if serviceUid is not None:
            self.patch(os, "geteuid", lambda: serviceUid)
        reactor = _ProbeReactor()
        server = rsync.RsyncServer(self.probe, Volume.open(str(self.volume)), ["cat", "/proc/self/status"])
        self.addCleanup(server.volume.close)
        server.reactor = reactor
        server.makeConnection(FakeSessionChannel())
        self.assertIsNotNone(reactor.result, "nothing was started")
        self.assertEqual(reactor.result.returncode, 0, reactor.result.stderr)
        fields = {}
        for line in reactor.result.stdout.decode().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value.split()
        return fields

    def assertNoCapability(self, fields):
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(int(fields[name][0], 16), 0, f"{name} {fields[name]}")
        self.assertEqual(fields["NoNewPrivs"], ["1"])

    def test_rootVolume(self):
        """
        A volume owned by root: rsync is uid 0 with no capability at all, so
        it can set neither file capabilities nor owners.
        """
        fields = self.status((0, 0))
        self.assertEqual(fields["Uid"], ["0"] * 4)
        self.assertEqual(fields["Gid"], ["0"] * 4)
        self.assertEqual(fields.get("Groups", []), [])
        self.assertNoCapability(fields)

    def test_userVolume(self):
        fields = self.status((1000, 1001))
        self.assertEqual(fields["Uid"], ["1000"] * 4)
        self.assertEqual(fields["Gid"], ["1001"] * 4)
        self.assertEqual(fields.get("Groups", []), [])
        self.assertNoCapability(fields)

    def test_unprivilegedService(self):
        """
        A service that is not root runs rsync in a user namespace; bwrap
        drops every capability there too (as root it would otherwise keep
        them all).
        """
        fields = self.status((0, 0), serviceUid=1000)
        for name in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            self.assertEqual(int(fields[name][0], 16), 0, f"{name} {fields[name]}")


class _RsyncService(TestCase):
    """
    The real service with a volume "demo", driven by the real rsync client.
    """

    timeout = 300

    def setUp(self):
        require_sandbox()
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        self.local = self.service.root / "local"
        self.local.mkdir()

    def rsync(self, *args, expect=0):
        rc, out, err = run(["rsync", "-e", ssh_command(self.service), *args],
                           env=_askpass_env(self.service, self.creds["password"]))
        if expect is not None:
            self.assertEqual(rc, expect, f"rsync {args}\n{out}\n{err}")
        return rc, out, err

    def remote(self, path):
        return f"{self.creds['username']}@{HOST}:{path}"


class RsyncPrivilegeTests(_RsyncService):
    """
    rsync -a/-aX against the real service: whatever the client sends, no
    file gets a setuid, setgid or sticky bit, a file capability or another
    owner than the volume's.
    """

    def setUp(self):
        require_root("the client must send setuid files, file capabilities and other owners")
        super().setUp()

    def hostileTree(self):
        """A tree a root client could send: special bits, a file capability, foreign owners."""
        src = self.local / "src"
        (src / "shared").mkdir(parents=True)
        (src / "shared").chmod(0o2775)
        (src / "tmp").mkdir()
        (src / "tmp").chmod(0o1777)
        suid = src / "suid"
        suid.write_bytes(b"#!/bin/sh\nid\n")
        suid.chmod(0o6755)
        os.chown(suid, 1234, 1234)
        capable = src / "capable"
        capable.write_bytes(b"cap")
        capable.chmod(0o755)
        os.setxattr(capable, "security.capability", FILE_CAPABILITY)
        noted = src / "shared" / "noted"
        noted.write_bytes(b"note")
        os.setxattr(noted, "user.note", b"kept")
        os.chown(noted, 4321, 0)
        return src

    def assertNoPrivilege(self, root, owner):
        seen = []
        for path in [root, *root.rglob("*")]:
            st = path.lstat()
            seen.append(path.name)
            self.assertEqual(st.st_mode & SPECIAL_BITS, 0, f"{path}: {oct(st.st_mode)}")
            self.assertEqual((st.st_uid, st.st_gid), owner, path)
            self.assertNotIn("security.capability", os.listxattr(path, follow_symlinks=False),
                             path)
        return seen

    def upload(self, owner):
        os.chown(self.volume, *owner)
        src = self.hostileTree()
        self.rsync("-aX", str(src) + "/", self.remote("/up/"))
        up = self.volume / "up"
        self.assertEqual(sorted(self.assertNoPrivilege(up, owner)),
                         sorted(["up", "shared", "noted", "tmp", "suid", "capable"]))
        self.assertEqual(stat.S_IMODE((up / "suid").stat().st_mode), 0o755)
        self.assertEqual(stat.S_IMODE((up / "shared").stat().st_mode), 0o775)
        self.assertEqual(stat.S_IMODE((up / "tmp").stat().st_mode), 0o777)
        self.assertEqual((up / "suid").read_bytes(), b"#!/bin/sh\nid\n")
        self.assertEqual((up / "capable").read_bytes(), b"cap")
        self.assertEqual(os.getxattr(up / "shared" / "noted", "user.note"), b"kept")
        # Sent again, nothing changes and nothing fails.
        self.rsync("-aX", str(src) + "/", self.remote("/up/"))
        self.assertNoPrivilege(up, owner)

    def test_uploadIntoRootVolume(self):
        """
        What ``credentials generate --create-volume`` makes as root: rsync
        runs as uid 0 without capabilities and in no super-user mode, so
        -aX ends with exit 0, every file root's, no special bit, no file
        capability, and user xattrs kept.
        """
        self.assertEqual(self.volume.stat().st_uid, 0)
        self.upload((0, 0))

    def test_uploadIntoUserVolume(self):
        self.upload((1000, 1000))

    def test_downloadDropsSpecialBits(self):
        """
        Downloads with -a finish with exit 0; what the volume holds with
        special bits arrives without them (rsync applies --chmod to the
        file list it sends too).
        """
        (self.volume / "d" / "shared").mkdir(parents=True)
        (self.volume / "d" / "shared").chmod(0o3777)
        suid = self.volume / "d" / "suid"
        suid.write_bytes(b"s")
        suid.chmod(0o4755)
        plain = self.volume / "d" / "plain"
        plain.write_bytes(b"p")
        plain.chmod(0o640)
        down = self.local / "down"
        self.rsync("-a", self.remote("d/"), str(down) + "/")
        self.assertEqual(stat.S_IMODE((down / "shared").stat().st_mode), 0o777)
        self.assertEqual(stat.S_IMODE((down / "suid").stat().st_mode), 0o755)
        self.assertEqual(stat.S_IMODE((down / "plain").stat().st_mode), 0o640)
        self.assertEqual((down / "suid").read_bytes(), b"s")
        # The volume itself is left as it was.
        self.assertEqual(stat.S_IMODE(suid.stat().st_mode), 0o4755)

    def test_clientChmodCannotAddSpecialBits(self):
        """A --chmod sent to the server (-M) comes before ours and loses."""
        (self.local / "f").write_bytes(b"f")
        self.rsync("-a", "-M--chmod=ug+s,+t", str(self.local / "f"), self.remote("f"))
        self.assertEqual(stat.S_IMODE((self.volume / "f").stat().st_mode), 0o644)

    def test_fakeSuperStillServed(self):
        """
        -M--fake-super (owners and modes kept in user xattrs) works as
        before: the real file is the volume owner's, without special bits.
        """
        src = self.hostileTree()
        self.rsync("-aX", "-M--fake-super", str(src) + "/", self.remote("up/"))
        up = self.volume / "up"
        self.assertNoPrivilege(up, (0, 0))
        self.assertIn("user.rsync.%stat", os.listxattr(up / "suid"))


class RsyncDashPathTests(_RsyncService):
    """
    Remote paths that start with "-" are names: an option hidden after "."
    is refused as such, a file named "-x" is transferred.
    """


    def test_dashNamedFiles(self):
        (self.local / "-x").write_bytes(b"dash")
        (self.local / "tree" / "-inner").mkdir(parents=True)
        (self.local / "tree" / "-inner" / "f").write_bytes(b"inner")
        self.rsync("-a", str(self.local / "-x"), self.remote("-x"))
        self.assertEqual((self.volume / "-x").read_bytes(), b"dash")
        self.rsync("-a", str(self.local / "tree") + "/", self.remote("/-dir/"))
        self.assertEqual((self.volume / "-dir" / "-inner" / "f").read_bytes(), b"inner")
        self.rsync("-a", self.remote("-x"), str(self.local / "got"))
        self.assertEqual((self.local / "got").read_bytes(), b"dash")
        self.rsync("-a", self.remote("~/-dir/"), str(self.local / "gotdir") + "/")
        self.assertEqual((self.local / "gotdir" / "-inner" / "f").read_bytes(), b"inner")
        self.assertEqual(sorted(os.listdir(self.volume)), ["-dir", "-x"])

    def test_optionAsRemotePath(self):
        """
        ``rsync src/ USER@host:--log-file=x``: a directory of that name, not
        a log file rsync writes.
        """
        (self.local / "src").mkdir()
        (self.local / "src" / "f").write_bytes(b"data")
        self.rsync("-a", str(self.local / "src") + "/", self.remote("--log-file=client.log"))
        self.assertEqual(os.listdir(self.volume), ["--log-file=client.log"])
        self.assertEqual((self.volume / "--log-file=client.log" / "f").read_bytes(), b"data")

    def test_optionsAfterDotNeverReachRsync(self):
        """
        Hand-made commands with options after ".": no log file, no batch
        file, no daemon.
        """
        transport = paramiko_transport(self, self.service, self.creds["username"],
                                       self.creds["password"])
        for command in [
            b"rsync --server -e.LsfxCIvu . --log-file=srv.log up/",
            b"rsync --server -e.LsfxCIvu . --write-batch=batch up/",
            b"rsync --server -e.LsfxCIvu . --daemon --config=rsyncd.conf up/",
        ]:
            channel = within(transport, 10, "open_session", transport.open_session)
            channel.settimeout(30)
            within(transport, 10, "exec", channel.exec_command, command)
            channel.shutdown_write()
            status = within(transport, 30, "exit status", channel.recv_exit_status)
            out = channel.makefile().read()
            err = channel.makefile_stderr().read()
            channel.close()
            # rsync in server mode, waiting for a client that never came.
            self.assertNotEqual(status, 0, command)
            self.assertFalse(out.startswith(b"@RSYNCD"), (command, out))
            self.assertEqual(os.listdir(self.volume), [], (command, err))


class RsyncMountTests(_RsyncService):
    """
    bwrap binds the volume with what is mounted below it, so rsync is not
    served for a volume with a mount inside: it would reach what SFTP and
    scp refuse to enter.
    """


    def test_volumeWithAMountInsideIsRefused(self):
        require_root("bind mounts need root")
        outside = self.service.root / "outside"
        outside.mkdir()
        (outside / "host.txt").write_bytes(b"host file")
        (self.volume / "inside.txt").write_bytes(b"inside")
        mountpoint = self.volume / "m"
        mountpoint.mkdir()
        subprocess.run(["mount", "--bind", str(outside), str(mountpoint)], check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", str(mountpoint)], capture_output=True)
        rc, out, err = self.rsync("-a", self.remote("/"), str(self.local) + "/", expect=None)
        self.assertNotEqual(rc, 0)
        self.assertIn("lightd-sftp: rsync is not served for a volume with mounts inside", err)
        self.assertEqual(os.listdir(self.local), [])
        # Renamed by the container (in whose mount namespace it is a plain
        # folder), the mount point is still found.
        renamed = self.volume / "renamed"
        subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        'umount "$1" && mv "$1" "$2"', "-", str(mountpoint), str(renamed)],
                       check=True)
        self.addCleanup(subprocess.run, ["umount", "-l", str(renamed)], check=True)
        self.assertEqual((renamed / "host.txt").read_bytes(), b"host file")
        rc, out, err = self.rsync("-a", "--delete", str(self.local) + "/", self.remote("/"),
                                  expect=None)
        self.assertNotEqual(rc, 0)
        self.assertEqual((outside / "host.txt").read_bytes(), b"host file")
        self.assertEqual((self.volume / "inside.txt").read_bytes(), b"inside")

    def test_volumeWithoutMountsIsServed(self):
        (self.volume / "inside.txt").write_bytes(b"inside")
        self.rsync("-a", self.remote("/"), str(self.local) + "/")
        self.assertEqual((self.local / "inside.txt").read_bytes(), b"inside")


HOST_RSYNC = Path(os.path.realpath(shutil.which("rsync") or "/usr/bin/rsync"))


class RsyncRootTests(_RsyncService):
    """
    Inside the sandbox "/" is the volume: absolute links and every path
    option, absolute or climbing, resolve inside it as over SFTP, and
    nothing of the host (rsync's binary and libraries included) is
    reachable by any name a client can give.  A sentinel outside the volume
    stays untouched whatever the client does.
    """

    def setUp(self):
        super().setUp()
        self.outside = self.service.root / "outside"
        self.outside.mkdir()
        self.sentinel = self.outside / "sentinel"
        self.sentinel.write_bytes(b"outside the volume")
        self.hostRsync = HOST_RSYNC.read_bytes()
        self.addCleanup(self.assertOutsideUntouched)

    def assertOutsideUntouched(self):
        self.assertEqual(os.listdir(self.outside), ["sentinel"])
        self.assertEqual(self.sentinel.read_bytes(), b"outside the volume")
        self.assertEqual(HOST_RSYNC.read_bytes(), self.hostRsync)

    def assertNothingOfTheHost(self, root):
        for path in [root, *root.rglob("*")]:
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                self.assertNotEqual(data, self.hostRsync, path)
                self.assertFalse(data.startswith(b"\x7fELF"), path)
                self.assertNotEqual(data, b"outside the volume", path)

    def plantLinks(self):
        os.symlink("/usr/bin/rsync", self.volume / "bin")
        os.symlink("/usr/lib", self.volume / "lib")
        os.symlink("../../../../../../../../usr/bin/rsync", self.volume / "up")
        os.symlink(str(self.sentinel), self.volume / "sentinel")
        (self.volume / "inside").write_bytes(b"inside")
        os.symlink("/inside", self.volume / "absolute-inside")

    def test_copyLinksGiveNothingOfTheHost(self):
        """
        ``rsync -L`` of a planted ``bin -> /usr/bin/rsync``: "No such file"
        (the link resolves in the volume), never the host's rsync; an
        absolute link to a file in the volume is followed there.
        """
        self.plantLinks()
        for option in ("-L", "--copy-links", "--copy-unsafe-links", "--copy-dirlinks"):
            down = self.local / option.strip("-")
            down.mkdir()
            for name in ("bin", "lib", "up", "sentinel"):
                rc, out, err = self.rsync("-r", option, self.remote(name), str(down) + "/",
                                          expect=None)
                if option in ("-L", "--copy-links"):
                    self.assertNotEqual(rc, 0, (option, name, out, err))
                    self.assertIn("No such file or directory", err)
            self.rsync("-r", option, self.remote("/"), str(down / "all") + "/", expect=None)
            self.assertNothingOfTheHost(down)
        self.rsync("-L", self.remote("absolute-inside"), str(self.local / "followed"))
        self.assertEqual((self.local / "followed").read_bytes(), b"inside")

    def lookalike(self):
        """A local file as long and as old as the host's rsync, holding zeros."""
        src = self.local / "src"
        src.mkdir()
        fake = src / HOST_RSYNC.name
        fake.write_bytes(bytes(len(self.hostRsync)))
        st = HOST_RSYNC.stat()
        os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
        return src

    def test_alternateDestinationsStayInTheVolume(self):
        """
        --copy-dest, --compare-dest and --link-dest pointed at the host's
        rsync folder (absolute or climbing): the quick check finds nothing
        there, so the client's own bytes arrive, never the host's file.
        """
        src = self.lookalike()
        folder = str(HOST_RSYNC.parent)
        climbing = "../../../../../../../.." + folder
        for option in ("--copy-dest", "--compare-dest", "--link-dest"):
            for value in (folder, climbing, "/" + climbing):
                dst = f"dst{option}-{len(value)}"
                self.rsync("-rt", f"{option}={value}", str(src) + "/", self.remote(dst + "/"))
                arrived = self.volume / dst / HOST_RSYNC.name
                self.assertEqual(arrived.read_bytes(), bytes(len(self.hostRsync)),
                                 (option, value))

    def test_writingOptionsStayInTheVolume(self):
        """
        --backup-dir, --temp-dir and --partial-dir with climbing and
        absolute values write inside the volume, at its root.
        """
        src = self.local / "src"
        src.mkdir()
        (src / "f").write_bytes(b"new")
        (self.volume / "dst").mkdir()
        (self.volume / "dst" / "f").write_bytes(b"old")
        (self.volume / "bk").mkdir()
        # Climbing: at the volume's root (rsync itself refuses some).
        rc, out, err = self.rsync("-rI", "-b", "--backup-dir=../../../../../../bk",
                                  str(src) + "/", self.remote("dst/"), expect=None)
        if rc == 0:
            self.assertEqual((self.volume / "dst" / "f").read_bytes(), b"new")
            self.assertEqual((self.volume / "bk" / "f").read_bytes(), b"old")
        for option in ("--temp-dir", "--partial-dir"):
            (src / "f").write_bytes(option.encode())
            rc, out, err = self.rsync("-rI", f"-M{option}=../../../../..{self.outside}",
                                      str(src) + "/", self.remote("dst/"), expect=None)
            # rsync finds no such folder in the volume, or makes do without.
            self.assertIn(rc, (0, 1, 23), err)
            if rc == 0:
                self.assertEqual((self.volume / "dst" / "f").read_bytes(), option.encode())
        # Absolute: the same path in the volume.
        inside = self.volume / str(self.outside).lstrip("/")
        inside.mkdir(parents=True)
        (src / "f").write_bytes(b"newest")
        before = (self.volume / "dst" / "f").read_bytes()
        self.rsync("-rI", "-b", f"--backup-dir={self.outside}", f"-M--temp-dir={self.outside}",
                   f"--partial-dir={self.outside}", str(src) + "/", self.remote("dst/"))
        self.assertEqual((self.volume / "dst" / "f").read_bytes(), b"newest")
        self.assertEqual((inside / "f").read_bytes(), before)

    def test_sandboxHoldsOnlyTheVolume(self):
        """
        While rsync serves a client, its root is the volume and its mount
        table holds that one mount, noexec, nosuid and nodev: rsync's binary
        and libraries are not reachable by any name, and no library planted
        in the volume can be mapped executable.
        """
        (self.volume / "inside").write_bytes(b"inside")
        transport = paramiko_transport(self, self.service, self.creds["username"],
                                       self.creds["password"])
        channel = within(transport, 10, "open_session", transport.open_session)
        channel.settimeout(30)
        within(transport, 10, "exec", channel.exec_command,
               b"rsync --server --sender -e.LsfxCIvu . inside")
        self.assertEqual(len(channel.recv(4)), 4)  # rsync's protocol version
        service = self.service.process.pid
        deadline = time.monotonic() + 20
        while True:
            mounts = None
            for pid in _descendants(service):
                try:
                    # (Its exe link names a file that is no longer in its tree.)
                    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if not command[0].endswith(b"/rsync") or command[1:2] != [b"--server"]:
                        continue
                    mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                    root = sorted(os.listdir(f"/proc/{pid}/root"))
                except OSError:
                    continue
            if mounts is not None and len(mounts) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertIsNotNone(mounts, "no rsync process found")
        self.assertEqual(len(mounts), 1, mounts)
        fields = mounts[0].split()
        self.assertEqual(fields[4], "/")
        self.assertTrue({"noexec", "nosuid", "nodev"} <= set(fields[5].split(",")), fields)
        self.assertEqual(root, ["inside"])
        channel.close()


def _descendants(pid):
    """The pids of every process below C{pid}, whichever of its threads started them."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found.append(child)
            found.extend(_descendants(child))
    return found
