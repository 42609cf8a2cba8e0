"""
What a session channel runs, built in one place: the C{sftp} subsystem, and as
C{exec} legacy scp (in-process, L{lightd_conch.scp}) and rsync's server
(sandboxed, L{lightd_conch.rsync}).  Every protocol gets the login's
L{lightd_conch.volume.Volume}, the one gate for what it may do; every refusal
of what is not served is made here.

The channel (L{lightd_conch.ssh.SessionChannel}) only moves bytes and flow
control; L{ISessionChannel} is what a protocol may ask of it.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import Interface

from . import rsync, scp
from .limits import OverLimit
from .sftp import SFTPServer

NOT_SERVED = "lightd-sftp: only sftp, scp and rsync are served"
VOLUME_MISSING = "lightd-sftp: the volume is missing"

log = Logger()


class ISessionChannel(Interface):
    """
    What a protocol run by a session channel sees as its transport.
    """

    def write(data):
        """
        Queue C{data} (bytes or a memoryview) as channel data, in order.
        """

    def writeSequence(seq):
        """
        Queue each of C{seq}, in order, without joining them.
        """

    def writeStderr(data):
        """
        Queue C{data} as extended data of type stderr, in order with output.
        """

    def exit(code):
        """
        Once what is queued is sent, send exit status C{code}, EOF and close.
        """

    def loseConnection():
        """
        Close once what is queued is sent, without an exit status.
        """

    def resumeInput():
        """
        The protocol can take input again: reopen the receive window.
        """


class Refusal(Protocol):
    """
    Says why on stderr, then ends the channel with C{code}.
    """

    paused = False

    def __init__(self, message: str, code: int) -> None:
        self.message = message
        self.code = code

    def connectionMade(self) -> None:
        self.transport.writeStderr(self.message.encode("utf-8") + b"\n")
        self.transport.exit(self.code)

    def dataReceived(self, data: bytes) -> None:
        pass

    def eofReceived(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


def subsystemProtocol(name: bytes, avatar, clientVersion: bytes = b"") -> Optional[Protocol]:
    """
    The protocol serving subsystem C{name} for C{avatar}, or None to refuse
    the request (anything but C{sftp}, or a missing volume).
    """
    if name != b"sftp":
        return None
    try:
        volume = avatar.openVolume()
    except OverLimit as e:
        if e.first:
            log.warn(
                "sftp refused for container {container}: {reason}",
                container=avatar.containerId,
                reason=e.reason,
            )
        return None
    except OSError:
        log.warn("volume of container {container} is missing", container=avatar.containerId)
        return None
    return SFTPServer(
        volume,
        avatar.settings.max_handles,
        clientVersion=clientVersion,
        budget=avatar.budgets,
        owner=avatar.containerId,
    )


def execProtocol(command: bytes, avatar) -> Protocol:
    """
    The protocol that serves C{command} for C{avatar}'s volume, or a
    L{Refusal} that says why.
    """
    try:
        parsed = scp.parseCommand(command)
    except scp.ScpUsageError as e:
        return Refusal(str(e), 1)
    if parsed is None and not rsync.isRsyncCommand(command):
        return Refusal(NOT_SERVED, 127)
    if parsed is None:
        return _rsyncProtocol(command, avatar)
    try:
        # scp keeps at most one file open beside the volume.
        volume = avatar.openVolume(extraDescriptors=1)
    except OverLimit as e:
        return Refusal(f"lightd-sftp: {e.reason}", 1)
    except OSError:
        return Refusal(VOLUME_MISSING, 1)
    return scp.scpProtocol(volume, parsed)


def _rsyncProtocol(command: bytes, avatar) -> Protocol:
    sandbox = rsync.findSandbox()
    if sandbox is None:
        return Refusal(
            "lightd-sftp: rsync is not available on this server (bubblewrap or rsync missing)",
            127,
        )
    try:
        argv = rsync.parseCommand(command)
    except rsync.RsyncRefused as e:
        return Refusal(f"lightd-sftp: rsync refused: {e}", 1)
    try:
        # rsync's stdin, stdout and stderr pipes are held beside the volume.
        volume = avatar.openVolume(extraDescriptors=3)
    except OverLimit as e:
        return Refusal(f"lightd-sftp: {e.reason}", 1)
    except OSError:
        return Refusal(VOLUME_MISSING, 1)
    try:
        volume.mayRunRsync(upload=rsync.isUpload(argv))
    except PermissionError as e:
        volume.close()
        return Refusal(f"lightd-sftp: rsync refused: {e.strerror}", 1)
    return rsync.RsyncServer(sandbox, volume, rsync.enforced(argv))
