"""
Tests for L{lightd_conch.ssh} and L{lightd_conch.cred}: timers with a Clock,
the checker, the session channel's flow control, and logins from paramiko
against the service's factory listening in this process.
"""

import os
import socket
import struct

import bcrypt
import paramiko
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch.ssh import keys
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import TestCase

from lightd_conch.config import SFTPConfig
from lightd_conch.checkqueue import FairCheckQueue
from lightd_conch.cred import ContainerRealm, PasswordChecker
from lightd_conch.ssh import SessionChannel, SSHFactory, SSHTransport, loadOrCreateHostKey
from lightd_conch.store import Credential
from lightd_conch.testing import MemoryCredentialStore


def settings(**kwargs):
    return SFTPConfig(host_key="/nonexistent", bcrypt_cost=4, **kwargs)


def hostKey():
    return keys.Key(Ed25519PrivateKey.generate())


class _TCPTransport(StringTransport):
    def __init__(self):
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2022),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        self.noDelay = False

    def setTcpNoDelay(self, enabled):
        self.noDelay = enabled


class TransportTimerTests(TestCase):
    def connect(self, **kwargs):
        clock = Clock()
        factory = SSHFactory(Portal(None, []), hostKey(), settings(**kwargs), clock)
        factory.startFactory()
        transport = factory.buildProtocol(None)
        tcp = _TCPTransport()
        transport.makeConnection(tcp)
        return clock, transport, tcp

    def test_noDelay(self):
        clock, transport, tcp = self.connect()
        self.assertTrue(tcp.noDelay)

    def test_loginGraceTime(self):
        clock, transport, tcp = self.connect(login_grace_time=120, idle_timeout=0)
        clock.advance(119)
        self.assertFalse(tcp.disconnecting)
        clock.advance(1)
        self.assertTrue(tcp.disconnecting)

    def test_graceEndsAtLogin(self):
        clock, transport, tcp = self.connect(login_grace_time=120, idle_timeout=0)
        transport.authenticated("demo", "demo")
        clock.advance(1000)
        self.assertFalse(tcp.disconnecting)

    def test_idleTimeout(self):
        clock, transport, tcp = self.connect(login_grace_time=0, idle_timeout=300)
        clock.advance(200)
        transport.dataReceived(b"SSH-2.0-test\r\n")  # activity
        clock.advance(299)
        self.assertFalse(tcp.disconnecting)
        clock.advance(1)
        self.assertTrue(tcp.disconnecting)

    def test_timersDisabled(self):
        clock, transport, tcp = self.connect(login_grace_time=0, idle_timeout=0)
        clock.advance(10**6)
        self.assertFalse(tcp.disconnecting)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_algorithms(self):
        clock, transport, tcp = self.connect()
        offered = tcp.value()
        for weak in (b"cbc", b"sha1", b"md5", b"nistp", b"group-exchange", b"ssh-rsa", b"zlib"):
            self.assertNotIn(weak, offered)
        for strong in (b"curve25519-sha256", b"aes128-ctr", b"hmac-sha2-256", b"ssh-ed25519"):
            self.assertIn(strong, offered)


def plain(payload):
    """An unencrypted binary packet (before the first NEWKEYS) holding C{payload}."""
    padding = 8 - (5 + len(payload)) % 8
    if padding < 4:
        padding += 8
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + b"\0" * padding


def lastDisconnect(data):
    """The reason code of the DISCONNECT at the end of what the server wrote, or None."""
    position = data.find(b"\r\n") + 2
    found = None
    while position + 5 <= len(data):
        length, padding = struct.unpack_from(">IB", data, position)
        payload = data[position + 5 : position + 4 + length - padding]
        if payload[:1] == b"\x01":
            found = struct.unpack_from(">I", payload, 1)[0]
        position += 4 + length
    return found


