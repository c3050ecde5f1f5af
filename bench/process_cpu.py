"""CPU seconds of every process on the machine while a command runs, by kind (Linux).

    python -m bench.process_cpu [--every 0.2] [--top 25] -- COMMAND...
    python -m bench.process_cpu -- .venv/bin/python -m pytest -q -n 2 --no-loadscope-reorder

Reads ``/proc/PID/stat`` of every process every ``--every`` seconds while the command
runs and keeps each process's last CPU time (user + system); then prints wall seconds,
the CPU seconds of all processes that ran, their share of the machine's cores, and the
kinds that used the most (Ray actors by their ``ray::`` title, others by their first
words). A process that lives less than one interval can be missed, so the total is a
lower bound. Every process counts, not only the command's (Ray's daemons and a stack's
servers leave its process tree), so run it on an otherwise idle machine. What it
answers: whether a run is CPU-bound and which processes to cut (BENCHMARKS.md,
session 41: the suite).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def _snapshot() -> dict[tuple[int, int], tuple[float, str]]:
    """(pid, start tick) -> (CPU seconds, command line) of every readable process."""
    seen = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime
        seen[(int(entry.name), int(fields[19]))] = (cpu, command.strip())
    return seen


def kind_of(command: str) -> str:
    """``ray::Actor`` for Ray's workers, else the first three words without paths."""
    if command.startswith("ray::"):
        return command.split()[0][:60]
    return " ".join(word.rsplit("/", 1)[-1] for word in command.split()[:3])[:70] or "?"


def measure(command: list[str], every: float) -> tuple[float, Counter, Counter]:
    before = _snapshot()
    last: dict[tuple[int, int], tuple[float, str]] = {}
    began = time.monotonic()
    proc = subprocess.Popen(command)
    while proc.poll() is None:
        for key, (cpu, cmd) in _snapshot().items():
            last[key] = (cpu, cmd or last.get(key, (0.0, ""))[1])
        time.sleep(every)
    wall = time.monotonic() - began
    cpu_by_kind, count_by_kind = Counter(), Counter()
    for key, (cpu, cmd) in last.items():
        used = cpu - before.get(key, (0.0, ""))[0]
        if used > 0.05:
            cpu_by_kind[kind_of(cmd)] += used
            count_by_kind[kind_of(cmd)] += 1
    if proc.returncode:
        print(f"the command exited with {proc.returncode}", file=sys.stderr)
    return wall, cpu_by_kind, count_by_kind


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=float, default=0.2, help="seconds between reads")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    wall, cpu, count = measure(command, args.every)
    total = sum(cpu.values())
    print(f"wall {wall:.1f} s, CPU {total:.1f} s of all processes, "
          f"{total / (wall * os.cpu_count()):.0%} of {os.cpu_count()} cores")  # fmt: skip
    for kind, seconds in cpu.most_common(args.top):
        print(f"{seconds:8.1f} s  x{count[kind]:<4} {kind}")


if __name__ == "__main__":
    main()
