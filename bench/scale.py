#!/usr/bin/env python3
"""
lightd-sftp against OpenSSH's sshd at scale: many idle sessions, logins per second, many
transfers at once, and small requests one at a time.

    python3 bench/scale.py                           # as root; about 15 minutes on 2 cores
    python3 bench/scale.py --sessions 200 --runs 1   # a smoke check
    python3 bench/scale.py --only idle,requests --table rst

Both servers are bench/run.py's: lightd-sftp from this checkout with a password login (bcrypt
cost 10), and OpenSSH's sshd with internal-sftp and ChrootDirectory on a temporary volume, root
logging in with a temporary ed25519 key; loopback only.  Each workload runs against both
servers in the same interleaved rounds (A B, B A, A B ...), --runs rounds (default 3):

idle
    --sessions (default 1,000) logged-in sessions, each with an SFTP channel open and one
    REALPATH done (as an idle FileZilla or sshfs leaves it), opened by asyncssh clients in 4
    processes, 20 logins in flight at a time, and held: the servers' memory (PSS summed over
    every server process) with them and with none, and so per session; the time to open them
    all; a new login's latency (asyncssh: connect, key exchange, authentication, SFTP channel,
    REALPATH) while they are held, and with none held.
logins
    logins per second from 20 parallel asyncssh clients, each logging in again and again
    (bench/login_flood.py's login_rate: connect, key exchange, authentication, SFTP channel,
    close) for --rate-seconds: lightd with its password, sshd with its ed25519 key.
transfers
    50 OpenSSH sftp clients each downloading, then each uploading, a 16 MiB file (aes128-ctr +
    hmac-sha2-256 on both sides): all log in first and wait at a barrier, then all transfer at
    once; MB/s from the barrier to the last client's end, and the server's CPU seconds per GiB
    over the same span (the logins left out).
requests
    from one paramiko client waiting for each reply (aes128-ctr + hmac-sha2-256): 2,000 STATs,
    2,000 OPENs each followed by its CLOSE, and 300 listings of a 100-entry folder (OPENDIR,
    READDIR until EOF, CLOSE): requests per second and CPU per request.

CPU is counted for every server process, sshd's per-connection processes included: each server
runs as the child of bench/subreaper.py, which is the subreaper of its tree (orphans are
reparented to it; it reaps them with os.wait4 and keeps their rusage); processes still alive at
a sample point add their scheduler run time.  For sshd the table also gives what bench/run.py's
count (the listener's own CPU and its reaped children's) sees over the same span.

It must run as root (sshd's ChrootDirectory and root login); everything it makes is removed at
the end, also on Ctrl-C and SIGTERM.  Not part of ``trial tests``; run it under
``flock /root/bench.lock`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import re
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

import subreaper  # noqa: E402
from login_flood import SSHD_USER, loadavg, login_rate, sshd_password_account  # noqa: E402
from run import (  # noqa: E402
    HOST,
    MiB,
    BenchError,
    Lightd,
    OpenSSH,
    check_chroot_path,
    cpu_seconds,
    ensure_sshd,
    finish_sftp,
    link_or_copy,
    machine,
    start_sftp,
    write_random,
)

GiB = 1024 * MiB
WORKLOADS = ["idle", "logins", "transfers", "requests"]
HOLDER_PROCESSES = 4
IN_FLIGHT = 5
"""Logins in flight per holder process: 20 at a time in all, as many as the logins workload's."""
LATENCY_SAMPLES = 5
LOGIN_CLIENTS = 20
TRANSFER_CLIENTS = 50
TRANSFER_BYTES = 16 * MiB
STATS = 2000
LISTINGS = 300
LISTING_ENTRIES = 100
VARIANT = "same"
"""aes128-ctr + hmac-sha2-256 (bench/run.py's VARIANTS) for the sftp and paramiko clients."""


# --- the servers, under the subreaper ---------------------------------------------------------