class MalformedTransportTests(TestCase):
    """
    Out-of-place or garbled transport messages end the connection with a
    protocol-error DISCONNECT: no traceback in the log, no connection left
    open holding its unauthenticated slot.
    """

    connect = TransportTimerTests.connect

    def greet(self, **kwargs):
        clock, transport, tcp = self.connect(**kwargs)
        transport.dataReceived(b"SSH-2.0-test\r\n")
        return clock, transport, tcp

    def test_newKeysBeforeTheKeyExchange(self):
        clock, transport, tcp = self.greet(login_grace_time=5)
        transport.dataReceived(plain(b"\x15"))  # NEWKEYS
        self.assertTrue(tcp.disconnecting)
        self.assertEqual(lastDisconnect(tcp.value()), 2)  # PROTOCOL_ERROR
        # The grace timer finds nothing left to do, and raises nothing.
        clock.advance(10)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_garbledMessages(self):
        for payload in (b"\x04", b"\x03\x00", b"\x01\x00", b"\x14\x00\x01", b"\x1e"):
            clock, transport, tcp = self.greet()
            transport.dataReceived(plain(payload))
            self.assertTrue(tcp.disconnecting, payload)
            self.assertEqual(lastDisconnect(tcp.value()), 2, payload)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_outputHeldByAKeyExchangeCounts(self):
        """
        Packets held back while a key exchange is unfinished count as
        waiting output, so channels stop adding to them.
        """
        clock, transport, tcp = self.greet()
        transport._keyExchangeState = transport._KEY_EXCHANGE_REQUESTED
        transport._blockedByKeyExchange = []
        before = transport.outputBuffered()
        transport.sendPacket(94, b"x" * 100000)
        self.assertGreaterEqual(transport.outputBuffered() - before, 100000)

    def test_connectionMessagesDuringTheClientsKeyExchange(self):
        clock, transport, tcp = self.greet()
        transport._peerInKex = True
        transport.dispatchMessage(94, b"\0\0\0\0\0\0\0\0")
        self.assertTrue(tcp.disconnecting)
        self.assertEqual(lastDisconnect(tcp.value()), 2)


class _Pool:
    """
    A thread pool that runs work at once, for checker tests.
    """

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except BaseException:
            from twisted.python.failure import Failure

            onResult(False, Failure())
        else:
            onResult(True, result)


class _Reactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class CheckerTests(TestCase):
    def setUp(self):
        self.store = MemoryCredentialStore()
        self.store.put(
            Credential("c1", "alice", bcrypt.hashpw(b"right password", bcrypt.gensalt(4)), 1, 1)
        )
        self.checker = PasswordChecker(self.store, FairCheckQueue(_Reactor(), _Pool(), 1), 4)

    def check(self, username, password):
        from twisted.cred.credentials import UsernamePassword

        return self.checker.requestAvatarId(UsernamePassword(username, password))

    def test_right(self):
        self.assertEqual(self.successResultOf(self.check(b"alice", b"right password")), "c1")

    def test_wrongUnknownAndOversize(self):
        for username, password in (
            (b"alice", b"wrong password"),
            (b"bob", b"right password"),
            (b"\xff\xfe", b"x"),
            (b"alice", b"right password" + b"x" * 100),
            (b"alice", b"x" * 1000),
        ):
            self.failureResultOf(self.check(username, password), UnauthorizedLogin)


class _Buffered:
    """The SSH transport, as far as a channel asks how full it is."""

    def __init__(self):
        self.buffered = 0

    def outputBuffered(self):
        return self.buffered


class _Conn:
    def __init__(self):
        self.sent = []
        self.closed = []
        self.adjusted = 0
        self.transport = _Buffered()

    def sendData(self, channel, data):
        self.sent.append(b"".join(data) if isinstance(data, list) else data)

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

    def connectionLost(self, reason=None):
        self.lost = True

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def dataReceived(self, data):
        self.received.append(data)


