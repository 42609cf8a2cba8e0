"""
Tests for L{lightd_conch.limits} and the code that counts against it: the
budgets alone, the session channel's ended state and container-wide output
budget (with a Clock and a fake connection), the avatar's counted volume,
and SFTPServer's framing once it has ended.
"""

import os
import struct

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from lightd_conch import sftp
from lightd_conch.cred import ContainerAvatar
from lightd_conch.limits import (
    IContainerBudgets,
    IOutputWatcher,
    MemoryContainerBudgets,
    OverLimit,
)
from lightd_conch.ssh import CLOSE_GRACE, SessionChannel
from lightd_conch.testing import FakeSessionChannel
from lightd_conch.volume import Volume


class BudgetTests(TestCase):
    def test_interface(self):
        self.assertTrue(verifyObject(IContainerBudgets, MemoryContainerBudgets()))

    def test_sessionsPerContainer(self):
        budgets = MemoryContainerBudgets(maxSessions=2)
        budgets.openSession("a", "10.0.0.1")
        budgets.openSession("a", "10.0.0.2")
        with self.assertRaises(OverLimit) as caught:
            budgets.openSession("a", "10.0.0.3")
        self.assertEqual(caught.exception.reason, "too many sessions for this container")
        budgets.openSession("b", "10.0.0.3")  # another container has its own
        budgets.closeSession("a", "10.0.0.1")
        budgets.openSession("a", "10.0.0.3")
        self.assertEqual(budgets.sessions("a"), 2)

    def test_sessionsPerAddress(self):
        budgets = MemoryContainerBudgets(maxSessionsPerAddress=2)
        budgets.openSession("a", "10.0.0.1")
        budgets.openSession("b", "10.0.0.1")
        with self.assertRaises(OverLimit) as caught:
            budgets.openSession("c", "10.0.0.1")
        self.assertEqual(caught.exception.reason, "too many sessions from this address")
        self.assertEqual(budgets.sessions("c"), 0)  # nothing counted
        budgets.openSession("c", "10.0.0.2")
        budgets.closeSession("b", "10.0.0.1")
        budgets.openSession("c", "10.0.0.1")

    def test_containerLimitOnlyLowers(self):
        limits = {"low": 1, "high": 100}
        budgets = MemoryContainerBudgets(maxSessions=3, sessionLimits=lambda c: limits.get(c, 0))
        self.assertEqual(budgets.sessionLimit("low"), 1)
        self.assertEqual(budgets.sessionLimit("high"), 3)
        self.assertEqual(budgets.sessionLimit("none"), 3)
        budgets.openSession("low", None)
        self.assertRaises(OverLimit, budgets.openSession, "low", None)

    def test_sessionHoldsADescriptor(self):
        budgets = MemoryContainerBudgets(maxDescriptors=3)
        budgets.openSession("a", None)
        budgets.takeDescriptors("a", 2)
        self.assertTrue(budgets.descriptorsFull("a"))
        with self.assertRaises(OverLimit) as caught:
            budgets.openSession("a", None)
        self.assertEqual(caught.exception.reason, "too many open files for this container")
        self.assertEqual(budgets.sessions("a"), 1)
        budgets.closeSession("a", None)
        self.assertEqual(budgets.descriptors("a"), 2)

    def test_descriptors(self):
        budgets = MemoryContainerBudgets(maxDescriptors=4)
        budgets.takeDescriptors("a", 3)
        self.assertFalse(budgets.descriptorsFull("a"))
        self.assertTrue(budgets.descriptorsFull("a", 2))
        self.assertRaises(OverLimit, budgets.takeDescriptors, "a", 2)
        self.assertEqual(budgets.descriptors("a"), 3)
        budgets.takeDescriptors("b", 4)  # each container has its own
        budgets.giveDescriptors("a", 3)
        self.assertEqual(budgets.descriptors("a"), 0)
        budgets.giveDescriptors("a")  # never below zero
        self.assertEqual(budgets.descriptors("a"), 0)

    def test_outputWatchers(self):
        """
        Past maxQueuedOutput every watcher of the container is told at once;
        once the container is down to three quarters, they are told it is
        low, soon after and not from within the call; another container's
        watchers hear nothing.
        """
        clock = Clock()
        budgets = MemoryContainerBudgets(maxQueuedOutput=100, clock=clock)
        a1, a2, b = _Watcher(), _Watcher(), _Watcher()
        budgets.watchOutput("a", a1)
        budgets.watchOutput("a", a2)
        budgets.watchOutput("b", b)
        budgets.queueOutput("a", 100)
        self.assertEqual(a1.heard, [])
        budgets.queueOutput("a", 50)
        self.assertTrue(budgets.outputFull("a"))
        self.assertFalse(budgets.outputFull("b"))
        self.assertEqual((a1.heard, a2.heard, b.heard), (["full"], ["full"], []))
        budgets.queueOutput("a", 10)  # told once
        budgets.queueOutput("a", -70)  # 90: under the limit, above 75
        clock.advance(0)
        self.assertTrue(budgets.outputFull("a"))
        self.assertEqual(a1.heard, ["full"])
        budgets.queueOutput("a", -20)  # 70
        self.assertEqual(a1.heard, ["full"])
        clock.advance(0)
        self.assertFalse(budgets.outputFull("a"))
        self.assertEqual((a1.heard, a2.heard, b.heard), (["full", "low"], ["full", "low"], []))
        budgets.unwatchOutput("a", a2)
        budgets.queueOutput("a", 100)
        self.assertEqual((a1.heard, a2.heard), (["full", "low", "full"], ["full", "low"]))

    def test_filledAgainBeforeTheWake(self):
        clock = Clock()
        budgets = MemoryContainerBudgets(maxQueuedOutput=100, clock=clock)
        watcher = _Watcher()
        budgets.watchOutput("a", watcher)
        budgets.queueOutput("a", 150)
        budgets.queueOutput("a", -100)
        budgets.queueOutput("a", 100)
        clock.advance(0)
        self.assertEqual(watcher.heard, ["full"])
        self.assertTrue(budgets.outputFull("a"))


