"""
Fuzzing L{lightd_conch.sftp.SFTPServer} in-process with hypothesis.

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
