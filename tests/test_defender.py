"""
Tests for L{lightd_conch.defender}: scoring, bans and their growth, the safe
list and the unauthenticated-connection limits, with a Clock.
"""

import ipaddress

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import formatEvent, globalLogPublisher
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lightd_conch._address import addressIn
from lightd_conch.defender import Defender, StartupLimiter
from lightd_conch.ssh import SSHFactory

from .test_ssh import hostKey, settings


class DefenderTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.defender = Defender(
            self.clock, threshold=15, observationTime=1800, banTime=1800,
            safeList=["10.0.0.0/8", "::1"],
        )

    def fail(self, host="192.0.2.1", known=True, times=1):
        for _ in range(times):
            self.defender.failedLogin(host, knownUser=known)

    def test_knownUserScoresOne(self):
        self.fail(times=14)
        self.assertFalse(self.defender.isBanned("192.0.2.1"))
        self.fail()
        self.assertTrue(self.defender.isBanned("192.0.2.1"))
        self.assertFalse(self.defender.isBanned("192.0.2.2"))

    def test_unknownUserScoresTwo(self):
        self.fail(known=False, times=7)
        self.assertFalse(self.defender.isBanned("192.0.2.1"))
        self.fail(known=False)
        self.assertTrue(self.defender.isBanned("192.0.2.1"))

    def test_observationWindow(self):
        self.fail(times=14)
        self.clock.advance(1800)
        self.fail()
        self.assertFalse(self.defender.isBanned("192.0.2.1"))

    def test_banExpiresAndGrows(self):
        self.fail(times=15)
        self.clock.advance(1799)
        self.assertTrue(self.defender.isBanned("192.0.2.1"))
        self.clock.advance(1)
        self.assertFalse(self.defender.isBanned("192.0.2.1"))
        self.fail(times=15)
        self.clock.advance(2699)
        self.assertTrue(self.defender.isBanned("192.0.2.1"))
        self.clock.advance(1)
        self.assertFalse(self.defender.isBanned("192.0.2.1"))
        self.fail(times=15)
        self.clock.advance(4049)
        self.assertTrue(self.defender.isBanned("192.0.2.1"))
        self.clock.advance(1)
        self.assertFalse(self.defender.isBanned("192.0.2.1"))

    def test_safeList(self):
        for host in ("10.1.2.3", "::1"):
            self.fail(host, known=False, times=100)
            self.assertFalse(self.defender.isBanned(host))

    def test_disabled(self):
        self.defender.enabled = False
        self.fail(times=100)
        self.assertFalse(self.defender.isBanned("192.0.2.1"))

    def test_quietAddressesForgotten(self):
        for i in range(2000):
            self.fail("198.51.%d.%d" % (i // 256, i % 256))
        self.clock.advance(1801)
        self.fail("203.0.113.1", times=1024)
        self.assertLessEqual(len(self.defender), 1024)


class StartupLimiterTests(TestCase):
    def test_limits(self):
        limiter = StartupLimiter(maxStartups=3, maxPerSource=2)
        self.assertIsNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("a"))
        self.assertIsNotNone(limiter.acquire("a"))
        self.assertIsNone(limiter.acquire("b"))
        self.assertIsNotNone(limiter.acquire("c"))
        limiter.release("a")
        self.assertIsNone(limiter.acquire("c"))


class FactoryAdmissionTests(TestCase):
    """
    The factory refuses banned and over-limit addresses before key exchange.
    """

    def factory(self, **kwargs):
        clock = Clock()
        factory = SSHFactory(None, hostKey(), settings(**kwargs), clock)
        factory.startFactory()
        return clock, factory

    def test_bannedRefused(self):
        clock, factory = self.factory()
        for _ in range(15):
            factory.defender.failedLogin("192.0.2.9", knownUser=True)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5)))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 5)))
        clock.advance(1800)
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5)))

    def test_startupsPerSource(self):
        clock, factory = self.factory(max_startups_per_ip=2, max_startups=3)
        address = IPv4Address("TCP", "192.0.2.9", 5)
        first = factory.buildProtocol(address)
        self.assertIsNotNone(factory.buildProtocol(address))
        self.assertIsNone(factory.buildProtocol(address))
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 5)))
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.11", 5)))
        # A login frees the slot.
        first._releaseStartup()
        self.assertIsNotNone(factory.buildProtocol(address))


def networks(*texts):
    return tuple(ipaddress.ip_network(t) for t in texts)


class AllowListTests(TestCase):
    """
    C{sftp.allowed_ips}: other addresses are closed before anything is sent, and logged once a
    minute per address at most.
    """

    def test_addressIn(self):
        allowed = networks("192.0.2.0/24", "2001:db8::/32")
        for host in ("192.0.2.7", "::ffff:192.0.2.7", "2001:db8::5", "2001:db8::5%eth0"):
            self.assertTrue(addressIn(host, allowed), host)
        for host in ("192.0.3.1", "::ffff:192.0.3.1", "2001:db9::1", "::1", "x", ""):
            self.assertFalse(addressIn(host, allowed), host)
        # An IPv4 client seen through a dual-stack listener, or a mapped network.
        self.assertTrue(addressIn("::ffff:127.0.0.1", networks("127.0.0.0/8")))
        self.assertTrue(addressIn("127.0.0.1", networks("::ffff:127.0.0.0/104")))
        self.assertFalse(addressIn("127.0.0.1", networks("::1/128")))

    def test_refusedAndLoggedOnceAMinute(self):
        clock = Clock()
        factory = SSHFactory(
            None, hostKey(), settings(allowed_ips=networks("127.0.0.1/32", "::1/128")), clock
        )
        factory.startFactory()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.assertIsNotNone(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5)))
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", "::1", 5)))
        self.assertIsNotNone(factory.buildProtocol(IPv6Address("TCP", "::ffff:127.0.0.1", 5)))
        for _ in range(5):
            self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5)))
        self.assertIsNone(factory.buildProtocol(IPv6Address("TCP", "2001:db8::1", 5)))

        def refusals():
            return [formatEvent(e) for e in events if "not in sftp.allowed_ips" in formatEvent(e)]

        self.assertEqual(len(refusals()), 2)
        self.assertIn("192.0.2.9", refusals()[0])
        clock.advance(59)
        factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5))
        self.assertEqual(len(refusals()), 2)
        clock.advance(1)
        factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 5))
        self.assertEqual(len(refusals()), 3)
        # A refused address does not count as an unauthenticated connection.
        self.assertEqual(factory.startups._perSource.get("192.0.2.9"), None)
