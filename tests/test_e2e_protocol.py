"""
The SFTP protocol against the running service, over a raw paramiko channel
with the sftp subsystem: framing limits, truncated fields in every request
type, the INIT handshake, unknown requests, bad handles, the handle limit, a
client that floods READs and never opens its window, stderr data from the
client, and the per-connection channel limit.

Every misstep must end in one reply with the right id, or in a closed channel,
and the daemon must go on serving a fresh session.  The harness fails a test if
the service logged a traceback.
"""

import os
import sys
import threading
import time

from twisted.logger import Logger
from twisted.trial import unittest

from tests.harness import (
    StallingProxy,
    FX_BAD_MESSAGE,
    FX_EOF,
    FX_FAILURE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_FSETSTAT,
    FXP_FSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_READDIR,
    FXP_REALPATH,
    FXP_STATUS,
    FXP_VERSION,
    FXP_WRITE,
    PFLAG_CREAT,
    PFLAG_READ,
    PFLAG_TRUNC,
    PFLAG_WRITE,
    RawSFTP,
    Reader,
    attrs,
    default_config,
    make_credentials,
    packet,
    paramiko_sftp,
    paramiko_transport,
    require_paramiko,
    start_service,
    string,
    uint32,
    uint64,
    within,
)

FXP_EXTENDED, FXP_EXTENDED_REPLY = 200, 201
LIMIT = 256 * 1024
MAX_READ = 261120
MAX_HANDLES = 16
BIG_FILE_SIZE = 64 * 1024 * 1024
FLOOD_READS = 10_000
FLOOD_READ_SIZE = 32 * 1024
RSS_GROWTH_LIMIT = 200 * 1024 * 1024
WIDE_READS = 2000
WIDE_READ_SIZE = 255 * 1024
WIDE_RSS_GROWTH_LIMIT = 64 * 1024 * 1024

log = Logger()


def report(text):
    """A figure for the test log and for CI's output, where the lead reads it."""
    log.info("{text}", text=text)
    print(text, file=sys.__stdout__, flush=True)


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


class Session(RawSFTP):
    """
    A raw sftp channel, INIT optional, with numbered requests and a choice of
    the client's receive window.
    """

    def __init__(self, testcase, service, creds, init=True, transport=None,
                 window_size=None, max_packet_size=None, timeout=10):
        self.testcase = testcase
        self.transport = transport or paramiko_transport(
            testcase, service, creds["username"], creds["password"]
        )
        options = {}
        if window_size is not None:
            options = {"window_size": window_size, "max_packet_size": max_packet_size}
        self.channel = within(self.transport, timeout, "open_session",
                              lambda: self.transport.open_session(**options))
        self.channel.settimeout(timeout)
        within(self.transport, timeout, "the sftp subsystem request",
               self.channel.invoke_subsystem, "sftp")
        self.lastId = 0
        if init:
            self.init(3)

    def init(self, version):
        self.send(packet(FXP_INIT, uint32(version)))
        received = self.read_packet()
        self.testcase.assertIsNotNone(received, "the channel closed instead of VERSION")
        ptype, body = received
        self.testcase.assertEqual(ptype, FXP_VERSION)
        reader = Reader(body)
        self.testcase.assertEqual(reader.uint32(), 3, f"VERSION for a client of version {version}")
        extensions = {}
        while reader.pos < len(body):
            name = reader.string()
            extensions[name] = reader.string()
        return extensions

    def nextId(self):
        self.lastId += 1
        return self.lastId

    def call(self, ptype, *fields):
        """Send one request, return (reply type, Reader after the id)."""
        request_id = self.nextId()
        self.request(ptype, request_id, *fields)
        reply = self.read_reply(request_id)
        self.testcase.assertIsNotNone(reply, f"channel closed before replying to type {ptype}")
        return reply

    def status_of(self, ptype, *fields):
        reply_type, reader = self.call(ptype, *fields)
        self.testcase.assertEqual(reply_type, FXP_STATUS, f"request type {ptype}")
        return reader.uint32(), reader.string().decode("utf-8")

    def extended(self, name, *fields):
        return self.call(FXP_EXTENDED, string(name), *fields)

    def handle(self, ptype, *fields):
        reply_type, reader = self.call(ptype, *fields)
        self.testcase.assertEqual(reply_type, FXP_HANDLE, f"request type {ptype}")
        return reader.string()

    def open(self, path, pflags=PFLAG_READ):
        return self.handle(FXP_OPEN, string(path), uint32(pflags), attrs())

    def opendir(self, path):
        return self.handle(FXP_OPENDIR, string(path))

    def read(self, handle, offset, length):
        return self.call(FXP_READ, string(handle), uint64(offset), uint32(length))


