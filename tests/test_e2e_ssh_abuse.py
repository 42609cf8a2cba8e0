"""
The SSH layer of the running service against a hand-written client
(tests/rawssh.py) that sends what real clients never do: a key exchange
started and never finished, messages out of turn within one, NEWKEYS with no
key exchange, garbled transport and connection messages, channels with a
maximum packet size of 0, windows past 2**32 - 1, CHANNEL_DATA whose length
field disagrees with its data.

Each test ends as an operator would check: the daemon said goodbye with a
PROTOCOL_ERROR DISCONNECT (or refused the channel) within seconds, its
memory stayed near where it was, its open files came back to their number
before the test, its log holds no traceback, and a paramiko SFTP session
works.
"""

import os
import re
import socket
import struct
import time

from twisted.trial import unittest

from tests.harness import (
    FXP_DATA,
    FXP_HANDLE,
    FXP_INIT,
    FXP_NAME,
    FXP_OPEN,
    FXP_READ,
    FXP_REALPATH,
    FXP_VERSION,
    PFLAG_READ,
    attrs,
    default_config,
    make_credentials,
    packet,
    paramiko_sftp,
    start_service,
    string,
    uint32,
    uint64,
)
from tests.rawssh import (
    DISCONNECT_PROTOCOL_ERROR,
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_REQUEST,
    MSG_CHANNEL_WINDOW_ADJUST,
    MSG_DEBUG,
    MSG_DISCONNECT,
    MSG_EXT_INFO,
    MSG_GLOBAL_REQUEST,
    MSG_IGNORE,
    MSG_KEX_ECDH_INIT,
    MSG_KEXINIT,
    MSG_NEWKEYS,
    MSG_SERVICE_REQUEST,
    MSG_UNIMPLEMENTED,
    MSG_USERAUTH_REQUEST,
    RawSSH,
    channel_data,
    channel_request,
    parse_string,
    window_adjust,
)
from tests.test_e2e_protocol import fd_count, report, rss_bytes

# A DISCONNECT or a refusal comes within this many seconds, or never.
PROMPTLY = 5
# How far the daemon's resident memory may grow during a test.
RSS_SLACK = 8 * 2**20
# READs pipelined at a key exchange: their replies would be 100 MiB.
READ_SIZE = 255 * 1024
READS = 400
BIG_FILE_CHUNKS = 32


def read_requests(handle, count):
    """READs 1 to C{count} of L{READ_SIZE} bytes, cycling through the big file."""
    return b"".join(
        packet(
            FXP_READ,
            uint32(1 + k) + string(handle)
            + uint64((k % BIG_FILE_CHUNKS) * READ_SIZE) + uint32(READ_SIZE),
        )
        for k in range(count)
    )


