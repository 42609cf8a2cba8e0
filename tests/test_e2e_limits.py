"""
End to end: a session that has ended takes no more input, and one container
cannot take the daemon's sessions, descriptors or memory from the others.

The attacks are sent by the raw SSH client (L{tests.rawssh}), which keeps
its receive window shut and sends what it likes; the refusals are also
checked with OpenSSH's client, as a user meets them.  The daemon's RSS and
open descriptors are read from C{/proc} and reported.
"""

import os
import struct
import time

from tests.harness import (
    FXP_HANDLE,
    FXP_OPEN,
    FXP_READ,
    FXP_REALPATH,
    FXP_STATUS,
    PFLAG_READ,
    attrs,
    make_credentials,
    packet,
    require_binary,
    run_sftp,
    string,
    uint32,
    uint64,
)
from tests.rawssh import (
    MSG_CHANNEL_CLOSE,
    MSG_CHANNEL_OPEN,
    MSG_CHANNEL_OPEN_CONFIRMATION,
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_EOF,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_SUCCESS,
    MSG_CHANNEL_WINDOW_ADJUST,
    Disconnected,
    RawSSH,
    channel_request,
    parse_string,
)
from tests.test_e2e_protocol import fd_count, report, rss_bytes
from tests.test_e2e_ssh_abuse import SFTPStream, SSHAbuseTestCase

# What the attacking client tries to push into an ended channel.
FLOOD_BYTES = 30 * 2**20
CHUNK = 32 * 1024
# The daemon's receive window (sftp.window_size's default).
WINDOW = 2 * 2**20
DISCONNECT_TOO_MANY_CONNECTIONS = 12


