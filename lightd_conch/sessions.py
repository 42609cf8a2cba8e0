"""
Live SFTP sessions: listing and ending them, ending them when their
container's credentials or policy change, and letting them finish at
shutdown.

L{SessionRegistry} knows which SSH transports are logged in to which
container, and the credential record each one logged in with.
L{CredentialWatcher} compares those records with the store every second, and
at once after the admin API changes something, and disconnects the sessions
whose record was reset or revoked.  It also hands each live container's
policy, as the store holds it now, to its sessions' volumes, ends the
sessions the policy no longer admits (suspended, an address no longer
allowed, password logins turned off), and has the volumes with a quota
measured again now and then.  Polling the store, rather than being told, is
what lets the CLI, a separate process writing LMDB directly, reach live
sessions too.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ._address import formatAddress

log = Logger()

# How often the store is compared with the live sessions; a reset from the
# CLI ends sessions within this, plus the time to disconnect.
CHECK_INTERVAL = 1.0
# A client that stops reading keeps an ended session's socket open while the
# goodbye waits to be written; after this many seconds it is dropped.
ABORT_AFTER = 3.0


class SessionRegistry:
    """
    The logged-in SSH transports, by container id.

    A transport is added by L{loggedIn} once user authentication succeeds and
    removed by L{loggedOut} when its connection ends (or when the watcher
    ends it).  Its avatar says which container it belongs to and which
    credential record (username, bcrypt hash) its password was checked
    against.  Each transport is also known by its C{sessionId}, for
    L{describe} and L{end}.
    """

    def __init__(self) -> None:
        self._live: dict[str, dict[object, "tuple[str, bytes] | None"]] = {}
        self._byId: dict[str, object] = {}

    def loggedIn(self, transport) -> None:
        avatar = transport.avatar
        credential = getattr(avatar, "credential", None)
        login = (
            None
            if credential is None
            else (credential.username, credential.password_hash)
        )
        self._live.setdefault(avatar.containerId, {})[transport] = login
        self._byId[transport.sessionId] = transport

    def loggedOut(self, transport) -> None:
        self._byId.pop(transport.sessionId, None)
        containerId = transport.avatar.containerId
        sessions = self._live.get(containerId)
        if sessions is None:
            return
        sessions.pop(transport, None)
        if not sessions:
            del self._live[containerId]

    def containers(self) -> "list[str]":
        """
        The ids of the containers that have live sessions.
        """
        return list(self._live)

    def sessions(self, containerId: str) -> "list[tuple[object, tuple[str, bytes] | None]]":
        """
        The live transports of C{containerId}, each with the (username,
        password hash) it logged in with, or None where that is unknown.
        """
        return list(self._live.get(containerId, {}).items())

    def describe(self) -> "list[dict]":
        """
        Every live session as C{GET /sftp/sessions} shows it, oldest first.
        """
        sessions = sorted(self._byId.values(), key=lambda t: (t.startedAt or 0, t.sessionId))
        return [
            {
                "id": transport.sessionId,
                "container": transport.avatar.containerId,
                "username": getattr(transport, "loginUsername", None),
                "ip": transport.transport.getPeer().host,
                "method": transport.loginMethod,
                "started_at": None if transport.startedAt is None else int(transport.startedAt),
                "bytes_in": transport.bytesIn,
                "bytes_out": transport.bytesOut,
            }
            for transport in sessions
        ]

    def end(self, sessionId: str, clock, why: str = "session ended by the administrator") -> bool:
        """
        Disconnect the live session C{sessionId}; False if there is none.
        """
        transport = self._byId.get(sessionId)
        if transport is None:
            return False
        self.loggedOut(transport)
        log.info(
            "ending session {session} of user {username} (container {container}) from {peer}:"
            " {why}",
            session=sessionId,
            username=getattr(transport, "loginUsername", "?"),
            container=transport.avatar.containerId,
            peer=formatAddress(transport.transport.getPeer()),
            why=why,
        )
        disconnect(transport, clock, why)
        return True


def disconnect(transport, clock, why: str) -> None:
    """
    Send C{why} in a DISCONNECT and close once it is written; drop the
    connection after L{ABORT_AFTER} seconds if the client does not read it.
    """
    # The transport stops reading, so the session serves no further request.
    transport.sendDisconnect(DISCONNECT_BY_APPLICATION, why.encode("utf-8"))
    # A no-op once the connection is closed.
    clock.callLater(ABORT_AFTER, transport.transport.abortConnection)


class CredentialWatcher(Service):
    """
    Ends the sessions whose credentials were reset or revoked.

    Every L{CHECK_INTERVAL} seconds on C{clock}, it re-reads the records of
    the containers that have live sessions (a few LMDB reads, cheap enough
    for the reactor thread) and disconnects each session whose record is
    gone or no longer has the username and hash it logged in with.  Sessions
    whose login is unknown end only when the record is gone.
    """

    def __init__(
        self,
        store,
        registry: SessionRegistry,
        clock,
        interval=CHECK_INTERVAL,
        states=None,
        quotas=None,
        volumePath=None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._clock = clock
        self._interval = interval
        self._states = states
        self._quotas = quotas
        self._volumePath = volumePath
        self._loop = None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def stopService(self):
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return super().stopService()

    def check(self, containerIds=None) -> int:
        """
        Compare now, for C{containerIds} or every container with live
        sessions; return how many sessions were ended.
        """
        ended = 0
        if containerIds is None:
            containerIds = self._registry.containers()
        for containerId in containerIds:
            try:
                record = self._store.get(containerId)
                policy = self._store.get_policy(containerId)
            except Exception:
                # Keep the loop alive; the next tick tries again.
                log.failure("cannot read the credentials of {container}", container=containerId)
                continue
            if self._states is not None:
                state = self._states.update(containerId, policy)
                if policy.quota_bytes and self._quotas is not None:
                    self._quotas.refresh(state, self._volumePath(containerId))
            current = None if record is None else (record.username, record.password_hash)
            for transport, login in self._registry.sessions(containerId):
                if record is None or (login is not None and login != current):
                    why = "credentials " + ("revoked" if record is None else "changed")
                else:
                    why = policy.refusal(
                        transport.transport.getPeer().host,
                        getattr(transport.avatar, "method", "password"),
                    )
                    if why is None:
                        continue
                self._end(transport, containerId, why)
                ended += 1
        return ended

    def _end(self, transport, containerId: str, why: str) -> None:
        self._registry.loggedOut(transport)
        log.info(
            "ending session of user {username} (container {container}) from {peer}: {why}",
            username=getattr(transport, "loginUsername", "?"),
            container=containerId,
            peer=formatAddress(transport.transport.getPeer()),
            why=why,
        )
        disconnect(transport, self._clock, why)


# While draining, a session whose client sent nothing for this long has no
# transfer in flight and is ended at once.
QUIET = 1.0
DRAIN_TICK = 0.25
SHUTTING_DOWN = "the server is shutting down"


def drain(connections, clock, grace: float, quiet: float = QUIET, tick: float = DRAIN_TICK):
    """
    End the SSH C{connections} (a live set of transports, emptied as they
    close) for a shutdown, letting transfers in flight finish.

    Connections not logged in, and sessions whose client has been quiet for
    C{quiet} seconds, are disconnected now; the others as soon as they fall
    quiet, and all that remain after C{grace} seconds.  Returns a Deferred
    that fires once every connection is closed (at most L{ABORT_AFTER}
    seconds after the grace).
    """
    done = Deferred()
    deadline = clock.seconds() + grace
    ended = set()

    def check():
        past = clock.seconds() >= deadline
        for transport in list(connections):
            if transport in ended:
                continue
            idle = getattr(transport, "avatar", None) is None or transport.quietFor() >= quiet
            if past or idle:
                ended.add(transport)
                if not idle:
                    log.info(
                        "shutdown grace over: ending session {session} from {peer}",
                        session=transport.sessionId,
                        peer=formatAddress(transport.transport.getPeer()),
                    )
                disconnect(transport, clock, SHUTTING_DOWN)
        if not connections or clock.seconds() >= deadline + ABORT_AFTER:
            # Past that, abortConnection was called for each: nothing more
            # is waited for.
            loop.stop()

    loop = LoopingCall(check)
    loop.clock = clock
    loop.start(tick, now=True).addBoth(lambda ignored: done.callback(None))
    return done
