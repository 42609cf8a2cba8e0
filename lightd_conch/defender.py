"""
The brute-force defender and the limits on unauthenticated connections.

Plain logic with an injected clock: the SSH factory asks L{Defender.admits}
before it builds a transport for a new connection, and reports each failed
login with L{Defender.failedLogin}.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Deque, Dict, Iterable, Optional, Tuple

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()

KNOWN_USER_POINTS = 1
UNKNOWN_USER_POINTS = 2
BAN_GROWTH = 1.5
_PRUNE_EVERY = 1024


class UnknownUser(UnauthorizedLogin):
    """
    A failed login for a username that does not exist, which scores higher.
    """


class _Host:
    __slots__ = ("events", "score", "bannedUntil", "bans", "forgetAt")

    def __init__(self) -> None:
        self.events: Deque[Tuple[float, int]] = deque()
        self.score = 0
        self.bannedUntil = 0.0
        self.bans = 0
        self.forgetAt = 0.0


class Defender:
    """
    Scores failed logins per source address and bans addresses that reach
    the threshold within the observation time.

    Each ban of the same address lasts L{BAN_GROWTH} times the one before.
    An address's ban history is forgotten once it has been quiet for an
    observation time after its last ban ended.
    """

    def __init__(
        self,
        clock: IReactorTime,
        threshold: int = 15,
        observationTime: float = 1800,
        banTime: float = 1800,
        safeList: Iterable = (),
        enabled: bool = True,
    ) -> None:
        self._clock = clock
        self.threshold = threshold
        self.observationTime = observationTime
        self.banTime = banTime
        self.enabled = enabled
        self._safe = tuple(ipaddress.ip_network(n, strict=False) for n in safeList)
        self._hosts: Dict[str, _Host] = {}
        self._sincePrune = 0

    @classmethod
    def fromConfig(cls, clock: IReactorTime, config) -> "Defender":
        return cls(
            clock,
            threshold=config.threshold,
            observationTime=config.observation_time,
            banTime=config.ban_time,
            safeList=config.safe_list,
            enabled=config.enabled,
        )

    def _isSafe(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._safe)

    def isBanned(self, host: str) -> bool:
        entry = self._hosts.get(host)
        return entry is not None and entry.bannedUntil > self._clock.seconds()

    def failedLogin(self, host: str, knownUser: bool) -> None:
        """
        Score one failed login from C{host}; ban it if that reaches the
        threshold.
        """
        if not self.enabled or self._isSafe(host):
            return
        now = self._clock.seconds()
        self._prune(now)
        entry = self._hosts.get(host)
        if entry is None:
            entry = self._hosts[host] = _Host()
        points = KNOWN_USER_POINTS if knownUser else UNKNOWN_USER_POINTS
        entry.events.append((now, points))
        entry.score += points
        self._expire(entry, now)
        entry.forgetAt = max(entry.forgetAt, now + self.observationTime)
        if entry.score >= self.threshold and entry.bannedUntil <= now:
            duration = self.banTime * BAN_GROWTH**entry.bans
            entry.bans += 1
            entry.bannedUntil = now + duration
            entry.events.clear()
            entry.score = 0
            entry.forgetAt = entry.bannedUntil + self.observationTime
            log.warn(
                "banned {host} for {seconds:.0f} s after repeated failed logins"
                " (ban number {count})",
                host=host,
                seconds=duration,
                count=entry.bans,
            )

    def _expire(self, entry: _Host, now: float) -> None:
        events = entry.events
        while events and events[0][0] <= now - self.observationTime:
            entry.score -= events.popleft()[1]

    def _prune(self, now: float) -> None:
        # Forget quiet addresses now and then, so a scan from many addresses
        # cannot grow this table for ever.
        self._sincePrune += 1
        if self._sincePrune < _PRUNE_EVERY:
            return
        self._sincePrune = 0
        for host in [h for h, e in self._hosts.items() if e.forgetAt <= now]:
            del self._hosts[host]

    def __len__(self) -> int:
        return len(self._hosts)


class StartupLimiter:
    """
    Counts connections that have not yet logged in, in all and per source
    address, like OpenSSH's MaxStartups and PerSourceMaxStartups.
    """

    def __init__(self, maxStartups: int, maxPerSource: int) -> None:
        self.maxStartups = maxStartups
        self.maxPerSource = maxPerSource
        self._total = 0
        self._perSource: Dict[str, int] = {}

    def acquire(self, host: str) -> Optional[str]:
        """
        Count a new unauthenticated connection from C{host}, or return why it
        is refused.
        """
        if self._total >= self.maxStartups:
            return "too many unauthenticated connections"
        if self._perSource.get(host, 0) >= self.maxPerSource:
            return "too many unauthenticated connections from this address"
        self._total += 1
        self._perSource[host] = self._perSource.get(host, 0) + 1
        return None

    def release(self, host: str) -> None:
        self._total -= 1
        left = self._perSource[host] - 1
        if left:
            self._perSource[host] = left
        else:
            del self._perSource[host]
