"""
The login checks' queue: its threads, its fair order and its bound.
"""

import bcrypt
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lightd_conch.checkqueue import CheckRefused, FairCheckQueue, bcryptThreads
from lightd_conch.cred import PasswordChecker
from lightd_conch.defender import UnknownUser
from lightd_conch.store import Credential
from lightd_conch.testing import MemoryCredentialStore


class _Reactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class _HeldPool:
    """
    A thread pool whose work runs only when the test says, in order given.
    """

    def __init__(self):
        self.held = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.held.append((onResult, f, args, kwargs))

    def runOne(self):
        onResult, f, args, kwargs = self.held.pop(0)
        try:
            result = f(*args, **kwargs)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class ThreadsTests(TestCase):
    def test_oneThreadPerCoreOfTheWorker(self):
        self.assertEqual(bcryptThreads(1), 1)
        self.assertEqual(bcryptThreads(2), 2)
        self.assertEqual(bcryptThreads(16), 16)
        self.assertEqual(bcryptThreads(16, workers=8), 2)
        self.assertEqual(bcryptThreads(3, workers=2), 2)
        self.assertEqual(bcryptThreads(2, workers=8), 1)
        self.assertEqual(bcryptThreads(0), 1)


class FairCheckQueueTests(TestCase):
    def setUp(self):
        self.pool = _HeldPool()
        self.started = []

    def queue(self, threads=2, waitingPerThread=32):
        return FairCheckQueue(_Reactor(), self.pool, threads, waitingPerThread)

    def check(self, queue, source, name, connection=None):
        results = []
        d = queue.submit(source, connection, self.started.append, name)
        d.addBoth(results.append)
        return results

    def test_atMostOneCheckPerThreadInThePool(self):
        queue = self.queue(threads=2)
        for i in range(5):
            self.check(queue, "10.0.0.1", i, connection=object())
        self.assertEqual(len(self.pool.held), 2)
        self.assertEqual((queue.running, queue.waiting), (2, 3))
        self.pool.runOne()
        self.assertEqual(len(self.pool.held), 2)
        self.assertEqual((queue.running, queue.waiting), (2, 2))
        while self.pool.held:
            self.pool.runOne()
        self.assertEqual(self.started, [0, 1, 2, 3, 4])
        self.assertEqual((queue.running, queue.waiting), (0, 0))

    def test_aFloodDoesNotPassAnotherAddress(self):
        queue = self.queue(threads=2)
        for i in range(50):
            self.check(queue, "10.0.0.66", f"flood {i}", connection=object())
        login = self.check(queue, "10.0.0.7", "login", connection=object())
        # Handed to the pool as the second thread frees: behind the two
        # flood checks running and at most one more flood check.
        for _ in range(4):
            self.pool.runOne()
        self.assertEqual(self.started, ["flood 0", "flood 1", "flood 2", "login"])
        while self.pool.held:
            self.pool.runOne()
        self.assertEqual(login, [None])
        self.assertEqual(len(self.started), 51)

    def test_roundRobinByAddress(self):
        queue = self.queue(threads=1)
        self.check(queue, "a", "a0")
        for i in range(1, 4):
            self.check(queue, "a", f"a{i}")
        for i in range(2):
            self.check(queue, "b", f"b{i}")
        self.check(queue, "c", "c0")
        while self.pool.held:
            self.pool.runOne()
        self.assertEqual(self.started, ["a0", "a1", "b0", "c0", "a2", "b1", "a3"])

    def test_boundRefusesTheOldestOfTheBusiestAddress(self):
        queue = self.queue(threads=1, waitingPerThread=4)
        results = [self.check(queue, "flood", f"f{i}") for i in range(5)]
        self.assertEqual((queue.running, queue.waiting), (1, 4))
        login = self.check(queue, "other", "login")
        # f0 runs; f1 was the oldest waiting of the address with the most.
        self.assertEqual(queue.waiting, 4)
        self.assertEqual(results[1][0].type, CheckRefused)
        self.assertTrue(issubclass(CheckRefused, UnauthorizedLogin))
        more = self.check(queue, "flood", "f5")
        self.assertEqual(results[2][0].type, CheckRefused)
        while self.pool.held:
            self.pool.runOne()
        self.assertEqual(self.started, ["f0", "f3", "login", "f4", "f5"])
        self.assertEqual(login, [None])
        self.assertEqual(more, [None])

    def test_oneWaitingCheckPerConnection(self):
        queue = self.queue(threads=1)
        first, second = object(), object()
        self.check(queue, "a", "running", connection=first)
        # Its check is running, not waiting: one more may wait.
        waiting = self.check(queue, "a", "waiting", connection=first)
        refused = self.check(queue, "a", "refused", connection=first)
        other = self.check(queue, "a", "other", connection=second)
        self.assertEqual(refused[0].type, CheckRefused)
        while self.pool.held:
            self.pool.runOne()
        self.assertEqual(self.started, ["running", "waiting", "other"])
        self.assertEqual((waiting, other), ([None], [None]))

    def test_aGoneConnectionsCheckIsNotMade(self):
        queue = self.queue(threads=1)
        gone = object()
        self.check(queue, "a", "first")
        answer = self.check(queue, "b", "gone", connection=gone)
        self.check(queue, "c", "last")
        queue.forget(gone)
        queue.forget(object())
        while self.pool.held:
            self.pool.runOne()
        self.assertEqual(self.started, ["first", "last"])
        self.assertEqual(answer, [])
        self.assertEqual(queue.waiting, 0)


class PasswordCheckerQueueTests(TestCase):
    """
    Known and unknown users take the same path: one turn in the queue, one
    hash in the pool.
    """

    def setUp(self):
        self.pool = _HeldPool()
        self.queue = FairCheckQueue(_Reactor(), self.pool, 1)
        store = MemoryCredentialStore()
        store.put(Credential("c1", "alice", bcrypt.hashpw(b"right", bcrypt.gensalt(4)), 1, 1))
        self.checker = PasswordChecker(store, self.queue, 4)

    def login(self, username, password, source):
        credentials = UsernamePassword(username, password)
        credentials.source = source
        credentials.connection = object()
        results = []
        self.checker.requestAvatarId(credentials).addBoth(results.append)
        return results

    def test_unknownUsersWaitAndHashLikeKnownOnes(self):
        known = self.login(b"alice", b"wrong", "10.0.0.1")
        unknown = self.login(b"nobody", b"wrong", "10.0.0.1")
        right = self.login(b"alice", b"right", "10.0.0.2")
        self.assertEqual((self.queue.running, self.queue.waiting), (1, 2))
        self.assertEqual((known, unknown, right), ([], [], []))
        self.pool.runOne()
        self.assertEqual(known[0].type, UnauthorizedLogin)
        self.assertEqual((unknown, right), ([], []))
        self.pool.runOne()
        self.assertEqual(unknown[0].type, UnknownUser)
        self.assertEqual(right, [])
        self.pool.runOne()
        self.assertEqual(right, ["c1"])
