"""
Tests for the C{lightd-sftp} console script, L{lightd_conch.cli}: what an
operator sees on stdout and stderr, and the exit status.
"""

import io
import json
import os
import subprocess
import sys

import bcrypt
from twisted.trial.unittest import TestCase

from twisted.conch.ssh.keys import FingerprintFormats

from lightd_conch.cli import main
from lightd_conch.store import LMDBCredentialStore

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_FOUND = "SFTP credentials not found for this container"


class CLITestsMixin:
    def setUp(self):
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.config = os.path.join(self.folder, "config.json")
        self.writeConfig(
            {"sftp": {"bcrypt_cost": 4, "public_host": "sftp.example.com"}}
        )
        self.volumes = os.path.join(self.folder, "storage", "volumes")
        self.credentials = os.path.join(self.folder, "storage", "sftp_credentials")

    def writeConfig(self, document):
        with open(self.config, "w") as f:
            json.dump(document, f)

    def runScript(self, *argv, stdin=""):
        """
        Run the script with C{--config} and C{argv}; return the exit status,
        stdout and stderr.
        """
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main(
            ["--config", self.config, *argv],
            stdin=io.StringIO(stdin),
            stdout=stdout,
            stderr=stderr,
        )
        return status, stdout.getvalue(), stderr.getvalue()

    def assertRefused(self, message, *argv, stdin=""):
        """
        The command exits 1 with one line on stderr and nothing on stdout.
        """
        self.assertEqual(
            self.runScript(*argv, stdin=stdin),
            (1, "", f"lightd-sftp: error: {message}\n"),
        )

    def generate(self, container_id, *options, stdin=""):
        status, stdout, stderr = self.runScript(
            "credentials", "generate", container_id, "--create-volume", "--json",
            *options, stdin=stdin,
        )
        self.assertEqual((status, stderr), (0, ""))
        return json.loads(stdout)

    def storedHash(self, container_id):
        store = LMDBCredentialStore(self.credentials)
        try:
            return store.get(container_id).password_hash
        finally:
            store.close()


