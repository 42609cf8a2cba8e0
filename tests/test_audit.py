"""
Tests for L{lightd_conch.audit}: the lines, the buffering, rotation shared
by two writers, reopening after logrotate; the API's and the CLI's events;
and no secret in the file.
"""

import io
import json
import os
import subprocess
import sys
from datetime import datetime

from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from lightd_conch import audit, cli
from lightd_conch.audit import AuditFile, AuditLog, AuditService, record

from .test_api import APITestCase, writeConfig


def readLines(path):
    """
    The objects in the audit log at C{path}, then in its rotated files from
    the newest to the oldest, oldest line first.
    """
    paths = []
    number = 1
    while os.path.exists(f"{path}.{number}"):
        paths.insert(0, f"{path}.{number}")
        number += 1
    if os.path.exists(path):
        paths.append(path)
    entries = []
    for name in paths:
        with open(name, "rb") as f:
            for line in f.read().splitlines():
                entries.append(json.loads(line))
    return entries


class RecordTests(TestCase):
    def test_fields(self):
        """
        Every event has time (RFC 3339, UTC, milliseconds), event, session,
        container, username and ip, in that order, then its own fields.
        """
        entry = record(
            1700000000.25, "login", "ab12", container="web", username="u", ip="::1", method="password"
        )
        self.assertEqual(
            list(entry), ["time", "event", "session", "container", "username", "ip", "method"]
        )
        self.assertEqual(entry["time"], "2023-11-14T22:13:20.250Z")
        self.assertEqual(
            datetime.fromisoformat(entry["time"].replace("Z", "+00:00")).timestamp(), 1700000000.25
        )
        self.assertEqual(json.loads(audit.encode(entry)), entry)
        self.assertTrue(audit.encode(entry).endswith(b"}\n"))

    def test_secretFieldsRefused(self):
        """
        A field named like a secret cannot be written, whatever the caller.
        """
        for name in ("password", "new_password", "token", "totp_code", "private_key", "secret"):
            self.assertRaises(ValueError, record, 0, "credentials_set", **{name: "x"})

    def test_baseFieldsNotOverridden(self):
        self.assertRaises(ValueError, record, 0, "login", time="later")


def synchronous(f, *args):
    return maybeDeferred(f, *args)


