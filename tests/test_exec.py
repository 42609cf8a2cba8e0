"""
Tests for what an exec request runs: the scp and rsync command lines, and
legacy scp's protocol driven through a fake channel.
"""

import os
import stat

from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lightd_conch import commands, rsync, scp
from lightd_conch.testing import FakeSessionChannel
from lightd_conch.volume import Volume

from .test_ssh import _Buffered


class ScpCommandTests(TestCase):
    def test_sink(self):
        command = scp.parseCommand(b"scp -r -p -t ~/x y")
        self.assertTrue(command.sink)
        self.assertTrue(command.recursive)
        self.assertTrue(command.preserve)
        self.assertEqual(command.paths, [b"/x y"])

    def test_source(self):
        command = scp.parseCommand(b"scp -d -f b")
        self.assertFalse(command.sink)
        self.assertTrue(command.targetIsDirectory)
        self.assertEqual(command.paths, [b"b"])

    def test_hostileNamesAreVerbatim(self):
        for line, path in [
            (b"scp -t $(touch /tmp/owned)", b"$(touch /tmp/owned)"),
            (b"scp -t `touch /tmp/owned`", b"`touch /tmp/owned`"),
            (b"scp -t a;touch /tmp/owned", b"a;touch /tmp/owned"),
            (b"scp -t 'quoted name'", b"quoted name"),
            (b"scp -t -- -dash", b"-dash"),
            (b"scp -v -t ../../etc", b"../../etc"),
        ]:
            self.assertEqual(scp.parseCommand(line).paths, [path], line)

    def test_notScp(self):
        self.assertIsNone(scp.parseCommand(b"scpx -t a"))
        self.assertIsNone(scp.parseCommand(b"/usr/bin/scp -t a"))

    def test_refused(self):
        for line in (b"scp -t", b"scp -t -f a", b"scp a", b"scp -S evil -t a", b"scp -o x -t a"):
            self.assertRaises(scp.ScpUsageError, scp.parseCommand, line)


class RsyncCommandTests(TestCase):
    def test_upload(self):
        self.assertEqual(
            rsync.parseCommand(b"rsync --server -vlogDtpre.iLsfxCIvu --delete . /dst/"),
            ["rsync", "--server", "-vlogDtpre.iLsfxCIvu", "--delete", ".", "dst/"],
        )

    def test_download(self):
        self.assertEqual(
            rsync.parseCommand(b"rsync --server --sender -vlogDtpre.iLsfxCIvu . ~/src/ b"),
            ["rsync", "--server", "--sender", "-vlogDtpre.iLsfxCIvu", ".", "src/", "b"],
        )

    def test_pathsStayInside(self):
        argv = rsync.parseCommand(b"rsync --server -r . ../../etc/")
        self.assertEqual(argv[-1], "etc/")
        self.assertEqual(rsync.parseCommand(b"rsync --server -r . /")[-1], ".")
        self.assertEqual(rsync.parseCommand(b"rsync --server -r . '$(id)'")[-1], "$(id)")
        self.assertEqual(
            rsync.parseCommand(b"rsync --server -r --temp-dir /tmp --link-dest ../prev . d"),
            ["rsync", "--server", "-r", "--temp-dir=/tmp", "--link-dest=../prev", ".", "d"],
        )

    def test_mergeFiltersRefused(self):
        """
        rsync reads a merge file named on its command line while it starts,
        before the volume is its root: such rules are refused; the client's
        own filter rules come over the protocol.
        """
        for rule in ("merge /usr/bin/rsync", ". /etc/passwd", ":- .rules", "dir-merge .x",
                     " merge,- x", ".- x"):
            self.assertRaises(rsync.RsyncRefused, rsync.parseCommand,
                              f"rsync --server '--filter={rule}' . d".encode())
        self.assertIn("--filter=- *.o",
                      rsync.parseCommand(b"rsync --server '--filter=- *.o' . d"))

    def test_absoluteOptionPathsFromTheVolumeRoot(self):
        for value, mapped in (("/usr/bin", "/usr/bin"), ("/", "/"), ("~/x/../../y", "/y"),
                              ("../../usr/bin", "../../usr/bin")):
            argv = rsync.parseCommand(f"rsync --server --copy-dest={value} . d".encode())
            self.assertIn(f"--copy-dest={mapped}", argv)

    def test_valuedOptions(self):
        argv = rsync.parseCommand(
            b"rsync --server -logDtprcze.iLsfxCIvu --compress-level=3 --suffix=.bak"
            b" --log-format=%i --timeout=30 . d"
        )
        self.assertIn("--compress-level=3", argv)
        self.assertIn("--log-format=%i", argv)

    def test_refused(self):
        for line in (
            b"rsync --server -e ssh . d",
            b"rsync --server --rsh=sh . d",
            b"rsync --server --rsync-path=/bin/sh . d",
            b"rsync --daemon --server .",
            b"rsync --server --daemon . d",
            b"rsync --server --log-file=/etc/x . d",
            b"rsync --server --write-batch=x . d",
            b"rsync --server -slogDtpre.iLsfxCIvu",
            b"rsync --server -vlogDtpre.iLsfxCIvu . ",
            b"rsync --server --suffix=../../x . d",
            b"rsync --server --unknown . d",
            b"rsync --server -vZ . d",
            b"rsync --server -ve . d",
            b"rsync -r . d",
            b"rsync --server -r d",
            b"sh -c rsync --server",
        ):
            self.assertRaises(rsync.RsyncRefused, rsync.parseCommand, line)