class GenerateTests(CLITestsMixin, TestCase):
    def test_json(self):
        """
        C{--json} prints the API's object; the volume is created on request.
        """
        result = self.generate("web1")
        password = result.pop("password")
        self.assertEqual(
            result,
            {
                "username": "web1",
                "host": "sftp.example.com",
                "port": 2022,
                "volume_path": "/",
            },
        )
        self.assertEqual(len(password), 24)
        self.assertTrue(os.path.isdir(os.path.join(self.volumes, "web1")))
        self.assertTrue(bcrypt.checkpw(password.encode(), self.storedHash("web1")))

    def test_human(self):
        """
        Without C{--json}, C{key: value} lines, and a note on stderr that the
        password is shown only now.
        """
        os.makedirs(os.path.join(self.volumes, "web1"))
        status, stdout, stderr = self.runScript("credentials", "generate", "web1")
        self.assertEqual(status, 0)
        lines = stdout.splitlines()
        self.assertEqual(lines[0], "username: web1")
        self.assertRegex(lines[1], r"^password: [A-Za-z0-9]{24}$")
        self.assertEqual(
            lines[2:], ["host: sftp.example.com", "port: 2022", "volume_path: /"]
        )
        self.assertEqual(stderr, "lightd-sftp: the password will not be shown again\n")

    def test_portZero(self):
        """
        With C{sftp.port} 0 the daemon's port is chosen when it binds; the
        CLI, which works without the daemon, prints the 0 it is configured
        with (the API gives the bound port).
        """
        self.writeConfig({"sftp": {"bcrypt_cost": 4, "port": 0}})
        self.assertEqual(self.generate("web1")["port"], 0)

    def test_volumeMissing(self):
        """
        Without the volume, and without C{--create-volume}, it is refused.
        """
        self.assertRefused(
            "container volume does not exist", "credentials", "generate", "web1"
        )
        self.assertFalse(os.path.exists(os.path.join(self.volumes, "web1")))

    def test_passwordStdin(self):
        """
        C{--password-stdin} takes the first line of stdin, less its line end
        (LF or CR LF) and nothing else.
        """
        for stdin, password in [
            ("correct horse\n", "correct horse"),
            ("correct horse\r\n", "correct horse"),
            ("correct horse", "correct horse"),
            (" spaced out \n\n", " spaced out "),
            ("abcdefgh\nsecondline\n", "abcdefgh"),
            ("first line\r\nsecond line", "first line"),
            ("\ttabbed\tpassword\n", "\ttabbed\tpassword"),
        ]:
            result = self.generate("web1", "--password-stdin", stdin=stdin)
            self.assertEqual(result["password"], password)
            self.assertTrue(bcrypt.checkpw(password.encode(), self.storedHash("web1")))

    def test_passwordStdinRefused(self):
        """
        What the first line leaves is checked by the password rules: an
        empty line is refused, even with a password on the next one, and so
        is a NUL.  A line with no end in the first 4096 bytes is refused
        without reading on.
        """
        argv = ("credentials", "generate", "web1", "--create-volume", "--password-stdin")
        for stdin, message in [
            ("", "password must be 8 to 72 bytes, got 0"),
            ("\n", "password must be 8 to 72 bytes, got 0"),
            ("\r\n", "password must be 8 to 72 bytes, got 0"),
            ("\ncorrect horse\n", "password must be 8 to 72 bytes, got 0"),
            ("correct\0horse\n", "password must not contain NUL characters"),
            ("x" * 73 + "\n", "password must be 8 to 72 bytes, got 73"),
            (
                "x" * 5000,
                "password must be 8 to 72 bytes; standard input has no line end"
                " in its first 4096 bytes",
            ),
        ]:
            self.assertRefused(message, *argv, stdin=stdin)
        self.assertFalse(os.path.exists(os.path.join(self.volumes, "web1")))

    def test_passwordNotInStore(self):
        """
        The LMDB files hold the bcrypt hash, never the password.
        """
        password = "plaintext-canary-2b7e"
        self.generate("web1", "--password-stdin", stdin=password)
        self.generate("web2")
        contents = b""
        for name in os.listdir(self.credentials):
            with open(os.path.join(self.credentials, name), "rb") as f:
                contents += f.read()
        self.assertIn(self.storedHash("web1"), contents)
        self.assertNotIn(password.encode(), contents)

    def test_passwordTooShort(self):
        """
        A short password is refused with its length, not its text.
        """
        self.assertRefused(
            "password must be 8 to 72 bytes, got 3",
            "credentials", "generate", "web1", "--create-volume", "--password-stdin",
            stdin="abc\n",
        )

    def test_username(self):
        """
        C{--username} sets the login name; a reset keeps it.
        """
        result = self.generate("web1", "--username", "alice")
        self.assertEqual(result["username"], "alice")
        self.assertEqual(self.generate("web1")["username"], "alice")

    def test_conflict(self):
        """
        A username of another container is refused.
        """
        self.generate("web1", "--username", "alice")
        self.assertRefused(
            'username "alice" belongs to another container',
            "credentials", "generate", "web2", "--create-volume", "--username", "alice",
        )
        self.assertFalse(os.path.exists(os.path.join(self.volumes, "web2")))

    def test_invalidNames(self):
        """
        Invalid container ids and usernames are refused with the rule.
        """
        rule = "use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -"
        self.assertRefused(
            f'invalid container id "a/b": {rule}',
            "credentials", "generate", "a/b", "--create-volume",
        )
        self.assertRefused(
            f'invalid username ".x": {rule}',
            "credentials", "generate", "web1", "--create-volume", "--username=.x",
        )
        self.assertFalse(os.path.exists(self.volumes))


