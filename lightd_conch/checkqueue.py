"""
The queue of login checks waiting for the check threads.

Password checks cost a bcrypt hash each, a CPU-bound piece of work run off
the reactor thread.  L{FairCheckQueue} hands them to a pool of
L{bcryptThreads} threads, at most one per thread at a time, and keeps the
rest waiting, served round-robin by source address: a flood of wrong
passwords from one address, over any number of connections, waits behind
itself, and a login from another address waits for at most one check of
each address ahead of it.  The waiting checks are bounded; a check the queue
cannot keep fails with L{CheckRefused}, which the login answers and scores as
a wrong password.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict, deque
from typing import Deque, Dict

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

# Waiting checks per pool thread: under two seconds of work at bcrypt cost 10.
WAITING_PER_THREAD = 32


class CheckRefused(UnauthorizedLogin):
    """
    A check that was never made: too many checks were waiting, or the
    connection already had one waiting.  Answered as a wrong password.
    """


def usableCores() -> int:
    """
    The number of cores this process may run on.
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def bcryptThreads(cpus: int, workers: int = 1) -> int:
    """
    The check threads of one worker process: the cores shared out among the
    C{workers} processes, at least one.
    """
    return max(1, math.ceil(cpus / max(1, workers)))


class _Check:
    __slots__ = ("source", "connection", "work", "args", "deferred")

    def __init__(self, source, connection, work, args) -> None:
        self.source = source
        self.connection = connection
        self.work = work
        self.args = args
        self.deferred = defer.Deferred()


class FairCheckQueue:
    """
    Runs checks in C{threadPool}, at most C{threads} at a time, the others
    waiting their turn round-robin by source address.

    A connection has at most one check waiting; another from it is refused
    at once.  At most C{threads * waitingPerThread} checks wait: beyond that
    the address with the most waiting checks loses its oldest one, refused.

    All methods are called on the reactor thread.

    @ivar threads: how many checks run at once.
    @ivar limit: how many checks may wait.
    """

    def __init__(self, reactor, threadPool, threads: int, waitingPerThread: int = WAITING_PER_THREAD) -> None:
        self._reactor = reactor
        self._threadPool = threadPool
        self.threads = max(1, threads)
        self.limit = self.threads * waitingPerThread
        self._running = 0
        # Source address -> its waiting checks, oldest first; the address to
        # serve next is first.
        self._waiting: "OrderedDict[object, Deque[_Check]]" = OrderedDict()
        self._byConnection: Dict[object, _Check] = {}
        self._count = 0

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._count

    def submit(self, source, connection, work, *args) -> defer.Deferred:
        """
        Run C{work(*args)} in the pool when its turn comes.

        @param source: the client's address: checks wait per address.
        @param connection: what the check is for (the SSH transport), or
            None for no per-connection limit.
        @return: a Deferred of its result, or failing with L{CheckRefused}.
        """
        if connection is not None and connection in self._byConnection:
            return defer.fail(CheckRefused("this connection has a check waiting"))
        check = _Check(source, connection, work, args)
        if self._running < self.threads and not self._count:
            self._start(check)
            return check.deferred
        queue = self._waiting.get(source)
        if queue is None:
            queue = self._waiting[source] = deque()
        queue.append(check)
        self._count += 1
        if connection is not None:
            self._byConnection[connection] = check
        if self._count > self.limit:
            self._refuseOne()
        return check.deferred

    def forget(self, connection) -> None:
        """
        Drop the waiting check of a connection that has gone: nobody waits
        for its answer, so it is neither made nor answered.
        """
        check = self._byConnection.pop(connection, None)
        if check is None:
            return
        queue = self._waiting[check.source]
        queue.remove(check)
        self._count -= 1
        if not queue:
            del self._waiting[check.source]

    def _refuseOne(self) -> None:
        # The address with the most waiting checks (of those tied, the one to
        # be served soonest) loses its oldest.
        source = max(self._waiting, key=lambda s: len(self._waiting[s]))
        check = self._take(source, rotate=False)
        check.deferred.errback(CheckRefused("too many checks waiting"))

    def _take(self, source, rotate: bool = True) -> _Check:
        queue = self._waiting[source]
        check = queue.popleft()
        if queue:
            if rotate:
                self._waiting.move_to_end(source)
        else:
            del self._waiting[source]
        self._count -= 1
        if check.connection is not None:
            self._byConnection.pop(check.connection, None)
        return check

    def _start(self, check: _Check) -> None:
        self._running += 1
        d = deferToThreadPool(self._reactor, self._threadPool, check.work, *check.args)
        d.addBoth(self._finished)
        d.chainDeferred(check.deferred)

    def _finished(self, result):
        self._running -= 1
        while self._running < self.threads and self._count:
            self._start(self._take(next(iter(self._waiting))))
        return result
