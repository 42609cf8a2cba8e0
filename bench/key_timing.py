#!/usr/bin/env python3
"""
How long a refused public key takes for a known and for an unknown user.

    python3 bench/key_timing.py [--runs 21]

Starts lightd-sftp on loopback (as login_timing.py does), gives the container "known" one
ed25519 key, then alternates signed public-key logins with another ed25519 key (paramiko signs
at once, one connection each, timed from the request to the refusal) as the known user and as a
user that does not exist, and prints the median and spread of each.  The two should match: a
key refusal must not tell an attacker which usernames exist.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import paramiko

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from login_timing import ROOT, start  # noqa: E402


def refusedKey(port: int, username: str, key) -> float:
    transport = paramiko.Transport(("127.0.0.1", port))
    try:
        transport.start_client(timeout=30)
        began = time.perf_counter()
        try:
            transport.auth_publickey(username, key)
        except paramiko.AuthenticationException:
            return time.perf_counter() - began
        raise SystemExit("a foreign key was accepted")
    finally:
        transport.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="lightd-keys-")
    process, port = start(folder, 4)
    try:
        own = os.path.join(folder, "own")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", own], check=True)
        subprocess.run(
            [sys.executable, "-m", "lightd_conch.cli", "--config",
             os.path.join(folder, "config.json"), "keys", "add", "known", own + ".pub"],
            env=dict(os.environ, PYTHONPATH=ROOT), check=True, capture_output=True, timeout=60,
        )
        other = os.path.join(folder, "other")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
        foreign = paramiko.Ed25519Key.from_private_key_file(other)
        times = {"known": [], "unknown": []}
        for _ in range(args.runs):
            times["known"].append(refusedKey(port, "known", foreign))
            times["unknown"].append(refusedKey(port, "nobody-by-this-name", foreign))
        print(f"refused public key (ed25519, signed), {args.runs} runs each (seconds):")
        for name, values in times.items():
            values.sort()
            print(
                f"  {name:8} median {statistics.median(values):.4f}"
                f"  min {values[0]:.4f}  max {values[-1]:.4f}"
            )
        difference = statistics.median(times["unknown"]) - statistics.median(times["known"])
        print(f"  unknown - known: {difference * 1000:+.2f} ms")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
