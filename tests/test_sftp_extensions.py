"""
Tests for the SFTP extensions of L{lightd_conch.sftp}, driven with hand-built
packets in the formats of OpenSSH's PROTOCOL file, including that none of them
reaches outside the volume.
"""

import os
import stat
import struct

from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import TestCase

from lightd_conch import sftp
from lightd_conch import volume as volumeModule
from lightd_conch.volume import Volume
from lightd_conch.testing import FakeSessionChannel
from tests.test_sftp import PacketDriver, attrs, packet, string

EXPECTED_EXTENSIONS = [
    (b"posix-rename@openssh.com", b"1"),
    (b"statvfs@openssh.com", b"2"),
    (b"fstatvfs@openssh.com", b"2"),
    (b"hardlink@openssh.com", b"1"),
    (b"fsync@openssh.com", b"1"),
    (b"lsetstat@openssh.com", b"1"),
    (b"limits@openssh.com", b"1"),
    (b"expand-path@openssh.com", b"1"),
    (b"copy-data", b"1"),
    (b"home-directory", b"1"),
    (b"users-groups-by-id@openssh.com", b"1"),
]


class ExtensionTestCase(PacketDriver, TestCase):
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.volume = os.path.join(base, "volume")
        self.outside = os.path.join(base, "outside")
        os.makedirs(self.volume)
        os.makedirs(self.outside)
        self.sentinel = os.path.join(self.outside, "secret")
        with open(self.sentinel, "wb") as f:
            f.write(b"host secret")
        self.clock = Clock()
        cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: False,
            scheduler=lambda step: self.clock.callLater(0, step),
        )
        self.server = sftp.SFTPServer(
            Volume.open(self.volume), maxHandles=8, cooperator=cooperator
        )
        self.transport = FakeSessionChannel()
        self.server.makeConnection(self.transport)
        self.addCleanup(self.server.connectionLost, None)
        self.nextId = 0
        self.version = self.feed(packet(sftp.FXP_INIT, payload=struct.pack(">I", 3)))[0]


    def request(self, kind, payload=b""):
        self.nextId += 1
        replies = self.feed(packet(kind, self.nextId, payload))
        self.assertEqual(len(replies), 1, "exactly one reply per request")
        self.assertEqual(replies[0].id, self.nextId)
        return replies[0]

    def extended(self, name, payload=b""):
        return self.request(sftp.FXP_EXTENDED, string(name) + payload)

    def open(self, path, pflags):
        return self.request(
            sftp.FXP_OPEN, string(path) + struct.pack(">I", pflags) + b"\0\0\0\0"
        ).handle

    def write(self, path, data, mode=0o644):
        full = os.path.join(self.volume, path)
        with open(full, "wb") as f:
            f.write(data)
        os.chmod(full, mode)
        return full

    def read(self, path):
        with open(os.path.join(self.volume, path), "rb") as f:
            return f.read()

    def assertStatus(self, reply, code):
        self.assertEqual(reply.kind, sftp.FXP_STATUS, reply.data)
        self.assertEqual(reply.status, code, reply.message)

    def assertSentinelUntouched(self):
        with open(self.sentinel, "rb") as f:
            self.assertEqual(f.read(), b"host secret")
        self.assertEqual(os.stat(self.sentinel).st_nlink, 1)
        self.assertEqual(sorted(os.listdir(self.outside)), ["secret"])

    def extendedReply(self, reply):
        self.assertEqual(reply.kind, sftp.FXP_EXTENDED_REPLY, reply.data)
        return sftp._Reader(reply.data, 4)


class VersionTests(ExtensionTestCase):
    def test_advertised(self):
        """
        VERSION lists every extension with OpenSSH's version strings.
        """
        reader = sftp._Reader(self.version.data)
        self.assertEqual(reader.uint32(), 3)
        advertised = []
        while reader.pos < len(reader.data):
            advertised.append((reader.string(), reader.string()))
        self.assertEqual(advertised, EXPECTED_EXTENSIONS)

    def test_unknown(self):
        self.assertStatus(self.extended(b"flock@openssh.com", string(b"1")), sftp.FX_OP_UNSUPPORTED)

    def test_truncated(self):
        """
        An extension whose fields run short is a bad message, not a crash.
        """
        for name in (b"posix-rename@openssh.com", b"copy-data", b"lsetstat@openssh.com",
                     b"users-groups-by-id@openssh.com", b"statvfs@openssh.com"):
            self.assertStatus(self.extended(name, b"\0\0"), sftp.FX_BAD_MESSAGE)


