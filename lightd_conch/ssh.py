"""
The SSH side: host key, factory, transport, user authentication, connection
and the session channel that carries the SFTP subsystem.

These classes translate SSH messages; what a session channel runs is built by
L{lightd_conch.commands}.
"""

from __future__ import annotations

import os
import socket
import secrets
import struct
from collections import deque
from typing import Deque, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.conch import error as conchError
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import common, connection, factory, keys, userauth
from twisted.conch.ssh.channel import SSHChannel
from twisted.cred.credentials import SSHPrivateKey, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.conch.ssh.transport import (
    DISCONNECT_BY_APPLICATION,
    DISCONNECT_MAC_ERROR,
    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
    DISCONNECT_PROTOCOL_ERROR,
    DISCONNECT_TOO_MANY_CONNECTIONS,
    MSG_KEXINIT,
    MSG_NEWKEYS,
    MSG_SERVICE_ACCEPT,
    MSG_SERVICE_REQUEST,
    SSHCiphers,
    SSHServerTransport,
)
from twisted.internet.interfaces import IReactorTime
from twisted.internet.tcp import Connection as _TCPConnection
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from zope.interface import implementer

from ._address import addressIn, formatAddress
from .checkqueue import CheckRefused
from .ciphers import PacketError, PlainSealer, makeSealer
from .audit import NullAudit
from .commands import execProtocol, subsystemProtocol
from .defender import Defender, StartupLimiter, UnknownUser
from .metrics import (
    REFUSED_BANNED,
    REFUSED_MAX_STARTUPS,
    REFUSED_MAX_STARTUPS_PER_IP,
    REFUSED_NOT_ALLOWED,
    Metrics,
)
from .limits import IOutputWatcher, OverLimit
from .sftp import SFTPServer
from .userkeys import SERVER_SIG_ALGS

log = Logger()

# Conch reports every channel, key exchange and disconnect at info level; a
# busy service wants one line per login and logout, so the Conch classes we
# build on speak only from warn upwards.
_CONCH_LEVEL = LogLevel.warn


class _ConchLogger(Logger):
    """
    Drops Conch's events below L{_CONCH_LEVEL} before building them: a
    login makes dozens (key exchange, service, each auth try, channels), and
    building each only for the filter to drop it cost a few microseconds.
    """

    def emit(self, level, format=None, **kwargs):
        if level < _CONCH_LEVEL:
            return
        super().emit(level, format, **kwargs)


_conchLog = _ConchLogger(
    namespace="lightd_conch.ssh.conch",
    observer=FilteringLogObserver(
        globalLogPublisher, [LogLevelFilterPredicate(defaultLogLevel=_CONCH_LEVEL)]
    ),
)

# Algorithms offered, strongest first.  No NIST curves, SHA-1, group
# exchange, CBC modes, 3DES or MD5.  The key exchanges are fixed; ciphers and
# MACs come from sftp.ciphers and sftp.macs (see lightd_conch.ciphers).
KEY_EXCHANGES = [
    b"mlkem768x25519-sha256",
    b"curve25519-sha256",
    b"curve25519-sha256@libssh.org",
]
# What server-sig-algs announces: the signature algorithms user keys may
# sign with (RFC 8308 3.1), not the host key's; see lightd_conch.userkeys.
USER_KEY_ALGORITHMS = SERVER_SIG_ALGS
# The prompt of the TOTP step (keyboard-interactive).
CODE_PROMPT = b"Verification code: "
# An address refused by sftp.allowed_ips is logged at most once this often.
REFUSAL_LOG_INTERVAL = 60.0
_REFUSAL_LOG_MAX = 4096
_STRICT_KEX_SERVER = b"kex-strict-s-v00@openssh.com"
_STRICT_KEX_CLIENT = b"kex-strict-c-v00@openssh.com"
_KEX_MESSAGES = frozenset([MSG_KEXINIT, MSG_NEWKEYS, *range(30, 50)])
# The smallest maximum packet size a client may give its channel.
_MIN_REMOTE_PACKET = 256


def _allowedDuringKex(messageNum: int) -> bool:
    """
    What a side may send between its KEXINIT and its NEWKEYS (RFC 4253 7.1):
    generic transport messages other than the service ones, and key exchange
    messages other than a further KEXINIT.
    """
    return (1 <= messageNum <= 49) and messageNum not in (
        MSG_SERVICE_REQUEST,
        MSG_SERVICE_ACCEPT,
        MSG_KEXINIT,
    )
MSG_CHANNEL_DATA = connection.MSG_CHANNEL_DATA

# sendmsg takes at most this many parts at once (the kernel's UIO_MAXIOV).
_IOV_MAX = 1024
# Linux's TCP_QUICKACK (12), where the socket module lacks the name.
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)
# Packets sealed while one read is dispatched are sent together at its end,
# or sooner once this many parts or bytes are waiting.
_CORK_PARTS = 512
_CORK_BYTES = 256 * 1024
# An ended channel (its protocol closed, or the client's EOF) waits this many
# seconds without any of its queued output being sent, then closes anyway.
CLOSE_GRACE = 3.0
# The smallest receive window a channel is given when its container's
# channels already hold their share (see lightd_conch.limits.grantWindow).
MIN_WINDOW = 64 * 1024
# Channels send no more while this much waits in the transport's buffer
# (beyond what the socket took): a client that stops reading its socket, with
# a wide-open window, is held back like one whose window is shut.
OUTPUT_HIGH_WATER = 512 * 1024

_TYPE_BYTES = [bytes((messageType,)) for messageType in range(256)]
_CHANNEL_DATA_HEAD = struct.Struct(">2L")


def _unsent(parts: list, sent: int) -> list:
    """
    What of C{parts} is left once their first C{sent} bytes are out.
    """
    for index, part in enumerate(parts):
        size = len(part)
        if sent < size:
            rest = parts[index:]
            if sent:
                rest[0] = memoryview(part)[sent:]
            return rest
        sent -= size
    return []


def _ours(name: Optional[bytes], offered) -> Optional[bytes]:
    """
    The object in C{offered} equal to C{name}, which is C{name} itself
    when C{offered} has none.
    """
    for candidate in offered:
        if candidate == name:
            return candidate
    return name


class _Ciphers(SSHCiphers):
    """
    A negotiated set of algorithms, sealing packets with
    L{lightd_conch.ciphers}; the names stay for Conch's isEncrypted checks.
    """

    def setKeys(self, outIV, outKey, inIV, inKey, outInteg, inInteg) -> None:
        if self.outCipType == b"none":
            self.outbound = self.inbound = PlainSealer()
            return
        self.outbound = makeSealer(
            self.outCipType, self.outMACType, outIV, outKey, outInteg, True
        )
        self.inbound = makeSealer(
            self.inCipType, self.inMACType, inIV, inKey, inInteg, False
        )


