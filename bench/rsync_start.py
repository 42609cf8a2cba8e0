#!/usr/bin/env python3
"""
How long an rsync session takes to start: from the exec request to rsync's
first answer to the client's protocol version.

    python3 bench/rsync_start.py [--runs 21] [--root PATH]

Starts lightd-sftp on loopback (from PATH, default this checkout) with one
container, logs in once with paramiko, then per run opens a channel, execs
``rsync --server --sender -e.LsfxCIvu . f``, sends protocol version 31 at
once and times the arrival of rsync's version (bubblewrap and rsync have
started) and of the next bytes (rsync has read the client's version: with
the volume as the sandbox's root, that is after the root is made).  Prints
the median and spread of both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import paramiko

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(folder: str, root: str):
    config = os.path.join(folder, "config.json")
    with open(config, "w") as f:
        json.dump({"server": {"host": "127.0.0.1", "port": 0},
                   "sftp": {"host": "127.0.0.1", "port": 0, "bcrypt_cost": 4}}, f)
    env = dict(os.environ, PYTHONPATH=root)
    created = subprocess.run(
        [sys.executable, "-m", "lightd_conch.cli", "--config", config, "credentials",
         "generate", "demo", "--create-volume", "--json"],
        env=env, check=True, capture_output=True, timeout=60, cwd=folder,
    )
    password = json.loads(created.stdout)["password"]
    log = os.path.join(folder, "service.log")
    process = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
         "--pidfile=", f"--logfile={log}", "lightd-sftp", "--config", config],
        env=env, cwd=folder,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(log):
            match = re.search(r"SFTP listening on \S+ port (\d+)", open(log).read())
            if match:
                return process, int(match.group(1)), password
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the service did not start; see " + log)


def session(transport) -> "tuple[float, float]":
    channel = transport.open_session()
    channel.settimeout(30)
    began = time.perf_counter()
    channel.exec_command(b"rsync --server --sender -e.LsfxCIvu . f")
    channel.sendall(struct.pack("<i", 31))
    got = b""
    while len(got) < 4:
        got += channel.recv(4 - len(got))
    version = time.perf_counter() - began
    more = channel.recv(1)
    answered = time.perf_counter() - began
    if not more:
        raise SystemExit("rsync ended without answering")
    channel.close()
    return version, answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--root", default=ROOT)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lightd-rsync-")
    process, port, password = start(folder, args.root)
    try:
        with open(os.path.join(folder, "storage", "volumes", "demo", "f"), "wb") as f:
            f.write(b"x" * 1000)
        transport = paramiko.Transport(("127.0.0.1", port))
        transport.start_client(timeout=30)
        transport.auth_password("demo", password)
        results = [session(transport) for _ in range(args.runs)]
        transport.close()
        print(f"rsync session start, {args.runs} runs, code from {args.root} (seconds):")
        for index, name in enumerate(("rsync's version", "rsync's answer")):
            values = sorted(r[index] for r in results)
            print(f"  {name:16} median {statistics.median(values):.4f}"
                  f"  min {values[0]:.4f}  max {values[-1]:.4f}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
