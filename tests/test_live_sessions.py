"""
Tests for the live sessions: L{SessionRegistry.describe} and
L{SessionRegistry.end}, C{GET /sftp/sessions} and C{DELETE
/sftp/sessions/{id}}, and the shutdown L{drain}, driven by a Clock.
"""

from twisted.conch.ssh.transport import DISCONNECT_BY_APPLICATION
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from lightd_conch.cred import ContainerAvatar
from lightd_conch.sessions import ABORT_AFTER, SHUTTING_DOWN, SessionRegistry, drain

from lightd_conch.testing import MemoryAudit

from .test_api import APITestCase
from .test_sessions import credential


class Session:
    """
    What the registry, the API and the drain use of an L{SSHTransport}.
    """

    count = 0

    def __init__(self, clock, containerId="web", loggedIn=True, connections=None):
        Session.count += 1
        self.clock = clock
        self.connections = connections
        self.sessionId = f"{Session.count:016x}"
        self.avatar = (
            ContainerAvatar(containerId, "/nonexistent", None, credential(containerId))
            if loggedIn
            else None
        )
        self.loginUsername = containerId + "-user" if loggedIn else None
        self.loginMethod = "password" if loggedIn else None
        self.startedAt = clock.seconds() if loggedIn else None
        self.bytesIn = 10
        self.bytesOut = 20
        self.lastHeard = clock.seconds()
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000 + Session.count)
        )
        self.disconnects = []
        if connections is not None:
            connections.add(self)

    def quietFor(self):
        return self.clock.seconds() - self.lastHeard

    def sendDisconnect(self, reason, description):
        self.disconnects.append((reason, description))
        if self.connections is not None:
            self.connections.discard(self)


class RegistryTests(TestCase):
    def test_describeAndEnd(self):
        clock = Clock()
        clock.advance(1700000000)
        registry = SessionRegistry()
        first = Session(clock)
        clock.advance(5)
        second = Session(clock, "db")
        registry.loggedIn(second)
        registry.loggedIn(first)
        self.assertEqual(
            registry.describe(),
            [
                {
                    "id": first.sessionId,
                    "container": "web",
                    "username": "web-user",
                    "ip": "127.0.0.1",
                    "method": "password",
                    "started_at": 1700000000,
                    "bytes_in": 10,
                    "bytes_out": 20,
                },
                {
                    "id": second.sessionId,
                    "container": "db",
                    "username": "db-user",
                    "ip": "127.0.0.1",
                    "method": "password",
                    "started_at": 1700000005,
                    "bytes_in": 10,
                    "bytes_out": 20,
                },
            ],
        )
        self.assertTrue(registry.end(first.sessionId, clock))
        self.assertEqual(
            first.disconnects, [(DISCONNECT_BY_APPLICATION, b"session ended by the administrator")]
        )
        self.assertEqual([s["id"] for s in registry.describe()], [second.sessionId])
        self.assertEqual(registry.containers(), ["db"])
        self.assertFalse(registry.end(first.sessionId, clock))
        self.assertFalse(registry.end("nope", clock))
        # A client that does not read the goodbye is dropped.
        clock.advance(ABORT_AFTER)
        self.assertTrue(first.transport.disconnected)
        self.assertFalse(second.transport.disconnected)


class SessionsAPITests(APITestCase):
    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.registry = SessionRegistry()
        self.api._sessions = self.registry
        self.api._endSession = lambda sessionId: self.registry.end(sessionId, self.clock)
        self.audit = MemoryAudit()
        self.api._audit = self.audit

    def test_listAndEnd(self):
        self.assertResponse(self.request("GET", "/sftp/sessions"), 200, [])
        session = Session(self.clock)
        self.registry.loggedIn(session)
        listed = self.assertResponse(self.request("GET", "/sftp/sessions"), 200)
        self.assertEqual([s["id"] for s in listed], [session.sessionId])
        self.assertEqual(
            sorted(listed[0]),
            sorted(["id", "container", "username", "ip", "method", "started_at", "bytes_in", "bytes_out"]),
        )
        self.assertResponse(self.request("DELETE", f"/sftp/sessions/{session.sessionId}"), 204)
        self.assertEqual(len(session.disconnects), 1)
        self.assertEqual(
            [(e["event"], e["session"], e["container"], e["username"], e["via"]) for e in self.audit.events],
            [("session_ended", session.sessionId, "web", "web-user", "api")],
        )
        self.assertResponse(self.request("GET", "/sftp/sessions"), 200, [])
        self.assertError(
            self.request("DELETE", f"/sftp/sessions/{session.sessionId}"), 404, "no such session"
        )

    def test_refusals(self):
        self.assertError(self.request("GET", "/sftp/sessions", token=None), 401)
        self.assertError(self.request("DELETE", "/sftp/sessions/x", token=None), 401)
        self.assertError(self.request("POST", "/sftp/sessions"), 405)
        self.assertError(self.request("GET", "/sftp/sessions/x"), 405)
        self.assertError(self.request("DELETE", "/sftp/sessions/a/b"), 404, "no such endpoint")


class DrainTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.connections = set()

    def test_nothingOpen(self):
        self.successResultOf(drain(self.connections, self.clock, 10))

    def test_idleAndUnauthenticatedEndedAtOnce(self):
        idle = Session(self.clock, connections=self.connections)
        self.clock.advance(5)
        busy = Session(self.clock, connections=self.connections)
        stranger = Session(self.clock, loggedIn=False, connections=self.connections)
        d = drain(self.connections, self.clock, 10)
        self.assertEqual(idle.disconnects, [(DISCONNECT_BY_APPLICATION, SHUTTING_DOWN.encode())])
        self.assertEqual(len(stranger.disconnects), 1)
        self.assertEqual(busy.disconnects, [])
        # The transfer goes on for 3 s, then the client falls quiet.
        for _ in range(12):
            busy.lastHeard = self.clock.seconds()
            self.clock.advance(0.25)
        self.assertEqual(busy.disconnects, [])
        self.assertNoResult(d)
        self.clock.advance(1.0)
        self.assertEqual(len(busy.disconnects), 1)
        self.successResultOf(d)

    def test_stuckEndedAfterGrace(self):
        stuck = Session(self.clock, connections=self.connections)
        d = drain(self.connections, self.clock, 2)
        while self.clock.seconds() < 1.7:
            stuck.lastHeard = self.clock.seconds()
            self.clock.advance(0.25)
        self.assertEqual(stuck.disconnects, [])
        stuck.lastHeard = self.clock.seconds()
        self.clock.advance(0.25)
        self.assertEqual(len(stuck.disconnects), 1)
        self.successResultOf(d)

    def test_neverClosingIsAborted(self):
        """
        A connection that does not close after its goodbye is aborted, and
        the drain ends all the same.
        """
        stuck = Session(self.clock, connections=self.connections)
        stuck.connections = None  # sendDisconnect does not close it
        self.clock.advance(2)
        d = drain(self.connections, self.clock, 1)
        self.assertEqual(len(stuck.disconnects), 1)
        self.clock.advance(ABORT_AFTER)
        self.assertTrue(stuck.transport.disconnected)
        self.clock.pump([0.25] * 20)
        self.successResultOf(d)
        self.assertEqual(len(stuck.disconnects), 1)
