"""
Tests for L{lightd_conch.userkeys} (which authorized_keys lines are accepted, fingerprints,
signatures, security keys as OpenSSH checks them) and for the public-key checker in
L{lightd_conch.cred}: the same answer for an unknown user as for a foreign key.
"""

import base64
import hashlib
import struct

import bcrypt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from twisted.conch.error import ValidPublicKey
from twisted.conch.ssh import common, keys
from twisted.cred.credentials import SSHPrivateKey
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from lightd_conch.checkqueue import FairCheckQueue
from lightd_conch.cred import ContainerId, ForeignKey, PublicKeyChecker
from lightd_conch.store import Credential
from lightd_conch.testing import MemoryCredentialStore
from lightd_conch.userkeys import (
    MAX_KEYS,
    SERVER_SIG_ALGS,
    SK_ECDSA,
    SK_ED25519,
    KeyRefused,
    acceptsAlgorithm,
    fingerprint,
    normalizeFingerprint,
    parseAuthorizedKey,
    verifySignature,
)

from .test_ssh import LiveService, _Pool, _Reactor


def line_of(key: keys.Key, comment="me@host") -> str:
    return key.public().toString("openssh").decode() + " " + comment


def ed25519():
    return keys.Key(Ed25519PrivateKey.generate())


class SecurityKey:
    """
    A software stand-in for a FIDO authenticator: signs as PROTOCOL.u2f says a security key
    does, over sha256(application) || flags || counter || sha256(message).
    """

    def __init__(self, kind, application=b"ssh:"):
        self.kind = kind
        self.application = application
        if kind == SK_ED25519:
            self.private = Ed25519PrivateKey.generate()
            raw = self.private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            self.blob = common.NS(kind) + common.NS(raw) + common.NS(application)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            point = self.private.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            self.blob = (
                common.NS(kind) + common.NS(b"nistp256") + common.NS(point)
                + common.NS(application)
            )

    def sign(self, data, flags=0x01, counter=7, application=None):
        counterBytes = struct.pack(">L", counter)
        signed = (
            hashlib.sha256(self.application if application is None else application).digest()
            + bytes((flags,)) + counterBytes + hashlib.sha256(data).digest()
        )
        if self.kind == SK_ED25519:
            inner = self.private.sign(signed)
        else:
            r, s = decode_dss_signature(self.private.sign(signed, ec.ECDSA(hashes.SHA256())))
            inner = common.MP(r) + common.MP(s)
        return common.NS(self.kind) + common.NS(inner) + bytes((flags,)) + counterBytes


class ParseTests(TestCase):
    def test_accepted_types(self):
        for key in (
            ed25519(),
            keys.Key(ec.generate_private_key(ec.SECP256R1())),
            keys.Key(ec.generate_private_key(ec.SECP384R1())),
            keys.Key(ec.generate_private_key(ec.SECP521R1())),
            keys.Key(rsa.generate_private_key(65537, 2048)),
        ):
            parsed = parseAuthorizedKey(line_of(key) + "\n", 5)
            self.assertEqual(parsed.type, key.sshType().decode())
            self.assertEqual(parsed.comment, "me@host")
            self.assertEqual(parsed.added_at, 5)
            self.assertEqual(parsed.blob, key.public().blob())

    def test_security_key_types(self):
        for kind in (SK_ED25519, SK_ECDSA):
            sk = SecurityKey(kind)
            line = f"{kind.decode()} {base64.b64encode(sk.blob).decode()} yubikey"
            self.assertEqual(parseAuthorizedKey(line, 1).type, kind.decode())

    def test_fingerprint_as_ssh_keygen(self):
        """
        SHA256: and the unpadded base64 of the blob's SHA-256, as ssh-keygen -lf prints it (the
        end-to-end tests compare with ssh-keygen itself).
        """
        blob = ed25519().public().blob()
        expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        self.assertEqual(fingerprint(blob), "SHA256:" + expected)
        self.assertEqual(len(fingerprint(blob)), 7 + 43)

    def test_normalize(self):
        self.assertEqual(normalizeFingerprint("SHA256:a+b/c"), "SHA256:a+b/c")
        self.assertEqual(normalizeFingerprint("a-b_c"), "SHA256:a+b/c")

    def test_refused(self):
        good = line_of(ed25519())
        weak = line_of(keys.Key(rsa.generate_private_key(65537, 1024)))
        body = good.split()[1]
        cases = {
            "": "empty",
            "# a comment": "empty",
            weak: "1024 bits is too weak",
            'command="ls" ' + good: "options",
            "no-pty " + good: "options",
            'from="10.0.0.0/8",no-agent-forwarding ' + good: "options",
            "ssh-dss " + body: "not accepted",
            "ssh-ed25519-cert-v01@openssh.com " + body: "not accepted",
            "ssh-ed25519": "missing",
            "ssh-ed25519 %%%": "not base64",
            "ssh-rsa " + body: "its body is a ssh-ed25519 key",
            "ssh-ed25519 " + base64.b64encode(b"\0\0\0\x0bssh-ed25519\0\0\0\x01x").decode():
                "not a valid key",
            good + "\n" + good: "not several",
            "ssh-ed25519 " + body + " " + "x" * 300: "comment",
        }
        for line, why in cases.items():
            with self.subTest(line=line[:30]):
                with self.assertRaises(KeyRefused) as caught:
                    parseAuthorizedKey(line, 1)
                self.assertIn(why, str(caught.exception))
        with self.assertRaises(KeyRefused):
            parseAuthorizedKey(None, 1)

    def test_trailing_bytes_refused(self):
        blob = ed25519().public().blob() + b"\0"
        with self.assertRaises(KeyRefused):
            parseAuthorizedKey("ssh-ed25519 " + base64.b64encode(blob).decode(), 1)