class SessionChannelTests(TestCase):
    def channel(self, remoteWindow=100, remoteMaxPacket=40):
        channel = SessionChannel(
            localWindow=1000, localMaxPacket=100,
            remoteWindow=remoteWindow, remoteMaxPacket=remoteMaxPacket,
        )
        channel.conn = _Conn()
        channel.protocol = _Protocol()
        return channel

    def test_packetsWithinWindow(self):
        channel = self.channel()
        channel.write(b"a" * 150)
        self.assertEqual([len(d) for d in channel.conn.sent], [40, 40, 20])
        channel.addWindowBytes(30)
        self.assertEqual([len(d) for d in channel.conn.sent], [40, 40, 20, 30])
        channel.addWindowBytes(1000)
        self.assertEqual(b"".join(channel.conn.sent), b"a" * 150)

    def test_backpressure(self):
        channel = self.channel(remoteWindow=0)
        channel.highWater, channel.lowWater = 100, 50
        channel.write(b"x" * 90)
        self.assertFalse(channel.protocol.paused)
        channel.write(b"x" * 20)
        self.assertTrue(channel.protocol.paused)
        channel.addWindowBytes(40)
        self.assertTrue(channel.protocol.paused)  # 70 still queued
        channel.addWindowBytes(40)
        self.assertFalse(channel.protocol.paused)

    def test_heldWhileTheTransportIsFull(self):
        """
        With the window wide open but the transport holding more than
        OUTPUT_HIGH_WATER, nothing is sent and the protocol is paused past
        highWater; when the transport drains, output goes on and the
        protocol resumes.
        """
        from lightd_conch.ssh import OUTPUT_HIGH_WATER

        channel = self.channel(remoteWindow=10**9)
        channel.highWater, channel.lowWater = 100, 50
        channel.write(b"a" * 30)
        self.assertEqual(b"".join(channel.conn.sent), b"a" * 30)
        channel.conn.transport.buffered = OUTPUT_HIGH_WATER + 1
        channel.write(b"b" * 90)
        self.assertEqual(b"".join(channel.conn.sent), b"a" * 30)
        self.assertFalse(channel.protocol.paused)
        channel.write(b"c" * 20)
        self.assertTrue(channel.protocol.paused)
        channel.localWindowLeft = 100
        channel.dataReceived(b"req")
        self.assertEqual(channel.conn.adjusted, 0)  # receive window held too
        channel.conn.transport.buffered = 0
        channel.outputDrained()
        self.assertEqual(b"".join(channel.conn.sent), b"a" * 30 + b"b" * 90 + b"c" * 20)
        self.assertFalse(channel.protocol.paused)
        self.assertEqual(channel.localWindowLeft, 1000)

    def test_windowHeldWhilePaused(self):
        channel = self.channel()
        channel.localWindowLeft = 400
        channel.protocol.paused = True
        channel.dataReceived(b"req")
        self.assertEqual(channel.conn.adjusted, 0)
        channel.protocol.paused = False
        channel.dataReceived(b"req")
        self.assertEqual(channel.localWindowLeft, 1000)

    def test_closeAfterDrain(self):
        channel = self.channel(remoteWindow=10)
        channel.write(b"y" * 30)
        channel.loseConnection()
        self.assertEqual(channel.conn.closed, [])
        channel.addWindowBytes(100)
        self.assertEqual(channel.conn.closed, [channel])


class _Config:
    """
    Just what the realm needs from a configuration.
    """

    def __init__(self, volumes, sftp):
        self.volumes = volumes
        self.sftp = sftp

    def volume_path(self, containerId):
        return os.path.join(self.volumes, containerId)


class LiveService:
    """
    The service's factory listening on loopback in this process, with one
    container "c1" whose user is alice / secret-pass.
    """

    sftpSettings = settings(max_auth_tries=3)
    waitingPerThread = 32

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.volumes = os.path.join(base, "volumes")
        os.makedirs(os.path.join(self.volumes, "c1"))
        store = MemoryCredentialStore()
        store.put(Credential("c1", "alice", bcrypt.hashpw(b"secret-pass", bcrypt.gensalt(4)), 1, 1))
        pool = ThreadPool(1, 2)
        pool.start()
        self.addCleanup(pool.stop)
        checks = FairCheckQueue(reactor, pool, 2, self.waitingPerThread)
        self.checks = checks
        sftpSettings = self.sftpSettings
        portal = Portal(
            ContainerRealm(_Config(self.volumes, sftpSettings)),
            [PasswordChecker(store, checks, 4)],
        )
        factory = SSHFactory(
            portal, loadOrCreateHostKey(os.path.join(base, "key")), sftpSettings, reactor
        )
        self.factory = factory
        factory.checks = checks
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.connections = []
        build = factory.buildProtocol

        def buildProtocol(addr):
            protocol = build(addr)
            if protocol is not None:
                self.connections.append(protocol)
            return protocol

        factory.buildProtocol = buildProtocol
        self.addCleanup(self.disconnectAll)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def disconnectAll(self):
        """
        Close what the clients left open and wait until the server side is
        gone, so each test leaves a clean reactor.
        """
        waits = []
        for protocol in self.connections:
            if protocol.transport.connected:
                lost = Deferred()
                original = protocol.connectionLost

                def connectionLost(reason, original=original, lost=lost):
                    original(reason)
                    lost.callback(None)

                protocol.connectionLost = connectionLost
                protocol.transport.loseConnection()
                waits.append(lost)
        return gatherResults(waits)

    def client(self):
        transport = paramiko.Transport(("127.0.0.1", self.port.getHost().port))
        transport.start_client(timeout=10)
        return transport

    def messages(self):
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]