def loadOrCreateHostKey(path: str) -> keys.Key:
    """
    The service's ED25519 host key, generated at C{path} (mode 0600) the first
    time and read back on every later start, so clients see the same
    fingerprint across restarts.  A key file that group or others can read
    is used with a warning, as the API token is.

    @raise keys.BadKeyError: if the file cannot be read or created, or does
        not hold an unencrypted ED25519 private key; C{str()} names the file
        and says why in one line, never with the key's bytes (Conch's own
        messages quote them).
    """
    # The one check of a secret file's mode, shared with the API token.
    from .config import warnIfExposed

    def refuse(reason: str) -> keys.BadKeyError:
        return keys.BadKeyError(f"{path} {reason}")

    try:
        with open(path, "rb") as f:
            data = f.read()
            mode = os.fstat(f.fileno()).st_mode
    except FileNotFoundError:
        data = None
    except OSError as e:
        raise refuse(f"cannot be read: {e.strerror}") from None
    if data is not None:
        if not data.strip():
            raise refuse("is empty")
        try:
            key = keys.Key.fromString(data)
        except keys.EncryptedKeyError:
            raise refuse(
                "is protected by a passphrase; lightd-sftp needs a host key without one"
            ) from None
        except Exception:
            # BadKeyError, and struct, binascii or ValueError from a key cut short.
            raise refuse(
                "is not a private key lightd-sftp can read"
                " (damaged, truncated, or not in OpenSSH format)"
            ) from None
        if key.isPublic():
            raise refuse("is a public key; sftp.host_key must name the private key")
        if key.type() != "Ed25519":
            # An RSA host key would have Conch offer ssh-rsa (SHA-1) and
            # ECDSA the NIST curves, both of which this service avoids.
            kind = {"RSA": "an RSA", "EC": "an ECDSA", "DSA": "a DSA"}.get(
                key.type(), f"a {key.type()}"
            )
            raise refuse(f"is {kind} key; lightd-sftp uses an ED25519 host key")
        warnIfExposed("SSH host key file", path, mode)
        return key

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise refuse(f"cannot be created: {e.strerror}") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return keys.Key.fromString(pem)


def _printable(name: bytes) -> str:
    """
    A client-chosen name, safe for one log line: control characters and
    non-ASCII are escaped, so a username cannot forge lines or drive a
    terminal.
    """
    return ascii(name.decode("utf-8", "backslashreplace"))[1:-1]


def _peer(transport: SSHServerTransport) -> str:
    return formatAddress(transport.transport.getPeer())