class SignatureTests(TestCase):
    data = b"session id and userauth request"

    def test_plain_keys(self):
        for key, algorithm in (
            (ed25519(), b"ssh-ed25519"),
            (keys.Key(ec.generate_private_key(ec.SECP384R1())), b"ecdsa-sha2-nistp384"),
            (keys.Key(rsa.generate_private_key(65537, 2048)), b"rsa-sha2-256"),
            (keys.Key(rsa.generate_private_key(65537, 2048)), b"rsa-sha2-512"),
        ):
            with self.subTest(algorithm=algorithm):
                blob = key.public().blob()
                signature = key.sign(self.data, signatureType=algorithm)
                self.assertTrue(verifySignature(blob, algorithm, signature, self.data))
                self.assertFalse(verifySignature(blob, algorithm, signature, self.data + b"x"))
                self.assertFalse(verifySignature(blob, b"ssh-dss", signature, self.data))

    def test_rsa_sha1_refused(self):
        """
        An RSA signature with SHA-1 (``ssh-rsa``) is refused even when it is valid.
        """
        key = keys.Key(rsa.generate_private_key(65537, 2048))
        blob = key.public().blob()
        signature = key.sign(self.data, signatureType=b"ssh-rsa")
        self.assertTrue(key.public().verify(signature, self.data))
        self.assertFalse(verifySignature(blob, b"ssh-rsa", signature, self.data))
        self.assertFalse(acceptsAlgorithm(blob, b"ssh-rsa"))
        self.assertTrue(acceptsAlgorithm(blob, b"rsa-sha2-512"))

    def test_algorithm_must_match_signature(self):
        key = keys.Key(rsa.generate_private_key(65537, 2048))
        signature = key.sign(self.data, signatureType=b"rsa-sha2-256")
        blob = key.public().blob()
        self.assertFalse(verifySignature(blob, b"rsa-sha2-512", signature, self.data))

    def test_security_keys(self):
        """
        A security key's signature covers sha256(application), its flags and counter and
        sha256(data); it must say the user was present; a changed flag, counter or application
        breaks it.
        """
        for kind in (SK_ED25519, SK_ECDSA):
            with self.subTest(kind=kind):
                sk = SecurityKey(kind)
                good = sk.sign(self.data)
                self.assertTrue(verifySignature(sk.blob, kind, good, self.data))
                self.assertFalse(verifySignature(sk.blob, kind, good, self.data + b"x"))
                def valid(signature):
                    return verifySignature(sk.blob, kind, signature, self.data)

                # Signed without the user present (flags 0): refused, as sshd refuses it.
                self.assertFalse(valid(sk.sign(self.data, flags=0)))
                # User verified but not present is still not present.
                self.assertFalse(valid(sk.sign(self.data, flags=4)))
                self.assertTrue(valid(sk.sign(self.data, flags=5)))
                # Flags or counter changed on the wire after signing.
                self.assertFalse(valid(good[:-5] + b"\x05" + good[-4:]))
                self.assertFalse(valid(good[:-1] + b"\x08"))
                # Signed for another application.
                other = sk.sign(self.data, application=b"ssh:other")
                self.assertFalse(verifySignature(sk.blob, kind, other, self.data))
                # Truncated or extended signatures.
                self.assertFalse(verifySignature(sk.blob, kind, good[:-1], self.data))
                self.assertFalse(verifySignature(sk.blob, kind, good + b"\0", self.data))

    def test_garbage_never_raises(self):
        key = ed25519()
        for blob, signature in (
            (b"", b""), (b"\xff\xff\xff\xff", b"x"), (key.public().blob(), b"\0\0\0\x05ab"),
        ):
            self.assertFalse(verifySignature(blob, b"ssh-ed25519", signature, b"d"))

    def test_server_sig_algs(self):
        """
        What server-sig-algs announces: exactly the accepted signature algorithms, never ssh-rsa.
        """
        self.assertEqual(
            set(SERVER_SIG_ALGS),
            {b"ssh-ed25519", b"sk-ssh-ed25519@openssh.com", b"ecdsa-sha2-nistp256",
             b"ecdsa-sha2-nistp384", b"ecdsa-sha2-nistp521",
             b"sk-ecdsa-sha2-nistp256@openssh.com", b"rsa-sha2-512", b"rsa-sha2-256"},
        )


