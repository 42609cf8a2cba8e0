"""
The credential rules, shared by the CLI and the admin API: what a valid
container id, username and password are, and how credentials are generated,
shown, listed and revoked; and a login's public keys and TOTP secret.

Plain blocking code over an L{ICredentialStore}; no reactor.  Refusals are
L{AccountError}s whose messages a user may see, so they name no host path.
"""

import json
import os
import re
import secrets
import string
import time

import bcrypt

from lightd_conch import totp
from lightd_conch.policy import PolicyError
from lightd_conch.store import (
    Credential,
    KeyExists,
    NoCredential,
    TooManyKeys,
    UsernameTaken,
)
from lightd_conch.userkeys import MAX_KEYS, KeyRefused, normalizeFingerprint, parseAuthorizedKey

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
_PASSWORD_ALPHABET = string.ascii_letters + string.digits
_GENERATED_PASSWORD_LENGTH = 24
# bcrypt uses at most 72 bytes; a longer password would be silently cut.
_PASSWORD_BYTES = (8, 72)


class AccountError(Exception):
    """
    A refused request.  C{str()} is the message for the user.

    @ivar kind: why, for the caller to map to a status: C{"invalid"},
        C{"not_found"} or C{"conflict"}.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _quote(value: object) -> str:
    # JSON quoting keeps control characters from breaking the one-line message.
    text = json.dumps(value, default=repr)
    return text if len(text) <= 72 else text[:69] + "..."


def validate_name(what: str, value: object) -> str:
    """
    Return C{value} if it is a valid container id or username: 1 to 64 of
    C{A-Za-z0-9._-}, not starting with C{.} or C{-}.

    @param what: C{"container id"} or C{"username"}, for the message.
    @raise AccountError: C{invalid}, otherwise.
    """
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise AccountError(
            "invalid",
            f"invalid {what} {_quote(value)}: use 1 to 64 of A-Z a-z 0-9 . _ -,"
            " not starting with . or -",
        )
    return value


def validate_password(password: object) -> str:
    """
    Return C{password} if it is 8 to 72 bytes of UTF-8 without NUL.

    @raise AccountError: C{invalid}, otherwise; the message never shows it.
    """
    if not isinstance(password, str):
        raise AccountError("invalid", "password must be a string")
    try:
        size = len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise AccountError("invalid", "password must be valid UTF-8") from None
    if "\0" in password:
        raise AccountError("invalid", "password must not contain NUL characters")
    low, high = _PASSWORD_BYTES
    if not low <= size <= high:
        raise AccountError(
            "invalid", f"password must be {low} to {high} bytes, got {size}"
        )
    return password


def generate_password() -> str:
    """
    A new password: 24 letters and digits from a cryptographically secure
    source (about 143 bits).
    """
    return "".join(
        secrets.choice(_PASSWORD_ALPHABET) for _ in range(_GENERATED_PASSWORD_LENGTH)
    )


def hash_password(password: str, cost: int) -> bytes:
    """
    The bcrypt hash of C{password} at C{cost}.
    """
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(cost))


def _taken(username: str) -> AccountError:
    return AccountError(
        "conflict", f"username {_quote(username)} belongs to another container"
    )


def _not_found() -> AccountError:
    return AccountError("not_found", "SFTP credentials not found for this container")


class Accounts:
    """
    Credential operations for one configuration and store.  Every method
    validates the container id before touching anything.

    @param clock: returns the time in unix seconds.
    @param totpBox: the L{totp.SecretBox} that seals TOTP secrets; by
        default the one at C{config.totp_key_path}.
    """

    def __init__(self, config, store, clock=time.time, totpBox=None) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._totpBox = totp.SecretBox(config.totp_key_path) if totpBox is None else totpBox

    def generate(
        self,
        container_id: str,
        username: "str | None" = None,
        password: "str | None" = None,
        create_volume: bool = False,
    ) -> dict:
        """
        Create or reset the credentials of C{container_id}; the only time
        the password is returned.

        Without C{username}, a new record gets the container id and a reset
        keeps the current username.  Without C{password}, one is generated.
        The container's volume must exist, or with C{create_volume} is
        created once everything else has been validated.

        @return: C{username}, C{password}, C{host}, C{port}, C{volume_path}.
        @raise AccountError: C{invalid}, C{not_found} (no volume) or
            C{conflict} (the username belongs to another container).
        """
        validate_name("container id", container_id)
        existing = self._store.get(container_id)
        if username is None:
            username = container_id if existing is None else existing.username
        validate_name("username", username)
        if password is None:
            password = generate_password()
        else:
            validate_password(password)
        # Checked here to refuse before creating a volume or hashing;
        # put() checks again, atomically.
        owner = self._store.by_username(username)
        if owner is not None and owner.container_id != container_id:
            raise _taken(username)

        volume = self._config.volume_path(container_id)
        if create_volume:
            os.makedirs(volume, mode=0o755, exist_ok=True)
        elif not os.path.isdir(volume):
            raise AccountError("not_found", "container volume does not exist")

        now = int(self._clock())
        credential = Credential(
            container_id=container_id,
            username=username,
            password_hash=hash_password(password, self._config.sftp.bcrypt_cost),
            created_at=now if existing is None else existing.created_at,
            updated_at=now,
        )
        try:
            self._store.put(credential)
        except UsernameTaken:
            raise _taken(username) from None
        return {"username": username, "password": password, **self._address()}

    def info(self, container_id: str) -> dict:
        """
        @return: C{username}, C{host}, C{port}, C{volume_path},
            C{created_at}, C{updated_at}.
        @raise AccountError: C{invalid} or C{not_found}.
        """
        validate_name("container id", container_id)
        credential = self._store.get(container_id)
        if credential is None:
            raise _not_found()
        return self._info(credential)

    def revoke(self, container_id: str) -> None:
        """
        Remove the credentials of C{container_id}.

        @raise AccountError: C{invalid} or C{not_found}.
        """
        validate_name("container id", container_id)
        if self._store.delete(container_id) is None:
            raise _not_found()

    def list(self) -> "list[dict]":
        """
        The L{info} of every container that has credentials, with its
        C{container_id}, sorted by container id.
        """
        return [
            {"container_id": credential.container_id, **self._info(credential)}
            for credential in self._store.list()
        ]

    def policy(self, container_id: str) -> dict:
        """
        The policy of C{container_id}, as JSON: it needs the container's
        volume, not credentials.

        @raise AccountError: C{invalid}, or C{not_found} (no volume).
        """
        self._checkVolume(container_id)
        return self._store.get_policy(container_id).toJSON()

    def set_policy(self, container_id: str, changes: object) -> dict:
        """
        Change the keys in C{changes} of the policy of C{container_id};
        return the whole new policy, as JSON.

        @raise AccountError: C{invalid} (a bad id, an unknown key, a wrong
            value: the message names the key), or C{not_found} (no volume).
        """
        self._checkVolume(container_id)
        try:
            return self._store.update_policy(container_id, changes).toJSON()
        except PolicyError as e:
            raise AccountError("invalid", str(e)) from None

    def add_key(self, container_id: str, line: object) -> dict:
        """
        Add the public key in the authorized_keys line C{line} to the login
        of C{container_id}.

        @return: its C{fingerprint}, C{type}, C{comment}, C{added_at}.
        @raise AccountError: C{invalid} (the line is refused, the key is
            there already, or the container holds L{MAX_KEYS} keys: the
            message says which) or C{not_found} (no credentials).
        """
        validate_name("container id", container_id)
        try:
            key = parseAuthorizedKey(line, int(self._clock()))
        except KeyRefused as e:
            raise AccountError("invalid", str(e)) from None
        try:
            self._store.add_key(container_id, key, MAX_KEYS)
        except NoCredential:
            raise _not_found() from None
        except KeyExists:
            raise AccountError(
                "invalid", f"the key {key.fingerprint} is already one of this container's keys"
            ) from None
        except TooManyKeys:
            raise AccountError(
                "invalid", f"the container holds {MAX_KEYS} keys, the most it may: remove one first"
            ) from None
        return key.toJSON()

    def keys(self, container_id: str) -> "list[dict]":
        """
        The public keys of C{container_id}'s login, in the order added.

        @raise AccountError: C{invalid} or C{not_found} (no credentials).
        """
        self._credential(container_id)
        return [key.toJSON() for key in self._store.keys(container_id)]

    def remove_key(self, container_id: str, fingerprint: str) -> dict:
        """
        Remove the key with C{fingerprint} (as C{ssh-keygen -lf} prints
        it; the C{SHA256:} prefix may be left out, and URL-safe base64 is
        read too).

        @raise AccountError: C{invalid}, or C{not_found} (no such key).
        """
        validate_name("container id", container_id)
        removed = self._store.remove_key(container_id, normalizeFingerprint(str(fingerprint)))
        if removed is None:
            raise AccountError("not_found", "no key with this fingerprint for this container")
        return removed.toJSON()

    def enable_totp(self, container_id: str) -> dict:
        """
        Turn TOTP on for C{container_id}'s login, or give it a new secret.

        @return: C{secret} (base32) and C{otpauth_uri}, shown this once.
        @raise AccountError: C{invalid} or C{not_found} (no credentials).
        """
        credential = self._credential(container_id)
        try:
            return totp.enable(
                self._store, self._totpBox, container_id, credential.username, int(self._clock())
            )
        except NoCredential:
            raise _not_found() from None

    def disable_totp(self, container_id: str) -> None:
        """
        Turn TOTP off for C{container_id}'s login.

        @raise AccountError: C{invalid}, or C{not_found} (it was not on).
        """
        validate_name("container id", container_id)
        if not self._store.delete_totp(container_id):
            raise AccountError("not_found", "TOTP is not enabled for this container")

    def _credential(self, container_id: str) -> Credential:
        validate_name("container id", container_id)
        credential = self._store.get(container_id)
        if credential is None:
            raise _not_found()
        return credential

    def _checkVolume(self, container_id: str) -> None:
        validate_name("container id", container_id)
        if not os.path.isdir(self._config.volume_path(container_id)):
            raise AccountError("not_found", "container volume does not exist")

    def _address(self) -> dict:
        sftp = self._config.sftp
        return {
            "host": sftp.public_host or sftp.host,
            "port": sftp.port,
            # Where the client sees the volume.
            "volume_path": "/",
        }

    def _info(self, credential: Credential) -> dict:
        return {
            "username": credential.username,
            **self._address(),
            "created_at": credential.created_at,
            "updated_at": credential.updated_at,
        }