class SSHTransport(SSHServerTransport):
    """
    The server transport, with the login grace time, an idle timeout and
    TCP_NODELAY on every connection.
    """

    _log = _conchLog
    ourVersionString = b"SSH-2.0-lightd_sftp_0.1"
    supportedKeyExchanges = KEY_EXCHANGES
    supportedCompressions = [b"none"]
    startupHost: Optional[str] = None
    _strictKex = False
    _firstKexDone = False
    _kexInitSent = False
    _receivedSize = 0
    _needed = 4
    _corked: Optional[list] = None
    _corkedSize = 0
    _blockedSize = 0  # bytes held back by a key exchange in progress
    _newKeysSent = False
    _peerInKex = False  # between the client's KEXINIT and its NEWKEYS
    _socket = None
    # The session as the audit log, the metrics and the sessions API name it.
    sessionId = ""
    loginMethod: Optional[str] = None
    startedAt: Optional[float] = None
    bytesIn = 0  # channel data, counted by SSHConnection
    bytesOut = 0
    # (budgets, container id, address) once this connection's login is
    # counted in its avatar's budgets.
    countedSession = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        settings = self.factory.settings
        clock = self.factory.clock
        self._lastActivity = clock.seconds()
        self.sessionId = secrets.token_hex(8)
        self.factory.connections.add(self)
        # A time of 0 disables that timer, as in OpenSSH.
        self._graceCall = (
            clock.callLater(settings.login_grace_time, self._graceExpired)
            if settings.login_grace_time
            else None
        )
        self._idleCall = (
            clock.callLater(settings.idle_timeout, self._checkIdle)
            if settings.idle_timeout
            else None
        )
        # Stop reading while the socket's send buffer is full, so a client that
        # does not read its replies cannot make us queue them without bound.
        self.transport.registerProducer(_ReadPauser(self), True)
        self._received: list = []
        self._corked: Optional[list] = None
        self._corkedSize = 0
        # Packets go straight to the socket when nothing is queued before
        # them (see _send); other transports (tests, TLS) take writes.
        self._socket = (
            self.transport.socket if isinstance(self.transport, _TCPConnection) else None
        )
        self.transport.write(self.ourVersionString + b"\r\n")
        self.currentEncryptions = _Ciphers(b"none", b"none", b"none", b"none")
        self.currentEncryptions.setKeys(b"", b"", b"", b"", b"", b"")
        self.sendKexInit()

    # -- the binary packet protocol ------------------------------------------

    def sendKexInit(self) -> None:
        if self._kexInitSent:
            super().sendKexInit()
            return
        # Offer strict key exchange (the Terrapin fix) in the first KEXINIT
        # only, as OpenSSH does.
        self._kexInitSent = True
        offered = self.supportedKeyExchanges
        self.supportedKeyExchanges = list(offered) + [_STRICT_KEX_SERVER]
        try:
            super().sendKexInit()
        finally:
            self.supportedKeyExchanges = offered

    def sendPacket(self, messageType: int, payload: bytes) -> None:
        self.sendPacketParts(messageType, (payload,))

    def sendPacketParts(self, messageType: int, parts) -> None:
        """
        Send a message whose payload is C{parts} joined, joining them only
        once, inside the cipher.
        """
        if self._keyExchangeState != self._KEY_EXCHANGE_NONE:
            if not self._allowedKeyExchangeMessageType(messageType):
                payload = b"".join(parts)
                self._blockedByKeyExchange.append((messageType, payload))
                # Counted as waiting output, so channels hold back and the
                # SFTP server pauses while a key exchange is unfinished.
                self._blockedSize += len(payload)
                return
            if messageType == MSG_NEWKEYS:
                self._newKeysSent = True
        sealed = self.currentEncryptions.outbound.seal(
            self.outgoingPacketSequence, (_TYPE_BYTES[messageType], *parts)
        )
        corked = self._corked
        if corked is None:
            self._send(sealed)
        else:
            corked.extend(sealed)
            self._corkedSize += sum(map(len, sealed))
            if len(corked) >= _CORK_PARTS or self._corkedSize >= _CORK_BYTES:
                self._corked = []
                self._corkedSize = 0
                self._send(corked)
        if messageType == MSG_NEWKEYS and self._strictKex:
            self.outgoingPacketSequence = 0
        else:
            self.outgoingPacketSequence = (self.outgoingPacketSequence + 1) & 0xFFFFFFFF

    def _send(self, parts: list) -> None:
        """
        Write sealed packet parts.

        When nothing is waiting in the transport's buffer they go to the
        socket with one C{sendmsg}, as they are: no join into one string, and
        no round through the reactor to register and unregister for
        writability, which for a reply to a small request costs more than the
        send.  Whatever the socket does not take, and everything while older
        data waits, is left to the transport, which keeps the order, pauses
        reading while it is full and notices a broken connection.
        """
        transport = self.transport
        sock = self._socket
        if (
            sock is None
            or transport._tempDataLen
            or len(transport.dataBuffer) != transport.offset
            or transport.disconnecting
            or not transport.connected
        ):
            transport.write(b"".join(parts))
            return
        while parts:
            batch = parts[:_IOV_MAX]
            try:
                sent = sock.sendmsg(batch)
            except OSError:
                # Full (EAGAIN) or broken: the transport queues the rest, or
                # finds the error on its own write.
                break
            if sent < sum(map(len, batch)):
                parts = _unsent(parts, sent)
                break
            parts = parts[len(batch) :]
        if parts:
            transport.write(b"".join(parts))

    def dataReceived(self, data: bytes) -> None:
        self._lastActivity = self.factory.clock.seconds()
        if not self.gotVersion:
            # Conch finds the version line, then hands the rest to getPacket.
            super().dataReceived(data)
            return
        self._received.append(data)
        self._receivedSize += len(data)
        if self._receivedSize >= self._needed:
            self._readPackets()

    def getPacket(self) -> None:
        # Called by Conch once the version line is in, for what follows it.
        if self.buf:
            self._received.append(self.buf)
            self._receivedSize += len(self.buf)
            self.buf = b""
            self._readPackets()
        return None

    def _readPackets(self) -> None:
        """
        Open and dispatch every whole packet received so far; the replies to
        the requests in this read go out together at its end.
        """
        self._corked = []
        try:
            self._dispatchReceived()
        finally:
            corked, self._corked = self._corked, None
            self._corkedSize = 0
            if corked:
                self._send(corked)
            elif self._socket is not None:
                self._ackNow()

    def _ackNow(self) -> None:
        """
        Acknowledge a read that got no reply at once.

        A client that waits for each reply and does not set TCP_NODELAY
        (libssh's default) sends a request larger than the channel's packet
        size as two SSH packets, the second one small: Nagle's algorithm
        holds that one back until the first is acknowledged, and the kernel
        delays that acknowledgement (up to 40 ms), as no reply can carry it
        before the request is whole.  That cost libssh's sequential 32 KiB
        writes 40 ms each.  TCP_QUICKACK sends the pending acknowledgement
        now; the kernel clears it again by itself, so it is set per read.
        """
        try:
            self._socket.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
        except OSError:
            pass  # a socket going away: the transport finds out on its own

    def _dispatchReceived(self) -> None:
        """
        Chunks are joined once per read, not per packet, and each packet's
        payload is a view of the decrypted bytes: channel data reaches the
        SFTP server without further copies.
        """
        chunks = self._received
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        view = memoryview(data)
        position, size = 0, len(data)
        while position < size:
            if self.transport.disconnecting:
                position = size  # nothing more is read from a closing connection
                break
            sealer = self.currentEncryptions.inbound
            try:
                opened = sealer.open(self.incomingPacketSequence, view[position:])
            except PacketError as e:
                self.sendDisconnect(
                    DISCONNECT_MAC_ERROR if "MAC" in str(e) else DISCONNECT_PROTOCOL_ERROR,
                    str(e).encode("ascii"),
                )
                position = size
                break
            if opened is None:
                self._needed = sealer.needed
                break
            payload, used = opened
            position += used
            self.incomingPacketSequence = (self.incomingPacketSequence + 1) & 0xFFFFFFFF
            messageNum = payload[0]
            if messageNum == MSG_CHANNEL_DATA and isinstance(self.service, SSHConnection):
                if self._peerInKex:
                    self._outOfKex()
                    position = size
                    break
                self.service.channelData(payload)
            else:
                self.dispatchMessage(messageNum, bytes(payload[1:]))
        else:
            self._needed = 1
        rest = data[position:] if position < size else b""
        self._received = [rest] if rest else []
        self._receivedSize = len(rest)

    def outputBuffered(self) -> int:
        """
        How many bytes wait to be sent: in the transport's buffer, sealed but
        not yet handed to it, and held back by a key exchange in progress.
        """
        transport = self.transport
        waiting = self._corkedSize + self._blockedSize
        if self._socket is not None:
            waiting += transport._tempDataLen + len(transport.dataBuffer) - transport.offset
        return waiting

    def outputDrained(self) -> None:
        """
        The transport sent all it held: channels held back by it go on.
        """
        service = self.service
        if isinstance(service, SSHConnection):
            # Only session channels are opened (SSHConnection.ssh_CHANNEL_OPEN).
            for channel in list(service.channels.values()):
                channel.outputDrained()

    def dispatchMessage(self, messageNum: int, payload: bytes) -> None:
        if self._strictKex and not self._firstKexDone and messageNum not in _KEX_MESSAGES:
            # Strict key exchange: nothing but key exchange until the first
            # NEWKEYS, so no packet can be slipped into the handshake.
            self.sendDisconnect(
                DISCONNECT_PROTOCOL_ERROR, b"unexpected message during strict key exchange"
            )
            return
        if self._peerInKex and not _allowedDuringKex(messageNum):
            self._outOfKex()
            return
        try:
            super().dispatchMessage(messageNum, payload)
        except Exception as e:
            # A message Conch cannot parse (short, garbled, out of place)
            # raises whatever its parsing met (struct.error, IndexError,
            # TypeError, AttributeError for a key exchange message before
            # KEXINIT...): one line and a protocol-error disconnect, not a
            # traceback a client could flood the log with, and not a bare
            # close.  The line names the error and what it said (escaped,
            # cut short), enough to tell a fault of ours from garbage.
            log.warn(
                "closing the connection from {peer}: bad message {number} ({error})",
                peer=_peer(self),
                number=messageNum,
                error=ascii(f"{type(e).__name__}: {e}")[1:121],
            )
            self._disconnect(DISCONNECT_PROTOCOL_ERROR, b"malformed message")

    def _outOfKex(self) -> None:
        # RFC 4253 7.1: once a side has sent KEXINIT, only transport and key
        # exchange messages until its NEWKEYS.
        self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"unexpected message during key exchange")

    def _disconnect(self, reason: int, description: bytes) -> None:
        """
        Say goodbye and close; if even the goodbye cannot be sealed, close.
        """
        try:
            self.sendDisconnect(reason, description)
        except Exception:
            self.transport.loseConnection()

    def ssh_KEXINIT(self, packet: bytes) -> None:
        if not self._firstKexDone and self.sessionID is None:
            kexAlgorithms = common.getNS(packet[16:])[0].split(b",")
            if _STRICT_KEX_CLIENT in kexAlgorithms:
                self._strictKex = True
                if self.incomingPacketSequence != 1:
                    self.sendDisconnect(
                        DISCONNECT_PROTOCOL_ERROR,
                        b"strict key exchange: KEXINIT was not the first packet",
                    )
                    return
        super().ssh_KEXINIT(packet)
        self._peerInKex = True
        negotiated = getattr(self, "nextEncryptions", None)
        if negotiated is not None and not isinstance(negotiated, _Ciphers):
            # The names chosen are held as the server's own objects, not as
            # the pieces of the client's KEXINIT they were matched in.
            self.nextEncryptions = _Ciphers(
                _ours(negotiated.outCipType, self.supportedCiphers),
                _ours(negotiated.inCipType, self.supportedCiphers),
                _ours(negotiated.outMACType, self.supportedMACs),
                _ours(negotiated.inMACType, self.supportedMACs),
            )
            self.kexAlg = _ours(self.kexAlg, self.supportedKeyExchanges)
            self.keyAlg = _ours(self.keyAlg, self.supportedPublicKeys)
            self.outgoingCompressionType = _ours(
                self.outgoingCompressionType, self.supportedCompressions
            )
            self.incomingCompressionType = _ours(
                self.incomingCompressionType, self.supportedCompressions
            )

    def ssh_NEWKEYS(self, packet: bytes) -> None:
        if not self._newKeysSent:
            # No key exchange has made keys to switch to: OpenSSH's server
            # calls this a protocol error too.
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"NEWKEYS before the key exchange")
            return
        self._newKeysSent = False
        self._peerInKex = False
        super().ssh_NEWKEYS(packet)
        self._firstKexDone = True
        # Both KEXINITs only go into this exchange's hash; the next key
        # exchange sends and receives new ones before it needs them.  The
        # client's can be kilobytes, held for the session's life otherwise.
        self.ourKexInitPayload = self.otherKexInitPayload = None
        if self._strictKex:
            self.incomingPacketSequence = 0
        if self._blockedSize:
            # What the key exchange held back is sent: channels go on.
            self._blockedSize = 0
            self.outputDrained()

    def sendExtInfo(self, extensions) -> None:
        super().sendExtInfo(
            [
                (name, b",".join(USER_KEY_ALGORITHMS) if name == b"server-sig-algs" else value)
                for name, value in extensions
            ]
        )

    def receiveError(self, reasonCode: int, description: bytes) -> None:
        # A client saying goodbye is not an error of ours.
        pass

    def _graceExpired(self) -> None:
        self._graceCall = None
        log.info("login grace time over for {peer}", peer=_peer(self))
        self._disconnect(DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"login grace time exceeded")

    def _checkIdle(self) -> None:
        timeout = self.factory.settings.idle_timeout
        idle = self.factory.clock.seconds() - self._lastActivity
        if idle >= timeout:
            self._idleCall = None
            log.info("closing idle connection from {peer}", peer=_peer(self))
            self._disconnect(DISCONNECT_BY_APPLICATION, b"idle timeout")
            return
        self._idleCall = self.factory.clock.callLater(timeout - idle, self._checkIdle)

    def ssh_SERVICE_REQUEST(self, packet: bytes) -> None:
        # Some clients (paramiko) request ssh-userauth before every attempt;
        # Conch would start a fresh service with a fresh failure count each
        # time.  Keep the running one, as OpenSSH keeps its auth context.
        if not self._firstKexDone or isinstance(self.service, SSHConnection):
            # Before any key exchange there is nothing to serve; after login
            # a fresh user-auth service would let the connection log in
            # again (as another container, with a fresh failure count).
            log.warn(
                "closing the connection from {peer}: service request {when}",
                peer=_peer(self),
                when="after login" if self._firstKexDone else "before key exchange",
            )
            self.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"unexpected service request")
            return
        if common.getNS(packet)[0] == b"ssh-userauth" and isinstance(
            self.service, UserAuthServer
        ):
            self.sendPacket(MSG_SERVICE_ACCEPT, common.NS(b"ssh-userauth"))
            return
        super().ssh_SERVICE_REQUEST(packet)

    def quietFor(self) -> float:
        """
        Seconds since the client last sent anything.
        """
        return self.factory.clock.seconds() - self._lastActivity

    def _auditFields(self) -> dict:
        avatar = getattr(self, "avatar", None)
        return {
            "container": None if avatar is None else avatar.containerId,
            "username": getattr(self, "loginUsername", None),
            "ip": self.transport.getPeer().host,
        }

    def _releaseStartup(self) -> None:
        # This connection no longer counts as an unauthenticated startup.
        host, self.startupHost = self.startupHost, None
        if host is not None:
            self.factory.startups.release(host)

    def authenticated(self, username: str, containerId: str, method: str = "password") -> None:
        """
        Called by user authentication on success: the grace period is over.
        """
        if self._graceCall is not None and self._graceCall.active():
            self._graceCall.cancel()
        self._graceCall = None
        self._releaseStartup()
        self.loginUsername = username
        self.loginMethod = method
        self.startedAt = self.factory.clock.seconds()
        self.factory.metrics.loginSucceeded(self, method)
        avatar = getattr(self, "avatar", None)
        fingerprint = getattr(avatar, "keyFingerprint", None)
        extra = {} if fingerprint is None else {"key": fingerprint}
        self.factory.audit.event(
            "login", self.sessionId, **self._auditFields(), method=method, **extra
        )
        log.info(
            "login: user {username} (container {container}) from {peer} by {method}",
            username=username,
            container=containerId,
            peer=_peer(self),
            method=method
            + ("" if fingerprint is None else " " + fingerprint)
            + (" and code" if getattr(avatar, "needsCode", False) else ""),
        )
        if self.factory.sessions is not None:
            self.factory.sessions.loggedIn(self)

    def endStale(self, path: bytes) -> None:
        """
        End this session at once: the client left it without a word and a
        new session of the same login resumes its upload of C{path}.
        """
        log.info(
            "ending the silent session of user {username} from {peer}:"
            " a new session resumes its upload of {path}",
            username=getattr(self, "loginUsername", "?"),
            peer=_peer(self),
            path=_printable(path[:256]),
        )
        self.sendDisconnect(DISCONNECT_BY_APPLICATION, b"superseded by a new session")
        self.transport.abortConnection()

    def connectionLost(self, reason=None) -> None:
        for call in (self._graceCall, self._idleCall):
            if call is not None and call.active():
                call.cancel()
        self._graceCall = self._idleCall = None
        self._releaseStartup()
        self.factory.connections.discard(self)
        counted, self.countedSession = self.countedSession, None
        if counted is not None:
            budgets, containerId, address = counted
            budgets.closeSession(containerId, address)
        if getattr(self, "avatar", None) is not None:
            self.factory.metrics.sessionEnded(self)
            self.factory.audit.event(
                "logout",
                self.sessionId,
                **self._auditFields(),
                bytes_in=self.bytesIn,
                bytes_out=self.bytesOut,
            )
            log.info(
                "logout: user {username} (container {container}) from {peer}",
                username=self.loginUsername,
                container=self.avatar.containerId,
                peer=_peer(self),
            )
            if self.factory.sessions is not None:
                self.factory.sessions.loggedOut(self)
        super().connectionLost(reason)


