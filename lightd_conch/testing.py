"""
Public in-memory fakes for testing code that uses lightd_conch.
"""

import threading

from zope.interface import implementer

from lightd_conch.audit import record
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

    def close(self) -> None:
        self.closed = True


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