class RenameTests(ExtensionTestCase):
    def test_posixRenameReplaces(self):
        self.write("a", b"new")
        self.write("b", b"old")
        self.assertStatus(
            self.extended(b"posix-rename@openssh.com", string(b"/a") + string(b"/b")), sftp.FX_OK
        )
        self.assertEqual(self.read("b"), b"new")
        self.assertFalse(os.path.exists(os.path.join(self.volume, "a")))

    def test_plainRenameRefusesExisting(self):
        self.write("a", b"new")
        self.write("b", b"old")
        reply = self.request(sftp.FXP_RENAME, string(b"a") + string(b"b"))
        self.assertStatus(reply, sftp.FX_FAILURE)
        self.assertEqual(self.read("b"), b"old")

    def test_posixRenameDotDotStaysInside(self):
        """
        C{..} above the root is the root: the file lands in the volume.
        """
        self.write("a", b"data")
        reply = self.extended(
            b"posix-rename@openssh.com", string(b"a") + string(b"../../outside/secret")
        )
        self.assertStatus(reply, sftp.FX_NO_SUCH_FILE)
        self.assertStatus(
            self.extended(b"posix-rename@openssh.com", string(b"a") + string(b"../../../b")),
            sftp.FX_OK,
        )
        self.assertEqual(self.read("b"), b"data")
        self.assertSentinelUntouched()

    def test_posixRenameThroughPlantedLink(self):
        """
        A directory symlink pointing outside is followed with chroot
        semantics: the rename cannot put a file outside, nor take one.
        """
        os.symlink(self.outside, os.path.join(self.volume, "out"))
        self.write("a", b"data")
        self.assertStatus(
            self.extended(b"posix-rename@openssh.com", string(b"a") + string(b"out/secret")),
            sftp.FX_NO_SUCH_FILE,
        )
        self.assertStatus(
            self.extended(b"posix-rename@openssh.com", string(b"out/secret") + string(b"b")),
            sftp.FX_NO_SUCH_FILE,
        )
        self.assertSentinelUntouched()


class HardlinkTests(ExtensionTestCase):
    def hardlink(self, old, new):
        return self.extended(b"hardlink@openssh.com", string(old) + string(new))

    def test_hardlink(self):
        path = self.write("a", b"data")
        self.assertStatus(self.hardlink(b"/a", b"/b"), sftp.FX_OK)
        self.assertEqual(os.stat(path).st_ino, os.stat(os.path.join(self.volume, "b")).st_ino)
        self.assertEqual(os.stat(path).st_nlink, 2)

    def test_existingTarget(self):
        self.write("a", b"data")
        self.write("b", b"other")
        self.assertStatus(self.hardlink(b"a", b"b"), sftp.FX_FAILURE)
        self.assertEqual(self.read("b"), b"other")

    def test_directoryRefused(self):
        os.mkdir(os.path.join(self.volume, "d"))
        reply = self.hardlink(b"d", b"e")
        self.assertStatus(reply, sftp.FX_FAILURE)
        self.assertFalse(os.path.lexists(os.path.join(self.volume, "e")))

    def test_linkToOutsideRefused(self):
        """
        A symlink planted to a host file is not followed and not linked.
        """
        os.symlink(self.sentinel, os.path.join(self.volume, "evil"))
        self.assertStatus(self.hardlink(b"evil", b"copy"), sftp.FX_FAILURE)
        self.assertFalse(os.path.lexists(os.path.join(self.volume, "copy")))
        self.assertSentinelUntouched()

    def test_throughPlantedDirectoryLink(self):
        os.symlink(self.outside, os.path.join(self.volume, "out"))
        self.assertStatus(self.hardlink(b"out/secret", b"copy"), sftp.FX_NO_SUCH_FILE)
        self.write("a", b"data")
        self.assertStatus(self.hardlink(b"a", b"out/stolen"), sftp.FX_NO_SUCH_FILE)
        self.assertStatus(self.hardlink(b"../outside/secret", b"copy"), sftp.FX_NO_SUCH_FILE)
        self.assertSentinelUntouched()

    def test_root(self):
        self.assertStatus(self.hardlink(b"/", b"x"), sftp.FX_PERMISSION_DENIED)


