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
from .fs import ConfinedFilesystem
from .limits import IContainerBudgets
from .ssh import SessionChannel

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
    A logged-in user of one container: session channels only, rooted at the
    container's volume.

    @ivar credential: the credential record the login was checked against,
        or None if unknown.
    @ivar budgets: the L{IContainerBudgets} its session counts against, set
        at login; None (nothing counted) before, and in tests.
    """

    budgets: "IContainerBudgets | None" = None

    def __init__(self, containerId: str, volumePath: str, settings, credential=None) -> None:
        super().__init__()
        self.containerId = str(containerId)
        self.volumePath = volumePath
        self.settings = settings
        self.credential = credential

    def lookupChannel(self, channelType, windowSize, maxPacket, data):
        return SessionChannel(
            localWindow=self.settings.window_size,
            localMaxPacket=self.settings.max_packet_size,
            remoteWindow=windowSize,
            remoteMaxPacket=maxPacket,
            data=data,
            avatar=self,
        )

    def openFilesystem(self, extraDescriptors: int = 0) -> ConfinedFilesystem:
        """
        The container's volume, whose descriptor (and C{extraDescriptors}
        more, for what the caller keeps open beside it) counts against the
        container's budget until it is closed.

        @raise lightd_conch.limits.OverLimit: the container has no
            descriptors left.
        @raise OSError: the volume cannot be opened.
        """
        if self.budgets is None:
            return ConfinedFilesystem(self.volumePath)
        return _CountedFilesystem(
            self.volumePath, self.budgets, self.containerId, 1 + extraDescriptors
        )


class _CountedFilesystem(ConfinedFilesystem):
    """
    A volume whose descriptors are counted in its container's budget: taken
    before it is opened, given back once when it is closed.
    """

    def __init__(self, root: str, budgets, owner: str, count: int) -> None:
        budgets.takeDescriptors(owner, count)
        try:
            super().__init__(root)
        except BaseException:
            budgets.giveDescriptors(owner, count)
            raise
        self._budgets, self._budgetOwner, self._counted = budgets, owner, count

    def close(self) -> None:
        counted, self._counted = self._counted, 0
        super().close()
        if counted:
            self._budgets.giveDescriptors(self._budgetOwner, counted)


@implementer(IRealm)
class ContainerRealm:
    """
    Gives each container id an avatar rooted at its volume directory.
    """

    def __init__(self, config) -> None:
        self._config = config

    def requestAvatar(self, avatarId, mind, *interfaces):
        avatar = ContainerAvatar(
            avatarId,
            self._config.volume_path(avatarId),
            self._config.sftp,
            getattr(avatarId, "credential", None),
        )
        return interfaces[0], avatar, lambda: None
