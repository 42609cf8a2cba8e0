#!/usr/bin/env python3
"""
Where the time goes, from py-spy's raw (folded) profiles that ``run.py --profile`` writes.

    python3 bench/profile_summary.py DIR/upload-same-*.txt [--top 25]

Each line of a raw profile is ``frame;frame;...;frame COUNT``, outermost frame first.
It prints, over all the files given, the share of the reactor thread's samples spent
*in* each function (self: the innermost frame) and *under* it (inclusive: anywhere on the
stack, leaving out the frames nearly every sample has), and the share it spent idle
(waiting in epoll), so a busy reactor and a waiting one are told apart.  Thread-pool
threads (bcrypt, the API) are counted apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

# "name (path/to/file.py:123)" -> "name (file.py)": one entry per function, not per line.
_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^():]*)(?::\d+)?\)$")
# Frames that mean "waiting for something to do".
_IDLE = ("doPoll", "select", "poll", "epoll", "wait (threading.py)", "_worker (threadpool")


def short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    return f"{match['name']} ({Path(match['file']).name})"


def load(paths):
    stacks = Counter()
    for path in paths:
        for line in Path(path).read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                stacks[tuple(short(f) for f in stack.split(";"))] += int(count)
    return stacks


def is_idle(stack) -> bool:
    leaf = stack[-1]
    return any(marker in leaf for marker in _IDLE)


def is_worker(stack) -> bool:
    """A thread started by threading (a thread pool's), not the reactor's main thread."""
    return stack[0].endswith("_bootstrap (threading.py)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profiles", nargs="+", help="py-spy --format raw files")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    stacks = load(args.profiles)
    workers = Counter({s: n for s, n in stacks.items() if is_worker(s)})
    reactor = Counter({s: n for s, n in stacks.items() if not is_worker(s)})
    total = sum(reactor.values())
    if not total:
        print("no samples of the reactor thread", file=sys.stderr)
        return 1
    idle = sum(n for s, n in reactor.items() if is_idle(s))
    busy = total - idle
    own, under = Counter(), Counter()
    for stack, n in reactor.items():
        if is_idle(stack):
            continue
        own[stack[-1]] += n
        for frame in set(stack):
            under[frame] += n
    workers_busy = sum(n for s, n in workers.items() if not is_idle(s))
    print(f"reactor thread: {total} samples, {busy} busy ({100 * busy / total:.0f}%), "
          f"{idle} idle in epoll ({100 * idle / total:.0f}%); "
          f"thread pools: {workers_busy} busy samples. Shares below are of reactor busy samples.")
    print(f"\nself (the function itself, not what it calls), top {args.top}:")
    for frame, n in own.most_common(args.top):
        print(f"  {100 * n / busy:5.1f}%  {frame}")
    print(f"\ninclusive (the function and all it calls), top {args.top}, "
          f"without frames on over 90% of samples:")
    for frame, n in [(f, n) for f, n in under.most_common() if n <= 0.9 * busy][: args.top]:
        print(f"  {100 * n / busy:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