class ScpDriver:
    """
    Drives scp's protocol object over a fake channel, on a real volume; the
    test case stands in for the avatar.
    """

    def setUp(self):
        self.volume = os.path.abspath(self.mktemp())
        os.makedirs(self.volume)

    def start(self, line):
        protocol = commands.execProtocol(line, self)
        protocol.clock = Clock()
        channel = FakeSessionChannel()
        protocol.makeConnection(channel)
        return protocol, channel

    containerId = "c"

    def openVolume(self, extraDescriptors=0):
        return Volume.open(self.volume)


class ScpProtocolTests(ScpDriver, TestCase):

    def test_sinkFile(self):
        protocol, channel = self.start(b"scp -p -t /")
        self.assertEqual(channel.output(), b"\0")
        protocol.dataReceived(b"T1000000000 0 1000000000 0\n")
        self.assertEqual(channel.output(), b"\0")
        protocol.dataReceived(b"C0640 5 $(touch x);`y`\n")
        self.assertEqual(channel.output(), b"\0")
        protocol.dataReceived(b"hel")
        protocol.dataReceived(b"lo\0")
        self.assertEqual(channel.output(), b"\0")
        protocol.eofReceived()
        self.assertEqual(channel.exitCode, 0)
        path = os.path.join(self.volume, "$(touch x);`y`")
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"hello")
        st = os.stat(path)
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_mtime), (0o640, 1000000000))

    def test_sinkRefusesSlashInName(self):
        protocol, channel = self.start(b"scp -t /")
        channel.output()
        protocol.dataReceived(b"C0644 1 ../evil\n")
        self.assertTrue(channel.output().startswith(b"\x02scp: error: unexpected filename"))
        self.assertEqual(channel.exitCode, 1)
        self.assertEqual(os.listdir(self.volume), [])

    def test_sinkDirectoryNeedsRecursive(self):
        protocol, channel = self.start(b"scp -t /")
        channel.output()
        protocol.dataReceived(b"D0755 0 d\n")
        self.assertEqual(channel.exitCode, 1)

    def test_sinkTree(self):
        protocol, channel = self.start(b"scp -r -t ~")
        protocol.dataReceived(b"D0755 0 d\nC0644 2 f\nhi\0E\n")
        self.assertEqual(channel.output(), b"\0" * 5)
        protocol.eofReceived()
        self.assertEqual(channel.exitCode, 0)
        with open(os.path.join(self.volume, "d", "f"), "rb") as f:
            self.assertEqual(f.read(), b"hi")

    def test_sourceFile(self):
        with open(os.path.join(self.volume, "f"), "wb") as f:
            f.write(b"data")
        protocol, channel = self.start(b"scp -f ~/f")
        self.assertEqual(channel.output(), b"")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"C0644 4 f\n")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"data\0")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.exitCode, 0)

    def test_sourceTimeBefore1970(self):
        """Sent as 0, as OpenSSH does: its sink refuses a negative time."""
        path = os.path.join(self.volume, "old")
        with open(path, "wb") as f:
            f.write(b"x")
        os.utime(path, (-86400, -86400))
        protocol, channel = self.start(b"scp -p -f old")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"T0 0 0 0\n")

    def test_sourceMissing(self):
        protocol, channel = self.start(b"scp -f /nope")
        protocol.dataReceived(b"\0")
        self.assertEqual(channel.output(), b"\x01scp: /nope: No such file or directory\n")
        self.assertEqual(channel.exitCode, 1)

    def test_sourceLinkLoop(self):
        os.mkdir(os.path.join(self.volume, "d"))
        os.symlink("/", os.path.join(self.volume, "d", "up"))
        protocol, channel = self.start(b"scp -r -f d")
        for _ in range(10):
            protocol.dataReceived(b"\0")
        self.assertIn(b"directory loop", channel.output())
        self.assertEqual(channel.exitCode, 1)

    def test_sinkRefusesTimeBeyondTimeT(self):
        """
        A time record whose seconds do not fit in time_t is refused as bad
        input: scp's fatal line and exit status 1, and no file is made.
        """
        for record in (
            b"T99999999999999999999 0 1000000000 0\n",
            b"T1000000000 0 9223372036854775808 0\n",
            b"T1000000000 1000000 1000000000 0\n",
            b"T1000000000 0 1000000000 0000001000000\n",
        ):
            protocol, channel = self.start(b"scp -p -t /")
            self.assertEqual(channel.output(), b"\0")
            protocol.dataReceived(record)
            protocol.dataReceived(b"C0644 2 f\nhi\0")
            output = channel.output()
            self.assertTrue(output.startswith(b"\x02scp: protocol error: "), (record, output))
            self.assertTrue(output.endswith(b"\n") and output.count(b"\n") == 1, output)
            self.assertEqual(channel.exitCode, 1, record)
            self.assertEqual(os.listdir(self.volume), [], record)

    def test_sinkDirectoryTimeBeyondTimeT(self):
        protocol, channel = self.start(b"scp -r -p -t /")
        channel.output()
        protocol.dataReceived(b"T99999999999999999999 0 99999999999999999999 0\nD0755 0 d\nE\n")
        self.assertEqual(channel.output(), b"\x02scp: protocol error: mtime.sec out of range\n")
        self.assertEqual(channel.exitCode, 1)

    def test_sinkLargestTimeT(self):
        """time_t's largest value is taken (the filesystem clamps it)."""
        protocol, channel = self.start(b"scp -p -t /")
        channel.output()
        protocol.dataReceived(b"T9223372036854775807 0 9223372036854775807 0\nC0644 2 f\nhi\0")
        self.assertEqual(channel.output(), b"\0\0\0")
        protocol.eofReceived()
        self.assertEqual(channel.exitCode, 0)
        self.assertGreater(os.stat(os.path.join(self.volume, "f")).st_mtime, 2**31)

    def test_sinkRefusesSizeBeyondOffT(self):
        for size in (b"9223372036854775808", b"99999999999999999999", b"1" * 30):
            protocol, channel = self.start(b"scp -t /")
            channel.output()
            protocol.dataReceived(b"C0644 " + size + b" f\n")
            output = channel.output()
            self.assertTrue(output.startswith(b"\x02scp: protocol error: "), output)
            self.assertEqual(channel.exitCode, 1)
            self.assertEqual(os.listdir(self.volume), [])

    def test_unexpectedErrorIsAnScpError(self):
        """
        Whatever goes wrong unforeseen ends the exchange as scp ends: one
        fatal line, exit status 1, and one line in the log, no traceback.
        """
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def broken(*args, **kwargs):
            raise RuntimeError("something nobody foresaw")

        self.patch(Volume, "openFile", broken)
        protocol, channel = self.start(b"scp -t /")
        channel.output()
        protocol.dataReceived(b"C0644 2 f\nhi\0")
        self.assertEqual(channel.output(), b"\x02scp: internal error; the transfer stopped\n")
        self.assertEqual(channel.exitCode, 1)
        logged = [e for e in events if e.get("log_namespace") == "lightd_conch.scp"]
        self.assertEqual(len(logged), 1)
        self.assertEqual(logged[0]["kind"], "RuntimeError")
        self.assertNotIn("log_failure", logged[0])
        protocol.dataReceived(b"more input after the end")
        protocol.connectionLost()
        self.assertEqual(channel.output(), b"")

    def test_nulInPathRefused(self):
        self.assertRaises(scp.ScpUsageError, scp.parseCommand, b"scp -t a\0b")
        self.assertRaises(scp.ScpUsageError, scp.parseCommand, b"scp -f 'a\0b'")

    def test_notServed(self):
        protocol, channel = self.start(b"bash -i")
        self.assertEqual(channel.err, [b"lightd-sftp: only sftp, scp and rsync are served\n"])
        self.assertEqual(channel.exitCode, 127)


