"""
Tests for L{lightd_conch.accounts}: the credential rules the CLI and the API
share.
"""

import json
import os
import stat

import bcrypt
from twisted.trial.unittest import TestCase

from lightd_conch.accounts import (
    AccountError,
    Accounts,
    generate_password,
    hash_password,
    validate_name,
    validate_password,
)
from lightd_conch.config import load
from lightd_conch.testing import MemoryCredentialStore

NAME_RULE = "use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -"


def writeConfig(testCase, sftp=None):
    """
    Write a config.json (bcrypt cost 4, for speed) in a new folder with an
    existing volumes folder, and load it.
    """
    folder = os.path.abspath(testCase.mktemp())
    os.makedirs(os.path.join(folder, "storage", "volumes"))
    path = os.path.join(folder, "config.json")
    with open(path, "w") as f:
        json.dump({"sftp": {"bcrypt_cost": 4, **(sftp or {})}}, f)
    return load(path)


class NameTests(TestCase):
    def test_valid(self):
        """
        Letters, digits, C{.}, C{_} and C{-}, 1 to 64 of them, not starting
        with C{.} or C{-}.
        """
        for name in ("a", "0", "_", "A_b.c-d", "web-1.prod", "x" * 64):
            self.assertEqual(validate_name("username", name), name)

    def test_invalid(self):
        """
        Anything else is refused as invalid, quoting the value on one line.
        """
        for name, shown in [
            ("", '""'),
            (".", '"."'),
            ("..", '".."'),
            (".hidden", '".hidden"'),
            ("-rf", '"-rf"'),
            ("a/b", '"a/b"'),
            ("a b", '"a b"'),
            ("a\n", '"a\\n"'),
            ("caf\xe9", '"caf\\u00e9"'),
            ("x" * 65, '"' + "x" * 65 + '"'),
            (None, "null"),
            (5, "5"),
        ]:
            error = self.assertRaises(AccountError, validate_name, "container id", name)
            self.assertEqual(error.kind, "invalid")
            self.assertEqual(str(error), f"invalid container id {shown}: {NAME_RULE}")

    def test_longValueShortened(self):
        """
        A very long value is shortened in the message.
        """
        error = self.assertRaises(AccountError, validate_name, "username", "/" * 1000)
        self.assertEqual(
            str(error), 'invalid username "' + "/" * 68 + f'...: {NAME_RULE}'
        )


class PasswordTests(TestCase):
    def test_lengths(self):
        """
        A password is 8 to 72 bytes of UTF-8: bytes, not characters.
        """
        for password in ("x" * 8, "x" * 72, "\xe9" * 36, "pass word\n\t"):
            self.assertEqual(validate_password(password), password)
        for password, size in [
            ("", 0),
            ("x" * 7, 7),
            ("x" * 73, 73),
            ("\xe9" * 37, 74),
        ]:
            error = self.assertRaises(AccountError, validate_password, password)
            self.assertEqual(error.kind, "invalid")
            self.assertEqual(str(error), f"password must be 8 to 72 bytes, got {size}")

    def test_refusedContent(self):
        """
        NUL, text that is not UTF-8 and non-strings are refused, and the
        message never shows the password.
        """
        for password, message in [
            ("secret\0password", "password must not contain NUL characters"),
            ("secret\udcffpassword", "password must be valid UTF-8"),
            (12345678, "password must be a string"),
        ]:
            error = self.assertRaises(AccountError, validate_password, password)
            self.assertEqual((error.kind, str(error)), ("invalid", message))

    def test_generated(self):
        """
        Generated passwords are 24 letters and digits, different each time.
        """
        passwords = {generate_password() for _ in range(20)}
        self.assertEqual(len(passwords), 20)
        for password in passwords:
            self.assertEqual(len(password), 24)
            self.assertTrue(password.isascii() and password.isalnum())

    def test_hash(self):
        """
        The hash is bcrypt at the given cost and verifies the password.
        """
        hashed = hash_password("correct horse", 4)
        self.assertTrue(hashed.startswith(b"$2b$04$"))
        self.assertTrue(bcrypt.checkpw(b"correct horse", hashed))
        self.assertFalse(bcrypt.checkpw(b"wrong horse", hashed))


