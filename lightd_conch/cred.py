"""
Who may log in, and what they get: the bcrypt password checker, the realm and
the per-container avatar.
"""

from __future__ import annotations

import secrets

import bcrypt
from twisted.conch.avatar import ConchUser
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from .defender import UnknownUser
from .containers import ContainerState, IContainerStates, MemoryContainerStates
from .policy import Policy
from .quota import QuotaMeasurer
from .sftp import HandleBudget
from .ssh import SessionChannel
from .volume import STALE_WRITER, LoginOwner, Volume

BCRYPT_MAX_PASSWORD = 72


class ContainerId(str):
    """
    The avatar id the checker returns: the container id, carrying the
    credential record the password was checked against, so that the session
    can be ended when that record is reset or revoked (see
    L{lightd_conch.sessions}), even by a change made while it was checked.
    """

    credential = None
    policy = None

    @classmethod
    def of(cls, credential, policy=None) -> "ContainerId":
        containerId = cls(credential.container_id)
        containerId.credential = credential
        containerId.policy = policy
        return containerId


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks a username and password against the credential store.

    bcrypt runs in a small dedicated thread pool, never on the reactor thread.
    An unknown user, or a password bcrypt cannot take (over 72 bytes), is
    checked against a dummy hash of the same cost, so a failure takes the same
    time whether or not the user exists.  The avatar id is the container id.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store, reactor, threadPool, cost: int) -> None:
        self._store = store
        self._reactor = reactor
        self._threadPool = threadPool
        self._dummyHash = bcrypt.hashpw(
            secrets.token_bytes(16), bcrypt.gensalt(cost)
        )

    def requestAvatarId(self, credentials):
        return deferToThreadPool(
            self._reactor,
            self._threadPool,
            self._check,
            credentials.username,
            credentials.password,
        )

    def _check(self, username: bytes, password: bytes) -> str:
        try:
            record = self._store.by_username(username.decode("utf-8"))
        except UnicodeDecodeError:
            record = None
        if record is None or len(password) > BCRYPT_MAX_PASSWORD:
            bcrypt.checkpw(password[:BCRYPT_MAX_PASSWORD], self._dummyHash)
            raise UnknownUser() if record is None else UnauthorizedLogin()
        if not bcrypt.checkpw(password, record.password_hash):
            raise UnauthorizedLogin()
        # Read with the record, off the reactor: what the login gate and the
        # session's volume obey from the first request on.
        return ContainerId.of(record, self._store.get_policy(record.container_id))


class ContainerAvatar(ConchUser, LoginOwner):
    """
    A logged-in user of one container: session channels only, each given
    the container's volume (L{openVolume}) by L{lightd_conch.commands}.

    @ivar credential: the credential record the login was checked against,
        or None if unknown.
    @ivar handles: the L{HandleBudget} shared by all the sessions of all
        containers, or None for no limit across sessions.
    @ivar state: the container's L{ContainerState} (its live policy and
        quota usage), shared by all its sessions.
    @ivar transport: the SSH transport that logged in, once it has.
    """

    transport = None

    def __init__(
        self,
        containerId: str,
        volumePath: str,
        settings,
        credential=None,
        handles=None,
        state: "ContainerState | None" = None,
    ) -> None:
        super().__init__()
        self.containerId = str(containerId)
        self.volumePath = volumePath
        self.settings = settings
        self.credential = credential
        self.handles = handles
        self.state = ContainerState(self.containerId) if state is None else state

    @property
    def policy(self) -> Policy:
        return self.state.policy

    def lookupChannel(self, channelType, windowSize, maxPacket, data):
        return SessionChannel(
            localWindow=self.settings.window_size,
            localMaxPacket=self.settings.max_packet_size,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            data=data,
            avatar=self,
        )

    def openVolume(self) -> Volume:
        """
        The container's volume, for one protocol run by one channel.

        @raise OSError: the volume directory is missing.
        """
        return Volume.open(self.volumePath, self.containerId, state=self.state, owner=self)

    # -- LoginOwner: a resumed upload takes over the lock of a dropped session

    def supersedes(self, other) -> bool:
        """
        Whether this login may end C{other}'s session to take a file it
        holds for writing: the same user from the same address, and that
        session has been silent for L{STALE_WRITER} seconds.
        """
        mine, theirs = self.transport, getattr(other, "transport", None)
        if other is self or mine is None or theirs is None or self.credential is None:
            return False
        if getattr(other, "credential", None) is None:
            return False
        if other.credential.username != self.credential.username:
            return False
        if theirs.transport.getPeer().host != mine.transport.getPeer().host:
            return False
        return theirs.factory.clock.seconds() - theirs.lastActivity >= STALE_WRITER

    def endStale(self, path: bytes) -> None:
        """
        End this login's session: a new session of the same user from the
        same address is resuming the upload of C{path}.
        """
        transport = self.transport
        if transport is not None:
            transport.endStale(path)


@implementer(IRealm)
class ContainerRealm:
    """
    Gives each container id an avatar rooted at its volume directory.

    @param handles: the L{HandleBudget} of open handles per container; by
        default one at C{sftp.max_handles_per_container}.
    @param states: the L{IContainerStates} of the live containers.
    @param quotas: the L{QuotaMeasurer}; a login of a container with a
        quota completes once its volume's usage is known.  None: no
        measurement (usage counts from zero).
    """

    def __init__(
        self,
        config,
        handles: "HandleBudget | None" = None,
        states: "IContainerStates | None" = None,
        quotas: "QuotaMeasurer | None" = None,
    ) -> None:
        self._config = config
        if handles is None:
            handles = HandleBudget(config.sftp.max_handles_per_container)
        self._handles = handles
        self._states = MemoryContainerStates() if states is None else states
        self._quotas = quotas

    def requestAvatar(self, avatarId, mind, *interfaces):
        containerId = str(avatarId)
        policy = getattr(avatarId, "policy", None)
        if policy is None:
            state = self._states.get(containerId)
        else:
            state = self._states.update(containerId, policy)
        volumePath = self._config.volume_path(containerId)
        avatar = ContainerAvatar(
            containerId,
            volumePath,
            self._config.sftp,
            getattr(avatarId, "credential", None),
            self._handles,
            state,
        )
        result = (interfaces[0], avatar, lambda: None)
        if self._quotas is None or not state.policy.quota_bytes or state.quota.used is not None:
            return result
        return self._quotas.ensure(state, volumePath).addCallback(lambda _: result)