class _NoVolume:
    """An avatar whose volume is missing."""

    containerId = "c"

    def openVolume(self, extraDescriptors=0):
        raise FileNotFoundError()


class RsyncSandboxTests(TestCase):
    def test_missingSandboxRefused(self):
        self.patch(rsync, "findSandbox", lambda: None)
        protocol = commands.execProtocol(b"rsync --server -r . d", _NoVolume())
        channel = FakeSessionChannel()
        protocol.makeConnection(channel)
        self.assertEqual(channel.exitCode, 127)
        self.assertIn(b"rsync is not available on this server", b"".join(channel.err))

    def test_refusedArgvExitsOne(self):
        self.patch(rsync, "findSandbox", lambda: rsync.Sandbox("/bwrap", "/rsync", [], []))
        protocol = commands.execProtocol(b"rsync --server --rsync-path=sh . d", _NoVolume())
        channel = FakeSessionChannel()
        protocol.makeConnection(channel)
        self.assertEqual(channel.exitCode, 1)
        self.assertIn(b"--rsync-path", b"".join(channel.err))

    def test_sandboxArgv(self):
        sandbox = rsync.Sandbox(
            "/usr/bin/bwrap", "/usr/bin/rsync",
            [("/usr/bin/rsync", "/usr/bin/rsync"), ("/usr/lib/x/libc.so.6", "/usr/lib/x/libc.so.6")],
            [("usr/lib", "/lib")], "/usr/bin/setpriv",
        )
        argv = sandbox.argv(3, ["rsync", "--server", ".", "d"])
        self.assertIn("--unshare-all", argv)
        self.assertEqual(argv[-4:], ["/usr/bin/rsync", "--server", ".", "d"])
        self.assertEqual(argv[argv.index("--bind-fd") + 1 : argv.index("--bind-fd") + 3],
                         ["3", "/volume"])
        owned = sandbox.argv(3, ["rsync", "--server", ".", "d"], (1000, 1000))
        self.assertNotIn("--unshare-all", owned)
        self.assertIn("--unshare-net", owned)
        tail = owned[owned.index("--") + 1 :]
        self.assertEqual(tail[:5], ["/usr/bin/setpriv", "--reuid", "1000", "--regid", "1000"])
        self.assertIn("--clear-groups", tail)


