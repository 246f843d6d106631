"""tests/support.py's port helpers: eight test runs side by side never get the same port,
none is in the kernel's ephemeral range, and a server that loses its port is started
again on another."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import PortTaken, _ephemeral_range, free_port, port_clash, start_on_free_port

ROOT = Path(__file__).resolve().parents[2]
DRAW = "from tests.support import free_port\nprint(*(free_port() for _ in range(300)))\n"


def test_eight_runs_at_once_never_share_a_port() -> None:
    runs = [subprocess.Popen([sys.executable, "-c", DRAW], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True) for _ in range(8)]
    drawn = []
    for run in runs:
        out, _ = run.communicate(timeout=120)
        assert run.returncode == 0
        drawn += [int(port) for port in out.split()]
    assert len(drawn) == 8 * 300
    assert len(set(drawn)) == len(drawn)
    low = _ephemeral_range()[0]
    assert all(1024 <= port < low for port in drawn)


def test_a_port_in_use_is_never_drawn() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", free_port()))
        taken = held.getsockname()[1]
        # 2000 draws from ~20000 ports: the held one would come up about once in ten runs
        # if free_port did not probe; with the reservation it cannot come up twice anyway.
        assert taken not in {free_port() for _ in range(2000)}


def test_a_clash_means_another_port_and_other_errors_pass() -> None:
    tried: list[int] = []

    def start(port: int) -> int:
        tried.append(port)
        if len(tried) < 3:
            raise PortTaken("Address already in use")
        return port

    assert start_on_free_port(start) == tried[-1] and len(set(tried)) == 3

    def broken(port: int) -> int:
        raise ValueError("not a port problem")

    with pytest.raises(ValueError):
        start_on_free_port(broken)


@pytest.mark.parametrize(("said", "clash"), [
    ("qmqpd: [Errno 98] Address already in use", True),
    ("tcpserver: fatal: unable to bind: address already used", True),
    ("ERROR: TCP: Cannot bind to [127.0.0.1]:11475: Address already in use", True),
    ("[ALERT] Starting frontend qmqp: cannot bind socket (Address already in use)", True),
    ('err="listen tcp 127.0.0.1:9090: bind: address already in use"', True),
    ("qmqpd: QUEUEDIR: No such file or directory", False),
])
def test_port_clash_reads_each_server(said: str, clash: bool) -> None:
    assert port_clash(said) is clash