class _Watcher:
    def __init__(self):
        self.heard = []

    def containerOutputFull(self):
        self.heard.append("full")

    def containerOutputLow(self):
        self.heard.append("low")


class _Transport:
    def __init__(self):
        self.buffered = 0

    def outputBuffered(self):
        return self.buffered


class _Conn:
    def __init__(self):
        self.sent = []
        self.closed = []
        self.requests = []
        self.adjusted = 0
        self.transport = _Transport()

    def sendData(self, channel, data):
        self.sent.append(b"".join(data) if isinstance(data, list) else data)

    def sendRequest(self, channel, name, data):
        self.requests.append(name)

    def sendEOF(self, channel):
        pass

    def sendClose(self, channel):
        self.closed.append(channel)
        channel.localClosed = True

    def adjustWindow(self, channel, amount):
        self.adjusted += amount
        channel.localWindowLeft += amount


class _Protocol:
    def __init__(self):
        self.paused = False
        self.received = []
        self.lost = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def dataReceived(self, data):
        self.received.append(bytes(data))

    def connectionLost(self, reason=None):
        self.lost = True


class _Avatar:
    def __init__(self, containerId, budgets):
        self.containerId = containerId
        self.budgets = budgets


class ChannelTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.budgets = MemoryContainerBudgets(maxQueuedOutput=1000, clock=self.clock)

    def channel(self, container="a", remoteWindow=0):
        channel = SessionChannel(
            localWindow=1000, localMaxPacket=100,
            remoteWindow=remoteWindow, remoteMaxPacket=100,
            avatar=_Avatar(container, self.budgets),
        )
        channel.conn = _Conn()
        channel.clock = self.clock
        channel.protocol = _Protocol()
        return channel

    def feed(self, channel, data):
        # As SSHConnection.channelData does: the window, then the data.
        channel.localWindowLeft -= len(data)
        channel.dataReceived(memoryview(data))

    def test_watcher(self):
        self.assertTrue(verifyObject(IOutputWatcher, self.channel()))

    # -- ended ----------------------------------------------------------------

    def test_endedTakesNoInput(self):
        """
        Once the protocol has ended the channel with replies still queued
        behind a shut window, what the client sends is not handed on or
        kept, the window is never reopened, and the channel closes after
        CLOSE_GRACE seconds without progress, dropping the queue.
        """
        channel = self.channel()
        protocol = channel.protocol
        channel.write(b"r" * 300)
        channel.exit(0)
        for _ in range(9):
            self.feed(channel, b"x" * 100)
        self.assertEqual(protocol.received, [])
        self.assertEqual(channel.conn.adjusted, 0)
        self.assertEqual(channel.localWindowLeft, 100)
        self.assertEqual(channel.conn.closed, [])
        self.assertEqual(self.budgets.queued("a"), 300)
        self.clock.advance(CLOSE_GRACE)
        self.assertEqual(channel.conn.closed, [channel])
        self.assertEqual(channel.conn.requests, [])  # no exit status for lost output
        self.assertTrue(protocol.lost)
        self.assertEqual(self.budgets.queued("a"), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_slowReaderIsNotCut(self):
        """
        The grace counts from the last output sent: a client that reads,
        however slowly, gets everything and the exit status.
        """
        channel = self.channel()
        channel.write(b"r" * 300)
        channel.exit(0)
        for _ in range(2):
            self.clock.advance(CLOSE_GRACE - 0.5)
            channel.addWindowBytes(100)
        self.assertEqual(channel.conn.closed, [])
        self.clock.advance(CLOSE_GRACE - 0.5)
        channel.addWindowBytes(100)
        self.assertEqual(b"".join(channel.conn.sent), b"r" * 300)
        self.assertEqual(channel.conn.requests, [b"exit-status"])
        self.assertEqual(channel.conn.closed, [channel])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_inputAfterEOFDropped(self):
        channel = self.channel()
        channel.protocol.eofReceived = lambda: None
        channel.localWindowLeft = 100
        channel.eofReceived()
        self.feed(channel, b"x" * 50)
        self.assertEqual(channel.protocol.received, [])
        self.assertEqual(channel.conn.adjusted, 0)

    def test_closeFromClientDropsQueue(self):
        channel = self.channel()
        channel.write(b"r" * 300)
        channel.closeReceived()
        self.assertEqual(channel.conn.closed, [channel])
        self.assertEqual(self.budgets.queued("a"), 0)
        self.assertTrue(channel.protocol is None)

    # -- the container's queued output ------------------------------------------

    def test_containerOutputBudget(self):
        """
        A container's channels together may queue maxQueuedOutput: past it
        every one of them is paused at once, whatever its own queue, and a
        channel opened meanwhile starts paused; another container's
        channels go on; once the container's queues drain, they resume.
        """
        a1, a2 = self.channel("a"), self.channel("a")
        b = self.channel("b")
        a1.write(b"1" * 600)
        self.assertFalse(a1.protocol.paused)  # each under its own highWater
        a2.write(b"2" * 500)
        self.assertEqual(self.budgets.queued("a"), 1100)
        self.assertTrue(a1.protocol.paused)
        self.assertTrue(a2.protocol.paused)
        b.write(b"b" * 900)
        self.assertFalse(b.protocol.paused)
        # A channel opened now reads nothing, and keeps its window shut.
        a3 = self.channel("a")
        a3.localWindowLeft = 100
        a3.dataReceived(memoryview(b"req"))
        self.assertTrue(a3.protocol.paused)
        self.assertEqual(a3.conn.adjusted, 0)
        # a1's client reads: the container is down to 600, under 3/4.
        a1.addWindowBytes(500)
        self.assertTrue(a2.protocol.paused)
        self.clock.advance(0)
        self.assertFalse(a1.protocol.paused)
        self.assertFalse(a2.protocol.paused)
        self.assertFalse(a3.protocol.paused)
        self.assertEqual(a3.localWindowLeft, 1000)

    def test_closedChannelGivesBackItsQueue(self):
        a1, a2 = self.channel("a"), self.channel("a")
        a1.write(b"1" * 1001)
        self.assertTrue(a2.protocol.paused)
        a1.closed()
        self.assertEqual(self.budgets.queued("a"), 0)
        self.clock.advance(0)
        self.assertFalse(a2.protocol.paused)


class CountedVolumeTests(TestCase):
    def setUp(self):
        self.volume = self.mktemp()
        os.makedirs(self.volume)
        self.budgets = MemoryContainerBudgets(maxDescriptors=3)
        self.avatar = ContainerAvatar("a", self.volume, None, budgets=self.budgets)

    def test_volumeDescriptorCounts(self):
        first = self.avatar.openVolume()
        self.assertEqual(self.budgets.descriptors("a"), 1)
        second = self.avatar.openVolume(extraDescriptors=1)
        self.assertEqual(self.budgets.descriptors("a"), 3)
        with self.assertRaises(OverLimit):
            self.avatar.openVolume()
        first.close()
        first.close()  # given back once
        self.assertEqual(self.budgets.descriptors("a"), 2)
        second.close()
        self.assertEqual(self.budgets.descriptors("a"), 0)

    def test_missingVolumeCountsNothing(self):
        self.avatar.volumePath = os.path.join(self.volume, "gone")
        with self.assertRaises(OSError):
            self.avatar.openVolume()
        self.assertEqual(self.budgets.descriptors("a"), 0)

    def test_copyDataCountsItsDuplicates(self):
        """
        copy-data's two duplicated descriptors are the container's while it
        runs: with no room for them it is refused.
        """
        with open(os.path.join(self.volume, "src"), "wb") as f:
            f.write(b"data")
        budgets = MemoryContainerBudgets(maxDescriptors=2)
        server = sftp.SFTPServer(Volume.open(self.volume), budget=budgets, owner="a")
        transport = FakeSessionChannel()
        server.makeConnection(transport)
        send = server.dataReceived

        def request(kind, requestId, payload):
            body = bytes([kind]) + struct.pack(">I", requestId) + payload
            send(struct.pack(">I", len(body)) + body)

        def string(value):
            return struct.pack(">I", len(value)) + value

        body = bytes([sftp.FXP_INIT]) + struct.pack(">I", 3)
        send(struct.pack(">I", len(body)) + body)
        flags = struct.pack(">I", 0)
        request(sftp.FXP_OPEN, 1, string(b"/src") + struct.pack(">I", sftp.FXF_READ) + flags)
        request(sftp.FXP_OPEN, 2, string(b"/dst") + struct.pack(
            ">I", sftp.FXF_WRITE | sftp.FXF_CREAT) + flags)
        self.assertEqual(budgets.descriptors("a"), 2)
        request(sftp.FXP_EXTENDED, 3, string(b"copy-data") + string(b"1") + struct.pack(">QQ", 0, 0)
                + string(b"2") + struct.pack(">Q", 0))
        self.assertIn(b"Too many open handles", transport.value())
        self.assertEqual(budgets.descriptors("a"), 2)
        server.connectionLost(None)
        self.assertEqual(budgets.descriptors("a"), 0)


class EndedServerTests(TestCase):
    def test_inputAfterAbortDropped(self):
        """
        Once a malformed packet has ended the SFTP session, what follows is
        not kept.
        """
        volume = self.mktemp()
        os.makedirs(volume)
        server = sftp.SFTPServer(Volume.open(volume))
        transport = FakeSessionChannel()
        server.makeConnection(transport)
        server.dataReceived(struct.pack(">I", 0xFFFFFFFF))
        self.assertTrue(transport.lost)
        for _ in range(100):
            server.dataReceived(memoryview(b"x" * 10000))
        self.assertEqual(server._size, 0)
        self.assertEqual(len(server._chunks), 0)
        server.connectionLost(None)

    def test_packetsAcrossChunksWhilePaused(self):
        """
        Requests cut anywhere and fed while the server is paused are all
        answered, in order, when it resumes a little at a time.
        """
        volume = self.mktemp()
        os.makedirs(volume)
        server = sftp.SFTPServer(Volume.open(volume))
        transport = FakeSessionChannel()
        server.makeConnection(transport)
        body = bytes([sftp.FXP_INIT]) + struct.pack(">I", 3)
        server.dataReceived(struct.pack(">I", len(body)) + body)
        server.pauseProducing()
        stream = b""
        for n in range(200):
            body = bytes([sftp.FXP_REALPATH]) + struct.pack(">I", n) + struct.pack(">I", 1) + b"/"
            stream += struct.pack(">I", len(body)) + body
        for start in range(0, len(stream), 7):
            server.dataReceived(memoryview(stream[start : start + 7]))
        transport.clear()
        ids = []
        while len(ids) < 200:
            # One reply at a time: each write pauses it again.
            original = transport.write

            def write(data, original=original):
                original(data)
                server.pauseProducing()

            transport.write = write
            server.resumeProducing()
            transport.write = original
            data = transport.output()
            while data:
                (length,) = struct.unpack_from(">I", data)
                ids.append(struct.unpack_from(">I", data, 5)[0])
                data = data[4 + length :]
        self.assertEqual(ids, list(range(200)))
        server.connectionLost(None)


class _SSHTransport:
    def __init__(self):
        self.sent = []

    def sendPacket(self, kind, payload):
        self.sent.append(kind)


class ExtendedDataTests(TestCase):
    """
    Conch reopens the window for every extended-data message; an ended
    channel's stays shut.
    """

    def connection(self, ended):
        from lightd_conch.ssh import SSHConnection

        conn = SSHConnection()
        conn.transport = _SSHTransport()
        channel = SessionChannel(localWindow=1000, localMaxPacket=100,
                                 remoteWindow=0, remoteMaxPacket=100)
        channel.conn = conn
        channel.id = 0
        conn.channels[0] = channel
        conn.channelsToRemoteChannel[channel] = 7
        if ended:
            channel.closing = 1
        return conn, channel

    def send(self, conn, count):
        for _ in range(count):
            conn.ssh_CHANNEL_EXTENDED_DATA(struct.pack(">3L", 0, 1, 100) + b"e" * 100)

    def test_endedChannelWindowStaysShut(self):
        conn, channel = self.connection(ended=True)
        self.send(conn, 10)
        self.assertEqual(channel.localWindowLeft, 0)
        self.assertEqual(conn.transport.sent, [])

    def test_liveChannelWindowReopened(self):
        from twisted.conch.ssh.connection import MSG_CHANNEL_WINDOW_ADJUST

        conn, channel = self.connection(ended=False)
        self.send(conn, 10)
        self.assertIn(MSG_CHANNEL_WINDOW_ADJUST, conn.transport.sent)


class ScpDescriptorTests(TestCase):
    def test_scpRefusedWithoutRoom(self):
        """
        scp needs its volume and one file: with room for one descriptor
        only, it is refused with a line that says why, and exit status 1.
        """
        from lightd_conch import commands

        volume = self.mktemp()
        os.makedirs(volume)
        avatar = ContainerAvatar("a", volume, None, budgets=MemoryContainerBudgets(maxDescriptors=1))
        refusal = commands.execProtocol(b"scp -t /", avatar)
        self.assertIsInstance(refusal, commands.Refusal)
        self.assertEqual(
            (refusal.message, refusal.code),
            ("lightd-sftp: too many open files for this container", 1),
        )
        self.assertEqual(avatar.budgets.descriptors("a"), 0)
        avatar.budgets.maxDescriptors = 2
        protocol = commands.execProtocol(b"scp -t /", avatar)
        self.assertNotIsInstance(protocol, commands.Refusal)
        self.assertEqual(avatar.budgets.descriptors("a"), 2)
        protocol.connectionLost(None)
        self.assertEqual(avatar.budgets.descriptors("a"), 0)


class RefusalLogTests(TestCase):
    def test_firstRefusalOnly(self):
        """
        A container that keeps asking past its descriptors is told every
        time, but only the first refusal since it was last under the limit
        is marked for the log.
        """
        budgets = MemoryContainerBudgets(maxDescriptors=1)
        budgets.takeDescriptors("a")
        firsts = []
        for _ in range(3):
            with self.assertRaises(OverLimit) as caught:
                budgets.takeDescriptors("a")
            firsts.append(caught.exception.first)
        budgets.giveDescriptors("a")
        budgets.takeDescriptors("a")
        with self.assertRaises(OverLimit) as caught:
            budgets.takeDescriptors("a")
        firsts.append(caught.exception.first)
        self.assertEqual(firsts, [True, False, False, True])


class WindowBudgetTests(TestCase):
    def test_grants(self):
        """
        New channels get the window they ask for while the container's
        windows add up to less than maxWindow, then the minimum; windows
        given back make room again.
        """
        budgets = MemoryContainerBudgets(maxWindow=5000)
        grants = [budgets.grantWindow("a", 2000, 100) for _ in range(4)]
        self.assertEqual(grants, [2000, 2000, 1000, 100])
        self.assertEqual(budgets.grantWindow("b", 2000, 100), 2000)
        self.assertEqual(budgets.grantWindow("a", 50, 100), 50)  # never more than asked
        budgets.returnWindow("a", 2000)
        budgets.returnWindow("a", 2000)
        self.assertEqual(budgets.grantWindow("a", 2000, 100), 2000)

    def test_channelTakesAndGivesBack(self):
        """
        A channel asks the container's budget for its receive window, and
        gives it back once it has ended.
        """
        from lightd_conch.ssh import MIN_WINDOW

        clock = Clock()
        KiB = 1024
        budgets = MemoryContainerBudgets(maxWindow=300 * KiB, clock=clock)

        def channel():
            made = SessionChannel(
                localWindow=200 * KiB, localMaxPacket=100, remoteWindow=0,
                remoteMaxPacket=100, avatar=_Avatar("a", budgets),
            )
            made.conn = _Conn()
            made.clock = clock
            made.protocol = _Protocol()
            return made

        first, second, third = channel(), channel(), channel()
        self.assertEqual(MIN_WINDOW, 64 * KiB)
        self.assertEqual(
            [(c.localWindowSize, c.localWindowLeft) for c in (first, second, third)],
            [(200 * KiB, 200 * KiB), (100 * KiB, 100 * KiB), (64 * KiB, 64 * KiB)],
        )
        first.loseConnection()  # ended: its window is the container's again
        self.assertEqual(budgets.windows("a"), 164 * KiB)
        first.closed()
        second.closed()
        third.closed()
        self.assertEqual(budgets.windows("a"), 0)