class InfoRevokeListTests(CLITestsMixin, TestCase):
    def test_infoJSON(self):
        """
        C{info --json} prints the API's object, without the password.
        """
        self.generate("web1")
        status, stdout, stderr = self.runScript("credentials", "info", "web1", "--json")
        self.assertEqual((status, stderr), (0, ""))
        result = json.loads(stdout)
        self.assertEqual(
            sorted(result),
            ["created_at", "host", "port", "updated_at", "username", "volume_path"],
        )
        self.assertEqual(
            (result["username"], result["host"], result["port"], result["volume_path"]),
            ("web1", "sftp.example.com", 2022, "/"),
        )
        self.assertIsInstance(result["created_at"], int)

    def test_infoHuman(self):
        """
        C{info} prints C{key: value} lines with readable UTC times.
        """
        self.generate("web1")
        status, stdout, stderr = self.runScript("credentials", "info", "web1")
        self.assertEqual((status, stderr), (0, ""))
        lines = stdout.splitlines()
        self.assertEqual(
            lines[:4],
            [
                "username: web1",
                "host: sftp.example.com",
                "port: 2022",
                "volume_path: /",
            ],
        )
        self.assertRegex(lines[4], r"^created_at: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertRegex(lines[5], r"^updated_at: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_infoMissing(self):
        """
        Info on a container without credentials is refused.
        """
        self.assertRefused(NOT_FOUND, "credentials", "info", "web1")

    def test_revoke(self):
        """
        Revoke says what it did; a second revoke is refused.
        """
        self.generate("web1")
        self.assertEqual(
            self.runScript("credentials", "revoke", "web1"),
            (0, "revoked web1\n", ""),
        )
        self.assertRefused(NOT_FOUND, "credentials", "info", "web1")
        self.assertRefused(NOT_FOUND, "credentials", "revoke", "web1")

    def test_listJSON(self):
        """
        C{list --json} prints an array of info objects with container ids.
        """
        self.assertEqual(
            self.runScript("credentials", "list", "--json"), (0, "[]\n", "")
        )
        self.generate("web2")
        self.generate("web1", "--username", "alice")
        status, stdout, stderr = self.runScript("credentials", "list", "--json")
        self.assertEqual((status, stderr), (0, ""))
        result = json.loads(stdout)
        self.assertEqual(
            [(item["container_id"], item["username"]) for item in result],
            [("web1", "alice"), ("web2", "web2")],
        )
        self.assertNotIn("password", result[0])

    def test_listTable(self):
        """
        C{list} prints a table.
        """
        self.generate("web1", "--username", "alice")
        status, stdout, stderr = self.runScript("credentials", "list")
        self.assertEqual((status, stderr), (0, ""))
        header, row = stdout.splitlines()
        self.assertEqual(
            header.split(), ["CONTAINER", "USERNAME", "CREATED", "UPDATED"]
        )
        self.assertEqual(row.split()[:2], ["web1", "alice"])


class ConfigAndUsageTests(CLITestsMixin, TestCase):
    def test_badConfig(self):
        """
        A bad configuration is refused naming the file and the key, and
        nothing is written.
        """
        self.writeConfig({"sftp": {"port": True}})
        self.assertRefused(
            f"{self.config}: sftp.port: must be an integer 0..65535, got true",
            "credentials", "list",
        )
        self.assertEqual(os.listdir(self.folder), ["config.json"])

    def test_missingConfig(self):
        """
        A missing configuration file is refused, naming it.
        """
        os.remove(self.config)
        self.assertRefused(
            f"{self.config}: cannot read: No such file or directory",
            "credentials",
            "list",
        )
        self.assertEqual(os.listdir(self.folder), [])

    def test_defaultConfig(self):
        """
        Without C{--config}, ./config.json is used.
        """
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.folder)
        stdout, stderr = io.StringIO(), io.StringIO()
        status = main(["credentials", "list", "--json"], stdout=stdout, stderr=stderr)
        self.assertEqual(
            (status, stdout.getvalue(), stderr.getvalue()), (0, "[]\n", "")
        )
        self.assertTrue(os.path.isdir(self.credentials))

    def test_usageErrors(self):
        """
        Usage errors exit 2 with argparse's message; a password is never
        taken from the command line.
        """
        for argv in [
            (),
            ("credentials",),
            ("credentials", "generate"),
            ("credentials", "generate", "web1", "--password", "hunter22"),
            ("credentials", "revoke", "web1", "--json"),
            ("credentials", "list", "extra"),
            ("volumes", "list"),
        ]:
            status, stdout, stderr = self.runScript(*argv)
            self.assertEqual((status, stdout), (2, ""), argv)
            self.assertIn("error: ", stderr.splitlines()[-1])
        self.assertFalse(os.path.exists(self.credentials))

    def test_help(self):
        """
        C{--help} prints usage on stdout and exits 0.
        """
        status, stdout, stderr = self.runScript("credentials", "generate", "--help")
        self.assertEqual((status, stderr), (0, ""))
        self.assertIn("--password-stdin", stdout)

    def test_module(self):
        """
        C{python -m lightd_conch.cli} is the console script.
        """
        def script(*argv, stdin=""):
            return subprocess.run(
                [sys.executable, "-m", "lightd_conch.cli", "--config", self.config]
                + list(argv),
                input=stdin,
                capture_output=True,
                text=True,
                env=dict(os.environ, PYTHONPATH=REPOSITORY),
            )

        done = script(
            "credentials", "generate", "web1", "--create-volume", "--json",
            "--password-stdin", stdin="correct horse\n",
        )
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(json.loads(done.stdout)["password"], "correct horse")
        refused = script("credentials", "info", "web2")
        self.assertEqual(
            (refused.returncode, refused.stdout, refused.stderr),
            (1, "", f"lightd-sftp: error: {NOT_FOUND}\n"),
        )
        self.assertEqual(script("credentials").returncode, 2)

    def test_passwordFromRealStdin(self):
        """
        From a real stdin, the line is split at LF only (not at a lone CR,
        as a text stream's universal newlines would), and bytes that are not
        UTF-8 are refused in one line.
        """
        def generate(stdin):
            return subprocess.run(
                [sys.executable, "-m", "lightd_conch.cli", "--config", self.config,
                 "credentials", "generate", "web1", "--create-volume", "--json",
                 "--password-stdin"],
                input=stdin,
                capture_output=True,
                env=dict(os.environ, PYTHONPATH=REPOSITORY),
            )

        for stdin, password in [
            (b"abcdefgh\r\nsecond line\n", "abcdefgh"),
            (b"pass\rword\n", "pass\rword"),
            ("p\u00e4ssw\u00f6rd\n".encode(), "p\u00e4ssw\u00f6rd"),
        ]:
            done = generate(stdin)
            self.assertEqual((done.returncode, done.stderr), (0, b""))
            self.assertEqual(json.loads(done.stdout)["password"], password)
        refused = generate(b"\xffpassword\n")
        self.assertEqual(
            (refused.returncode, refused.stdout, refused.stderr),
            (1, b"", b"lightd-sftp: error: password must be valid UTF-8\n"),
        )