class _FakeProcess:
    pid = 12345

    def __init__(self):
        self.written = []
        self.stdinClosed = False
        self.signals = []

    def registerProducer(self, producer, streaming):
        pass

    def write(self, data):
        self.written.append(data)

    def closeStdin(self):
        self.stdinClosed = True

    def signalProcess(self, name):
        self.signals.append(name)


class _SpawningReactor(Clock):
    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args, env, path, childFDs):
        process = _FakeProcess()
        self.spawned.append((protocol, list(args), childFDs, process))
        return process


class RsyncRootTests(TestCase):
    """
    The client's bytes reach rsync only once the volume is its root.
    """

    def setUp(self):
        from twisted.logger import globalLogPublisher

        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        volume = os.path.abspath(self.mktemp())
        os.makedirs(volume)
        sandbox = rsync.Sandbox("/bwrap", "/rsync", [], [], "/setpriv")
        opened = Volume.open(volume)
        self.addCleanup(opened.close)
        self.server = rsync.RsyncServer(sandbox, opened, ["rsync", "--server", ".", "d"])
        self.reactor = self.server.reactor = _SpawningReactor()
        self.channel = FakeSessionChannel()
        self.server.makeConnection(self.channel)
        self.bwrap, argv, childFDs, self.process = self.reactor.spawned[0]
        self.assertEqual(argv[argv.index("--info-fd") + 1], "4")
        self.assertEqual(childFDs[4], "r")

    def start(self):
        """bwrap reports the sandbox, rsync writes its version."""
        self.server.dataReceived(b"client hello")
        self.server.eofReceived()
        self.assertTrue(self.server.paused)
        self.bwrap.childDataReceived(4, b'{"child-pid": 77, ')
        self.bwrap.childDataReceived(4, b'"mnt-namespace": 4026531840}')
        self.bwrap.childConnectionLost(4)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.bwrap.outReceived(b"\x20\0\0\0")
        self.assertEqual(self.channel.output(), b"\x20\0\0\0")
        helper, argv, _, _ = self.reactor.spawned[1]
        self.assertEqual(argv[-3:], ["77", "4026531840", "/volume"])
        self.assertEqual(self.process.written, [])
        return helper

    def test_inputWaitsForTheRoot(self):
        from twisted.internet.error import ProcessDone
        from twisted.python.failure import Failure

        helper = self.start()
        helper.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.process.written, [b"client hello"])
        self.assertTrue(self.process.stdinClosed)
        self.assertFalse(self.server.paused)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_noRootNoRsync(self):
        from twisted.internet.error import ProcessTerminated
        from twisted.python.failure import Failure

        helper = self.start()
        helper.errReceived(b"pivot_root: Operation not permitted\n")
        helper.processEnded(Failure(ProcessTerminated(1)))
        self.assertEqual(self.process.written, [])
        self.assertEqual(self.process.signals, ["KILL"])
        self.assertEqual(self.channel.exitCode, 127)
        self.assertIn(b"rsync could not be started", b"".join(self.channel.err))
        logged = [e for e in self.events if e.get("log_namespace") == "lightd_conch.rsync"]
        self.assertEqual(len(logged), 1)
        self.assertIn("Operation not permitted", logged[0]["why"])

    def test_rsyncThatNeverStarts(self):
        self.server.dataReceived(b"client hello")
        self.reactor.advance(rsync.ROOT_TIMEOUT)
        self.assertEqual(self.process.written, [])
        self.assertEqual(self.process.signals, ["KILL"])
        self.assertEqual(self.channel.exitCode, 127)

    def test_rsyncEndsBeforeStarting(self):
        """An option rsync refuses: its own message and exit status."""
        self.bwrap.errReceived(b"rsync: unknown option\n")
        self.bwrap.processEnded(Failure(ProcessTerminated(1)))
        self.assertEqual(self.channel.exitCode, 1)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class _Conn:
    def __init__(self):
        self.events = []
        self.transport = _Buffered()

    def sendData(self, channel, data):
        self.events.append(("data", b"".join(data) if isinstance(data, list) else data))

    def sendExtendedData(self, channel, kind, data):
        self.events.append(("stderr", data))

    def sendRequest(self, channel, name, data, wantReply=0):
        self.events.append(("request", name, data))

    def sendEOF(self, channel):
        self.events.append(("eof",))

    def sendClose(self, channel):
        if not channel.localClosed:
            channel.localClosed = True
            self.events.append(("close",))

    def adjustWindow(self, channel, size):
        pass