class Reaped:
    """A bench/run.py server started as the child of bench/subreaper.py."""

    def use_subreaper(self) -> None:
        self.status = self.root / "reaped"
        self.launcher = [sys.executable, str(BENCH_DIR / "subreaper.py"), str(self.status), "--"]

    def server_pid(self) -> int:
        return subreaper.read_status(self.status)[2]

    def cpu(self) -> float:
        """CPU seconds of every process of the server since it started."""
        return subreaper.tree_cpu(self.pid, self.status)

    def listener_cpu(self) -> float:
        """What bench/run.py counts for sshd: the listener's CPU and its reaped children's."""
        return cpu_seconds(self.server_pid(), children=True)

    def processes(self) -> List[int]:
        return subreaper.descendants(self.pid)

    def pss(self) -> Tuple[int, int]:
        return subreaper.tree_pss(self.pid)

    def settle(self, timeout: float = 60) -> None:
        """Wait until the server is down to its one process (the sessions' processes gone)."""
        deadline = time.monotonic() + timeout
        while len(self.processes()) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)

    def stop(self) -> None:
        left = self.processes() if self.process is not None and self.process.poll() is None \
            else []
        super().stop()
        for pid in left:  # the subreaper ends its tree; this is for a subreaper killed first
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class ScaleLightd(Reaped, Lightd):
    def login(self) -> dict:
        return {"username": self.username, "password": self.password(), "key": None}


class ScaleOpenSSH(Reaped, OpenSSH):
    password: Optional[str] = None
    """With a password (--sshd-password): login_flood.py's temporary account's."""

    def login(self) -> dict:
        if self.password is not None:
            return {"username": SSHD_USER, "password": self.password, "key": None}
        return {"username": "root", "password": None, "key": str(self.client_key)}


# --- asyncssh clients -------------------------------------------------------------------------


def _options(username: str, password: Optional[str], key: Optional[str]) -> dict:
    options = dict(known_hosts=None, username=username, agent_path=None)
    if key:
        options.update(client_keys=[key], preferred_auth="publickey")
    else:
        options.update(password=password, client_keys=None, preferred_auth="password")
    return options


def _holder(port: int, login: dict, count: int, start_at: float, pipe) -> None:
    """A client process: opens ``count`` idle sessions, holds them until told, closes them."""
    import asyncssh

    async def main():
        held, errors = [], []
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one():
            async with gate:
                try:
                    conn = await asyncssh.connect(HOST, port, **_options(**login))
                    sftp = await conn.start_sftp_client()
                    await sftp.realpath(".")
                    held.append((conn, sftp))
                except (OSError, asyncssh.Error) as e:
                    errors.append(repr(e))

        while time.time() < start_at:
            await asyncio.sleep(0.005)
        await asyncio.gather(*(one() for _ in range(count)))
        pipe.send(("opened", len(held), errors[:3], time.time()))
        await asyncio.get_running_loop().run_in_executor(None, pipe.recv)
        alive = sum(not conn.is_closed() for conn, _ in held)
        for conn, sftp in held:
            sftp.exit()
            conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn, _ in held), return_exceptions=True)
        pipe.send(("closed", alive))

    asyncio.run(main())


def login_latency(server) -> float:
    """Seconds from connect to a first REALPATH's reply, for one new asyncssh session."""
    import asyncssh

    async def one():
        began = time.perf_counter()
        async with asyncssh.connect(HOST, server.port, **_options(**server.login())) as conn:
            async with conn.start_sftp_client() as sftp:
                await sftp.realpath(".")
                return time.perf_counter() - began

    return asyncio.run(one())


def _receive(pipe, what: str, timeout: float):
    if not pipe.poll(timeout):
        raise BenchError(f"{what}: a client process did not answer within {timeout:.0f} s")
    return pipe.recv()


