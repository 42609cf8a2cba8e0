"""
What the service keeps of each container between its sessions: the policy
its live sessions obey (as last read from the store), its quota usage and
its bandwidth buckets.

Every per-login volume of a container holds that container's
L{ContainerState}; the session watcher (L{lightd_conch.sessions}) refreshes
its policy from the store, so a change made by the API or the CLI reaches
live sessions within a second.  L{IContainerStates} is the seam where a later
process model can share these figures between processes;
L{MemoryContainerStates} keeps them in this one.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List

from twisted.logger import Logger
from zope.interface import Interface, implementer

from .bandwidth import TokenBucket
from .policy import Policy
from .quota import QuotaUsage

log = Logger()


class _MonotonicClock:
    @staticmethod
    def seconds() -> float:
        return time.monotonic()


class ContainerState:
    """
    One container's live figures.

    @ivar policy: the L{Policy} its sessions obey now.
    @ivar quota: its L{QuotaUsage}.
    @ivar up: the L{TokenBucket} of what its sessions receive (uploads).
    @ivar down: the L{TokenBucket} of what its sessions send (downloads).
    @ivar writers: its files open for writing through the service, by
        (st_dev, st_ino): the open file that holds each one's write lock.
    @ivar watchers: what to call with the new policy when it changes (the
        protocols whose work is checked once, when it starts).
    """

    __slots__ = ("containerId", "policy", "quota", "up", "down", "writers", "watchers")

    def __init__(self, containerId: str, policy: Policy = Policy(), clock=None) -> None:
        clock = _MonotonicClock() if clock is None else clock
        self.containerId = containerId
        self.policy = policy
        self.quota = QuotaUsage()
        self.up = TokenBucket(clock)
        self.down = TokenBucket(clock)
        self.writers: Dict[tuple, object] = {}
        self.watchers: List[Callable[[Policy], None]] = []

    def setPolicy(self, policy: Policy) -> None:
        """
        Make C{policy} the one its sessions obey, and tell the watchers if it
        changed.  A watcher that fails is logged; the others are still told.
        """
        changed = policy != self.policy
        self.policy = policy
        if not changed:
            return
        for watcher in list(self.watchers):
            try:
                watcher(policy)
            except Exception:
                log.failure("a policy watcher of container {container} failed",
                            container=self.containerId)


class IContainerStates(Interface):
    def get(containerId: str) -> ContainerState:
        """
        The state of C{containerId}, made with the default policy if new.
        """

    def update(containerId: str, policy: Policy) -> ContainerState:
        """
        Make C{policy} the one the sessions of C{containerId} obey.
        """

    def known() -> "list[str]":
        """
        The ids of the containers that have a state.
        """


@implementer(IContainerStates)
class MemoryContainerStates:
    """
    @param clock: the reactor's time, for the bandwidth buckets.
    """

    def __init__(self, clock=None) -> None:
        self._clock = clock
        self._states: Dict[str, ContainerState] = {}

    def get(self, containerId: str) -> ContainerState:
        state = self._states.get(containerId)
        if state is None:
            state = self._states[containerId] = ContainerState(
                containerId, clock=self._clock
            )
        return state

    def update(self, containerId: str, policy: Policy) -> ContainerState:
        state = self.get(containerId)
        if policy.quota_bytes and not state.policy.quota_bytes:
            # Writes went uncounted while there was no quota.
            state.quota.forget()
        state.setPolicy(policy)
        return state

    def known(self) -> "list[str]":
        return list(self._states)

    def quotaUsed(self) -> "dict[str, int]":
        """
        The bytes used by each container whose quota usage is counted.
        """
        return {
            containerId: state.quota.used
            for containerId, state in self._states.items()
            if state.policy.quota_bytes and state.quota.used is not None
        }
