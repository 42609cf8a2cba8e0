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
from .sftp import HandleBudget
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
    @ivar handles: the L{HandleBudget} shared by all the sessions of all
        containers, or None for no limit across sessions.
    """

    def __init__(
        self, containerId: str, volumePath: str, settings, credential=None, handles=None
    ) -> None:
        super().__init__()
        self.containerId = str(containerId)
        self.volumePath = volumePath
        self.settings = settings
        self.credential = credential
        self.handles = handles

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
        return Volume.open(self.volumePath, self.containerId)


@implementer(IRealm)
class ContainerRealm:
    """
    Gives each container id an avatar rooted at its volume directory.

    @param handles: the L{HandleBudget} of open handles per container; by
        default one at C{sftp.max_handles_per_container}.
    """

    def __init__(self, config, handles: "HandleBudget | None" = None) -> None:
        self._config = config
        if handles is None:
            handles = HandleBudget(config.sftp.max_handles_per_container)
        self._handles = handles

    def requestAvatar(self, avatarId, mind, *interfaces):
        avatar = ContainerAvatar(
            avatarId,
            self._config.volume_path(avatarId),
            self._config.sftp,
            getattr(avatarId, "credential", None),
            self._handles,
        )
        return interfaces[0], avatar, lambda: None