class ProtocolTestCase(unittest.TestCase):
    timeout = 180

    def setUp(self):
        require_paramiko()
        config = default_config()
        config["sftp"]["max_handles"] = MAX_HANDLES
        self.service = start_service(self, config)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        (self.volume / "file.txt").write_bytes(b"content\n")
        (self.volume / "dir").mkdir()
        self.pid = self.service.process.pid

    def session(self, **kwargs):
        return Session(self, self.service, self.creds, **kwargs)

    def assertClosed(self, session, what):
        self.assertTrue(session.wait_closed(10), f"{what} did not close the channel")

    def assertStillServing(self):
        """A fresh session logs in and lists the volume."""
        sftp = paramiko_sftp(self, self.service, self.creds, timeout=15)
        self.assertEqual(sorted(sftp.listdir("/")), sorted(os.listdir(self.volume)))

    def send_quietly(self, session, data):
        """Send what the server may refuse midway; a closed channel is fine here."""
        def send():
            try:
                session.channel.sendall(data)
            except (OSError, EOFError):
                pass
        worker = threading.Thread(target=send, daemon=True)
        worker.start()
        return worker


class FramingTests(ProtocolTestCase):
    def test_lengths_0_to_4_close_the_channel(self):
        for length in range(5):
            session = self.session()
            session.send(uint32(length) + bytes([FXP_REALPATH, 0, 0, 0])[:length])
            self.assertClosed(session, f"a packet of length {length}")
        self.assertStillServing()

    def test_a_packet_of_exactly_the_limit_is_served(self):
        session = self.session()
        handle = session.open("big.bin", PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC)
        request_id = session.nextId()
        head = bytes([FXP_WRITE]) + uint32(request_id) + string(handle) + uint64(0)
        data = b"L" * (LIMIT - len(head) - 4)
        body = head + string(data)
        self.assertEqual(len(body), LIMIT)
        session.send(uint32(len(body)) + body)
        self.assertEqual(session.status(request_id), (FX_OK, "Success"))
        self.assertEqual(session.status_of(FXP_CLOSE, string(handle))[0], FX_OK)
        self.assertEqual((self.volume / "big.bin").read_bytes(), data)

    def test_limit_plus_one_closes_the_channel(self):
        session = self.session()
        handle = session.open("big.bin", PFLAG_WRITE | PFLAG_CREAT | PFLAG_TRUNC)
        head = bytes([FXP_WRITE]) + uint32(session.nextId()) + string(handle) + uint64(0)
        body = head + string(b"M" * (LIMIT + 1 - len(head) - 4))
        self.assertEqual(len(body), LIMIT + 1)
        self.send_quietly(session, uint32(len(body)) + body)
        self.assertClosed(session, "a packet one byte over the limit")
        self.assertEqual((self.volume / "big.bin").read_bytes(), b"")
        self.assertStillServing()

    def test_length_0xffffffff_closes_the_channel(self):
        session = self.session()
        session.send(uint32(0xFFFFFFFF) + bytes([FXP_WRITE]) + b"\0" * 64)
        self.assertClosed(session, "a packet claiming 4 GiB")
        self.assertStillServing()

    def test_requests_before_init_close_the_channel(self):
        for ptype, fields in (
            (FXP_REALPATH, string(".")),
            (FXP_OPEN, string("file.txt") + uint32(PFLAG_READ) + attrs()),
            (FXP_VERSION, b""),
            (FXP_EXTENDED, string("limits@openssh.com")),
            (99, b""),
        ):
            session = self.session(init=False)
            session.request(ptype, 7, fields)
            self.assertIsNone(session.read_packet(), f"a reply to type {ptype} before INIT")
            self.assertClosed(session, f"type {ptype} before INIT")
        self.assertStillServing()

    def test_init_twice_closes_the_channel(self):
        session = self.session()
        session.send(packet(FXP_INIT, uint32(3)))
        self.assertIsNone(session.read_packet(), "a reply to a second INIT")
        self.assertClosed(session, "a second INIT")
        self.assertStillServing()

    def test_any_client_version_gets_version_3(self):
        for version in (0, 1, 2, 4, 5, 6, 0x7FFFFFFF, 0xFFFFFFFF):
            session = self.session(init=False)
            extensions = session.init(version)
            self.assertIn(b"posix-rename@openssh.com", extensions)
            self.assertEqual(session.realpath(session.nextId(), "."), "/")

    def test_init_with_trailing_extension_data(self):
        session = self.session(init=False)
        session.send(packet(FXP_INIT, uint32(3) + string("client-ext@example.com") + string("1")))
        ptype, body = session.read_packet()
        self.assertEqual((ptype, Reader(body).uint32()), (FXP_VERSION, 3))
        self.assertEqual(session.realpath(session.nextId(), "."), "/")