class AccountsTests(TestCase):
    def setUp(self):
        self.config = writeConfig(self, {"host": "10.0.0.1", "port": 2200})
        self.store = MemoryCredentialStore()
        self.now = 1700000000.75
        self.accounts = Accounts(self.config, self.store, clock=lambda: self.now)

    def makeVolume(self, container_id):
        os.mkdir(self.config.volume_path(container_id))

    def assertRefused(self, kind, message, method, *args, **kwargs):
        error = self.assertRaises(AccountError, method, *args, **kwargs)
        self.assertEqual((error.kind, str(error)), (kind, message))

    def test_generate(self):
        """
        By default the username is the container id and the password is
        generated; the hash, not the password, is stored.
        """
        self.makeVolume("web1")
        result = self.accounts.generate("web1")
        password = result.pop("password")
        self.assertEqual(
            result,
            {"username": "web1", "host": "10.0.0.1", "port": 2200, "volume_path": "/"},
        )
        self.assertEqual(len(password), 24)
        stored = self.store.get("web1")
        self.assertEqual(
            (stored.username, stored.created_at, stored.updated_at),
            ("web1", 1700000000, 1700000000),
        )
        self.assertTrue(stored.password_hash.startswith(b"$2b$04$"))
        self.assertTrue(bcrypt.checkpw(password.encode(), stored.password_hash))

    def test_generateCustom(self):
        """
        A custom username and password are used as given.
        """
        self.makeVolume("web1")
        result = self.accounts.generate("web1", username="alice", password="s3cret pw")
        self.assertEqual(
            (result["username"], result["password"]), ("alice", "s3cret pw")
        )
        stored = self.store.by_username("alice")
        self.assertEqual(stored.container_id, "web1")
        self.assertTrue(bcrypt.checkpw(b"s3cret pw", stored.password_hash))

    def test_publicHost(self):
        """
        C{sftp.public_host}, when set, is the host given to users.
        """
        config = writeConfig(self, {"public_host": "sftp.example.com"})
        os.mkdir(config.volume_path("web1"))
        accounts = Accounts(config, self.store)
        self.assertEqual(accounts.generate("web1")["host"], "sftp.example.com")
        self.assertEqual(accounts.info("web1")["host"], "sftp.example.com")

    def test_reset(self):
        """
        Generating again replaces the password, keeps created_at and the
        current username, and moves updated_at.
        """
        self.makeVolume("web1")
        first = self.accounts.generate("web1", username="alice")
        self.now += 60
        second = self.accounts.generate("web1")
        self.assertEqual(second["username"], "alice")
        self.assertNotEqual(first["password"], second["password"])
        stored = self.store.get("web1")
        self.assertEqual(
            (stored.created_at, stored.updated_at), (1700000000, 1700000060)
        )
        self.assertFalse(
            bcrypt.checkpw(first["password"].encode(), stored.password_hash)
        )

    def test_resetNewUsername(self):
        """
        A reset with another username frees the old one.
        """
        self.makeVolume("web1")
        self.makeVolume("web2")
        self.accounts.generate("web1", username="alice")
        self.accounts.generate("web1", username="bob")
        result = self.accounts.generate("web2", username="alice")
        self.assertEqual(result["username"], "alice")

    def test_volumeMissing(self):
        """
        Without the container's volume, nothing is created.
        """
        self.assertRefused(
            "not_found",
            "container volume does not exist",
            self.accounts.generate,
            "web1",
        )
        self.assertEqual(self.store.list(), [])
        self.assertFalse(os.path.exists(self.config.volume_path("web1")))

    def test_createVolume(self):
        """
        With C{create_volume}, a missing volume is created, mode 0755 (less
        the umask).
        """
        self.addCleanup(os.umask, os.umask(0))
        self.accounts.generate("web1", create_volume=True)
        volume = self.config.volume_path("web1")
        self.assertEqual(stat.S_IMODE(os.stat(volume).st_mode), 0o755)
        self.accounts.generate("web1", create_volume=True)
        self.assertIsNotNone(self.store.get("web1"))

    def test_refusedBeforeCreatingVolume(self):
        """
        An invalid or conflicting request creates no volume.
        """
        self.makeVolume("web1")
        self.accounts.generate("web1")
        for kwargs, kind in [
            ({"username": "-x"}, "invalid"),
            ({"password": "short"}, "invalid"),
            ({"username": "web1"}, "conflict"),
        ]:
            error = self.assertRaises(
                AccountError,
                self.accounts.generate,
                "web2",
                create_volume=True,
                **kwargs,
            )
            self.assertEqual(error.kind, kind)
        self.assertFalse(os.path.exists(self.config.volume_path("web2")))

    def test_conflict(self):
        """
        A username of another container is refused; both records stay.
        """
        self.makeVolume("web1")
        self.makeVolume("web2")
        self.accounts.generate("web1", username="alice")
        before = self.store.list()
        self.assertRefused(
            "conflict",
            'username "alice" belongs to another container',
            self.accounts.generate,
            "web2",
            username="alice",
        )
        self.assertEqual(self.store.list(), before)

    def test_defaultUsernameTaken(self):
        """
        The default username conflicts too if another container has it.
        """
        self.makeVolume("web1")
        self.makeVolume("web2")
        self.accounts.generate("web1", username="web2")
        self.assertRefused(
            "conflict",
            'username "web2" belongs to another container',
            self.accounts.generate,
            "web2",
        )

    def test_invalidContainerId(self):
        """
        Every operation refuses an invalid container id before touching
        anything.
        """
        message = f'invalid container id "../etc": {NAME_RULE}'
        for method in (
            lambda: self.accounts.generate("../etc", create_volume=True),
            lambda: self.accounts.info("../etc"),
            lambda: self.accounts.revoke("../etc"),
        ):
            self.assertRefused("invalid", message, method)
        self.assertEqual(os.listdir(self.config.storage.volumes_path), [])

    def test_info(self):
        """
        Info shows everything but the password.
        """
        self.makeVolume("web1")
        self.accounts.generate("web1", username="alice")
        self.now += 5
        self.accounts.generate("web1")
        self.assertEqual(
            self.accounts.info("web1"),
            {
                "username": "alice",
                "host": "10.0.0.1",
                "port": 2200,
                "volume_path": "/",
                "created_at": 1700000000,
                "updated_at": 1700000005,
            },
        )

    def test_infoMissing(self):
        """
        Info on a container without credentials is refused as not found.
        """
        self.assertRefused(
            "not_found",
            "SFTP credentials not found for this container",
            self.accounts.info,
            "web1",
        )

    def test_revoke(self):
        """
        Revoking removes the credentials; revoking again is refused.
        """
        self.makeVolume("web1")
        self.accounts.generate("web1")
        self.assertIsNone(self.accounts.revoke("web1"))
        self.assertIsNone(self.store.get("web1"))
        self.assertTrue(os.path.isdir(self.config.volume_path("web1")))
        self.assertRefused(
            "not_found",
            "SFTP credentials not found for this container",
            self.accounts.revoke,
            "web1",
        )

    def test_list(self):
        """
        The list holds every container's info with its id, sorted by id.
        """
        self.assertEqual(self.accounts.list(), [])
        for container_id in ("web2", "web1"):
            self.accounts.generate(container_id, create_volume=True)
        self.assertEqual(
            self.accounts.list(),
            [
                {"container_id": container_id, **self.accounts.info(container_id)}
                for container_id in ("web1", "web2")
            ],
        )
        self.assertEqual(
            list(self.accounts.list()[0]),
            [
                "container_id",
                "username",
                "host",
                "port",
                "volume_path",
                "created_at",
                "updated_at",
            ],
        )


