"""What the stage and master benchmarks share: a free port, waiting for `qmqpd serve` to
listen, driving it with Postfix's qmqp-source, reading a process's CPU time, and stopping
it by PID.

Imported as `bench.benchlib` (the repository root on sys.path) by bench/dkim.py,
bench/master_cpu.py and bench/virus.py; bench/serve_vs_postfix.py keeps its own. It starts
nothing it does not return, and never reads the product's internals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

QMQP_SOURCE = "/usr/sbin/qmqp-source"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The run cannot give a figure: the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, seconds: float = 20.0) -> None:
    """Until 127.0.0.1:port accepts; BenchError when the process exits first or time runs out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError("qmqpd serve exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f}s")


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


def stop_process(process: subprocess.Popen, seconds: float = 30.0) -> None:
    """TERM, then KILL if it has not exited within seconds; reaped either way."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