def idle_run(server, sessions: int) -> Dict[str, float]:
    server.settle()
    time.sleep(1)
    pss_none, _ = server.pss()
    latency_none = statistics.median(login_latency(server) for _ in range(LATENCY_SAMPLES))
    per = [sessions // HOLDER_PROCESSES + (1 if i < sessions % HOLDER_PROCESSES else 0)
           for i in range(HOLDER_PROCESSES)]
    start_at = time.time() + 1.5
    pipes, workers = [], []
    try:
        for n in per:
            ours, theirs = multiprocessing.Pipe()
            worker = multiprocessing.Process(target=_holder, daemon=True,
                                             args=(server.port, server.login(), n, start_at,
                                                   theirs))
            worker.start()
            pipes.append(ours)
            workers.append(worker)
        cpu_before = server.cpu()
        opened = [_receive(pipe, f"opening sessions on {server.name}", 900) for pipe in pipes]
        held = sum(o[1] for o in opened)
        if held < sessions:
            errors = "; ".join(e for o in opened for e in o[2])
            raise BenchError(f"{server.name}: {held} of {sessions} sessions opened: {errors}")
        seconds = max(o[3] for o in opened) - start_at
        cpu = server.cpu() - cpu_before
        time.sleep(2)
        pss, processes = server.pss()
        latency = statistics.median(login_latency(server) for _ in range(LATENCY_SAMPLES))
        for pipe in pipes:
            pipe.send("close")
        alive = sum(_receive(pipe, f"closing sessions on {server.name}", 300)[1]
                    for pipe in pipes)
        if alive < held:
            raise BenchError(f"{server.name}: {held - alive} of {held} held sessions were "
                             "closed while held")
    finally:
        for worker in workers:
            worker.join(30)
            if worker.is_alive():
                worker.kill()
                worker.join()
    server.settle()
    time.sleep(2)
    pss_after, _ = server.pss()
    return {
        "pss": pss / 1024, "pss_none": pss_none / 1024, "processes": processes,
        "pss_after": pss_after / 1024,
        "kib_per_session": (pss - pss_none) / sessions, "open_s": seconds,
        "open_cpu_ms": 1000 * cpu / sessions, "latency_ms": 1000 * latency,
        "latency_none_ms": 1000 * latency_none,
    }


def logins_run(server, seconds: float) -> Dict[str, float]:
    server.settle()
    listener = server.listener_cpu()
    rate = login_rate(server, seconds, LOGIN_CLIENTS, **server.login())
    listener = server.listener_cpu() - listener
    if rate["failed"]:
        raise BenchError(f"{server.name}: {rate['failed']} logins failed: "
                         + "; ".join(rate["errors"]))
    return {"per_second": rate["per_second"], "cpu_ms": rate["cpu_ms_per_login"],
            "listener_cpu_ms": 1000 * listener / max(1, rate["logins"])}


# --- 50 transfers at once ---------------------------------------------------------------------