class AuditLogTests(TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.log")
        os.makedirs(os.path.dirname(self.path))
        self.clock = Clock()
        self.clock.advance(1700000000)
        self.file = AuditFile(self.path, 10 * 1024 * 1024, 10)
        self.log = AuditLog(self.file, self.clock, run=synchronous)

    def test_bufferedUntilTheSecond(self):
        """
        Events are kept in memory and written within a second, by the
        service's flush, in their order.
        """
        service = AuditService(self.log, self.clock)
        service.startService()
        self.log.event("login", "s1", container="c", username="u", ip="127.0.0.1", method="password")
        self.log.event("logout", "s1", container="c", username="u", ip="127.0.0.1", bytes_in=5, bytes_out=7)
        self.assertEqual(readLines(self.path), [])
        self.clock.advance(1)
        entries = readLines(self.path)
        self.assertEqual([e["event"] for e in entries], ["login", "logout"])
        self.assertEqual(entries[1]["bytes_out"], 7)
        self.log.event("login_failed", "s2", container=None, username="x", ip="::1", reason="unknown_user")
        d = service.stopService()
        self.assertEqual(self.successResultOf(d), None)
        self.assertEqual(len(readLines(self.path)), 3)
        self.assertIsNone(self.file._fd)

    def test_manyEventsInOrder(self):
        """
        Events past one batch of encoding (audit.ENCODE_BATCH) are all
        written, in their order, each with its own time and fields; a
        field named like a secret is refused when the event is made.
        """
        count = 2 * audit.ENCODE_BATCH + 3
        for i in range(count):
            self.log.event("upload", "s1", container="c", username="u", ip="::1",
                           path=f"/f{i}", bytes=i, result="ok")
            self.clock.advance(0.0015)
        self.assertRaises(ValueError, self.log.event, "x", "s1", password="p")
        self.successResultOf(self.log.flush())
        entries = readLines(self.path)
        self.assertEqual([e["path"] for e in entries], [f"/f{i}" for i in range(count)])
        self.assertEqual(entries[7]["bytes"], 7)
        self.assertEqual(entries[1000]["time"][:20], "2023-11-14T22:13:21.")
        self.assertEqual([e["time"] for e in entries], sorted(e["time"] for e in entries))
        self.assertEqual(entries[0]["time"], "2023-11-14T22:13:20.000Z")

    def test_unencodableEventDropped(self):
        """
        An event whose fields JSON cannot hold is left out (and logged);
        the others are written.
        """
        self.log.event("a", "s1", container="c", username="u", ip="::1", what=object())
        self.log.event("b", "s1", container="c", username="u", ip="::1")
        self.successResultOf(self.log.flush())
        self.assertEqual([e["event"] for e in readLines(self.path)], ["b"])
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_oneWriteAtATime(self):
        """
        While a write is in progress, new events wait for the next flush,
        and stopping waits for the write in progress before the last one.
        """
        from twisted.internet.defer import Deferred

        calls = []

        def run(f, *args):
            d = Deferred()
            calls.append((d, f, args))
            return d

        log = AuditLog(self.file, self.clock, run=run)
        log.event("a")
        log.flush()
        log.event("b")
        log.flush()
        self.assertEqual(len(calls), 1)
        closed = log.close()
        self.assertNoResult(closed)
        d, f, args = calls.pop(0)
        d.callback(f(*args))
        self.assertEqual(len(calls), 1)
        d, f, args = calls.pop(0)
        d.callback(f(*args))
        self.successResultOf(closed)
        self.assertEqual([e["event"] for e in readLines(self.path)], ["a", "b"])

    def test_reopenAfterRename(self):
        """
        After logrotate renames the file, the next write creates the path
        again: nothing more goes into the renamed file.  SIGHUP's reopen
        does the same at once.
        """
        self.log.event("one")
        self.successResultOf(self.log.flush())
        os.rename(self.path, self.path + "-20261203")
        self.log.event("two")
        self.successResultOf(self.log.flush())
        self.assertEqual([e["event"] for e in readLines(self.path)], ["two"])
        os.rename(self.path, self.path + "-later")
        self.log.reopen()
        self.successResultOf(self.log.flush())
        self.assertTrue(os.path.exists(self.path))
        with open(self.path + "-20261203") as f:
            self.assertEqual([json.loads(line)["event"] for line in f], ["one"])

    def test_mode(self):
        self.log.event("one")
        self.successResultOf(self.log.flush())
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)


