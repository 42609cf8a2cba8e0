"""
What an ``exec`` request may run: legacy scp (in-process, L{lightd_conch.scp})
and rsync's server (sandboxed, L{lightd_conch.rsync}).  Anything else gets one
line on stderr and exit status 127, as a shell says "command not found".
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from . import rsync, scp
from .limits import OverLimit

NOT_SERVED = "lightd-sftp: only sftp, scp and rsync are served"


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


def execProtocol(command: bytes, avatar) -> Protocol:
    """
    The protocol that serves C{command} for C{avatar}'s volume.
    """
    try:
        parsed = scp.parseCommand(command)
    except scp.ScpUsageError as e:
        return Refusal(str(e), 1)
    if parsed is not None:
        try:
            # scp keeps at most one file open beside the volume.
            filesystem = avatar.openFilesystem(extraDescriptors=1)
        except OverLimit as e:
            return Refusal(f"lightd-sftp: {e.reason}", 1)
        except OSError:
            return Refusal("lightd-sftp: the volume is missing", 1)
        return scp.scpProtocol(filesystem, parsed)
    if rsync.isRsyncCommand(command):
        return rsync.rsyncProtocol(command, avatar.volumePath)
    return Refusal(NOT_SERVED, 127)