class Transfers:
    """
    TRANSFER_CLIENTS OpenSSH sftp clients, each with a batch that logs in, says it is ready,
    waits at a barrier (a FIFO that the bench holds open for writing: each reader's ``cat``
    ends when the bench closes it), then downloads or uploads TRANSFER_BYTES and prints the
    time.
    """

    def __init__(self, work: Path, servers) -> None:
        self.servers = servers
        self.data = work / "transfer-data"
        self.data.mkdir()
        self.ready = work / "ready"
        self.ready.mkdir()
        self.gate = work / "gate"
        os.mkfifo(self.gate, 0o600)
        self.batches = work / "transfer-batches"
        self.batches.mkdir()
        write_random(self.data / "client.bin", TRANSFER_BYTES)
        for server in servers:
            (server.volume / "data").mkdir(mode=0o755, exist_ok=True)
            link_or_copy(self.data / "client.bin", server.volume / "data" / "client.bin")
        for i in range(TRANSFER_CLIENTS):
            for direction, command in (
                    ("download", f"get /data/client.bin {self.data / f'down{i}.bin'}"),
                    ("upload", f"put {self.data / 'client.bin'} /data/up{i}.bin")):
                (self.batches / f"{direction}{i}").write_text(
                    f"!touch {self.ready / str(i)} && exec cat {self.gate}\n"
                    f"{command}\n"
                    "!date +%s.%N\n")

    def run(self, server, direction: str) -> Dict[str, float]:
        what = f"{TRANSFER_CLIENTS} {direction}s on {server.name}"
        for entry in self.ready.iterdir():
            entry.unlink()
        server.settle()
        os.sync()
        whole, whole_listener = server.cpu(), server.listener_cpu()
        holder = os.open(self.gate, os.O_RDWR | os.O_NONBLOCK)
        released = threading.Event()
        processes = []
        try:
            processes = [start_sftp(server, VARIANT, self.batches / f"{direction}{i}")
                         for i in range(TRANSFER_CLIENTS)]
            deadline = time.monotonic() + 300
            while len(list(self.ready.iterdir())) < TRANSFER_CLIENTS:
                for process in processes:
                    if process.poll() is not None:
                        finish_sftp(process, what)  # raises if it failed
                        raise BenchError(f"{what}: a client ended before the barrier")
                if time.monotonic() > deadline:
                    raise BenchError(f"{what}: the clients did not all log in within 300 s")
                time.sleep(0.02)
            time.sleep(0.2)  # from touch to cat's open
            cpu = server.cpu()
            started = time.time()
            os.close(holder)
            holder = None
            threading.Thread(target=self._release_stragglers, args=(released,),
                             daemon=True).start()
            ends = []
            for process in processes:
                out, _ = finish_sftp(process, what)
                ends += [float(line) for line in out.splitlines()
                         if re.fullmatch(r"\d+\.\d+", line)]
            if len(ends) != TRANSFER_CLIENTS:
                raise BenchError(f"{what}: {len(ends)} clients printed their end time")
            seconds = max(ends) - started
            server.settle()
            after = server.cpu()
            cpu, whole = after - cpu, after - whole
            whole_listener = server.listener_cpu() - whole_listener
        finally:
            released.set()
            if holder is not None:
                os.close(holder)
            for process in processes:
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            for i in range(TRANSFER_CLIENTS):
                (self.data / f"down{i}.bin").unlink(missing_ok=True)
                (server.volume / "data" / f"up{i}.bin").unlink(missing_ok=True)
        gib = TRANSFER_CLIENTS * TRANSFER_BYTES / GiB
        return {"mb_s": TRANSFER_CLIENTS * TRANSFER_BYTES / seconds / 1e6,
                "cpu_per_gib": cpu / gib, "whole_cpu": whole, "whole_listener_cpu": whole_listener}

    def _release_stragglers(self, released: threading.Event) -> None:
        # A client that had touched its ready file but not yet opened the FIFO when the bench
        # closed it would wait for a writer: open and close one until all are done.
        while not released.wait(0.2):
            try:
                os.close(os.open(self.gate, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass  # ENXIO: no reader waits


# --- small requests, one at a time ------------------------------------------------------------


def prepare_requests(servers) -> None:
    for server in servers:
        data = server.volume / "data"
        data.mkdir(mode=0o755, exist_ok=True)
        (data / "stat.txt").write_bytes(b"stat me\n")
        listing = data / "list100"
        listing.mkdir()
        for i in range(LISTING_ENTRIES):
            (listing / f"entry-{i:03d}").write_bytes(b"x")


def requests_run(server, kind: str) -> Dict[str, float]:
    """One paramiko session: ``kind`` requests one after the other; per second, CPU µs each."""
    import paramiko

    count = LISTINGS if kind == "listing" else STATS
    sock = socket.create_connection((HOST, server.port), timeout=30)
    transport = paramiko.Transport(sock)
    try:
        options = transport.get_security_options()
        options.ciphers = ("aes128-ctr",)
        options.digests = ("hmac-sha2-256",)
        transport.start_client(timeout=30)
        server.paramiko_login(transport)
        sftp = paramiko.SFTPClient.from_transport(transport)
        request = {
            "stat": lambda: sftp.stat("/data/stat.txt"),
            "open": lambda: sftp.open("/data/stat.txt", "rb").close(),
            "listing": lambda: sftp.listdir_attr("/data/list100"),
        }[kind]
        if kind == "listing" and len(request()) != LISTING_ENTRIES:
            raise BenchError(f"{server.name}: the listing does not hold {LISTING_ENTRIES} entries")
        request()  # the first, untimed
        cpu = server.cpu()
        started = time.perf_counter()
        for _ in range(count):
            request()
        seconds = time.perf_counter() - started
        cpu = server.cpu() - cpu
        sftp.close()
    except (OSError, paramiko.SSHException) as e:
        raise BenchError(f"{kind} requests on {server.name}: {e}")
    finally:
        transport.close()
    return {"per_second": count / seconds, "cpu_us": 1e6 * cpu / count}


# --- the rounds and the table -----------------------------------------------------------------


class Table:
    """Samples per row and server, in the order the rows were first given."""

    def __init__(self) -> None:
        self.rows: Dict[str, Dict[str, List[float]]] = {}
        self.formats: Dict[str, str] = {}

    def add(self, row: str, server: str, value: float, fmt: str = "{:,.1f}") -> None:
        self.rows.setdefault(row, {}).setdefault(server, []).append(value)
        self.formats[row] = fmt

    def cells(self, names: List[str]) -> List[List[str]]:
        out = []
        for row, samples in self.rows.items():
            fmt = self.formats[row]
            medians = [statistics.median(samples[n]) if samples.get(n) else None for n in names]
            cells = [row] + ["" if m is None else fmt.format(m) for m in medians]
            a, b = medians[0], medians[1]
            cells.append(f"{a / b:.2f}" if a is not None and b else "")
            out.append(cells)
        return out


def render(header: List[str], cells: List[List[str]], style: str) -> str:
    if style == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])
    widths = [max(len(h), *(len(row[i]) for row in cells)) for i, h in enumerate(header)]

    def line(row):
        return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(row, widths))) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, line(header), rule.replace("-", "=")]
    for row in cells:
        out += [line(row), rule]
    return "\n".join(out)


