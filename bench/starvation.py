#!/usr/bin/env python3
"""
Can one container starve the others?

    python3 bench/starvation.py [--sessions 32] [--channels 10] [--reads 16]
                                [--runs 9] [--cost 10] [--repo PATH]

Starts lightd-sftp (the code in --repo, this checkout by default) on loopback
with two containers.  The first, "hog", logs in --sessions times (one more
is tried too, to see whether it is refused) and opens --channels sftp
channels on each; every channel opens a 4 MiB file and pipelines --reads
READs of 255 KiB while its client window stays at 4 KiB and is never
adjusted: a slow reader whose replies the daemon must queue or hold back.
Once the daemon has read what it will, the script prints its open
descriptors (/proc/PID/fd) and RSS, then times --runs logins of the second
container, "other", each followed by an ``ls`` of its folder (OPENDIR,
READDIR until EOF), and prints their median and spread, beside the same
measured on the idle daemon before the first container logged in (so a busy
machine shows as such in both).

Run it on a checkout of main and on this branch to compare; the README's
"Protocol robustness and bounded memory" section quotes its figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.harness import (  # noqa: E402
    FXP_HANDLE,
    FXP_INIT,
    FXP_NAME,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_READDIR,
    FXP_STATUS,
    FXP_VERSION,
    PFLAG_READ,
    attrs,
    packet,
    string,
    uint32,
    uint64,
)
from tests.rawssh import (  # noqa: E402
    MSG_CHANNEL_DATA,
    MSG_CHANNEL_FAILURE,
    MSG_CHANNEL_SUCCESS,
    Disconnected,
    RawSSH,
    channel_request,
    parse_string,
)

READ_SIZE = 255 * 1024
FILE_SIZE = 4 * 2**20


def start(folder: str, repo: str, cost: int):
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
                    "max_startups": 1024,
                    "max_startups_per_ip": 1024,
                },
            },
            f,
        )
    env = dict(os.environ, PYTHONPATH=repo)
    logins = {}
    for container in ("hog", "other"):
        result = subprocess.run(
            [sys.executable, "-m", "lightd_conch.cli", "--config", config, "credentials",
             "generate", container, "--create-volume", "--json"],
            env=env, check=True, capture_output=True, text=True, timeout=60, cwd=folder,
        )
        logins[container] = json.loads(result.stdout)
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
                return process, int(match.group(1)), logins
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the service did not start; see " + log)


class Channel:
    """One sftp channel of a RawSSH connection, replies read in order."""

    def __init__(self, ssh: RawSSH, local_id: int, window: int):
        self.ssh = ssh
        self.id = ssh.open_session(window=window, local_id=local_id)
        if self.id is None:
            raise RuntimeError("channel refused")
        ssh.start_sftp(self.id)
        self.buffer = bytearray()
        self.send(packet(FXP_INIT, uint32(3)))
        kind, _ = self.reply()
        assert kind == FXP_VERSION, kind

    def send(self, data: bytes) -> None:
        self.ssh.send_data(self.id, data)

    def reply(self):
        while True:
            if len(self.buffer) >= 4:
                size = int.from_bytes(self.buffer[:4], "big")
                if len(self.buffer) >= 4 + size:
                    body = bytes(self.buffer[4 : 4 + size])
                    del self.buffer[: 4 + size]
                    return body[0], body[1:]
            message = self.ssh.read_until(MSG_CHANNEL_DATA)
            self.buffer += parse_string(message, 5)[0]


def stall(port: int, login: dict, channels: int, reads: int) -> RawSSH:
    """
    One logged-in connection of stalled slow-reader channels.  Each
    channel's INIT, OPEN and READs go in one write, without waiting for a
    reply: a container at its output limit answers nothing more, and an
    attacker would not wait.  The READs name the handle the service gives
    a session's first OPEN ("1").
    """
    ssh = RawSSH(port, timeout=30)
    ssh.login(login["username"], login["password"])
    requests = (
        packet(FXP_INIT, uint32(3))
        + packet(FXP_OPEN, uint32(1) + string("/big") + uint32(PFLAG_READ) + attrs())
        + b"".join(
            packet(FXP_READ, uint32(2 + k) + string(b"1")
                   + uint64(k * READ_SIZE % FILE_SIZE) + uint32(READ_SIZE))
            for k in range(reads)
        )
    )
    for local_id in range(channels):
        channel = ssh.open_session(window=4096, local_id=local_id)
        if channel is None:
            break  # over the channel limit
        ssh.send(channel_request(channel, b"subsystem", string(b"sftp")))
        reply = ssh.read_until(MSG_CHANNEL_SUCCESS, MSG_CHANNEL_FAILURE)
        if reply[0] != MSG_CHANNEL_SUCCESS:
            continue  # over the descriptor limit
        ssh.send_data(channel, requests)
    return ssh


def loginAndList(port: int, login: dict) -> float:
    began = time.perf_counter()
    ssh = RawSSH(port, timeout=30)
    try:
        ssh.login(login["username"], login["password"])
        channel = Channel(ssh, 0, window=2 * 2**20)
        channel.send(packet(FXP_OPENDIR, uint32(1) + string("/")))
        kind, body = channel.reply()
        assert kind == FXP_HANDLE, kind
        handle = parse_string(body, 4)[0]
        while True:
            channel.send(packet(FXP_READDIR, uint32(2) + string(handle)))
            kind, _ = channel.reply()
            if kind != FXP_NAME:
                assert kind == FXP_STATUS, kind
                break
        return time.perf_counter() - began
    finally:
        ssh.close()


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def status(pid: int):
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return len(os.listdir(f"/proc/{pid}/fd")), rss / 1024


def report(what: str, times, args) -> None:
    ms = sorted(t * 1000 for t in times)
    print(
        f"{what}: median {statistics.median(ms):.1f} ms, min {ms[0]:.1f}, max {ms[-1]:.1f}"
        f" ({args.runs} runs, bcrypt cost {args.cost})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--reads", type=int, default=16)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--cost", type=int, default=10)
    parser.add_argument("--repo", default=ROOT)
    args = parser.parse_args()

    folder = tempfile.mkdtemp(prefix="lightd-starvation-")
    process, port, logins = start(folder, os.path.abspath(args.repo), args.cost)
    held = []
    try:
        with open(os.path.join(folder, "storage", "volumes", "hog", "big"), "wb") as f:
            f.write(os.urandom(FILE_SIZE))
        for n in range(5):
            with open(os.path.join(folder, "storage", "volumes", "other", f"file{n}"), "w") as f:
                f.write("x")
        loginAndList(port, logins["other"])  # what a first login sets up
        idleTimes = [loginAndList(port, logins["other"]) for _ in range(args.runs)]
        time.sleep(0.5)
        idleFds, idleRss = status(process.pid)
        print(f"idle: {idleFds} fds, RSS {idleRss:.1f} MiB")
        report("other container, login + ls, idle daemon", idleTimes, args)

        began = time.monotonic()
        for _ in range(args.sessions):
            held.append(stall(port, logins["hog"], args.channels, args.reads))
        try:
            held.append(stall(port, logins["hog"], args.channels, args.reads))
            extra = "accepted"
        except Disconnected as e:
            extra = f"refused ({e.description.decode()})"
        time.sleep(2)
        cpuBefore = cpuSeconds(process.pid)
        time.sleep(2)
        stalledCpu = cpuSeconds(process.pid) - cpuBefore
        fds, rss = status(process.pid)
        asked = args.sessions * args.channels * args.reads * READ_SIZE / 2**20
        print(
            f"hog: {args.sessions} sessions x {args.channels} stalled channels, "
            f"{args.reads} READs of 255 KiB each ({asked:.0f} MiB asked), set up in "
            f"{time.monotonic() - began:.1f}s; one session more: {extra}"
        )
        print(f"daemon while stalled: {fds} fds (+{fds - idleFds}), RSS {rss:.1f} MiB "
              f"(+{rss - idleRss:.1f} MiB), {stalledCpu:.2f} CPU seconds in 2 s")

        times = [loginAndList(port, logins["other"]) for _ in range(args.runs)]
        report("other container, login + ls, hog stalled", times, args)
        fds, rss = status(process.pid)
        print(f"daemon after: {fds} fds, RSS {rss:.1f} MiB")
    finally:
        for ssh in held:
            ssh.close()
        process.terminate()
        process.wait(30)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
