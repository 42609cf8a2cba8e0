#!/usr/bin/env python3
"""
What one request costs, and where its time goes: lightd-sftp against OpenSSH's sshd.

    sudo python3 bench/request_cost.py [--kind stat|open] [--requests 3000] [--rounds 7]
        [--pin none|same|apart] [--source DIR | --rev REV] [--workdir DIR]

It starts both servers as bench/run.py does (its Lightd and OpenSSH: the same config, volume,
logins and sshd), holds one logged-in paramiko SFTP session to each (aes128-ctr +
hmac-sha2-256 on both), and then, in rounds whose order turns around every other time (A B,
B A ...), sends --requests requests one after the other to each server, each waiting for its
reply: STATs of a small file (``--kind stat``, as rr-stat) or OPENs of it each followed by its
CLOSE (``--kind open``, as rr-open).  For each block it records, per request:

- the wall time, from the client;
- the server's CPU time, user and system apart (sshd's with all its descendants, which
  hold the session's processes: they are alive for the whole run);
- the client's own CPU time (paramiko: its main thread and its transport thread);
- the server's context switches.

The login, key exchange and first requests are outside every block (200 requests before
each block are not timed), so these are the request's costs alone, which rr-stat's and
rr-open's totals in bench/run.py include with a login each.

``--pin`` places the processes: ``none`` leaves it to the scheduler (as bench/run.py does);
``same`` pins the client and both servers to CPU 0, so each wakeup is a switch on one CPU;
``apart`` pins the client to CPU 0 and the servers to CPU 1, so each wakeup crosses CPUs.
Loopback request-reply times depend on this placement as much as on either side's CPU.

It prints the medians, the median of the rounds' lightd/OpenSSH wall ratios, the machine and
the load average at the start and the end.  It must run as root (sshd's ChrootDirectory);
it is not part of ``trial tests``; run it under ``flock /root/bench.lock`` on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from run import (  # noqa: E402
    CLK_TCK,
    HOST,
    REPO_ROOT,
    BenchError,
    Lightd,
    OpenSSH,
    Server,
    _stat_fields,
    check_chroot_path,
    child_pids,
    ensure_sshd,
    machine,
    source_tree,
)

WARMUP = 200
FIELDS = ("wall", "user", "sys", "client", "switches")


def descendants(pid: int) -> List[int]:
    found = []
    for child in child_pids(pid):
        found += [child, *descendants(child)]
    return found


def server_pids(server: Server) -> List[int]:
    return [server.pid, *(descendants(server.pid) if isinstance(server, OpenSSH) else [])]


def cpu_split(pids: List[int]) -> "tuple[float, float]":
    """User and system CPU seconds of C{pids}."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        user += int(fields[11])
        system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def switches(pids: List[int]) -> int:
    """Context switches, voluntary and not, of every thread of C{pids}."""
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split(":")[1])
    return total


def pin(pids: List[int], cpu: int) -> None:
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(task), {cpu})


def session(server: Server):
    import paramiko

    sock = socket.create_connection((HOST, server.port), timeout=30)
    transport = paramiko.Transport(sock)
    options = transport.get_security_options()
    options.ciphers = ("aes128-ctr",)
    options.digests = ("hmac-sha2-256",)
    transport.start_client(timeout=30)
    server.paramiko_login(transport)
    return transport, paramiko.SFTPClient.from_transport(transport)


def block(server: Server, sftp, kind: str, requests: int) -> Dict[str, float]:
    path = "/data/stat.txt"
    if kind == "open":
        def request():
            sftp.open(path, "rb").close()
    else:
        def request():
            sftp.stat(path)
    for _ in range(WARMUP):
        request()
    pids = server_pids(server)
    user0, sys0 = cpu_split(pids)
    switches0 = switches(pids)
    client0 = os.times()
    started = time.perf_counter()
    for _ in range(requests):
        request()
    wall = time.perf_counter() - started
    client1 = os.times()
    user1, sys1 = cpu_split(pids)
    micro = 1e6 / requests
    return {
        "wall": wall * micro,
        "user": (user1 - user0) * micro,
        "sys": (sys1 - sys0) * micro,
        "client": (client1.user - client0.user + client1.system - client0.system) * micro,
        "switches": (switches(pids) - switches0) / requests,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--kind", choices=("stat", "open"), default="stat")
    parser.add_argument("--requests", type=int, default=3000, help="per block (default 3000)")
    parser.add_argument("--rounds", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument("--pin", choices=("none", "same", "apart"), default="none")
    parser.add_argument("--source", default=str(REPO_ROOT),
                        help="the lightd-sftp tree to run (default: this checkout)")
    parser.add_argument("--rev", help="a revision of this repository to run instead")
    parser.add_argument("--workdir", default=str(BENCH_DIR),
                        help="root-owned folder for the work files (default: beside this file)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.pin != "none" and os.cpu_count() < 2:
        print("bench: --pin needs two CPUs", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = None
    servers: List[Server] = []
    sessions = []
    made_run_sshd = False
    try:
        ensure_sshd()
        base = Path(args.workdir).resolve()
        check_chroot_path(base)
        work = Path(tempfile.mkdtemp(prefix=".cost-", dir=base))
        work.chmod(0o755)
        if not os.path.isdir("/run/sshd"):
            os.makedirs("/run/sshd", mode=0o755)
            made_run_sshd = True
        servers = [Lightd(work / "lightd", source_tree(args.source, args.rev, work / "source")),
                   OpenSSH(work / "openssh")]
        for server in servers:
            server.start()
            (server.volume / "data").mkdir(mode=0o755, exist_ok=True)
            (server.volume / "data" / "stat.txt").write_bytes(b"stat me\n")
        if args.pin != "none":
            os.sched_setaffinity(0, {0})  # paramiko's transport threads inherit it
        held = {}
        for server in servers:
            transport, sftp = session(server)
            sessions.append(transport)
            held[server.name] = sftp
        if args.pin != "none":
            for server in servers:
                pin(server_pids(server), 0 if args.pin == "same" else 1)
        info = machine()
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
        print(f"{info['date']}; {info['nproc']} x {info['cpu']}; kernel {info['kernel']}; "
              f"{info['openssh']}; {args.kind}, {args.requests} requests a block, "
              f"{args.rounds} rounds, pin {args.pin}; load average {load}", flush=True)
        results: Dict[str, List[Dict[str, float]]] = {s.name: [] for s in servers}
        for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
            order = servers if round_ % 2 == 0 else servers[::-1]
            for server in order:
                figures = block(server, held[server.name], args.kind, args.requests)
                if round_:
                    results[server.name].append(figures)
                    print(f"  round {round_}: {server.name:8} " + "  ".join(
                        f"{name} {figures[name]:6.1f}" for name in FIELDS), flush=True)
        print()
        print(f"per request, medians of {args.rounds} rounds (µs; switches per request):")
        print(f"{'':10}" + "".join(f"{name:>10}" for name in FIELDS))
        for name, rows in results.items():
            print(f"{name:10}" + "".join(
                f"{statistics.median(row[field] for row in rows):10.1f}" for field in FIELDS))
        ratios = [a["wall"] / b["wall"] for a, b in zip(results["lightd"], results["OpenSSH"])]
        print(f"lightd/OpenSSH wall: median of the rounds' ratios {statistics.median(ratios):.2f}")
        print(f"load average at the end "
              f"{' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
        return 0
    except BenchError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    finally:
        for transport in sessions:
            transport.close()
        for server in reversed(servers):
            server.stop()
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if made_run_sshd:
            shutil.rmtree("/run/sshd", ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