def rounds(servers, runs: int, warmup: int, measure) -> None:
    """``measure(server, run)`` for each server, interleaved, the order turned every round."""
    for run in range(-warmup, runs):
        for server in (servers if run % 2 == 0 else servers[::-1]):
            measure(server, run)


def measure_all(args, servers, work: Path, table: Table, password_sshd=None,
                fresh=None) -> None:
    n = args.sessions
    lightd, openssh = servers
    for workload in args.workloads:
        if workload == "idle":
            print(f"\n{n:,} idle sessions (SFTP channel open, one REALPATH done), "
                  f"{HOLDER_PROCESSES} asyncssh processes, {HOLDER_PROCESSES * IN_FLIGHT} "
                  "logins in flight", flush=True)

            def idle(server, run):
                # A server started for this run: one that already held and closed sessions
                # keeps much of their memory (see "PSS after they closed"), so its "none"
                # would hide part of what a session costs.
                server = fresh(type(server), f"idle{run + 1}")
                try:
                    r = idle_run(server, n)
                finally:
                    server.stop()
                print(f"  run {run + 1}: {server.name:8} PSS {r['pss']:7.1f} MiB in "
                      f"{r['processes']:,} processes (none held: {r['pss_none']:.1f} MiB), "
                      f"{r['kib_per_session']:.1f} KiB a session, opened in {r['open_s']:.1f} s"
                      f", new login {r['latency_ms']:.0f} ms (none held: "
                      f"{r['latency_none_ms']:.0f} ms); PSS after they closed "
                      f"{r['pss_after']:.1f} MiB", flush=True)
                table.add(f"PSS with {n:,} idle sessions, MiB", server.name, r["pss"])
                table.add("PSS with none (a fresh server), MiB", server.name, r["pss_none"])
                table.add("PSS after they closed, MiB", server.name, r["pss_after"])
                table.add(f"server processes with {n:,}", server.name, r["processes"],
                          "{:,.0f}")
                table.add("KiB a session (PSS)", server.name, r["kib_per_session"])
                table.add(f"time to open {n:,} sessions, s", server.name, r["open_s"])
                table.add("server CPU to open a session, ms", server.name, r["open_cpu_ms"])
                table.add(f"new login while {n:,} are held, ms", server.name, r["latency_ms"],
                          "{:,.0f}")
                table.add("new login with none held, ms", server.name, r["latency_none_ms"],
                          "{:,.0f}")

            rounds(servers, args.runs, 0, idle)
        elif workload == "logins":
            print(f"\nlogins per second, {LOGIN_CLIENTS} parallel asyncssh clients, "
                  f"{args.rate_seconds:.0f} s a run (lightd: password, bcrypt cost 10; "
                  "sshd: ed25519 key"
                  + (f"; {password_sshd.name}: password, {password_sshd.scheme}... hash"
                     if password_sshd else "") + ")", flush=True)

            def logins(server, run):
                r = logins_run(server, args.rate_seconds)
                print(f"  run {run + 1}: {server.name:10} {r['per_second']:6.1f} logins/s, "
                      f"{r['cpu_ms']:.1f} ms CPU a login (listener count: "
                      f"{r['listener_cpu_ms']:.1f} ms)", flush=True)
                rows = [("logins/s, {} clients (lightd password, sshd key)",
                         "server CPU a login, ms")]
                if password_sshd is not None and server is not openssh:
                    # lightd's figures again, beside sshd's password ones.
                    rows.append(("logins/s, {} clients (both with a password)",
                                 "server CPU a password login, ms"))
                if server is password_sshd:
                    rows = rows[1:]
                for rate_row, cpu_row in rows:
                    name = openssh.name if server is password_sshd else server.name
                    table.add(rate_row.format(LOGIN_CLIENTS), name, r["per_second"])
                    table.add(cpu_row, name, r["cpu_ms"])
                if server is not lightd:
                    table.add(f"  {server.name} by run.py's listener count, ms", openssh.name,
                              r["listener_cpu_ms"])

            rounds(servers + ([password_sshd] if password_sshd else []), args.runs, 0, logins)
        elif workload == "transfers":
            transfers = Transfers(work, servers)
            for direction in ("download", "upload"):
                print(f"\n{TRANSFER_CLIENTS} concurrent {direction}s of "
                      f"{TRANSFER_BYTES // MiB} MiB (OpenSSH sftp, aes128-ctr + "
                      "hmac-sha2-256), timed from the barrier", flush=True)

                def transfer(server, run, direction=direction):
                    r = transfers.run(server, direction)
                    print(f"  run {run + 1}: {server.name:8} {r['mb_s']:6.0f} MB/s, "
                          f"{r['cpu_per_gib']:.2f} CPU s/GiB; with the logins, "
                          f"{r['whole_cpu']:.2f} CPU s (listener count "
                          f"{r['whole_listener_cpu']:.2f} s)", flush=True)
                    if run < 0:
                        return
                    label = f"{TRANSFER_CLIENTS} x {TRANSFER_BYTES // MiB} MiB {direction}s"
                    table.add(f"{label}, MB/s", server.name, r["mb_s"], "{:,.0f}")
                    table.add(f"{direction} server CPU s/GiB", server.name, r["cpu_per_gib"],
                              "{:,.2f}")
                    table.add(f"  {direction} CPU s with the logins, subreaper count",
                              server.name, r["whole_cpu"], "{:,.2f}")
                    if server is openssh:
                        table.add(f"  {direction} CPU s, run.py's listener count", server.name,
                                  r["whole_listener_cpu"], "{:,.2f}")

                rounds(servers, args.runs, 1, transfer)
        elif workload == "requests":
            prepare_requests(servers)
            for kind, label in (("stat", "STAT"), ("open", "OPEN+CLOSE"),
                                ("listing", f"{LISTING_ENTRIES}-entry listing")):
                count = LISTINGS if kind == "listing" else STATS
                print(f"\n{count:,} x {label}, one paramiko client waiting for each reply",
                      flush=True)

                def requests(server, run, kind=kind, label=label):
                    r = requests_run(server, kind)
                    print(f"  run {run + 1}: {server.name:8} {r['per_second']:7.0f}/s, "
                          f"{r['cpu_us']:.0f} µs CPU each", flush=True)
                    if run < 0:
                        return
                    table.add(f"{label}s per second", server.name, r["per_second"], "{:,.0f}")
                    table.add(f"server CPU a{'n' if kind == 'open' else ''} {label}, µs",
                              server.name, r["cpu_us"], "{:,.0f}")

                rounds(servers, args.runs, 1, requests)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="lightd-sftp against OpenSSH's sshd at scale, on loopback.")
    parser.add_argument("--only", help=f"comma-separated workloads: {','.join(WORKLOADS)}")
    parser.add_argument("--runs", type=int, default=3,
                        help="interleaved rounds of each workload (default 3)")
    parser.add_argument("--sessions", type=int, default=1000,
                        help="idle sessions held (default 1000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="lightd-sftp's sftp.workers (passed only if not 1)")
    parser.add_argument("--rate-seconds", type=float, default=15.0,
                        help="seconds of each logins-per-second run (default 15)")
    parser.add_argument("--sshd-password", action="store_true",
                        help="also sshd's password logins (makes the system account "
                             f"{SSHD_USER} for the run, as bench/login_flood.py does)")
    parser.add_argument("--table", choices=["rst", "markdown"], default="rst")
    parser.add_argument("--workdir", default=str(BENCH_DIR),
                        help="where the temporary folder goes (root-owned path; default bench/)")
    args = parser.parse_args(argv)
    args.workloads = WORKLOADS if not args.only else [w.strip() for w in args.only.split(",")]
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if args.runs < 1 or args.sessions < 1 or args.workers < 1:
        parser.error("--runs, --sessions and --workers must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: sshd's ChrootDirectory and root login need it", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    made_run_sshd = False
    work = None
    servers = []
    accounts = contextlib.ExitStack()  # --sshd-password's temporary system account
    try:
        ensure_sshd()
        base = Path(args.workdir).resolve()
        check_chroot_path(base)
        work = Path(tempfile.mkdtemp(prefix=".scale-", dir=base))
        work.chmod(0o755)
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            made_run_sshd = True
        room = args.sessions + 100  # the held sessions, the new logins, and some to spare
        settings = {
            "bcrypt_cost": 10,
            "idle_timeout": 0,
            "max_sessions_per_container": room,
            "max_sessions_per_ip": room,
            "max_startups": 256,
            "max_startups_per_ip": 256,
        }
        if args.workers != 1:
            settings["workers"] = args.workers
        sshd_lines = ["MaxStartups 1024", "MaxSessions 64", "ClientAliveInterval 0"]

        def fresh(kind, tag: str):
            """A new server of ``kind`` (ScaleLightd or ScaleOpenSSH), started."""
            if kind is ScaleLightd:
                server = ScaleLightd(work / f"lightd-{tag}", BENCH_DIR.parent,
                                     extra_sftp=settings)
            else:
                server = ScaleOpenSSH(work / f"openssh-{tag}", first_lines=sshd_lines)
            server.use_subreaper()
            servers.append(server)  # stopped at the end whatever happens
            server.start()
            return server

        lightd = fresh(ScaleLightd, "main")
        openssh = fresh(ScaleOpenSSH, "main")
        password_sshd = None
        if args.sshd_password and "logins" in args.workloads:
            password, scheme, first_lines = accounts.enter_context(sshd_password_account())
            password_sshd = ScaleOpenSSH(work / "openssh-password",
                                         first_lines=[*sshd_lines, *first_lines])
            password_sshd.name, password_sshd.password = "sshd-pw", password
            password_sshd.scheme = scheme
            password_sshd.use_subreaper()
            servers.append(password_sshd)
            password_sshd.start()
        info = machine()
        start_load = loadavg()
        print(f"{info['date']}; {info['nproc']} x {info['cpu']}; kernel {info['kernel']}; "
              f"{info['openssh']}; load average {start_load}")
        for server in servers:
            print(f"{server.name} on port {server.port} (subreaper {server.pid}, server "
                  f"{server.server_pid()})", flush=True)
        table = Table()
        measure_all(args, [lightd, openssh], work, table, password_sshd, fresh)
        end_load = loadavg()
        names = [lightd.name, openssh.name]
        print(f"\n{info['date']}, {info['nproc']} x {info['cpu']}, kernel {info['kernel']}, "
              f"{info['openssh']}, lightd-sftp sftp.workers {args.workers}; medians of "
              f"{args.runs} interleaved run{'s' if args.runs != 1 else ''}; load average "
              f"{start_load} at the start, {end_load} at the end; "
              f"{(time.monotonic() - started) / 60:.0f} minutes\n")
        print(render(["measure", *names, "lightd/OpenSSH"], table.cells(names), args.table))
        for server in servers:
            problems = server.problems() if isinstance(server, Lightd) else []
            if problems:
                print(f"\nwarning: {server.log} holds {', '.join(problems)}")
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        for server in reversed(servers):
            server.stop()
        accounts.close()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
