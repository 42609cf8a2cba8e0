"""
The credential store: one record per container and a username index, and
each container's policy (L{lightd_conch.policy.Policy}), kept apart from its
credentials so that a reset or a revoke leaves it as it is; and the second
ways in of a container's login, its public keys
(L{lightd_conch.userkeys.AuthorizedKey}) and its TOTP secret (encrypted, see
L{lightd_conch.totp}), which a reset keeps and a revoke removes with the
record.

L{ICredentialStore} is what the rest of the service uses;
L{LMDBCredentialStore} keeps it in an LMDB environment, and this is the only
module that imports lmdb.  L{lightd_conch.testing.MemoryCredentialStore} is
the in-memory fake with the same behaviour.

The records hold bcrypt hashes only, never a password.
"""

import json
import os
from dataclasses import dataclass, replace

import lmdb
from zope.interface import Interface, implementer

from .policy import Policy
from .userkeys import AuthorizedKey


@dataclass(frozen=True)
class Credential:
    """
    A container's SFTP login.  Times are unix seconds.
    """

    container_id: str
    username: str
    password_hash: bytes
    created_at: int
    updated_at: int


class UsernameTaken(Exception):
    """
    The username belongs to another container.
    """

    def __init__(self, username: str, container_id: str) -> None:
        super().__init__(username, container_id)
        self.username = username
        self.container_id = container_id


class KeyExists(Exception):
    """
    The container already holds this key.
    """


class TooManyKeys(Exception):
    """
    The container holds as many keys as it may.
    """


class NoCredential(Exception):
    """
    The container has no credential record to add a key or a secret to.
    """


@dataclass(frozen=True)
class TOTPRecord:
    """
    A container's TOTP secret, encrypted (see L{lightd_conch.totp}), and the
    last time step a code was accepted for, so that no code is used twice.
    """

    sealed: bytes
    created_at: int
    last_step: int = -1

    def encode(self) -> bytes:
        return json.dumps(
            {
                "sealed": self.sealed.hex(),
                "created_at": self.created_at,
                "last_step": self.last_step,
            }
        ).encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "TOTPRecord":
        record = json.loads(data)
        return cls(bytes.fromhex(record["sealed"]), record["created_at"], record["last_step"])


class StoreError(Exception):
    """
    The store cannot be opened.  C{str()} says where and why.
    """


class ICredentialStore(Interface):
    """
    Credential records, keyed by container id, with unique usernames.

    Methods block; the daemon calls them from a thread.
    """

    def get(container_id: str) -> "Credential | None":
        """
        The record of C{container_id}, or None.
        """

    def by_username(username: str) -> "Credential | None":
        """
        The record whose username is C{username}, or None.
        """

    def put(credential: Credential) -> None:
        """
        Create or replace the record of C{credential.container_id}, all or
        nothing.  A changed username frees the old one.

        @raise UsernameTaken: if another container has the username; nothing
            is written.
        """

    def delete(container_id: str) -> "Credential | None":
        """
        Remove the record of C{container_id} and free its username, all or
        nothing.  Return the removed record, or None if there was none.
        """

    def list() -> "list[Credential]":
        """
        All records, sorted by container id.
        """

    def get_policy(container_id: str) -> Policy:
        """
        The policy of C{container_id}: the defaults if none was set.
        """

    def update_policy(container_id: str, changes: dict) -> Policy:
        """
        Make C{changes} (see L{Policy.patched}) to the policy of
        C{container_id} in one transaction, and return the new policy.

        @raise lightd_conch.policy.PolicyError: nothing is written.
        """

    def keys(container_id: str) -> "list[AuthorizedKey]":
        """
        The public keys of C{container_id}, in the order they were added.
        """

    def add_key(container_id: str, key: AuthorizedKey, limit: int) -> None:
        """
        Add C{key} to the keys of C{container_id}, in one transaction.

        @raise NoCredential: the container has no credential record.
        @raise KeyExists: it holds a key with this fingerprint.
        @raise TooManyKeys: it holds C{limit} keys.
        """

    def remove_key(container_id: str, fingerprint: str) -> "AuthorizedKey | None":
        """
        Remove the key of C{container_id} with C{fingerprint}; return it, or
        None if there was none.
        """

    def get_totp(container_id: str) -> "TOTPRecord | None":
        """
        The TOTP record of C{container_id}, or None if TOTP is off.
        """

    def set_totp(container_id: str, record: TOTPRecord) -> None:
        """
        Turn TOTP on (or renew its secret) for C{container_id}.

        @raise NoCredential: the container has no credential record.
        """

    def delete_totp(container_id: str) -> bool:
        """
        Turn TOTP off for C{container_id}; whether it was on.
        """

    def use_totp_step(container_id: str, step: int) -> bool:
        """
        Record that a code of time step C{step} was accepted, in one
        transaction; False (nothing written) if TOTP is off or a code of
        this step or a later one was accepted before.
        """

    def close() -> None:
        """
        Release the store.  No other method may be called afterwards.
        """