class _ReadPauser:
    """
    A producer that pauses and resumes reading from its own transport, and
    tells the SSH transport when the buffer has drained.
    """

    def __init__(self, protocol: "SSHTransport") -> None:
        self._protocol = protocol
        self._transport = protocol.transport

    def pauseProducing(self) -> None:
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self._transport.resumeProducing()
        self._protocol.outputDrained()

    def stopProducing(self) -> None:
        pass


class WrongCode(UnauthorizedLogin):
    """
    A TOTP code that is wrong, or was used before.
    """


class CodeNotChecked(WrongCode, CheckRefused):
    """
    A TOTP code the check queue refused to check: answered as a wrong code.
    """


class UserAuthServer(userauth.SSHUserAuthServer):
    """
    Public-key and password authentication with the configured attempt
    limit, and a TOTP code (keyboard-interactive) after either where the
    container has TOTP on.

    A wrong password or code is a failed login: logged with the username and
    the source address (never the secret) and scored by the defender.  A key
    that is not the container's is not: clients offer every key they hold.
    A connection that tried to log in and ends without success is scored
    once, unless something it sent was scored already.
    """

    _log = _conchLog

    def serviceStarted(self) -> None:
        settings = self.transport.factory.settings
        self.clock = self.transport.factory.clock
        # The transport enforces the login grace time from the first byte.
        self.loginTimeout = 10 * 365 * 24 * 3600
        # Conch disconnects on the failure after this many; OpenSSH's
        # MaxAuthTries counts the disconnecting one.
        self.attemptsBeforeDisconnect = settings.max_auth_tries - 1
        self._pending = 0
        self._tried = False
        self._settled = False
        # (portal result, first method) once a password or key was right
        # and the container wants a code too.
        self._firstFactor = None
        self._codeAnswer = None
        super().serviceStarted()
        self._methods = list(self.supportedAuthentications)

    def _dropFirstFactor(self) -> None:
        # A login that will not get its code: its avatar is let go.
        firstFactor, self._firstFactor = self._firstFactor, None
        if firstFactor is not None:
            self.supportedAuthentications = list(self._methods)
            firstFactor[0][2]()

    def serviceStopped(self) -> None:
        super().serviceStopped()
        self._dropFirstFactor()
        checks = getattr(self.transport.factory, "checks", None)
        if checks is not None:
            # A check still waiting is answered to nobody: not made.
            checks.forget(self.transport)
        if self._tried and not self._settled:
            self._settled = True
            log.info(
                "failed login: user {username} from {peer}: disconnected before logging in",
                username=_printable((self.user or b"")[:128]),
                peer=_peer(self.transport),
            )
            factory = self.transport.factory
            host = self.transport.transport.getPeer().host
            method = (self.method or b"none").decode("ascii", "replace")
            factory.metrics.loginFailed(method)
            factory.audit.event(
                "login_failed",
                self.transport.sessionId,
                container=None,
                username=_printable((self.user or b"")[:128]),
                ip=host,
                method=method,
                reason="disconnected",
            )
            factory.defender.failedLogin(host, knownUser=True)

    def ssh_USERAUTH_REQUEST(self, packet: bytes):
        # A client could send many attempts without waiting for answers; count
        # the ones still being checked, so pipelining cannot exceed the limit.
        if self.loginAttempts + self._pending > self.attemptsBeforeDisconnect:
            self.transport.sendDisconnect(
                DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many authentication failures"
            )
            return None
        # A request too short to parse raises: the transport logs it and
        # disconnects, as for any malformed message.
        user, nextService, method, _ = common.getNS(packet, 3)
        if method != b"none":
            self._tried = True
        if self._codeAnswer is not None:
            # A new request abandons the code asked for (RFC 4256 3.2).
            answer, self._codeAnswer = self._codeAnswer, None
            answer.errback(conchError.IgnoreAuthentication())
        if self._firstFactor is not None and (user != self.user or nextService != self.nextService):
            # A code is asked for the login whose first factor was right.
            self._dropFirstFactor()
        self._pending += 1
        d = super().ssh_USERAUTH_REQUEST(packet)
        if d is None:
            self._pending -= 1
            return None

        def done(result):
            self._pending -= 1
            return result

        return d.addBoth(done)

    def _fromHere(self, credentials):
        # The check waits its turn by the client's address, one at a time
        # for this connection (lightd_conch.checkqueue).
        credentials.source = self.transport.transport.getPeer().host
        credentials.connection = self.transport
        return credentials

    def auth_password(self, packet: bytes):
        """
        Like Conch's, with the client's address and connection on the
        credentials for the check queue.
        """
        password = common.getNS(packet[1:])[0]
        credentials = self._fromHere(UsernamePassword(self.user, password))
        return self.portal.login(credentials, None, IConchUser).addErrback(self._ebPassword)

    def auth_publickey(self, packet: bytes):
        """
        Like Conch's, with the signed data built here and the security-key
        wrapping left to the checker (L{lightd_conch.userkeys}), and a
        malformed request or a key type Conch cannot read taken as a key
        that is not the container's.
        """
        try:
            hasSignature = packet[0]
            algorithm, blob, rest = common.getNS(packet[1:], 2)
            signature = common.getNS(rest)[0] if hasSignature else None
        except (ValueError, struct.error, IndexError):
            return defer.fail(UnauthorizedLogin("malformed publickey request"))
        if signature is None:
            credentials = self._fromHere(SSHPrivateKey(self.user, algorithm, blob, None, None))
            return self.portal.login(credentials, None, IConchUser).addErrback(
                self._ebCheckKey, packet[1:]
            )
        signed = (
            common.NS(self.transport.sessionID)
            + bytes((userauth.MSG_USERAUTH_REQUEST,))
            + common.NS(self.user)
            + common.NS(self.nextService)
            + common.NS(b"publickey")
            + bytes((hasSignature,))
            + common.NS(algorithm)
            + common.NS(blob)
        )
        credentials = self._fromHere(SSHPrivateKey(self.user, algorithm, blob, signed, signature))
        return self.portal.login(credentials, None, IConchUser)

    def auth_keyboard_interactive(self, packet: bytes):
        """
        The TOTP step: only offered once a password or key was right for a
        container with TOTP on; asks L{CODE_PROMPT}, unechoed.
        """
        if self._firstFactor is None or self._codeAnswer is not None:
            return defer.fail(conchError.ConchError("keyboard-interactive is not expected"))
        self._codeAnswer = defer.Deferred()
        self.transport.sendPacket(
            userauth.MSG_USERAUTH_INFO_REQUEST,
            common.NS(b"") + common.NS(b"") + common.NS(b"")
            + struct.pack(">L", 1) + common.NS(CODE_PROMPT) + b"\x00",
        )
        return self._codeAnswer

    def ssh_USERAUTH_INFO_RESPONSE(self, packet: bytes) -> None:
        answer, self._codeAnswer = self._codeAnswer, None
        if answer is None or self._firstFactor is None:
            self.transport.sendDisconnect(
                DISCONNECT_PROTOCOL_ERROR, b"unexpected USERAUTH_INFO_RESPONSE"
            )
            return
        try:
            (count,) = struct.unpack(">L", packet[:4])
            responses = []
            rest = packet[4:]
            for _ in range(min(count, 2)):
                response, rest = common.getNS(rest)
                responses.append(response)
        except (ValueError, struct.error, IndexError):
            answer.errback(WrongCode("malformed answer"))
            return
        result, _ = self._firstFactor
        verifier = self.transport.factory.totp
        if count != 1 or verifier is None:
            answer.errback(WrongCode("no single answer"))
            return

        def checked(ok):
            if not ok:
                raise WrongCode("wrong verification code")
            return result

        def refused(reason):
            reason.trap(CheckRefused)
            raise CodeNotChecked(reason.getErrorMessage())

        verifier.check(
            result[1].containerId,
            responses[0],
            self.transport.transport.getPeer().host,
            self.transport,
        ).addCallbacks(checked, refused).chainDeferred(answer)

    def _cbFinishedAuth(self, result) -> None:
        interface, avatar, logout = result
        username = self.user.decode("utf-8", "replace")
        if self._firstFactor is not None and self.method == b"keyboard-interactive":
            method = self._firstFactor[1]
        else:
            method = self.method.decode("ascii", "replace")
            why = avatar.policy.refusal(self.transport.transport.getPeer().host, method)
            if why is not None:
                # The password or key was right: no failed login, no score.
                self._settled = True
                log.info(
                    "login refused: user {username} (container {container}) from {peer}: {why}",
                    username=_printable(self.user[:128]),
                    container=avatar.containerId,
                    peer=_peer(self.transport),
                    why=why,
                )
                logout()
                self.transport.sendDisconnect(
                    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, why.encode("utf-8")
                )
                return
            if getattr(avatar, "needsCode", False):
                # A partial success: the client answers the code next.
                self._firstFactor = (result, method)
                self.supportedAuthentications = [b"keyboard-interactive"]
                self.transport.sendPacket(
                    userauth.MSG_USERAUTH_FAILURE, common.NS(b"keyboard-interactive") + b"\xff"
                )
                return
        transport = self.transport
        budgets = getattr(avatar, "budgets", None)
        address = getattr(transport.transport.getPeer(), "host", None)
        try:
            if budgets is not None:
                budgets.openSession(avatar.containerId, address)
        except OverLimit as e:
            # The password was right, so this is no failed login for the
            # defender; the client is told why, in the words it will show.
            log.warn(
                "refused login: user {username} (container {container}) from {peer}: {reason}",
                username=username,
                container=avatar.containerId,
                peer=_peer(transport),
                reason=e.reason,
            )
            self._settled = True
            logout()
            transport.sendDisconnect(DISCONNECT_TOO_MANY_CONNECTIONS, e.reason.encode("ascii"))
            return
        if budgets is not None:
            transport.countedSession = (budgets, avatar.containerId, address)
        self._settled = True
        self._firstFactor = None
        avatar.method = method
        avatar.transport = transport
        super()._cbFinishedAuth(result)
        transport.authenticated(username, avatar.containerId, method)

    def _ebBadAuth(self, reason) -> None:
        if self.method in (b"password", b"keyboard-interactive") and reason.check(
            UnauthorizedLogin
        ):
            self._settled = True
            log.info(
                "failed login: user {username} from {peer}{why}",
                username=_printable(self.user[:128]),
                peer=_peer(self.transport),
                why=(
                    f": not checked, {reason.getErrorMessage()}"
                    if reason.check(CheckRefused)
                    else ": wrong verification code" if reason.check(WrongCode) else ""
                ),
            )
            host = self.transport.transport.getPeer().host
            factory = self.transport.factory
            method = self.method.decode("ascii", "replace")
            factory.metrics.loginFailed(method)
            factory.audit.event(
                "login_failed",
                self.transport.sessionId,
                container=None,
                username=_printable(self.user[:128]),
                ip=host,
                method=method,
                reason=(
                    "wrong_code"
                    if reason.check(WrongCode)
                    else "unknown_user" if reason.check(UnknownUser) else "wrong_password"
                ),
            )
            defender = factory.defender
            wasBanned = defender.isBanned(host)
            defender.failedLogin(host, knownUser=not reason.check(UnknownUser))
            if defender.isBanned(host):
                if not wasBanned:
                    factory.metrics.banned()
                    factory.audit.event("banned", None, container=None, username=None, ip=host)
                self.transport.sendDisconnect(
                    DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                    b"too many authentication failures",
                )
                return
        super()._ebBadAuth(reason)