class RotationTests(TestCase):
    def setUp(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.log")
        os.makedirs(os.path.dirname(self.path))

    def test_rotatedBySize(self):
        """
        A write that would take the file past the limit goes to a new file;
        older ones shift to .1, .2, ... and only C{keep} are kept.  No line
        is cut.
        """
        auditFile = AuditFile(self.path, 1000, 3)
        for n in range(100):
            auditFile.write(audit.encode(record(0, "login", f"{n:04d}")))
        auditFile.close()
        self.assertFalse(os.path.exists(self.path + ".4"))
        for name in (self.path, self.path + ".1", self.path + ".2", self.path + ".3"):
            self.assertLessEqual(os.path.getsize(name), 1000)
        sessions = [int(e["session"]) for e in readLines(self.path)]
        # The newest lines, all of them, in order.
        self.assertEqual(sessions, list(range(100 - len(sessions), 100)))
        self.assertGreater(len(sessions), 10)

    def test_sizeZeroNeverRotates(self):
        auditFile = AuditFile(self.path, 0, 3)
        for n in range(100):
            auditFile.write(audit.encode(record(0, "login", str(n))))
        auditFile.close()
        self.assertFalse(os.path.exists(self.path + ".1"))
        self.assertEqual(len(readLines(self.path)), 100)

    def test_twoProcessesShareTheFile(self):
        """
        Two processes appending and rotating the same file at once (the
        daemon and the CLI) lose no line, cut none and rotate no file away
        twice.
        """
        script = (
            "import sys\n"
            "from lightd_conch.audit import AuditFile, encode, record\n"
            "f = AuditFile(sys.argv[1], 20000, 1000)\n"
            "for n in range(1500):\n"
            "    f.write(encode(record(0, 'x', sys.argv[2] + str(n), container='c' * 50)))\n"
        )
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        writers = [
            subprocess.Popen([sys.executable, "-c", script, self.path, name], env=env)
            for name in ("a", "b")
        ]
        for writer in writers:
            self.assertEqual(writer.wait(60), 0)
        entries = readLines(self.path)
        for name in ("a", "b"):
            mine = [e["session"] for e in entries if e["session"].startswith(name)]
            self.assertEqual(mine, [f"{name}{n}" for n in range(1500)])
        self.assertGreater(len(os.listdir(os.path.dirname(self.path))), 10)


class CLIEventTests(TestCase):
    def cli(self, *args, stdin=""):
        stdout, stderr = io.StringIO(), io.StringIO()
        code = cli.main(["--config", self.config.path, *args], io.StringIO(stdin), stdout, stderr)
        return code, stdout.getvalue(), stderr.getvalue()

    def setUp(self):
        self.config = writeConfig(self)
        os.makedirs(self.config.volume_path("web"))

    def test_credentialChanges(self):
        """
        The CLI's generate and revoke leave credentials_set and
        credentials_revoked, marked as the CLI's; the password given is not
        in the file.
        """
        password = "correct horse battery"
        code, out, err = self.cli(
            "credentials", "generate", "web", "--username", "webuser", "--password-stdin", stdin=password + "\n"
        )
        self.assertEqual(code, 0, err)
        code, out, err = self.cli("credentials", "generate", "web", "--json")
        self.assertEqual(code, 0, err)
        generated = json.loads(out)["password"]
        self.assertEqual(self.cli("credentials", "revoke", "web")[0], 0)
        entries = readLines(self.config.sftp.audit_log)
        self.assertEqual(
            [(e["event"], e["container"], e["username"], e["via"]) for e in entries],
            [
                ("credentials_set", "web", "webuser", "cli"),
                ("credentials_set", "web", "webuser", "cli"),
                ("credentials_revoked", "web", None, "cli"),
            ],
        )
        self.assertEqual([e.get("generated") for e in entries[:2]], [False, True])
        with open(self.config.sftp.audit_log) as f:
            text = f.read()
        self.assertNotIn(password, text)
        self.assertNotIn(generated, text)
        self.assertNotIn("$2b$", text)

    def test_off(self):
        config = writeConfig(self, sftp={"audit_log": ""})
        self.config = config
        os.makedirs(config.volume_path("web"), exist_ok=True)
        self.assertEqual(self.cli("credentials", "generate", "web")[0], 0)
        self.assertEqual(config.sftp.audit_log, "")
        self.assertFalse(os.path.exists(os.path.join(config.storage.base_path, "sftp_audit.log")))

    def test_unwritableLogIsAWarning(self):
        """
        The change is made even when the log cannot be written: the CLI
        says so on stderr and exits 0.
        """
        config = writeConfig(self, sftp={"audit_log": "missing/folder/audit.log"})
        self.config = config
        os.makedirs(config.volume_path("web"), exist_ok=True)
        code, out, err = self.cli("credentials", "generate", "web")
        self.assertEqual(code, 0)
        self.assertIn("warning: cannot write the audit log", err)
        self.assertEqual(self.cli("credentials", "info", "web")[0], 0)


class APIEventTests(APITestCase):
    def setUp(self):
        super().setUp()
        from lightd_conch.testing import MemoryAudit

        self.audit = MemoryAudit()
        self.api._audit = self.audit
        self.patch(DummyRequest, "client", IPv4Address("TCP", "127.0.0.1", 40123))

    def test_setAndRevoked(self):
        """
        A reset and a revoke through the API leave credentials_set and
        credentials_revoked with the client's address, never the password.
        """
        body = self.assertResponse(
            self.generate(body={"username": "demouser", "password": "s3cret-pass-word"}), 200
        )
        self.assertResponse(self.request("DELETE", "/containers/demo/sftp/credentials"), 204)
        self.assertEqual(
            [
                (e["event"], e["container"], e["username"], e["ip"], e["via"], e["session"])
                for e in self.audit.events
            ],
            [
                ("credentials_set", "demo", "demouser", "127.0.0.1", "api", None),
                ("credentials_revoked", "demo", None, "127.0.0.1", "api", None),
            ],
        )
        self.assertNotIn(body["password"], json.dumps(self.audit.events))

    def test_refusedChangeNotRecorded(self):
        self.assertError(self.generate("missing"), 404)
        self.assertEqual(self.audit.events, [])