def _truncations(fields):
    """Every prefix of the joined fields that cuts the last present field short."""
    body = b"".join(fields)
    return [body[:cut] for cut in range(len(body))]


class MalformedRequestTests(ProtocolTestCase):
    def test_a_truncated_field_in_every_request_type(self):
        session = self.session()
        (self.volume / "other.txt").write_bytes(b"other\n")
        fh = string(session.open("file.txt", PFLAG_READ | PFLAG_WRITE))
        other = string(session.open("other.txt", PFLAG_READ | PFLAG_WRITE))
        dh = string(session.opendir("dir"))
        path, path2 = string("file.txt"), string("dir/new.txt")
        mode = uint32(4) + uint32(0o644)
        requests = {
            3: [path, uint32(PFLAG_READ), mode],
            4: [fh],
            5: [fh, uint64(0), uint32(10)],
            6: [fh, uint64(0), string(b"data")],
            7: [path],
            8: [fh],
            9: [path, uint32(8) + uint32(1) + uint32(2)],
            10: [fh, mode],
            11: [string("dir")],
            12: [dh],
            13: [path],
            14: [path2, mode],
            15: [string("dir")],
            16: [path],
            17: [path],
            18: [path, path2],
            19: [path],
            20: [path, path2],
        }
        extensions = {
            "posix-rename@openssh.com": [path, path2],
            "statvfs@openssh.com": [path],
            "fstatvfs@openssh.com": [fh],
            "hardlink@openssh.com": [path, path2],
            "fsync@openssh.com": [fh],
            "lsetstat@openssh.com": [path, uint32(8) + uint32(1) + uint32(2)],
            "limits@openssh.com": [],
            "expand-path@openssh.com": [string("~/x")],
            "copy-data": [fh, uint64(0), uint64(0), other, uint64(0)],
            "home-directory": [string("demo")],
            "users-groups-by-id@openssh.com": [string(uint32(0)), string(uint32(0))],
            "no-such-extension@example.com": [],
        }
        cases = [(ptype, cut) for ptype, fields in requests.items() for cut in _truncations(fields)]
        cases += [
            (FXP_EXTENDED, cut)
            for name, fields in extensions.items()
            for cut in _truncations([string(name)] + fields)
        ]
        # Pipelined: all requests first, then all replies.
        first = session.lastId + 1
        for request_id, (ptype, cut) in enumerate(cases, start=first):
            session.request(ptype, request_id, cut)
        for request_id, (ptype, cut) in enumerate(cases, start=first):
            reply = session.read_reply(request_id)
            self.assertIsNotNone(reply, f"channel closed at type {ptype} cut {cut!r}")
            reply_type, reader = reply
            self.assertEqual(reply_type, FXP_STATUS, f"type {ptype} truncated to {cut!r}")
            self.assertEqual(reader.uint32(), FX_BAD_MESSAGE, f"type {ptype} truncated to {cut!r}")
        session.lastId = first + len(cases)
        # Nothing was acted on, and the session is still in step.
        self.assertEqual((self.volume / "file.txt").read_bytes(), b"content\n")
        self.assertEqual(sorted(os.listdir(self.volume / "dir")), [])
        reply_type, reader = session.read(fh[4:], 0, 100)
        self.assertEqual((reply_type, reader.string()), (FXP_DATA, b"content\n"))
        self.assertEqual(session.realpath(session.nextId(), "dir/.."), "/")

    def test_unknown_requests_get_op_unsupported(self):
        session = self.session()
        for ptype in (0, 2, 21, 50, 99, 100, 101, 102, 103, 104, 105, 199, 201, 202, 255):
            code, _ = session.status_of(ptype, b"any payload")
            self.assertEqual(code, FX_OP_UNSUPPORTED, f"packet type {ptype}")
        for name in ("", "unknown@example.com", "posix-rename@openssh.com\0",
                     "POSIX-RENAME@OPENSSH.COM", "copy-file", "check-file-name", "md5-hash",
                     "space-available", "version-select", "x" * 2000, "\xff\xfe"):
            reply_type, reader = session.extended(name, string("file.txt"), string("x"))
            self.assertEqual((reply_type, reader.uint32()), (FXP_STATUS, FX_OP_UNSUPPORTED), name)
        self.assertEqual(session.realpath(session.nextId(), "."), "/")


