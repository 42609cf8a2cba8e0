"""
Unit tests of what the per-login volume decides beyond the resolver: write
locks between its sessions, and the bandwidth buckets its channels spend.
"""

import errno
import os
import subprocess
import sys

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lightd_conch.bandwidth import MIN_BURST, TokenBucket
from lightd_conch.containers import ContainerState
from lightd_conch.volume import FileLocked, LoginOwner, Volume


class _Owner(LoginOwner):
    """A login that supersedes the owners it is told to, and records being ended."""

    def __init__(self, supersedes=()):
        self._supersedes = supersedes
        self.ended = []

    def supersedes(self, other):
        return other in self._supersedes

    def endStale(self, path):
        self.ended.append(path)


class WriteLockTests(TestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.path = os.path.join(self.root, "f")
        with open(self.path, "wb") as f:
            f.write(b"original")
        self.state = ContainerState("c")

    def volume(self, owner=None):
        volume = Volume.open(self.root, "c", state=self.state, owner=owner)
        self.addCleanup(volume.close)
        return volume

    def opened(self, volume, flags):
        opened = volume.openFile(b"/f", flags)
        self.addCleanup(lambda: _closeQuietly(opened))
        return opened

    def test_secondWriterRefused(self):
        first = self.opened(self.volume(), os.O_WRONLY)
        error = self.assertRaises(FileLocked, self.volume().openFile, b"/f", os.O_WRONLY)
        self.assertEqual(error.strerror, "file is locked by another writer")
        first.close()
        self.opened(self.volume(), os.O_WRONLY)

    def test_readersNeverBlocked(self):
        self.opened(self.volume(), os.O_WRONLY)
        reader = self.opened(self.volume(), os.O_RDONLY)
        self.assertEqual(reader.read(100, 0), b"original")

    def test_refusedTruncateLeavesTheFile(self):
        self.opened(self.volume(), os.O_WRONLY)
        self.assertRaises(FileLocked, self.volume().openFile, b"/f", os.O_WRONLY | os.O_TRUNC)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"original")

    def test_truncateOnceLocked(self):
        self.opened(self.volume(), os.O_WRONLY | os.O_TRUNC)
        self.assertEqual(os.path.getsize(self.path), 0)

    def test_createOrTruncate(self):
        """
        O_CREAT | O_TRUNC (what put asks for) empties a file that was there
        and makes a new one empty, and the new one is locked like any other.
        """
        self.opened(self.volume(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.assertEqual(os.path.getsize(self.path), 0)
        new = self.volume().openFile(b"/new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        self.addCleanup(lambda: _closeQuietly(new))
        self.assertEqual(os.path.getsize(os.path.join(self.root, "new")), 0)
        self.assertRaises(FileLocked, self.volume().openFile, b"/new", os.O_WRONLY)

    def test_containerProcessLockSeen(self):
        """
        A process of the container holding a POSIX lock keeps writers out,
        and a writer's lock is seen by the container's processes.
        """
        script = (
            "import fcntl, sys, time\n"
            "f = open(sys.argv[1], 'r+')\n"
            "fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n"
        )
        holder = subprocess.Popen(
            [sys.executable, "-c", script, self.path],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        self.addCleanup(holder.wait)
        self.addCleanup(holder.stdin.close)
        self.assertEqual(holder.stdout.readline().strip(), "locked")
        self.assertRaises(FileLocked, self.volume().openFile, b"/f", os.O_WRONLY)
        holder.stdin.close()
        holder.wait()

        self.opened(self.volume(), os.O_WRONLY)
        probe = subprocess.run(
            [sys.executable, "-c",
             "import fcntl, sys\n"
             "f = open(sys.argv[1], 'r+')\n"
             "try:\n"
             "    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError:\n"
             "    print('busy')\n",
             self.path],
            capture_output=True, text=True,
        )
        self.assertEqual(probe.stdout.strip(), "busy")

    def test_staleWriterSuperseded(self):
        """
        A login that supersedes the holder (the same user, same address,
        the holder silent) ends the holder's session and takes the lock;
        the holder's file is closed under it.
        """
        old = _Owner()
        holder = self.opened(self.volume(old), os.O_WRONLY)
        new = _Owner(supersedes=(old,))
        taken = self.opened(self.volume(new), os.O_WRONLY)
        self.assertEqual(old.ended, [b"/f"])
        self.assertEqual(
            self.assertRaises(OSError, holder.read, 1, 0).errno, errno.EBADF
        )
        taken.write(b"resumed", 0)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"resumedl")  # 7 bytes over 8

    def test_othersNotSuperseded(self):
        old = _Owner()
        self.opened(self.volume(old), os.O_WRONLY)
        self.assertRaises(FileLocked, self.volume(_Owner()).openFile, b"/f", os.O_WRONLY)
        self.assertEqual(old.ended, [])


def _closeQuietly(opened):
    try:
        opened.close()
    except OSError:
        pass


class TokenBucketTests(TestCase):
    def test_noLimit(self):
        bucket = TokenBucket(Clock())
        bucket.spend(0, 10**9)
        self.assertEqual(bucket.wait(0), 0)

    def test_debtIsPaidAtTheRate(self):
        clock = Clock()
        bucket = TokenBucket(clock)
        bucket.spend(1000, 3000)
        self.assertAlmostEqual(bucket.wait(1000), 3.0)
        clock.advance(2)
        self.assertAlmostEqual(bucket.wait(1000), 1.0)
        clock.advance(1)
        self.assertEqual(bucket.wait(1000), 0)

    def test_idleTimeKeepsOnlyABurst(self):
        clock = Clock()
        bucket = TokenBucket(clock)
        clock.advance(3600)
        bucket.spend(1000, MIN_BURST + 5000)
        self.assertAlmostEqual(bucket.wait(1000), 5.0)


class _Peer:
    def __init__(self, host):
        self.host = host


class _Transport:
    """What the stale-writer check reads of an SSH transport."""

    def __init__(self, clock, host, lastActivity):
        self.factory = type("Factory", (), {"clock": clock})()
        self.transport = type("TCP", (), {"getPeer": lambda _: _Peer(host)})()
        self._clock = clock
        self._lastActivity = lastActivity
        self.stale = []

    def quietFor(self):
        return self._clock.seconds() - self._lastActivity

    def endStale(self, path):
        self.stale.append(path)


class SupersedeTests(TestCase):
    """
    Which sessions a login may take a write lock from: its own user's, from
    its own address, silent for STALE_WRITER seconds.
    """

    def avatar(self, username, host, lastActivity):
        from lightd_conch.cred import ContainerAvatar
        from lightd_conch.store import Credential

        avatar = ContainerAvatar("c", "/nonexistent", None, Credential("c", username, b"", 0, 0))
        avatar.transport = _Transport(self.clock, host, lastActivity)
        return avatar

    def setUp(self):
        from lightd_conch.volume import STALE_WRITER

        self.clock = Clock()
        self.clock.advance(1000)
        self.stale = 1000 - STALE_WRITER

    def test_silentSessionOfTheSameLogin(self):
        old = self.avatar("u", "192.0.2.1", self.stale)
        new = self.avatar("u", "192.0.2.1", 1000)
        self.assertTrue(new.supersedes(old))
        old.endStale(b"/f")
        self.assertEqual(old.transport.stale, [b"/f"])

    def test_notWhileItTalks(self):
        old = self.avatar("u", "192.0.2.1", self.stale + 1)
        self.assertFalse(self.avatar("u", "192.0.2.1", 1000).supersedes(old))

    def test_notFromAnotherAddressOrUser(self):
        old = self.avatar("u", "192.0.2.1", self.stale)
        self.assertFalse(self.avatar("u", "192.0.2.2", 1000).supersedes(old))
        self.assertFalse(self.avatar("v", "192.0.2.1", 1000).supersedes(old))

    def test_notItself(self):
        old = self.avatar("u", "192.0.2.1", self.stale)
        self.assertFalse(old.supersedes(old))