class StatvfsTests(ExtensionTestCase):
    def fields(self, reply):
        reader = self.extendedReply(reply)
        values = [reader.uint64() for _ in range(11)]
        self.assertEqual(reader.pos, len(reader.data))
        return dict(zip(
            ["bsize", "frsize", "blocks", "bfree", "bavail", "files", "ffree", "favail",
             "fsid", "flag", "namemax"], values))

    def test_statvfs(self):
        """
        The figures are those of the filesystem holding the volume.
        """
        fields = self.fields(self.extended(b"statvfs@openssh.com", string(b"/")))
        real = os.statvfs(self.volume)
        self.assertEqual(fields["bsize"], real.f_bsize)
        self.assertEqual(fields["frsize"], real.f_frsize)
        self.assertEqual(fields["blocks"], real.f_blocks)
        self.assertEqual(fields["namemax"], real.f_namemax)
        self.assertEqual(fields["flag"] & 1, real.f_flag & os.ST_RDONLY)

    def test_fstatvfs(self):
        self.write("a", b"data")
        handle = self.open(b"a", sftp.FXF_READ)
        fields = self.fields(self.extended(b"fstatvfs@openssh.com", string(handle)))
        self.assertEqual(fields["blocks"], os.statvfs(self.volume).f_blocks)

    def test_missing(self):
        self.assertStatus(
            self.extended(b"statvfs@openssh.com", string(b"/nope")), sftp.FX_NO_SUCH_FILE
        )
        self.assertStatus(
            self.extended(b"fstatvfs@openssh.com", string(b"bogus")), sftp.FX_FAILURE
        )


class FsyncTests(ExtensionTestCase):
    def test_fsync(self):
        handle = self.open(b"a", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.assertStatus(self.extended(b"fsync@openssh.com", string(handle)), sftp.FX_OK)

    def test_notAFile(self):
        handle = self.request(sftp.FXP_OPENDIR, string(b"/")).handle
        self.assertStatus(self.extended(b"fsync@openssh.com", string(handle)), sftp.FX_FAILURE)
        self.assertStatus(self.extended(b"fsync@openssh.com", string(b"9")), sftp.FX_FAILURE)


class LsetstatTests(ExtensionTestCase):
    def lsetstat(self, path, attributes):
        return self.extended(b"lsetstat@openssh.com", string(path) + attributes)

    def test_timesOfALinkItself(self):
        """
        Times are set on the link, not on what it points to.
        """
        target = self.write("target", b"data")
        os.utime(target, (2_000_000_000, 2_000_000_000))
        os.symlink("target", os.path.join(self.volume, "link"))
        self.assertStatus(self.lsetstat(b"link", attrs(times=(1000, 2000))), sftp.FX_OK)
        st = os.lstat(os.path.join(self.volume, "link"))
        self.assertEqual((st.st_atime, st.st_mtime), (1000, 2000))
        self.assertEqual(os.stat(target).st_mtime, 2_000_000_000)

    def test_linkToOutsideUntouched(self):
        os.symlink(self.sentinel, os.path.join(self.volume, "evil"))
        before = os.stat(self.sentinel)
        self.assertStatus(self.lsetstat(b"evil", attrs(times=(1000, 2000))), sftp.FX_OK)
        self.assertStatus(
            self.lsetstat(b"evil", attrs(permissions=0o777)), sftp.FX_OP_UNSUPPORTED
        )
        after = os.stat(self.sentinel)
        self.assertEqual((after.st_mtime, after.st_mode), (before.st_mtime, before.st_mode))
        self.assertSentinelUntouched()

    def test_regularFile(self):
        path = self.write("a", b"data")
        self.assertStatus(
            self.lsetstat(b"a", attrs(permissions=0o600, times=(1000, 2000))), sftp.FX_OK
        )
        st = os.stat(path)
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o600)
        self.assertEqual(st.st_mtime, 2000)

    def test_root(self):
        self.assertStatus(self.lsetstat(b"/", attrs(times=(1000, 2000))), sftp.FX_OK)
        self.assertEqual(os.stat(self.volume).st_mtime, 2000)

    def test_sizeRefused(self):
        self.write("a", b"data")
        self.assertStatus(self.lsetstat(b"a", attrs(size=0)), sftp.FX_BAD_MESSAGE)
        self.assertEqual(self.read("a"), b"data")

    def test_missing(self):
        self.assertStatus(self.lsetstat(b"nope", attrs(times=(1, 2))), sftp.FX_NO_SUCH_FILE)


