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
from .limits import IContainerBudgets, MemoryContainerBudgets
from .ssh import SessionChannel
from .volume import Volume

BCRYPT_MAX_PASSWORD = 72


class ContainerId(str):
    """
    The avatar id the checker returns: the container id, carrying the
    credential record the password was checked against, so that the session
    can be ended when that record is reset or revoked (see
    L{lightd_conch.sessions}), even by a change made while it was checked.
    """

    credential = None

    @classmethod
    def of(cls, credential) -> "ContainerId":
        containerId = cls(credential.container_id)
        containerId.credential = credential
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
        return ContainerId.of(record)


class ContainerAvatar(ConchUser):
    """
    A logged-in user of one container: session channels only, each given
    the container's volume (L{openVolume}) by L{lightd_conch.commands}.

    @ivar credential: the credential record the login was checked against,
        or None if unknown.
    @ivar budgets: the L{IContainerBudgets} shared by the sessions of all
        containers, which this login's session, descriptors and queued
        output count against; None for no limits (tests).
    """

    def __init__(
        self,
        containerId: str,
        volumePath: str,
        settings,
        credential=None,
        budgets: "IContainerBudgets | None" = None,
    ) -> None:
        super().__init__()
        self.containerId = str(containerId)
        self.volumePath = volumePath
        self.settings = settings
        self.credential = credential
        self.budgets = budgets

    def lookupChannel(self, channelType, windowSize, maxPacket, data):
        return SessionChannel(
            localWindow=self.settings.window_size,
            localMaxPacket=self.settings.max_packet_size,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            data=data,
            avatar=self,
        )

    def openVolume(self, extraDescriptors: int = 0) -> Volume:
        """
        The container's volume, for one protocol run by one channel.  Its
        descriptor, and C{extraDescriptors} more for what the protocol
        keeps open beside it, count against the container's budget until
        it is closed.

        @raise lightd_conch.limits.OverLimit: the container has no
            descriptors left.
        @raise OSError: the volume directory is missing.
        """
        budgets = self.budgets
        if budgets is None:
            return Volume.open(self.volumePath, self.containerId)
        count = 1 + extraDescriptors
        budgets.takeDescriptors(self.containerId, count)
        try:
            volume = _CountedVolume.open(self.volumePath, self.containerId)
        except BaseException:
            budgets.giveDescriptors(self.containerId, count)
            raise
        volume.counted = (budgets, count)
        return volume


class _CountedVolume(Volume):
    """
    A volume whose descriptors are given back to its container's budget
    once, when it is closed.
    """

    counted = None

    def close(self) -> None:
        counted, self.counted = self.counted, None
        super().close()
        if counted is not None:
            budgets, count = counted
            budgets.giveDescriptors(self.containerId, count)


@implementer(IRealm)
class ContainerRealm:
    """
    Gives each container id an avatar rooted at its volume directory.

    @param budgets: the L{IContainerBudgets} every avatar's session counts
        against; by default one from the C{sftp} section's limits.
    """

    def __init__(self, config, budgets: "IContainerBudgets | None" = None) -> None:
        self._config = config
        if budgets is None:
            budgets = MemoryContainerBudgets.fromConfig(config.sftp)
        self.budgets = budgets

    def requestAvatar(self, avatarId, mind, *interfaces):
        avatar = ContainerAvatar(
            avatarId,
            self._config.volume_path(avatarId),
            self._config.sftp,
            getattr(avatarId, "credential", None),
            self.budgets,
        )
        return interfaces[0], avatar, lambda: None
