"""
Bandwidth limits: one token bucket per container and direction, shared by all
the container's sessions and protocols.

A limit delays, never drops: a session channel (L{lightd_conch.ssh}) spends
from the bucket what it sends or receives, and while the bucket is in debt it
sends nothing more (uploads: it keeps the client's window shut), then goes on
when the debt is paid.  The rate is read from the container's policy at every
call, so a change applies at once.
"""

from __future__ import annotations

BURST_SECONDS = 0.25
"""How much unused rate a bucket keeps: a quarter of a second's worth, so a
session that was idle does not then send a long burst above the limit."""

MIN_BURST = 64 * 1024
"""Never less than this (one or two SSH packets), so a low rate still moves
whole packets."""


class TokenBucket:
    """
    Bytes one container may move in one direction.

    @ivar level: the bytes that may be moved now; negative while in debt.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self.level = 0.0
        self._stamp = clock.seconds()

    def _refill(self, rate: int) -> None:
        now = self._clock.seconds()
        elapsed, self._stamp = now - self._stamp, now
        burst = max(rate * BURST_SECONDS, MIN_BURST)
        self.level = min(burst, self.level + elapsed * rate)

    def spend(self, rate: int, size: int) -> None:
        """
        Count C{size} bytes moved at C{rate} bytes per second (0: no limit).
        """
        if rate:
            self._refill(rate)
            self.level -= size

    def wait(self, rate: int) -> float:
        """
        The seconds until the bucket is out of debt at C{rate}: 0 if more
        may move now.
        """
        if not rate:
            return 0.0
        self._refill(rate)
        return 0.0 if self.level >= 0 else -self.level / rate
