"""
rsync's server side (``rsync -e ssh``): the real rsync binary, run with a
validated argv inside a bubblewrap sandbox whose root, by the time rsync reads
its first byte from the client, is the volume and nothing else.

bubblewrap starts rsync in a root that holds rsync, its libraries and the
volume at C{/volume}.  rsync writes its protocol version before it reads
anything; when those first bytes come out, L{lightd_conch._sandboxroot}
(its own small process) remounts the volume nosuid, nodev and noexec in the
sandbox, makes it the root of every process there with pivot_root(2), and
detaches the old root.  Only then does the client's first byte reach rsync.
So absolute symlinks (C{rsync -L} of C{bin -> /usr/bin/rsync}) and every path
option, absolute or climbing, resolve inside the volume as they do over SFTP;
no name a client can give reaches rsync's binary or libraries; and nothing
in the volume can be mapped executable, so a library planted there (an NSS
or gconv module) never runs in rsync.

The argv is checked word by word against the option forms rsync's client
sends for uploads and downloads; anything that could run a program (``-e``,
``--rsync-path``), start a daemon, write a log or batch file on the host,
or hide the paths from us (``--protect-args``) is refused.  Paths get chroot
semantics: ``/x``, ``x`` and ``~/x`` all mean ``x`` in the volume, ``..``
cannot climb above it, and a path that starts with ``-`` is passed as
``./-...``, since rsync would read it as an option.  Two options are always
added: ``--no-super`` (rsync never chowns to the client's ids or makes
devices, even as uid 0) and ``--chmod=a-st`` (no file or directory rsync
receives or sends keeps a setuid, setgid or sticky bit).  The sandbox then enforces what the
argv check promises: new mount, network, pid and IPC namespaces, the volume
as the only place there is, and rsync running as the volume's owner without
any capability.  Filter rules given on the command line may not merge files
(rsync reads those while it starts, before the volume is its root; the
client sends its own filter rules over the protocol, later).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from typing import List, Optional, Sequence, Tuple

from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.logger import Logger

from .fs import expandHome, normalize
from .volume import Volume

SANDBOX_VOLUME = b"/volume"
"""
Where the volume is mounted inside the sandbox while rsync starts; the
sandbox's root (and rsync's cwd) once rsync has started.
"""

_ROOT_HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandboxroot.py")
# How long rsync may take to start and its root to become the volume.
ROOT_TIMEOUT = 30
# How long rsync has to clean up (remove the file it was receiving) after
# SIGTERM, once a policy change ends it, before the sandbox is killed.
STOP_GRACE = 5

_log = Logger()


class RsyncRefused(ValueError):
    """
    An rsync command line this service does not run; the message says why.
    """


# Single-letter options rsync's client puts in its bundle (see rsync's
# server_options()).  "e" is special: in a server bundle it carries the
# client's protocol capabilities ("e.iLsfxCIvu"), never a remote shell.
_SHORT = set("vqcuLlkKHDgoptrxWnbSzCIiRdAXEUNOJmyFh")
_BUNDLE = re.compile(r"-([A-Za-z]+?)?(e\.[A-Za-z0-9.]*)?")

# Long options without a value.
_FLAGS = {
    "--sender",
    "--delete", "--delete-before", "--delete-during", "--delete-after",
    "--delete-delay", "--delete-excluded", "--delete-missing-args",
    "--ignore-missing-args", "--ignore-errors", "--force",
    "--partial", "--append", "--append-verify", "--inplace", "--sparse",
    "--preallocate", "--numeric-ids", "--mkpath", "--remove-source-files",
    "--size-only", "--ignore-times", "--existing", "--ignore-existing",
    "--ignore-non-existing", "--delay-updates", "--safe-links", "--munge-links",
    "--copy-unsafe-links", "--copy-dirlinks", "--keep-dirlinks", "--hard-links",
    "--omit-dir-times", "--omit-link-times", "--no-implied-dirs", "--fuzzy",
    "--prune-empty-dirs", "--from0", "--checksum", "--compress", "--old-compress",
    "--new-compress", "--fake-super", "--open-noatime", "--write-devices",
    "--trust-sender", "--no-whole-file", "--whole-file", "--list-only",
    "--msgs2stderr", "--no-msgs2stderr", "--stats", "--atimes", "--crtimes",
    "--no-inc-recursive", "--no-i-r", "--qsort", "--use-qsort",
}
# Long options with a plain value (never a path), and what the value may be.
_VALUED = {
    "--suffix": re.compile(r"[^/]{0,64}"),
    "--compress-level": re.compile(r"-?\d{1,3}"),
    "--compress-choice": re.compile(r"[a-z0-9]{1,16}"),
    "--zc": re.compile(r"[a-z0-9]{1,16}"),
    "--zl": re.compile(r"-?\d{1,3}"),
    "--checksum-choice": re.compile(r"[a-z0-9,]{1,40}"),
    "--cc": re.compile(r"[a-z0-9,]{1,40}"),
    "--checksum-seed": re.compile(r"\d{1,10}"),
    "--timeout": re.compile(r"\d{1,9}"),
    "--contimeout": re.compile(r"\d{1,9}"),
    "--modify-window": re.compile(r"-?\d{1,9}"),
    "--max-delete": re.compile(r"-?\d{1,12}"),
    "--max-size": re.compile(r"[0-9.]{1,20}[a-zA-Z]{0,3}([+-]1)?"),
    "--min-size": re.compile(r"[0-9.]{1,20}[a-zA-Z]{0,3}([+-]1)?"),
    "--max-alloc": re.compile(r"[0-9.]{1,20}[a-zA-Z]{0,3}"),
    "--block-size": re.compile(r"\d{1,12}[a-zA-Z]{0,3}"),
    "--bwlimit": re.compile(r"[0-9.]{1,20}[a-zA-Z]{0,3}"),
    "--log-format": re.compile(r"[%A-Za-z0-9 '\-:,.\[\]]{1,64}"),
    "--out-format": re.compile(r"[%A-Za-z0-9 '\-:,.\[\]]{1,64}"),
    "--info": re.compile(r"[A-Za-z0-9,]{1,200}"),
    "--debug": re.compile(r"[A-Za-z0-9,]{1,200}"),
    "--chmod": re.compile(r"[ugoaDFrwxXst0-7,=+\-]{1,100}"),
    "--files-from": re.compile(r"-"),
    # Not a merge rule ("merge", "dir-merge", "." or ":"): see the module docstring.
    "--filter": re.compile(r"(?!\s*(merge|dir-merge|[.:]))[^\0]{0,256}"),
    "--exclude": re.compile(r"[^\0]{0,256}"),
    "--include": re.compile(r"[^\0]{0,256}"),
    "--stop-after": re.compile(r"\d{1,9}"),
    "--stop-at": re.compile(r"[0-9T:\-]{1,20}"),
}
# Long options whose value is a path: mapped into the volume like the paths.
_PATHS = {
    "--partial-dir", "--temp-dir", "--backup-dir",
    "--link-dest", "--compare-dest", "--copy-dest",
}
# Refused with a reason a user can act on.
_REFUSED = {
    "-e": "a remote shell is not run here",
    "--rsh": "a remote shell is not run here",
    "--rsync-path": "the rsync program is chosen by the server",
    "--daemon": "daemon mode is not served",
    "--config": "daemon mode is not served",
    "--dparam": "daemon mode is not served",
    "--address": "daemon mode is not served",
    "--port": "daemon mode is not served",
    "--sockopts": "daemon mode is not served",
    "--log-file": "no log file may be written on the server",
    "--log-file-format": "no log file may be written on the server",
    "--write-batch": "batch files are not served",
    "--only-write-batch": "batch files are not served",
    "--read-batch": "batch files are not served",
    "--protect-args": "protected (secluded) arguments are not served; drop -s",
    "--secluded-args": "protected (secluded) arguments are not served; drop -s",
    "--iconv": "charset conversion is not served",
    "--copy-as": "changing user is not served",
    "--super": "super-user mode is not served",
    "--usermap": "user mapping is not served",
    "--groupmap": "group mapping is not served",
    "--chown": "changing owners is not served",
}


# Always added, whatever the client sent.  First, so that a client's
# --fake-super (which keeps owners in xattrs, never chowns) still wins over it:
# rsync as uid 0 never tries to give files the client's ids or make devices.
_ENFORCED_FIRST = ["--no-super"]
# Last before ".", so that rsync applies it after any --chmod of the client's:
# every file-list entry, received or sent, loses its setuid, setgid and sticky
# bits (rsync does not forward a client's own --chmod; -M--chmod comes first).
_ENFORCED_LAST = ["--chmod=a-st"]


def isRsyncCommand(command: bytes) -> bool:
    return command.lstrip(b" \t").split(b" ", 1)[0] == b"rsync"


def isUpload(argv: Sequence[str]) -> bool:
    """
    Whether the rsync server of C{argv} (from L{parseCommand}) receives
    files: without C{--sender}, the client sends.
    """
    return "--sender" not in argv


def _mapPath(value: str) -> str:
    """
    A client path as a path relative to the volume (rsync's cwd), with chroot
    semantics: the volume is the root and the home, and ".." stops at it.  A
    trailing slash (rsync's "the contents of") is kept.  Relative, so rsync's
    messages name the path as the client sees it.
    """
    raw = expandHome(os.fsencode(value))
    parts = normalize(raw)
    mapped = b"/".join(parts) or b"."
    if parts and (raw.endswith(b"/") or raw.endswith(b"/.")):
        mapped += b"/"
    return os.fsdecode(mapped)


def _pathArgument(value: str) -> str:
    """
    A client path as the word rsync gets: mapped into the volume, and, if it
    would start with "-", as "./-..." since rsync parses such words as
    options even after the "." that ends them.  A file named "-x" stays
    transferable, and "--log-file=x" is a name, not an option.
    """
    mapped = _mapPath(value)
    return "./" + mapped if mapped.startswith("-") else mapped


def _mapOptionPath(value: str) -> str:
    """
    The value of an option such as --link-dest: an absolute (or ~) path is
    a path from the volume's root; a relative one is rsync's to resolve
    against the destination, as C{--link-dest=../previous} must be, and
    climbs no further than the volume, the sandbox's root.
    """
    if value.startswith(("/", "~")):
        mapped = _mapPath(value)
        return "/" if mapped == "." else "/" + mapped
    return value


def parseCommand(command: bytes) -> List[str]:
    """
    The argv to run inside the sandbox for an ``rsync --server`` command.

    @raise RsyncRefused: the command is not one this service runs.
    """
    try:
        words = shlex.split(command.decode("utf-8", "surrogateescape"))
    except ValueError:
        raise RsyncRefused("the command line does not parse")
    if len(words) < 3 or words[0] != "rsync" or words[1] != "--server":
        raise RsyncRefused("only 'rsync --server' (rsync -e ssh) is served")
    argv = ["rsync", "--server"]
    index = 2
    while index < len(words):
        word = words[index]
        index += 1
        if word == ".":
            break
        if not word.startswith("-"):
            raise RsyncRefused(f"unexpected argument {word!r} before '.'")
        name, equals, value = word.partition("=")
        if name in _REFUSED:
            raise RsyncRefused(f"{name}: {_REFUSED[name]}")
        if not name.startswith("--"):
            match = _BUNDLE.fullmatch(word)
            letters = (match.group(1) or "") if match else None
            if match is None or not (letters or match.group(2)):
                if "s" in word[1:] and word[1:].isalpha():
                    raise RsyncRefused(f"-s: {_REFUSED['--protect-args']}")
                raise RsyncRefused(f"option {word!r} is not served")
            if "s" in letters:
                raise RsyncRefused(f"-s: {_REFUSED['--protect-args']}")
            unknown = set(letters) - _SHORT
            if unknown:
                raise RsyncRefused(f"option -{''.join(sorted(unknown))} is not served")
            argv.append(word)
            continue
        if name in _FLAGS and not equals:
            argv.append(word)
            continue
        if name in _VALUED or name in _PATHS:
            if not equals:
                if index >= len(words):
                    raise RsyncRefused(f"{name} needs a value")
                value = words[index]
                index += 1
            if name in _PATHS:
                argv.append(f"{name}={_mapOptionPath(value)}")
                continue
            if not _VALUED[name].fullmatch(value):
                raise RsyncRefused(f"{name}: value {value!r} is not served")
            argv.append(f"{name}={value}")
            continue
        raise RsyncRefused(f"option {name!r} is not served")
    else:
        raise RsyncRefused("no '.' before the paths")
    paths = words[index:]
    if not paths:
        raise RsyncRefused("no path given")
    argv.append(".")
    argv.extend(_pathArgument(p) for p in paths)
    return argv


def enforced(argv: Sequence[str]) -> List[str]:
    """
    C{argv} (from L{parseCommand}) with the options this service always adds:
    rsync never runs in super-user mode and never sets special mode bits.
    """
    separator = list(argv).index(".")
    return (
        list(argv[:2]) + _ENFORCED_FIRST + list(argv[2:separator])
        + _ENFORCED_LAST + list(argv[separator:])
    )


# -- the sandbox -------------------------------------------------------------


def _libraries(binary: str) -> List[str]:
    """
    The shared objects C{binary} loads (as ldd names them), loader included.
    """
    output = subprocess.run(
        ["ldd", binary], capture_output=True, text=True, timeout=10, env={"LC_ALL": "C"}
    ).stdout
    found = []
    for line in output.splitlines():
        for word in line.split():
            if word.startswith("/"):
                found.append(word)
    return found


def _merged(path: str) -> str:
    """C{path} with its directory resolved (merged /usr), keeping its name."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


class Sandbox:
    """
    How to run rsync in bubblewrap on this host: the paths of both programs
    and the read-only binds rsync needs, found once.
    """

    def __init__(
        self,
        bwrap: str,
        rsync: str,
        binds: Sequence[Tuple[str, str]],
        links: Sequence[Tuple[str, str]],
        setpriv: Optional[str] = None,
    ) -> None:
        self.bwrap = bwrap
        self.rsync = rsync
        self.setpriv = setpriv
        self.binds = list(binds)
        self.links = list(links)

    @classmethod
    def find(cls) -> Optional["Sandbox"]:
        search = "/usr/bin:/bin:/usr/local/bin"
        bwrap = shutil.which("bwrap", path=search)
        rsync = shutil.which("rsync", path=search)
        setpriv = shutil.which("setpriv", path=search)
        if bwrap is None or rsync is None:
            return None
        programs = [_merged(rsync)] + ([_merged(setpriv)] if setpriv else [])
        binds = {}
        for program in programs:
            binds[program] = os.path.realpath(program)
            try:
                libraries = _libraries(program)
            except (OSError, subprocess.SubprocessError):
                return None
            for library in libraries:
                binds[_merged(library)] = os.path.realpath(library)
        rsync = programs[0]
        setpriv = programs[1] if setpriv else None
        # Merged-/usr hosts reach /usr/lib through /lib and /lib64 links.
        links = [
            (os.readlink(top), top)
            for top in ("/lib", "/lib64", "/lib32", "/bin")
            if os.path.islink(top)
        ]
        return cls(
            bwrap, rsync, [(src, dest) for dest, src in sorted(binds.items())], links, setpriv
        )

    def argv(
        self,
        volumeFD: int,
        rsyncArgv: Sequence[str],
        ids: Optional[Tuple[int, int]] = None,
        infoFD: Optional[int] = None,
        readOnly: bool = False,
    ) -> List[str]:
        """
        The command line running C{rsyncArgv} on the volume open as
        C{volumeFD}; with C{infoFD}, bwrap writes there (as JSON) the pid
        and mount namespace that L{lightd_conch._sandboxroot} needs.

        With C{ids} (the service runs as root), bwrap sets the sandbox up as
        root without a user namespace (the volume's owner may not be able to
        reach the volume's host path) and setpriv, inside, becomes that uid
        and gid (0 included) with no other groups, no capabilities and an
        empty bounding set before running rsync: uid 0 without capabilities
        cannot set file capabilities or reach past permission bits.  Without
        C{ids} (the service is not root) rsync runs as the service's user in
        a new user namespace, with every capability dropped.  With
        C{readOnly}, the volume is bound read-only.
        """
        argv = [self.bwrap]
        if ids is None:
            argv += ["--unshare-all", "--cap-drop", "ALL"]
        else:
            if self.setpriv is None:
                raise OSError("setpriv is needed to run rsync as the volume's owner")
            argv += [
                "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
                "--unshare-cgroup-try",
            ]
        argv += [
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--setenv", "PATH", "/usr/bin",
            # popt reads $HOME/.popt: an alias file there must not reach rsync.
            "--setenv", "HOME", "/nonexistent",
        ]
        if infoFD is not None:
            argv += ["--info-fd", str(infoFD)]
        # Directories bwrap makes for mount points are 0700 unless told.
        parents = set()
        for _, dest in self.binds:
            parent = os.path.dirname(dest)
            while parent not in ("/", ""):
                parents.add(parent)
                parent = os.path.dirname(parent)
        for directory in sorted(parents):
            argv += ["--perms", "0755", "--dir", directory]
        for src, dest in self.binds:
            argv += ["--ro-bind", src, dest]
        for target, link in self.links:
            argv += ["--symlink", target, link]
        argv += [
            "--dev", "/dev",
            "--ro-bind-fd" if readOnly else "--bind-fd", str(volumeFD),
            os.fsdecode(SANDBOX_VOLUME),
            # rsync keeps the path of its start folder and builds paths on
            # it: "/", which pivot_root turns into the volume's root.
            "--chdir", "/",
            "--remount-ro", "/",
            "--",
        ]
        if ids is not None:
            argv += [
                self.setpriv,
                "--reuid", str(ids[0]),
                "--regid", str(ids[1]),
                "--clear-groups",
                "--no-new-privs",
                "--bounding-set", "-all",
                "--inh-caps", "-all",
                "--",
            ]
        return argv + [self.rsync] + list(rsyncArgv[1:])


_sandbox: Optional[Sandbox] = None
_sandboxFound = False


def findSandbox() -> Optional[Sandbox]:
    """
    This host's sandbox, or None if bubblewrap or rsync is missing.
    """
    global _sandbox, _sandboxFound
    if not _sandboxFound:
        _sandbox = Sandbox.find()
        _sandboxFound = True
    return _sandbox


def _mountsInside(volumePath: str, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """
    Whether anything is mounted below C{volumePath} (the volume itself may
    be a mount point), by the mount table's paths, which follow a mount
    point wherever it is renamed to.
    """
    volume = os.fsencode(os.path.realpath(volumePath)).rstrip(b"/") + b"/"
    try:
        with open(mountinfo, "rb") as table:
            for line in table:
                fields = line.split(b" ")
                if len(fields) > 4 and _unescape(fields[4]).startswith(volume):
                    return True
    except OSError:
        return True  # unknown: refuse rather than guess
    return False


def _unescape(field: bytes) -> bytes:
    # The kernel writes space, tab, newline and backslash as octal escapes.
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes((int(m.group(1), 8),)), field)


_INFO_FD = 4


def _descendants(pid: int, proc: str = "/proc") -> List[Tuple[int, str]]:
    """
    The (pid, command name) of every live descendant of C{pid}.
    """
    children: dict = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses.
        head, _, tail = stat.rpartition(b")")
        fields = tail.split()
        if len(fields) < 2:
            continue
        comm = head.partition(b"(")[2].decode("utf-8", "replace")
        children.setdefault(int(fields[1]), []).append((int(name), comm))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child[0])
    return found


class _Process(ProcessProtocol):
    def __init__(self, owner: "RsyncServer") -> None:
        self.owner = owner
        self._info = b""

    def outReceived(self, data: bytes) -> None:
        self.owner.transport.write(data)
        self.owner._rsyncStarted()

    def errReceived(self, data: bytes) -> None:
        self.owner.transport.writeStderr(data)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _INFO_FD:
            if len(self._info) < 4096:
                self._info += data
        else:
            super().childDataReceived(childFD, data)

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == _INFO_FD:
            self.owner._sandboxInfo(self._info)

    def processEnded(self, reason) -> None:
        self.owner._processEnded(getattr(reason.value, "exitCode", None), getattr(reason.value, "signal", None))


class _RootHelper(ProcessProtocol):
    """L{lightd_conch._sandboxroot}, run once per sandbox."""

    def __init__(self, owner: "RsyncServer") -> None:
        self.owner = owner
        self.errors = b""

    def errReceived(self, data: bytes) -> None:
        self.errors = (self.errors + data)[:500]

    def processEnded(self, reason) -> None:
        self.owner._rootDone(getattr(reason.value, "exitCode", None), self.errors)


class _StdinProducer:
    """
    Told by the process's stdin pipe when it is full: then the channel stops
    opening its receive window, so a client cannot fill our memory.
    """

    def __init__(self, owner: "RsyncServer") -> None:
        self.owner = owner

    def pauseProducing(self) -> None:
        self.owner._stdinFull = True

    def resumeProducing(self) -> None:
        self.owner._stdinFull = False
        self.owner.transport.resumeInput()

    def stopProducing(self) -> None:
        pass


class RsyncServer(Protocol):
    """
    One rsync server process in its sandbox, wired to a session channel:
    channel data to its stdin, its stdout to the channel, its stderr as
    extended data, and its exit code as the channel's exit status.
    """

    reactor = None

    def __init__(self, sandbox: Sandbox, volume: Volume, argv: List[str]) -> None:
        self.sandbox = sandbox
        self.volume = volume
        self.argv = argv
        self.process = None
        self._early: List[bytes] = []
        self._eof = False
        self._stdinFull = False
        self._outputPaused = False
        self._done = False
        # The client's bytes wait until the volume is rsync's root.
        self._rooted = False
        self._started = False
        self._sandbox: Optional[Tuple[int, int]] = None  # (pid, mount namespace)
        self._helper = None
        self._rootTimeout = None
        self._reactor = None
        self._upload = isUpload(argv)
        self._stopping = None

    @property
    def paused(self) -> bool:
        return self._stdinFull or self._outputPaused or not self._rooted

    def connectionMade(self) -> None:
        reactor = self.reactor
        if reactor is None:
            from twisted.internet import reactor
        volumeFD = self.volume.sandboxRoot()
        if _mountsInside(self.volume.hostPath):
            # bwrap binds the volume with everything mounted below it, and
            # rsync would reach into those mounts (SFTP and scp refuse them).
            os.close(volumeFD)
            self._refuse("lightd-sftp: rsync is not served for a volume with mounts inside\n", 1)
            return
        try:
            owner = os.fstat(volumeFD)
            # rsync runs as the volume's owner, as if the container wrote;
            # a root-owned volume too, as uid 0 without capabilities.
            ids = None
            if os.geteuid() == 0:
                ids = (owner.st_uid, owner.st_gid)
            argv = self.sandbox.argv(3, self.argv, ids, _INFO_FD, self.volume.policy.read_only)
            self.process = reactor.spawnProcess(
                _Process(self),
                argv[0],
                argv,
                env={},
                path="/",
                childFDs={0: "w", 1: "r", 2: "r", 3: volumeFD, _INFO_FD: "r"},
            )
        except Exception as e:
            _log.warn("cannot start rsync: {kind}: {error}", kind=type(e).__name__, error=e)
            self._refuse("lightd-sftp: rsync could not be started\n", 127)
            return
        finally:
            os.close(volumeFD)
        self._reactor = reactor
        self._rootTimeout = reactor.callLater(ROOT_TIMEOUT, self._rootTimedOut)
        self.process.registerProducer(_StdinProducer(self), True)
        self.volume.whenPolicyChanges(self._policyChanged)

    # -- a policy change while rsync runs ----------------------------------------

    def _policyChanged(self, policy) -> None:
        """
        Check again what was checked when rsync started (the volume's
        C{mayRunRsync}): a change that would have refused this rsync ends it.
        rsync gets SIGTERM, so it removes the file it was receiving (the
        files it had finished stay), and the sandbox is killed if it is still
        there after L{STOP_GRACE} seconds.
        """
        if self._done or self._stopping is not None:
            return
        try:
            self.volume.mayRunRsync(self._upload)
        except PermissionError as e:
            why = e.strerror
        else:
            return
        _log.info(
            "ending rsync of container {container}: {why}",
            container=self.volume.containerId,
            why=why,
        )
        self.transport.writeStderr(f"lightd-sftp: rsync ended: {why}\n".encode("utf-8"))
        self._early = []
        if not self._rooted or self._sandbox is None:
            self._refuse("", 1)
            self._kill()
            return
        self._stopping = self._reactor.callLater(STOP_GRACE, self._kill)
        for pid, name in _descendants(self._sandbox[0]):
            if name == "rsync":
                try:
                    os.kill(pid, signal.SIGTERM)
                except OSError:
                    pass

    # -- making the volume rsync's root -----------------------------------------

    def _sandboxInfo(self, data: bytes) -> None:
        try:
            info = json.loads(data)
            self._sandbox = (int(info["child-pid"]), int(info["mnt-namespace"]))
        except (ValueError, KeyError, TypeError):
            self._rootFailed("bwrap gave no sandbox information")
            return
        self._makeRoot()

    def _rsyncStarted(self) -> None:
        if not self._started:
            self._started = True
            self._makeRoot()

    def _makeRoot(self) -> None:
        if not (self._started and self._sandbox) or self._helper is not None or self._done:
            return
        pid, namespace = self._sandbox
        argv = [sys.executable, "-I", "-S", _ROOT_HELPER, str(pid), str(namespace),
                os.fsdecode(SANDBOX_VOLUME)]
        try:
            self._helper = self._reactor.spawnProcess(
                _RootHelper(self), argv[0], argv, env={}, path="/",
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            self._rootFailed(str(e))

    def _rootDone(self, code: Optional[int], errors: bytes) -> None:
        if code != 0:
            self._rootFailed(errors.decode("utf-8", "replace").strip() or f"exit {code}")
            return
        if self._done:
            return
        self._cancelRootTimeout()
        self._rooted = True
        for data in self._early:
            self.process.write(data)
        self._early = []
        if self._eof:
            self.process.closeStdin()
        self.transport.resumeInput()

    def _rootTimedOut(self) -> None:
        self._rootTimeout = None
        self._rootFailed(f"rsync did not start within {ROOT_TIMEOUT} s")

    def _rootFailed(self, why: str) -> None:
        self._cancelRootTimeout()
        if self._done or self._rooted:
            return
        _log.warn("cannot make the volume rsync's root: {why}", why=why[:300])
        self._early = []
        self._refuse("lightd-sftp: rsync could not be started\n", 127)
        self._kill()

    def _cancelRootTimeout(self) -> None:
        timeout, self._rootTimeout = self._rootTimeout, None
        if timeout is not None and timeout.active():
            timeout.cancel()

    def _refuse(self, message: str, code: int) -> None:
        self._done = True
        if message:
            self.transport.writeStderr(message.encode("utf-8"))
        self.transport.exit(code)

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        if not self._rooted:
            self._early.append(data)  # at most one receive window: paused
        else:
            self.process.write(data)

    def eofReceived(self) -> None:
        self._eof = True
        if self._rooted and not self._done:
            self.process.closeStdin()

    def pauseProducing(self) -> None:
        self._outputPaused = True
        if self.process is not None:
            self.process.pauseProducing()

    def resumeProducing(self) -> None:
        self._outputPaused = False
        if self.process is not None:
            self.process.resumeProducing()

    def stopProducing(self) -> None:
        self._kill()

    def _processEnded(self, code: Optional[int], signalNumber: Optional[int]) -> None:
        self._cancelRootTimeout()
        self._cancelStop()
        if self._done:
            return
        self._done = True
        if code is None:
            code = 128 + (signalNumber or signal.SIGKILL)
        self.transport.exit(code)

    def _cancelStop(self) -> None:
        stopping, self._stopping = self._stopping, None
        if stopping is not None and stopping.active():
            stopping.cancel()

    def _kill(self) -> None:
        if self.process is not None and self.process.pid is not None:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass

    def connectionLost(self, reason: object = None) -> None:
        self._done = True
        self._early = []
        self._cancelRootTimeout()
        self._cancelStop()
        self._kill()
        self.volume.close()
