#!/usr/bin/env python3
"""
How long a failed login takes for a known and for an unknown user.

    python3 bench/login_timing.py [--runs 21] [--cost 10]

Starts lightd-sftp on loopback with a fresh store (bcrypt at --cost), makes one
container, then alternates failed password logins (paramiko, one connection
each, timed from the password request to the refusal) as the known user and as
a user that does not exist, and prints the median and spread of each.  The two
should match: an attacker must not learn which usernames exist from the time a
refusal takes.  The defender is turned off so the run is not banned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import paramiko

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(folder: str, cost: int):
    config = os.path.join(folder, "config.json")
    with open(config, "w") as f:
        json.dump(
            {
                "server": {"host": "127.0.0.1", "port": 0},
                "sftp": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "bcrypt_cost": cost,
                    "defender": {"enabled": False},
                    "max_auth_tries": 100,
                },
            },
            f,
        )
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run(
        [sys.executable, "-m", "lightd_conch.cli", "--config", config, "credentials",
         "generate", "known", "--create-volume", "--json"],
        env=env, check=True, capture_output=True, timeout=60,
    )
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
                return process, int(match.group(1))
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the service did not start; see " + log)


def failedLogin(port: int, username: str) -> float:
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=30)
        began = time.perf_counter()
        try:
            transport.auth_password(username, "not the password")
        except paramiko.AuthenticationException:
            return time.perf_counter() - began
        raise SystemExit("a wrong password was accepted")
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--cost", type=int, default=10)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lightd-login-")
    process, port = start(folder, args.cost)
    try:
        times = {"known": [], "unknown": []}
        for _ in range(args.runs):
            times["known"].append(failedLogin(port, "known"))
            times["unknown"].append(failedLogin(port, "nobody-by-this-name"))
        print(f"failed login, bcrypt cost {args.cost}, {args.runs} runs each (seconds):")
        for name, values in times.items():
            values.sort()
            print(
                f"  {name:8} median {statistics.median(values):.4f}"
                f"  min {values[0]:.4f}  max {values[-1]:.4f}"
            )
        difference = statistics.median(times["unknown"]) - statistics.median(times["known"])
        print(f"  unknown - known: {difference * 1000:+.1f} ms")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
