"""
Robustness, end to end: hostile or broken SFTP packets get a reply or a closed channel within
seconds (never silence), and the daemon goes on serving everyone else. Other channel kinds and
requests (shell, exec, pty, forwarding) are refused.
"""

import socket

from twisted.trial import unittest

from tests.harness import (
    FX_BAD_MESSAGE,
    FX_EOF,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FXP_CLOSE,
    FXP_FSETSTAT,
    FXP_FSTAT,
    FXP_NAME,
    FXP_OPEN,
    FXP_READ,
    FXP_READDIR,
    FXP_REALPATH,
    FXP_STATUS,
    FXP_WRITE,
    RawSFTP,
    attrs,
    make_credentials,
    packet,
    paramiko_sftp,
    paramiko_transport,
    require_paramiko,
    within,
    start_service,
    string,
    uint32,
    uint64,
)


class RobustnessTestCase(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.paramiko = require_paramiko()
        self.service = start_service(self)
        self.creds = make_credentials(self.service, "demo")
        (self.service.volume("demo") / "file.txt").write_bytes(b"content\n")
        self.raw = RawSFTP(self, self.service, self.creds)
        # The service log is checked for tracebacks by the harness after every test.

    def assertStillServing(self):
        """A second, fresh session logs in and lists the volume."""
        sftp = paramiko_sftp(self, self.service, self.creds, timeout=15)
        self.assertEqual(sftp.listdir("/"), ["file.txt"])
        self.assertEqual(sftp.normalize("."), "/")

    def assertReplyOrClose(self, request_id, acceptable_codes):
        """
        The request gets a STATUS with one of ``acceptable_codes``, or the channel closes.
        Returns the code, or None if the channel closed.
        """
        try:
            reply = self.raw.read_reply(request_id)
        except socket.timeout:
            self.fail(f"no reply and no close within 10 s for request {request_id}")
        if reply is None:
            return None
        ptype, reader = reply
        self.assertEqual(ptype, FXP_STATUS)
        code = reader.uint32()
        self.assertIn(code, acceptable_codes)
        return code

    def assertSessionStillAnswers(self, request_id=99):
        """If the channel is still open, it is still in sync: REALPATH "." answers "/"."""
        self.assertEqual(self.raw.realpath(request_id, "."), "/")


class MalformedPacketTests(RobustnessTestCase):
    def test_oversize_packet_closes_the_channel(self):
        bystander = paramiko_sftp(self, self.service, self.creds)
        self.raw.send(uint32(300_000) + bytes([FXP_OPEN]) + uint32(1) + b"A" * 1000)
        self.assertTrue(self.raw.wait_closed(10), "an oversize packet did not close the channel")
        self.assertEqual(bystander.listdir("/"), ["file.txt"], "another session was disturbed")
        self.assertStillServing()

    def test_oversize_packet_with_the_full_body_closes_the_channel(self):
        body = bytes([FXP_WRITE]) + uint32(1) + b"B" * (300_000 - 5)
        try:
            self.raw.send(uint32(len(body)) + body)
        except (EOFError, OSError):
            pass  # closed while we were still sending: that is the point
        self.assertTrue(self.raw.wait_closed(10), "an oversize packet did not close the channel")
        self.assertStillServing()

    def test_packet_at_the_limit_is_served(self):
        # A 256 KiB WRITE is big but legal; it must not be mistaken for an oversize packet.
        self.raw.request(FXP_OPEN, 1, string("big.bin"), uint32(0x1A), attrs())  # WRITE|CREAT|TRUNC
        ptype, reader = self.raw.read_reply(1)
        handle = reader.string()
        data = b"C" * (256 * 1024 - 200)
        self.raw.request(FXP_WRITE, 2, string(handle), uint64(0), string(data))
        self.assertEqual(self.raw.status(2)[0], FX_OK)
        self.raw.request(FXP_CLOSE, 3, string(handle))
        self.assertEqual(self.raw.status(3)[0], FX_OK)
        self.assertEqual((self.service.volume("demo") / "big.bin").read_bytes(), data)

    def test_truncated_packet_gets_bad_message(self):
        # OPEN whose filename claims 100 bytes, in a packet of 20.
        payload = uint32(5) + uint32(100) + b"f" * 10
        body = bytes([FXP_OPEN]) + payload
        body += b"\0" * (20 - len(body))
        self.raw.send(uint32(20) + body)
        if self.assertReplyOrClose(5, [FX_BAD_MESSAGE]) is not None:
            self.assertSessionStillAnswers()
        self.assertStillServing()

    def test_truncated_packets_of_every_request_type(self):
        for ptype in range(3, 21):
            self.raw.send(packet(ptype, uint32(1000 + ptype) + uint32(50)))
            if self.assertReplyOrClose(1000 + ptype, [FX_BAD_MESSAGE]) is None:
                break
        else:
            self.assertSessionStillAnswers()
        self.assertStillServing()

    def test_unknown_packet_type_gets_op_unsupported(self):
        for request_id, ptype in ((7, 99), (8, 150), (9, 255), (10, 21), (11, 100)):
            self.raw.send(packet(ptype, uint32(request_id) + b"trailing junk"))
            code, message = self.raw.status(request_id)
            self.assertEqual(code, FX_OP_UNSUPPORTED, f"packet type {ptype}")
        self.assertSessionStillAnswers()
        self.assertStillServing()

    def test_extended_requests(self):
        # SSH_FXP_EXTENDED (200): an unknown name is unsupported; a missing name is malformed.
        self.raw.send(packet(200, uint32(12) + string("no-such-extension@example.com")))
        self.assertEqual(self.raw.status(12)[0], FX_OP_UNSUPPORTED)
        self.raw.send(packet(200, uint32(7)))
        self.assertIn(self.raw.status(7)[0], (FX_OP_UNSUPPORTED, FX_BAD_MESSAGE))
        self.assertSessionStillAnswers()

    def test_tiny_packets(self):
        for length in range(0, 5):
            raw = RawSFTP(self, self.service, self.creds)
            body = bytes([FXP_REALPATH]) + b"\0\0\0"
            raw.send(uint32(length) + body[:length])
            # Then a well-formed request: either the channel was closed, or it answers it.
            try:
                raw.request(FXP_REALPATH, 77, string("."))
            except (EOFError, OSError):
                continue
            try:
                reply = raw.read_reply(77)
            except socket.timeout:
                self.fail(f"a packet of length {length} left the channel silent")
            if reply is not None:
                self.assertEqual(reply[0], FXP_NAME, f"after a packet of length {length}")
            self.assertStillServing()


class UnknownHandleTests(RobustnessTestCase):
    def test_requests_on_unknown_handles_get_a_status(self):
        bogus = string(b"no-such-handle")
        requests = [
            (FXP_READ, bogus + uint64(0) + uint32(100)),
            (FXP_WRITE, bogus + uint64(0) + string(b"data")),
            (FXP_FSTAT, bogus),
            (FXP_FSETSTAT, bogus + attrs(0o600)),
            (FXP_READDIR, bogus),
            (FXP_CLOSE, bogus),
            (FXP_READ, string(b"") + uint64(0) + uint32(100)),
            (FXP_CLOSE, string(b"\xff" * 300)),
        ]
        for request_id, (ptype, payload) in enumerate(requests, start=20):
            self.raw.send(packet(ptype, uint32(request_id) + payload))
            code, message = self.raw.status(request_id)
            self.assertNotIn(code, (FX_OK, FX_EOF), f"request type {ptype} on a bogus handle")
        self.assertSessionStillAnswers()
        self.assertStillServing()

    def test_handle_is_unknown_after_close(self):
        self.raw.request(FXP_OPEN, 1, string("file.txt"), uint32(1), attrs())
        ptype, reader = self.raw.read_reply(1)
        handle = reader.string()
        self.raw.request(FXP_CLOSE, 2, string(handle))
        self.assertEqual(self.raw.status(2)[0], FX_OK)
        self.raw.request(FXP_READ, 3, string(handle), uint64(0), uint32(10))
        self.assertNotIn(self.raw.status(3)[0], (FX_OK, FX_EOF))
        self.raw.request(FXP_CLOSE, 4, string(handle))
        self.assertNotIn(self.raw.status(4)[0], (FX_OK, FX_EOF))

    def test_another_sessions_handle_is_unknown(self):
        other = RawSFTP(self, self.service, self.creds)
        other.request(FXP_OPEN, 1, string("file.txt"), uint32(1), attrs())
        ptype, reader = other.read_reply(1)
        handle = reader.string()
        self.raw.request(FXP_READ, 2, string(handle), uint64(0), uint32(10))
        reply = self.raw.read_reply(2)
        self.assertEqual(reply[0], FXP_STATUS, "a handle from another session was honoured")


class SessionEndTests(RobustnessTestCase):
    def test_sftp_session_ends_with_exit_status_zero(self):
        # When the client sends EOF, the sftp subsystem ends like OpenSSH's: exit-status 0,
        # then close. Without the exit status, ssh exits 255 and scp reports failure (exit 1)
        # after a successful transfer.
        self.raw.channel.shutdown_write()
        self.assertTrue(self.raw.channel.status_event.wait(10), "no exit-status after EOF")
        self.assertEqual(self.raw.channel.exit_status, 0)
        self.assertTrue(self.raw.wait_closed(10))


class ChannelRequestTests(RobustnessTestCase):
    def open_session(self):
        transport = paramiko_transport(
            self, self.service, self.creds["username"], self.creds["password"]
        )
        channel = within(transport, 10, "open_session", transport.open_session)
        channel.settimeout(10)
        return transport, channel

    def assertRefused(self, transport, channel, what, request, *args):
        """The request fails, or the channel closes with a non-zero status and no output."""
        try:
            within(transport, 10, what, request, *args)
        except self.paramiko.SSHException:
            return
        output = b""
        try:
            while chunk := channel.recv(4096):
                output += chunk
        except socket.timeout:
            self.fail(f"{what} was accepted and left the channel open")
        self.assertNotIn(b"uid=", output)
        self.assertTrue(channel.status_event.wait(10), f"{what}: no exit status")
        self.assertNotEqual(channel.exit_status, 0, f"{what} was accepted")

    def test_exec_is_refused(self):
        transport, channel = self.open_session()
        self.assertRefused(transport, channel, "exec id", channel.exec_command, "id")
        self.assertStillServing()

    def test_shell_is_refused(self):
        transport, channel = self.open_session()
        self.assertRefused(transport, channel, "shell", channel.invoke_shell)
        self.assertStillServing()

    def test_pty_is_refused(self):
        transport, channel = self.open_session()
        with self.assertRaises(self.paramiko.SSHException):
            within(transport, 10, "pty-req", channel.get_pty)
        self.assertStillServing()

    def test_unknown_subsystem_is_refused(self):
        transport, channel = self.open_session()
        self.assertRefused(transport, channel, "subsystem netconf",
                           channel.invoke_subsystem, "netconf")

    def test_x11_forwarding_is_refused(self):
        transport, channel = self.open_session()
        with self.assertRaises(self.paramiko.SSHException):
            within(transport, 10, "x11-req", lambda: channel.request_x11(single_connection=True))
        self.assertStillServing()

    def test_port_forwarding_is_refused(self):
        transport, _ = self.open_session()
        with self.assertRaises(self.paramiko.ChannelException):
            within(transport, 15, "direct-tcpip", transport.open_channel, "direct-tcpip",
                   ("127.0.0.1", self.service.port), ("127.0.0.1", 40000))
        with self.assertRaises(self.paramiko.SSHException):
            within(transport, 15, "tcpip-forward", transport.request_port_forward,
                   "127.0.0.1", 0)
        self.assertStillServing()
