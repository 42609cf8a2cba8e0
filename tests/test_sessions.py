"""
Tests for L{lightd_conch.sessions}: the registry of live sessions and the
watcher that ends them when their credentials change, driven by a Clock over
a L{MemoryCredentialStore}; and the checker and realm that tell each session
which credential record it logged in with.
"""

import dataclasses
import os

import bcrypt
from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import IRealm
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from lightd_conch.config import SFTPConfig
from lightd_conch.checkqueue import FairCheckQueue
from lightd_conch.cred import ContainerAvatar, ContainerRealm, PasswordChecker
from lightd_conch.sessions import ABORT_AFTER, CredentialWatcher, SessionRegistry
from lightd_conch.store import Credential
from lightd_conch.testing import MemoryCredentialStore


def credential(containerId, username=None, password=b"password", created=1):
    return Credential(
        containerId,
        username or containerId,
        bcrypt.hashpw(password, bcrypt.gensalt(4)),
        created,
        created,
    )


class FakeSSHTransport:
    """
    What the registry and the watcher use of an L{SSHTransport}.
    """

    port = 40000

    def __init__(self, credential):
        self.avatar = ContainerAvatar(credential.container_id, "/nonexistent", None, credential)
        self.loginUsername = credential.username
        FakeSSHTransport.port += 1
        self.sessionId = f"{FakeSSHTransport.port:016x}"
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", FakeSSHTransport.port)
        )
        self.disconnects = []

    def sendDisconnect(self, reason, description):
        self.disconnects.append((reason, description))
        self.transport.loseConnection()

    @property
    def ended(self):
        return bool(self.disconnects)


class WatcherTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.store = MemoryCredentialStore()
        self.registry = SessionRegistry()
        self.watcher = CredentialWatcher(self.store, self.registry, self.clock)
        self.watcher.startService()
        self.addCleanup(self.watcher.stopService)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def login(self, containerId, username=None):
        record = self.store.get(containerId)
        if record is None:
            record = credential(containerId, username)
            self.store.put(record)
        transport = FakeSSHTransport(record)
        self.registry.loggedIn(transport)
        return transport

    def reset(self, containerId, **changes):
        old = self.store.get(containerId)
        new = dataclasses.replace(
            old, password_hash=bcrypt.hashpw(b"new password", bcrypt.gensalt(4)), **changes
        )
        self.store.put(new)

    def messages(self):
        return [
            formatEvent(e)
            for e in self.events
            if e.get("log_namespace") == "lightd_conch.sessions"
        ]

    def test_unchangedSessionsLive(self):
        a = self.login("a")
        self.clock.advance(10)
        self.assertFalse(a.ended)
        self.assertEqual(self.messages(), [])

    def test_resetEndsSessionsWithinASecond(self):
        a1, a2, b = self.login("a"), self.login("a"), self.login("b")
        self.reset("a")
        self.clock.advance(0.99)
        self.assertFalse(a1.ended)
        self.clock.advance(0.01)
        for transport in (a1, a2):
            self.assertEqual(
                transport.disconnects, [(DISCONNECT_BY_APPLICATION, b"credentials changed")]
            )
            self.assertTrue(transport.transport.disconnecting)
        self.assertFalse(b.ended)
        self.assertEqual(self.registry.containers(), ["b"])
        messages = self.messages()
        self.assertEqual(len(messages), 2)
        for transport, message in zip((a1, a2), messages):
            self.assertIn("ending session of user a (container a)", message)
            self.assertIn(f"127.0.0.1:{transport.transport.getPeer().port}", message)
            self.assertIn("credentials changed", message)
        # Ended once, not at every later tick.
        self.clock.advance(5)
        self.assertEqual(len(a1.disconnects), 1)
        self.assertEqual(len(self.messages()), 2)

    def test_revokeEndsSessions(self):
        a, b = self.login("a"), self.login("b")
        self.store.delete("a")
        self.clock.advance(1)
        self.assertEqual(a.disconnects, [(DISCONNECT_BY_APPLICATION, b"credentials revoked")])
        self.assertFalse(b.ended)
        self.assertIn("credentials revoked", self.messages()[0])

    def test_usernameChangeEndsSessions(self):
        a = self.login("a")
        self.store.put(dataclasses.replace(self.store.get("a"), username="renamed"))
        self.clock.advance(1)
        self.assertTrue(a.ended)

    def test_revokeAndRecreateEndsSessions(self):
        a = self.login("a")
        self.store.delete("a")
        self.store.put(credential("a"))
        self.clock.advance(1)
        self.assertTrue(a.ended)

    def test_sessionAfterResetLives(self):
        old = self.login("a")
        self.reset("a")
        new = self.login("a")
        self.clock.advance(1)
        self.assertTrue(old.ended)
        self.assertFalse(new.ended)
        login = (new.avatar.credential.username, new.avatar.credential.password_hash, None)
        self.assertEqual(self.registry.sessions("a"), [(new, login)])

    def test_checkNow(self):
        a, b = self.login("a"), self.login("b")
        self.reset("a")
        self.reset("b")
        self.assertEqual(self.watcher.check(["a"]), 1)
        self.assertTrue(a.ended)
        self.assertFalse(b.ended)
        self.assertEqual(self.watcher.check(), 1)
        self.assertTrue(b.ended)

    def test_unknownLoginEndsOnlyOnRevoke(self):
        record = credential("a")
        self.store.put(record)
        transport = FakeSSHTransport(record)
        transport.avatar.credential = None
        self.registry.loggedIn(transport)
        self.reset("a")
        self.clock.advance(1)
        self.assertFalse(transport.ended)
        self.store.delete("a")
        self.clock.advance(1)
        self.assertTrue(transport.ended)

    def test_loggedOut(self):
        a = self.login("a")
        self.registry.loggedOut(a)
        self.registry.loggedOut(a)
        self.assertEqual(self.registry.containers(), [])
        self.store.delete("a")
        self.clock.advance(1)
        self.assertFalse(a.ended)

    def test_stuckClientAborted(self):
        a = self.login("a")
        self.store.delete("a")
        self.clock.advance(1)
        self.assertTrue(a.transport.disconnecting)
        self.clock.advance(ABORT_AFTER)
        self.assertTrue(a.transport.disconnected)

    def test_storeErrorKeepsWatching(self):
        a = self.login("a")
        get = self.store.get
        self.store.get = lambda containerId: 1 / 0
        self.clock.advance(1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.store.get = get
        self.store.delete("a")
        self.clock.advance(1)
        self.assertTrue(a.ended)

    def test_stopService(self):
        a = self.login("a")
        self.watcher.stopService()
        self.store.delete("a")
        self.clock.advance(10)
        self.assertFalse(a.ended)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _Pool:
    pass


class _Reactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class LoginRecordTests(TestCase):
    """
    The session learns the record its password was checked against, not
    whatever the store holds by the time the login completes.
    """

    def setUp(self):
        import lightd_conch.checkqueue

        self.patch(
            lightd_conch.checkqueue,
            "deferToThreadPool",
            lambda reactor, pool, f, *args: succeed(f(*args)),
        )

    def test_checkerReturnsTheCheckedRecord(self):
        store = MemoryCredentialStore()
        record = credential("c1", "alice", b"right password")
        store.put(record)
        checker = PasswordChecker(store, FairCheckQueue(_Reactor(), _Pool(), 1), 4)
        avatarId = self.successResultOf(
            checker.requestAvatarId(UsernamePassword(b"alice", b"right password"))
        )
        self.assertEqual(avatarId, "c1")
        self.assertIs(avatarId.credential, record)

        class _Config:
            sftp = SFTPConfig(host_key="/nonexistent")

            def volume_path(self, containerId):
                return os.path.join("/volumes", containerId)

        realm = ContainerRealm(_Config())
        self.assertTrue(IRealm.providedBy(realm))
        _, avatar, _ = realm.requestAvatar(avatarId, None, object)
        self.assertEqual(avatar.containerId, "c1")
        self.assertIs(type(avatar.containerId), str)
        self.assertIs(avatar.credential, record)
        self.assertEqual(avatar.volumePath, "/volumes/c1")