class LiveServiceTests(LiveService, TestCase):
    """
    paramiko against the factory listening on loopback in this process.
    """

    def test_loginSessionAndLogs(self):
        def session():
            transport = self.client()
            transport.auth_password("alice", "secret-pass")
            sftpClient = paramiko.SFTPClient.from_transport(transport)
            with sftpClient.open("hello.txt", "w") as f:
                f.write(b"hi")
            names = sftpClient.listdir("/")
            transport.close()
            return names

        def check(names):
            self.assertEqual(names, ["hello.txt"])
            with open(os.path.join(self.volumes, "c1", "hello.txt"), "rb") as f:
                self.assertEqual(f.read(), b"hi")
            text = "\n".join(self.messages())
            self.assertIn("login: user alice (container c1) from 127.0.0.1:", text)
            self.assertNotIn("secret-pass", text)

        return deferToThread(session).addCallback(check)

    def test_idleSessionsHoldNoKeyExchangeLeftovers(self):
        """
        Once logged in, a session keeps neither side's KEXINIT, holds the
        negotiated names as the offered objects, and shares what it offers
        with every other session; a later key exchange works all the same.
        """
        def open_():
            sessions = []
            for _ in range(2):
                transport = self.client()
                transport.auth_password("alice", "secret-pass")
                sftpClient = paramiko.SFTPClient.from_transport(transport)
                sftpClient.listdir(".")
                sessions.append((transport, sftpClient))
            return sessions

        def check(sessions):
            first, second = self.connections
            for server in (first, second):
                self.assertIsNone(server.ourKexInitPayload)
                self.assertIsNone(server.otherKexInitPayload)
                ciphers = server.currentEncryptions
                self.assertTrue(any(ciphers.outCipType is c for c in server.supportedCiphers))
                self.assertTrue(any(server.kexAlg is k for k in server.supportedKeyExchanges))
            for name in ("supportedCiphers", "supportedMACs", "supportedPublicKeys",
                         "supportedKeyExchanges"):
                self.assertIs(getattr(first, name), getattr(second, name), name)
            return deferToThread(rekey, sessions)

        def rekey(sessions):
            results = []
            for transport, sftpClient in sessions:
                transport.renegotiate_keys()
                sftpClient.open("after-rekey.txt", "w").close()
                results.append("after-rekey.txt" in sftpClient.listdir("."))
                transport.close()
            return results

        return deferToThread(open_).addCallback(check).addCallback(self.assertEqual, [True, True])

    def test_failedLoginsAndAttemptLimit(self):
        def attempts():
            transport = self.client()
            failures = 0
            try:
                for _ in range(10):
                    try:
                        transport.auth_password("alice", "wrong-pass")
                    except paramiko.AuthenticationException:
                        failures += 1
            except (paramiko.SSHException, EOFError, OSError):
                pass
            active = transport.is_active()
            transport.close()
            return failures, active

        def check(result):
            failures, active = result
            self.assertEqual(failures, 3)
            self.assertFalse(active)
            text = "\n".join(self.messages())
            self.assertEqual(text.count("failed login: user alice from 127.0.0.1:"), 3)
            self.assertNotIn("wrong-pass", text)

        return deferToThread(attempts).addCallback(check)

    def test_bannedAddressRefusedBeforeKeyExchange(self):
        self.factory.defender.threshold = 4  # two tries as an unknown user

        def attempts():
            transport = self.client()
            for _ in range(2):
                try:
                    transport.auth_password("mallory", "guess-pass")
                except paramiko.AuthenticationException:
                    pass
            transport.close()
            sock = socket.create_connection(("127.0.0.1", self.port.getHost().port), 10)
            sock.settimeout(10)
            try:
                return sock.recv(100)
            except ConnectionResetError:
                return b""
            finally:
                sock.close()

        def check(banner):
            self.assertEqual(banner, b"")  # closed before even the version line
            self.assertTrue(self.factory.defender.isBanned("127.0.0.1"))
            text = "\n".join(self.messages())
            self.assertIn("banned 127.0.0.1", text)

        return deferToThread(attempts).addCallback(check)

    def test_channelLimit(self):
        def channels():
            transport = self.client()
            transport.auth_password("alice", "secret-pass")
            opened = []
            try:
                for _ in range(12):
                    opened.append(transport.open_session())
            except paramiko.ChannelException as e:
                refused = e.code
            else:
                refused = None
            transport.close()
            return len(opened), refused

        def check(result):
            self.assertEqual(result, (10, 4))  # OPEN_RESOURCE_SHORTAGE

        return deferToThread(channels).addCallback(check)

    def test_refusedRequestsWithoutTracebacks(self):
        def refused():
            transport = self.client()
            transport.auth_password("alice", "secret-pass")
            outcomes = {}
            channel = transport.open_session()
            channel.set_environment_variable("LANG", "C")  # ignored quietly
            for name, request in (
                ("pty", lambda c: c.get_pty()),
                ("shell", lambda c: c.invoke_shell()),
                ("exec", lambda c: c.exec_command("id")),
                ("x11", lambda c: c.request_x11()),
                ("agent", lambda c: c.request_forward_agent(lambda *a: None)),
            ):
                try:
                    request(channel)
                    outcomes[name] = "accepted"
                except paramiko.SSHException:
                    outcomes[name] = "refused"
            try:
                transport.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 1))
                outcomes["forward"] = "accepted"
            except paramiko.ChannelException:
                outcomes["forward"] = "refused"
            try:
                transport.request_port_forward("127.0.0.1", 0)
                outcomes["remote-forward"] = "accepted"
            except paramiko.SSHException:
                outcomes["remote-forward"] = "refused"
            transport.close()
            return outcomes

        def check(outcomes):
            self.assertEqual(set(outcomes.values()), {"refused"}, outcomes)
            self.assertFalse([e for e in self.events if e.get("log_failure")])

        return deferToThread(refused).addCallback(check)

    def test_malformedAndOversizePacketsLeaveServiceUp(self):
        def abuse():
            transport = self.client()
            transport.auth_password("alice", "secret-pass")
            channel = transport.open_session()
            channel.invoke_subsystem("sftp")
            channel.settimeout(10)
            channel.sendall(struct.pack(">IBI", 5, 1, 3))
            version = b""
            while len(version) < 4 or len(version) < 4 + struct.unpack(">I", version[:4])[0]:
                version += channel.recv(4096)
            channel.sendall(struct.pack(">I", 300000) + b"\x06" + b"x" * 1000)
            rest = b""
            while True:
                chunk = channel.recv(100)
                if not chunk:
                    break
                rest += chunk
            transport.close()
            # A second session still works.
            transport = self.client()
            transport.auth_password("alice", "secret-pass")
            names = paramiko.SFTPClient.from_transport(transport).listdir(".")
            transport.close()
            return version, rest, names

        def check(result):
            version, rest, names = result
            self.assertEqual(version[4], 2)  # SSH_FXP_VERSION
            self.assertEqual(rest, b"")
            self.assertEqual(names, [])

        return deferToThread(abuse).addCallback(check)