class HandleTests(ProtocolTestCase):
    def handle_requests(self, handle, other):
        h = string(handle)
        return {
            "READ": (FXP_READ, h + uint64(0) + uint32(10)),
            "WRITE": (FXP_WRITE, h + uint64(0) + string(b"x")),
            "CLOSE": (FXP_CLOSE, h),
            "FSTAT": (FXP_FSTAT, h),
            "FSETSTAT": (FXP_FSETSTAT, h + attrs(0o600)),
            "READDIR": (FXP_READDIR, h),
            "fstatvfs": (FXP_EXTENDED, string("fstatvfs@openssh.com") + h),
            "fsync": (FXP_EXTENDED, string("fsync@openssh.com") + h),
            "copy-data from": (FXP_EXTENDED, string("copy-data") + h + uint64(0) + uint64(0)
                               + string(other) + uint64(0)),
            "copy-data to": (FXP_EXTENDED, string("copy-data") + string(other) + uint64(0)
                             + uint64(0) + h + uint64(0)),
        }

    def test_invalid_and_closed_handles_in_every_handle_request(self):
        session = self.session()
        live = session.open("file.txt", PFLAG_READ | PFLAG_WRITE)
        closed_file = session.open("file.txt")
        closed_dir = session.opendir("dir")
        for handle in (closed_file, closed_dir):
            self.assertEqual(session.status_of(FXP_CLOSE, string(handle))[0], FX_OK)
        bad = [closed_file, closed_dir, b"", b"0", b"-1", b"no-such-handle", b"99999999999",
               b"\xff" * 300, live + b"\0", b" " + live]
        for name in self.handle_requests(b"", live):
            replies = set()
            for handle in bad:
                ptype, fields = self.handle_requests(handle, live)[name]
                code, message = session.status_of(ptype, fields)
                self.assertEqual(code, FX_FAILURE, f"{name} on handle {handle!r}")
                replies.add((code, message))
            # A closed handle and one that never existed look the same.
            self.assertEqual(len(replies), 1, f"{name}: {replies}")
        self.assertEqual(session.read(live, 0, 100)[1].string(), b"content\n")
        self.assertStillServing()

    def test_file_and_directory_handles_are_not_interchangeable(self):
        session = self.session()
        (self.volume / "other.txt").write_bytes(b"other\n")
        fh = session.open("file.txt", PFLAG_READ | PFLAG_WRITE)
        dh = session.opendir("dir")
        other = session.open("other.txt", PFLAG_READ | PFLAG_WRITE)
        self.assertEqual(session.status_of(FXP_READDIR, string(fh))[0], FX_FAILURE)
        for name, (ptype, fields) in self.handle_requests(dh, other).items():
            if name in ("READ", "WRITE", "fsync", "copy-data from", "copy-data to"):
                self.assertEqual(session.status_of(ptype, fields)[0], FX_FAILURE, name)
        # What any open handle allows, both allow.
        for handle in (fh, dh):
            self.assertEqual(session.call(FXP_FSTAT, string(handle))[0], FXP_ATTRS)
            reply_type, _ = session.extended("fstatvfs@openssh.com", string(handle))
            self.assertEqual(reply_type, FXP_EXTENDED_REPLY)
        # Both still work as what they are, and close once.
        self.assertEqual(session.read(fh, 0, 100)[1].string(), b"content\n")
        self.assertEqual(session.call(FXP_READDIR, string(dh))[0], FXP_NAME)
        for handle in (fh, dh, other):
            self.assertEqual(session.status_of(FXP_CLOSE, string(handle))[0], FX_OK)
            self.assertEqual(session.status_of(FXP_CLOSE, string(handle))[0], FX_FAILURE)
        self.assertEqual((self.volume / "file.txt").read_bytes(), b"content\n")

    def test_read_of_2_32_minus_1_bytes(self):
        data = os.urandom(1024 * 1024)
        (self.volume / "big.bin").write_bytes(data)
        session = self.session()
        handle = session.open("big.bin")
        for offset in (0, 12345, len(data) - MAX_READ - 1, len(data) - 10):
            reply_type, reader = session.read(handle, offset, 0xFFFFFFFF)
            self.assertEqual(reply_type, FXP_DATA)
            payload = reader.string()
            self.assertGreater(len(payload), 0)
            self.assertLessEqual(len(payload), MAX_READ)
            self.assertEqual(payload, data[offset:offset + len(payload)])
        reply_type, reader = session.read(handle, len(data), 0xFFFFFFFF)
        self.assertEqual((reply_type, reader.uint32()), (FXP_STATUS, FX_EOF))
        # Offsets past what the kernel takes are refused, not a crash in the log.
        for offset in (2**63, 2**64 - 1):
            reply_type, reader = session.read(handle, offset, 0xFFFFFFFF)
            self.assertEqual(reply_type, FXP_STATUS)
            self.assertIn(reader.uint32(), (FX_EOF, FX_FAILURE))
        self.assertEqual(session.realpath(session.nextId(), "."), "/")

    def wait_for_fds(self, at_most, what):
        deadline = time.monotonic() + 15
        while fd_count(self.pid) > at_most and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertLessEqual(fd_count(self.pid), at_most, what)

    def fill_handles(self, session):
        handles = [session.open("file.txt") for _ in range(MAX_HANDLES // 2)]
        handles += [session.opendir("dir") for _ in range(MAX_HANDLES - len(handles))]
        for ptype, fields in (
            (FXP_OPEN, string("file.txt") + uint32(PFLAG_READ) + attrs()),
            (FXP_OPEN, string("new.txt") + uint32(PFLAG_WRITE | PFLAG_CREAT) + attrs()),
            (FXP_OPENDIR, string("/")),
        ):
            code, message = session.status_of(ptype, fields)
            self.assertEqual(code, FX_FAILURE, f"handle {MAX_HANDLES + 1} was given")
        self.assertFalse((self.volume / "new.txt").exists())
        return handles

    def test_handle_exhaustion(self):
        before_session = fd_count(self.pid)
        session = self.session()
        reply_type, reader = session.extended("limits@openssh.com")
        self.assertEqual(reply_type, FXP_EXTENDED_REPLY)
        reader.uint64(), reader.uint64(), reader.uint64()
        self.assertEqual(reader.uint64(), MAX_HANDLES)
        baseline = fd_count(self.pid)

        handles = self.fill_handles(session)
        self.assertGreaterEqual(fd_count(self.pid), baseline + MAX_HANDLES)
        # Refused handles do not stop anything else, nor another session.
        self.assertEqual(session.call(FXP_FSTAT, string(handles[0]))[0], FXP_ATTRS)
        other = self.session()
        self.assertEqual(other.status_of(FXP_CLOSE, string(other.open("file.txt")))[0], FX_OK)

        # All released on close.
        for handle in handles:
            self.assertEqual(session.status_of(FXP_CLOSE, string(handle))[0], FX_OK)
        other.transport.close()
        self.wait_for_fds(baseline, "handles were not released on CLOSE")
        handles = self.fill_handles(session)

        # And on disconnect, without a CLOSE.
        session.transport.close()
        self.wait_for_fds(before_session, "handles were not released on disconnect")
        self.assertStillServing()


class ContainerHandleTests(ProtocolTestCase):
    """
    sftp.max_handles_per_container holds one container's descriptors across all
    its sessions: it cannot take the service's file descriptors from the others.
    Each session holds two besides its handles: its connection and its volume.
    """

    SESSIONS = 3
    CONTAINER_HANDLES = MAX_HANDLES + MAX_HANDLES // 2 + SESSIONS * 2

    def setUp(self):
        require_paramiko()
        config = default_config()
        config["sftp"]["max_handles"] = MAX_HANDLES
        config["sftp"]["max_handles_per_container"] = self.CONTAINER_HANDLES
        self.service = start_service(self, config)
        self.creds = make_credentials(self.service, "demo")
        self.volume = self.service.volume("demo")
        (self.volume / "file.txt").write_bytes(b"content\n")
        self.pid = self.service.process.pid

    def open_until_refused(self, session, limit):
        handles = []
        for _ in range(limit + 1):
            reply_type, reader = session.call(FXP_OPEN, string("file.txt"), uint32(PFLAG_READ),
                                              attrs())
            if reply_type != FXP_HANDLE:
                self.assertEqual(reply_type, FXP_STATUS)
                self.assertEqual((reader.uint32(), reader.string()),
                                 (FX_FAILURE, b"Too many open handles"))
                break
            handles.append(reader.string())
        return handles

    def test_sessions_of_one_container_share_its_handles(self):
        first, second, third = self.session(), self.session(), self.session()
        self.assertEqual(len(self.open_until_refused(first, MAX_HANDLES)), MAX_HANDLES)
        self.assertEqual(len(self.open_until_refused(second, MAX_HANDLES)), MAX_HANDLES // 2)
        self.assertEqual(self.open_until_refused(third, MAX_HANDLES), [])

        # Another container is not held back.
        other_creds = make_credentials(self.service, "other")
        (self.service.volume("other") / "file.txt").write_bytes(b"other\n")
        other = Session(self, self.service, other_creds)
        self.assertEqual(len(self.open_until_refused(other, MAX_HANDLES)), MAX_HANDLES)

        # What a session closes, or holds when it ends, is the container's again.
        self.assertEqual(self.open_until_refused(second, 0), [])
        first.transport.close()
        deadline = time.monotonic() + 10
        while True:
            got = self.open_until_refused(third, MAX_HANDLES)
            if got or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(len(got), MAX_HANDLES)


class FloodTests(ProtocolTestCase):
    timeout = 300

    def flood(self, session, count, size, seconds):
        """
        Send C{count} pipelined READs of C{size} bytes of big.bin and sample
        the service's RSS for C{seconds} while another session is served;
        returns (first request id, the sending thread, baseline, peak).
        """
        with open(self.volume / "big.bin", "wb") as f:
            f.truncate(BIG_FILE_SIZE)
        handle = session.open("big.bin")
        baseline = rss_bytes(self.pid)
        first = session.nextId()
        requests = b"".join(
            packet(FXP_READ, uint32(first + i) + string(handle)
                   + uint64(i * size % (BIG_FILE_SIZE - size)) + uint32(size))
            for i in range(count)
        )
        sender = self.send_quietly(session, requests)
        samples = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples.append(rss_bytes(self.pid))
            time.sleep(0.1)
        # Meanwhile, and still now, another session is served.
        self.assertStillServing()
        samples.append(rss_bytes(self.pid))
        return first, sender, baseline, max(samples)

    def assertAllAnswered(self, session, sender, first, count, size):
        """Once the client reads, every request is answered, in order."""
        sender.join(30)
        self.assertFalse(sender.is_alive(), "the requests could not be sent")
        session.channel.settimeout(60)
        for i in range(count):
            received = session.read_packet()
            self.assertIsNotNone(received, f"channel closed after {i} replies")
            ptype, body = received
            reader = Reader(body)
            self.assertEqual((ptype, reader.uint32()), (FXP_DATA, first + i))
            self.assertEqual(len(reader.string()), size)
        session.lastId = first + count
        self.assertEqual(session.realpath(session.nextId(), "."), "/")

    def test_pipelined_reads_with_a_window_never_opened(self):
        """
        10,000 READs of 32 KiB, and the client never reads a reply, so its
        32 KiB window stays shut: the service must stop reading requests
        instead of queueing 320 MiB of replies, and serve everyone else.
        """
        session = self.session(window_size=32768, max_packet_size=32768)
        first, sender, baseline, peak = self.flood(session, FLOOD_READS, FLOOD_READ_SIZE, 8)
        report(
            f"flood of {FLOOD_READS} READs x {FLOOD_READ_SIZE} bytes, client window shut: "
            f"service VmRSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
            f"growth {(peak - baseline) / 2**20:.1f} MiB "
            f"(replies asked for: {FLOOD_READS * FLOOD_READ_SIZE / 2**20:.0f} MiB)"
        )
        self.assertLess(peak - baseline, RSS_GROWTH_LIMIT)
        started = time.monotonic()
        self.assertAllAnswered(session, sender, first, FLOOD_READS, FLOOD_READ_SIZE)
        report(f"flood drained: {FLOOD_READS} replies in {time.monotonic() - started:.1f} s, "
               f"service VmRSS now {rss_bytes(self.pid) / 2**20:.1f} MiB")

    def test_pipelined_reads_with_a_window_wide_open_and_a_socket_never_read(self):
        """
        2,000 READs of 255 KiB (498 MiB of replies) from a client whose
        channel window is wide open but who stops reading its socket: the
        window does not hold the replies back, the full socket must.  The
        service queues about a megabyte, not the replies asked for, and
        answers all of them, in order, once the client reads again.
        """
        proxy = StallingProxy(self, self.service)
        transport = paramiko_transport(self, self.service, self.creds["username"],
                                       self.creds["password"], sock=proxy.connect())
        session = self.session(transport=transport, window_size=2**31 - 1,
                               max_packet_size=32768)
        proxy.hold()
        first, sender, baseline, peak = self.flood(session, WIDE_READS, WIDE_READ_SIZE, 6)
        report(
            f"{WIDE_READS} READs x {WIDE_READ_SIZE} bytes, window open, socket not read: "
            f"service VmRSS baseline {baseline / 2**20:.1f} MiB, peak {peak / 2**20:.1f} MiB, "
            f"growth {(peak - baseline) / 2**20:.1f} MiB "
            f"(replies asked for: {WIDE_READS * WIDE_READ_SIZE / 2**20:.0f} MiB)"
        )
        self.assertLess(peak - baseline, WIDE_RSS_GROWTH_LIMIT)
        proxy.release()
        self.assertAllAnswered(session, sender, first, WIDE_READS, WIDE_READ_SIZE)


class ChannelTests(ProtocolTestCase):
    def test_extended_data_from_the_client_is_ignored(self):
        session = self.session()
        # More stderr than the 2 MiB window: the service must keep opening it.
        chunk = b"E" * 32768
        total = 96 * len(chunk)
        sent = {"bytes": 0, "error": None}

        def flood():
            try:
                for _ in range(total // len(chunk)):
                    session.channel.send_stderr(chunk)
                    sent["bytes"] += len(chunk)
            except Exception as e:
                sent["error"] = e

        worker = threading.Thread(target=flood, daemon=True)
        worker.start()
        worker.join(60)
        self.assertEqual(
            (sent["bytes"], sent["error"]), (total, None),
            "stderr data stalled: the service did not reopen its window",
        )
        self.assertEqual(session.realpath(session.nextId(), "."), "/")
        reply_type, reader = session.read(session.open("file.txt"), 0, 100)
        self.assertEqual((reply_type, reader.string()), (FXP_DATA, b"content\n"))
        self.assertStillServing()

    def test_more_channels_than_max_channels_are_refused(self):
        paramiko = require_paramiko()
        transport = paramiko_transport(self, self.service, self.creds["username"],
                                       self.creds["password"])
        sessions = [self.session(transport=transport) for _ in range(10)]
        with self.assertRaises(paramiko.ChannelException):
            within(transport, 15, "the 11th open_session", transport.open_session)
        for session in sessions:
            self.assertEqual(session.realpath(session.nextId(), "."), "/")
        # The limit counts open channels: close one, and one more may open.
        sessions[0].channel.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                extra = self.session(transport=transport)
                break
            except paramiko.ChannelException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.assertEqual(extra.realpath(extra.nextId(), "."), "/")
        with self.assertRaises(paramiko.ChannelException):
            within(transport, 15, "the 11th open_session", transport.open_session)
        # Another connection has channels of its own.
        self.assertStillServing()
