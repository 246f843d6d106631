"""What the stage and master benchmarks share: `qmqpd serve` started through the tests'
controller (tests/serve_process.py), a rules cdb that gives the load generator what a run
needs, driving the server with Postfix's qmqp-source and reading a process's CPU time.

Imported as `bench.benchlib` (the repository root on sys.path) by bench/dkim.py,
bench/master_cpu.py and bench/virus.py; bench/serve_vs_postfix.py keeps its own helpers
and shares the controller. It starts nothing it does not return, and never reads the
product's internals.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.serve_process import ServeFailed, ServeProcess

QMQP_SOURCE = "/usr/sbin/qmqp-source"
CLK_TCK = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 20.0


class BenchError(Exception):
    """The run cannot give a figure: the message says why."""


def start_qmqpd(directory: Path, qmqpd: Sequence[str] | None = None, name: str = "qmqpd",
                **settings: object) -> ServeProcess:
    """`qmqpd serve` on 127.0.0.1 with settings, its config, log and status file in
    directory, listening; BenchError with the controller's hint (exit code, likely cause,
    log tail) when it does not start. Run as root (a bench run with sudo), qmqpd is told
    so (allow_root): the operator's environment has no ALLOW_ROOT. Its own session, so a
    Ctrl-C reaches the bench, which stops the server in order."""
    server = ServeProcess(directory, qmqpd=qmqpd, name=name, new_session=True,
                          **{"localip": "127.0.0.1", "allow_root": os.geteuid() == 0,
                             **settings})
    try:
        return server.start(seconds=START_TIMEOUT)
    except ServeFailed as failed:
        raise BenchError(str(failed)) from None


def loopback_rules(qmqpd: Sequence[str], directory: Path, sessions: int) -> Path:
    """A rules cdb that lets 127.0.0.1 (the load generator) hold the run's sessions and a
    few connections it has closed that the master has not yet counted out, and denies
    everyone else: MAXPERIP stays on, at its default, for every other client."""
    text, cdb = directory / "tcp.qmqp", directory / "tcp.qmqp.cdb"
    text.write_text(f'127.0.0.1:allow,MAXPERIP="{sessions + max(4, sessions // 4)}"\n:deny\n')
    subprocess.run([*qmqpd, "rules", "compile", str(text), str(cdb)], check=True,
                   stdout=subprocess.DEVNULL, cwd=directory)
    return cdb


def qmqp_source(port: int, messages: int, sessions: int, length: int, sender: str,
                recipient: str, timeout: float = 3600) -> None:
    """`messages` of `length` bytes with `sessions` in flight; BenchError if it fails."""
    command = [QMQP_SOURCE, "-m", str(messages), "-s", str(sessions), "-l", str(length),
               "-f", sender, "-t", recipient, f"127.0.0.1:{port}"]
    result = subprocess.run(command, capture_output=True, timeout=timeout)
    if result.returncode != 0:
        raise BenchError(f"qmqp-source failed: {result.stderr.decode(errors='replace')}")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process, children not included."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # after the comm field: state is fields[0], utime and stime are fields[11] and [12]
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