def sftp_packets(ssh, channel_stream, until, timeout=10):
    """Read CHANNEL_DATA into C{channel_stream} until C{until(packets)} is true."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channel_stream.feed(ssh.read_until(MSG_CHANNEL_DATA))
        seen.extend(channel_stream.packets())
        if until(seen):
            return seen
    raise AssertionError(f"no such replies within {timeout}s: {[p[0] for p in seen]}")


class EndedSessionTests(SSHAbuseTestCase):
    """
    The SFTP server ends a session (a malformed packet, or the client's EOF)
    while replies wait behind the client's shut window; the client then
    keeps sending.  The channel must take none of it into memory, never
    reopen its window, and close within a few seconds.
    """

    def endedChannel(self, ssh, how):
        """
        An sftp channel whose client window (1 KiB) is shut behind queued
        REALPATH replies, ended by C{how}: "malformed" or "eof".
        """
        channel = self.sftpChannel(ssh, window=1024)
        # 200 replies of about 30 bytes: most of them wait for the window.
        ssh.send_data(channel, b"".join(
            packet(FXP_REALPATH, uint32(n) + string("/")) for n in range(200)
        ))
        if how == "malformed":
            ssh.send_data(channel, uint32(0xFFFFFFFF) + b"garbage")
        else:
            ssh.send(bytes([MSG_CHANNEL_EOF]) + uint32(channel))
        return channel

    def flood(self, ssh, channel):
        """
        Send up to L{FLOOD_BYTES} of channel data as the daemon's window
        allows, reading (but never adjusting our own window) meanwhile.
        Returns (bytes sent, window adjusts seen, seconds until the daemon
        closed the channel or None, peak RSS).
        """
        window = WINDOW - 64 * 1024  # what INIT and the requests took, at most
        sent = adjusts = 0
        closed_after = None
        started = time.monotonic()
        peak = rss_bytes(self.pid)
        ssh.sock.settimeout(0.5)
        junk = os.urandom(CHUNK)
        while sent < FLOOD_BYTES and closed_after is None:
            if window >= CHUNK:
                ssh.send_data(channel, junk)
                sent += CHUNK
                window -= CHUNK
                if sent % (2 * 2**20) == 0:
                    peak = max(peak, rss_bytes(self.pid))
                continue
            try:
                message = ssh.read_packet()
            except OSError:  # socket.timeout: nothing from the daemon
                if time.monotonic() - started > 15:
                    break
                continue
            if message[0] == MSG_CHANNEL_WINDOW_ADJUST:
                adjusts += 1
                window += struct.unpack_from(">I", message, 5)[0]
            elif message[0] == MSG_CHANNEL_CLOSE:
                closed_after = time.monotonic() - started
        while closed_after is None and time.monotonic() - started < 15:
            try:
                message = ssh.read_packet()
            except OSError:
                continue
            if message[0] == MSG_CHANNEL_WINDOW_ADJUST:
                adjusts += 1
            elif message[0] == MSG_CHANNEL_CLOSE:
                closed_after = time.monotonic() - started
        peak = max(peak, rss_bytes(self.pid))
        return sent, adjusts, closed_after, peak

    def assertEndedTakesNothing(self, how):
        ssh = self.login()
        channel = self.endedChannel(ssh, how)
        sent, adjusts, closed_after, peak = self.flood(ssh, channel)
        growth = peak - self.baseline_rss
        report(
            f"ended session ({how}): client pushed {sent / 2**20:.1f} MiB, "
            f"{adjusts} window adjusts, channel closed after "
            f"{'never' if closed_after is None else f'{closed_after:.1f}s'}; "
            f"daemon RSS {self.baseline_rss / 2**20:.1f} -> peak {peak / 2**20:.1f} MiB "
            f"(+{growth / 2**20:.1f} MiB), {fd_count(self.pid)} fds"
        )
        self.assertEqual(adjusts, 0, "the ended channel's window was reopened")
        self.assertLessEqual(sent, WINDOW, "the ended channel took more than one window")
        self.assertIsNotNone(closed_after, "the ended channel was never closed")
        self.assertLess(closed_after, 10)
        self.assertRSSBounded(peak)
        self.assertRecovered(ssh)

    def test_malformed_packet_then_flood(self):
        self.assertEndedTakesNothing("malformed")

    def test_eof_then_flood(self):
        self.assertEndedTakesNothing("eof")


class SessionLimitTests(SSHAbuseTestCase):
    """
    sftp.max_sessions_per_container and sftp.max_sessions_per_ip: one login
    more is refused with a DISCONNECT that says why, and one log line.
    """

    sftp_config = {"max_sessions_per_container": 3, "max_sessions_per_ip": 5}

    def rawLogin(self, creds):
        ssh = self.connect()
        ssh.login(creds["username"], creds["password"])
        return ssh

    def assertRefused(self, creds, reason):
        ssh = self.connect()
        with self.assertRaises(Disconnected) as caught:
            ssh.login(creds["username"], creds["password"])
        self.assertEqual(caught.exception.code, DISCONNECT_TOO_MANY_CONNECTIONS)
        self.assertEqual(caught.exception.description, reason)
        return ssh

    def test_per_container(self):
        held = [self.rawLogin(self.creds) for _ in range(3)]
        refused = self.assertRefused(self.creds, b"too many sessions for this container")
        lines = self.service.wait_for_log(
            lambda text: "refused login" in text, timeout=5
        )
        refusals = [line for line in lines.splitlines() if "refused login" in line]
        self.assertEqual(len(refusals), 1, refusals)
        self.assertIn("too many sessions for this container", refusals[0])
        self.assertIn(refused.local_address, refusals[0])
        # Another container is not held back by this one's sessions.
        other = make_credentials(self.service, container="other")
        self.rawLogin(other).close()
        # One session ends: its place is free again.
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            ssh = self.connect()
            try:
                ssh.login(self.creds["username"], self.creds["password"])
                break
            except Disconnected:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.assertRecovered(ssh, *held)

    def test_per_address(self):
        other = make_credentials(self.service, container="other")
        third = make_credentials(self.service, container="third")
        held = [self.rawLogin(self.creds) for _ in range(3)]
        held += [self.rawLogin(other) for _ in range(2)]
        self.assertRefused(third, b"too many sessions from this address")
        self.assertRecovered(*held)

    def test_policy_lowers_the_limit(self):
        """
        A container's policy max_sessions lowers the service's limit for it
        (and a higher one does not raise it); the change holds for the next
        login, with the sessions already in.
        """
        result = self.service.cli("policy", "set", self.creds["username"], "max_sessions=1")
        self.assertEqual(result.returncode, 0, result.stderr)
        held = [self.rawLogin(self.creds)]
        self.assertRefused(self.creds, b"too many sessions for this container")
        result = self.service.cli("policy", "set", self.creds["username"], "max_sessions=10")
        self.assertEqual(result.returncode, 0, result.stderr)
        deadline = time.monotonic() + 5
        while True:
            try:
                held.append(self.rawLogin(self.creds))
                break
            except Disconnected:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        held.append(self.rawLogin(self.creds))
        self.assertRefused(self.creds, b"too many sessions for this container")
        self.assertRecovered(*held)

    def test_openssh_client_is_told(self):
        require_binary("sftp")
        held = [self.rawLogin(self.creds) for _ in range(3)]
        code, _, stderr = run_sftp(self.service, self.creds, ["ls"])
        self.assertNotEqual(code, 0)
        self.assertIn("too many sessions for this container", stderr)
        self.assertRecovered(*held)


class DescriptorBudgetTests(SSHAbuseTestCase):
    """
    sftp.max_handles_per_container counts every descriptor a container's
    sessions hold: the connection, each channel's volume descriptor, and
    the handles.
    """

    sftp_config = {"max_handles_per_container": 6}

    def openRead(self, ssh, channel, request_id):
        ssh.send_data(channel, packet(
            FXP_OPEN, uint32(request_id) + string("/f") + uint32(PFLAG_READ) + attrs()))
        (reply,) = sftp_packets(ssh, SFTPStream(), lambda p: p)
        return reply

    def test_volume_descriptors_count(self):
        (self.service.volume() / "f").write_bytes(b"x")
        ssh = self.login()  # 1: the connection
        first = self.sftpChannel(ssh, local_id=0)  # 2: its volume
        second = self.sftpChannel(ssh, local_id=1)  # 3
        third = self.sftpChannel(ssh, local_id=2)  # 4
        kinds = [self.openRead(ssh, first, n)[0] for n in range(2)]  # 5, 6
        self.assertEqual(kinds, [FXP_HANDLE, FXP_HANDLE])
        kind, body = self.openRead(ssh, third, 9)
        self.assertEqual(kind, FXP_STATUS, "a 7th descriptor was given")
        self.assertIn(b"Too many open handles", body)
        # No room for one more volume either: the subsystem is refused, each
        # time, with one log line for the lot.
        channel = ssh.open_session(local_id=3)
        for _ in range(3):
            ssh.send(channel_request(channel, b"subsystem", string(b"sftp")))
            reply = ssh.read_until(MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE)
            self.assertEqual(reply[0], MSG_CHANNEL_FAILURE)
        self.assertEqual(
            len(self.service.log_lines("sftp refused for container demo",
                                       "too many open files for this container")),
            1,
        )
        # Nor for one more connection: the login is refused, saying why.
        late = self.connect()
        with self.assertRaises(Disconnected) as caught:
            late.login(self.creds["username"], self.creds["password"])
        self.assertEqual(
            (caught.exception.code, caught.exception.description),
            (DISCONNECT_TOO_MANY_CONNECTIONS, b"too many open files for this container"),
        )
        # Closing a channel gives its volume's descriptor back.
        ssh.send(bytes([MSG_CHANNEL_CLOSE]) + uint32(second))
        deadline = time.monotonic() + 5
        while True:
            kind, body = self.openRead(ssh, third, 10)
            if kind == FXP_HANDLE or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(kind, FXP_HANDLE, body)
        self.assertRecovered(ssh)


class OutputBudgetTests(SSHAbuseTestCase):
    """
    The queued output of all of one container's channels is bounded
    (sftp.max_queued_output_per_container): 4 connections of 10 stalled
    channels each, every one asking for far more than it reads, hold about
    that much, not 10 x 1 MiB per connection; another container is served
    meanwhile.
    """

    sftp_config = {"max_queued_output_per_container": 4 * 2**20, "max_channels": 10}
    CONNECTIONS = 4
    READS_PER_CHANNEL = 16
    READ_SIZE = 255 * 1024

    def test_stalled_container_is_bounded(self):
        content = os.urandom(4 * 2**20)
        (self.service.volume() / "big").write_bytes(content)
        held, stalled = [], []
        for _ in range(self.CONNECTIONS):
            ssh = self.login()
            held.append(ssh)
            for local_id in range(10):
                # The client's window: big enough for VERSION and a handle.
                channel = self.sftpChannel(ssh, local_id=local_id, window=4096)
                ssh.send_data(channel, packet(
                    FXP_OPEN, uint32(0) + string("/big") + uint32(PFLAG_READ) + attrs()))
                (reply,) = sftp_packets(ssh, SFTPStream(), lambda p: p)
                self.assertEqual(reply[0], FXP_HANDLE)
                stalled.append((ssh, channel, parse_string(reply[1], 4)[0]))
        # Then every channel asks for far more than its window takes.
        for ssh, channel, handle in stalled:
            ssh.send_data(channel, b"".join(
                packet(FXP_READ, uint32(1 + k) + string(handle)
                       + uint64(k * self.READ_SIZE % len(content)) + uint32(self.READ_SIZE))
                for k in range(self.READS_PER_CHANNEL)
            ))
        time.sleep(1.0)  # the daemon reads what it will
        rss = rss_bytes(self.pid)
        growth = rss - self.baseline_rss
        # Another container logs in and lists its folder.
        other = make_credentials(self.service, container="other")
        started = time.monotonic()
        client = RawSSH(self.service.port)
        self.addCleanup(client.close)
        client.login(other["username"], other["password"])
        channel = self.sftpChannel(client)
        client.send_data(channel, packet(FXP_REALPATH, uint32(1) + string(".")))
        sftp_packets(client, SFTPStream(), lambda p: p)
        took = time.monotonic() - started
        report(
            f"output budget 4 MiB, {self.CONNECTIONS} x 10 stalled channels asking for "
            f"{self.CONNECTIONS * 10 * self.READS_PER_CHANNEL * self.READ_SIZE / 2**20:.0f} MiB: "
            f"daemon RSS +{growth / 2**20:.1f} MiB, {fd_count(self.pid)} fds; "
            f"another container's login + REALPATH {took * 1000:.0f} ms"
        )
        # 4 MiB of queue and one reply over it, the transports' buffers and
        # the allocator's slack: far under the 40 x 1.25 MiB the channels'
        # own limits allow.
        self.assertLess(growth, 16 * 2**20)
        self.assertRecovered(client, *held)


class WindowBudgetTests(SSHAbuseTestCase):
    """
    The receive windows of one container's channels together are held to
    its budget (sftp.max_queued_output_per_container): past it each new
    channel gets 64 KiB, not 2 MiB, so what its paused channels may be sent
    is bounded too; another container's channels get the full window.
    """

    sftp_config = {"max_queued_output_per_container": 4 * 2**20}

    def openWindow(self, ssh, local_id):
        """Open a session channel: (its id, the window the daemon gave it)."""
        ssh.send(bytes([MSG_CHANNEL_OPEN]) + string(b"session") + uint32(local_id)
                 + uint32(2 * 2**20) + uint32(32768))
        reply = ssh.read_until(MSG_CHANNEL_OPEN_CONFIRMATION)
        return struct.unpack_from(">I", reply, 5)[0], struct.unpack_from(">I", reply, 9)[0]

    def test_windows_of_one_container_are_bounded(self):
        held, windows = [], []
        for _ in range(4):
            ssh = self.login()
            held.append(ssh)
            windows += [self.openWindow(ssh, n)[1] for n in range(10)]
        report(f"windows given to 40 channels of one container (4 MiB budget): "
               f"{sum(windows) / 2**20:.1f} MiB in all, first {windows[:3]}, last {windows[-1]}")
        self.assertEqual(windows[:2], [WINDOW, WINDOW])
        self.assertEqual(set(windows[2:]), {64 * 1024})
        self.assertLessEqual(sum(windows), 4 * 2**20 + 40 * 64 * 1024)
        # Another container has its own.
        other = make_credentials(self.service, container="other")
        client = self.connect()
        client.login(other["username"], other["password"])
        self.assertEqual(self.openWindow(client, 0)[1], WINDOW)
        # Closing channels gives their windows back.
        first = held[0]
        first.close()
        deadline = time.monotonic() + 5
        while True:
            ssh = self.login()
            held.append(ssh)
            window = self.openWindow(ssh, 0)[1]
            if window == WINDOW or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.assertEqual(window, WINDOW)
        self.assertRecovered(client, *held)
