"""
SSH binary packet protection: the ciphers and MACs the transport offers.

One L{PacketSealer} per direction turns a payload into the bytes on the wire
and back.  Besides Conch's own AES-CTR with encrypt-and-MAC HMAC, this adds
what current clients prefer and what is cheapest per packet:
C{aes128-gcm@openssh.com} and C{aes256-gcm@openssh.com} (RFC 5647 as OpenSSH
names them), C{chacha20-poly1305@openssh.com} (OpenSSH's PROTOCOL.chacha20poly1305)
and the encrypt-then-MAC HMACs (C{hmac-sha2-*-etm@openssh.com}), all on
cryptography's primitives.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import hmac
import os
import struct
import threading
from typing import List, Optional, Sequence, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.poly1305 import Poly1305

MAX_PACKET_LENGTH = 256 * 1024
"""Packets longer than this are a protocol error (OpenSSH's PACKET_MAX_SIZE)."""

# name -> (key bytes, IV bytes)
AEAD_CIPHERS = {
    b"chacha20-poly1305@openssh.com": (64, 0),
    b"aes128-gcm@openssh.com": (16, 12),
    b"aes256-gcm@openssh.com": (32, 12),
}
CTR_CIPHERS = {
    b"aes128-ctr": 16,
    b"aes192-ctr": 24,
    b"aes256-ctr": 32,
}
# name -> (hash, encrypt-then-MAC)
MACS = {
    b"hmac-sha2-256-etm@openssh.com": ("sha256", True),
    b"hmac-sha2-512-etm@openssh.com": ("sha512", True),
    b"hmac-sha2-256": ("sha256", False),
    b"hmac-sha2-512": ("sha512", False),
}


class PacketError(Exception):
    """
    The peer sent a packet that cannot be valid: bad length, padding or MAC.
    """


def _padding(length: int, blockSize: int) -> int:
    # RFC 4253 6: at least 4 bytes, the padded length a multiple of the block.
    pad = blockSize - length % blockSize
    if pad < 4:
        pad += blockSize
    return pad


class PacketSealer:
    """
    Protects packets in one direction.

    C{seal(sequence, parts)} takes a payload as a sequence of bytes-like parts
    (so a header and a large body are never joined twice) and returns the
    wire bytes as a list of parts.  C{open(sequence, buffer)} takes the
    receive buffer (bytes or a memoryview) and returns C{(payload,
    consumed)} for the first whole packet, or None with L{needed} set to the
    number of bytes the buffer must hold before it is worth calling again.
    """

    isEncrypting = False
    isVerifying = False
    needed = 4

    def seal(self, sequence: int, parts: Sequence[bytes]) -> List[bytes]:
        raise NotImplementedError()

    def open(self, sequence: int, buffer: bytes) -> Optional[Tuple[bytes, int]]:
        raise NotImplementedError()


def _checkLength(length: int, blockSize: int) -> None:
    if length > MAX_PACKET_LENGTH or length < 5 or length % blockSize:
        raise PacketError("bad packet length")


def _payload(plain, offset: int = 0) -> bytes:
    padding = plain[offset]
    end = len(plain) - padding
    if padding < 4 or end <= offset + 1:
        raise PacketError("bad padding")
    return plain[offset + 1 : end]


class _PaddingPool:
    """
    Random bytes for packet padding, drawn from the kernel 4 KiB at a time:
    one C{getrandom} call per few hundred packets instead of one per packet.
    Used from the reactor thread only, like the sealers.
    """

    _SIZE = 4096

    def __init__(self) -> None:
        self._pool = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        at = self._at
        if at + count > len(self._pool):
            self._pool = os.urandom(self._SIZE)
            at = 0
        self._at = at + count
        return self._pool[at : at + count]


_randomPadding = _PaddingPool().take
_UINT32 = struct.Struct(">I")
_SEQUENCE = struct.Struct(">Q")
_LENGTH_AND_PAD = struct.Struct(">IB")


def _size(parts: Sequence[bytes]) -> int:
    return sum(map(len, parts))


_LARGE = 1024


def _pieces(head: bytes, parts: Sequence[bytes], tail: bytes, size: int) -> List[bytes]:
    """
    C{head}, C{parts} (of C{size} bytes in all) and C{tail} as the fewest
    pieces that copy no large part: runs of small parts are joined, large
    ones kept as they are.
    """
    if size < _LARGE:
        return [b"".join((head, *parts, tail))]
    pieces: List[bytes] = []
    small = [head]
    for part in parts:
        if len(part) < _LARGE:
            small.append(part)
        else:
            if small:
                pieces.append(b"".join(small))
                small = []
            pieces.append(part)
    small.append(tail)
    pieces.append(b"".join(small))
    return pieces


class PlainSealer(PacketSealer):
    """
    No protection, before the first key exchange.
    """

    def seal(self, sequence: int, parts: Sequence[bytes]) -> List[bytes]:
        size = _size(parts)
        pad = _padding(5 + size, 8)
        return [_LENGTH_AND_PAD.pack(size + pad + 1, pad), *parts, _randomPadding(pad)]

    def open(self, sequence: int, buffer: bytes) -> Optional[Tuple[bytes, int]]:
        if len(buffer) < 4:
            self.needed = 4
            return None
        (length,) = _UINT32.unpack_from(buffer)
        if length > MAX_PACKET_LENGTH or length < 5:
            raise PacketError("bad packet length")
        if len(buffer) < 4 + length:
            self.needed = 4 + length
            return None
        return _payload(buffer[4 : 4 + length]), 4 + length


def _hmacTemplate(name: str, key: bytes):
    """
    An HMAC keyed with C{key}, to be copied for each packet, and its size.
    """
    size = hashlib.new(name).digest_size
    # OpenSSH (and RFC 4253) use as many key bytes as the digest size.
    template = hmac.new(key[:size], digestmod=name)
    # The OpenSSL HMAC inside hmac.HMAC, where there is one: it has the same
    # copy, update and digest, without a Python call around each.
    return getattr(template, "_hmac", None) or template, size


class CTRSealer(PacketSealer):
    """
    AES-CTR with an HMAC, either over the plaintext (encrypt-and-MAC, RFC
    4253) or over the clear length and ciphertext (encrypt-then-MAC).
    """

    isEncrypting = isVerifying = True
    blockSize = 16

    def __init__(self, cipher: bytes, mac: bytes, iv: bytes, key: bytes, macKey: bytes, outgoing: bool) -> None:
        context = Cipher(
            algorithms.AES(key[: CTR_CIPHERS[cipher]]), modes.CTR(iv[:16])
        )
        self._crypt = (context.encryptor() if outgoing else context.decryptor()).update
        hashName, self._etm = MACS[mac]
        self._macTemplate, self._macSize = _hmacTemplate(hashName, macKey)
        self._first: Optional[bytes] = None

    def _startMAC(self, sequence: int):
        mac = self._macTemplate.copy()
        mac.update(_UINT32.pack(sequence))
        return mac

    def seal(self, sequence: int, parts: Sequence[bytes]) -> List[bytes]:
        # A stream cipher: large parts are encrypted (and MACed) where they
        # lie rather than joined into the packet first.
        size = _size(parts)
        crypt = self._crypt
        mac = self._startMAC(sequence)
        if self._etm:
            pad = _padding(1 + size, self.blockSize)
            header = _UINT32.pack(1 + size + pad)
            mac.update(header)
            sealed = [header]
            for piece in _pieces(bytes((pad,)), parts, _randomPadding(pad), size):
                cipherText = crypt(piece)
                mac.update(cipherText)
                sealed.append(cipherText)
        else:
            pad = _padding(5 + size, self.blockSize)
            sealed = []
            head = _LENGTH_AND_PAD.pack(1 + size + pad, pad)
            for piece in _pieces(head, parts, _randomPadding(pad), size):
                mac.update(piece)
                sealed.append(crypt(piece))
        sealed.append(mac.digest())
        return sealed

    def open(self, sequence: int, buffer: bytes) -> Optional[Tuple[bytes, int]]:
        macSize = self._macSize
        if self._etm:
            if len(buffer) < 4:
                self.needed = 4
                return None
            (length,) = _UINT32.unpack_from(buffer)
            _checkLength(length, self.blockSize)
            end = 4 + length
            if len(buffer) < end + macSize:
                self.needed = end + macSize
                return None
            mac = self._startMAC(sequence)
            mac.update(buffer[:end])
            if not hmac.compare_digest(mac.digest(), buffer[end : end + macSize]):
                raise PacketError("bad MAC")
            return _payload(memoryview(self._crypt(buffer[4:end]))), end + macSize
        # Encrypt-and-MAC: the length is encrypted, so decrypt the first block
        # once and keep it until the whole packet is here.
        first = self._first
        if first is None:
            if len(buffer) < self.blockSize:
                self.needed = self.blockSize
                return None
            first = self._first = self._crypt(buffer[: self.blockSize])
        (length,) = _UINT32.unpack_from(first)
        _checkLength(length + 4, self.blockSize)
        end = 4 + length
        if len(buffer) < end + macSize:
            self.needed = end + macSize
            return None
        packet = first + self._crypt(buffer[self.blockSize : end])
        self._first = None
        mac = self._startMAC(sequence)
        mac.update(packet)
        if not hmac.compare_digest(mac.digest(), buffer[end : end + macSize]):
            raise PacketError("bad MAC")
        return _payload(memoryview(packet), 4), end + macSize


class GCMSealer(PacketSealer):
    """
    AES-GCM as C{aes*-gcm@openssh.com}: the length is sent in clear as
    associated data; the 12-byte nonce is a fixed field and a 64-bit
    invocation counter that grows by one per packet.
    """

    isEncrypting = isVerifying = True
    blockSize = 16
    tagSize = 16

    def __init__(self, cipher: bytes, iv: bytes, key: bytes) -> None:
        keySize, ivSize = AEAD_CIPHERS[cipher]
        self._aead = AESGCM(key[:keySize])
        self._fixed = iv[:4]
        (self._counter,) = _SEQUENCE.unpack(iv[4:12])

    def _nonce(self) -> bytes:
        nonce = self._fixed + _SEQUENCE.pack(self._counter)
        self._counter = (self._counter + 1) & 0xFFFFFFFFFFFFFFFF
        return nonce

    def seal(self, sequence: int, parts: Sequence[bytes]) -> List[bytes]:
        size = _size(parts)
        pad = _padding(1 + size, self.blockSize)
        header = _UINT32.pack(1 + size + pad)
        plain = b"".join((bytes((pad,)), *parts, _randomPadding(pad)))
        return [header, self._aead.encrypt(self._nonce(), plain, header)]

    def open(self, sequence: int, buffer: bytes) -> Optional[Tuple[bytes, int]]:
        if len(buffer) < 4:
            self.needed = 4
            return None
        (length,) = _UINT32.unpack_from(buffer)
        _checkLength(length, self.blockSize)
        end = 4 + length + self.tagSize
        if len(buffer) < end:
            self.needed = end
            return None
        try:
            plain = self._aead.decrypt(self._nonce(), buffer[4:end], buffer[:4])
        except InvalidTag:
            raise PacketError("bad MAC") from None
        return _payload(memoryview(plain)), end


def _chacha(key: bytes, counter: int, sequence: bytes, data) -> bytes:
    # OpenSSH uses the original ChaCha20: a 64-bit block counter and a
    # 64-bit nonce (the sequence number), which cryptography's 16-byte
    # nonce holds as counter (little endian) then nonce.
    return _chachaStream(key, counter, sequence)(data)


def _chachaStream(key: bytes, counter: int, sequence: bytes):
    nonce = struct.pack("<Q", counter) + sequence
    return Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update


class ChaChaPolySealer(PacketSealer):
    """
    C{chacha20-poly1305@openssh.com}: the length is encrypted with its own
    key; the Poly1305 key is the first 32 bytes of the main key's block 0,
    the packet body is encrypted from block 1.

    Block 0 and the body come from one keystream call over 64 zero bytes and
    the body, which saves a cipher context per packet; the length of a packet
    still arriving is decrypted once, not on every look at the buffer.
    """

    isEncrypting = isVerifying = True
    blockSize = 8
    tagSize = 16
    _BLOCK0 = bytes(64)

    def __init__(self, key: bytes) -> None:
        self._main = key[:32]
        self._header = key[32:64]
        self._pending: Optional[Tuple[int, int]] = None  # (sequence, length)

    def seal(self, sequence: int, parts: Sequence[bytes]) -> List[bytes]:
        seq = _SEQUENCE.pack(sequence)
        size = _size(parts)
        pad = _padding(1 + size, self.blockSize)
        header = _chacha(self._header, 0, seq, _UINT32.pack(1 + size + pad))
        pieces = _pieces(self._BLOCK0 + bytes((pad,)), parts, _randomPadding(pad), size)
        if len(pieces) == 1:
            stream = _chacha(self._main, 0, seq, pieces[0])
            body = [memoryview(stream)[64:]]
        else:
            crypt = _chachaStream(self._main, 0, seq)
            stream = crypt(pieces[0])
            body = [memoryview(stream)[64:], *map(crypt, pieces[1:])]
        tag = Poly1305(stream[:32])
        tag.update(header)
        for piece in body:
            tag.update(piece)
        return [header, *body, tag.finalize()]

    def open(self, sequence: int, buffer: bytes) -> Optional[Tuple[bytes, int]]:
        if len(buffer) < 4:
            self.needed = 4
            return None
        seq = _SEQUENCE.pack(sequence)
        pending = self._pending
        if pending is not None and pending[0] == sequence:
            length = pending[1]
        else:
            length = self._length(seq, buffer)
            _checkLength(length, self.blockSize)
            self._pending = (sequence, length)
        end = 4 + length
        if len(buffer) < end + self.tagSize:
            self.needed = end + self.tagSize
            return None
        self._pending = None
        return self._openBody(seq, buffer, length), end + self.tagSize

    def _length(self, seq: bytes, buffer) -> int:
        return _UINT32.unpack(_chacha(self._header, 0, seq, buffer[:4]))[0]

    def _openBody(self, seq: bytes, buffer, length: int):
        end = 4 + length
        stream = _chacha(self._main, 0, seq, b"".join((self._BLOCK0, buffer[4:end])))
        expected = Poly1305.generate_tag(stream[:32], buffer[:end])
        if not hmac.compare_digest(expected, buffer[end : end + self.tagSize]):
            raise PacketError("bad MAC")
        return _payload(memoryview(stream), 64)


_SODIUM_SEAL_LARGEST = 12 * 1024
_SODIUM_OPEN_LARGEST = 12 * 1024
"""Packets up to these sizes are sealed and opened by libsodium, if present;
longer ones through cryptography, whose ChaCha20 and Poly1305 are faster per
byte.  Measured on AMD EPYC, the two cost the same at about 15 KiB (opening)
and 20 KiB (sealing); at 12 KiB libsodium is 6-20% cheaper, at 4 KiB 40-50%."""


def _loadSodium():
    """
    libsodium, if this machine has it.  Its ChaCha20 (the original, with a
    64-bit nonce and counter, as OpenSSH uses it) and Poly1305 are single
    calls with no context to build, which makes a small packet about half as
    costly as through cryptography's cipher objects.
    """
    for name in ("libsodium.so.23", ctypes.util.find_library("sodium")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            if lib.sodium_init() < 0:
                continue
            pointer, size, data = ctypes.c_void_p, ctypes.c_ulonglong, ctypes.c_char_p
            functions = {
                # (out, in, length, nonce, initial block counter, key)
                "xor": ("crypto_stream_chacha20_xor_ic", [pointer, data, size, data, ctypes.c_uint64, data]),
                "xorAt": ("crypto_stream_chacha20_xor_ic", [pointer, pointer, size, data, ctypes.c_uint64, data]),
                # (tag out, in, length, key)
                "tag": ("crypto_onetimeauth_poly1305", [pointer, pointer, size, pointer]),
                # (tag, in, length, key)
                "verify": ("crypto_onetimeauth_poly1305_verify", [pointer, pointer, size, pointer]),
            }
            bound = {}
            for role, (symbol, argtypes) in functions.items():
                function = lib[symbol]  # a new function object for each role
                function.argtypes = argtypes
                function.restype = ctypes.c_int
                bound[role] = function
        except (OSError, AttributeError):
            continue
        return bound
    return None


_sodium = _loadSodium()


class _SodiumBuffers(threading.local):
    """
    The work buffers of L{_SodiumChaChaPolySealer}: one set per thread,
    shared by every sealer, since each packet is sealed or opened in one call
    that copies its result out.  Kept per sealer they were 37 KiB a direction,
    three quarters of an idle session's memory.
    """

    def __init__(self) -> None:
        # Sealing: [Poly1305 key (32)] [unused (28)] [length (4)] [body] [tag (16)]
        self.sealing = ctypes.create_string_buffer(64 + _SODIUM_SEAL_LARGEST + 64 + 16)
        self.sealingAt = ctypes.addressof(self.sealing)
        self.sealed = memoryview(self.sealing).cast("B")
        # Opening, in: [zeros (60)] [the packet as received: length, body, tag]
        # and out: [Poly1305 key (32)] [unused (32)] [plain body].
        # The ctypes arrays are kept: while they hold the bytearrays' buffers,
        # the bytearrays cannot be resized, so the addresses stay valid.
        self.received = bytearray(64 + _SODIUM_OPEN_LARGEST + 16)
        self.receivedArray = (ctypes.c_char * len(self.received)).from_buffer(self.received)
        self.receivedAt = ctypes.addressof(self.receivedArray)
        self.plain = bytearray(64 + _SODIUM_OPEN_LARGEST)
        self.plainArray = (ctypes.c_char * len(self.plain)).from_buffer(self.plain)
        self.plainAt = ctypes.addressof(self.plainArray)
        # Where packet lengths are decrypted.
        self.clear = ctypes.create_string_buffer(4)
        self.clearAt = ctypes.addressof(self.clear)
        # What each call needs, in one attribute look-up.
        self.forSealing = (self.sealingAt, self.sealed)
        self.forLength = (self.clear, self.clearAt)
        self.forOpening = (self.received, self.receivedAt, self.plain, self.plainAt)


_buffers = _SodiumBuffers()


class _SodiumChaChaPolySealer(ChaChaPolySealer):
    """
    C{chacha20-poly1305@openssh.com} with small packets on libsodium.

    One keystream call from block 0 over 64 zero bytes and the body gives
    the Poly1305 key (the first 32 bytes) and the body (from byte 64); the
    encrypted length sits just before the body, over keystream bytes nobody
    uses, so that length and body are contiguous for the tag.  The work is
    done in the thread's L{_SodiumBuffers}, so a packet costs no allocation
    but the bytes it returns, and a sealer holds no more than its keys.
    """

    def seal(self, sequence: int, parts: Sequence[bytes]) -> List[bytes]:
        size = _size(parts)
        if size > _SODIUM_SEAL_LARGEST:
            return super().seal(sequence, parts)
        seq = _SEQUENCE.pack(sequence)
        pad = _padding(1 + size, self.blockSize)
        plain = b"".join((self._BLOCK0, bytes((pad,)), *parts, _randomPadding(pad)))
        length = len(plain) - 64
        at, sealed = _buffers.forSealing
        xor = _sodium["xor"]
        xor(at, plain, 64 + length, seq, 0, self._main)
        xor(at + 60, _UINT32.pack(length), 4, seq, 0, self._header)
        _sodium["tag"](at + 64 + length, at + 60, 4 + length, at)
        return [sealed[60 : 80 + length].tobytes()]

    def _length(self, seq: bytes, buffer) -> int:
        clear, clearAt = _buffers.forLength
        _sodium["xor"](clearAt, bytes(buffer[:4]), 4, seq, 0, self._header)
        return _UINT32.unpack(clear.raw)[0]

    def _openBody(self, seq: bytes, buffer, length: int):
        if length > _SODIUM_OPEN_LARGEST:
            return super()._openBody(seq, buffer, length)
        end = 4 + length
        received, receivedAt, plain, plainAt = _buffers.forOpening
        received[60 : 60 + end + self.tagSize] = buffer[: end + self.tagSize]
        _sodium["xorAt"](plainAt, receivedAt, 64 + length, seq, 0, self._main)
        if _sodium["verify"](receivedAt + 60 + end, receivedAt + 60, end, plainAt) != 0:
            raise PacketError("bad MAC")
        # Copied out: the buffers serve the next packet, of any session.
        return _payload(memoryview(plain[64 : 64 + length]))


def _sodiumAgrees() -> bool:
    """
    Whether this libsodium's packets and cryptography's open each other,
    checked once at import: a library that differs is not used.
    """
    key = os.urandom(64)
    plain, fast = ChaChaPolySealer(key), _SodiumChaChaPolySealer(key)
    try:
        for sequence, payload in ((0, b"\x5e" * 100), (2**32 - 1, b"\x5e" + os.urandom(4000))):
            for out, into in ((fast, plain), (plain, fast)):
                wire = b"".join(bytes(part) for part in out.seal(sequence, [payload]))
                opened = into.open(sequence, wire)
                if opened is None or (bytes(opened[0]), opened[1]) != (payload, len(wire)):
                    return False
    except Exception:
        return False
    return True


if _sodium is not None and not _sodiumAgrees():
    _sodium = None


def isAEAD(cipher: bytes) -> bool:
    return cipher in AEAD_CIPHERS


def makeSealer(
    cipher: bytes, mac: Optional[bytes], iv: bytes, key: bytes, macKey: bytes, outgoing: bool
) -> PacketSealer:
    """
    The sealer for a negotiated cipher and MAC (the MAC is ignored for AEAD
    ciphers, which authenticate by themselves).
    """
    if cipher == b"chacha20-poly1305@openssh.com":
        return (ChaChaPolySealer if _sodium is None else _SodiumChaChaPolySealer)(key)
    if cipher in AEAD_CIPHERS:
        return GCMSealer(cipher, iv, key)
    if cipher in CTR_CIPHERS and mac in MACS:
        return CTRSealer(cipher, mac, iv, key, macKey, outgoing)
    raise ValueError(f"unsupported cipher/MAC pair {cipher!r}/{mac!r}")
