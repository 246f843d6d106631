#!/usr/bin/env python3
"""CPU the `qmqpd serve` master spends per message: accept, rules, per-IP, the wait for the
request, the hand-off, the done record, counters, title, status file and log lines.

It starts one `qmqpd serve` on 127.0.0.1 (USE_FSYNC and USE_SYNCDIR on, the default
MAXPERIP with a tcprules rule giving 127.0.0.1 the sessions of the run), drives N messages
into it with Postfix's qmqp-source, and reads the master's own user+system CPU from
/proc/PID/stat before and after (its children are not counted). CPU time of one process
depends little on what else runs on the machine, unlike wall-clock rates; the 1-minute
load average is printed with the figures all the same.

`--profile FILE` runs the master under cProfile (its workers exit without writing) and
saves the profile at its exit, for `python -m pstats FILE`.

Everything runs in a temporary directory and is stopped by PID, also on error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchlib import (
    CLK_TCK,
    QMQP_SOURCE,
    BenchError,
    cpu_seconds,
    loopback_rules,
    qmqp_source,
    start_qmqpd,
)

SENDER = "bench@example.com"
RECIPIENT = "sink@example.net"
STOP_TIMEOUT = 30.0
# The master under cProfile counting its own CPU time (not wall time: on a busy machine a
# call that wakes a worker would look slow while the master merely waited for the core).
PROFILED = """
import cProfile, runpy, sys, time
out = sys.argv[1]
sys.argv = ["qmqpd", *sys.argv[2:]]
profiler = cProfile.Profile(time.process_time)
try:
    profiler.runcall(runpy.run_module, "qmqpd", run_name="__main__")
finally:
    profiler.dump_stats(out)
"""


def send(port: int, messages: int, sessions: int, length: int) -> None:
    qmqp_source(port, messages, sessions, length, SENDER, RECIPIENT, timeout=600)


def measure(command: list[str], root: Path, messages: int, sessions: int, length: int,
            profile: str | None) -> tuple[float, float]:
    """Master (user, system) CPU seconds per message for one run of `messages`."""
    if profile and command[1:3] != ["-m", "qmqpd"]:
        raise BenchError("--profile needs the qmqpd command to be PYTHON -m qmqpd")
    root.mkdir()
    queue = root / "queue"
    subprocess.run([*command, "queue", "create", str(queue)], check=True,
                   stdout=subprocess.DEVNULL, cwd=root)
    rules = loopback_rules(command, root, sessions)
    # python -m qmqpd ... -> python -c PROFILED FILE ...
    qmqpd = [command[0], "-c", PROFILED, profile] if profile else command
    server = start_qmqpd(root, qmqpd, queuedir=str(queue), use_fsync=True, use_syncdir=True,
                         maxdaemons=max(8, sessions), prefork=max(2, sessions),
                         rules=str(rules))
    try:
        send(server.port, 20, 1, length)  # warm up: workers started, code paths loaded
        before = cpu_seconds(server.pid)
        send(server.port, messages, sessions, length)
        after = cpu_seconds(server.pid)
    finally:
        server.stop(STOP_TIMEOUT)
    accepted = server.log().count(' answer="K')
    if accepted < messages + 20:
        raise BenchError(f"only {accepted} of {messages + 20} messages accepted; "
                         f"see {server.log_path}")
    return (after[0] - before[0]) / messages, (after[1] - before[1]) / messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--messages", type=int, default=2000)
    parser.add_argument("-s", "--sessions", type=int, default=8)
    parser.add_argument("-l", "--length", type=int, default=2048)
    parser.add_argument("-r", "--runs", type=int, default=3, help="runs; the median is shown")
    parser.add_argument("--qmqpd", help="command that runs qmqpd (default: this python -m qmqpd)")
    parser.add_argument("--profile", help="cProfile output file of the master (one run)")
    args = parser.parse_args(argv)
    if not os.access(QMQP_SOURCE, os.X_OK):
        sys.exit(f"master_cpu: {QMQP_SOURCE} not found (Debian package postfix)")
    command = args.qmqpd.split() if args.qmqpd else [sys.executable, "-m", "qmqpd"]
    runs = 1 if args.profile else args.runs
    per_message: list[float] = []
    user: list[float] = []
    with tempfile.TemporaryDirectory(prefix="master-cpu-") as tmp:
        for run in range(runs):
            try:
                run_user, run_system = measure(command, Path(tmp) / f"run{run}",
                                               args.messages, args.sessions, args.length,
                                               args.profile)
                per_message.append(run_user + run_system)
                user.append(run_user)
            except BenchError as error:
                sys.exit(f"master_cpu: {error}")
    load = os.getloadavg()[0]
    runs_text = " ".join(f"{value * 1e6:.0f}" for value in per_message)
    print(f"master CPU per message: {statistics.median(per_message) * 1e6:.0f} us "
          f"(median of {runs}: {runs_text} us; user share "
          f"{statistics.median(user) / statistics.median(per_message):.0%}; "
          f"{args.messages} messages, "
          f"{args.sessions} sessions, {args.length} bytes; load average {load:.2f}; "
          f"CPU clock tick {1e3 / CLK_TCK:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
