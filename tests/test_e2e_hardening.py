"""
End to end against ``twistd lightd-sftp``: bad values in legacy scp's records
(sent raw over an exec channel, as a hostile client would) and in admin API
bodies (sent raw over HTTP).  Each gets its protocol's error (an scp fatal
line and exit status 1; a JSON 400), the connection lives on, and the log
never holds a traceback (the harness checks it at the end of every test).
"""

from tests.harness import make_credentials, paramiko_sftp, paramiko_transport, start_service, within
from tests.test_e2e_api import APITestCase
from twisted.trial import unittest


def exec_raw(testcase, transport, command, data, timeout=30):
    """
    Run C{command} on a new channel of C{transport}, send C{data} then EOF;
    return (exit status, stdout, stderr).
    """
    channel = within(transport, 10, "open_session", transport.open_session)
    channel.settimeout(timeout)
    within(transport, 10, "exec", channel.exec_command, command)
    channel.sendall(data)
    channel.shutdown_write()
    status = within(transport, timeout, "exit status", channel.recv_exit_status)
    out = channel.makefile("rb").read()
    err = channel.makefile_stderr("rb").read()
    channel.close()
    return status, out, err


class ScpRecordTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        self.service = start_service(self)
        self.creds = make_credentials(self.service)
        self.volume = self.service.volume()
        self.transport = paramiko_transport(
            self, self.service, self.creds["username"], self.creds["password"]
        )

    def assertRefused(self, command, data, message):
        status, out, err = exec_raw(self, self.transport, command, data)
        self.assertEqual(status, 1, (command, data, out, err))
        self.assertTrue(out.endswith(b"\x02scp: " + message + b"\n"), (data, out))
        # The connection lives on: a new channel on it works.
        status, out, err = exec_raw(self, self.transport, b"scp -t /", b"C0644 2 ok\nhi\0")
        self.assertEqual(status, 0, (out, err))
        self.assertEqual((self.volume / "ok").read_bytes(), b"hi")
        (self.volume / "ok").unlink()

    def test_fileTimeBeyondTimeT(self):
        self.assertRefused(
            b"scp -p -t /", b"T99999999999999999999 0 1000000000 0\nC0644 2 f\nhi\0",
            b"protocol error: mtime.sec out of range",
        )
        self.assertRefused(
            b"scp -p -t /", b"T1000000000 0 9223372036854775808 0\nC0644 2 f\nhi\0",
            b"protocol error: atime.sec out of range",
        )
        self.assertEqual(list(self.volume.iterdir()), [])

    def test_directoryTimeBeyondTimeT(self):
        self.assertRefused(
            b"scp -r -p -t /", b"T99999999999999999999 0 99999999999999999999 0\nD0755 0 d\nE\n",
            b"protocol error: mtime.sec out of range",
        )
        self.assertEqual(list(self.volume.iterdir()), [])

    def test_sizeBeyondOffT(self):
        self.assertRefused(
            b"scp -t /", b"C0644 99999999999999999999 f\n", b"protocol error: size out of range"
        )

    def test_nulInPath(self):
        status, out, err = exec_raw(self, self.transport, b"scp -t a\0b", b"")
        self.assertEqual(status, 1)
        self.assertIn(b"NUL", err)
        sftp = paramiko_sftp(self, self.service, self.creds)
        self.assertEqual(sftp.listdir("/"), [])


class APIBodyTests(APITestCase):
    def test_deepJSON(self):
        """50,000 "[": a JSON 400, not twisted.web's HTML page."""
        self.volume()
        for body in ("[" * 50000, '{"username": ' + "[" * 30000):
            response = self.generate(body=body, headers={"Content-Type": "application/json"})
            message = self.assertError(response, 400)
            self.assertIn("nested deeper than", message)
        self.assertError(self.request("GET", "/containers/demo/sftp/info"), 404)
