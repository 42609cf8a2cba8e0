"""
Users' public keys: which authorized_keys lines a container may hold, their
fingerprints, and the check of a signature made with one.

L{parseAuthorizedKey} reads one authorized_keys line into an
L{AuthorizedKey}, or refuses it with a L{KeyRefused} that says why.
L{verifySignature} checks a user-auth signature as OpenSSH's sshd does,
security keys (PROTOCOL.u2f) included: the signed data is
C{sha256(application) || flags || counter || sha256(message)} and the
authenticator must have seen the user (the user-presence flag).

Plain code, no reactor; the checker in L{lightd_conch.cred} calls it from a
thread.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

MAX_KEYS = 100
"""The most keys one container may hold."""
MIN_RSA_BITS = 2048
MAX_COMMENT = 256

SK_ED25519 = b"sk-ssh-ed25519@openssh.com"
SK_ECDSA = b"sk-ecdsa-sha2-nistp256@openssh.com"
# The user-presence flag of a security key's signature (PROTOCOL.u2f).
SK_USER_PRESENT = 0x01

# Key type -> the signature algorithms accepted with it.  RSA keys sign with
# SHA-2 only (RFC 8332): never the SHA-1 "ssh-rsa" signature.
SIGNATURE_ALGORITHMS = {
    b"ssh-ed25519": (b"ssh-ed25519",),
    SK_ED25519: (SK_ED25519,),
    b"ecdsa-sha2-nistp256": (b"ecdsa-sha2-nistp256",),
    b"ecdsa-sha2-nistp384": (b"ecdsa-sha2-nistp384",),
    b"ecdsa-sha2-nistp521": (b"ecdsa-sha2-nistp521",),
    SK_ECDSA: (SK_ECDSA,),
    b"ssh-rsa": (b"rsa-sha2-512", b"rsa-sha2-256"),
}

# What server-sig-algs announces (RFC 8308 3.1): exactly the signature
# algorithms a user key may sign with here, in OpenSSH's order.
SERVER_SIG_ALGS = [
    algorithm for algorithms in SIGNATURE_ALGORITHMS.values() for algorithm in algorithms
]

_ACCEPTED = ", ".join(t.decode() for t in SIGNATURE_ALGORITHMS)


class KeyRefused(ValueError):
    """
    An authorized_keys line that is not accepted.  C{str()} says why, for
    the user; it never repeats the whole line.
    """


@dataclass(frozen=True)
class AuthorizedKey:
    """
    One of a container's public keys.

    @ivar blob: the key in SSH wire format (what a client sends).
    @ivar type: its type name, C{ssh-ed25519}, C{ssh-rsa}...
    @ivar added_at: unix seconds.
    """

    fingerprint: str
    type: str
    comment: str
    added_at: int
    blob: bytes

    def toJSON(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "type": self.type,
            "comment": self.comment,
            "added_at": self.added_at,
        }

    def encode(self) -> dict:
        """
        The record the store keeps.
        """
        return {**self.toJSON(), "blob": base64.b64encode(self.blob).decode("ascii")}

    @classmethod
    def decode(cls, record: dict) -> "AuthorizedKey":
        return cls(
            fingerprint=record["fingerprint"],
            type=record["type"],
            comment=record["comment"],
            added_at=record["added_at"],
            blob=base64.b64decode(record["blob"]),
        )


def fingerprint(blob: bytes) -> str:
    """
    The fingerprint C{ssh-keygen -lf} prints: C{SHA256:} and the unpadded
    base64 of the key blob's SHA-256.
    """
    digest = base64.b64encode(hashlib.sha256(blob).digest()).rstrip(b"=")
    return "SHA256:" + digest.decode("ascii")


def normalizeFingerprint(text: str) -> str:
    """
    C{text} as L{fingerprint} writes it: a missing C{SHA256:} prefix is
    added and the URL-safe base64 letters (C{-}, C{_}) become C{+} and C{/},
    so that a fingerprint fits in a URL path without escaping.
    """
    if text.startswith("SHA256:"):
        text = text[len("SHA256:"):]
    return "SHA256:" + text.replace("-", "+").replace("_", "/").rstrip("=")


def _strings(data: bytes, count: int) -> "tuple[list[bytes], bytes]":
    values = []
    for _ in range(count):
        if len(data) < 4:
            raise ValueError("truncated")
        (length,) = struct.unpack(">L", data[:4])
        if len(data) < 4 + length:
            raise ValueError("truncated")
        values.append(data[4 : 4 + length])
        data = data[4 + length :]
    return values, data


def parseAuthorizedKey(line: str, addedAt: int) -> AuthorizedKey:
    """
    The key in one authorized_keys line, C{TYPE BASE64 [COMMENT]}.

    @raise KeyRefused: the line is empty, holds more than one line, has
        options (C{command=}, C{from=}...), a type not accepted, a body that
        is not a valid key of its type, or an RSA key under 2048 bits.
    """
    if not isinstance(line, str):
        raise KeyRefused("public_key must be a string: one authorized_keys line")
    text = line.strip()
    if "\n" in text or "\r" in text:
        raise KeyRefused("public_key must be one authorized_keys line, not several")
    if not text or text.startswith("#"):
        raise KeyRefused("public_key is empty: give one authorized_keys line")
    parts = text.split(None, 2)
    keyType = parts[0]
    if keyType.encode("utf-8", "replace") not in SIGNATURE_ALGORITHMS:
        if "=" in keyType or "," in keyType or len(parts) > 2 and _looksLikeType(parts[1]):
            raise KeyRefused(
                "authorized_keys options (command=, from=, ...) are not accepted:"
                " give the key alone, TYPE BASE64 [COMMENT]"
            )
        shown = keyType if len(keyType) <= 40 else keyType[:37] + "..."
        raise KeyRefused(f"key type {shown!r} is not accepted; accepted: {_ACCEPTED}")
    if len(parts) < 2:
        raise KeyRefused(f"malformed {keyType} key: the base64 key body is missing")
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise KeyRefused(f"malformed {keyType} key: the key body is not base64") from None
    comment = parts[2].strip() if len(parts) > 2 else ""
    if len(comment) > MAX_COMMENT or not comment.isprintable():
        raise KeyRefused(f"the comment must be at most {MAX_COMMENT} printable characters")
    checkBlob(blob, keyType.encode("ascii"))
    return AuthorizedKey(
        fingerprint=fingerprint(blob),
        type=keyType,
        comment=comment,
        added_at=addedAt,
        blob=blob,
    )


def _looksLikeType(word: str) -> bool:
    return word.encode("utf-8", "replace") in SIGNATURE_ALGORITHMS


def checkBlob(blob: bytes, keyType: "bytes | None" = None) -> bytes:
    """
    Return the type of the key C{blob} if it is an accepted key: a type of
    L{SIGNATURE_ALGORITHMS}, well formed, nothing after it, and RSA of at
    least L{MIN_RSA_BITS} bits.

    @param keyType: the type the blob must have (the line's first word).
    @raise KeyRefused: otherwise.
    """
    try:
        (inner,), _ = _strings(blob, 1)
    except ValueError:
        raise KeyRefused("malformed key: the key body is truncated") from None
    name = (keyType or inner).decode("ascii", "replace")
    if inner not in SIGNATURE_ALGORITHMS:
        raise KeyRefused(f"key type {inner[:40]!r} is not accepted; accepted: {_ACCEPTED}")
    if keyType is not None and inner != keyType:
        raise KeyRefused(
            f"malformed {name} key: its body is a {inner.decode('ascii', 'replace')} key"
        )
    try:
        key = _publicKey(blob, inner)
    except (ValueError, struct.error, IndexError):
        raise KeyRefused(f"malformed {name} key: the key body is not a valid key") from None
    if inner == b"ssh-rsa" and key.key_size < MIN_RSA_BITS:
        raise KeyRefused(
            f"RSA key of {key.key_size} bits is too weak: use at least {MIN_RSA_BITS} bits"
            " (or an ed25519 key)"
        )
    return inner


_CURVES = {
    b"nistp256": ec.SECP256R1(),
    b"nistp384": ec.SECP384R1(),
    b"nistp521": ec.SECP521R1(),
}
_CURVE_HASHES = {
    b"nistp256": hashes.SHA256,
    b"nistp384": hashes.SHA384,
    b"nistp521": hashes.SHA512,
}
_RSA_HASHES = {b"rsa-sha2-256": hashes.SHA256, b"rsa-sha2-512": hashes.SHA512}


def _publicKey(blob: bytes, keyType: bytes):
    """
    The cryptography public key of C{blob}, whose type is C{keyType}; the
    blob must hold exactly its fields (RFC 4253 6.6, RFC 5656 3.1, RFC 8709,
    PROTOCOL.u2f).
    """
    if keyType in (b"ssh-ed25519", SK_ED25519):
        count = 2 if keyType == b"ssh-ed25519" else 3
        fields, rest = _strings(blob, count)
        if rest or len(fields[1]) != 32:
            raise ValueError("bad ed25519 key")
        return Ed25519PublicKey.from_public_bytes(fields[1])
    if keyType.startswith(b"ecdsa-sha2-") or keyType == SK_ECDSA:
        count = 3 if keyType != SK_ECDSA else 4
        fields, rest = _strings(blob, count)
        curve = keyType[len(b"ecdsa-sha2-"):] if keyType != SK_ECDSA else b"nistp256"
        if rest or fields[1] != curve:
            raise ValueError("bad ecdsa key")
        return ec.EllipticCurvePublicKey.from_encoded_point(_CURVES[curve], fields[2])
    if keyType == b"ssh-rsa":
        fields, rest = _strings(blob, 3)
        if rest:
            raise ValueError("bad rsa key")
        exponent, modulus = _mpint(fields[1]), _mpint(fields[2])
        return rsa.RSAPublicNumbers(exponent, modulus).public_key()
    raise ValueError("unknown key type")


def _mpint(data: bytes) -> int:
    if data[:1] and data[0] & 0x80:
        raise ValueError("negative mpint")
    return int.from_bytes(data, "big")


def acceptsAlgorithm(blob: bytes, algorithm: bytes) -> bool:
    """
    Whether the key C{blob} is an accepted key that may sign with
    C{algorithm} (an RSA key offered for C{ssh-rsa}, SHA-1, may not).
    """
    try:
        return algorithm in SIGNATURE_ALGORITHMS[checkBlob(blob)]
    except KeyRefused:
        return False


def verifySignature(blob: bytes, algorithm: bytes, signature: bytes, data: bytes) -> bool:
    """
    Whether C{signature} is a valid signature of C{data} by the key C{blob},
    made with C{algorithm}, an algorithm accepted for that key's type.

    Never raises for bad input: anything malformed is an invalid signature.
    """
    try:
        return _verify(blob, algorithm, signature, data)
    except (ValueError, InvalidSignature, KeyRefused, struct.error, IndexError):
        return False


def _verify(blob: bytes, algorithm: bytes, signature: bytes, data: bytes) -> bool:
    keyType = checkBlob(blob)
    if algorithm not in SIGNATURE_ALGORITHMS[keyType]:
        return False
    (sigType, sig), rest = _strings(signature, 2)
    if sigType != algorithm:
        return False
    key = _publicKey(blob, keyType)
    if keyType in (SK_ED25519, SK_ECDSA):
        # string type, string signature, byte flags, uint32 counter.
        if len(rest) != 5:
            return False
        flags, counter = rest[0], rest[1:5]
        if not flags & SK_USER_PRESENT:
            # sshd refuses it unless the key has no-touch-required, an
            # option this service does not take.
            return False
        fields, _ = _strings(blob, 3 if keyType == SK_ED25519 else 4)
        application = fields[-1]
        data = (
            hashlib.sha256(application).digest()
            + bytes((flags,))
            + counter
            + hashlib.sha256(data).digest()
        )
    elif rest:
        return False
    if keyType in (b"ssh-ed25519", SK_ED25519):
        key.verify(sig, data)
        return True
    if keyType == b"ssh-rsa":
        key.verify(sig, data, padding.PKCS1v15(), _RSA_HASHES[algorithm]())
        return True
    (r, s), extra = _strings(sig, 2)
    if extra:
        return False
    curve = b"nistp256" if keyType == SK_ECDSA else keyType[len(b"ecdsa-sha2-"):]
    key.verify(
        encode_dss_signature(_mpint(r), _mpint(s)), data, ec.ECDSA(_CURVE_HASHES[curve]())
    )
    return True