class SFTPStream:
    """The SFTP packets in the CHANNEL_DATA messages of one channel."""

    def __init__(self):
        self.buffer = bytearray()

    def feed(self, message):
        self.buffer += parse_string(message, 5)[0]

    def packets(self):
        """(type, body after the type byte) for each whole packet so far."""
        while len(self.buffer) >= 4:
            (size,) = struct.unpack_from(">I", self.buffer)
            if len(self.buffer) < 4 + size:
                return
            body = bytes(self.buffer[4 : 4 + size])
            del self.buffer[: 4 + size]
            yield body[0], body[1:]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class SSHAbuseTestCase(unittest.TestCase):
    """
    A fresh service per test, with C{sftp_config} over the defaults, and the
    daemon's open files and memory measured once it has served one session.
    """

    sftp_config = {}

    def setUp(self):
        config = default_config()
        config["sftp"].update(self.sftp_config)
        self.service = start_service(self, config)
        self.creds = make_credentials(self.service)
        self.pid = self.service.process.pid
        started_fds = fd_count(self.pid)
        # One session first, so what the daemon sets up at its first login
        # (thread pools, modules) is in the baseline.
        self.assertSFTPWorks()
        self.waitForFds(started_fds)
        self.baseline_fds = fd_count(self.pid)
        self.baseline_rss = rss_bytes(self.pid)

    # -- clients ---------------------------------------------------------------

    def connect(self, strict=True):
        ssh = RawSSH(self.service.port, strict=strict)
        self.addCleanup(ssh.close)
        return ssh

    def login(self):
        return self.connect().login(self.creds["username"], self.creds["password"])

    def sftpChannel(self, ssh, local_id=0, window=2 * 1024 * 1024, max_packet=32768):
        """A session channel with the sftp subsystem, INIT sent and VERSION read."""
        channel = ssh.open_session(window=window, max_packet=max_packet, local_id=local_id)
        self.assertIsNotNone(channel, "the session channel was refused")
        ssh.start_sftp(channel)
        ssh.send_data(channel, packet(FXP_INIT, uint32(3)))
        stream = SFTPStream()
        while True:
            stream.feed(ssh.read_until(MSG_CHANNEL_DATA))
            for ptype, _ in stream.packets():
                self.assertEqual(ptype, FXP_VERSION)
                return channel

    def openBigFile(self, ssh, channel):
        """
        Write a file of L{BIG_FILE_CHUNKS} reads into the volume, open it
        over C{channel}: (its handle, its content).
        """
        content = os.urandom(BIG_FILE_CHUNKS * READ_SIZE)
        (self.service.volume() / "big").write_bytes(content)
        ssh.send_data(channel, packet(
            FXP_OPEN, uint32(0) + string("/big") + uint32(PFLAG_READ) + attrs()))
        stream = SFTPStream()
        while True:
            stream.feed(ssh.read_until(MSG_CHANNEL_DATA))
            for ptype, body in stream.packets():
                self.assertEqual(ptype, FXP_HANDLE, body)
                return parse_string(body, 4)[0], content

    # -- what an operator checks -------------------------------------------------

    def assertDisconnected(self, ssh, what):
        """The daemon said goodbye with PROTOCOL_ERROR within L{PROMPTLY} seconds."""
        try:
            goodbye, _ = ssh.wait_for_disconnect(PROMPTLY)
        except AssertionError as e:
            self.fail(f"{what}: {e}")
        self.assertEqual(goodbye.code, DISCONNECT_PROTOCOL_ERROR, f"{what}: {goodbye}")
        return goodbye

    def waitForFds(self, at_most, timeout=5):
        deadline = time.monotonic() + timeout
        while fd_count(self.pid) > at_most and time.monotonic() < deadline:
            time.sleep(0.05)
        return fd_count(self.pid)

    def assertSFTPWorks(self):
        client = paramiko_sftp(self, self.service, self.creds)
        data = os.urandom(100_000)
        with client.open("/after.bin", "wb") as f:
            f.write(data)
        with client.open("/after.bin", "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertIn("after.bin", client.listdir("/"))
        client.close()
        client.get_channel().get_transport().close()

    def assertRecovered(self, *clients):
        """
        Once C{clients} are gone: open files back to the baseline, memory
        within L{RSS_SLACK} of it, a clean log, and paramiko served.
        """
        for ssh in clients:
            ssh.close()
        self.assertEqual(self.waitForFds(self.baseline_fds), self.baseline_fds,
                         "the daemon's open files did not come back to their number")
        self.assertRSSBounded(rss_bytes(self.pid))
        self.service.assertCleanLog()
        self.assertSFTPWorks()

    def assertRSSBounded(self, rss):
        growth = rss - self.baseline_rss
        self.assertLess(
            growth, RSS_SLACK,
            f"the daemon's RSS grew by {growth / 2**20:.1f} MiB "
            f"(baseline {self.baseline_rss / 2**20:.1f} MiB)",
        )

    def peerLogLines(self, ssh):
        """The lines logged about C{ssh}'s connection, logins and logouts aside."""
        address = re.compile(re.escape(ssh.local_address) + r"(?!\d)")
        return [
            line for line in self.service.log_text().splitlines()
            if address.search(line) and "login: " not in line and "logout: " not in line
        ]

    def assertOneLogLine(self, ssh, what):
        self.service.wait_for_log(lambda text: self.peerLogLines(ssh), timeout=2)
        lines = self.peerLogLines(ssh)
        self.assertEqual(len(lines), 1, f"{what}: {lines}")


class KeyExchangeStallTests(SSHAbuseTestCase):
    """
    A key exchange started and never finished: the daemon holds replies
    back until it ends, so those must count against its output limits, and
    a client may not send connection messages while its own is unfinished
    (RFC 4253 7.1).
    """

    def test_output_held_back_by_an_unfinished_key_exchange_stays_bounded(self):
        """
        400 READs of 255 KiB and a KEXINIT in one write, then a client that
        reads its socket but does not go on with the key exchange: the
        replies held back would be 100 MiB.  The SFTP server must pause
        instead, and answer all of them, right, once the exchange ends.
        """
        ssh = self.login()
        channel = self.sftpChannel(ssh, window=0xFFFFFFFF, max_packet=1 << 20)
        handle, content = self.openBigFile(ssh, channel)
        kexinit = ssh.kexinit()
        ssh.send(channel_data(channel, read_requests(handle, READS)), kexinit)
        # Nothing read for a moment: the daemon fills the socket and pauses
        # its SFTP server, then reaches the KEXINIT, which came in the same
        # read.  (A client draining as fast as the daemon answers would get
        # every reply before the daemon even saw the KEXINIT.)
        time.sleep(0.5)

        stream = SFTPStream()
        answered = {}

        def take(message):
            if message[0] != MSG_CHANNEL_DATA:
                return
            stream.feed(message)
            for ptype, body in stream.packets():
                self.assertEqual(ptype, FXP_DATA, body[:100])
                (request_id,) = struct.unpack_from(">I", body)
                answered[request_id] = parse_string(body, 4)[0]

        # A client waiting for the key exchange reads on, and may send
        # IGNORE and DEBUG, but nothing of the connection layer.
        ssh.send(bytes([MSG_IGNORE]) + string(b"still here"),
                 bytes([MSG_DEBUG]) + b"\0" + string(b"still here") + string(b""))
        server_kexinit = None
        peak = rss_bytes(self.pid)
        ssh.sock.settimeout(0.1)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                message = ssh.read_packet()
            except socket.timeout:
                message = b"\0"
            if message[0] == MSG_KEXINIT:
                server_kexinit = message
            take(message)
            peak = max(peak, rss_bytes(self.pid))
        report(
            f"{READS} READs x {READ_SIZE} bytes at an unfinished key exchange: "
            f"{len(answered)} answered before it ended; service VmRSS baseline "
            f"{self.baseline_rss / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB"
        )
        self.assertRSSBounded(peak)
        self.assertIsNotNone(server_kexinit, "the daemon did not answer the KEXINIT")
        # Else the key exchange held nothing back, and this test showed nothing.
        self.assertLess(len(answered), READS / 2)

        ssh.sock.settimeout(10)
        ssh.key_exchange(client_kexinit=kexinit, server_kexinit=server_kexinit)
        try:
            while len(answered) < READS:
                take(ssh.read_packet())
        except socket.timeout:
            self.fail(f"after the key exchange, {len(answered)} of {READS} READs answered")
        for k in range(READS):
            offset = (k % BIG_FILE_CHUNKS) * READ_SIZE
            self.assertEqual(answered[1 + k], content[offset : offset + READ_SIZE], k)
        self.assertRecovered(ssh)

    def test_connection_messages_within_the_clients_key_exchange(self):
        """
        A client that sends KEXINIT and then CHANNEL_DATA (400 READs of
        255 KiB), WINDOW_ADJUST, a channel or global request, or before
        login a SERVICE_REQUEST, is disconnected, and the daemon's memory
        stays where it was.
        """
        ssh = self.login()
        channel = self.sftpChannel(ssh, window=0xFFFFFFFF, max_packet=1 << 20)
        handle, _ = self.openBigFile(ssh, channel)
        ssh.send(ssh.kexinit(), channel_data(channel, read_requests(handle, READS)))
        self.assertDisconnected(ssh, "CHANNEL_DATA after KEXINIT")
        self.assertRSSBounded(rss_bytes(self.pid))
        clients = [ssh]

        def within_kex(what, message):
            client = self.login()
            channel = self.sftpChannel(client)
            client.send(client.kexinit(), message(channel))
            self.assertDisconnected(client, what)
            clients.append(client)

        within_kex("WINDOW_ADJUST after KEXINIT", lambda c: window_adjust(c, 1024))
        within_kex("CHANNEL_REQUEST after KEXINIT",
                   lambda c: channel_request(c, b"env", string("A") + string("B")))
        within_kex("GLOBAL_REQUEST after KEXINIT",
                   lambda c: bytes([MSG_GLOBAL_REQUEST]) + string("keepalive@openssh.com") + b"\1")

        ssh = self.connect()
        ssh.key_exchange()
        ssh.send(ssh.kexinit(), bytes([MSG_SERVICE_REQUEST]) + string("ssh-userauth"))
        self.assertDisconnected(ssh, "SERVICE_REQUEST after KEXINIT")
        self.assertRecovered(ssh, *clients)


class NewKeysTests(SSHAbuseTestCase):
    """
    NEWKEYS with no key exchange behind it is a protocol error: the
    connection ends at once and frees its unauthenticated slot.
    """

    sftp_config = {"max_startups_per_ip": 3}

    def test_newkeys_without_a_key_exchange(self):
        newkeys = bytes([MSG_NEWKEYS])
        cases = [
            ("NEWKEYS as the first packet", False, lambda ssh: [newkeys]),
            ("KEXINIT then NEWKEYS, strict", True, lambda ssh: [ssh.kexinit(), newkeys]),
            ("KEXINIT then NEWKEYS", False, lambda ssh: [ssh.kexinit(), newkeys]),
        ]
        held = []
        for what, strict, payloads in cases:
            ssh = self.connect(strict=strict)
            ssh.send(*payloads(ssh))
            self.assertDisconnected(ssh, what)
            held.append(ssh)
        # The three sockets are still open on this side, and fill
        # max_startups_per_ip: only the daemon's closing frees the slots.
        self.assertEqual(self.waitForFds(self.baseline_fds), self.baseline_fds)
        self.assertSFTPWorks()

        ssh = self.login()
        ssh.send(newkeys)
        self.assertDisconnected(ssh, "NEWKEYS after the key exchange")
        self.assertRecovered(ssh, *held)


class MalformedMessageTests(SSHAbuseTestCase):
    """
    Transport and connection messages too short or out of place: one log
    line and a PROTOCOL_ERROR DISCONNECT for each, not a traceback and a
    bare close.
    """

    def assertEachDisconnects(self, cases, connect):
        clients = []
        for what, message in cases:
            ssh = connect()
            ssh.send(*message(ssh))
            self.assertDisconnected(ssh, what)
            self.assertOneLogLine(ssh, what)
            clients.append(ssh)
        self.assertRecovered(*clients)

    def test_before_the_key_exchange(self):
        cases = [
            ("empty DEBUG", lambda ssh: [bytes([MSG_DEBUG])]),
            ("short UNIMPLEMENTED", lambda ssh: [bytes([MSG_UNIMPLEMENTED, 0])]),
            ("short DISCONNECT", lambda ssh: [bytes([MSG_DISCONNECT, 0])]),
            ("empty SERVICE_REQUEST", lambda ssh: [bytes([MSG_SERVICE_REQUEST])]),
            ("garbled EXT_INFO", lambda ssh: [bytes([MSG_EXT_INFO]) + b"\xff" * 4]),
            ("KEXINIT of a cookie only", lambda ssh: [bytes([MSG_KEXINIT]) + bytes(16)]),
            ("KEXINIT cut in its lists", lambda ssh: [ssh.kexinit()[:40]]),
            ("ECDH_INIT before KEXINIT",
             lambda ssh: [bytes([MSG_KEX_ECDH_INIT]) + string(b"\x09" * 32)]),
            ("ECDH_INIT without its key",
             lambda ssh: [ssh.kexinit(), bytes([MSG_KEX_ECDH_INIT])]),
            ("ECDH_INIT with a 5-byte key",
             lambda ssh: [ssh.kexinit(), bytes([MSG_KEX_ECDH_INIT]) + string(b"\x09" * 5)]),
        ]
        self.assertEachDisconnects(cases, lambda: self.connect(strict=False))

    def test_log_flood_before_the_key_exchange(self):
        """200 connections with an empty DEBUG each: 200 lines, not 200 tracebacks."""
        before = len(self.service.log_text().splitlines())
        for _ in range(200):
            ssh = RawSSH(self.service.port, strict=False)
            ssh.send(bytes([MSG_DEBUG]))
            self.assertDisconnected(ssh, "empty DEBUG")
            ssh.close()
        text = self.service.wait_for_log(
            lambda text: len(text.splitlines()) >= before + 200, timeout=5)
        self.assertEqual(len(text.splitlines()), before + 200)
        self.assertRecovered()

    def test_before_login(self):
        def encrypted():
            ssh = self.connect()
            ssh.key_exchange()
            return ssh

        def userauth(*fields):
            request = bytes([MSG_USERAUTH_REQUEST]) + b"".join(fields)
            return lambda ssh: [bytes([MSG_SERVICE_REQUEST]) + string("ssh-userauth"), request]

        cases = [
            ("empty SERVICE_REQUEST", lambda ssh: [bytes([MSG_SERVICE_REQUEST])]),
            ("USERAUTH_REQUEST cut after the username",
             userauth(string(self.creds["username"]), b"\0\0")),
            ("password USERAUTH_REQUEST without the password",
             userauth(string(self.creds["username"]), string("ssh-connection"),
                      string("password"))),
        ]
        self.assertEachDisconnects(cases, encrypted)

    def test_connection_messages(self):
        def session():
            ssh = self.login()
            ssh.channel = self.sftpChannel(ssh)
            return ssh

        def close(channel):
            return bytes([MSG_CHANNEL_CLOSE]) + uint32(channel)

        cases = [
            ("WINDOW_ADJUST without its size",
             lambda ssh: [bytes([MSG_CHANNEL_WINDOW_ADJUST]) + uint32(ssh.channel)]),
            ("WINDOW_ADJUST for no channel", lambda ssh: [window_adjust(77, 10)]),
            ("CHANNEL_REQUEST cut in its name",
             lambda ssh: [bytes([MSG_CHANNEL_REQUEST]) + uint32(ssh.channel) + uint32(100)]),
            ("CHANNEL_REQUEST for no channel",
             lambda ssh: [channel_request(77, b"exec", string("ls"))]),
            ("CHANNEL_EOF for no channel", lambda ssh: [bytes([MSG_CHANNEL_EOF]) + uint32(77)]),
            ("CHANNEL_CLOSE for no channel", lambda ssh: [close(77)]),
            ("CHANNEL_CLOSE twice", lambda ssh: [close(ssh.channel), close(ssh.channel)]),
            ("OPEN_CONFIRMATION for no channel",
             lambda ssh: [bytes([MSG_CHANNEL_OPEN_CONFIRMATION]) + uint32(9) * 4]),
            ("CHANNEL_OPEN cut after its id",
             lambda ssh: [bytes([MSG_CHANNEL_OPEN]) + string("session") + uint32(1)]),
            ("direct-tcpip CHANNEL_OPEN cut short",
             lambda ssh: [bytes([MSG_CHANNEL_OPEN]) + string("direct-tcpip") + b"\0"]),
            ("GLOBAL_REQUEST without want-reply",
             lambda ssh: [bytes([MSG_GLOBAL_REQUEST]) + string("tcpip-forward")]),
            # A fresh user-auth service would let the connection log in
            # again, as another container, with a fresh failure count.
            ("SERVICE_REQUEST after login",
             lambda ssh: [bytes([MSG_SERVICE_REQUEST]) + string("ssh-userauth")]),
        ]
        self.assertEachDisconnects(cases, session)


class ChannelLimitTests(SSHAbuseTestCase):
    """Channel parameters a client chooses must not make the daemon spin or overflow."""

    def test_a_maximum_packet_size_under_256_is_refused(self):
        ssh = self.login()
        for tiny in (0, 1, 255):
            self.assertIsNone(ssh.open_session(max_packet=tiny, local_id=tiny),
                              f"a channel with a maximum packet size of {tiny} was opened")
        # 256 is served, each reply cut into packets of at most 256 bytes.
        channel = ssh.open_session(max_packet=256, local_id=256)
        self.assertIsNotNone(channel)
        ssh.start_sftp(channel)
        ssh.send_data(channel, packet(FXP_INIT, uint32(3))
                      + packet(FXP_REALPATH, uint32(1) + string(".")))
        stream = SFTPStream()
        replies = []
        while len(replies) < 2:
            message = ssh.read_until(MSG_CHANNEL_DATA)
            self.assertLessEqual(len(parse_string(message, 5)[0]), 256)
            stream.feed(message)
            replies += [ptype for ptype, _ in stream.packets()]
        self.assertEqual(replies, [FXP_VERSION, FXP_NAME])
        # Nothing left spinning.
        used = cpu_seconds(self.pid)
        time.sleep(1)
        self.assertLess(cpu_seconds(self.pid) - used, 0.3)
        self.assertRecovered(ssh)

    def test_a_window_past_2_32_minus_1_is_a_protocol_error(self):
        ssh = self.login()
        window = 2 * 1024 * 1024
        channel = ssh.open_session(window=window)
        ssh.start_sftp(channel)
        # Up to 2**32 - 1 exactly is fine, and the session goes on.
        ssh.send(window_adjust(channel, 0xFFFFFFFF - window))
        ssh.send_data(channel, packet(FXP_INIT, uint32(3)))
        self.assertEqual(ssh.read_until(MSG_CHANNEL_DATA)[9 + 4], FXP_VERSION)
        ssh.send(window_adjust(channel, 0x80000000))
        self.assertDisconnected(ssh, "WINDOW_ADJUST past 2**32 - 1")
        self.assertRecovered(ssh)

    def test_channel_data_whose_length_disagrees_with_its_data(self):
        """
        The channel is closed, its data unread; the connection and its
        other channels go on.
        """
        ssh = self.login()
        init = packet(FXP_INIT, uint32(3))
        cases = [("shorter", 4), ("longer", 1000)]
        for local_id, (what, length) in enumerate(cases, 1):
            channel = ssh.open_session(local_id=local_id)
            ssh.start_sftp(channel)
            ssh.send(bytes([MSG_CHANNEL_DATA]) + uint32(channel) + uint32(length) + init)
            ssh.sock.settimeout(PROMPTLY)
            try:
                while True:
                    message = ssh.read_packet()
                    self.assertNotEqual(message[0], MSG_CHANNEL_DATA,
                                        f"length field {what}: the data was served")
                    if message[0] == MSG_CHANNEL_CLOSE:
                        break
            except socket.timeout:
                self.fail(f"length field {what} than the data: the channel stayed open")
            self.assertEqual(struct.unpack_from(">I", message, 1)[0], local_id)
            ssh.send(bytes([MSG_CHANNEL_CLOSE]) + uint32(channel))
        ssh.sock.settimeout(10)
        self.sftpChannel(ssh, local_id=9)
        self.assertRecovered(ssh)
