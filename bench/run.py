#!/usr/bin/env python3
"""
lightd-sftp against OpenSSH's sshd (internal-sftp + ChrootDirectory), side by side.

    python3 bench/run.py                  # the full run (about 14 minutes on 2 cores)
    python3 bench/run.py --quick          # smaller sizes, 3 runs: a smoke check
    python3 bench/run.py --only upload,download --variant same --runs 7
    python3 bench/run.py --rev main       # measure a commit (git archive), not the working tree
    python3 bench/run.py --profile DIR    # also record py-spy profiles of lightd's runs
    python3 bench/run.py --also PATH|REV  # a second lightd-sftp in the same rounds (A B C)

Both servers listen on 127.0.0.1 only and are driven by the same OpenSSH client
(``sftp -b``; the request-reply workloads by libssh and by paramiko, which wait for each
reply: rr-write uploads in 32 KiB writes, rr-stat sends 2,000 STATs, rr-open 2,000 OPENs
each followed by its CLOSE), interleaved, one run of each per round, the order turned around
every other round (A B, B A, A B ...), 7 runs of each
(15 of the sub-second workloads: small files, the listing, the STATs, the OPENs), for every
workload and for two algorithm choices: the same on both sides (aes128-ctr +
hmac-sha2-256) and each side's default.  It prints the medians, their ratio
lightd/OpenSSH (and the median of the rounds' ratios, which a drift of the
machine over the rounds does not move), both servers' CPU seconds and lightd's
peak RSS, then a table.  Before each round of small-file runs it waits, up to 7
minutes in all and saying so, until creating files in the volumes is quick again:
for minutes after mass deletions (the test suite, a previous run) ext4 makes every
creation scan past the recently deleted inodes.

It must run as root: sshd's ChrootDirectory and root login need it.  What it
makes (a work folder beside this file, sshd's /run/sshd if missing) is removed at
the end; it installs Debian's openssh-server with apt-get if /usr/sbin/sshd is
missing, as the comparator.  It is not part of ``trial tests``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HOST = "127.0.0.1"
SSHD = "/usr/sbin/sshd"
MiB = 1024 * 1024
START_TIMEOUT = 30
CLIENT_TIMEOUT = 600
LISTENING = re.compile(r"SFTP listening on (\S+) port (\d+)")
CLK_TCK = os.sysconf("SC_CLK_TCK")

VARIANTS = {
    # The fixed choice: the cipher and MAC both servers are compared with.
    "same": ["-c", "aes128-ctr", "-o", "MACs=hmac-sha2-256"],
    # What an OpenSSH client gets from each server when it asks for nothing.
    "default": [],
    # The cheapest cipher on both sides (only with --variant gcm).
    "gcm": ["-c", "aes128-gcm@openssh.com"],
}


@dataclass(frozen=True)
class Sizes:
    big: int  # bytes of the single-file upload and download
    small_files: int  # files of 4 KiB in the put -r tree
    listing: int  # entries in the directory listed with ls -l
    clients: int  # concurrent clients ...
    client_bytes: int  # ... each uploading this many bytes
    logins: int  # sequential connect + login + exit per run
    rr_bytes: int  # bytes of the upload in 32 KiB writes, one request at a time
    stats: int  # sequential STAT requests, one at a time; as many OPEN+CLOSE pairs


FULL = Sizes(1024 * MiB, 2000, 10000, 20, 50 * MiB, 10, 16 * MiB, 2000)
QUICK = Sizes(128 * MiB, 200, 1000, 20, 5 * MiB, 3, 8 * MiB, 2000)

WORKLOADS = ["upload", "download", "small", "listing", "concurrent", "connect", "rr-write",
             "rr-stat", "rr-open"]
EXTRA_WORKLOADS = ["concurrent-download"]
"""Run only when named with --only."""
IN_SESSION = {"upload", "download", "small", "listing"}
"""Workloads timed inside the session (see MARK): their time leaves out connect and login."""
RUNS = 7
"""Measured runs per server of each workload, unless --runs says otherwise."""
SHORT_RUNS = 15
SHORT = {"small", "listing", "rr-stat", "rr-open"}
"""Workloads that take under a second a run: the machine's jitter is a larger share of each run,
so they get more runs (seconds in all) for a median as steady as the long workloads'."""
MARK = "!date +%s.%N"
"""A local command sftp runs from the batch; its output is the wall clock at that point."""


def describe_runs(runs: Dict[str, int]) -> str:
    """Runs per workload as text: 7 for most and 15 for two is "7 (15 for small and listing)"."""
    counts = sorted(set(runs.values()), key=list(runs.values()).count, reverse=True)
    most, others = counts[0], counts[1:]
    return f"{most}" + "".join(
        f" ({n} for {' and '.join(w for w in runs if runs[w] == n)})" for n in others)


def describe(workload: str, sizes: Sizes) -> str:
    return {
        "upload": f"upload {human(sizes.big)}",
        "download": f"download {human(sizes.big)}",
        "small": f"put -r {sizes.small_files:,} files of 4 KiB",
        "listing": f"ls -l of {sizes.listing:,} entries",
        "concurrent": f"{sizes.clients} clients each uploading {human(sizes.client_bytes)}",
        "concurrent-download":
            f"{sizes.clients} clients each downloading {human(sizes.client_bytes)}",
        "connect": f"{sizes.logins} x connect + login + exit",
        "rr-write": f"upload {human(sizes.rr_bytes)} in 32 KiB writes, each waiting for its reply "
                    "(libssh)",
        "rr-stat": f"{sizes.stats:,} STATs, each waiting for its reply (paramiko)",
        "rr-open": f"{sizes.stats:,} OPENs + CLOSEs, each waiting for its reply (paramiko)",
    }[workload]


