"""
Public in-memory fakes for testing code that uses lightd_conch.
"""

import threading

from zope.interface import implementer

from lightd_conch.audit import record
from lightd_conch.commands import ISessionChannel
from lightd_conch.policy import Policy
from dataclasses import replace

from lightd_conch.store import (
    Credential,
    ICredentialStore,
    NoCredential,
    TOTPRecord,
    UsernameTaken,
    _checkAddable,
)
from lightd_conch.userkeys import AuthorizedKey


@implementer(ICredentialStore)
class MemoryCredentialStore:
    """
    An L{ICredentialStore} in dicts, with the LMDB store's behaviour.
    The lock keeps it as safe to call from threads as the real one.

    @ivar closed: whether L{close} was called, for tests of who closes it.
    """

    def __init__(self) -> None:
        self.closed = False
        self._lock = threading.Lock()
        self._credentials: dict[str, Credential] = {}
        self._owners: dict[str, str] = {}
        self._policies: dict[str, Policy] = {}
        self._keys: dict[str, list] = {}
        self._totp: dict[str, TOTPRecord] = {}

    def get(self, container_id: str) -> "Credential | None":
        with self._lock:
            return self._credentials.get(container_id)

    def by_username(self, username: str) -> "Credential | None":
        with self._lock:
            owner = self._owners.get(username)
            return None if owner is None else self._credentials[owner]

    def put(self, credential: Credential) -> None:
        with self._lock:
            owner = self._owners.get(credential.username)
            if owner is not None and owner != credential.container_id:
                raise UsernameTaken(credential.username, owner)
            old = self._credentials.get(credential.container_id)
            if old is not None:
                del self._owners[old.username]
            self._credentials[credential.container_id] = credential
            self._owners[credential.username] = credential.container_id

    def delete(self, container_id: str) -> "Credential | None":
        with self._lock:
            removed = self._credentials.pop(container_id, None)
            if removed is not None:
                del self._owners[removed.username]
                self._keys.pop(container_id, None)
                self._totp.pop(container_id, None)
            return removed

    def list(self) -> "list[Credential]":
        with self._lock:
            return sorted(
                self._credentials.values(), key=lambda c: c.container_id
            )

    def get_policy(self, container_id: str) -> Policy:
        with self._lock:
            return self._policies.get(container_id, Policy())

    def update_policy(self, container_id: str, changes: dict) -> Policy:
        with self._lock:
            policy = self._policies.get(container_id, Policy()).patched(changes)
            self._policies[container_id] = policy
            return policy

    def keys(self, container_id: str) -> "list[AuthorizedKey]":
        with self._lock:
            return list(self._keys.get(container_id, ()))

    def add_key(self, container_id: str, key: AuthorizedKey, limit: int) -> None:
        with self._lock:
            if container_id not in self._credentials:
                raise NoCredential(container_id)
            held = self._keys.get(container_id, [])
            _checkAddable(held, key, limit)
            self._keys[container_id] = held + [key]

    def remove_key(self, container_id: str, fingerprint: str) -> "AuthorizedKey | None":
        with self._lock:
            held = self._keys.get(container_id, [])
            for key in held:
                if key.fingerprint == fingerprint:
                    kept = [k for k in held if k is not key]
                    if kept:
                        self._keys[container_id] = kept
                    else:
                        del self._keys[container_id]
                    return key
            return None

    def get_totp(self, container_id: str) -> "TOTPRecord | None":
        with self._lock:
            return self._totp.get(container_id)

    def set_totp(self, container_id: str, record: TOTPRecord) -> None:
        with self._lock:
            if container_id not in self._credentials:
                raise NoCredential(container_id)
            self._totp[container_id] = record

    def delete_totp(self, container_id: str) -> bool:
        with self._lock:
            return self._totp.pop(container_id, None) is not None

    def use_totp_step(self, container_id: str, step: int) -> bool:
        with self._lock:
            record = self._totp.get(container_id)
            if record is None or step <= record.last_step:
                return False
            self._totp[container_id] = replace(record, last_step=step)
            return True

    def close(self) -> None:
        self.closed = True


@implementer(ISessionChannel)
class FakeSessionChannel:
    """
    An L{ISessionChannel} that keeps what a protocol sends, for tests of the
    protocols a session channel runs (SFTP, scp, rsync, refusals).

    @ivar out: the channel data written, in order (as bytes).
    @ivar err: the stderr data written, in order.
    @ivar exitCode: the status given to L{exit}, or None.
    @ivar lost: whether L{loseConnection} was called.
    @ivar resumed: how many times the protocol asked for input again.
    """

    def __init__(self) -> None:
        self.out: list = []
        self.err: list = []
        self.exitCode = None
        self.lost = False
        self.resumed = 0

    def write(self, data) -> None:
        self.out.append(bytes(data))

    def writeSequence(self, seq) -> None:
        for data in seq:
            self.write(data)

    def writeStderr(self, data) -> None:
        self.err.append(bytes(data))

    def exit(self, code: int) -> None:
        self.exitCode = code

    def loseConnection(self) -> None:
        self.lost = True

    def resumeInput(self) -> None:
        self.resumed += 1

    def value(self) -> bytes:
        """
        Everything written so far as channel data.
        """
        return b"".join(self.out)

    def clear(self) -> None:
        self.out = []

    def output(self) -> bytes:
        """
        The channel data written since the last call.
        """
        data = self.value()
        self.clear()
        return data


class MemoryAudit:
    """
    An audit log in a list: L{events} holds each event as the file would
    (L{lightd_conch.audit.record}), time included, from C{clock}.
    """

    def __init__(self, clock=None) -> None:
        self.events: "list[dict]" = []
        self._clock = clock

    def event(self, event: str, session=None, **fields) -> None:
        seconds = 0.0 if self._clock is None else self._clock.seconds()
        self.events.append(record(seconds, event, session, **fields))

    def named(self, event: str) -> "list[dict]":
        """
        The events called C{event}, in order.
        """
        return [entry for entry in self.events if entry["event"] == event]