class LimitsTests(ExtensionTestCase):
    def test_limits(self):
        reader = self.extendedReply(self.extended(b"limits@openssh.com"))
        self.assertEqual(
            [reader.uint64() for _ in range(4)], [262144, 261120, 261120, 8]
        )

    def test_maxWriteFits(self):
        """
        A WRITE of max-write bytes fits in a packet of max-packet bytes.
        """
        handle = self.open(b"big", sftp.FXF_WRITE | sftp.FXF_CREAT)
        data = b"x" * 261120
        reply = self.request(
            sftp.FXP_WRITE, string(handle) + struct.pack(">Q", 0) + string(data)
        )
        self.assertStatus(reply, sftp.FX_OK)
        self.assertEqual(self.read("big"), data)


class ExpandPathTests(ExtensionTestCase):
    def expand(self, path):
        reply = self.extended(b"expand-path@openssh.com", string(path))
        [(name, _)] = reply.names()
        return name

    def test_tilde(self):
        self.assertEqual(self.expand(b"~"), b"/")
        self.assertEqual(self.expand(b"~/"), b"/")
        self.assertEqual(self.expand(b"~/x/y"), b"/x/y")
        self.assertEqual(self.expand(b"~root/x"), b"/x")
        self.assertEqual(self.expand(b"~root"), b"/")

    def test_plain(self):
        self.assertEqual(self.expand(b""), b"/")
        self.assertEqual(self.expand(b"."), b"/")
        self.assertEqual(self.expand(b"a/./b/../c"), b"/a/c")

    def test_cannotClimb(self):
        self.assertEqual(self.expand(b"~/../../etc"), b"/etc")
        self.assertEqual(self.expand(b"~/../../../outside"), b"/outside")
        self.assertEqual(self.expand(b"/../.."), b"/")

    def test_homeDirectory(self):
        reply = self.extended(b"home-directory", string(b"anyone"))
        self.assertEqual(reply.names(), [(b"/", b"/")])


class UsersGroupsTests(ExtensionTestCase):
    def test_noHostNames(self):
        """
        Ids, including root's, are answered with empty names: no host account
        name reaches a client.
        """
        uids = struct.pack(">3I", 0, os.getuid(), 65534)
        gids = struct.pack(">2I", 0, 100)
        reader = self.extendedReply(
            self.extended(b"users-groups-by-id@openssh.com", string(uids) + string(gids))
        )
        users = sftp._Reader(reader.string())
        groups = sftp._Reader(reader.string())
        self.assertEqual([users.string() for _ in range(3)], [b""] * 3)
        self.assertEqual(users.pos, len(users.data))
        self.assertEqual([groups.string() for _ in range(2)], [b""] * 2)
        self.assertEqual(groups.pos, len(groups.data))

    def test_badList(self):
        self.assertStatus(
            self.extended(b"users-groups-by-id@openssh.com", string(b"\0\0\0") + string(b"")),
            sftp.FX_BAD_MESSAGE,
        )


