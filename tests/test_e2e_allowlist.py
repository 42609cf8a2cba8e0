"""
End-to-end tests of ``sftp.allowed_ips``: connections from other addresses are closed before the
key exchange (nothing is sent, not even the version line) and logged once a minute at most;
connections from listed addresses log in, over IPv4 and IPv6 loopback.
"""

import socket
import unittest

from tests.harness import (
    default_config,
    make_credentials,
    require_paramiko,
    run_sftp,
    start_service,
)


def config_with(host, allowed):
    config = default_config()
    config["sftp"]["host"] = host
    config["sftp"]["allowed_ips"] = allowed
    return config


def first_bytes(host, port):
    """What the server sends first on a new connection (b"" if it closes it at once)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        chunks = []
        while True:
            data = sock.recv(256)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
            if b"\n" in data:
                return b"".join(chunks)


class AllowListTests(unittest.TestCase):
    timeout = 120

    def test_other_address_closed_before_key_exchange(self):
        """
        Listening on ::1 with only 127.0.0.0/8 allowed: a client from ::1 is closed without a
        byte, and three refusals in a row are one log line.
        """
        service = start_service(self, config_with("::1", ["127.0.0.0/8"]))
        for _ in range(3):
            self.assertEqual(first_bytes("::1", service.port), b"")
        service.wait_for_log(lambda text: "not in sftp.allowed_ips" in text)
        self.assertEqual(len(service.log_lines("refused a connection from ::1")), 1)
        paramiko = require_paramiko()
        transport = paramiko.Transport(("::1", service.port))
        self.addCleanup(transport.close)
        with self.assertRaises((paramiko.SSHException, EOFError, OSError)):
            transport.start_client(timeout=10)

    def test_listed_ipv4_address_logs_in(self):
        service = start_service(self, config_with("127.0.0.1", ["10.0.0.0/8", "127.0.0.1"]))
        creds = make_credentials(service)
        self.assertTrue(first_bytes("127.0.0.1", service.port).startswith(b"SSH-2.0-"))
        code, out, err = run_sftp(service, creds, ["ls"])
        self.assertEqual(code, 0, err)
        self.assertEqual(service.log_lines("not in sftp.allowed_ips"), [])

    def test_listed_ipv6_address_logs_in(self):
        paramiko = require_paramiko()
        service = start_service(self, config_with("::1", ["192.0.2.0/24", "::1/128"]))
        creds = make_credentials(service)
        transport = paramiko.Transport(("::1", service.port))
        self.addCleanup(transport.close)
        transport.start_client(timeout=30)
        transport.auth_password(creds["username"], creds["password"])
        self.assertTrue(transport.is_authenticated())
        client = paramiko.SFTPClient.from_transport(transport)
        self.assertEqual(client.listdir("."), [])
        client.close()

    def test_ipv4_refused(self):
        """
        Listening on 127.0.0.1 with only ::1 allowed: the IPv4 loopback is another address.
        """
        service = start_service(self, config_with("127.0.0.1", ["::1"]))
        self.assertEqual(first_bytes("127.0.0.1", service.port), b"")
        service.wait_for_log(lambda text: "not in sftp.allowed_ips" in text)
        self.assertEqual(len(service.log_lines("refused a connection from 127.0.0.1")), 1)
