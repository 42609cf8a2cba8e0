"""
Fuzzing L{lightd_conch.sftp.SFTPServer}, legacy scp's records and the admin
API's bodies in-process with hypothesis (scp and the API: see their sections
at the end).

Generated packets, well-formed or truncated, padded, pipelined with repeated ids
and cut into arbitrary chunks (with the protocol paused and resumed between
them), are fed to a server over a fake session channel, on a fresh volume holding
hostile links, a FIFO and a loop, next to an outside sentinel.  For every
example:

  - no exception escapes and nothing is logged as a failure;
  - every request that a framing model of the stream says was read gets
    exactly one reply with its id (or none, for a copy-data cut short by the
    close), and the channel is closed exactly when the model says so;
  - every reply is a well-formed v3 packet: known type, v3 status code,
    UTF-8 message without a host path, DATA within 261120 bytes, no trailing
    bytes;
  - nothing outside the volume is created, changed or even read (atime is
    checked with O_NOATIME), and every fd the session opened is closed when
    it ends.

The run is derandomized so CI sees the same examples every time; the whole
file runs in well under a minute.
"""

import collections
import json
import os
import shutil
import stat
import struct
import tempfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, multiple, rule, run_state_machine_as_test
from twisted.internet.task import Clock, Cooperator
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from lightd_conch import sftp
from lightd_conch.testing import FakeSessionChannel
from lightd_conch.volume import Volume

# The contract, written out here rather than read from the module under test.
MAX_PACKET_LENGTH = 256 * 1024
MAX_READ_LENGTH = 261120
V3_STATUS_CODES = {0, 1, 2, 3, 4, 5, 8}
REPLY_TYPES = {2, 101, 102, 103, 104, 105, 201}
INIT, STATUS, HANDLE, DATA, NAME, ATTRS, EXTENDED = 1, 101, 102, 103, 104, 105, 200

SECRET = b"outside-sentinel: never read\n"
OLD = 1_000_000_000

FUZZ_SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    # The two resolver classes share these methods; with no database, nothing is replayed.
    suppress_health_check=[
        HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors,
    ],
)

# -- strategies ---------------------------------------------------------------