class SSHConnection(connection.SSHConnection):
    """
    The connection service: only session channels, whose receive window the
    channel itself manages (see L{SessionChannel.consumed}).
    """

    _log = _conchLog

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channelType, rest = common.getNS(packet)
        if channelType != b"session":
            self._refuseChannel(
                rest,
                connection.OPEN_ADMINISTRATIVELY_PROHIBITED,
                b"only session channels are served",
            )
        elif len(self.channels) >= self.transport.factory.settings.max_channels:
            self._refuseChannel(
                rest, connection.OPEN_RESOURCE_SHORTAGE, b"too many channels"
            )
        elif struct.unpack(">3L", rest[:12])[2] < _MIN_REMOTE_PACKET:
            # Replies are cut into packets of at most this size: 0 would
            # never make progress, and a few bytes would make a packet of
            # every few bytes.
            self._refuseChannel(
                rest, connection.OPEN_ADMINISTRATIVELY_PROHIBITED, b"maximum packet size too small"
            )
        else:
            super().ssh_CHANNEL_OPEN(packet)

    def _refuseChannel(self, rest: bytes, reason: int, message: bytes) -> None:
        (senderChannel,) = struct.unpack(">L", rest[:4])
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", senderChannel, reason)
            + common.NS(message)
            + common.NS(b""),
        )

    def ssh_CHANNEL_DATA(self, packet: bytes) -> None:
        self.channelData(memoryview(bytes((MSG_CHANNEL_DATA,)) + packet))

    def channelData(self, message: memoryview) -> None:
        """
        A CHANNEL_DATA message (type byte included), as a view: the data
        goes to the channel without a copy.  The channel opens its receive
        window itself (L{SessionChannel._openWindow}).
        """
        if len(message) < 9:
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"short CHANNEL_DATA")
            return
        localChannel, dataLength = struct.unpack_from(">2L", message, 1)
        channel = self.channels.get(localChannel)
        if channel is None:
            self.transport.sendDisconnect(DISCONNECT_PROTOCOL_ERROR, b"no such channel")
            return
        data = message[9:]
        if (
            len(data) != dataLength
            or dataLength > channel.localWindowLeft
            or dataLength > channel.localMaxPacket
        ):
            self.sendClose(channel)
            return
        channel.localWindowLeft -= dataLength
        self.transport.bytesIn += dataLength
        channel.dataReceived(data)

    def ssh_CHANNEL_EXTENDED_DATA(self, packet: bytes) -> None:
        # Conch reopens the window for extended data whatever the channel's
        # state; an ended channel's stays shut (see SessionChannel.ended).
        if len(packet) >= 12:
            localChannel, _, dataLength = struct.unpack(">3L", packet[:12])
            channel = self.channels.get(localChannel)
            if getattr(channel, "ended", False):
                if dataLength > channel.localWindowLeft or dataLength > channel.localMaxPacket:
                    self.sendClose(channel)
                else:
                    channel.localWindowLeft -= dataLength
                return
        super().ssh_CHANNEL_EXTENDED_DATA(packet)

    def sendData(self, channel, data) -> None:
        """
        Send C{data} (bytes, or a list of parts) as one CHANNEL_DATA message.
        """
        if channel.localClosed:
            return
        remote = self.channelsToRemoteChannel[channel]
        if data.__class__ is list:
            size = sum(map(len, data))
            parts = [_CHANNEL_DATA_HEAD.pack(remote, size), *data]
        else:
            size = len(data)
            parts = (_CHANNEL_DATA_HEAD.pack(remote, size), data)
        self.transport.bytesOut += size
        self.transport.sendPacketParts(MSG_CHANNEL_DATA, parts)