def human(size: int) -> str:
    if size >= 1024 * MiB and size % (1024 * MiB) == 0:
        return f"{size // (1024 * MiB)} GiB"
    return f"{size // MiB} MiB"


class BenchError(Exception):
    """Something the bench cannot go on without; the message says what."""


# --- /proc ------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> List[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of ``pid``; with ``children``, plus those of its reaped children."""
    fields = _stat_fields(pid)  # fields[0] is the state, field 3 of proc(5)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def child_pids(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return found


def machine_busy_seconds() -> float:
    """CPU time all processors spent on anything but idling, since boot (steal included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def bench_seconds() -> float:
    """CPU time of this process and its reaped children: the clients (and their ssh)."""
    return sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )


def reset_peak_rss(pid: int) -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the servers ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run_checked(argv, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise BenchError(
            f"{shlex.join(map(str, argv))} exited {result.returncode}\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def stop_process(process: Optional[subprocess.Popen], timeout: float = 15) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout)


class Server:
    """One server under test and the client options that reach it."""

    name = ""
    volume: Path
    port: int
    process: Optional[subprocess.Popen] = None
    launcher: List[str] = []
    """A command the server runs under (its argv goes last), as bench/scale.py's subreaper."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def client_options(self) -> List[str]:
        raise NotImplementedError

    def client_env(self) -> Dict[str, str]:
        return dict(os.environ)

    def destination(self) -> str:
        raise NotImplementedError

    def cpu(self) -> float:
        raise NotImplementedError

    def settle(self) -> None:
        """Wait until the last run's sessions are gone, so its CPU is all counted."""

    def stop(self) -> None:
        stop_process(self.process)


def _common_client_options(work: Path, port: int) -> List[str]:
    return [
        "-F", "/dev/null",
        "-P", str(port),
        "-o", "StrictHostKeyChecking=no",
        "-o", f"UserKnownHostsFile={work / 'known_hosts'}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "IdentityAgent=none",
        "-o", "ControlPath=none",
        "-o", "LogLevel=ERROR",
        "-o", "ConnectTimeout=30",
    ]