def _publicLine(comment="me@laptop"):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from twisted.conch.ssh import keys

    key = keys.Key(Ed25519PrivateKey.generate())
    return key.public().toString("openssh").decode() + f" {comment}\n", key


class KeysAndTOTPTests(CLITestsMixin, TestCase):
    def test_keys(self):
        """
        keys add reads a file or stdin, list shows the fingerprint, type, date and comment,
        remove takes the fingerprint and says what it removed.
        """
        self.generate("c1")
        line, key = _publicLine()
        path = os.path.join(self.folder, "id.pub")
        with open(path, "w") as f:
            f.write(line)
        status, stdout, stderr = self.runScript("keys", "add", "c1", path, "--json")
        self.assertEqual((status, stderr), (0, ""))
        added = json.loads(stdout)
        self.assertEqual(
            added["fingerprint"],
            "SHA256:" + key.fingerprint(FingerprintFormats.SHA256_BASE64).rstrip("="),
        )
        self.assertEqual(added["type"], "ssh-ed25519")
        other, _ = _publicLine("from stdin")
        status, stdout, stderr = self.runScript("keys", "add", "c1", "-", stdin=other)
        self.assertEqual((status, stderr), (0, ""))
        self.assertIn("comment: from stdin\n", stdout)
        status, stdout, stderr = self.runScript("keys", "list", "c1")
        self.assertEqual(status, 0)
        rows = stdout.splitlines()
        self.assertEqual(len(rows), 2)
        self.assertTrue(rows[0].startswith(added["fingerprint"] + "  ssh-ed25519  "))
        self.assertTrue(rows[0].endswith("me@laptop"))
        self.assertEqual(
            self.runScript("keys", "remove", "c1", added["fingerprint"]),
            (0, f"removed {added['fingerprint']} from c1\n", ""),
        )
        status, stdout, _ = self.runScript("keys", "list", "c1", "--json")
        self.assertEqual([k["comment"] for k in json.loads(stdout)], ["from stdin"])

    def test_keysRefused(self):
        self.generate("c1")
        line, _ = _publicLine()
        status, stdout, stderr = self.runScript("keys", "add", "c2", "-", stdin=line)
        self.assertEqual((status, stdout, stderr), (1, "", f"lightd-sftp: error: {NOT_FOUND}\n"))
        status, stdout, stderr = self.runScript("keys", "add", "c1", "-", stdin="no-pty " + line)
        self.assertEqual(status, 1)
        self.assertIn("options (command=, from=, ...) are not accepted", stderr)
        status, stdout, stderr = self.runScript("keys", "add", "c1", "-", stdin=line)
        self.assertEqual(status, 0)
        status, stdout, stderr = self.runScript("keys", "add", "c1", "-", stdin=line)
        self.assertEqual(status, 1)
        self.assertIn("already one of this container's keys", stderr)
        self.assertEqual(
            self.runScript("keys", "remove", "c1", "SHA256:nothing"),
            (1, "", "lightd-sftp: error: no key with this fingerprint for this container\n"),
        )
        status, _, stderr = self.runScript("keys", "add", "c1", os.path.join(self.folder, "none"))
        self.assertEqual(status, 1)
        self.assertIn("No such file", stderr)

    def test_totp(self):
        """
        totp enable prints the secret and the otpauth URI once, and says so; disable turns it
        off, and says when it was not on.
        """
        self.generate("c1")
        status, stdout, stderr = self.runScript("totp", "enable", "c1")
        self.assertEqual(status, 0)
        self.assertRegex(stdout, r"^secret: [A-Z2-7]{32}\notpauth_uri: otpauth://totp/lightd-sftp:c1\?")
        self.assertIn("it will not be shown again", stderr)
        key = os.path.join(self.folder, "storage", "sftp_totp_key")
        self.assertEqual(os.stat(key).st_mode & 0o777, 0o600)
        self.assertEqual(self.runScript("totp", "disable", "c1"), (0, "TOTP turned off for c1\n", ""))
        self.assertEqual(
            self.runScript("totp", "disable", "c1"),
            (1, "", "lightd-sftp: error: TOTP is not enabled for this container\n"),
        )
        self.assertEqual(
            self.runScript("totp", "enable", "c2"),
            (1, "", f"lightd-sftp: error: {NOT_FOUND}\n"),
        )
