"""
A small SSH client written out by hand, for end-to-end tests that must send
what real clients never do: a KEXINIT never finished, NEWKEYS out of turn,
garbled messages, odd channel parameters.

It speaks curve25519-sha256 (with or without strict key exchange), the
aes128-gcm@openssh.com cipher and password login, and sends any payload at
any moment.  It uses only the standard library, cryptography and the
harness's packing helpers, none of the service's code, so it checks the
service instead of agreeing with it.  Every
socket read has a timeout (socket.timeout), so a silent server fails a test
instead of hanging it.
"""

import hashlib
import socket
import struct
import time
from collections import deque

from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.harness import string, uint32

MSG_DISCONNECT = 1
MSG_IGNORE = 2
MSG_UNIMPLEMENTED = 3
MSG_DEBUG = 4
MSG_SERVICE_REQUEST = 5
MSG_SERVICE_ACCEPT = 6
MSG_EXT_INFO = 7
MSG_KEXINIT = 20
MSG_NEWKEYS = 21
MSG_KEX_ECDH_INIT = 30
MSG_KEX_ECDH_REPLY = 31
MSG_USERAUTH_REQUEST = 50
MSG_USERAUTH_FAILURE = 51
MSG_USERAUTH_SUCCESS = 52
MSG_GLOBAL_REQUEST = 80
MSG_CHANNEL_OPEN = 90
MSG_CHANNEL_OPEN_CONFIRMATION = 91
MSG_CHANNEL_OPEN_FAILURE = 92
MSG_CHANNEL_WINDOW_ADJUST = 93
MSG_CHANNEL_DATA = 94
MSG_CHANNEL_EOF = 96
MSG_CHANNEL_CLOSE = 97
MSG_CHANNEL_REQUEST = 98
MSG_CHANNEL_SUCCESS = 99
MSG_CHANNEL_FAILURE = 100

DISCONNECT_PROTOCOL_ERROR = 2

VERSION = b"SSH-2.0-lightd_e2e_rawssh"
CIPHER = b"aes128-gcm@openssh.com"
STRICT_KEX = b"kex-strict-c-v00@openssh.com"
# What the server may send at any time; skipped while waiting for a reply.
_NOISE = (MSG_IGNORE, MSG_DEBUG, MSG_EXT_INFO)


def mpint(unsigned):
    """An SSH mpint from unsigned big-endian bytes."""
    raw = unsigned.lstrip(b"\0")
    if raw and raw[0] & 0x80:
        raw = b"\0" + raw
    return string(raw)


def parse_string(data, offset=0):
    """(the string at C{offset}, the offset after it)."""
    (size,) = struct.unpack_from(">I", data, offset)
    end = offset + 4 + size
    return bytes(data[offset + 4 : end]), end


class Disconnected(Exception):
    """The server sent DISCONNECT."""

    def __init__(self, code, description):
        super().__init__(f"DISCONNECT {code} {description!r}")
        self.code = code
        self.description = description


class ConnectionClosed(Exception):
    """The server closed the connection without a DISCONNECT."""


class _Plain:
    """The binary packet protocol before the first NEWKEYS."""

    aead = False
    block = 8

    def seal(self, packet):
        return packet

    def open(self, buffer):
        if len(buffer) < 4:
            return None
        end = 4 + struct.unpack_from(">I", buffer)[0]
        return (bytes(buffer[4:end]), end) if len(buffer) >= end else None


class _AESGCM:
    """aes128-gcm@openssh.com (RFC 5647): the length in clear, as associated data."""

    aead = True
    block = 16

    def __init__(self, key, iv):
        self._aead = AESGCM(key)
        self._fixed = iv[:4]
        (self._counter,) = struct.unpack(">Q", iv[4:])

    def _nonce(self):
        nonce = self._fixed + struct.pack(">Q", self._counter)
        self._counter = (self._counter + 1) & 0xFFFFFFFFFFFFFFFF
        return nonce

    def seal(self, packet):
        head = packet[:4]
        return head + self._aead.encrypt(self._nonce(), packet[4:], head)

    def open(self, buffer):
        if len(buffer) < 4:
            return None
        end = 4 + struct.unpack_from(">I", buffer)[0] + 16
        if len(buffer) < end:
            return None
        head = bytes(buffer[:4])
        return self._aead.decrypt(self._nonce(), bytes(buffer[4:end]), head), end