class ChannelExitTests(TestCase):
    def test_outputThenStatusThenClose(self):
        """
        A command's output and stderr go out in order within the window;
        exit-status, EOF and close follow only once all of it is out.
        """
        from lightd_conch.ssh import SessionChannel

        channel = SessionChannel(localWindow=1000, localMaxPacket=100,
                                 remoteWindow=10, remoteMaxPacket=100)
        channel.conn = _Conn()
        channel.write(b"out-123456")
        channel.writeStderr(b"err")
        channel.exit(127)
        self.assertEqual(channel.conn.events, [("data", b"out-123456")])
        channel.addWindowBytes(100)
        self.assertEqual(channel.conn.events[1:], [
            ("stderr", b"err"),
            ("request", b"exit-status", b"\0\0\0\x7f"),
            ("eof",),
            ("close",),
        ])

    def test_execStartsAfterReply(self):
        from lightd_conch.ssh import SessionChannel

        volume = os.path.abspath(self.mktemp())
        os.makedirs(volume)

        class Avatar:
            containerId = "c"

            def openVolume(self, extraDescriptors=0):
                return Volume.open(volume)

        channel = SessionChannel(localWindow=1000, localMaxPacket=100,
                                 remoteWindow=1000, remoteMaxPacket=100, avatar=Avatar())
        channel.conn = _Conn()
        channel.clock = Clock()
        import struct

        command = b"uname -a"
        self.assertEqual(channel.requestReceived(b"exec", struct.pack(">I", len(command)) + command), 1)
        self.assertEqual(channel.conn.events, [])
        channel.clock.advance(0)
        self.assertEqual(channel.conn.events[0],
                         ("stderr", b"lightd-sftp: only sftp, scp and rsync are served\n"))
        self.assertEqual(channel.conn.events[1], ("request", b"exit-status", b"\0\0\0\x7f"))