class PublicKeyCheckerTests(TestCase):
    def setUp(self):
        self.store = MemoryCredentialStore()
        self.store.put(Credential("c1", "alice", bcrypt.hashpw(b"pw", bcrypt.gensalt(4)), 1, 1))
        self.store.put(Credential("c2", "bob", bcrypt.hashpw(b"pw", bcrypt.gensalt(4)), 1, 1))
        self.key = ed25519()
        self.other = ed25519()
        self.store.add_key("c1", parseAuthorizedKey(line_of(self.key), 1), MAX_KEYS)
        self.store.add_key("c2", parseAuthorizedKey(line_of(self.other), 1), MAX_KEYS)
        self.checker = PublicKeyChecker(self.store, FairCheckQueue(_Reactor(), _Pool(), 1))

    def check(self, username, key, data=None, signature=None, algorithm=b"ssh-ed25519"):
        return self.checker.requestAvatarId(
            SSHPrivateKey(username, algorithm, key.public().blob(), data, signature)
        )

    def test_query(self):
        """
        A key offered without a signature: PK_OK (ValidPublicKey) only for the container's own
        key; another container's key, a stranger's key and any key of an unknown user all get
        the same failure.
        """
        self.failureResultOf(self.check(b"alice", self.key), ValidPublicKey)
        for username, key in (
            (b"alice", self.other), (b"alice", ed25519()), (b"nobody", self.key),
            (b"nobody", ed25519()), (b"\xff", self.key),
        ):
            failure = self.failureResultOf(self.check(username, key), ForeignKey)
            self.assertIs(type(failure.value), ForeignKey)

    def test_signed(self):
        data = b"signed request"
        avatarId = self.successResultOf(self.check(b"alice", self.key, data, self.key.sign(data)))
        self.assertIsInstance(avatarId, ContainerId)
        self.assertEqual(avatarId, "c1")
        self.assertEqual(avatarId.fingerprint, fingerprint(self.key.public().blob()))
        self.assertFalse(avatarId.needsCode)
        for username, key, signature in (
            (b"alice", self.key, self.key.sign(b"other data")),
            (b"alice", self.other, self.other.sign(data)),
            (b"nobody", self.key, self.key.sign(data)),
        ):
            self.failureResultOf(self.check(username, key, data, signature), ForeignKey)

    def test_removed_key(self):
        self.store.remove_key("c1", fingerprint(self.key.public().blob()))
        self.failureResultOf(self.check(b"alice", self.key), ForeignKey)


class ServerSigAlgsTests(LiveService, TestCase):
    """
    The EXT_INFO a client gets lists in server-sig-algs exactly what is accepted.
    """

    def test_ext_info(self):
        def login():
            transport = self.client()
            try:
                transport.auth_password("alice", "secret-pass")
                return transport.server_extensions.get("server-sig-algs")
            finally:
                transport.close()

        def check(algorithms):
            self.assertEqual(algorithms, b",".join(SERVER_SIG_ALGS))

        return deferToThread(login).addCallback(check)