class _Stderr(bytes):
    """Queued output that goes out as extended data (stderr)."""


@implementer(IOutputWatcher)
class SessionChannel(SSHChannel):
    """
    A session channel that serves the C{sftp} subsystem, and as C{exec}
    legacy scp and rsync's server (see L{lightd_conch.commands}).

    Output is queued as a list of chunks (not Conch's growing byte string,
    twisted#12139) and sent as the client's window and the transport allow:
    nothing more is sent while L{OUTPUT_HIGH_WATER} bytes wait in the
    transport.  When more than L{highWater} bytes are queued, or the queues
    of all the container's channels together are over its budget (see
    L{lightd_conch.limits}), the protocol is paused and reads no further
    requests, and while it is paused this channel does not open its receive
    window.

    Once the channel has ended (its protocol closed it, or the client sent
    EOF), what the client sends is dropped and the window stays shut; the
    channel closes as soon as its queue is sent, or once L{CLOSE_GRACE}
    seconds pass without any of it going out.

    A container's bandwidth limits (its policy's C{bandwidth_up} and
    C{bandwidth_down}) are held here, for every protocol alike: what is sent
    and received is spent from the container's buckets, and while one is in
    debt this channel sends nothing more, or keeps its receive window shut,
    until the debt is paid.
    """

    name = b"session"
    _log = _conchLog
    highWater = 1024 * 1024
    lowWater = 256 * 1024
    clock = None  # the factory's clock (or the reactor) unless a test sets one

    # State that starts the same in every channel is a class default until
    # the channel changes it: an instance with 30 attributes or more has its
    # own dictionary (1.6 KiB in CPython 3.11) instead of compact values.
    # The output queue, a deque once something waits in it.
    _queue: "Deque[bytes] | tuple" = ()
    _queued = 0
    _exitStatus: Optional[int] = None
    _eofSeen = False
    _graceCall = None
    _lastProgress = 0.0
    _throttled = None
    # An exec's command line, and what it moved, for the audit log.
    _command: Optional[bytes] = None
    _commandIn = _commandOut = 0
    _commandStatus: Optional[int] = None
    _heldByContainer = False
    _windowGranted = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.protocol: Optional[SFTPServer] = None
        self._state = getattr(self.avatar, "state", None)
        # The budgets this container's queued output counts against.
        self._budgets = getattr(self.avatar, "budgets", None)
        self._owner = getattr(self.avatar, "containerId", None)
        if self._budgets is not None:
            # What a client may send that the daemon may have to hold (a
            # paused protocol keeps it) is the container's too: a container
            # with many channels gives each new one a smaller window.
            window = self._budgets.grantWindow(
                self._owner, self.localWindowSize, max(MIN_WINDOW, self.localMaxPacket)
            )
            self.localWindowSize = self.localWindowLeft = window
            self._windowGranted = True
            self._budgets.watchOutput(self._owner, self)
            if self._budgets.outputFull(self._owner):
                self._heldByContainer = True

    @property
    def ended(self) -> bool:
        """
        Whether this channel takes no more input: its protocol ended it, or
        the client sent EOF.
        """
        return bool(self.closing) or self._eofSeen

    def _clock(self):
        clock = self.clock
        if clock is None:
            clock = getattr(getattr(self.conn.transport, "factory", None), "clock", None)
        if clock is None:
            from twisted.internet import reactor as clock
        return clock

    # -- requests ---------------------------------------------------------

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        # Shell, pty, X11, agent forwarding and env are refused quietly: a
        # refusal is an answer, not an event worth a log line.  An exec of
        # anything but scp or rsync is accepted and ends with status 127.
        if requestType == b"subsystem":
            return self._startSubsystem(data)
        if requestType == b"exec":
            return self._startExec(data)
        return 0

    def _startExec(self, data: bytes) -> int:
        if self.protocol is not None:
            return 0
        self._command = common.getNS(data)[0]
        self.protocol = execProtocol(self._command, self.avatar)
        # Started once the request's reply is out, so no output (or exit
        # status) of the command can overtake it; input meanwhile is kept.
        self._clock().callLater(0, self._connectExec, self.protocol)
        return 1

    def _auditCommand(self) -> None:
        # One event per scp or rsync command, once it has ended.
        audit = getattr(self.avatar, "audit", None)
        if audit is None:
            return
        status = self._commandStatus
        audit(
            "exec",
            command=self._command[:1024].decode("utf-8", "backslashreplace"),
            bytes_in=self._commandIn,
            bytes_out=self._commandOut,
            result="ok" if status == 0 else "ended" if status is None else f"exit status {status}",
        )

    def _connectExec(self, protocol) -> None:
        if self.protocol is protocol and not self.localClosed:
            protocol.makeConnection(self)

    def _startSubsystem(self, data: bytes) -> int:
        if self.protocol is not None:
            return 0
        protocol = subsystemProtocol(
            common.getNS(data)[0], self.avatar, self.conn.transport.otherVersionString
        )
        if protocol is None:
            return 0
        if isinstance(protocol, SFTPServer):
            protocol.requestCounts = self.conn.transport.factory.metrics.sftpRequests
        self.protocol = protocol
        protocol.makeConnection(self)
        return 1

    # -- input ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.ended:
            return  # nothing is kept, and the window stays shut
        if self.protocol is None:
            self.loseConnection()  # data before any subsystem: nothing to feed
            return
        if self._heldByContainer and not self.protocol.paused:
            self.protocol.pauseProducing()  # started while the container was full
        if not getattr(self.protocol, "acceptsViews", False):
            data = bytes(data)  # exec protocols parse bytes
        state = self._state
        if state is not None and state.policy.bandwidth_up:
            state.up.spend(state.policy.bandwidth_up, len(data))
        if self._command is not None:
            self._commandIn += len(data)
        self.protocol.dataReceived(data)
        self._openWindow()

    def _openWindow(self) -> None:
        # The window check first: it is the one that fails on most calls.
        if self.localWindowLeft >= self.localWindowSize // 2 or self.ended:
            return
        if self.protocol is not None and self.protocol.paused:
            return
        state = self._state
        if state is not None and state.policy.bandwidth_up and self._throttle(
            state.up, state.policy.bandwidth_up
        ):
            return
        self.conn.adjustWindow(self, self.localWindowSize - self.localWindowLeft)

    def _throttle(self, bucket, rate: int) -> bool:
        """
        Whether C{bucket} is in debt at C{rate}; if so, this channel goes on
        (sends, opens its window) once it is paid.
        """
        wait = bucket.wait(rate)
        if not wait:
            return False
        if self._throttled is None:
            self._throttled = self._clock().callLater(wait, self._unthrottle)
        return True

    def _unthrottle(self) -> None:
        self._throttled = None
        if not self.localClosed:
            self.outputDrained()
            self._openWindow()

    def eofReceived(self) -> None:
        self._eofSeen = True
        eofReceived = getattr(self.protocol, "eofReceived", None)
        if eofReceived is not None:
            eofReceived()
        elif self.protocol is not None:
            # The client ended the sftp session: exit 0, as OpenSSH's
            # sftp-server does.  scp in SFTP mode fails without a status.
            self.exit(0)
        else:
            self.loseConnection()

    def resumeInput(self) -> None:
        """
        The protocol can take input again: reopen the receive window.
        """
        self._openWindow()

    def closeReceived(self) -> None:
        # The client reads nothing more from this channel.
        self._dropQueue()
        self.loseConnection()

    def closed(self) -> None:
        if self._command is not None:
            self._auditCommand()
        if self._throttled is not None and self._throttled.active():
            self._throttled.cancel()
        self._throttled = None
        self._dropQueue()
        self._endProtocol()

    def _endProtocol(self) -> None:
        if self._graceCall is not None:
            if self._graceCall.active():
                self._graceCall.cancel()
            self._graceCall = None
        if self._budgets is not None:
            self._budgets.unwatchOutput(self._owner, self)
            if self._windowGranted:
                # Ended: what the client sends from now on is dropped.
                self._windowGranted = False
                self._budgets.returnWindow(self._owner, self.localWindowSize)
        if self.protocol is not None:
            protocol, self.protocol = self.protocol, None
            protocol.connectionLost(None)

    def _dropQueue(self) -> None:
        if self._queue:
            self._queue.clear()
        if self._queued and self._budgets is not None:
            self._budgets.queueOutput(self._owner, -self._queued)
        self._queued = 0
        self._exitStatus = None  # output was lost: no status claims otherwise

    # -- output -----------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.localClosed:
            return
        size = len(data)
        if self._command is not None:
            self._commandOut += size
        if (
            not self._queue
            and size <= self.remoteWindowLeft
            and size <= self.remoteMaxPacket
            and data.__class__ is bytes
            and self.conn.transport.outputBuffered() <= OUTPUT_HIGH_WATER
            and (self._state is None or not self._state.policy.bandwidth_down)
        ):
            # A reply that fits, with nothing ahead of it: sent as it is,
            # without a round through the queue.
            self.remoteWindowLeft -= size
            self.conn.sendData(self, data)
            return
        queue = self._queue
        if queue.__class__ is tuple:
            queue = self._queue = deque()
        queue.append(data)
        self._queued += size
        if self._budgets is not None:
            self._budgets.queueOutput(self._owner, size)
        self._flush()
        self._pauseIfFull()

    def writeSequence(self, seq) -> None:
        # Queued as they are: _flush cuts packets across them, so a reply's
        # header and its data are never joined into one more copy.
        if self.localClosed:
            return
        size = 0
        queue = self._queue
        if queue.__class__ is tuple:
            queue = self._queue = deque()
        for data in seq:
            queue.append(data)
            size += len(data)
        self._queued += size
        if self._budgets is not None:
            self._budgets.queueOutput(self._owner, size)
        self._flush()
        self._pauseIfFull()

    def _pauseIfFull(self) -> None:
        # Paused again even if it says it is: rsync's "paused" also means
        # its stdin is full, while its output still flows.
        if self._queued > self.highWater and self.protocol is not None:
            self.protocol.pauseProducing()

    # -- the container's budget (IOutputWatcher) ----------------------------

    def containerOutputFull(self) -> None:
        self._heldByContainer = True
        if self.protocol is not None:
            self.protocol.pauseProducing()

    def containerOutputLow(self) -> None:
        self._heldByContainer = False
        self.outputDrained()

    def writeStderr(self, data: bytes) -> None:
        """
        Queue C{data} as extended data of type stderr, in order with output.
        """
        self.write(_Stderr(data))

    def exit(self, code: int) -> None:
        """
        End a command: once the output queued so far is out, send its exit
        status, EOF and close.
        """
        self._exitStatus = self._commandStatus = code
        self.loseConnection()

    def _flush(self) -> None:
        queue = self._queue
        transport = self.conn.transport
        state = self._state
        rate = 0 if state is None else state.policy.bandwidth_down
        before = self._queued
        while queue and self.remoteWindowLeft > 0:
            if transport.outputBuffered() > OUTPUT_HIGH_WATER:
                break  # outputDrained goes on
            if rate and self._throttle(state.down, rate):
                break  # _unthrottle goes on
            limit = min(self.remoteWindowLeft, self.remoteMaxPacket)
            if queue[0].__class__ is _Stderr:
                chunk = queue[0]
                size = min(len(chunk), limit)
                self.conn.sendExtendedData(
                    self, connection.EXTENDED_DATA_STDERR, bytes(chunk[:size])
                )
                if size == len(chunk):
                    queue.popleft()
                else:
                    queue[0] = _Stderr(chunk[size:])
            else:
                # One CHANNEL_DATA message from as many queued chunks as fit;
                # a chunk cut in two is cut as views, without a copy.
                parts = []
                size = 0
                while queue and size < limit and queue[0].__class__ is not _Stderr:
                    chunk = queue[0]
                    take = min(len(chunk), limit - size)
                    if take == len(chunk):
                        parts.append(queue.popleft())
                    else:
                        view = memoryview(chunk)
                        parts.append(view[:take])
                        queue[0] = view[take:]
                    size += take
                self.conn.sendData(self, parts)
            self.remoteWindowLeft -= size
            self._queued -= size
            if rate:
                state.down.spend(rate, size)
        sent = before - self._queued
        if sent:
            if self._budgets is not None:
                self._budgets.queueOutput(self._owner, -sent)
            if self.closing:
                self._lastProgress = self._clock().seconds()
        if self.closing and not queue:
            self._close()

    def _close(self) -> None:
        if self.localClosed:
            return
        if self._exitStatus is not None:
            code, self._exitStatus = self._exitStatus, None
            self.conn.sendRequest(self, b"exit-status", struct.pack(">L", code))
            self.conn.sendEOF(self)
        self.conn.sendClose(self)
        # Nothing more goes out on this channel: its protocol ends now, not
        # when (if ever) the client answers the close.
        self._endProtocol()

    def _graceOver(self) -> None:
        self._graceCall = None
        if self.localClosed:
            return
        clock = self._clock()
        waited = clock.seconds() - self._lastProgress
        if self._queue and waited < CLOSE_GRACE:
            # Some went out meanwhile: a slow reader, not a stalled one.
            self._graceCall = clock.callLater(CLOSE_GRACE - waited, self._graceOver)
            return
        self._dropQueue()
        self._close()

    def addWindowBytes(self, data: int) -> None:
        if self.remoteWindowLeft + data > 0xFFFFFFFF:
            # RFC 4254 5.2: a window never exceeds 2**32 - 1 bytes.
            self.conn.transport.sendDisconnect(
                DISCONNECT_PROTOCOL_ERROR, b"window adjust beyond 2**32 - 1"
            )
            return
        self.remoteWindowLeft += data
        self.outputDrained()

    def outputDrained(self) -> None:
        """
        Room to send (window, or the transport's buffer): send what is
        queued, and let the protocol go on once little is left.
        """
        self._flush()
        protocol = self.protocol
        if (
            protocol is not None
            and protocol.paused
            and self._queued <= self.lowWater
            and not self._heldByContainer
        ):
            protocol.resumeProducing()
            self._openWindow()

    def loseConnection(self) -> None:
        self.closing = 1
        if not self._queue:
            self._close()
        elif self._graceCall is None and not self.localClosed:
            clock = self._clock()
            self._lastProgress = clock.seconds()
            self._graceCall = clock.callLater(CLOSE_GRACE, self._graceOver)


