#!/usr/bin/env python3
"""
A real login's latency under a flood of wrong passwords, and logins per second.

    sudo python3 bench/login_flood.py [--source DIR | --rev REV]... [--floods 0,1,20,100]
        [--logins 20] [--rate-seconds 20] [--clients 20] [--cost 10] [--profile DIR]

For each lightd-sftp tree given (this checkout by default; --rev main measures a
revision of this repository), it starts the service on loopback with a fresh
store (bcrypt at --cost) and:

- for each flood size N, opens N connections from 127.0.0.2 that send the known
  user's name with a wrong password again and again (the next as soon as the
  last is answered, reconnecting when dropped), waits for the flood to settle,
  then makes --logins real logins from 127.0.0.1 one after another and times
  each from the password request to USERAUTH_SUCCESS (median, p95, max), with
  the flood's answered checks per second;
- then, with no flood, --clients parallel asyncssh clients each log in again and
  again for --rate-seconds (connect, key exchange, password, SFTP open, close):
  logins per second and the service's CPU per login.

OpenSSH's sshd (bench/run.py's comparator: internal-sftp, chrooted, root with an
ed25519 key) gets the same logins-per-second run, its CPU counted with its
per-connection children.  With --sshd-password it also measures sshd's password
logins: that needs a system account, so it makes one (SSHD_USER, no home, its
password hashed with yescrypt by chpasswd, Debian's default) for the run only,
allowed nowhere but this sshd, and deletes it at the end.

The flood must measure the queue, not the defender: the service's config puts
127.0.0.2 on the defender's safe list (it is never scored or banned), allows 128
unauthenticated connections from one address (max_startups_per_ip) and 100
attempts per connection (max_auth_tries).  Not part of ``trial tests``; run it
under ``flock /root/bench.lock`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from run import (  # noqa: E402
    HOST,
    BenchError,
    Lightd,
    OpenSSH,
    check_chroot_path,
    cpu_seconds,
    ensure_sshd,
    machine,
    source_tree,
)
from tests import rawssh  # noqa: E402
from tests.harness import string  # noqa: E402

FLOOD_SOURCE = "127.0.0.2"
SSHD_USER = "lightd-bench"


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


class _From(rawssh.RawSSH):
    """L{rawssh.RawSSH} from a chosen loopback address."""

    def __init__(self, port, source, timeout=60):
        self.strict = True
        self.session_id = None
        self.backlog = rawssh.deque()
        self._outbound = self._inbound = rawssh._Plain()
        self._next_inbound = None
        self._buffer = bytearray()
        self.sock = socket.create_connection((HOST, port), timeout=timeout,
                                             source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(rawssh.VERSION + b"\r\n")
        while b"\n" not in self._buffer:
            self._receive()
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self.server_version = line.rstrip(b"\r")
        self._buffer = bytearray(rest)

    def start_auth(self):
        self.key_exchange()
        self.send(bytes([rawssh.MSG_SERVICE_REQUEST]) + string(b"ssh-userauth"))
        self.read_until(rawssh.MSG_SERVICE_ACCEPT)

    def try_password(self, username: bytes, password: bytes) -> bool:
        self.send(bytes([rawssh.MSG_USERAUTH_REQUEST]) + string(username)
                  + string(b"ssh-connection") + string(b"password") + b"\0" + string(password))
        reply = self.read_until(rawssh.MSG_USERAUTH_SUCCESS, rawssh.MSG_USERAUTH_FAILURE)
        return reply[0] == rawssh.MSG_USERAUTH_SUCCESS


class Flood:
    """N connections from 127.0.0.2 sending wrong passwords as fast as answered."""

    def __init__(self, port: int, connections: int, username: bytes) -> None:
        self.port = port
        self.username = username
        self.answered = 0
        self.reconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True)
                         for _ in range(connections)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(90)

    def _run(self) -> None:
        while not self._stop.is_set():
            connection = None
            try:
                connection = _From(self.port, FLOOD_SOURCE)
                connection.start_auth()
                while not self._stop.is_set():
                    if connection.try_password(self.username, b"not the password"):
                        raise BenchError("a wrong password was accepted")
                    with self._lock:
                        self.answered += 1
            except (rawssh.Disconnected, rawssh.ConnectionClosed, OSError):
                with self._lock:
                    self.reconnects += 1
                self._stop.wait(0.05)
            finally:
                if connection is not None:
                    connection.close()


def login_latency(port: int, username: str, password: str) -> float:
    connection = _From(port, HOST)
    try:
        connection.start_auth()
        began = time.perf_counter()
        if not connection.try_password(username.encode(), password.encode()):
            raise BenchError("the right password was refused")
        return time.perf_counter() - began
    finally:
        connection.close()


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))]


def flood_round(server: Lightd, connections: int, logins: int, settle: float) -> dict:
    flood = Flood(server.port, connections, server.username.encode())
    flood.start()
    try:
        time.sleep(settle if connections else 0)
        before, began = flood.answered, time.monotonic()
        times = []
        for _ in range(logins):
            times.append(login_latency(server.port, server.username, server.password()))
            time.sleep(0.1)
        rate = (flood.answered - before) / (time.monotonic() - began)
        load = loadavg()
    finally:
        flood.stop()
    return {"flood": connections, "median": statistics.median(times),
            "p95": percentile(times, 0.95), "max": max(times), "flood_rate": rate,
            "load": load}


# --- logins per second --------------------------------------------------------------------------


def _client_process(port, username, password, key, tasks, seconds, start_at, results):
    import asyncssh

    async def one():
        options = dict(known_hosts=None, username=username, agent_path=None)
        if key:
            options.update(client_keys=[key], preferred_auth="publickey")
        else:
            options.update(password=password, client_keys=None, preferred_auth="password")
        async with asyncssh.connect(HOST, port, **options) as conn:
            async with conn.start_sftp_client():
                pass

    async def loop(deadline, counts):
        while time.time() < deadline:
            try:
                await one()
                counts[0] += 1
            except (OSError, asyncssh.Error) as e:
                counts[1] += 1
                counts.append(repr(e))

    async def main():
        while time.time() < start_at:
            await asyncio.sleep(0.01)
        counts = [0, 0]
        await asyncio.gather(*(loop(start_at + seconds, counts) for _ in range(tasks)))
        return counts

    results.put(asyncio.run(main()))


def login_rate(server, seconds: float, clients: int, processes: int = 2, key=None,
               password=None, username=None) -> dict:
    results = multiprocessing.Queue()
    start_at = time.time() + 1.0
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    workers = [multiprocessing.Process(target=_client_process,
                                       args=(server.port, username, password, key, n, seconds,
                                             start_at, results))
               for n in per]
    for worker in workers:
        worker.start()
    while time.time() < start_at:
        time.sleep(0.005)
    cpu = server.cpu()
    outcome = [results.get(timeout=seconds + 120) for _ in workers]
    elapsed = time.time() - start_at
    server.settle()
    cpu = server.cpu() - cpu
    load = loadavg()
    for worker in workers:
        worker.join(30)
    done = sum(o[0] for o in outcome)
    failed = sum(o[1] for o in outcome)
    errors = [e for o in outcome for e in o[2:]][:3]
    return {"logins": done, "failed": failed, "errors": errors, "per_second": done / elapsed,
            "cpu_ms_per_login": 1000 * cpu / max(1, done), "load": load}


class Profile:
    def __init__(self, path: Path, pid: int) -> None:
        self.process = __import__("subprocess").Popen(
            ["py-spy", "record", "--pid", str(pid), "--rate", "250", "--threads",
             "--format", "raw", "--output", str(path)],
            stdin=-3, stdout=-3, stderr=-3)
        time.sleep(0.7)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)


@contextlib.contextmanager
def sshd_password_account():
    """
    The system account SSHD_USER (no home), for this run only: its password is random and
    hashed by chpasswd with yescrypt, Debian's default.  Yields the password, the hash's
    scheme prefix ("$y$") and the sshd_config lines (first, so they win) that let it, and
    only it, log in with a password; the account is deleted on the way out.
    """
    password = secrets.token_urlsafe(18)
    subprocess.run(["useradd", "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/bin/sh", "--user-group", SSHD_USER], check=True)
    try:
        subprocess.run(["chpasswd", "-c", "YESCRYPT"], input=f"{SSHD_USER}:{password}\n",
                       text=True, check=True)
        scheme = Path("/etc/shadow").read_text().split(f"\n{SSHD_USER}:", 1)[1][:3]
        yield password, scheme, [f"AllowUsers {SSHD_USER}", "PasswordAuthentication yes",
                                 "PermitRootLogin no"]
    finally:
        subprocess.run(["userdel", SSHD_USER])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--source", action="append", default=[],
                        help="a lightd-sftp tree to measure (repeatable)")
    parser.add_argument("--rev", action="append", default=[],
                        help="a revision of this repository to measure (repeatable)")
    parser.add_argument("--floods", default="0,1,20,100")
    parser.add_argument("--logins", type=int, default=20)
    parser.add_argument("--settle", type=float, default=4.0)
    parser.add_argument("--rate-seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--cost", type=int, default=10)
    parser.add_argument("--no-sshd", action="store_true")
    parser.add_argument("--sshd-password", action="store_true",
                        help=f"also sshd's password logins (makes the account {SSHD_USER})")
    parser.add_argument("--no-flood", action="store_true")
    parser.add_argument("--profile", help="folder for py-spy raw profiles of a rate run")
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: sshd's ChrootDirectory and root login need it", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ensure_sshd()
    check_chroot_path(BENCH_DIR)
    work = Path(tempfile.mkdtemp(prefix=".flood-", dir=BENCH_DIR))
    work.chmod(0o755)
    made_run_sshd = False
    accounts = contextlib.ExitStack()  # the temporary system account of --sshd-password
    servers = []
    try:
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            made_run_sshd = True
        trees = [(Path(s).resolve().name, source_tree(s, None, None)) for s in args.source]
        for i, rev in enumerate(args.rev):
            trees.append((rev, source_tree(None, rev, work / f"source-{i}")))
        if not trees:
            trees = [("checkout", source_tree(str(BENCH_DIR.parent), None, None))]
        info = machine()
        print(f"{info['date']}; {info['nproc']} x {info['cpu']}; bcrypt cost {args.cost}; "
              f"load average {loadavg()}", flush=True)
        settings = {
            "bcrypt_cost": args.cost,
            "max_auth_tries": 100,
            "max_startups": 512,
            "max_startups_per_ip": 128,
            "defender": {"safe_list": [f"{FLOOD_SOURCE}/32"]},
        }
        floods = [int(n) for n in args.floods.split(",") if n != ""]
        for index, (label, tree) in enumerate(trees):
            server = Lightd(work / f"lightd-{index}", tree, f"lightd@{label}",
                            extra_sftp=settings)
            servers.append(server)
            server.start()
            print(f"\n{server.name} from {tree} on port {server.port} (pid {server.pid})",
                  flush=True)
            if not args.no_flood:
                print("  flood conns  login median   p95      max      flood checks/s  load")
                for connections in floods:
                    row = flood_round(server, connections, args.logins, args.settle)
                    print(f"  {row['flood']:>11}  {row['median'] * 1000:8.0f} ms"
                          f" {row['p95'] * 1000:6.0f} ms {row['max'] * 1000:6.0f} ms"
                          f"  {row['flood_rate']:14.1f}  {row['load']}", flush=True)
                    time.sleep(2)
                refused = server.log.read_text().count("too many checks waiting")
                print(f"  checks refused by the queue (log lines): {refused}")
            profile = None
            if args.profile:
                Path(args.profile).mkdir(parents=True, exist_ok=True)
                profile = Profile(Path(args.profile) / f"{index}-{label.replace('/', '_')}.txt",
                                  server.pid)
            rate = login_rate(server, args.rate_seconds, args.clients,
                              username=server.username, password=server.password())
            if profile is not None:
                profile.stop()
            print(f"  {args.clients} clients, password: {rate['per_second']:.1f} logins/s"
                  f" ({rate['logins']} in {args.rate_seconds:.0f} s, {rate['failed']} failed"
                  f"{' ' + '; '.join(rate['errors']) if rate['errors'] else ''}),"
                  f" {rate['cpu_ms_per_login']:.1f} ms CPU a login, load {rate['load']}",
                  flush=True)
            problems = server.problems()
            if problems:
                print(f"  warning: the log holds {', '.join(problems)}: {server.log}")
            server.stop()
            time.sleep(2)
        if not args.no_sshd:
            openssh = OpenSSH(work / "openssh")
            servers.append(openssh)
            openssh.start()
            rate = login_rate(openssh, args.rate_seconds, args.clients, username="root",
                              key=str(openssh.client_key))
            print(f"\nOpenSSH sshd, {args.clients} clients, ed25519 key:"
                  f" {rate['per_second']:.1f} logins/s ({rate['logins']} in"
                  f" {args.rate_seconds:.0f} s, {rate['failed']} failed"
                  f"{' ' + '; '.join(rate['errors']) if rate['errors'] else ''}),"
                  f" {rate['cpu_ms_per_login']:.1f} ms CPU a login, load {rate['load']}",
                  flush=True)
            openssh.stop()
        if args.sshd_password:
            password, scheme, first_lines = accounts.enter_context(sshd_password_account())
            openssh = OpenSSH(work / "openssh-password", first_lines=first_lines)
            servers.append(openssh)
            openssh.start()
            rate = login_rate(openssh, args.rate_seconds, args.clients, username=SSHD_USER,
                              password=password)
            print(f"\nOpenSSH sshd, {args.clients} clients, password ({scheme}... hash):"
                  f" {rate['per_second']:.1f} logins/s ({rate['logins']} in"
                  f" {args.rate_seconds:.0f} s, {rate['failed']} failed"
                  f"{' ' + '; '.join(rate['errors']) if rate['errors'] else ''}),"
                  f" {rate['cpu_ms_per_login']:.1f} ms CPU a login, load {rate['load']}",
                  flush=True)
    finally:
        for server in servers:
            try:
                server.stop()
            except Exception:
                pass
        accounts.close()
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