class RawSSH:
    """
    One connection to C{port} on loopback.  C{send} takes any payload;
    C{read_packet} returns the next payload the server sent (type byte
    first) and raises L{Disconnected} on a DISCONNECT, L{ConnectionClosed}
    on a bare close.
    """

    def __init__(self, port, strict=True, timeout=10, host="127.0.0.1"):
        self.strict = strict
        self.session_id = None
        self.backlog = deque()  # packets read while waiting for another type
        self._outbound = self._inbound = _Plain()
        self._next_inbound = None
        self._buffer = bytearray()
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(VERSION + b"\r\n")
        while b"\n" not in self._buffer:
            self._receive()
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self.server_version = line.rstrip(b"\r")
        self._buffer = bytearray(rest)

    @property
    def local_address(self):
        """C{127.0.0.1:PORT} as the service logs this connection's peer."""
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def close(self):
        self.sock.close()

    # -- packets -----------------------------------------------------------

    def frame(self, payload):
        """C{payload} as a sealed binary packet for the current keys."""
        cipher = self._outbound
        covered = 1 + len(payload) if cipher.aead else 5 + len(payload)
        padding = cipher.block - covered % cipher.block
        if padding < 4:
            padding += cipher.block
        body = bytes([padding]) + payload + bytes(padding)
        return cipher.seal(uint32(len(body)) + body)

    def send(self, *payloads):
        """Send the payloads as packets, in one write."""
        self.sock.sendall(b"".join(self.frame(p) for p in payloads))

    def _receive(self):
        data = self.sock.recv(1 << 20)
        if not data:
            raise ConnectionClosed("the server closed the connection without a DISCONNECT")
        self._buffer += data

    def _next_from_wire(self):
        while True:
            opened = self._inbound.open(self._buffer)
            if opened is not None:
                break
            self._receive()
        body, used = opened
        del self._buffer[:used]
        payload = body[1 : len(body) - body[0]]
        if payload[0] == MSG_DISCONNECT:
            (code,) = struct.unpack_from(">I", payload, 1)
            raise Disconnected(code, parse_string(payload, 5)[0])
        if payload[0] == MSG_NEWKEYS and self._next_inbound is not None:
            self._inbound, self._next_inbound = self._next_inbound, None
        return payload

    def read_packet(self):
        return self.backlog.popleft() if self.backlog else self._next_from_wire()

    def read_until(self, *types):
        """
        The next packet of one of C{types} from the wire; others are kept
        in C{backlog} for L{read_packet}.
        """
        while True:
            payload = self._next_from_wire()
            if payload[0] in types:
                return payload
            if payload[0] not in _NOISE:
                self.backlog.append(payload)

    def wait_for_disconnect(self, timeout=5):
        """
        Read until the server says goodbye: (the DISCONNECT, the seconds it
        took).  A bare close or silence raises AssertionError, saying what
        the server sent meanwhile.
        """
        started = time.monotonic()
        self.sock.settimeout(timeout)
        seen = []
        try:
            while True:
                seen.append(self.read_packet()[0])
        except Disconnected as e:
            return e, time.monotonic() - started
        except (ConnectionClosed, ConnectionResetError) as e:
            raise AssertionError(f"closed without a DISCONNECT ({e!r}); messages {seen}")
        except socket.timeout:
            raise AssertionError(f"still open after {timeout}s; messages {seen}")

    # -- key exchange and login ----------------------------------------------

    def kexinit(self):
        kex = b"curve25519-sha256" + (b"," + STRICT_KEX if self.strict else b"")
        lists = [kex, b"ssh-ed25519", CIPHER, CIPHER]
        lists += [b"hmac-sha2-256-etm@openssh.com"] * 2 + [b"none"] * 2 + [b""] * 2
        return (
            bytes([MSG_KEXINIT])
            + bytes(16)  # the cookie
            + b"".join(string(names) for names in lists)
            + b"\0"  # first_kex_packet_follows
            + uint32(0)
        )

    def key_exchange(self, client_kexinit=None, server_kexinit=None):
        """
        Run a key exchange to its end and switch to the new keys.
        C{client_kexinit}: our KEXINIT if already sent; C{server_kexinit}:
        the server's if already read.
        """
        if client_kexinit is None:
            client_kexinit = self.kexinit()
            self.send(client_kexinit)
        if server_kexinit is None:
            server_kexinit = self.read_until(MSG_KEXINIT)
        private = X25519PrivateKey.generate()
        q_c = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.send(bytes([MSG_KEX_ECDH_INIT]) + string(q_c))
        reply = self.read_until(MSG_KEX_ECDH_REPLY)
        host_key, offset = parse_string(reply, 1)
        q_s, offset = parse_string(reply, offset)
        shared = mpint(private.exchange(X25519PublicKey.from_public_bytes(q_s)))
        exchange_hash = hashlib.sha256(
            string(VERSION)
            + string(self.server_version)
            + string(client_kexinit)
            + string(server_kexinit)
            + string(host_key)
            + string(q_c)
            + string(q_s)
            + shared
        ).digest()
        if self.session_id is None:
            self.session_id = exchange_hash

        def derive(letter, size):
            # One hash is enough for aes128-gcm's 16-byte key and 12-byte IV.
            key = hashlib.sha256(shared + exchange_hash + letter + self.session_id).digest()
            return key[:size]

        self._next_inbound = _AESGCM(derive(b"D", 16), derive(b"B", 12))
        self.send(bytes([MSG_NEWKEYS]))
        self._outbound = _AESGCM(derive(b"C", 16), derive(b"A", 12))
        self.read_until(MSG_NEWKEYS)

    def login(self, username, password):
        """Key exchange and password authentication; fails the caller's test if refused."""
        self.key_exchange()
        self.send(bytes([MSG_SERVICE_REQUEST]) + string(b"ssh-userauth"))
        self.read_until(MSG_SERVICE_ACCEPT)
        self.send(
            bytes([MSG_USERAUTH_REQUEST])
            + string(username)
            + string(b"ssh-connection")
            + string(b"password")
            + b"\0"
            + string(password)
        )
        reply = self.read_until(MSG_USERAUTH_SUCCESS, MSG_USERAUTH_FAILURE)
        if reply[0] != MSG_USERAUTH_SUCCESS:
            raise AssertionError(f"login as {username!r} refused")
        return self

    # -- channels ------------------------------------------------------------

    def open_session(self, window=2 * 1024 * 1024, max_packet=32768, local_id=0):
        """Open a session channel: the server's id for it, or None if refused."""
        self.send(
            bytes([MSG_CHANNEL_OPEN])
            + string(b"session")
            + uint32(local_id)
            + uint32(window)
            + uint32(max_packet)
        )
        reply = self.read_until(MSG_CHANNEL_OPEN_CONFIRMATION, MSG_CHANNEL_OPEN_FAILURE)
        if reply[0] == MSG_CHANNEL_OPEN_FAILURE:
            return None
        return struct.unpack_from(">I", reply, 5)[0]

    def start_sftp(self, channel):
        self.send(channel_request(channel, b"subsystem", string(b"sftp")))
        reply = self.read_until(MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE)
        if reply[0] != MSG_CHANNEL_SUCCESS:
            raise AssertionError("the sftp subsystem was refused")

    def send_data(self, channel, data):
        self.send(channel_data(channel, data))


def channel_data(channel, data):
    return bytes([MSG_CHANNEL_DATA]) + uint32(channel) + string(data)


def channel_request(channel, name, fields=b"", want_reply=True):
    return bytes([MSG_CHANNEL_REQUEST]) + uint32(channel) + string(name) + bytes([want_reply]) + fields


def window_adjust(channel, size):
    return bytes([MSG_CHANNEL_WINDOW_ADJUST]) + uint32(channel) + uint32(size)
