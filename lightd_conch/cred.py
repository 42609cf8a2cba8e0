"""
Who may log in, and what they get: the bcrypt password checker, the public-key
checker, the realm and the per-container avatar.
"""

from __future__ import annotations

import secrets

import bcrypt
from twisted.conch.avatar import ConchUser
from twisted.conch.error import ValidPublicKey
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm
from zope.interface import implementer

from .defender import UnknownUser
from .containers import ContainerState, IContainerStates, MemoryContainerStates
from .policy import Policy
from .quota import QuotaMeasurer
from .limits import IContainerBudgets, MemoryContainerBudgets
from .ssh import SessionChannel
from .audit import NullAudit
from .auditing import AuditedVolume
from .userkeys import acceptsAlgorithm, fingerprint as keyFingerprint, verifySignature
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
    # The fingerprint of the key that logged in; None for a password.
    fingerprint = None
    # Whether the login still needs a TOTP code (keyboard-interactive).
    needsCode = False

    @classmethod
    def of(cls, credential, policy=None, fingerprint=None, needsCode=False) -> "ContainerId":
        containerId = cls(credential.container_id)
        containerId.credential = credential
        containerId.policy = policy
        containerId.fingerprint = fingerprint
        containerId.needsCode = needsCode
        return containerId


class ForeignKey(UnauthorizedLogin):
    """
    A public key that is not one of the container's, or a signature that
    does not verify.  Not a failed login: clients offer every key they hold.
    """


# No container id starts with ".": reading this finds nothing, at the cost
# of reading a container's keys.
_NO_CONTAINER = ".unknown"


def _submit(checks, credentials, work, *args):
    # The SSH service puts the client's address and its transport on the
    # credentials; without them (a direct call) the check is still queued.
    return checks.submit(
        getattr(credentials, "source", None), getattr(credentials, "connection", None), work, *args
    )


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks a username and password against the credential store.

    bcrypt runs in the check threads, never on the reactor thread, when the
    L{FairCheckQueue} C{checks} gives the check its turn (by the credentials'
    C{source} address and C{connection}, which the SSH service sets).
    An unknown user, or a password bcrypt cannot take (over 72 bytes), is
    checked against a dummy hash of the same cost, so a failure takes the same
    time whether or not the user exists.  The avatar id is the container id.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, store, checks, cost: int) -> None:
        self._store = store
        self._checks = checks
        self._dummyHash = bcrypt.hashpw(
            secrets.token_bytes(16), bcrypt.gensalt(cost)
        )

    def requestAvatarId(self, credentials):
        return _submit(
            self._checks, credentials, self._check, credentials.username, credentials.password
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
        return ContainerId.of(
            record,
            self._store.get_policy(record.container_id),
            needsCode=self._store.get_totp(record.container_id) is not None,
        )


@implementer(ICredentialsChecker)
class PublicKeyChecker:
    """
    Checks a public key, and the signature made with it, against the keys
    of the user's container (L{lightd_conch.userkeys}).

    Like L{PasswordChecker}, the work waits its turn in C{checks}, and an
    unknown user costs what a known one does: the same store reads, the
    signature verified either way, and the same answer (a failure, never
    PK_OK) as a known user offering a key that is not the container's.
    A key offered without a signature that is the container's raises
    C{ValidPublicKey}, which Conch answers with PK_OK.
    """

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, store, checks) -> None:
        self._store = store
        self._checks = checks

    def requestAvatarId(self, credentials):
        return _submit(
            self._checks,
            credentials,
            self._check,
            credentials.username,
            credentials.algName,
            credentials.blob,
            credentials.sigData,
            credentials.signature,
        )

    def _check(self, username, algName, blob, sigData, signature):
        try:
            record = self._store.by_username(username.decode("utf-8"))
        except UnicodeDecodeError:
            record = None
        containerId = _NO_CONTAINER if record is None else record.container_id
        offered = keyFingerprint(blob)
        held = any(key.fingerprint == offered for key in self._store.keys(containerId))
        if signature is None:
            # Only the container's keys are worth a signature; an unknown
            # user's answer is a known user's answer to a foreign key.
            if held and acceptsAlgorithm(blob, algName):
                raise ValidPublicKey()
            raise ForeignKey()
        valid = verifySignature(blob, algName, signature, sigData)
        if not (held and valid and record is not None):
            raise ForeignKey()
        return ContainerId.of(
            record,
            self._store.get_policy(record.container_id),
            fingerprint=offered,
            needsCode=self._store.get_totp(record.container_id) is not None,
        )


