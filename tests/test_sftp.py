"""
Tests for L{lightd_conch.sftp}: the protocol driven with hand-built packets.
"""

import os
import time
import stat
import struct

from twisted.trial.unittest import TestCase

from lightd_conch import sftp
from lightd_conch.testing import FakeSessionChannel
from lightd_conch.volume import Volume


def string(value):
    return struct.pack(">I", len(value)) + value


def packet(kind, requestId=None, payload=b""):
    body = bytes([kind])
    if requestId is not None:
        body += struct.pack(">I", requestId)
    body += payload
    return struct.pack(">I", len(body)) + body


def attrs(permissions=None, times=None, size=None):
    flags, body = 0, b""
    if size is not None:
        flags |= sftp.FILEXFER_ATTR_SIZE
        body += struct.pack(">Q", size)
    if permissions is not None:
        flags |= sftp.FILEXFER_ATTR_PERMISSIONS
        body += struct.pack(">I", permissions)
    if times is not None:
        flags |= sftp.FILEXFER_ATTR_ACMODTIME
        body += struct.pack(">II", *times)
    return struct.pack(">I", flags) + body


class Reply:
    def __init__(self, kind, data):
        self.kind = kind
        self.data = data
        self.id = struct.unpack_from(">I", data)[0] if kind != sftp.FXP_VERSION else None

    @property
    def status(self):
        assert self.kind == sftp.FXP_STATUS, self.kind
        return struct.unpack_from(">I", self.data, 4)[0]

    @property
    def message(self):
        (length,) = struct.unpack_from(">I", self.data, 8)
        return self.data[12 : 12 + length].decode()

    @property
    def handle(self):
        assert self.kind == sftp.FXP_HANDLE, (self.kind, self.data)
        return sftp._Reader(self.data, 4).string()

    @property
    def payload(self):
        assert self.kind == sftp.FXP_DATA, self.kind
        return sftp._Reader(self.data, 4).string()

    def names(self):
        assert self.kind == sftp.FXP_NAME, self.kind
        reader = sftp._Reader(self.data, 4)
        result = []
        for _ in range(reader.uint32()):
            name, long = reader.string(), reader.string()
            reader.attrs()
            result.append((name, long))
        return result


class PacketDriver:
    """
    Feeds packets to C{self.server} and parses what it wrote to
    C{self.transport}.
    """

    def feed(self, data):
        self.server.dataReceived(data)
        return self.replies()

    def replies(self):
        data = self.transport.value()
        self.transport.clear()
        out = []
        while data:
            (length,) = struct.unpack_from(">I", data)
            out.append(Reply(data[4], data[5 : 4 + length]))
            data = data[4 + length :]
        return out