class ConchLogTests(TestCase):
    def test_onlyWarningsAndAbove(self):
        from lightd_conch.ssh import _conchLog

        class Speaker:
            _log = _conchLog

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        speaker = Speaker()
        speaker._log.debug("kex alg={alg!r}", alg=b"x")
        speaker._log.info("starting service {name}", name=b"ssh-userauth")
        speaker._log.warn("a warning {n}", n=1)
        speaker._log.error("an error")
        self.assertEqual([e["log_format"] for e in events], ["a warning {n}", "an error"])
        self.assertIs(events[0]["log_source"], speaker)


class HostKeyTests(TestCase):
    def test_createdOnceAndReused(self):
        path = os.path.join(os.path.abspath(self.mktemp()), "key")
        first = loadOrCreateHostKey(path)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o600)
        self.assertEqual(first.sshType(), b"ssh-ed25519")
        self.assertEqual(
            loadOrCreateHostKey(path).fingerprint(), first.fingerprint()
        )


class DirectSendTests(TestCase):
    """
    Sealed packets go to the socket directly while the transport's buffer
    is empty; what the socket does not take, and everything after it until
    the buffer drains, goes through the transport, in order.
    """

    def setUp(self):
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.settimeout(10)
        self.addCleanup(self.peer.close)
        self.protocol = SSHTransport()
        self.transport = tcp.Connection(ours, self.protocol, reactor)
        self.transport.connected = 1
        self.protocol.transport = self.transport
        self.protocol._socket = ours
        self.addCleanup(ours.close)

    def drain(self, expected):
        received = bytearray()
        while len(received) < expected:
            if self.transport._tempDataLen or len(self.transport.dataBuffer) > self.transport.offset:
                self.transport.doWrite()
            received += self.peer.recv(1 << 20)
        return bytes(received)

    def test_allTakenDirectly(self):
        parts = [b"head", memoryview(b"0123456789")[2:], b"tail"]
        self.protocol._send(parts)
        self.assertEqual(self.transport._tempDataLen, 0)
        self.assertEqual(self.peer.recv(100), b"head23456789tail")

    def test_restQueuedInOrder(self):
        big = [os.urandom(256 * 1024) for _ in range(16)]  # more than the socket holds
        self.protocol._send(list(big))
        queued = self.transport._tempDataLen
        self.assertGreater(queued, 0)
        self.assertLess(queued, 16 * 256 * 1024)
        # While older data waits, a new packet queues behind it, even though
        # the socket might take it now.
        self.protocol._send([b"after"])
        self.assertEqual(self.transport._tempDataLen, queued + 5)
        expected = b"".join(big) + b"after"
        self.assertEqual(self.drain(len(expected)), expected)

    def test_manyParts(self):
        # More parts than one sendmsg takes (IOV_MAX).
        parts = [b"%05d" % i for i in range(3000)]
        self.protocol._send(parts)
        expected = b"".join(parts)
        self.assertEqual(self.drain(len(expected)), expected)