class CopyDataTests(ExtensionTestCase):
    def copy(self, source, readOffset, length, target, writeOffset):
        self.nextId += 1
        requestId = self.nextId
        replies = self.feed(
            packet(
                sftp.FXP_EXTENDED,
                requestId,
                string(b"copy-data")
                + string(source)
                + struct.pack(">QQ", readOffset, length)
                + string(target)
                + struct.pack(">Q", writeOffset),
            )
        )
        for _ in range(1000):
            if replies:
                break
            self.clock.advance(0)
            replies = self.replies()
        self.assertEqual(len(replies), 1)
        self.assertEqual(replies[0].id, requestId)
        return replies[0]

    def test_wholeFile(self):
        data = os.urandom(3 * 1024 * 1024 + 17)
        self.write("src", data)
        source = self.open(b"src", sftp.FXF_READ)
        target = self.open(b"dst", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.patch(volumeModule, "COPY_CHUNK", 1024 * 1024)
        self.assertStatus(self.copy(source, 0, 0, target, 0), sftp.FX_OK)
        self.assertEqual(self.read("dst"), data)

    def test_range(self):
        self.write("src", b"0123456789")
        self.write("dst", b"abcdefghij")
        source = self.open(b"src", sftp.FXF_READ)
        target = self.open(b"dst", sftp.FXF_WRITE)
        self.assertStatus(self.copy(source, 2, 3, target, 5), sftp.FX_OK)
        self.assertEqual(self.read("dst"), b"abcde234ij")

    def test_shortSource(self):
        """
        A length past the source's end copies what there is and says EOF.
        """
        self.write("src", b"0123")
        source = self.open(b"src", sftp.FXF_READ)
        target = self.open(b"dst", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.assertStatus(self.copy(source, 0, 100, target, 0), sftp.FX_EOF)
        self.assertEqual(self.read("dst"), b"0123")

    def test_append(self):
        self.write("src", b"tail")
        self.write("dst", b"head-")
        source = self.open(b"src", sftp.FXF_READ)
        target = self.open(b"dst", sftp.FXF_WRITE | sftp.FXF_APPEND)
        self.assertStatus(self.copy(source, 0, 0, target, 0), sftp.FX_OK)
        self.assertEqual(self.read("dst"), b"head-tail")

    def test_sameFileRefused(self):
        self.write("a", b"data")
        first = self.open(b"a", sftp.FXF_READ)
        second = self.open(b"a", sftp.FXF_READ | sftp.FXF_WRITE)
        self.assertStatus(self.copy(first, 0, 0, first, 0), sftp.FX_FAILURE)
        self.assertStatus(self.copy(first, 0, 0, second, 4), sftp.FX_FAILURE)
        self.assertEqual(self.read("a"), b"data")

    def test_badHandles(self):
        self.write("a", b"data")
        source = self.open(b"a", sftp.FXF_READ)
        directory = self.request(sftp.FXP_OPENDIR, string(b"/")).handle
        self.assertStatus(self.copy(source, 0, 0, b"77", 0), sftp.FX_FAILURE)
        self.assertStatus(self.copy(source, 0, 0, directory, 0), sftp.FX_FAILURE)

    def test_offsetsPastOffT(self):
        self.write("a", b"data")
        source = self.open(b"a", sftp.FXF_READ)
        target = self.open(b"b", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.assertStatus(self.copy(source, 2**63, 0, target, 0), sftp.FX_FAILURE)
        self.assertStatus(self.copy(source, 0, 0, target, 2**64 - 1), sftp.FX_FAILURE)
        self.assertEqual(self.read("b"), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_readOnlyTarget(self):
        self.write("a", b"data")
        self.write("b", b"keep")
        source = self.open(b"a", sftp.FXF_READ)
        target = self.open(b"b", sftp.FXF_READ)
        self.assertStatus(self.copy(source, 0, 0, target, 0), sftp.FX_FAILURE)
        self.assertEqual(self.read("b"), b"keep")

    def test_closeDuringCopy(self):
        """
        Closing the handles while a copy runs does not disturb it: it holds
        its own fds.
        """
        data = os.urandom(4 * 1024 * 1024)
        self.write("src", data)
        self.patch(volumeModule, "COPY_CHUNK", 64 * 1024)
        source = self.open(b"src", sftp.FXF_READ)
        target = self.open(b"dst", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.nextId += 1
        copyId = self.nextId
        self.feed(packet(
            sftp.FXP_EXTENDED, copyId,
            string(b"copy-data") + string(source) + struct.pack(">QQ", 0, 0)
            + string(target) + struct.pack(">Q", 0),
        ))
        self.assertStatus(self.request(sftp.FXP_CLOSE, string(source)), sftp.FX_OK)
        self.assertStatus(self.request(sftp.FXP_CLOSE, string(target)), sftp.FX_OK)
        other = self.open(b"other", sftp.FXF_WRITE | sftp.FXF_CREAT)
        replies = []
        for _ in range(1000):
            self.clock.advance(0)
            replies += self.replies()
            if replies:
                break
        self.assertEqual([(r.id, r.status) for r in replies], [(copyId, sftp.FX_OK)])
        self.assertEqual(self.read("dst"), data)
        self.assertEqual(self.read("other"), b"")
        self.assertStatus(self.request(sftp.FXP_CLOSE, string(other)), sftp.FX_OK)

    def test_connectionLostStopsCopy(self):
        self.write("src", os.urandom(1024 * 1024))
        self.patch(volumeModule, "COPY_CHUNK", 4096)
        source = self.open(b"src", sftp.FXF_READ)
        target = self.open(b"dst", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.feed(packet(
            sftp.FXP_EXTENDED, 99,
            string(b"copy-data") + string(source) + struct.pack(">QQ", 0, 0)
            + string(target) + struct.pack(">Q", 0),
        ))
        before = len(os.listdir("/proc/self/fd"))
        self.server.connectionLost(None)
        for _ in range(5):
            self.clock.advance(0)
        self.assertEqual(self.replies(), [])
        self.assertLess(len(os.listdir("/proc/self/fd")), before)
        self.assertLess(os.path.getsize(os.path.join(self.volume, "dst")), 1024 * 1024)