class Lightd(Server):
    """``twistd -n lightd-sftp`` from ``source``, password login (SSH_ASKPASS)."""

    def __init__(self, root: Path, source: Path, name: str = "lightd",
                 extra_env: Optional[Dict[str, str]] = None,
                 extra_sftp: Optional[Dict[str, object]] = None) -> None:
        self.name = name
        self.root = root
        self.source = source
        self.extra_env = extra_env or {}
        self.extra_sftp = extra_sftp or {}
        root.mkdir(mode=0o755)
        self.config = root / "config.json"
        self.log = root / "service.log"
        self.output = root / "twistd.out"

    def env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(self.source), env.get("PYTHONPATH", "")] if p
        )
        env.update(self.extra_env)
        return env

    def _sftp_settings(self) -> Dict[str, object]:
        """
        The defaults, except where the comparison needs otherwise; keys an older
        revision does not know are left out, so --rev can measure it too.
        """
        defaults = json.loads(
            run_checked(
                [sys.executable, "-c",
                 "import dataclasses, json; from lightd_conch.config import SFTPConfig; "
                 "print(json.dumps({f.name: f.default for f in dataclasses.fields(SFTPConfig) "
                 "if f.name in ('macs', 'max_startups_per_ip')}))"],
                cwd=self.root, env=self.env(),
            ).stdout
        )
        settings: Dict[str, object] = {"enabled": True, "host": HOST, "port": 0}
        if "max_startups_per_ip" in defaults:
            # Every client comes from 127.0.0.1: allow as many logins at once
            # from one address as sshd's MaxStartups does.
            settings["max_startups_per_ip"] = 128
        if "macs" in defaults and "hmac-sha2-256" not in defaults["macs"]:
            # The fixed comparison is aes128-ctr + hmac-sha2-256.  Offered
            # last, it changes no default choice: clients prefer AEAD and -etm.
            settings["macs"] = [*defaults["macs"], "hmac-sha2-256"]
        settings.update(self.extra_sftp)
        return settings

    def start(self) -> None:
        self.config.write_text(json.dumps(
            {
                "server": {"host": HOST, "port": 0},
                "authorization": {"enabled": True, "token": ""},
                "storage": {"base_path": "storage", "volumes_path": "storage/volumes"},
                "sftp": self._sftp_settings(),
            },
            indent=2,
        ))
        created = json.loads(
            run_checked(
                [sys.executable, "-m", "lightd_conch.cli", "--config", str(self.config),
                 "credentials", "generate", "bench", "--create-volume", "--json"],
                cwd=self.root, env=self.env(),
            ).stdout
        )
        self.username = created["username"]
        self.volume = self.root / "storage" / "volumes" / "bench"
        # An askpass script answers OpenSSH's password prompt (no terminal: setsid).
        secret = self.root / "password"
        secret.write_text(created["password"] + "\n")
        secret.chmod(0o600)
        self.askpass = self.root / "askpass.sh"
        self.askpass.write_text(f"#!/bin/sh\nexec cat {shlex.quote(str(secret))}\n")
        self.askpass.chmod(0o700)
        with open(self.output, "wb") as output:
            self.process = subprocess.Popen(
                [*self.launcher, sys.executable, "-c",
                 "from twisted.scripts.twistd import run; run()",
                 "-n", "--pidfile=", f"--logfile={self.log}",
                 "lightd-sftp", "--config", str(self.config)],
                cwd=self.root, env=self.env(), stdin=subprocess.DEVNULL,
                stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log.read_text() if self.log.exists() else "")
            if match:
                self.port = int(match.group(2))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise BenchError(
            "lightd-sftp did not log 'SFTP listening on HOST port N':\n"
            + (self.output.read_text() if self.output.exists() else "")
            + (self.log.read_text() if self.log.exists() else "")
        )

    def client_options(self) -> List[str]:
        return _common_client_options(self.root, self.port) + [
            "-o", "PubkeyAuthentication=no",
            "-o", "PreferredAuthentications=password",
            "-o", "NumberOfPasswordPrompts=1",
            # sftp -b turns BatchMode on, which disables askpass; the first value wins.
            "-o", "BatchMode=no",
        ]

    def client_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(SSH_ASKPASS=str(self.askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        return env

    def destination(self) -> str:
        return f"{self.username}@{HOST}"

    def paramiko_login(self, transport) -> None:
        transport.auth_password(self.username, self.password())

    def password(self) -> str:
        return (self.root / "password").read_text().strip()

    def libssh_login(self, client) -> None:
        client.login(password=self.password())

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def problems(self) -> List[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return [m for m in ("Traceback", "Unhandled Error") if m in text]


class OpenSSH(Server):
    """
    Debian's sshd on its own port, config, host key and client key: internal-sftp
    chrooted into a root-owned temporary volume, root login with the key only.
    """

    name = "OpenSSH"

    def __init__(self, root: Path, first_lines: Optional[List[str]] = None) -> None:
        # sshd takes the first value of each keyword: these lines override.
        self.first_lines = first_lines or []
        self.root = root
        root.mkdir(mode=0o755)
        # ChrootDirectory: root-owned and writable by no one else, as is every
        # folder above it (checked by check_chroot_path); uploads go to data/.
        self.volume = root / "volume"
        self.volume.mkdir(mode=0o755)
        self.config = root / "sshd_config"
        self.host_key = root / "ssh_host_ed25519_key"
        self.client_key = root / "client_ed25519_key"
        self.authorized_keys = root / "authorized_keys"
        self.pid_file = root / "sshd.pid"
        self.log = root / "sshd.log"

    def start(self) -> None:
        for key in (self.host_key, self.client_key):
            run_checked(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lightd-bench",
                         "-f", str(key)])
        shutil.copyfile(f"{self.client_key}.pub", self.authorized_keys)
        for attempt in range(5):
            self.port = free_port()
            self.config.write_text(
                "\n".join(
                    [
                        *self.first_lines,
                        f"Port {self.port}",
                        f"ListenAddress {HOST}",
                        f"HostKey {self.host_key}",
                        f"PidFile {self.pid_file}",
                        f"AuthorizedKeysFile {self.authorized_keys}",
                        "PermitRootLogin prohibit-password",
                        "AllowUsers root",
                        "PubkeyAuthentication yes",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "UsePAM no",
                        "StrictModes no",
                        "UseDNS no",
                        # The default 10:30:100 drops connections beyond 10
                        # unauthenticated ones: 20 concurrent clients need more.
                        "MaxStartups 200",
                        "X11Forwarding no",
                        "AllowTcpForwarding no",
                        "AllowAgentForwarding no",
                        "PermitTTY no",
                        "LogLevel ERROR",
                        f"ChrootDirectory {self.volume}",
                        "ForceCommand internal-sftp",
                        "Subsystem sftp internal-sftp",
                        "",
                    ]
                )
            )
            run_checked([SSHD, "-t", "-f", str(self.config)])
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    [*self.launcher, SSHD, "-D", "-e", "-f", str(self.config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            if self._wait_listening():
                return
            stop_process(self.process)
        raise BenchError(f"sshd did not start:\n{self.log.read_text()}")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=1) as s:
                    s.settimeout(5)
                    if s.recv(4).startswith(b"SSH-"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    def client_options(self) -> List[str]:
        return _common_client_options(self.root, self.port) + [
            "-i", str(self.client_key),
            "-o", "IdentitiesOnly=yes",
            "-o", "PreferredAuthentications=publickey",
            "-o", "PasswordAuthentication=no",
        ]

    def destination(self) -> str:
        return f"root@{HOST}"

    def paramiko_login(self, transport) -> None:
        import paramiko

        transport.auth_publickey("root", paramiko.Ed25519Key.from_private_key_file(str(self.client_key)))

    def libssh_login(self, client) -> None:
        client.login(key_file=self.client_key)

    def cpu(self) -> float:
        # sshd forks per connection (and again per session); the listener reaps
        # them, so its children's times hold the sessions' CPU.
        return cpu_seconds(self.pid, children=True)

    def settle(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while child_pids(self.pid) and time.monotonic() < deadline:
            time.sleep(0.02)


# --- the client -------------------------------------------------------------------------------


def sftp_argv(server: Server, variant: str, batch: Path, verbose: bool = False) -> List[str]:
    return ["sftp", *server.client_options(), *VARIANTS[variant], *(["-v"] if verbose else []),
            "-b", str(batch), server.destination()]


def start_sftp(server: Server, variant: str, batch: Path, verbose: bool = False):
    # A new session: no controlling terminal, so OpenSSH asks SSH_ASKPASS.
    return subprocess.Popen(
        sftp_argv(server, variant, batch, verbose),
        env=server.client_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, start_new_session=True,
    )


def finish_sftp(process: subprocess.Popen, what: str) -> Tuple[str, str]:
    """(stdout, stderr) of an sftp that succeeded; any failure stops the bench."""
    try:
        stdout, stderr = process.communicate(timeout=CLIENT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise BenchError(f"{what}: sftp did not finish within {CLIENT_TIMEOUT}s")
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    if process.returncode != 0:
        raise BenchError(f"{what}: sftp exited {process.returncode}\n{err}")
    return out, err


def negotiated(server: Server, variant: str, batch: Path) -> str:
    """The key exchange, cipher and MAC a client with ``variant``'s options gets."""
    _, text = finish_sftp(start_sftp(server, variant, batch, verbose=True), "probe")
    kex = re.search(r"kex: algorithm: (\S+)", text)
    cipher = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", text)
    if not (kex and cipher):
        return "?"
    mac = "" if cipher.group(2) == "<implicit>" else f" + {cipher.group(2)}"
    return f"{cipher.group(1)}{mac} ({kex.group(1)})"


# A quiet file system creates a file in tens of microseconds; ext4 takes hundreds for minutes
# after mass deletions, since it skips inodes deleted less than a minute ago (six while their
# inode table block is unwritten) and scans past each of them.  That would swamp the
# small-file comparison, for both servers alike.
SETTLED_CREATE_US = 50
SETTLE_WAIT = 20
SETTLE_LIMIT = 420
ROUND_PROBE_FILES = 500
"""Files of the probe before each later round: as the volumes fill, new files move on to other
block groups, which can be the ones where the deletions were, and runs turn slow mid-way."""


class Settler:
    """
    Waits until creating files in the servers' volumes is quick, before each round of small-file
    runs: in all up to SETTLE_LIMIT seconds per workload and algorithm choice, saying so while it
    waits, and warning once if it gives up.  The probe files stay where they are (removed with the
    work folder), so probing deletes nothing.
    """

    def __init__(self, folders: List[Path], sleep=time.sleep) -> None:
        self.folders = folders
        self.sleep = sleep
        self.waited = 0
        self.warned = False

    def probe(self, files: int) -> float:
        """Microseconds a file to create ``files`` files in a new folder in each volume (the most)."""
        per_file = 0.0
        os.sync()  # as before every run: the same state of the inode tables
        for folder in self.folders:
            target = Path(tempfile.mkdtemp(prefix=".settle-", dir=folder))
            before = time.perf_counter()
            for i in range(files):
                os.close(os.open(target / f"p{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            per_file = max(per_file, (time.perf_counter() - before) / files * 1e6)
        return per_file

    def settle(self, files: int) -> float:
        """Probe with ``files`` files until it is quick or the time is spent; the last figure."""
        while True:
            per_file = self.probe(files)
            if per_file < SETTLED_CREATE_US:
                return per_file
            if self.waited + SETTLE_WAIT > SETTLE_LIMIT:
                if not self.warned:
                    self.warned = True
                    print(f"warning: creating a file still takes {per_file:.0f} us: small-file "
                          "times will be mostly the file system's", flush=True)
                return per_file
            print(f"creating a file takes {per_file:.0f} us here (recent mass deletions?); "
                  f"waiting {SETTLE_WAIT} s for the file system to settle", flush=True)
            self.sleep(SETTLE_WAIT)
            self.waited += SETTLE_WAIT


# --- workloads --------------------------------------------------------------------------------


class Workloads:
    """The data on disk and, per workload, the batch files, the run and the cleanup."""

    def __init__(self, work: Path, sizes: Sizes, servers: List[Server]) -> None:
        self.work = work
        self.sizes = sizes
        self.servers = servers
        self.data = work / "data"
        self.data.mkdir()
        self.batches = work / "batches"
        self.batches.mkdir()
        self._kept = 0

    def prepare(self, selected: List[str]) -> None:
        s = self.sizes
        for server in self.servers:
            (server.volume / "data").mkdir(mode=0o755, exist_ok=True)
        if {"upload", "download"} & set(selected):
            write_random(self.data / "big.bin", s.big)
            for server in self.servers:
                link_or_copy(self.data / "big.bin", server.volume / "data" / "big.bin")
        if {"concurrent", "concurrent-download"} & set(selected):
            write_random(self.data / "client.bin", s.client_bytes)
            for server in self.servers:
                link_or_copy(self.data / "client.bin", server.volume / "data" / "client.bin")
        if "small" in selected:
            tree = self.data / "small"
            tree.mkdir()
            block = os.urandom(4096)
            for i in range(s.small_files):
                (tree / f"f{i:05d}").write_bytes(block)
        if "rr-write" in selected:
            write_random(self.data / "rr.bin", s.rr_bytes)
        if {"rr-stat", "rr-open"} & set(selected):
            for server in self.servers:
                (server.volume / "data" / "stat.txt").write_bytes(b"stat me\n")
        if "listing" in selected:
            for server in self.servers:
                many = server.volume / "data" / "many"
                many.mkdir()
                for i in range(s.listing):
                    (many / f"entry-{i:05d}").touch()
        self.batch("upload", [MARK, f"put {self.data / 'big.bin'} /data/up.bin", MARK])
        self.batch("download", [MARK, f"get /data/big.bin {self.data / 'down.bin'}", MARK])
        self.batch("small", [MARK, f"put -r {self.data / 'small'} /data/small", MARK])
        self.batch("listing", [MARK, "ls -l /data/many", MARK])
        for i in range(s.clients):
            self.batch(f"concurrent{i}", [f"put {self.data / 'client.bin'} /data/c{i}.bin"])
            self.batch(f"concurrent-download{i}",
                       [f"get /data/client.bin {self.data / f'down{i}.bin'}"])
        self.batch("connect", ["bye"])

    def batch(self, name: str, lines: List[str]) -> Path:
        path = self.batches / name
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def run(self, workload: str, server: Server, variant: str) -> float:
        """Run ``workload`` once against ``server``; the seconds it took."""
        what = f"{workload} on {server.name} ({variant})"
        if workload == "rr-stat":
            return self.stat_run(server, variant)
        if workload == "rr-open":
            return self.stat_run(server, variant, opening=True)
        if workload == "rr-write":
            return self.libssh_write_run(server, variant)
        if workload in IN_SESSION:
            out, _ = finish_sftp(start_sftp(server, variant, self.batches / workload), what)
            marks = [float(line) for line in out.splitlines() if re.fullmatch(r"\d+\.\d+", line)]
            if len(marks) != 2:
                raise BenchError(f"{what}: expected two time marks in sftp's output")
            return marks[1] - marks[0]
        started = time.perf_counter()
        if workload.startswith("concurrent"):
            processes = [start_sftp(server, variant, self.batches / f"{workload}{i}")
                         for i in range(self.sizes.clients)]
            for process in processes:
                finish_sftp(process, what)
        else:  # connect: one session after the other
            for _ in range(self.sizes.logins):
                finish_sftp(start_sftp(server, variant, self.batches / "connect"), what)
        return time.perf_counter() - started

    def libssh_write_run(self, server: Server, variant: str) -> float:
        """
        The upload with libssh (the libssh that ansible-pylibssh ships, through the test suite's
        ctypes binding): ``sftp_write`` of 32 KiB, each waiting for its reply, as KDE's kio-sftp
        writes; libssh leaves TCP_NODELAY off, as by default. Timed from open to close.
        """
        import unittest

        sys.path.insert(0, str(REPO_ROOT))
        from tests.test_e2e_engines import LibSSH

        case = unittest.TestCase()
        known_hosts = self.work / "libssh_known_hosts"
        known_hosts.write_text("")
        try:
            client = LibSSH(case, server.port, server.destination().split("@")[0], known_hosts)
            if variant == "same":
                for option in (LibSSH.OPTIONS_CIPHERS_C_S, LibSSH.OPTIONS_CIPHERS_S_C):
                    client.option(option, b"aes128-ctr")
                for option in (LibSSH.OPTIONS_HMAC_C_S, LibSSH.OPTIONS_HMAC_S_C):
                    client.option(option, b"hmac-sha2-256")
            client.connect()
            server.libssh_login(client)
            started = time.perf_counter()
            client.put(self.data / "rr.bin", "/data/rr-up.bin")
            return time.perf_counter() - started
        except AssertionError as e:
            raise BenchError(f"rr-write on {server.name} ({variant}): {e}")
        finally:
            case.doCleanups()

    def stat_run(self, server: Server, variant: str, opening: bool = False) -> float:
        """
        ``stats`` STATs one after the other with paramiko (each waits for its reply), timed
        from the first to the last reply, after login; the same client for both servers.
        With ``opening``, as many OPENs (for reading) of the same file, each followed by
        its CLOSE (rr-open).
        """
        import paramiko

        what = "rr-open" if opening else "rr-stat"
        sock = socket.create_connection((HOST, server.port), timeout=30)
        transport = paramiko.Transport(sock)
        try:
            if variant == "same":
                options = transport.get_security_options()
                options.ciphers = ("aes128-ctr",)
                options.digests = ("hmac-sha2-256",)
            transport.start_client(timeout=30)
            server.paramiko_login(transport)
            sftp = paramiko.SFTPClient.from_transport(transport)
            path = "/data/stat.txt"
            if opening:
                def request():
                    sftp.open(path, "rb").close()
            else:
                def request():
                    sftp.stat(path)
            request()  # the session's first request, not timed
            started = time.perf_counter()
            for _ in range(self.sizes.stats):
                request()
            seconds = time.perf_counter() - started
            sftp.close()
            return seconds
        except (OSError, paramiko.SSHException) as e:
            raise BenchError(f"{what} on {server.name} ({variant}): {e}")
        finally:
            transport.close()

    def clean(self, workload: str, server: Server) -> None:
        """Remove what a run made, so every run starts from the same state."""
        data = server.volume / "data"
        if workload == "upload":
            (data / "up.bin").unlink(missing_ok=True)
        elif workload == "rr-write":
            (data / "rr-up.bin").unlink(missing_ok=True)
        elif workload == "download":
            (self.data / "down.bin").unlink(missing_ok=True)
        elif workload == "small":
            # Put aside, not deleted: ext4 makes each new inode skip over the
            # recently deleted ones, so deleting 2,000 files per run would make
            # every later run slower than the one before, for both servers.
            self._kept += 1
            (data / "small").rename(data / f"small.{self._kept}")
        elif workload == "concurrent":
            for i in range(self.sizes.clients):
                (data / f"c{i}.bin").unlink(missing_ok=True)
        elif workload == "concurrent-download":
            for i in range(self.sizes.clients):
                (self.data / f"down{i}.bin").unlink(missing_ok=True)

    def finish(self) -> None:
        """Remove what runs put aside (see clean)."""
        for server in self.servers:
            for kept in (server.volume / "data").glob("small.*"):
                shutil.rmtree(kept)


def write_random(path: Path, size: int) -> None:
    # Random data, so nothing on the way can compress it; one 16 MiB pattern repeated.
    block = os.urandom(min(size, 16 * MiB))
    with open(path, "wb") as f:
        left = size
        while left:
            left -= f.write(block[: min(left, len(block))])


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


# --- measurement ------------------------------------------------------------------------------


@dataclass
class Samples:
    seconds: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)
    rss: List[float] = field(default_factory=list)
    other: List[float] = field(default_factory=list)
    """CPU seconds used meanwhile by neither the server nor its clients: the machine's noise."""


@dataclass
class Result:
    workload: str
    variant: str
    description: str
    algorithms: Dict[str, str]
    samples: Dict[str, Samples]

    def median(self, server: str, what: str = "seconds") -> float:
        values = getattr(self.samples[server], what)
        return statistics.median(values) if values else float("nan")

    def ratio(self, server: str = "lightd", against: str = "OpenSSH") -> float:
        """
        The ratio of the two medians.
        """
        return self.median(server) / self.median(against)

    def round_ratio(self, server: str = "lightd", against: str = "OpenSSH") -> float:
        """
        The median of each round's ratio: both servers ran back to back in a
        round, so a drift of the machine over the rounds cancels out.
        """
        pairs = zip(self.samples[server].seconds, self.samples[against].seconds)
        return statistics.median(a / b for a, b in pairs if b > 0)

    def peak_rss(self, server: str = "lightd") -> float:
        return max(self.samples[server].rss, default=float("nan"))


class Profiler:
    """py-spy recording lightd's process during its measured runs."""

    def __init__(self, directory: Optional[Path]) -> None:
        self.directory = directory
        self.process: Optional[subprocess.Popen] = None
        if directory is not None:
            if shutil.which("py-spy") is None:
                raise BenchError("--profile needs py-spy: pip install py-spy")
            directory.mkdir(parents=True, exist_ok=True)

    def start(self, pid: int, name: str) -> None:
        if self.directory is None:
            return
        # Raw folded stacks (bench/profile_summary.py reads them) with idle
        # samples kept, so time spent waiting in epoll shows as such.
        self.process = subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", "200", "--idle",
             "--format", "raw", "--output", str(self.directory / f"{name}.txt")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # py-spy attaches before the run starts

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure(workloads: Workloads, servers: List[Server], selected: List[str],
            variants: List[str], runs: Dict[str, int], warmup: int,
            profiler: Profiler) -> List[Result]:
    results = []
    for workload in selected:
        for variant in variants:
            result = Result(
                workload, variant, describe(workload, workloads.sizes),
                {s.name: negotiated(s, variant, workloads.batches / "connect") for s in servers},
                {s.name: Samples() for s in servers},
            )
            print(f"\n{result.description} [{variant}]", flush=True)
            for server in servers:
                print(f"  {server.name:8} {result.algorithms[server.name]}", flush=True)
            settler = Settler([server.volume / "data" for server in servers])
            for run in range(-warmup, runs[workload]):
                if workload == "small":
                    # Before every round, not only the first (see ROUND_PROBE_FILES).
                    settler.settle(workloads.sizes.small_files if run == -warmup
                                   else ROUND_PROBE_FILES)
                # Interleaved, with the order turned around every other round
                # (A B, B A, A B ...): the first run of a round follows the
                # small-file probe's deletions and the second one does not:
                # with two lightd builds in the same rounds, whichever ran
                # first was the slower, by 1% and by 4%.
                order = servers if run % 2 == 0 else servers[::-1]
                for server in order:
                    ours = isinstance(server, Lightd)
                    server.settle()
                    os.sync()
                    if ours:
                        reset_peak_rss(server.pid)
                        if run >= 0:
                            profiler.start(server.pid,
                                           f"{server.name}-{workload}-{variant}-{run + 1}")
                    cpu_before = server.cpu()
                    ours_before = bench_seconds()
                    busy_before = machine_busy_seconds()
                    try:
                        seconds = workloads.run(workload, server, variant)
                    finally:
                        if ours:
                            profiler.stop()
                    server.settle()
                    cpu = server.cpu() - cpu_before
                    other = (machine_busy_seconds() - busy_before) - cpu \
                        - (bench_seconds() - ours_before)
                    workloads.clean(workload, server)
                    if run < 0:
                        continue  # warm-up: caches, first-time imports
                    samples = result.samples[server.name]
                    samples.seconds.append(seconds)
                    samples.cpu.append(cpu)
                    samples.other.append(max(other, 0.0))
                    if ours:
                        samples.rss.append(peak_rss_mib(server.pid))
                    print(f"    run {run + 1}: {server.name:8} {seconds:7.2f} s  cpu {cpu:6.2f} s"
                          f"  other {other:5.2f} s", flush=True)
            print(
                f"  median: lightd {result.median('lightd'):.2f} s, OpenSSH "
                f"{result.median('OpenSSH'):.2f} s, ratio {result.ratio():.3f} "
                f"(median of the rounds' ratios {result.round_ratio():.3f}), "
                f"lightd peak RSS {result.peak_rss():.0f} MiB",
                flush=True,
            )
            for server in servers[1:-1]:
                print(f"  median: {server.name} {result.median(server.name):.2f} s, "
                      f"{result.ratio(server.name, 'lightd'):.2f} x lightd's, "
                      f"peak RSS {result.peak_rss(server.name):.0f} MiB", flush=True)
            results.append(result)
    workloads.finish()
    return results


# --- reporting --------------------------------------------------------------------------------

COLUMNS = ["workload", "algorithms (lightd / OpenSSH)", "lightd s", "OpenSSH s",
           "ratio", "round ratio", "lightd CPU s", "OpenSSH CPU s", "lightd peak RSS MiB",
           "noise CPU s"]


def rows(results: List[Result]) -> List[List[str]]:
    table = []
    for r in results:
        mine, theirs = (short_algorithms(r.algorithms[s]) for s in ("lightd", "OpenSSH"))
        algorithms = f"{mine} (both)" if mine == theirs else f"{mine} / {theirs}"
        if r.variant == "default":
            algorithms = f"default: {algorithms}"
        table.append([
            r.description, algorithms,
            f"{r.median('lightd'):.2f}", f"{r.median('OpenSSH'):.2f}", f"{r.ratio():.2f}",
            f"{r.round_ratio():.2f}",
            f"{r.median('lightd', 'cpu'):.2f}", f"{r.median('OpenSSH', 'cpu'):.2f}",
            f"{r.peak_rss():.0f}",
            f"{statistics.median(r.samples['lightd'].other + r.samples['OpenSSH'].other):.2f}",
        ])
    return table


def short_algorithms(text: str) -> str:
    return text.split(" (")[0]


def markdown(table: List[List[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table]
    return "\n".join(lines)


def rst(table: List[List[str]]) -> str:
    widths = [max(len(c), *(len(row[i]) for row in table)) for i, c in enumerate(COLUMNS)]

    def line(cells: List[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    head = "+" + "+".join("=" * (w + 2) for w in widths) + "+"
    out = [rule, line(COLUMNS), head]
    for row in table:
        out += [line(row), rule]
    return "\n".join(out)


def also_table(results: List[Result], name: str) -> str:
    """lightd against the --also build, as a Markdown table."""
    lines = [f"| workload | algorithms | lightd s | {name} s | {name}/lightd | lightd CPU s | "
             f"{name} CPU s | {name} peak RSS MiB |", "|" + "---|" * 8]
    for r in results:
        lines.append(
            f"| {r.description} | {short_algorithms(r.algorithms[name])} | "
            f"{r.median('lightd'):.2f} | {r.median(name):.2f} | "
            f"{r.ratio(name, 'lightd'):.2f} | {r.median('lightd', 'cpu'):.2f} | "
            f"{r.median(name, 'cpu'):.2f} | {r.peak_rss(name):.0f} |"
        )
    return "\n".join(lines)


def machine() -> Dict[str, str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    openssh = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssh": openssh,
    }


# --- setup and teardown -----------------------------------------------------------------------


def ensure_sshd() -> None:
    if os.path.exists(SSHD):
        return
    if shutil.which("apt-get") is None:
        raise BenchError(f"{SSHD} is missing: install OpenSSH's server (openssh-server)")
    print("installing the comparator: apt-get install -y openssh-server", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "openssh-server"]
    if subprocess.run(install, env=env).returncode != 0:
        run_checked(["apt-get", "update"], env=env)
        run_checked(install, env=env)


def check_chroot_path(path: Path) -> None:
    """sshd refuses a ChrootDirectory with any folder above it not root-owned or writable by others."""
    for folder in [path, *path.parents]:
        st = folder.stat()
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise BenchError(
                f"{folder} is not root-owned or is group/world-writable, so sshd refuses a "
                f"ChrootDirectory below it: pass --workdir on a path that is (not /tmp)"
            )


def source_tree(source: Optional[str], rev: Optional[str], target: Path) -> Path:
    """A lightd-sftp tree to run: a checkout as it is, or a revision of this repository."""
    if rev is None:
        return Path(source).resolve()
    target.mkdir()
    archive = subprocess.Popen(["git", "-C", str(REPO_ROOT), "archive", rev],
                               stdout=subprocess.PIPE)
    run_checked(["tar", "-x", "-C", str(target)], stdin=archive.stdout)
    archive.stdout.close()
    if archive.wait() != 0:
        raise BenchError(f"git archive {rev} failed")
    return target


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Benchmark lightd-sftp against OpenSSH's internal-sftp on loopback.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and 3 runs: a smoke check, not a measurement")
    parser.add_argument("--runs", type=int,
                        help=f"measured runs per server of every workload (default {RUNS}, "
                             f"{SHORT_RUNS} for {' and '.join(sorted(SHORT))}; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="unmeasured runs per server before each workload (default 1)")
    parser.add_argument("--only", help="comma-separated workloads: "
                                       f"{','.join(WORKLOADS + EXTRA_WORKLOADS)}")
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="both",
                        help="algorithms: aes128-ctr + hmac-sha2-256 on both sides (same), "
                             "each side's default, both of these (the default), or aes128-gcm")
    parser.add_argument("--source", default=str(REPO_ROOT),
                        help="the lightd-sftp checkout to run (default: this one)")
    parser.add_argument("--rev", help="run this git revision of this repository instead")
    parser.add_argument("--also", metavar="PATH|REV",
                        help="measure a second lightd-sftp (a checkout, or a revision of this "
                             "repository) in the same interleaved rounds, against the first")
    parser.add_argument("--also-env", metavar="NAME=VALUE", action="append", default=[],
                        help="an environment variable for the --also build only (repeatable), "
                             "e.g. MALLOC_TRIM_THRESHOLD_=4194304")
    parser.add_argument("--also-sftp", metavar="KEY=JSON", action="append", default=[],
                        help="a config.json sftp setting for the --also build only (repeatable),"
                             " e.g. audit_log='\"\"' to measure it without the audit log")
    parser.add_argument("--workdir", default=str(BENCH_DIR),
                        help="where the temporary folder goes (root-owned path; default bench/)")
    parser.add_argument("--profile", metavar="DIR",
                        help="record py-spy profiles of lightd's measured runs into DIR")
    parser.add_argument("--json", metavar="PATH", help="also write every sample as JSON")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder (logs, configs) for a post-mortem")
    parser.add_argument("--table", choices=["markdown", "rst"], default="markdown")
    args = parser.parse_args(argv)
    args.sizes = QUICK if args.quick else FULL
    args.workloads = WORKLOADS if not args.only else [w.strip() for w in args.only.split(",")]
    unknown = set(args.workloads) - set(WORKLOADS + EXTRA_WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    args.runs = {w: args.runs or (3 if args.quick else SHORT_RUNS if w in SHORT else RUNS)
                 for w in args.workloads}
    args.variants = ["same", "default"] if args.variant == "both" else [args.variant]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: sshd's ChrootDirectory and root login need it", file=sys.stderr)
        return 2
    # SIGTERM unwinds like Ctrl-C, so the cleanup below always runs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    made_run_sshd = False
    work = None
    servers: List[Server] = []
    try:
        ensure_sshd()
        base = Path(args.workdir).resolve()
        check_chroot_path(base)
        work = Path(tempfile.mkdtemp(prefix=".work-", dir=base))
        work.chmod(0o755)
        if not os.path.isdir("/run/sshd"):  # sshd's privilege separation folder
            os.makedirs("/run/sshd", mode=0o755)
            made_run_sshd = True
        lightd = Lightd(work / "lightd", source_tree(args.source, args.rev, work / "source"))
        servers = [lightd]
        if args.also:
            label = Path(args.also).name if os.path.isdir(args.also) else args.also
            rev = None if os.path.isdir(args.also) else args.also
            extra_env = dict(item.split("=", 1) for item in args.also_env)
            if extra_env:
                label += "+env"
            extra_sftp = {
                name: json.loads(value)
                for name, value in (item.split("=", 1) for item in args.also_sftp)
            }
            if extra_sftp:
                label += "+" + ",".join(extra_sftp)
            servers.append(Lightd(work / "lightd-also",
                                  source_tree(args.also, rev, work / "source-also"),
                                  f"lightd@{label}", extra_env, extra_sftp))
        openssh = OpenSSH(work / "openssh")
        servers.append(openssh)
        for server in servers:
            server.start()
        info = machine()
        for server in servers:
            where = ""
            if isinstance(server, Lightd):
                where = f" from {server.source}" + "".join(
                    f" {name}={value}" for name, value in server.extra_env.items())
            print(f"{server.name}{where} on port {server.port} (pid {server.pid})")
        print(f"{info['date']}; {info['nproc']} x {info['cpu']}; {info['openssh']}; "
              f"runs {describe_runs(args.runs)}, warm-up {args.warmup}; load average "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}", flush=True)
        workloads = Workloads(work, args.sizes, servers)
        workloads.prepare(args.workloads)
        results = measure(workloads, servers, args.workloads, args.variants, args.runs,
                          args.warmup, Profiler(Path(args.profile) if args.profile else None))
        table = rows(results)
        print()
        print(f"{info['date']}, {info['nproc']} x {info['cpu']}, {info['openssh']}, "
              f"medians of {describe_runs(args.runs)} interleaved runs")
        print(markdown(table) if args.table == "markdown" else rst(table))
        for server in servers[1:-1]:
            print(f"\n{server.name} against lightd (same rounds):")
            print(also_table(results, server.name))
        for server in servers[:-1]:
            problems = server.problems()
            if problems:
                print(f"\nwarning: {server.name}'s log holds {', '.join(problems)}: "
                      f"see {server.log} (--keep keeps it)")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"machine": info, "runs": args.runs, "sizes": args.sizes.__dict__,
                 "results": [{"workload": r.workload, "variant": r.variant,
                              "description": r.description, "algorithms": r.algorithms,
                              "samples": {k: v.__dict__ for k, v in r.samples.items()}}
                             for r in results]},
                indent=2))
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        if work is not None and args.keep:
            print(f"kept {work}: remove it when done", file=sys.stderr)
        elif work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