uint32 = st.one_of(
    st.sampled_from([0, 1, 2, 4, 5, 255, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]),
    st.integers(0, 0xFFFFFFFF),
)
request_ids = st.one_of(st.integers(0, 6), st.just(0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
# Offsets where data could land stay small: a fuzzer must not make multi-GiB
# sparse files that a later copy-data would fill (on tmpfs even 2**63 - 1 is a
# valid size).  Values past off_t are fine: they must be refused.
write_offsets = st.one_of(st.integers(0, 1 << 20), st.sampled_from([2**63, 2**64 - 1]))
read_offsets = st.one_of(write_offsets, st.integers(0, 2**64 - 1))

PATH_ATOMS = [
    b"", b".", b"..", b"...", b"f", b"d", b"g", b"new", b"up", b"abs", b"mid", b"rel",
    b"dangle", b"loop", b"fifo", b"\xff\xfe", b"\xc0\xae\xc0\xae", b"%2e%2e", b"..\\..",
    b"a\x00b", b"~", b"n" * 256, b"/proc/self/root", b"proc",
]
# Names that exist (or can be made) come up often enough for handles to be
# opened and used; the rest are hostile or random.
GOOD_PATHS = [
    b"f", b"d", b"d/g", b"new", b"d/new", b"/", b".", b"up/f", b"d/../f", b"abs", b"mid/secret",
    b"rel/secret", b"dangle", b"fifo", b"loop", b"up/d/g",
]
paths = st.one_of(
    st.sampled_from(GOOD_PATHS),
    st.sampled_from(GOOD_PATHS),
    st.lists(st.sampled_from(PATH_ATOMS), max_size=6).flatmap(
        lambda atoms: st.sampled_from([b"/", b""]).map(lambda lead: lead + b"/".join(atoms))
    ),
    st.binary(max_size=40),
)
OTHER_HANDLES = [b"4", b"5", b"8", b"10", b"", b"0", b"-1", b"1\x00", b"\xff" * 8]
handles = st.integers(0, 20).flatmap(
    lambda i: st.just(b"%d" % (i % 3 + 1)) if i < 12
    else st.just(OTHER_HANDLES[i - 12]) if i < 12 + len(OTHER_HANDLES)
    else st.binary(max_size=12)
)
EXTENSION_NAMES = [name for name, _ in sftp.EXTENSIONS] + [
    b"", b"unknown@example.com", b"copy-data\x00", b"posix-rename@openssh.co",
]


def u32(n):
    return struct.pack(">I", n)


def u64(n):
    return struct.pack(">Q", n)


def sstring(data):
    return u32(len(data)) + data


@st.composite
def attribute_blocks(draw):
    flags = draw(st.one_of(st.integers(0, 0x0F), st.sampled_from([0x8000000F, 0x80000000]), uint32))
    body = u32(flags)
    if flags & 0x01:
        body += u64(draw(write_offsets))
    if flags & 0x02:
        body += u32(draw(st.sampled_from([0, os.getuid(), 1, 65534]))) + u32(
            draw(st.sampled_from([0, os.getgid(), 1]))
        )
    if flags & 0x04:
        body += u32(draw(st.one_of(st.sampled_from([0o644, 0o755, 0o600, 0o7777]), uint32)))
    if flags & 0x08:
        body += u32(draw(uint32)) + u32(draw(uint32))
    if flags & 0x80000000:
        count = draw(st.one_of(st.integers(0, 2), st.just(0xFFFFFFFF)))
        body += u32(count)
        for _ in range(min(count, 2)):
            body += sstring(draw(st.binary(max_size=8))) + sstring(draw(st.binary(max_size=8)))
    return body


def _fields(*strategies):
    return st.tuples(*strategies).map(lambda parts: b"".join(parts))


path_field = paths.map(sstring)
handle_field = handles.map(sstring)
attrs_field = attribute_blocks()

REQUEST_BODIES = {
    3: _fields(
        path_field,
        st.one_of(st.sampled_from([1, 1, 3, 0x0A, 0x0B, 0x1A, 0x0E, 0x2A]), st.integers(0, 0x3F), uint32)
        .map(u32),
        attrs_field,
    ),
    4: handle_field,
    5: _fields(handle_field, read_offsets.map(u64), uint32.map(u32)),
    6: _fields(handle_field, write_offsets.map(u64), st.binary(max_size=64).map(sstring)),
    7: path_field,
    8: handle_field,
    9: _fields(path_field, attrs_field),
    10: _fields(handle_field, attrs_field),
    11: path_field,
    12: handle_field,
    13: path_field,
    14: _fields(path_field, attrs_field),
    15: path_field,
    16: path_field,
    17: path_field,
    18: _fields(path_field, path_field),
    19: path_field,
    20: _fields(path_field, path_field),
}

EXTENSION_BODIES = {
    b"posix-rename@openssh.com": _fields(path_field, path_field),
    b"statvfs@openssh.com": path_field,
    b"fstatvfs@openssh.com": handle_field,
    b"hardlink@openssh.com": _fields(path_field, path_field),
    b"fsync@openssh.com": handle_field,
    b"lsetstat@openssh.com": _fields(path_field, attrs_field),
    b"limits@openssh.com": st.just(b""),
    b"expand-path@openssh.com": st.one_of(path_field, paths.map(lambda p: sstring(b"~" + p))),
    b"copy-data": _fields(
        handle_field, read_offsets.map(u64), read_offsets.map(u64), handle_field,
        write_offsets.map(u64),
    ),
    b"home-directory": st.binary(max_size=12).map(sstring),
    b"users-groups-by-id@openssh.com": _fields(
        st.binary(max_size=13).map(sstring), st.binary(max_size=13).map(sstring)
    ),
}


@st.composite
def extended_bodies(draw):
    name = draw(st.sampled_from(EXTENSION_NAMES))
    body = EXTENSION_BODIES.get(name, st.binary(max_size=16))
    return sstring(name) + draw(body)


@st.composite
def requests(draw):
    """One framed request: a well-formed body, perhaps cut short or padded."""
    kind = draw(st.sampled_from(
        sorted(REQUEST_BODIES) + [3] * 6 + [4, 5, 5, 6, 6, 11, 11, 12, 12] + [EXTENDED] * 6
        + [0, 2, 21, 99, 101, 104, 201, 255]
    ))
    if kind in REQUEST_BODIES:
        body = draw(REQUEST_BODIES[kind])
    elif kind == EXTENDED:
        body = draw(extended_bodies())
    else:
        body = draw(st.binary(max_size=16))
    mangle = draw(st.sampled_from(["none"] * 6 + ["truncate", "pad"]))
    if mangle == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif mangle == "pad":
        body += draw(st.binary(min_size=1, max_size=8))
    payload = bytes([kind]) + u32(draw(request_ids)) + body
    return u32(len(payload)) + payload


init_packets = st.one_of(
    st.sampled_from([3, 1, 2, 4, 6, 0, 0xFFFFFFFF]).map(lambda v: u32(5) + bytes([INIT]) + u32(v)),
    st.binary(max_size=4).map(lambda extra: u32(5 + len(extra)) + bytes([INIT]) + u32(3) + extra),
)

framing_breakers = st.one_of(
    st.integers(0, 4).flatmap(lambda n: st.binary(min_size=n, max_size=n).map(lambda b: u32(n) + b)),
    st.sampled_from([u32(MAX_PACKET_LENGTH + 1), u32(0xFFFFFFFF), u32(0x80000000)]),
    st.just(u32(5) + bytes([INIT]) + u32(3)),  # INIT twice
)


def _request(kind, request_id, body):
    payload = bytes([kind]) + u32(request_id) + body
    return u32(len(payload)) + payload


# Handles "1" (f, read-write), "2" (new, created) and "3" (directory d) for
# the requests that follow to use.
OPEN_HANDLES = (
    _request(3, 0x7000, sstring(b"f") + u32(0x03) + u32(0))
    + _request(3, 0x7001, sstring(b"new") + u32(0x1A) + u32(0))
    + _request(11, 0x7002, sstring(b"d"))
)


@st.composite
def streams(draw):
    """
    The bytes a client sends: usually INIT first, then requests; sometimes a
    framing error or a second INIT somewhere, sometimes raw noise.
    """
    parts = []
    if draw(st.integers(0, 9)):
        parts.append(draw(init_packets))
        if draw(st.integers(0, 3)):
            parts.append(OPEN_HANDLES)
    parts += draw(st.lists(requests(), min_size=1, max_size=20))
    if not draw(st.integers(0, 5)):
        parts.insert(draw(st.integers(0, len(parts))), draw(framing_breakers))
    if not draw(st.integers(0, 7)):
        parts.append(draw(st.binary(max_size=64)))
    return b"".join(parts)


@st.composite
def deliveries(draw, stream):
    """The stream cut into chunks, each maybe followed by a pause or a resume."""
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks, start = [], 0
    for cut in cuts + [len(stream)]:
        chunks.append((stream[start:cut], draw(st.sampled_from([None, None, "pause", "resume"]))))
        start = cut
    return chunks


# -- the model of what must be answered -------------------------------------


def expected_requests(stream):
    """
    What a conforming server reads from C{stream}: (ids of the requests it must
    answer, ids of those that are copy-data, whether VERSION is sent, whether
    it must close the channel).
    """
    ids, copies = [], []
    pos, version = 0, False
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from(">I", stream, pos)
        if length < 5 or length > MAX_PACKET_LENGTH:
            return ids, copies, version, True
        if len(stream) - pos - 4 < length:
            break
        body = stream[pos + 4 : pos + 4 + length]
        pos += 4 + length
        if body[0] == INIT:
            if version:
                return ids, copies, version, True
            version = True
            continue
        if not version:
            return ids, copies, version, True
        (request_id,) = struct.unpack_from(">I", body, 1)
        ids.append(request_id)
        if body[0] == EXTENDED and body[5:].startswith(sstring(b"copy-data")):
            copies.append(request_id)
    return ids, copies, version, False


# -- checking replies ---------------------------------------------------------


def require(condition, message):
    """Like assert, but not stripped by -O, and usable outside a TestCase."""
    if not condition:
        raise AssertionError(message)


class _Body:
    def __init__(self, data):
        self.data, self.pos = data, 0

    def take(self, n):
        require(self.pos + n <= len(self.data), f"reply field runs past the packet: {self.data!r}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint32(self):
        return struct.unpack(">I", self.take(4))[0]

    def string(self):
        return self.take(self.uint32())

    def attrs(self):
        flags = self.uint32()
        require(not flags & ~0x0F, f"reply attrs with unknown flags {flags:#x}")
        self.take((8 if flags & 1 else 0) + (8 if flags & 2 else 0)
                  + (4 if flags & 4 else 0) + (8 if flags & 8 else 0))

    def end(self):
        require(self.pos == len(self.data), f"trailing bytes in reply {self.data!r}")


def parse_replies(data):
    """The framed replies in C{data}: a list of (type, request id or None, _Body after the id)."""
    replies = []
    while data:
        require(len(data) >= 5, f"short reply framing {data!r}")
        (length,) = struct.unpack_from(">I", data)
        require(length >= 1 and 4 + length <= len(data), "a reply's length runs past the output")
        kind, body = data[4], _Body(data[5 : 4 + length])
        data = data[4 + length :]
        require(kind in REPLY_TYPES, f"reply of unknown type {kind}")
        replies.append((kind, None if kind == 2 else body.uint32(), body))
    return replies


def check_reply(kind, body, hostPath):
    """A reply's body is well-formed v3 and reveals nothing from outside the volume."""
    if kind == 2:
        require(body.uint32() == 3, "VERSION is not 3")
        while body.pos < len(body.data):
            body.string(), body.string()
    elif kind == STATUS:
        require(body.uint32() in V3_STATUS_CODES, "a status code v3 does not have")
        message = body.string()
        message.decode("utf-8")
        require(hostPath not in message, f"a host path in a status message: {message!r}")
        body.string()
    elif kind == HANDLE:
        require(len(body.string()) <= 256, "an overlong handle")
    elif kind == DATA:
        payload = body.string()
        require(len(payload) <= MAX_READ_LENGTH, f"DATA of {len(payload)} bytes")
        require(SECRET not in payload, "DATA holds the outside sentinel")
    elif kind == NAME:
        for _ in range(body.uint32()):
            name = body.string()
            body.string()
            body.attrs()
            require(name not in (b"secret", b"sub"), f"an outside name listed: {name!r}")
    elif kind == ATTRS:
        body.attrs()
    else:
        body.pos = len(body.data)  # EXTENDED_REPLY: the extension's own format
    body.end()


def snapshot(path):
    """Everything observable about the tree at C{path}, read without touching atimes."""
    st_ = os.lstat(path)
    meta = (st_.st_mode, st_.st_size, st_.st_nlink, st_.st_mtime_ns, st_.st_atime_ns)
    if stat.S_ISLNK(st_.st_mode):
        return meta, os.readlink(path)
    if stat.S_ISDIR(st_.st_mode):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
        try:
            names = sorted(os.listdir(fd))
        finally:
            os.close(fd)
        return meta, {name: snapshot(os.path.join(path, name)) for name in names}
    fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
    try:
        return meta, os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def open_fds():
    return set(os.listdir("/proc/self/fd"))


def scratch_folder(testcase):
    """A folder for many small trees; on tmpfs making and removing them is quick."""
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = tempfile.mkdtemp(prefix="lightd-fuzz-", dir=shm)
    testcase.addCleanup(shutil.rmtree, folder, ignore_errors=True)
    return folder


class Session:
    """
    A fresh volume (with links to the outside planted in it) next to an
    outside sentinel, and one SFTP server on it over a fake session channel.
    """

    def __init__(self, workdir, useOpenat2):
        self.workdir = workdir
        self.base = tempfile.mkdtemp(dir=workdir)
        self.outside = os.path.join(self.base, "outside")
        self.volume = os.path.join(self.base, "volume")
        self._makeTree()
        self.before = self.outsideState()
        self.fdsBefore = open_fds()
        self.clock = Clock()
        cooperator = Cooperator(
            terminationPredicateFactory=lambda: lambda: False,
            scheduler=lambda step: self.clock.callLater(0, step),
        )
        self.events = []
        self.server = sftp.SFTPServer(
            Volume.open(self.volume, useOpenat2=useOpenat2),
            maxHandles=8,
            cooperator=cooperator,
        )
        self.server._log = Logger(observer=self.events.append)
        self.transport = FakeSessionChannel()
        self.server.makeConnection(self.transport)

    def _makeTree(self):
        os.makedirs(os.path.join(self.outside, "sub"))
        with open(os.path.join(self.outside, "secret"), "wb") as f:
            f.write(SECRET)
        os.makedirs(os.path.join(self.volume, "d"))
        with open(os.path.join(self.volume, "f"), "wb") as f:
            f.write(b"inside file\n" * 100)
        with open(os.path.join(self.volume, "d", "g"), "wb") as f:
            f.write(b"g\n")
        for name, target in (
            ("up", "../.."), ("abs", os.path.join(self.outside, "secret")),
            ("mid", self.outside), ("rel", "../outside"),
            ("dangle", os.path.join(self.outside, "new")), ("loop", "loop"),
        ):
            os.symlink(target, os.path.join(self.volume, name))
        os.mkfifo(os.path.join(self.volume, "fifo"))
        for path in (os.path.join(self.outside, "secret"), os.path.join(self.outside, "sub"),
                     self.outside):
            os.utime(path, (OLD, OLD))

    def outsideState(self):
        return (
            sorted(os.listdir(self.workdir)),
            sorted(os.listdir(self.base)),
            snapshot(self.outside),
        )

    def settle(self):
        """Let running copy-data requests finish."""
        for _ in range(2000):
            if not self.clock.getDelayedCalls():
                return
            self.clock.advance(0)
        raise AssertionError("a copy-data never finished")

    def output(self):
        data = self.transport.value()
        self.transport.clear()
        return parse_replies(data)

    def end(self):
        """
        End the session and check what it left behind: no failure logged, no
        fd left open, nothing outside changed or read.  Removes the tree.
        """
        try:
            self.server.connectionLost(None)
            for _ in range(10):
                self.clock.advance(0)
            failures = [e for e in self.events if "log_failure" in e]
            require(not failures, f"the server logged failures: {failures!r}")
            require(open_fds() == self.fdsBefore, "the session leaked file descriptors")
            require(self.outsideState() == self.before, "something outside the volume changed")
        finally:
            os.chmod(self.volume, 0o755)
            shutil.rmtree(self.base, ignore_errors=True)


class StreamFuzzMixin:
    """
    Whole request streams, pipelined, cut into chunks and paused anywhere,
    checked against the framing model.
    """

    useOpenat2 = True

    def setUp(self):
        self.workdir = scratch_folder(self)

    def run_stream(self, chunks):
        session = Session(self.workdir, self.useOpenat2)
        try:
            stream = b""
            for data, action in chunks:
                stream += data
                session.server.dataReceived(data)
                if action == "pause":
                    session.server.pauseProducing()
                elif action == "resume":
                    session.server.resumeProducing()
            session.server.resumeProducing()
            session.settle()
            require(len(session.server._handles) <= 8, "more handles than maxHandles")
            replies = session.output()
            lost = session.transport.lost
        finally:
            session.end()
        ids, copies, version, closes = expected_requests(stream)
        self.assertEqual(lost, closes, "the channel was closed (or kept) wrongly")
        hostPath = os.fsencode(session.base)
        answered = collections.Counter()
        for kind, request_id, body in replies:
            check_reply(kind, body, hostPath)
            if request_id is not None:
                answered[request_id] += 1
        self.assertEqual(sum(1 for r in replies if r[0] == 2), 1 if version else 0)
        wanted = collections.Counter(ids)
        optional = collections.Counter(copies) if closes else collections.Counter()
        self.assertTrue(
            wanted - optional <= answered <= wanted,
            f"requests {dict(wanted)} got replies {dict(answered)}",
        )

    @FUZZ_SETTINGS
    @given(st.data())
    @example(None)
    def test_requests(self, data):
        """Request streams, cut and paused anywhere: one reply each, or a close."""
        if data is None:
            # Offsets and sizes past off_t once logged an OverflowError each.
            stream = u32(5) + bytes([INIT]) + u32(3) + b"".join(
                _request(kind, request_id, body) for kind, request_id, body in (
                    (3, 1, sstring(b"f") + u32(3) + u32(0)),
                    (5, 2, sstring(b"1") + u64(2**64 - 1) + u32(10)),
                    (6, 3, sstring(b"1") + u64(2**63) + sstring(b"x")),
                    (9, 4, sstring(b"f") + u32(1) + u64(2**63)),
                    (10, 5, sstring(b"1") + u32(1) + u64(2**64 - 1)),
                )
            )
            self.run_stream([(stream, None)])
            return
        stream = data.draw(streams())
        self.run_stream(data.draw(deliveries(stream)))

    @FUZZ_SETTINGS
    @given(st.binary(max_size=300), st.booleans())
    def test_noise(self, noise, initialised):
        """Raw bytes, after INIT or instead of it."""
        stream = (u32(5) + bytes([INIT]) + u32(3) if initialised else b"") + noise
        self.run_stream([(stream, None)])


class Openat2StreamFuzzTests(StreamFuzzMixin, SynchronousTestCase):
    useOpenat2 = True


class WalkStreamFuzzTests(StreamFuzzMixin, SynchronousTestCase):
    useOpenat2 = False


# -- one request at a time, on handles the server really gave -----------------

PATH_REQUESTS = [7, 9, 11, 13, 14, 15, 16, 17, 18, 19, 20]


class SessionMachine(RuleBasedStateMachine):
    """
    A session driven one request at a time: handles come from the server's
    own HANDLE replies and go into every handle request (also after they are
    closed), mixed with path requests and arbitrary packets.  Each request
    must get exactly one well-formed reply, at once (copy-data once it ran).
    """

    useOpenat2 = True
    workdir = None

    files = Bundle("files")
    directories = Bundle("directories")

    def __init__(self):
        super().__init__()
        self.session = Session(self.workdir, self.useOpenat2)
        self.nextId = 0
        self.session.server.dataReceived(u32(5) + bytes([INIT]) + u32(3))
        [(kind, _, _)] = self.session.output()
        require(kind == 2, "no VERSION")

    def request(self, kind, body):
        self.nextId += 1
        self.session.server.dataReceived(_request(kind, self.nextId, body))
        self.session.settle()
        replies = self.session.output()
        require(not self.session.transport.lost, "a well-framed request closed the channel")
        require(len(replies) == 1, f"{len(replies)} replies to one request of type {kind}")
        [(replyKind, replyId, body)] = replies
        require(replyId == self.nextId, f"reply id {replyId} for request {self.nextId}")
        checked = _Body(body.data)
        checked.pos = body.pos
        check_reply(replyKind, checked, os.fsencode(self.session.base))
        return replyKind, body

    def opened(self, kind, body):
        if kind != HANDLE:
            return multiple()
        return body.string()

    @rule(target=files, path=paths, pflags=st.sampled_from([1, 2, 3, 0x0A, 0x0B, 0x1A, 0x0E, 0x2A]),
          attributes=attrs_field)
    def open(self, path, pflags, attributes):
        return self.opened(*self.request(3, sstring(path) + u32(pflags) + attributes))

    @rule(target=directories, path=paths)
    def opendir(self, path):
        return self.opened(*self.request(11, sstring(path)))

    @rule(handle=st.one_of(files, files, directories, handles),
          offset=st.one_of(st.integers(0, 2000), read_offsets),
          length=st.one_of(st.integers(0, 300_000), uint32))
    def read(self, handle, offset, length):
        self.request(5, sstring(handle) + u64(offset) + u32(length))

    @rule(handle=st.one_of(files, handles), offset=write_offsets, data=st.binary(max_size=300))
    def write(self, handle, offset, data):
        self.request(6, sstring(handle) + u64(offset) + sstring(data))

    @rule(handle=st.one_of(files, directories, handles),
          kind=st.sampled_from([4, 8, 12]))
    def handle_request(self, handle, kind):
        self.request(kind, sstring(handle))

    @rule(handle=st.one_of(files, directories), attributes=attrs_field)
    def fsetstat(self, handle, attributes):
        self.request(10, sstring(handle) + attributes)

    @rule(handle=st.one_of(files, directories))
    def close(self, handle):
        # Closed handles stay in their bundle: later requests reuse them.
        self.request(4, sstring(handle))

    @rule(handle=st.one_of(files, directories),
          name=st.sampled_from([b"fsync@openssh.com", b"fstatvfs@openssh.com"]))
    def handle_extension(self, handle, name):
        self.request(EXTENDED, sstring(name) + sstring(handle))

    @rule(source=st.one_of(files, directories), destination=st.one_of(files, directories),
          readOffset=read_offsets, length=read_offsets, writeOffset=write_offsets)
    def copy_data(self, source, destination, readOffset, length, writeOffset):
        self.request(EXTENDED, sstring(b"copy-data") + sstring(source) + u64(readOffset)
                     + u64(length) + sstring(destination) + u64(writeOffset))

    @rule(kind=st.sampled_from(PATH_REQUESTS), first=paths, second=paths, attributes=attrs_field)
    def path_request(self, kind, first, second, attributes):
        body = sstring(first)
        if kind in (18, 20):
            body += sstring(second)
        elif kind in (9, 14):
            body += attributes
        self.request(kind, body)

    @rule(body=extended_bodies())
    def extension(self, body):
        self.request(EXTENDED, body)

    @rule(packet=requests())
    def anything(self, packet):
        kind, body = packet[4], packet[9:]
        self.request(kind, body)

    def teardown(self):
        self.session.end()


class MachineMixin:
    useOpenat2 = True

    def test_session(self):
        machine = type("Machine", (SessionMachine,), {
            "useOpenat2": self.useOpenat2, "workdir": scratch_folder(self),
        })
        run_state_machine_as_test(machine, settings=settings(
            FUZZ_SETTINGS, max_examples=150, stateful_step_count=40,
        ))


class Openat2SessionFuzzTests(MachineMixin, SynchronousTestCase):
    useOpenat2 = True


class WalkSessionFuzzTests(MachineMixin, SynchronousTestCase):
    useOpenat2 = False


# -- legacy scp's records ------------------------------------------------------
#
# Any value in any field of a record (C, D, T, E, the client's own error
# lines and status bytes), cut anywhere, to the sink and the source: the
# exchange always ends with an exit status (0, or 1 with an error line),
# every byte sent is an ack or one escaped message line, nothing is logged
# (no value reaches an unforeseen error), no descriptor is left open and
# nothing outside the volume changes.

scp_numbers = st.one_of(
    st.integers(0, 2**31),
    st.sampled_from([2**31 - 1, 2**32, 2**63 - 1, 2**63, 2**64, 10**20, 10**30]),
    st.integers(0, 2**80),
).map(lambda n: b"%d" % n)
scp_fields = st.one_of(
    scp_numbers, scp_numbers,
    st.sampled_from([b"", b"-1", b"+1", b"0x10", b" 1", b"1 ", b"9" * 25, b"0" * 30 + b"1",
                     b"1e9", b"\xff", b"1\x00"]),
    st.binary(max_size=8),
)
scp_modes = st.one_of(
    st.sampled_from([b"0644", b"0755", b"7777", b"0000", b"4755", b"2775", b"1777"]),
    st.sampled_from([b"8888", b"777", b"07777", b"-644", b"", b"06 4"]),
    st.binary(min_size=4, max_size=4),
)
SCP_NAMES = [
    b"f", b"d", b"g", b"new", b".", b"..", b"/", b"a/b", b"../up", b"a\x00b", b"a\nb",
    b"\xff\xfe", b"n" * 255, b"n" * 256, b"$(touch x)", b"-x", b" ", b"up", b"abs", b"\r",
]
scp_names = st.one_of(st.sampled_from(SCP_NAMES), st.binary(max_size=20))


@st.composite
def scp_records(draw):
    kind = draw(st.sampled_from("TTCCDDEM?"))
    if kind == "T":
        fields = [draw(scp_fields) for _ in range(4)]
        return b"T" + b" ".join(fields) + b"\n"
    if kind in "CD":
        size = draw(scp_fields)
        record = kind.encode() + draw(scp_modes) + b" " + size + b" " + draw(scp_names) + b"\n"
        if kind == "C" and size.isdigit() and int(size) <= 64 and draw(st.booleans()):
            record += bytes(int(size)) + draw(st.sampled_from([b"\0", b"\x01oops\n", b"\x02no\n",
                                                                 b"x", b""]))
        return record
    if kind == "E":
        return b"E" + draw(st.sampled_from([b"", b"xtra"])) + b"\n"
    if kind == "M":
        return draw(st.sampled_from([b"\x01", b"\x02"])) + draw(st.binary(max_size=20)) + b"\n"
    return draw(st.binary(max_size=30))


SCP_SINKS = [b"scp -t /", b"scp -p -t /", b"scp -r -p -t /", b"scp -r -t d", b"scp -d -t /f",
             b"scp -p -t /f", b"scp -r -d -t /d"]
SCP_SOURCES = [b"scp -f f", b"scp -p -f f", b"scp -r -p -f /", b"scp -r -f d", b"scp -f 'd/*'",
               b"scp -f nope", b"scp -r -p -f abs"]


def check_scp_output(data, exitCode, sink, sent):
    """
    The sink sends acks and message lines only, the source records, data and
    message lines; exit status 1 comes with an error line (ours, or the
    client's own in what it C{sent}).
    """
    require(exitCode in (0, 1), f"exit status {exitCode!r}")
    messages = []
    if sink:
        rest = data
        while rest:
            if rest[:1] == b"\0":
                rest = rest[1:]
                continue
            require(rest[:6] in (b"\x01scp: ", b"\x02scp: "), f"not an ack or a message: {rest!r}")
            line, newline, rest = rest.partition(b"\n")
            require(newline, f"a message without its newline: {line!r}")
            messages.append(line)
    else:
        messages = [b"\x01" + m for m in data.split(b"\x01scp: ")[1:]]
        messages += [b"\x02" + m for m in data.split(b"\x02scp: ")[1:]]
        messages = [m.partition(b"\n")[0] for m in messages]
    for line in messages:
        require(not any(c < 0x20 or c == 0x7F for c in line[1:]),
                f"an unescaped control character in {line!r}")
    if exitCode == 1:
        require(messages or b"\x01" in sent or b"\x02" in sent,
                f"exit status 1 without an error line: {data[-200:]!r}")


class ScpFuzzTests(SynchronousTestCase):
    def setUp(self):
        from twisted.logger import globalLogPublisher

        self.workdir = scratch_folder(self)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def run_exchange(self, command, chunks):
        from lightd_conch import commands

        session = Session(self.workdir, True)  # its volume and outside sentinel
        session.server.connectionLost(None)
        del self.events[:]
        fdsBefore = open_fds()

        class Avatar:
            containerId = "demo"

            def openVolume(self, extraDescriptors=0):
                return Volume.open(session.volume, "demo")

        try:
            protocol = commands.execProtocol(command, Avatar())
            protocol.clock = session.clock
            channel = FakeSessionChannel()
            protocol.makeConnection(channel)
            for chunk in chunks:
                protocol.dataReceived(chunk)
                session.settle()
            protocol.eofReceived()
            session.settle()
            output = channel.output()
            exitCode = channel.exitCode
            protocol.connectionLost(None)
            require(channel.err == [] or exitCode is not None, "stderr without an exit status")
            check_scp_output(output, exitCode, b" -t " in command, b"".join(chunks))
            logged = [e for e in self.events
                      if e.get("log_namespace", "").startswith("lightd_conch")]
            require(not logged, f"logged: {logged!r}")
            require(open_fds() == fdsBefore, "the exchange leaked file descriptors")
            require(session.outsideState() == session.before, "something outside changed")
        finally:
            os.chmod(session.volume, 0o755)
            shutil.rmtree(session.base, ignore_errors=True)

    @FUZZ_SETTINGS
    @given(st.sampled_from(SCP_SINKS), st.lists(scp_records(), max_size=12), st.data())
    @example(b"scp -p -t /", [b"T99999999999999999999 0 1 0\n", b"C0644 1 f\nx\0"], None)
    @example(b"scp -r -p -t /", [b"T1 0 99999999999999999999 0\n", b"D0755 0 d\n", b"E\n"], None)
    def test_sink(self, command, records, data):
        stream = b"".join(records)
        if data is None or not stream:
            self.run_exchange(command, [stream])
            return
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
        self.run_exchange(command, [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])])

    @FUZZ_SETTINGS
    @given(st.sampled_from(SCP_SOURCES),
           st.lists(st.one_of(st.just(b"\0"), st.just(b"\0"), st.sampled_from(
               [b"\x01no\n", b"\x02stop\n", b"\x01", b"x", b"\n"]), st.binary(max_size=6)),
               max_size=20))
    def test_source(self, command, responses):
        self.run_exchange(command, responses)


# -- the admin API's bodies ----------------------------------------------------
#
# Any body (JSON or not, any value, any depth) with any Content-Type and
# Content-Length, to every endpoint: always a JSON answer (an object; with
# exactly "error" for a refusal) with a fitting status, never a 500, and
# nothing logged as a failure or an unforeseen error.

json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
        st.text(max_size=80), st.sampled_from(["\ud800", "a\x00b", "x" * 73, "demo", "-x"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
credential_bodies = st.fixed_dictionaries(
    {}, optional={"username": json_values, "password": json_values, "x": json_values}
)


@st.composite
def api_bodies(draw):
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        opener = draw(st.sampled_from(["[", "{\"a\":", "[{\"b\":"]))
        return (opener * draw(st.sampled_from([10, 31, 32, 33, 5000, 20000]))).encode()
    if kind == 2:
        return json.dumps(draw(json_values)).encode()
    text = json.dumps(draw(credential_bodies))
    if kind == 3 and len(text) > 2:
        cut = draw(st.integers(0, len(text)))
        return text[:cut].encode()
    return text.encode("utf-8", "surrogatepass")


API_REQUESTS = [
    ("POST", "/containers/demo/sftp/credentials"), ("GET", "/containers/demo/sftp/info"),
    ("DELETE", "/containers/demo/sftp/credentials"), ("POST", "/containers/new/sftp/credentials"),
    ("PUT", "/containers/demo/sftp/credentials"), ("GET", "/containers/../sftp/info"),
    ("POST", "/nowhere"),
]
API_STATUSES = {200, 204, 400, 401, 404, 405, 409, 413, 415}


class APIFuzzTests(SynchronousTestCase):
    def setUp(self):
        from twisted.internet.defer import maybeDeferred
        from twisted.logger import globalLogPublisher

        from lightd_conch import api
        from lightd_conch.accounts import Accounts
        from lightd_conch.testing import MemoryCredentialStore

        from .test_api import writeConfig

        self.config = writeConfig(self)
        os.makedirs(self.config.volume_path("demo"))
        self.api = api.AdminAPI(
            Accounts(self.config, MemoryCredentialStore(), clock=lambda: 1700000000),
            "lightd_token", run=maybeDeferred,
        )
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @FUZZ_SETTINGS
    @given(
        st.sampled_from(API_REQUESTS),
        api_bodies(),
        st.sampled_from([None, b"application/json", b"application/vnd.pkglatest+json",
                         b"application/x-www-form-urlencoded", b"text/plain", b"\xff;;",
                         b"multipart/form-data; boundary=x"]),
        st.one_of(st.none(), st.sampled_from([b"0", b"-1", b"9" * 30, b"65537", b"x", b"12 "])),
        st.sampled_from([b"Bearer lightd_token", b"Bearer wrong", None]),
    )
    @example(("POST", "/containers/demo/sftp/credentials"), b"[" * 50000, b"application/json",
             None, b"Bearer lightd_token")
    def test_bodies(self, route, body, contentType, length, authorization):
        from io import BytesIO
        from urllib.parse import unquote_to_bytes

        from twisted.web.test.requesthelper import DummyRequest

        method, path = route
        request = DummyRequest([unquote_to_bytes(s) for s in path.encode()[1:].split(b"/")])
        request.method = method.encode()
        request.content = BytesIO(body)
        for name, value in ((b"content-type", contentType), (b"content-length", length),
                            (b"authorization", authorization)):
            if value is not None:
                request.requestHeaders.setRawHeaders(name, [value])
        del self.events[:]
        request.render(self.api)
        require(request.finished == 1, "no answer")
        code = request.responseCode or 200
        require(code in API_STATUSES, f"status {code} for {body[:80]!r}")
        data = b"".join(request.written)
        if code == 204:
            require(data == b"", "a 204 with a body")
        else:
            require(request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"],
                    "not JSON")
            answer = json.loads(data)
            require(isinstance(answer, dict), "not a JSON object")
            if code >= 400:
                require(list(answer) == ["error"] and isinstance(answer["error"], str),
                        f"a refusal without its error: {answer!r}")
        problems = [e for e in self.events
                    if "log_failure" in e or e.get("log_level") is not None
                    and e["log_level"].name in ("error", "critical")]
        require(not problems, f"logged: {problems!r}")