class KeyAccountsTests(TestCase):
    def setUp(self):
        self.config = writeConfig(self)
        self.store = MemoryCredentialStore()
        self.accounts = Accounts(self.config, self.store, clock=lambda: 1700000000.5)
        self.accounts.generate("c1", create_volume=True)

    def line(self):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from twisted.conch.ssh import keys

        return keys.Key(Ed25519PrivateKey.generate()).public().toString("openssh").decode()

    def test_at_most_100_keys(self):
        for _ in range(100):
            self.accounts.add_key("c1", self.line())
        with self.assertRaises(AccountError) as caught:
            self.accounts.add_key("c1", self.line())
        self.assertEqual(caught.exception.kind, "invalid")
        self.assertEqual(
            caught.exception.message,
            "the container holds 100 keys, the most it may: remove one first",
        )
        self.assertEqual(len(self.accounts.keys("c1")), 100)

    def test_added_at_and_remove_forms(self):
        added = self.accounts.add_key("c1", self.line() + " laptop")
        self.assertEqual(added["added_at"], 1700000000)
        self.assertEqual(added["comment"], "laptop")
        bare = added["fingerprint"][len("SHA256:"):].replace("+", "-").replace("/", "_")
        self.assertEqual(self.accounts.remove_key("c1", bare), added)
        with self.assertRaises(AccountError) as caught:
            self.accounts.remove_key("c1", added["fingerprint"])
        self.assertEqual(caught.exception.kind, "not_found")
        with self.assertRaises(AccountError) as caught:
            self.accounts.keys("nobody")
        self.assertEqual(caught.exception.kind, "not_found")