class ProtocolTests(PacketDriver, TestCase):
    def setUp(self):
        self.volume = os.path.abspath(self.mktemp())
        os.makedirs(self.volume)
        self.server = sftp.SFTPServer(Volume.open(self.volume), maxHandles=8)
        self.transport = FakeSessionChannel()
        self.server.makeConnection(self.transport)
        self.addCleanup(self.server.connectionLost, None)
        self.nextId = 0


    def init(self):
        [reply] = self.feed(packet(sftp.FXP_INIT, payload=struct.pack(">I", 3)))
        self.assertEqual(reply.kind, sftp.FXP_VERSION)
        self.assertEqual(struct.unpack_from(">I", reply.data)[0], 3)

    def request(self, kind, payload=b""):
        self.nextId += 1
        replies = self.feed(packet(kind, self.nextId, payload))
        self.assertEqual(len(replies), 1, "exactly one reply per request")
        self.assertEqual(replies[0].id, self.nextId)
        return replies[0]

    def open(self, path, pflags, attributes=b"\0\0\0\0"):
        return self.request(sftp.FXP_OPEN, string(path) + struct.pack(">I", pflags) + attributes)

    # -- framing and malformed input ---------------------------------------

    def test_version(self):
        self.init()

    def test_requestBeforeInit(self):
        self.assertEqual(self.feed(packet(sftp.FXP_STAT, 1, string(b"/"))), [])
        self.assertTrue(self.transport.lost)

    def test_initTwice(self):
        self.init()
        self.feed(packet(sftp.FXP_INIT, payload=struct.pack(">I", 3)))
        self.assertTrue(self.transport.lost)

    def test_oversizePacket(self):
        self.init()
        self.feed(struct.pack(">IB", sftp.MAX_PACKET_LENGTH + 1, sftp.FXP_WRITE) + b"x" * 100)
        self.assertTrue(self.transport.lost)

    def test_packetAtLimitAccepted(self):
        self.init()
        handle = self.open(b"f", sftp.FXF_WRITE | sftp.FXF_CREAT).handle
        header = string(handle) + struct.pack(">Q", 0)
        room = sftp.MAX_PACKET_LENGTH - 5 - len(header) - 4
        reply = self.request(sftp.FXP_WRITE, header + string(b"z" * room))
        self.assertEqual(reply.status, sftp.FX_OK)
        self.assertEqual(os.path.getsize(os.path.join(self.volume, "f")), room)

    def test_hugeLength(self):
        self.init()
        self.feed(b"\xff\xff\xff\xff" + b"x" * 10)
        self.assertTrue(self.transport.lost)

    def test_tinyLengths(self):
        for length in range(5):
            self.setUp()
            self.init()
            self.feed(struct.pack(">I", length) + b"\x11" * length)
            self.assertTrue(self.transport.lost, length)

    def test_truncatedFields(self):
        """
        A packet whose fields run past its end gets BAD_MESSAGE, for every type.
        """
        self.init()
        for kind in sorted(self.server._dispatch):
            reply = self.request(kind, b"\0\0\0\x50ab")
            self.assertEqual((kind, reply.status), (kind, sftp.FX_BAD_MESSAGE))
        self.assertFalse(self.transport.lost)

    def test_truncatedWithUnknownHandle(self):
        """
        A short READ, WRITE or FSETSTAT is BAD_MESSAGE even when the handle it
        names does not exist: every field is read before the handle is
        looked up.
        """
        self.init()
        for kind, rest in ((sftp.FXP_READ, b"\0\0"), (sftp.FXP_WRITE, b"\0\0\0\0\0\0\0\0\0\0\0\x10ab"),
                           (sftp.FXP_FSETSTAT, b"\0\0")):
            reply = self.request(kind, string(b"no such handle") + rest)
            self.assertEqual((kind, reply.status), (kind, sftp.FX_BAD_MESSAGE))
        # Whole, they say what is wrong with the handle.
        reply = self.request(sftp.FXP_READ, string(b"no such handle") + struct.pack(">QI", 0, 10))
        self.assertEqual((reply.status, reply.message), (sftp.FX_FAILURE, "Invalid handle"))

    def test_unknownType(self):
        self.init()
        self.assertEqual(self.request(99).status, sftp.FX_OP_UNSUPPORTED)

    def test_unknownExtension(self):
        self.init()
        reply = self.request(sftp.FXP_EXTENDED, string(b"nope@example.com"))
        self.assertEqual(reply.status, sftp.FX_OP_UNSUPPORTED)

    def test_invalidHandles(self):
        self.init()
        os.mkdir(os.path.join(self.volume, "d"))
        dirHandle = self.request(sftp.FXP_OPENDIR, string(b"d")).handle
        fileHandle = self.open(b"f", sftp.FXF_WRITE | sftp.FXF_CREAT).handle
        closed = self.open(b"g", sftp.FXF_WRITE | sftp.FXF_CREAT).handle
        self.assertEqual(self.request(sftp.FXP_CLOSE, string(closed)).status, sftp.FX_OK)
        for handle in (b"nope", closed, b""):
            for kind, rest in (
                (sftp.FXP_READ, struct.pack(">QI", 0, 10)),
                (sftp.FXP_WRITE, struct.pack(">Q", 0) + string(b"x")),
                (sftp.FXP_FSTAT, b""),
                (sftp.FXP_FSETSTAT, attrs(permissions=0o600)),
                (sftp.FXP_READDIR, b""),
                (sftp.FXP_CLOSE, b""),
            ):
                reply = self.request(kind, string(handle) + rest)
                self.assertEqual(reply.status, sftp.FX_FAILURE)
        # A directory handle is not a file handle, and the other way round.
        self.assertEqual(
            self.request(sftp.FXP_READ, string(dirHandle) + struct.pack(">QI", 0, 10)).status,
            sftp.FX_FAILURE,
        )
        self.assertEqual(self.request(sftp.FXP_READDIR, string(fileHandle)).status, sftp.FX_FAILURE)

    # -- requests -----------------------------------------------------------

    def test_writeReadStat(self):
        self.init()
        handle = self.open(b"/a/../f.txt", sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_TRUNC).handle
        reply = self.request(sftp.FXP_WRITE, string(handle) + struct.pack(">Q", 3) + string(b"data"))
        self.assertEqual(reply.status, sftp.FX_OK)
        self.request(sftp.FXP_CLOSE, string(handle))
        with open(os.path.join(self.volume, "f.txt"), "rb") as f:
            self.assertEqual(f.read(), b"\0\0\0data")
        handle = self.open(b"f.txt", sftp.FXF_READ).handle
        read = self.request(sftp.FXP_READ, string(handle) + struct.pack(">QI", 2, 0xFFFFFFFF))
        self.assertEqual(read.payload, b"\0data")
        eof = self.request(sftp.FXP_READ, string(handle) + struct.pack(">QI", 7, 10))
        self.assertEqual(eof.status, sftp.FX_EOF)
        attributes = self.request(sftp.FXP_FSTAT, string(handle))
        self.assertEqual(attributes.kind, sftp.FXP_ATTRS)
        parsed = sftp._Reader(attributes.data, 4).attrs()
        self.assertEqual((parsed.size, stat.S_IMODE(parsed.permissions)), (7, 0o644))

    def test_readCappedAt261120(self):
        self.init()
        with open(os.path.join(self.volume, "big"), "wb") as f:
            f.write(b"b" * 400000)
        handle = self.open(b"big", sftp.FXF_READ).handle
        read = self.request(sftp.FXP_READ, string(handle) + struct.pack(">QI", 0, 0xFFFFFFFF))
        self.assertEqual(len(read.payload), 261120)

    def test_offsetsPastOffT(self):
        """
        Offsets and sizes are uint64 on the wire but off_t in the kernel:
        past 2**63 - 1 they get FAILURE ("Invalid argument"), not a logged
        OverflowError.
        """
        self.init()
        handle = self.open(b"f", sftp.FXF_READ | sftp.FXF_WRITE | sftp.FXF_CREAT).handle
        big = struct.pack(">Q", 2**63)
        for kind, payload in (
            (sftp.FXP_READ, string(handle) + struct.pack(">QI", 2**64 - 1, 10)),
            (sftp.FXP_WRITE, string(handle) + big + string(b"x")),
            (sftp.FXP_SETSTAT, string(b"f") + struct.pack(">I", sftp.FILEXFER_ATTR_SIZE) + big),
            (sftp.FXP_FSETSTAT, string(handle) + struct.pack(">I", sftp.FILEXFER_ATTR_SIZE) + big),
        ):
            reply = self.request(kind, payload)
            self.assertEqual((kind, reply.status, reply.message), (kind, sftp.FX_FAILURE, "Invalid argument"))
        self.assertEqual(os.path.getsize(os.path.join(self.volume, "f")), 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_append(self):
        self.init()
        with open(os.path.join(self.volume, "log"), "wb") as f:
            f.write(b"one")
        handle = self.open(b"log", sftp.FXF_WRITE | sftp.FXF_APPEND).handle
        self.request(sftp.FXP_WRITE, string(handle) + struct.pack(">Q", 0) + string(b"two"))
        with open(os.path.join(self.volume, "log"), "rb") as f:
            self.assertEqual(f.read(), b"onetwo")

    def test_exclusiveCreateOfExistingIsFailure(self):
        """
        EEXIST is FAILURE (4), never a status code v3 does not have.
        """
        self.init()
        self.open(b"f", sftp.FXF_WRITE | sftp.FXF_CREAT)
        reply = self.open(b"f", sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_EXCL)
        self.assertEqual(reply.status, sftp.FX_FAILURE)
        self.assertEqual(reply.message, "File exists")

    def test_statusCodes(self):
        self.init()
        missing = self.request(sftp.FXP_STAT, string(b"missing"))
        self.assertEqual(missing.status, sftp.FX_NO_SUCH_FILE)
        os.makedirs(os.path.join(self.volume, "full", "x"))
        notEmpty = self.request(sftp.FXP_RMDIR, string(b"full"))
        self.assertEqual(notEmpty.status, sftp.FX_FAILURE)
        self.assertNotIn(self.volume, notEmpty.message)

    def test_noHostPathInMessages(self):
        self.init()
        for kind, payload in (
            (sftp.FXP_STAT, string(b"/x/y/z")),
            (sftp.FXP_REMOVE, string(b"nope")),
            (sftp.FXP_RENAME, string(b"a") + string(b"b")),
            (sftp.FXP_READLINK, string(b"nope")),
        ):
            reply = self.request(kind, payload)
            self.assertNotIn(os.path.basename(self.volume), reply.message)

    def test_handleLimit(self):
        self.init()
        handles = [self.open(b"f%d" % i, sftp.FXF_WRITE | sftp.FXF_CREAT).handle for i in range(8)]
        refused = self.open(b"more", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.assertEqual(refused.status, sftp.FX_FAILURE)
        self.assertFalse(os.path.exists(os.path.join(self.volume, "more")))
        self.request(sftp.FXP_CLOSE, string(handles[0]))
        self.assertEqual(self.open(b"more", sftp.FXF_WRITE | sftp.FXF_CREAT).kind, sftp.FXP_HANDLE)

    def test_handlesClosedOnDisconnect(self):
        self.init()
        for i in range(5):
            self.open(b"f%d" % i, sftp.FXF_WRITE | sftp.FXF_CREAT)
        before = len(os.listdir("/proc/self/fd"))
        self.server.connectionLost(None)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before - 6)  # 5 files + the root

    def listAll(self, path):
        """
        Every (name, longname) READDIR gives for C{path}, and each reply's
        entry count; each reply is checked against the bounds.
        """
        handle = self.request(sftp.FXP_OPENDIR, string(path)).handle
        seen, counts = [], []
        while True:
            reply = self.request(sftp.FXP_READDIR, string(handle))
            if reply.kind == sftp.FXP_STATUS:
                self.assertEqual(reply.status, sftp.FX_EOF)
                return seen, counts
            names = reply.names()
            self.assertLessEqual(len(names), sftp.MAX_READDIR_ENTRIES)
            self.assertLessEqual(len(reply.data), 4 + 4 + sftp.MAX_READDIR_BYTES)
            counts.append(len(names))
            seen.extend(names)

    def test_readdirBatches(self):
        """
        READDIR replies hold at most MAX_READDIR_ENTRIES entries and at most
        MAX_READDIR_BYTES bytes of them; an entry that does not fit comes in
        the next reply, and none is lost or repeated.
        """
        self.init()
        short = [b"e%04d" % i for i in range(1100)]
        long = [b"L%03d" % i + b"n" * 250 for i in range(400)]
        for folder, names in ((b"short", short), (b"long", long)):
            os.mkdir(os.path.join(self.volume, folder.decode()))
            for name in names:
                open(os.path.join(self.volume, folder.decode(), name.decode()), "w").close()
            seen, counts = self.listAll(b"/" + folder)
            self.assertEqual(sorted(n for n, _ in seen), sorted([b".", b".."] + names))
            if folder == b"short":
                self.assertEqual(counts, [500, 500, 102])  # full by count
            else:
                self.assertGreater(len(counts), 1)  # full by size
                self.assertTrue(all(c < 500 for c in counts), counts)
        longname = dict(seen)[b"L007" + b"n" * 250]
        self.assertTrue(longname.startswith(b"-rw-r--r--"), longname)
        self.assertTrue(longname.endswith(b" L007" + b"n" * 250), longname)

    def test_readdirLongnames(self):
        """
        Long names read as OpenSSH's server writes them: mode, links, numeric
        owner and group, size, a date with the year past six months, and
        the name's bytes as they are on disk.
        """
        self.init()
        names = {b"old.txt": 1_000_000_000, b"new-\xff\xfe.bin": time.time() - 60}
        for name, mtime in names.items():
            path = os.path.join(os.fsencode(self.volume), name)
            with open(path, "wb") as f:
                f.write(b"x" * 1234)
            os.chmod(path, 0o640)
            os.utime(path, (mtime, mtime))
        seen = dict(self.listAll(b"/")[0])
        self.assertEqual(set(seen), {b".", b".."} | set(names))
        for name, mtime in names.items():
            st = os.lstat(os.path.join(os.fsencode(self.volume), name))
            when = time.localtime(mtime)
            date = time.strftime("%b %e  %Y" if name == b"old.txt" else "%b %e %H:%M", when)
            expected = "-rw-r----- %3d %-8d %-8d %8d %s " % (
                st.st_nlink, st.st_uid, st.st_gid, 1234, date
            )
            self.assertEqual(seen[name], expected.encode() + name)

    def test_requestsBeforeEOFAreAnswered(self):
        """
        Requests held back while the send side was full are all answered
        after the client's EOF, in order, before the session ends with exit
        status 0.
        """
        self.init()
        self.server.pauseProducing()
        self.feed(b"".join(packet(sftp.FXP_STAT, n, string(b"/")) for n in range(1, 21)))
        self.server.eofReceived()
        self.assertEqual((self.replies(), self.transport.exitCode), ([], None))
        self.server.resumeProducing()
        replies = self.replies()
        self.assertEqual([r.id for r in replies], list(range(1, 21)))
        self.assertEqual({r.kind for r in replies}, {sftp.FXP_ATTRS})
        self.assertEqual(self.transport.exitCode, 0)

    def test_eofEndsAnIdleSession(self):
        self.init()
        # Half a request, then EOF: nothing to answer, the session ends.
        self.feed(packet(sftp.FXP_STAT, 1, string(b"/"))[:7])
        self.server.eofReceived()
        self.assertEqual((self.replies(), self.transport.exitCode), ([], 0))

    def test_readdirTimeBeyondTheCalendar(self):
        """
        An entry whose time the C library cannot show (a file system can
        hold 2**62) is listed without a date, as OpenSSH's server lists it;
        it does not take the listing down.
        """
        for mtime in (2**62, -(2**62)):
            st = os.stat_result((0o100644, 1, 1, 1, 1000, 1000, 5, 0, mtime, 0))
            entry = sftp._Listing().entry(b"far", st)
            reader = sftp._Reader(entry)
            self.assertEqual(reader.string(), b"far")
            self.assertEqual(reader.string(), b"-rw-r--r--   1 1000     1000            5  far")

    def test_realpath(self):
        self.init()
        for path, expected in ((b".", b"/"), (b"", b"/"), (b"../../a/./b/..", b"/a")):
            self.assertEqual(self.request(sftp.FXP_REALPATH, string(path)).names()[0][0], expected)

    def test_pathsEndingAsAFolders(self):
        """
        "x/", "x/." and "x/.." name a folder: a file operation on one never
        acts on a file named x (put a.txt dir/ must not replace a file
        "dir"), and makes no file named x.
        """
        self.init()
        with open(os.path.join(self.volume, "f"), "wb") as f:
            f.write(b"keep")
        os.mkdir(os.path.join(self.volume, "d"))
        os.symlink("d", os.path.join(self.volume, "dl"))
        write = sftp.FXF_WRITE | sftp.FXF_CREAT | sftp.FXF_TRUNC
        for path, status, message in (
            (b"f/", sftp.FX_NO_SUCH_FILE, "Not a directory"),
            (b"/f/.", sftp.FX_NO_SUCH_FILE, "Not a directory"),
            (b"new/", sftp.FX_FAILURE, "Is a directory"),
            (b"d/", sftp.FX_FAILURE, "Is a directory"),
        ):
            reply = self.open(path, write)
            self.assertEqual((reply.status, reply.message), (status, message), path)
        self.assertFalse(os.path.exists(os.path.join(self.volume, "new")))
        for kind, payload in (
            (sftp.FXP_STAT, string(b"f/")),
            (sftp.FXP_LSTAT, string(b"f/")),
            (sftp.FXP_SETSTAT, string(b"f/") + attrs(0o600)),
            (sftp.FXP_REMOVE, string(b"f/.")),
            (sftp.FXP_RENAME, string(b"f/") + string(b"g")),
            (sftp.FXP_RENAME, string(b"f") + string(b"g/")),
        ):
            reply = self.request(kind, payload)
            self.assertEqual((kind, reply.status), (kind, sftp.FX_NO_SUCH_FILE))
        with open(os.path.join(self.volume, "f"), "rb") as f:
            self.assertEqual(f.read(), b"keep")
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.volume, "f")).st_mode) & 0o200, 0o200)
        # Folders, and links to them, take the ending.
        self.assertEqual(self.request(sftp.FXP_STAT, string(b"d/")).kind, sftp.FXP_ATTRS)
        self.assertEqual(self.request(sftp.FXP_LSTAT, string(b"dl/")).kind, sftp.FXP_ATTRS)
        self.assertEqual(self.request(sftp.FXP_REMOVE, string(b"d/")).status, sftp.FX_FAILURE)
        self.assertEqual(self.request(sftp.FXP_RENAME, string(b"d/") + string(b"e")).status,
                         sftp.FX_OK)
        self.assertTrue(os.path.isdir(os.path.join(self.volume, "e")))

    def test_renameRefusesExistingTarget(self):
        self.init()
        self.open(b"a", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.open(b"b", sftp.FXF_WRITE | sftp.FXF_CREAT)
        self.assertEqual(self.request(sftp.FXP_RENAME, string(b"a") + string(b"b")).status, sftp.FX_FAILURE)
        self.assertEqual(self.request(sftp.FXP_RENAME, string(b"a") + string(b"c")).status, sftp.FX_OK)

    def test_symlinkOpenSSHOrder(self):
        self.init()
        reply = self.request(sftp.FXP_SYMLINK, string(b"../target text") + string(b"link"))
        self.assertEqual(reply.status, sftp.FX_OK)
        self.assertEqual(os.readlink(os.path.join(self.volume, "link")), "../target text")
        self.assertEqual(self.request(sftp.FXP_READLINK, string(b"link")).names()[0][0], b"../target text")

    def assertSymlinkOrder(self, versions, linkFirst):
        """
        A client whose SSH version is one of C{versions} sends SYMLINK with
        the link first (the drafts' order) if C{linkFirst}, else the target
        first (OpenSSH's order); either way the link it asks for is made.
        """
        for number, version in enumerate(versions):
            self.server = sftp.SFTPServer(Volume.open(self.volume), clientVersion=version)
            self.server.makeConnection(self.transport)
            self.addCleanup(self.server.connectionLost, None)
            self.init()
            link, target = b"link-%d-%d" % (linkFirst, number), b"target text"
            fields = (link, target) if linkFirst else (target, link)
            reply = self.request(sftp.FXP_SYMLINK, b"".join(map(string, fields)))
            self.assertEqual(reply.status, sftp.FX_OK, version)
            self.assertEqual(os.readlink(os.path.join(self.volume, link.decode())), "target text")

    def test_symlinkDraftOrderClients(self):
        # asyncssh, WinSCP, Node.js's ssh2, libssh (KDE) and sshj send the
        # drafts' order to a server that does not call itself OpenSSH.
        self.assertSymlinkOrder((b"SSH-2.0-AsyncSSH_2.24.1", b"SSH-2.0-WinSCP_release_6.3.5",
                                 b"SSH-2.0-ssh2js1.16.0", b"SSH-2.0-libssh_0.10.6",
                                 b"SSH-2.0-libssh_0.12.0", b"SSH-2.0-SSHJ_0_39_0"),
                                linkFirst=True)

    def test_symlinkOpenSSHOrderForOthers(self):
        # paramiko, OpenSSH's sftp, sshfs, rclone, JSch, libssh2 (curl; its
        # prefix is not libssh's) and Cyberduck (on sshj, under its own
        # name): OpenSSH's order.
        self.assertSymlinkOrder((b"SSH-2.0-paramiko_3.4.0", b"SSH-2.0-OpenSSH_9.2p1 Debian-2",
                                 b"SSH-2.0-Go", b"SSH-2.0-JSCH_0.2.16",
                                 b"SSH-2.0-libssh2_1.10.0", b"SSH-2.0-Cyberduck/9.1.2"),
                                linkFirst=False)

    def test_setstat(self):
        self.init()
        self.open(b"f", sftp.FXF_WRITE | sftp.FXF_CREAT)
        reply = self.request(sftp.FXP_SETSTAT, string(b"f") + attrs(0o600, (100, 200), 5))
        self.assertEqual(reply.status, sftp.FX_OK)
        st = os.stat(os.path.join(self.volume, "f"))
        self.assertEqual((stat.S_IMODE(st.st_mode), st.st_atime, st.st_mtime, st.st_size), (0o600, 100, 200, 5))

    def test_chownRefused(self):
        self.init()
        self.open(b"f", sftp.FXF_WRITE | sftp.FXF_CREAT)
        st = os.stat(os.path.join(self.volume, "f"))
        same = struct.pack(">III", sftp.FILEXFER_ATTR_UIDGID, st.st_uid, st.st_gid)
        self.assertEqual(self.request(sftp.FXP_SETSTAT, string(b"f") + same).status, sftp.FX_OK)
        other = struct.pack(">III", sftp.FILEXFER_ATTR_UIDGID, st.st_uid + 1, st.st_gid)
        self.assertEqual(self.request(sftp.FXP_SETSTAT, string(b"f") + other).status, sftp.FX_PERMISSION_DENIED)

    # -- flow control -------------------------------------------------------

    def test_pausedServerReadsNoRequests(self):
        self.init()
        self.server.pauseProducing()
        self.assertEqual(self.feed(packet(sftp.FXP_STAT, 1, string(b"/"))), [])
        self.server.resumeProducing()
        [reply] = self.replies()
        self.assertEqual((reply.kind, reply.id), (sftp.FXP_ATTRS, 1))

    def test_partialPackets(self):
        self.init()
        data = packet(sftp.FXP_STAT, 1, string(b"/")) + packet(sftp.FXP_STAT, 2, string(b"/"))
        out = []
        for i in range(len(data)):
            out.extend(self.feed(data[i : i + 1]))
        self.assertEqual([r.id for r in out], [1, 2])