class SSHFactory(factory.SSHFactory):
    """
    Builds L{SSHTransport}s that share one host key, portal and settings.

    @ivar settings: the C{sftp} section of the configuration.
    @ivar clock: the reactor's time, injected for tests.
    @ivar sessions: a L{lightd_conch.sessions.SessionRegistry} told of each
        login and logout, or None.
    @ivar defender: the L{Defender} that scores failed logins and refuses
        banned addresses before key exchange.
    @ivar startups: the L{StartupLimiter} for unauthenticated connections.
    @ivar connections: every open L{SSHTransport}, logged in or not.
    @ivar audit: where logins, failed logins and logouts are recorded
        (L{lightd_conch.audit.AuditLog}).
    @ivar metrics: the L{lightd_conch.metrics.Metrics} counted into.
    """

    protocol = SSHTransport
    noisy = False
    _log = _conchLog
    sessions = None
    # The TOTP verifier (lightd_conch.totp.TOTPVerifier), or None.
    totp = None
    # The login checks' queue (lightd_conch.checkqueue.FairCheckQueue), or None.
    checks = None
    audit = NullAudit()
    services = {
        b"ssh-userauth": UserAuthServer,
        b"ssh-connection": SSHConnection,
    }

    def __init__(
        self,
        portal,
        hostKey: keys.Key,
        settings,
        clock: IReactorTime,
        defender: Optional[Defender] = None,
    ) -> None:
        self.portal = portal
        self.settings = settings
        self.clock = clock
        self.defender = defender or Defender.fromConfig(clock, settings.defender)
        self.startups = StartupLimiter(
            settings.max_startups, settings.max_startups_per_ip
        )
        self._refusalsLogged: dict = {}
        self.connections: set = set()
        self.metrics = Metrics()
        self.privateKeys = {hostKey.sshType(): hostKey}
        self.publicKeys = {hostKey.sshType(): hostKey.public()}
        self.primes = None
        self._offered: Optional[tuple] = None

    def buildProtocol(self, addr):
        """
        Refuse an address outside C{sftp.allowed_ips}, a banned address, or
        one over the unauthenticated-connection limits, before anything is
        sent: returning None closes the socket.
        """
        host = getattr(addr, "host", None)
        if host is not None:
            if self.settings.allowed_ips and not addressIn(host, self.settings.allowed_ips):
                self.metrics.connectionRefused(REFUSED_NOT_ALLOWED)
                self._logRefusal(host)
                return None
            if self.defender.isBanned(host):
                self.metrics.connectionRefused(REFUSED_BANNED)
                return None
            refused = self.startups.acquire(host)
            if refused is not None:
                self.metrics.connectionRefused(
                    REFUSED_MAX_STARTUPS_PER_IP if "address" in refused else REFUSED_MAX_STARTUPS
                )
                return None
        transport = super().buildProtocol(addr)
        transport.startupHost = host
        # What every connection offers is one set of lists, not one each
        # (Conch builds its public key and key exchange lists per connection:
        # an equal list already held is used instead).
        offered = self._offered
        if offered is None or offered[0] is not self.settings:
            offered = self._offered = (
                self.settings,
                [c.encode("ascii") for c in self.settings.ciphers],
                [m.encode("ascii") for m in self.settings.macs],
                {},
            )
        _, transport.supportedCiphers, transport.supportedMACs, lists = offered
        for name in ("supportedPublicKeys", "supportedKeyExchanges"):
            if name in transport.__dict__:
                own = transport.__dict__[name]
                setattr(transport, name, lists.setdefault((name, tuple(own)), own))
        return transport

    def _logRefusal(self, host: str) -> None:
        # One line per address per interval: a scan cannot flood the log.
        now = self.clock.seconds()
        last = self._refusalsLogged.get(host)
        if last is not None and now - last < REFUSAL_LOG_INTERVAL:
            return
        if len(self._refusalsLogged) >= _REFUSAL_LOG_MAX:
            self._refusalsLogged = {
                h: t for h, t in self._refusalsLogged.items() if now - t < REFUSAL_LOG_INTERVAL
            }
        self._refusalsLogged[host] = now
        log.info(
            "refused a connection from {host}: not in sftp.allowed_ips"
            " (logged once a minute per address)",
            host=host,
        )
