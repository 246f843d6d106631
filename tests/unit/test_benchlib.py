"""bench/benchlib.py, the helpers the stage and master benchmarks share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from bench.benchlib import BenchError, cpu_seconds, free_port, stop_process, wait_for_port


def test_cpu_seconds_counts_this_process_alone() -> None:
    user, system = cpu_seconds(os.getpid())
    stop = time.process_time() + 0.05
    while time.process_time() < stop:
        pass
    after = cpu_seconds(os.getpid())
    assert user >= 0 and system >= 0
    assert sum(after) >= user + system


def test_wait_for_port_stops_when_the_server_exits() -> None:
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    try:
        with pytest.raises(BenchError, match="exited during start-up"):
            wait_for_port(free_port(), process, 30)
    finally:
        process.wait()


def test_wait_for_port_returns_once_something_listens() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            wait_for_port(listener.getsockname()[1], sleeper, 30)
        finally:
            stop_process(sleeper)


def test_stop_process_kills_what_ignores_term() -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"ready\n"
    stop_process(process, 0.5)
    assert process.returncode == -9
    process.stdout.close()
