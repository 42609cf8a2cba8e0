#!/usr/bin/env python3
"""
Run a server as the child of a subreaper, so that all the CPU of its processes can be counted.

    python3 bench/subreaper.py STATUS -- COMMAND [ARG]...

sshd forks per connection and again per session, in new sessions of their own; a process whose
parent exits before it is reparented, normally to init, and its CPU time is then lost to the
parent's tree.  This parent calls prctl(PR_SET_CHILD_SUBREAPER, 1) before it starts COMMAND,
so every orphan of COMMAND's tree is reparented to it instead; it reaps each with os.wait4 and
adds the child's rusage (which holds the child's own times and those of the children the child
reaped) to a total it keeps in STATUS, rewritten after every reap as one line: the total CPU
seconds, the number of processes reaped, COMMAND's pid.

SIGTERM, SIGINT and SIGHUP are passed on to COMMAND.  Once COMMAND has exited, whatever is left
of its tree (sshd's sessions outlive its listener) gets SIGTERM, then SIGKILL 5 seconds later,
and is reaped; then this exits with COMMAND's status.

The bench side (tree_cpu, tree_pss) adds the processes still alive at a sample point: their
utime + stime as the scheduler counts it (nanoseconds, /proc/PID/task/*/schedstat) and the
children they reaped themselves (cutime + cstime of /proc/PID/stat).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

PR_SET_CHILD_SUBREAPER = 36
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- /proc, for the bench side --------------------------------------------------------------


def _stat_fields(pid: int) -> List[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def parents() -> Dict[int, int]:
    """Every process's parent pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found[int(entry)] = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                pass
    return found


def descendants(pid: int) -> List[int]:
    """The processes below ``pid``, at any depth (not ``pid`` itself)."""
    children: Dict[int, List[int]] = {}
    for child, parent in parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def live_cpu(pid: int) -> float:
    """CPU seconds of a live process: its threads' run time and the children it reaped."""
    try:
        fields = _stat_fields(pid)
        reaped = (int(fields[13]) + int(fields[14])) / CLK_TCK
        ns = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile: its time is in the process's
        return ns / 1e9 + reaped
    except (OSError, ValueError, IndexError):
        return 0.0  # gone: if it was ours, the subreaper counts it


def read_status(path: Path) -> Tuple[float, int, int]:
    """(CPU seconds of the processes reaped so far, how many, the server's pid)."""
    total, count, main = path.read_text().split()
    return float(total), int(count), int(main)


def tree_cpu(reaper: int, status: Path) -> float:
    """
    CPU seconds of every process the server ever had: those reaped by the subreaper, plus
    those alive now.  A process that ends during the scan may be counted twice or not at all;
    the scan is repeated (up to 5 times) until the reaped count did not change meanwhile.
    """
    for _ in range(5):
        before = read_status(status)
        alive = sum(live_cpu(pid) for pid in descendants(reaper))
        after = read_status(status)
        if before[1] == after[1]:
            break
    return after[0] + alive


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(reaper: int) -> Tuple[int, int]:
    """(PSS in KiB summed over every process below the subreaper, how many processes)."""
    pids = descendants(reaper)
    return sum(pss_kib(pid) for pid in pids), len(pids)


# --- the subreaper ----------------------------------------------------------------------------


def _write_status(path: Path, total: float, count: int, main: int) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(f"{total:.6f} {count} {main}\n")
    os.replace(temporary, path)


def main(argv: List[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    status, command = Path(argv[0]), argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
        return 1
    total, count = 0.0, 0
    server = os.posix_spawnp(command[0], command, os.environ)
    _write_status(status, total, count, server)
    exited = None

    def forward(signum, _frame):
        if exited is None:
            try:
                os.kill(server, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while exited is None:
        try:
            pid, code, usage = os.wait4(-1, 0)
        except ChildProcessError:
            break
        total += usage.ru_utime + usage.ru_stime
        count += 1
        _write_status(status, total, count, server)
        if pid == server:
            exited = code
    # What is left of the tree: TERM, then KILL, reaping as they go.
    started, killed = time.monotonic(), False
    for pid in descendants(os.getpid()):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    while True:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            if not descendants(os.getpid()):
                break
            pid = 0
        if pid:
            total += usage.ru_utime + usage.ru_stime
            count += 1
            _write_status(status, total, count, server)
            continue
        if time.monotonic() - started > 15:
            break  # unkillable (D state): leave it to init
        if not killed and time.monotonic() - started > 5:
            killed = True
            for pid in descendants(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.02)
    return os.waitstatus_to_exitcode(exited) if exited is not None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
