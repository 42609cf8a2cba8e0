"""
Tests for L{lightd_conch.store} and its fake in L{lightd_conch.testing}: the
same behaviour from both, and LMDB shared between processes.
"""

import json
import os
import stat
import subprocess
import sys
import textwrap

from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from lightd_conch.store import (
    Credential,
    ICredentialStore,
    KeyExists,
    LMDBCredentialStore,
    NoCredential,
    StoreError,
    TOTPRecord,
    TooManyKeys,
    UsernameTaken,
)
from lightd_conch.userkeys import AuthorizedKey
from lightd_conch.testing import MemoryCredentialStore

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def credential(container_id, username=None, password_hash=b"$2b$04$hash", at=100):
    return Credential(
        container_id=container_id,
        username=container_id if username is None else username,
        password_hash=password_hash,
        created_at=at,
        updated_at=at,
    )


class CredentialStoreTestsMixin:
    """
    The behaviour every L{ICredentialStore} has.  Subclasses define
    C{makeStore()}.
    """

    def setUp(self):
        self.store = self.makeStore()
        self.addCleanup(self.store.close)

    def test_interface(self):
        """
        The store provides L{ICredentialStore}.
        """
        self.assertTrue(verifyObject(ICredentialStore, self.store))

    def test_unstorableNamesFindNothing(self):
        """
        Lookups of names no record can have (empty, or longer than any key)
        find nothing rather than fail: a login as "" is just a failed login.
        """
        for name in ("", "x" * 600, "\u00e9" * 400):
            self.assertIsNone(self.store.get(name))
            self.assertIsNone(self.store.by_username(name))

    def test_empty(self):
        """
        An empty store has no records.
        """
        self.assertIsNone(self.store.get("web1"))
        self.assertIsNone(self.store.by_username("web1"))
        self.assertEqual(self.store.list(), [])

    def test_put(self):
        """
        A stored record is found by container id and by username.
        """
        record = credential("web1", "alice")
        self.store.put(record)
        self.assertEqual(self.store.get("web1"), record)
        self.assertEqual(self.store.by_username("alice"), record)
        self.assertIsNone(self.store.by_username("web1"))

    def test_replace(self):
        """
        Putting a record again replaces it.
        """
        self.store.put(credential("web1"))
        newer = credential("web1", password_hash=b"$2b$04$other", at=200)
        self.store.put(newer)
        self.assertEqual(self.store.get("web1"), newer)
        self.assertEqual(self.store.list(), [newer])

    def test_renameFreesOldUsername(self):
        """
        A changed username frees the old one for other containers.
        """
        self.store.put(credential("web1", "alice"))
        self.store.put(credential("web1", "bob"))
        self.assertIsNone(self.store.by_username("alice"))
        self.assertEqual(self.store.by_username("bob").container_id, "web1")
        self.store.put(credential("web2", "alice"))
        self.assertEqual(self.store.by_username("alice").container_id, "web2")

    def test_usernameTaken(self):
        """
        A username of another container is refused, saying whose it is, and
        nothing is written.
        """
        self.store.put(credential("web1", "alice"))
        self.store.put(credential("web2", "bob"))
        error = self.assertRaises(
            UsernameTaken, self.store.put, credential("web2", "alice", at=300)
        )
        self.assertEqual((error.username, error.container_id), ("alice", "web1"))
        self.assertEqual(self.store.get("web2"), credential("web2", "bob"))
        self.assertEqual(self.store.by_username("bob").container_id, "web2")
        self.assertEqual(self.store.by_username("alice").container_id, "web1")

    def test_usernameTakenNewContainer(self):
        """
        A new container cannot take a username in use.
        """
        self.store.put(credential("web1"))
        self.assertRaises(UsernameTaken, self.store.put, credential("web2", "web1"))
        self.assertIsNone(self.store.get("web2"))

    def test_delete(self):
        """
        Deleting returns the record and frees its username.
        """
        record = credential("web1", "alice")
        self.store.put(record)
        self.assertEqual(self.store.delete("web1"), record)
        self.assertIsNone(self.store.get("web1"))
        self.assertIsNone(self.store.by_username("alice"))
        self.store.put(credential("web2", "alice"))

    def test_deleteMissing(self):
        """
        Deleting what is not there returns None and changes nothing.
        """
        self.store.put(credential("web1"))
        self.assertIsNone(self.store.delete("web2"))
        self.assertEqual(self.store.list(), [credential("web1")])

    def test_listSorted(self):
        """
        Records are listed sorted by container id.
        """
        for container_id in ("b", "C", "a.1", "a", "_z", "0"):
            self.store.put(credential(container_id))
        self.assertEqual(
            [record.container_id for record in self.store.list()],
            ["0", "C", "_z", "a", "a.1", "b"],
        )


def authorized(n):
    return AuthorizedKey(f"SHA256:key{n}", "ssh-ed25519", f"key {n}", 100 + n, b"blob%d" % n)


