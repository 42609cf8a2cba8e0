"""
Time-based one-time codes (RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps),
the second factor a container may ask for after its password or key.

A container's secret is kept in the store sealed with AES-GCM under a key
kept beside the host key (L{SecretBox}, C{<base_path>/sftp_totp_key}, mode
0600, made on first use), so that a copy of the LMDB file alone does not
reveal it.  L{TOTPVerifier} checks a code off the reactor thread and
records its time step, so that no code is accepted twice.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
import time
import urllib.parse

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .store import TOTPRecord

DIGITS = 6
STEP = 30
DRIFT = 1
"""Steps before and after now whose codes are accepted too."""
SECRET_BYTES = 20
ISSUER = "lightd-sftp"
_KEY_BYTES = 32
_NONCE_BYTES = 12


class SecretBox:
    """
    Seals and opens TOTP secrets with the AES-256-GCM key in the file
    C{path}.  The file is created (mode 0600, atomically) the first time a
    secret is sealed; opening needs it to exist.  A sealed secret is bound
    to its container id, so that it cannot be moved to another container.
    """

    def __init__(self, path: str) -> None:
        self._path = path
        self._key = None

    def _load(self, create: bool) -> "bytes | None":
        if self._key is not None:
            return self._key
        try:
            with open(self._path, "rb") as f:
                key = f.read()
        except FileNotFoundError:
            if not create:
                return None
            key = self._create()
        if len(key) != _KEY_BYTES:
            raise OSError(f"{self._path} is not a TOTP key file ({len(key)} bytes)")
        self._key = key
        return key

    def _create(self) -> bytes:
        key = secrets.token_bytes(_KEY_BYTES)
        temporary = f"{self._path}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, key)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            # Another process may have made one at the same time: keep theirs.
            os.link(temporary, self._path)
        except FileExistsError:
            with open(self._path, "rb") as f:
                key = f.read()
        finally:
            os.unlink(temporary)
        return key

    def seal(self, containerId: str, secret: bytes) -> bytes:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        box = AESGCM(self._load(create=True))
        return nonce + box.encrypt(nonce, secret, containerId.encode("utf-8"))

    def open(self, containerId: str, sealed: bytes) -> "bytes | None":
        """
        The secret C{sealed} holds, or None if it cannot be opened (no key
        file, another key, another container).
        """
        key = self._load(create=False)
        if key is None:
            return None
        try:
            return AESGCM(key).decrypt(
                sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], containerId.encode("utf-8")
            )
        except (InvalidTag, ValueError):
            return None


def code(secret: bytes, step: int) -> str:
    """
    The RFC 6238 code of C{secret} for time step C{step} (RFC 4226's HOTP).
    """
    digest = hmac.new(secret, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    (value,) = struct.unpack(">L", digest[offset : offset + 4])
    return str((value & 0x7FFFFFFF) % 10**DIGITS).zfill(DIGITS)


def matchingStep(secret: bytes, given: bytes, now: float) -> "int | None":
    """
    The time step, within L{DRIFT} of C{now}'s, whose code is C{given}, or
    None.  Every step is compared, in constant time.
    """
    text = given.strip()
    current = int(now // STEP)
    found = None
    for step in range(current - DRIFT, current + DRIFT + 1):
        if hmac.compare_digest(code(secret, step).encode("ascii"), text):
            found = step if found is None else found
    return found


def newSecret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def otpauthURI(secret: bytes, username: str) -> str:
    """
    The C{otpauth://totp/...} URI an authenticator app reads (as a QR
    code or pasted).
    """
    label = urllib.parse.quote(f"{ISSUER}:{username}", safe=":@")
    query = urllib.parse.urlencode(
        {
            "secret": base32(secret),
            "issuer": ISSUER,
            "algorithm": "SHA1",
            "digits": DIGITS,
            "period": STEP,
        }
    )
    return f"otpauth://totp/{label}?{query}"


def base32(secret: bytes) -> str:
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def enable(store, box: SecretBox, containerId: str, username: str, now: int) -> dict:
    """
    Give C{containerId} a new secret (TOTP on, or a new secret if it was);
    return what the user's app needs, shown this once.

    @raise lightd_conch.store.NoCredential: the container has no login.
    """
    secret = newSecret()
    store.set_totp(containerId, TOTPRecord(box.seal(containerId, secret), now))
    return {"secret": base32(secret), "otpauth_uri": otpauthURI(secret, username)}


class TOTPVerifier:
    """
    Checks the code a login gives for its container, in its turn in the
    L{lightd_conch.checkqueue.FairCheckQueue} C{checks}.

    @param clock: returns unix seconds (the codes' time).
    """

    def __init__(self, store, box: SecretBox, checks, clock=time.time) -> None:
        self._store = store
        self._box = box
        self._checks = checks
        self._clock = clock

    def check(self, containerId: str, given: bytes, source=None, connection=None):
        """
        A Deferred of whether C{given} is a code of C{containerId} not
        accepted before, checked in its turn among those of C{source} (the
        client's address) and at most one waiting for C{connection}.
        """
        return self._checks.submit(source, connection, self.checkNow, containerId, given)

    def checkNow(self, containerId: str, given: bytes) -> bool:
        record = self._store.get_totp(containerId)
        if record is None:
            return False
        secret = self._box.open(containerId, record.sealed)
        if secret is None:
            return False
        step = matchingStep(secret, given, self._clock())
        # The store refuses a step at or before the last one used: a code
        # seen once (or an older one) is refused from then on.
        return step is not None and self._store.use_totp_step(containerId, step)
