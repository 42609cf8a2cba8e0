"""
The service's metrics, as C{GET /metrics} shows them in Prometheus' text
format.

The code that counts bumps plain integers on L{Metrics} (a dict item or an
attribute: the transfer path pays no lock and no call); a collector of our
own reads them when the page is asked for, into a registry of our own, so
nothing else in the process (or a second service in a test) mixes in.
prometheus-client renders and parses the format.
"""

from __future__ import annotations

import collections

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from twisted.application.service import Service
from twisted.internet.task import LoopingCall

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

# SFTP v3 packet types, by the names of draft-ietf-secsh-filexfer-02.
SFTP_REQUEST_NAMES = {
    1: "init",
    3: "open",
    4: "close",
    5: "read",
    6: "write",
    7: "lstat",
    8: "fstat",
    9: "setstat",
    10: "fsetstat",
    11: "opendir",
    12: "readdir",
    13: "remove",
    14: "mkdir",
    15: "rmdir",
    16: "realpath",
    17: "stat",
    18: "rename",
    19: "readlink",
    20: "symlink",
    200: "extended",
}

# Why a connection was closed before its key exchange (the reasons of
# lightd_conch.defender.StartupLimiter, and bans).
REFUSED_BANNED = "banned"
REFUSED_MAX_STARTUPS = "max_startups"
REFUSED_MAX_STARTUPS_PER_IP = "max_startups_per_ip"

# Seconds; a reactor late by more than a few milliseconds is a stalled
# transfer for every session.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LAG_INTERVAL = 1.0


class Metrics:
    """
    Counters of one service.

    @ivar sftpRequests: SFTP packets received, by packet type; the SFTP
        server adds to it (L{lightd_conch.sftp.SFTPServer.requestCounts}).
    @ivar quotaUsed: returns the bytes used per container id, for the
        containers whose quota is counted.
    """

    def __init__(self) -> None:
        self.logins = collections.Counter()  # (method, result) -> count
        self.refused = collections.Counter()  # reason -> count
        self.bans = 0
        self.sftpRequests = collections.Counter()
        self.quotaUsed = dict
        self._live = set()
        self._endedBytesIn = 0
        self._endedBytesOut = 0
        self._lagCounts = [0] * len(LAG_BUCKETS)
        self._lagCount = 0
        self._lagSum = 0.0
        self.lastLag = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    # -- what the service reports ---------------------------------------------

    def loginSucceeded(self, session, method: str) -> None:
        """
        C{session} (a transport with C{bytesIn} and C{bytesOut}) logged in.
        """
        self.logins[(method, "ok")] += 1
        self._live.add(session)

    def loginFailed(self, method: str) -> None:
        self.logins[(method, "failed")] += 1

    def sessionEnded(self, session) -> None:
        if session in self._live:
            self._live.discard(session)
            self._endedBytesIn += session.bytesIn
            self._endedBytesOut += session.bytesOut

    def connectionRefused(self, reason: str) -> None:
        self.refused[reason] += 1

    def banned(self) -> None:
        self.bans += 1

    def reactorLag(self, seconds: float) -> None:
        self.lastLag = seconds
        self._lagCount += 1
        self._lagSum += seconds
        for index, bound in enumerate(LAG_BUCKETS):
            if seconds <= bound:
                self._lagCounts[index] += 1
                break

    # -- what a scrape reads --------------------------------------------------

    def liveSessions(self) -> int:
        return len(self._live)

    def bytesIn(self) -> int:
        return self._endedBytesIn + sum(session.bytesIn for session in self._live)

    def bytesOut(self) -> int:
        return self._endedBytesOut + sum(session.bytesOut for session in self._live)

    def lagHistogram(self) -> "tuple[list, float]":
        buckets, running = [], 0
        for bound, count in zip(LAG_BUCKETS, self._lagCounts):
            running += count
            buckets.append((repr(bound), running))
        buckets.append(("+Inf", self._lagCount))
        return buckets, self._lagSum

    def exposition(self) -> bytes:
        """
        The text a Prometheus server scrapes.
        """
        return generate_latest(self.registry)


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self):
        m = self._metrics
        logins = CounterMetricFamily(
            "lightd_sftp_logins",
            "SSH logins, by authentication method and result (ok or failed).",
            labels=["method", "result"],
        )
        for (method, result), count in sorted(m.logins.items()):
            logins.add_metric([method, result], count)
        yield logins
        yield GaugeMetricFamily(
            "lightd_sftp_sessions", "Sessions logged in now.", value=m.liveSessions()
        )
        yield CounterMetricFamily(
            "lightd_sftp_bytes_in",
            "Channel data received from clients, in bytes.",
            value=m.bytesIn(),
        )
        yield CounterMetricFamily(
            "lightd_sftp_bytes_out",
            "Channel data sent to clients, in bytes.",
            value=m.bytesOut(),
        )
        requests = CounterMetricFamily(
            "lightd_sftp_requests",
            "SFTP requests received, by packet type.",
            labels=["type"],
        )
        for kind, count in sorted(m.sftpRequests.items()):
            requests.add_metric([SFTP_REQUEST_NAMES.get(kind, f"unknown_{kind}")], count)
        yield requests
        refused = CounterMetricFamily(
            "lightd_sftp_refused_connections",
            "Connections closed before the key exchange, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(m.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "lightd_sftp_bans",
            "Addresses banned after repeated failed logins.",
            value=m.bans,
        )
        quota = GaugeMetricFamily(
            "lightd_sftp_quota_used_bytes",
            "Bytes used by each container's volume, where a quota counts them.",
            labels=["container"],
        )
        for container, used in sorted(m.quotaUsed().items()):
            quota.add_metric([container], used)
        yield quota
        buckets, total = m.lagHistogram()
        yield HistogramMetricFamily(
            "lightd_sftp_reactor_lag_seconds",
            "How late the reactor ran a timer due every second.",
            buckets=buckets,
            sum_value=total,
        )


class ReactorLagMonitor(Service):
    """
    Every L{LAG_INTERVAL} seconds on C{clock}, measures how much later than
    asked the reactor ran the call: the time a busy reactor keeps every
    session waiting.
    """

    def __init__(self, metrics: Metrics, clock, interval: float = LAG_INTERVAL) -> None:
        self._metrics = metrics
        self._clock = clock
        self._interval = interval
        self._loop = None
        self._due = None

    def startService(self) -> None:
        super().startService()
        self._due = self._clock.seconds() + self._interval
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop.start(self._interval, now=False)

    def _tick(self) -> None:
        now = self._clock.seconds()
        self._metrics.reactorLag(max(0.0, now - self._due))
        self._due = now + self._interval

    def stopService(self):
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        return super().stopService()