class KeysAndTOTPTestsMixin:
    """
    Keys and TOTP records of L{ICredentialStore}, for both stores.
    """

    def test_keys(self):
        self.assertEqual(self.store.keys("a"), [])
        with self.assertRaises(NoCredential):
            self.store.add_key("a", authorized(1), 10)
        self.store.put(credential("a"))
        self.store.add_key("a", authorized(1), 10)
        self.store.add_key("a", authorized(2), 10)
        self.assertEqual(self.store.keys("a"), [authorized(1), authorized(2)])
        with self.assertRaises(KeyExists):
            self.store.add_key("a", authorized(1), 10)
        with self.assertRaises(TooManyKeys):
            self.store.add_key("a", authorized(3), 2)
        self.assertEqual(self.store.remove_key("a", "SHA256:key1"), authorized(1))
        self.assertIsNone(self.store.remove_key("a", "SHA256:key1"))
        self.assertIsNone(self.store.remove_key("", "SHA256:key1"))
        self.assertEqual(self.store.keys("a"), [authorized(2)])
        self.assertEqual(self.store.remove_key("a", "SHA256:key2"), authorized(2))
        self.assertEqual(self.store.keys("a"), [])

    def test_reset_keeps_revoke_removes(self):
        """
        A reset (put) keeps the keys and the TOTP secret; a revoke (delete) removes both.
        """
        self.store.put(credential("a"))
        self.store.add_key("a", authorized(1), 10)
        self.store.set_totp("a", TOTPRecord(b"sealed", 5))
        self.store.put(credential("a", password_hash=b"$2b$04$other"))
        self.assertEqual(self.store.keys("a"), [authorized(1)])
        self.assertEqual(self.store.get_totp("a"), TOTPRecord(b"sealed", 5))
        self.store.delete("a")
        self.store.put(credential("a"))
        self.assertEqual(self.store.keys("a"), [])
        self.assertIsNone(self.store.get_totp("a"))

    def test_totp_steps(self):
        with self.assertRaises(NoCredential):
            self.store.set_totp("a", TOTPRecord(b"s", 1))
        self.assertFalse(self.store.use_totp_step("a", 10))
        self.store.put(credential("a"))
        self.store.set_totp("a", TOTPRecord(b"s", 1))
        self.assertTrue(self.store.use_totp_step("a", 10))
        self.assertFalse(self.store.use_totp_step("a", 10))
        self.assertFalse(self.store.use_totp_step("a", 9))
        self.assertTrue(self.store.use_totp_step("a", 11))
        self.assertEqual(self.store.get_totp("a").last_step, 11)
        self.assertTrue(self.store.delete_totp("a"))
        self.assertFalse(self.store.delete_totp("a"))
        self.assertIsNone(self.store.get_totp("a"))


class MemoryCredentialStoreTests(CredentialStoreTestsMixin, KeysAndTOTPTestsMixin, TestCase):
    def makeStore(self):
        return MemoryCredentialStore()

    def test_closed(self):
        """
        The fake records that it was closed.
        """
        self.assertFalse(self.store.closed)
        self.store.close()
        self.assertTrue(self.store.closed)


def runChild(source, *args):
    """
    Run C{source} in a new Python process with C{args} and return its
    standard output.
    """
    environment = dict(os.environ, PYTHONPATH=REPOSITORY)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source), *args],
        env=environment,
        capture_output=True,
        check=True,
        text=True,
    ).stdout


class LMDBCredentialStoreTests(CredentialStoreTestsMixin, KeysAndTOTPTestsMixin, TestCase):
    def makeStore(self):
        self.path = os.path.join(os.path.abspath(self.mktemp()), "sftp_credentials")
        return LMDBCredentialStore(self.path)

    def test_created(self):
        """
        The environment's folder is created, parents included, readable by
        its owner only.
        """
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o700)
        self.assertEqual(
            sorted(os.listdir(self.path)), ["data.mdb", "lock.mdb"]
        )

    def test_persists(self):
        """
        Records survive closing and reopening.
        """
        record = credential("web1", "alice")
        self.store.put(record)
        self.store.close()
        self.store = LMDBCredentialStore(self.path)
        self.addCleanup(self.store.close)
        self.assertEqual(self.store.get("web1"), record)
        self.assertEqual(self.store.by_username("alice"), record)

    def test_onlyHashStored(self):
        """
        The record on disk is the hash as given, as text.
        """
        self.store.put(credential("web1", password_hash=b"$2b$04$abcdefghij"))
        with open(os.path.join(self.path, "data.mdb"), "rb") as f:
            self.assertIn(b'"password_hash": "$2b$04$abcdefghij"', f.read())

    def test_cannotOpen(self):
        """
        A store that cannot be opened raises L{StoreError} naming its path.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w"):
            pass
        error = self.assertRaises(StoreError, LMDBCredentialStore, path)
        self.assertIn(f"cannot open the credential store {path}: ", str(error))

    def test_otherProcessWrites(self):
        """
        While this process has the environment open, a write committed by
        another process is seen here, and the other process sees ours.
        """
        self.store.put(credential("web1", "alice"))
        runChild(
            """
            import sys
            from lightd_conch.store import Credential, LMDBCredentialStore
            store = LMDBCredentialStore(sys.argv[1])
            store.put(Credential("web2", "bob", b"$2b$04$child", 7, 8))
            store.delete("web1")
            store.close()
            """,
            self.path,
        )
        self.assertEqual(
            self.store.get("web2"), Credential("web2", "bob", b"$2b$04$child", 7, 8)
        )
        self.assertIsNone(self.store.by_username("alice"))

        self.store.put(credential("web3", "carol"))
        seen = runChild(
            """
            import json, sys
            from lightd_conch.store import LMDBCredentialStore
            store = LMDBCredentialStore(sys.argv[1])
            print(json.dumps([c.username for c in store.list()]))
            store.close()
            """,
            self.path,
        )
        self.assertEqual(json.loads(seen), ["bob", "carol"])