class ContainerAvatar(ConchUser, LoginOwner):
    """
    A logged-in user of one container: session channels only, each given
    the container's volume (L{openVolume}) by L{lightd_conch.commands}.

    @ivar credential: the credential record the login was checked against,
        or None if unknown.
    @ivar keyFingerprint: the fingerprint of the public key the login used,
        or None for a password.
    @ivar needsCode: whether the login needs a TOTP code before it is done.
    @ivar budgets: the L{IContainerBudgets} shared by the sessions of all
        containers, which this login's session, descriptors and queued
        output count against; None for no limits (tests).
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
        budgets: "IContainerBudgets | None" = None,
        state: "ContainerState | None" = None,
    ) -> None:
        super().__init__()
        self.containerId = str(containerId)
        self.volumePath = volumePath
        self.settings = settings
        self.credential = credential
        self.keyFingerprint = None
        self.needsCode = False
        self.budgets = budgets
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
        kind = Volume if self._auditLog() is None else AuditedVolume
        budgets = self.budgets
        if budgets is None:
            return kind.open(self.volumePath, self.containerId, state=self.state, owner=self)
        count = 1 + extraDescriptors
        budgets.takeDescriptors(self.containerId, count)
        try:
            volume = kind.open(self.volumePath, self.containerId, state=self.state, owner=self)
        except BaseException:
            budgets.giveDescriptors(self.containerId, count)
            raise
        volume.whenClosed(lambda: budgets.giveDescriptors(self.containerId, count))
        return volume

    def _auditLog(self):
        # The service's audit log once logged in, or None where nothing is kept.
        audit = getattr(getattr(self.transport, "factory", None), "audit", None)
        return None if audit is None or isinstance(audit, NullAudit) else audit

    _auditBase = None
    """(transport, session id, the fields every event of it has), once logged in."""

    def audit(self, event: str, **fields) -> None:
        audit = self._auditLog()
        if audit is not None:
            transport = self.transport
            base = self._auditBase
            if base is None or base[0] is not transport:
                # Made once a login: a session's events come in thousands (one
                # per file), and none of these fields changes once logged in.
                base = (transport, transport.sessionId, transport._auditFields())
                if base[2]["username"] is not None:
                    self._auditBase = base
            audit.event(event, base[1], **base[2], **fields)

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
        return theirs.quietFor() >= STALE_WRITER

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

    @param budgets: the L{IContainerBudgets} every avatar's session counts
        against; by default one from the C{sftp} section's limits, in which
        a container's policy (its C{max_sessions}) may lower its limit.
    @param states: the L{IContainerStates} of the live containers.
    @param quotas: the L{QuotaMeasurer}; a login of a container with a
        quota completes once its volume's usage is known.  None: no
        measurement (usage counts from zero).
    @param clock: the reactor's time, for the budgets and the containers'
        bandwidth buckets.
    """

    def __init__(
        self,
        config,
        budgets: "IContainerBudgets | None" = None,
        states: "IContainerStates | None" = None,
        quotas: "QuotaMeasurer | None" = None,
        clock=None,
    ) -> None:
        self._config = config
        self._states = MemoryContainerStates(clock) if states is None else states
        if budgets is None:
            budgets = MemoryContainerBudgets.fromConfig(
                config.sftp, clock, sessionLimits=self.sessionLimit
            )
        self.budgets = budgets
        self._quotas = quotas

    def sessionLimit(self, containerId: str) -> int:
        """
        The container's own limit of sessions (its policy's C{max_sessions},
        0 for none), for the budgets.
        """
        return self._states.get(containerId).policy.max_sessions

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
            self.budgets,
            state,
        )
        avatar.keyFingerprint = getattr(avatarId, "fingerprint", None)
        avatar.needsCode = getattr(avatarId, "needsCode", False)
        result = (interfaces[0], avatar, lambda: None)
        if self._quotas is None or not state.policy.quota_bytes or state.quota.used is not None:
            return result
        return self._quotas.ensure(state, volumePath).addCallback(lambda _: result)