def _encode(credential: Credential) -> bytes:
    return json.dumps(
        {
            "container_id": credential.container_id,
            "username": credential.username,
            "password_hash": credential.password_hash.decode("ascii"),
            "created_at": credential.created_at,
            "updated_at": credential.updated_at,
        }
    ).encode("utf-8")


def _decode(data: bytes) -> Credential:
    record = json.loads(data)
    return Credential(
        container_id=record["container_id"],
        username=record["username"],
        password_hash=record["password_hash"].encode("ascii"),
        created_at=record["created_at"],
        updated_at=record["updated_at"],
    )


@implementer(ICredentialStore)
class LMDBCredentialStore:
    """
    An L{ICredentialStore} in the LMDB environment at C{path}, created (mode
    0700) if missing.

    Other processes (the CLI beside the daemon) may have the environment
    open at the same time: LMDB's locking serialises writers, and every
    method uses its own short transaction, so each sees what others have
    committed.  Each transaction stays on one thread, which makes the store
    safe to call from several threads.  One process must open a given
    environment only once.
    """

    def __init__(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._env = lmdb.open(
                path, map_size=64 * 1024 * 1024, max_dbs=8, subdir=True, mode=0o700
            )
            self._credentials = self._env.open_db(b"credentials")
            self._usernames = self._env.open_db(b"usernames")
            self._policies = self._env.open_db(b"policies")
            self._keys = self._env.open_db(b"keys")
            self._totp = self._env.open_db(b"totp")
        except (OSError, lmdb.Error) as e:
            raise StoreError(f"cannot open the credential store {path}: {e}") from e

    def _lookupKey(self, name: str) -> "bytes | None":
        # A name LMDB cannot hold as a key (empty, or longer than its key
        # limit) cannot have been stored: a lookup of one finds nothing.
        key = name.encode()
        if not key or len(key) > self._env.max_key_size():
            return None
        return key

    def get(self, container_id: str) -> "Credential | None":
        key = self._lookupKey(container_id)
        if key is None:
            return None
        with self._env.begin() as txn:
            data = txn.get(key, db=self._credentials)
        return None if data is None else _decode(data)

    def by_username(self, username: str) -> "Credential | None":
        key = self._lookupKey(username)
        if key is None:
            return None
        with self._env.begin() as txn:
            owner = txn.get(key, db=self._usernames)
            data = None if owner is None else txn.get(owner, db=self._credentials)
        return None if data is None else _decode(data)

    def put(self, credential: Credential) -> None:
        key = credential.container_id.encode()
        username = credential.username.encode()
        # Leaving the block by an exception aborts the transaction.
        with self._env.begin(write=True) as txn:
            owner = txn.get(username, db=self._usernames)
            if owner is not None and owner != key:
                raise UsernameTaken(credential.username, owner.decode())
            old = txn.get(key, db=self._credentials)
            if old is not None:
                txn.delete(_decode(old).username.encode(), db=self._usernames)
            txn.put(key, _encode(credential), db=self._credentials)
            txn.put(username, key, db=self._usernames)

    def delete(self, container_id: str) -> "Credential | None":
        key = container_id.encode()
        with self._env.begin(write=True) as txn:
            data = txn.pop(key, db=self._credentials)
            if data is None:
                return None
            removed = _decode(data)
            txn.delete(removed.username.encode(), db=self._usernames)
            # A revoked login keeps no way in: a later generate starts
            # without the old keys and TOTP secret.
            txn.delete(key, db=self._keys)
            txn.delete(key, db=self._totp)
        return removed

    def list(self) -> "list[Credential]":
        # LMDB orders keys bytewise, which for UTF-8 is code point order,
        # the same order as sorting the ids as str.
        with self._env.begin(db=self._credentials) as txn:
            return [_decode(data) for data in txn.cursor().iternext(keys=False)]

    def get_policy(self, container_id: str) -> Policy:
        key = self._lookupKey(container_id)
        if key is None:
            return Policy()
        with self._env.begin() as txn:
            return Policy.decode(txn.get(key, db=self._policies))

    def update_policy(self, container_id: str, changes: dict) -> Policy:
        key = container_id.encode()
        with self._env.begin(write=True) as txn:
            policy = Policy.decode(txn.get(key, db=self._policies)).patched(changes)
            if policy == Policy():
                txn.delete(key, db=self._policies)
            else:
                txn.put(key, policy.encode(), db=self._policies)
        return policy

    def keys(self, container_id: str) -> "list[AuthorizedKey]":
        key = self._lookupKey(container_id)
        if key is None:
            return []
        with self._env.begin() as txn:
            return _decodeKeys(txn.get(key, db=self._keys))

    def add_key(self, container_id: str, key: AuthorizedKey, limit: int) -> None:
        name = container_id.encode()
        with self._env.begin(write=True) as txn:
            if txn.get(name, db=self._credentials) is None:
                raise NoCredential(container_id)
            held = _decodeKeys(txn.get(name, db=self._keys))
            _checkAddable(held, key, limit)
            txn.put(name, _encodeKeys(held + [key]), db=self._keys)

    def remove_key(self, container_id: str, fingerprint: str) -> "AuthorizedKey | None":
        name = self._lookupKey(container_id)
        if name is None:
            return None
        with self._env.begin(write=True) as txn:
            held = _decodeKeys(txn.get(name, db=self._keys))
            kept = [k for k in held if k.fingerprint != fingerprint]
            if len(kept) == len(held):
                return None
            if kept:
                txn.put(name, _encodeKeys(kept), db=self._keys)
            else:
                txn.delete(name, db=self._keys)
        return next(k for k in held if k.fingerprint == fingerprint)

    def get_totp(self, container_id: str) -> "TOTPRecord | None":
        name = self._lookupKey(container_id)
        if name is None:
            return None
        with self._env.begin() as txn:
            data = txn.get(name, db=self._totp)
        return None if data is None else TOTPRecord.decode(data)

    def set_totp(self, container_id: str, record: TOTPRecord) -> None:
        name = container_id.encode()
        with self._env.begin(write=True) as txn:
            if txn.get(name, db=self._credentials) is None:
                raise NoCredential(container_id)
            txn.put(name, record.encode(), db=self._totp)

    def delete_totp(self, container_id: str) -> bool:
        name = self._lookupKey(container_id)
        if name is None:
            return False
        with self._env.begin(write=True) as txn:
            return txn.delete(name, db=self._totp)

    def use_totp_step(self, container_id: str, step: int) -> bool:
        name = self._lookupKey(container_id)
        if name is None:
            return False
        with self._env.begin(write=True) as txn:
            data = txn.get(name, db=self._totp)
            if data is None:
                return False
            record = TOTPRecord.decode(data)
            if step <= record.last_step:
                return False
            txn.put(name, replace(record, last_step=step).encode(), db=self._totp)
        return True

    def close(self) -> None:
        self._env.close()


def _decodeKeys(data: "bytes | None") -> "list[AuthorizedKey]":
    if data is None:
        return []
    return [AuthorizedKey.decode(record) for record in json.loads(data)]


def _encodeKeys(keys: "list[AuthorizedKey]") -> bytes:
    return json.dumps([key.encode() for key in keys]).encode("utf-8")


def _checkAddable(held: "list[AuthorizedKey]", key: AuthorizedKey, limit: int) -> None:
    """
    The rules of L{ICredentialStore.add_key}, shared with the memory fake.
    """
    if any(k.fingerprint == key.fingerprint for k in held):
        raise KeyExists(key.fingerprint)
    if len(held) >= limit:
        raise TooManyKeys(limit)
