"""
The audit of what a login does to its volume: a L{Volume} that records every
change (and every file it opened, at close, with the bytes moved) through its
login's C{audit}, for every protocol alike, since every protocol goes through
the volume.

Events (see README.rst, "Audit log"): C{upload} and C{download} at close,
with C{path} and C{bytes}; C{mkdir}, C{rmdir}, C{remove}, C{rename} (C{path},
C{to}), C{setstat}, C{symlink} (C{path}, C{target}), C{link} (C{path}, C{to}),
C{copy} (C{path}, C{to}); each with C{result}: C{ok}, or why it was refused.
Paths are virtual paths, as the client named them after normalisation.
"""

from __future__ import annotations

import os
from typing import Optional

from .fs import normalize, virtualPath
from .volume import OpenFile, Volume


def _path(path: bytes) -> str:
    # The normalised virtual path, as text a JSON line can hold.
    return virtualPath(normalize(path)).decode("utf-8", "backslashreplace")


def _outcome(error: OSError) -> str:
    return error.strerror or (os.strerror(error.errno) if error.errno else "failed")


class AuditedFile(OpenFile):
    """
    An open file that says what was read and written through it
    (L{OpenFile.moved}) once, when it is closed.
    """

    __slots__ = ()

    def setattrs(self, size=None, mode=None, times=None) -> None:
        volume = self._volume
        volume._audited(
            "setstat", _changes(self.path, size, mode, times), super().setattrs, size, mode, times
        )

    def close(self) -> None:
        wasOpen = self._fd >= 0
        super().close()
        if wasOpen:
            self._volume._owner.audit(
                "upload" if self._identity is not None else "download",
                path=_path(self.path),
                bytes=self.moved,
                result="ok",
            )


class AuditedVolume(Volume):
    """
    A volume whose changes are recorded with their outcome.
    """

    fileClass = AuditedFile

    def _audited(self, event: str, fields: dict, call, *args, **kwargs):
        try:
            result = call(*args, **kwargs)
        except OSError as e:
            self._owner.audit(event, **fields, result=_outcome(e))
            raise
        self._owner.audit(event, **fields, result="ok")
        return result

    def mkdir(self, path: bytes, mode: Optional[int] = None) -> None:
        self._audited("mkdir", {"path": _path(path)}, super().mkdir, path, mode)

    def rmdir(self, path: bytes) -> None:
        self._audited("rmdir", {"path": _path(path)}, super().rmdir, path)

    def remove(self, path: bytes) -> None:
        self._audited("remove", {"path": _path(path)}, super().remove, path)

    def rename(self, old: bytes, new: bytes, replace: bool = False) -> None:
        self._audited(
            "rename", {"path": _path(old), "to": _path(new)}, super().rename, old, new, replace
        )

    def hardlink(self, old: bytes, new: bytes) -> None:
        self._audited("link", {"path": _path(new), "to": _path(old)}, super().hardlink, old, new)

    def symlink(self, target: bytes, linkpath: bytes) -> None:
        self._audited(
            "symlink",
            {"path": _path(linkpath), "target": target.decode("utf-8", "backslashreplace")},
            super().symlink,
            target,
            linkpath,
        )

    def setattrs(self, path: bytes, size=None, mode=None, times=None) -> None:
        self._audited(
            "setstat", _changes(path, size, mode, times), super().setattrs, path, size, mode, times
        )

    def lsetattrs(self, path: bytes, mode=None, times=None) -> None:
        self._audited(
            "setstat", _changes(path, None, mode, times), super().lsetattrs, path, mode, times
        )

    def openFile(self, path: bytes, flags: int, mode: Optional[int] = None) -> OpenFile:
        try:
            return super().openFile(path, flags, mode)
        except OSError as e:
            # A refused open says why; an opened file says so at close.
            self._owner.audit(
                "upload" if flags & (os.O_WRONLY | os.O_RDWR) else "download",
                path=_path(path),
                bytes=0,
                result=_outcome(e),
            )
            raise

    def copy(self, source, readOffset, length, target, writeOffset):
        return self._audited(
            "copy",
            {"path": _path(source.path), "to": _path(target.path)},
            super().copy,
            source,
            readOffset,
            length,
            target,
            writeOffset,
        )


def _changes(path: bytes, size, mode, times) -> dict:
    fields = {"path": _path(path)}
    if size is not None:
        fields["size"] = size
    if mode is not None:
        fields["mode"] = "%04o" % (mode & 0o7777)
    if times is not None:
        fields["mtime"] = times[1]
    return fields
