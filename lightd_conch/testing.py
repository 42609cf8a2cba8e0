"""
Public in-memory fakes for testing code that uses lightd_conch.
"""

import threading

from zope.interface import implementer

from lightd_conch.audit import record
from lightd_conch.commands import ISessionChannel
from lightd_conch.policy import Policy
from lightd_conch.store import Credential, ICredentialStore, UsernameTaken


@implementer(ICredentialStore)
class MemoryCredentialStore:
    """
    An L{ICredentialStore} in two dicts, with the LMDB store's behaviour.
    The lock keeps it as safe to call from threads as the real one.

    @ivar closed: whether L{close} was called, for tests of who closes it.
    """

    def __init__(self) -> None:
        self.closed = False
        self._lock = threading.Lock()
        self._credentials: dict[str, Credential] = {}
        self._owners: dict[str, str] = {}
        self._policies: dict[str, Policy] = {}

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
