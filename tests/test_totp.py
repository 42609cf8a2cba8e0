"""
Tests for L{lightd_conch.totp}: RFC 6238's codes, the drift allowed, the sealed secret and the
verifier that accepts each code once.
"""

import os
import stat

from twisted.trial.unittest import TestCase

from lightd_conch.store import Credential
from lightd_conch.testing import MemoryCredentialStore
from lightd_conch.checkqueue import FairCheckQueue
from lightd_conch.totp import SecretBox, TOTPVerifier, code, enable, matchingStep, otpauthURI

from .test_ssh import _Pool, _Reactor

RFC_SECRET = b"12345678901234567890"


class CodeTests(TestCase):
    def test_rfc6238_vectors(self):
        """
        RFC 6238 appendix B (SHA-1), the last six of its eight digits.
        """
        for seconds, expected in (
            (59, "94287082"),
            (1111111109, "07081804"),
            (1111111111, "14050471"),
            (1234567890, "89005924"),
            (2000000000, "69279037"),
        ):
            self.assertEqual(code(RFC_SECRET, seconds // 30), expected[-6:])

    def test_drift(self):
        now = 1111111111
        step = now // 30
        for offset in (-1, 0, 1):
            given = code(RFC_SECRET, step + offset).encode()
            self.assertEqual(matchingStep(RFC_SECRET, given, now), step + offset)
        for offset in (-2, 2):
            given = code(RFC_SECRET, step + offset).encode()
            self.assertIsNone(matchingStep(RFC_SECRET, given, now))
        self.assertIsNone(matchingStep(RFC_SECRET, b"", now))
        self.assertIsNone(matchingStep(RFC_SECRET, b"abcdef", now))

    def test_uri(self):
        uri = otpauthURI(RFC_SECRET, "demo")
        self.assertTrue(
            uri.startswith("otpauth://totp/lightd-sftp:demo?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ&")
        )
        for part in ("issuer=lightd-sftp", "algorithm=SHA1", "digits=6", "period=30"):
            self.assertIn(part, uri)


class SecretBoxTests(TestCase):
    def setUp(self):
        self.path = os.path.join(self.mktemp(), "sftp_totp_key")
        os.makedirs(os.path.dirname(self.path))

    def test_sealed_and_bound_to_container(self):
        box = SecretBox(self.path)
        self.assertIsNone(box.open("c1", b"x" * 40))
        sealed = box.seal("c1", b"secret bytes")
        self.assertNotIn(b"secret bytes", sealed)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        # Another process (the daemon) reads the same key file.
        self.assertEqual(SecretBox(self.path).open("c1", sealed), b"secret bytes")
        self.assertIsNone(SecretBox(self.path).open("c2", sealed))
        self.assertIsNone(box.open("c1", sealed[:-1] + bytes([sealed[-1] ^ 1])))

    def test_other_key(self):
        sealed = SecretBox(self.path).seal("c1", b"s")
        os.unlink(self.path)
        self.assertIsNone(SecretBox(self.path).open("c1", sealed))


class VerifierTests(TestCase):
    def setUp(self):
        self.store = MemoryCredentialStore()
        self.store.put(Credential("c1", "alice", b"$2b$04$x", 1, 1))
        path = os.path.join(self.mktemp(), "key")
        os.makedirs(os.path.dirname(path))
        self.box = SecretBox(path)
        self.now = 1_700_000_000.0
        self.verifier = TOTPVerifier(
            self.store, self.box, FairCheckQueue(_Reactor(), _Pool(), 1), lambda: self.now
        )

    def secret(self):
        record = self.store.get_totp("c1")
        return self.box.open("c1", record.sealed)

    def test_each_code_once(self):
        shown = enable(self.store, self.box, "c1", "alice", 1)
        self.assertIn("secret", shown)
        secret = self.secret()
        step = int(self.now // 30)
        given = code(secret, step).encode()
        self.assertTrue(self.successResultOf(self.verifier.check("c1", given)))
        self.assertFalse(self.successResultOf(self.verifier.check("c1", given)))
        # An older step's code, even within the drift, is refused after a newer one was used.
        self.assertFalse(self.verifier.checkNow("c1", code(secret, step - 1).encode()))
        self.assertTrue(self.verifier.checkNow("c1", code(secret, step + 1).encode()))
        wrong = str((int(code(secret, step)) + 1) % 10**6).zfill(6).encode()
        self.assertFalse(self.verifier.checkNow("c1", wrong))

    def test_off_or_other_container(self):
        self.assertFalse(self.verifier.checkNow("c1", b"123456"))
        enable(self.store, self.box, "c1", "alice", 1)
        self.store.delete_totp("c1")
        self.assertFalse(self.verifier.checkNow("c1", b"123456"))
