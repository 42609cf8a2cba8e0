"""
Tests for L{lightd_conch.metrics} and C{GET /metrics}: the page parses with
prometheus-client's own parser and shows what was counted.
"""

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lightd_conch.metrics import Metrics, ReactorLagMonitor

from .test_api import TOKEN, APITestCase


def samples(text):
    """
    {(sample name, sorted labels): value} of an exposition.
    """
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class FakeSession:
    def __init__(self, bytesIn=0, bytesOut=0):
        self.bytesIn = bytesIn
        self.bytesOut = bytesOut


class MetricsTests(TestCase):
    def test_counted(self):
        metrics = Metrics()
        first, second = FakeSession(), FakeSession()
        metrics.loginSucceeded(first, "password")
        metrics.loginSucceeded(second, "password")
        metrics.loginFailed("password")
        metrics.loginFailed("publickey")
        first.bytesIn, first.bytesOut = 100, 2000
        second.bytesIn = 5
        metrics.sessionEnded(first)
        metrics.sessionEnded(first)  # once only
        metrics.sftpRequests[3] += 2
        metrics.sftpRequests[6] += 10
        metrics.sftpRequests[99] += 1
        metrics.connectionRefused("banned")
        metrics.connectionRefused("max_startups")
        metrics.banned()
        metrics.quotaUsed = lambda: {"web": 4096}
        metrics.reactorLag(0.003)
        metrics.reactorLag(0.2)
        found = samples(metrics.exposition().decode())
        expected = {
            ("lightd_sftp_logins_total", (("method", "password"), ("result", "ok"))): 2,
            ("lightd_sftp_logins_total", (("method", "password"), ("result", "failed"))): 1,
            ("lightd_sftp_logins_total", (("method", "publickey"), ("result", "failed"))): 1,
            ("lightd_sftp_sessions", ()): 1,
            # The ended session's bytes stay; the live one's are read now.
            ("lightd_sftp_bytes_in_total", ()): 105,
            ("lightd_sftp_bytes_out_total", ()): 2000,
            ("lightd_sftp_requests_total", (("type", "open"),)): 2,
            ("lightd_sftp_requests_total", (("type", "write"),)): 10,
            ("lightd_sftp_requests_total", (("type", "unknown_99"),)): 1,
            ("lightd_sftp_refused_connections_total", (("reason", "banned"),)): 1,
            ("lightd_sftp_refused_connections_total", (("reason", "max_startups"),)): 1,
            ("lightd_sftp_bans_total", ()): 1,
            ("lightd_sftp_quota_used_bytes", (("container", "web"),)): 4096,
            ("lightd_sftp_reactor_lag_seconds_count", ()): 2,
            ("lightd_sftp_reactor_lag_seconds_bucket", (("le", "0.005"),)): 1,
            ("lightd_sftp_reactor_lag_seconds_bucket", (("le", "0.25"),)): 2,
            ("lightd_sftp_reactor_lag_seconds_bucket", (("le", "+Inf"),)): 2,
        }
        for key, value in expected.items():
            self.assertEqual(found.get(key), value, key)
        self.assertAlmostEqual(found[("lightd_sftp_reactor_lag_seconds_sum", ())], 0.203)

    def test_ownRegistry(self):
        """
        Two services in one process count apart.
        """
        one, two = Metrics(), Metrics()
        one.banned()
        self.assertEqual(samples(two.exposition().decode())[("lightd_sftp_bans_total", ())], 0)
        self.assertNotIn(b"python_gc", one.exposition())


class ReactorLagTests(TestCase):
    def test_lateTimer(self):
        """
        The monitor records how much later than due its timer ran.
        """
        clock = Clock()
        metrics = Metrics()
        monitor = ReactorLagMonitor(metrics, clock, interval=1.0)
        monitor.startService()
        clock.advance(1.0)
        self.assertEqual(metrics.lastLag, 0.0)
        # A reactor busy for 0.3 s runs the next call late.
        clock.advance(1.3)
        self.assertAlmostEqual(metrics.lastLag, 0.3)
        monitor.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class MetricsAPITests(APITestCase):
    def setUp(self):
        super().setUp()
        self.metrics = Metrics()
        self.api._metrics = self.metrics

    def test_page(self):
        self.metrics.loginFailed("password")
        request = self.request("GET", "/metrics")
        self.assertEqual(request.responseCode or 200, 200)
        self.assertEqual(
            request.responseHeaders.getRawHeaders(b"content-type"),
            [b"text/plain; version=0.0.4; charset=utf-8"],
        )
        found = samples(b"".join(request.written).decode())
        self.assertEqual(
            found[("lightd_sftp_logins_total", (("method", "password"), ("result", "failed")))], 1
        )

    def test_tokenNeeded(self):
        self.assertError(self.request("GET", "/metrics", token=None), 401, "missing bearer token")
        self.assertError(self.request("GET", "/metrics", token=TOKEN + "x"), 401)

    def test_onlyGet(self):
        self.assertError(self.request("POST", "/metrics"), 405)
