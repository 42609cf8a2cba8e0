"""
Tests for L{lightd_conch.ciphers} and the transport's packet layer: each
cipher and MAC round-trips and rejects tampering, interoperates with OpenSSH,
paramiko and asyncssh, and strict key exchange holds.
"""

import asyncio
import os
import shutil
import struct
import subprocess

import paramiko
from twisted.conch.ssh.common import NS
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from lightd_conch import ciphers
from lightd_conch.ciphers import PacketError, PlainSealer, makeSealer
from lightd_conch.config import SUPPORTED_CIPHERS, SUPPORTED_MACS

from .test_ssh import LiveService, TransportTimerTests, settings

PAIRS = [
    (b"chacha20-poly1305@openssh.com", None),
    (b"aes128-gcm@openssh.com", None),
    (b"aes256-gcm@openssh.com", None),
    (b"aes128-ctr", b"hmac-sha2-256-etm@openssh.com"),
    (b"aes256-ctr", b"hmac-sha2-512-etm@openssh.com"),
    (b"aes192-ctr", b"hmac-sha2-256"),
    (b"aes128-ctr", b"hmac-sha2-512"),
]


class SealerTests(TestCase):
    def pair(self, cipher, mac):
        iv, key, macKey = os.urandom(64), os.urandom(128), os.urandom(64)
        return (
            makeSealer(cipher, mac, iv, key, macKey, True),
            makeSealer(cipher, mac, iv, key, macKey, False),
        )

    def test_roundTrip(self):
        payloads = [b"\x05x", b"\x5e" + os.urandom(32768), b"\x02" * 17, b"\x01" + os.urandom(100000)]
        for cipher, mac in PAIRS:
            out, into = self.pair(cipher, mac)
            stream = b"".join(
                b"".join(out.seal(seq, [p])) for seq, p in enumerate(payloads)
            )
            received, buffer, seq = [], b"", 0
            # Arrive in odd-sized pieces, as from TCP.
            for i in range(0, len(stream), 7919):
                buffer += stream[i : i + 7919]
                while True:
                    opened = into.open(seq, buffer)
                    if opened is None:
                        break
                    payload, used = opened
                    received.append(bytes(payload))
                    buffer = buffer[used:]
                    seq += 1
            self.assertEqual(received, payloads, (cipher, mac))
            self.assertEqual(buffer, b"")

    def test_tamperingRejected(self):
        for cipher, mac in PAIRS:
            out, into = self.pair(cipher, mac)
            packet = bytearray(b"".join(out.seal(0, [b"\x5e" + b"data" * 100])))
            packet[len(packet) // 2] ^= 1
            self.assertRaises(PacketError, into.open, 0, bytes(packet))

    def test_replayAndReorderRejected(self):
        """
        A packet is bound to its place in the stream: by the sequence number,
        or for AES-GCM by the invocation counter in the nonce.
        """
        for cipher, mac in PAIRS:
            out, into = self.pair(cipher, mac)
            first, second = b"".join(out.seal(0, [b"\x5eone"])), b"".join(out.seal(1, [b"\x5etwo"]))
            self.assertRaises(PacketError, into.open, 0, second)
            if b"gcm" in cipher:
                out, into = self.pair(cipher, mac)
                first = b"".join(out.seal(0, [b"\x5eone"]))
                into.open(0, first)
                self.assertRaises(PacketError, into.open, 1, first)

    def test_oversizeLengthRejected(self):
        self.assertRaises(
            PacketError, PlainSealer().open, 0, struct.pack(">I", 10**7) + b"x" * 100
        )


class ChaChaBackendTests(TestCase):
    """
    With libsodium present, chacha20-poly1305 packets up to
    C{_SODIUM_SEAL_LARGEST} bytes are sealed, and up to
    C{_SODIUM_OPEN_LARGEST} opened, by it, the rest by
    cryptography; each side's packets must open on the other.
    """

    CHACHA = b"chacha20-poly1305@openssh.com"

    def setUp(self):
        if ciphers._sodium is None:
            raise SkipTest("libsodium is not installed (apt-get install libsodium23)")

    def pair(self, sodium, iv, key, macKey):
        """
        An outgoing and an incoming sealer, on libsodium or without it.
        """
        patcher = None if sodium else self.patch(ciphers, "_sodium", None)
        try:
            return [makeSealer(self.CHACHA, None, iv, key, macKey, o) for o in (True, False)]
        finally:
            if patcher is not None:
                patcher.restore()

    def test_sodiumChosen(self):
        keys = os.urandom(64), os.urandom(64), os.urandom(64)
        for sealer in self.pair(True, *keys):
            self.assertIsInstance(sealer, ciphers._SodiumChaChaPolySealer)
        for sealer in self.pair(False, *keys):
            self.assertNotIsInstance(sealer, ciphers._SodiumChaChaPolySealer)

    def test_disagreeingLibraryRefused(self):
        """
        The check made at import refuses a libsodium whose keystream is not
        the one cryptography computes, and accepts the real one.
        """
        self.assertTrue(ciphers._sodiumAgrees())
        broken = dict(ciphers._sodium)
        broken["xor"] = lambda *args: 0  # writes nothing: no keystream at all
        self.patch(ciphers, "_sodium", broken)
        self.assertFalse(ciphers._sodiumAgrees())

    def test_crossRoundTrip(self):
        sizes = [1, 17, 40000]
        for limit in (ciphers._SODIUM_SEAL_LARGEST, ciphers._SODIUM_OPEN_LARGEST):
            sizes += [limit - 20, limit - 9, limit - 1, limit, limit + 1, limit + 40]
        keys = os.urandom(64), os.urandom(64), os.urandom(64)
        fast, slow = self.pair(True, *keys), self.pair(False, *keys)
        for (out, into) in [(fast[0], slow[1]), (slow[0], fast[1]), (fast[0], fast[1])]:
            for seq, size in enumerate(sizes):
                payload = b"\x5e" + os.urandom(size)
                wire = b"".join(out.seal(seq, [payload[:5], payload[5:]]))
                self.assertIsNone(into.open(seq, wire[:-1]))
                opened, used = into.open(seq, wire)
                self.assertEqual((bytes(opened), used), (payload, len(wire)))
                # (A flipped length bit may also ask for more bytes: the
                # body, not the length, carries the check.)
                for flip in (9, len(wire) // 2, len(wire) - 17, len(wire) - 1):
                    tampered = bytearray(wire)
                    tampered[flip] ^= 0x40
                    into._pending = None
                    self.assertRaises(PacketError, into.open, seq, bytes(tampered))
                into._pending = None

    def test_resultsOutliveTheNextPacket(self):
        """
        What seal and open return is the caller's to keep: the packets
        after it, made and read in the shared work buffers, leave it as it
        was.
        """
        out, into = self.pair(True, os.urandom(64), os.urandom(64), os.urandom(64))
        payloads = [b"\x5e" + os.urandom(size) for size in (3000, 100, 5000, 20)]
        held, wires = [], []
        for seq, payload in enumerate(payloads):
            parts = out.seal(seq, [payload])
            held.append(parts)
            wires.append(b"".join(bytes(part) for part in parts))
        self.assertEqual([b"".join(bytes(part) for part in parts) for parts in held], wires)
        opened = [into.open(seq, wire)[0] for seq, wire in enumerate(wires)]
        self.assertEqual([bytes(payload) for payload in opened], payloads)


    def test_sessionsInterleaved(self):
        """
        Sealers of different sessions share the work buffers: packets of
        two sessions sealed and opened in turn, small and large, each open
        to their own payloads, and a packet from one session's keys does
        not open on the other's.
        """
        sessions = [self.pair(True, os.urandom(64), os.urandom(64), os.urandom(64))
                    for _ in range(2)]
        sizes = [20, 9000, ciphers._SODIUM_OPEN_LARGEST + 100, 300]
        for seq, size in enumerate(sizes):
            payloads = [b"\x5e" + os.urandom(size) for _ in sessions]
            wires = [b"".join(bytes(p) for p in out.seal(seq, [payload]))
                     for (out, _), payload in zip(sessions, payloads)]
            self.assertRaises(PacketError, sessions[0][1].open, seq, wires[1])
            sessions[0][1]._pending = None
            opened = [bytes(into.open(seq, wire)[0])
                      for (_, into), wire in zip(sessions, wires)]
            self.assertEqual(opened, payloads)

    def test_threadsHaveTheirOwnBuffers(self):
        """
        A thread other than the one that imported the module seals and
        opens in buffers of its own.
        """
        out, into = self.pair(True, os.urandom(64), os.urandom(64), os.urandom(64))
        payload = b"\x5e" + os.urandom(1000)

        def inThread():
            wire = b"".join(bytes(p) for p in out.seal(0, [payload]))
            return bytes(into.open(0, wire)[0]), ciphers._buffers.sealing

        def check(result):
            opened, sealing = result
            self.assertEqual(opened, payload)
            self.assertIsNot(sealing, ciphers._buffers.sealing)

        return deferToThread(inThread).addCallback(check)


def _kexinit(strict):
    kex = b"curve25519-sha256" + (b",kex-strict-c-v00@openssh.com" if strict else b"")
    return bytes([20]) + os.urandom(16) + b"".join(
        NS(n)
        for n in (kex, b"ssh-ed25519", b"aes128-gcm@openssh.com", b"aes128-gcm@openssh.com",
                  b"hmac-sha2-256-etm@openssh.com", b"hmac-sha2-256-etm@openssh.com",
                  b"none", b"none", b"", b"")
    ) + b"\0" + b"\0\0\0\0"


class StrictKexTests(TestCase):
    def connect(self):
        clock, transport, tcp = TransportTimerTests.connect(self)
        transport.dataReceived(b"SSH-2.0-test\r\n")
        self.assertIn(b"kex-strict-s-v00@openssh.com", tcp.value())
        return transport, tcp

    def test_strictRefusesPacketBeforeKexinit(self):
        transport, tcp = self.connect()
        ignore = b"".join(PlainSealer().seal(0, [b"\x02" + NS(b"x")]))
        transport.dataReceived(ignore + b"".join(PlainSealer().seal(1, [_kexinit(True)])))
        self.assertTrue(tcp.disconnecting)

    def test_strictRefusesNonKexDuringHandshake(self):
        transport, tcp = self.connect()
        transport.dataReceived(
            b"".join(PlainSealer().seal(0, [_kexinit(True)]))
            + b"".join(PlainSealer().seal(1, [b"\x02" + NS(b"x")]))
        )
        self.assertTrue(tcp.disconnecting)

    def test_withoutStrictIgnoreIsFine(self):
        transport, tcp = self.connect()
        ignore = b"".join(PlainSealer().seal(0, [b"\x02" + NS(b"x")]))
        transport.dataReceived(ignore + b"".join(PlainSealer().seal(1, [_kexinit(False)])))
        self.assertFalse(tcp.disconnecting)
        self.assertEqual(transport.nextEncryptions.outCipType, b"aes128-gcm@openssh.com")


class _Interop(LiveService):
    sftpSettings = settings(
        ciphers=SUPPORTED_CIPHERS, macs=SUPPORTED_MACS, max_auth_tries=3
    )


class InteropTests(_Interop, TestCase):
    """
    Real clients, one cipher and MAC at a time, move a file both ways.
    """

    data = os.urandom(3 * 1024 * 1024 + 17)

    def volumeFile(self, name):
        return os.path.join(self.volumes, "c1", name)

    def test_paramiko(self):
        port = self.port.getHost().port
        ciphers = [c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")]
        macs = ["hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512"]

        def run():
            results = {}
            for cipher in ciphers:
                for mac in macs if cipher.endswith("ctr") else macs[:1]:
                    transport = paramiko.Transport(("127.0.0.1", port))
                    transport.disabled_algorithms = {
                        "ciphers": [c for c in paramiko.Transport._preferred_ciphers if c != cipher],
                        "macs": [m for m in paramiko.Transport._preferred_macs if m != mac],
                    }
                    transport.connect(username="alice", password="secret-pass")
                    used = (transport.local_cipher, transport.remote_cipher)
                    client = paramiko.SFTPClient.from_transport(transport)
                    with client.open("p.bin", "wb") as f:
                        f.write(self.data)
                    with client.open("p.bin", "rb") as f:
                        back = f.read()
                    transport.close()
                    results[(cipher, mac)] = (used, back == self.data)
            return results

        def check(results):
            for (cipher, mac), (used, same) in results.items():
                self.assertEqual(used, (cipher, cipher))
                self.assertTrue(same, (cipher, mac))

        return deferToThread(run).addCallback(check)

    def test_asyncssh(self):
        try:
            import asyncssh
        except ImportError:
            raise SkipTest("asyncssh is not installed")
        port = self.port.getHost().port
        pairs = [(c.decode(), (m or b"hmac-sha2-256-etm@openssh.com").decode()) for c, m in PAIRS]

        async def one(cipher, mac):
            async with asyncssh.connect(
                "127.0.0.1", port, username="alice", password="secret-pass",
                known_hosts=None, encryption_algs=[cipher], mac_algs=[mac],
            ) as conn:
                async with conn.start_sftp_client() as client:
                    async with client.open("a.bin", "wb") as f:
                        await f.write(self.data)
                    async with client.open("a.bin", "rb") as f:
                        return await f.read() == self.data

        def run():
            return {pair: asyncio.run(one(*pair)) for pair in pairs}

        def check(results):
            self.assertEqual(results, {pair: True for pair in pairs})

        return deferToThread(run).addCallback(check)

    def test_openssh(self):
        return self.openssh()

    def test_openssh_rekeying(self):
        """
        With a rekey every 256 KiB (about a dozen key exchanges each way per
        file, in the middle of pipelined transfers), every cipher still moves
        the file intact: what a key exchange holds back goes out after it.
        """
        return self.openssh(["-o", "RekeyLimit=256K"])

    def test_paramiko_rekeying(self):
        port = self.port.getHost().port

        def run():
            transport = paramiko.Transport(("127.0.0.1", port))
            transport.connect(username="alice", password="secret-pass")
            # paramiko renegotiates after this many bytes either way.
            transport.packetizer.REKEY_BYTES = 256 * 1024
            client = paramiko.SFTPClient.from_transport(transport)
            with client.open("r.bin", "wb") as f:
                f.write(self.data)
            with client.open("r.bin", "rb") as f:
                back = f.read()
            transport.renegotiate_keys()
            names = client.listdir(".")
            transport.close()
            return back == self.data, "r.bin" in names

        return deferToThread(run).addCallback(self.assertEqual, (True, True))

    def openssh(self, options=()):
        if shutil.which("sftp") is None:
            raise SkipTest("OpenSSH's sftp is not installed")
        port = self.port.getHost().port
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        askpass = os.path.join(base, "askpass")
        with open(askpass, "w") as f:
            f.write("#!/bin/sh\necho secret-pass\n")
        os.chmod(askpass, 0o700)
        source = os.path.join(base, "source.bin")
        with open(source, "wb") as f:
            f.write(self.data)
        env = dict(os.environ, SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")

        def run():
            results = {}
            for cipher, mac in PAIRS:
                back = os.path.join(base, "back.bin")
                batch = os.path.join(base, "batch")
                with open(batch, "w") as f:
                    f.write(f"put {source} o.bin\nget o.bin {back}\n")
                argv = ["sftp", "-P", str(port), "-c", cipher.decode(), *options,
                        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                        "-o", "PubkeyAuthentication=no", "-o", "BatchMode=no", "-b", batch]
                if mac:
                    argv += ["-o", "MACs=" + mac.decode()]
                done = subprocess.run(
                    argv + ["alice@127.0.0.1"], env=env, stdin=subprocess.DEVNULL,
                    capture_output=True, timeout=60, start_new_session=True,
                )
                same = os.path.exists(back) and open(back, "rb").read() == self.data
                if os.path.exists(back):
                    os.remove(back)
                results[(cipher, mac)] = (done.returncode, same)
            return results

        def check(results):
            self.assertEqual(results, {pair: (0, True) for pair in PAIRS})

        return deferToThread(run).addCallback(check)