class QuickAckTests(TestCase):
    """
    A read that gets no reply is acknowledged at once (TCP_QUICKACK), so a
    client held back by Nagle's algorithm until its last segment is
    acknowledged does not wait for the kernel's delayed acknowledgement.
    """

    def setUp(self):
        self.options = []
        self.sent = []
        self.protocol = SSHTransport()
        self.protocol._socket = self
        self.protocol._send = self.sent.append

    def setsockopt(self, level, name, value):
        self.options.append((level, name, value))

    def test_readWithoutReply(self):
        self.protocol._dispatchReceived = lambda: None
        self.protocol._readPackets()
        self.assertEqual(self.options, [(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)])
        self.assertEqual(self.sent, [])

    def test_replyCarriesTheAcknowledgement(self):
        self.protocol._dispatchReceived = lambda: self.protocol._corked.append(b"reply")
        self.protocol._readPackets()
        self.assertEqual(self.options, [])
        self.assertEqual(self.sent, [[b"reply"]])


class _RecordedAudit:
    def __init__(self):
        self.events = []

    def event(self, name, sessionId, **fields):
        self.events.append((name, fields))


class RefusedCheckTests(LiveService, TestCase):
    """
    A password the check queue has no room for is answered, logged, audited
    and scored as a wrong one.
    """

    waitingPerThread = 0

    def test_refusedAsAWrongPassword(self):
        import threading

        release = threading.Event()
        self.addCleanup(release.set)
        # Both check threads busy, and no room to wait.
        busy = [self.checks.submit("192.0.2.1", None, release.wait, 30) for _ in range(2)]
        self.factory.audit = _RecordedAudit()

        def attempt():
            transport = self.client()
            try:
                transport.auth_password("alice", "secret-pass")
            except paramiko.AuthenticationException:
                return "refused"
            finally:
                transport.close()
            return "logged in"

        def check(outcome):
            self.assertEqual(outcome, "refused")
            text = "\n".join(self.messages())
            self.assertIn(
                "failed login: user alice from 127.0.0.1:", text
            )
            self.assertIn("not checked, too many checks waiting", text)
            failed = [f for name, f in self.factory.audit.events if name == "login_failed"]
            self.assertEqual([f["reason"] for f in failed], ["wrong_password"])
            self.assertEqual(self.factory.defender._hosts["127.0.0.1"].score, 1)
            release.set()
            return gatherResults(busy)

        return deferToThread(attempt).addCallback(check)
