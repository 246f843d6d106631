"""Fixtures shared by the test modules: an empty queue, tcpserver-run sessions, ipc pairs."""

from __future__ import annotations

import io
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmqpd import ipc, log
from qmqpd.queue import create_queue
from tests.support import TcpServerSession

# `qmqpd serve` and `qmqpd check` started as root refuse to run without USER; the suite's
# servers run as whoever runs the suite, on purpose (subprocesses inherit this).
if os.geteuid() == 0:
    os.environ.setdefault("ALLOW_ROOT", "1")


@pytest.fixture
def events() -> Iterator[io.StringIO]:
    """The event lines the code under test logs."""
    stream = io.StringIO()
    log.set_stream(stream)
    yield stream
    log.set_stream(sys.stderr)


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    """An empty qmail queue (flat todo, split 23) in the test's temp dir."""
    path = tmp_path / "queue"
    create_queue(str(path))
    return path


@pytest.fixture
def tcpserver_sessions(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], TcpServerSession]]:
    """Start Debian's tcpserver running `qmqpd session` with an env; all stopped at the end."""
    started: list[TcpServerSession] = []

    def start(env: dict[str, str]) -> TcpServerSession:
        session = TcpServerSession(env, tmp_path / f"server{len(started)}.log")
        started.append(session)
        return session

    yield start
    for session in started:
        session.stop()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A master/worker channel pair, closed after the test."""
    master_end, worker_end = ipc.channel_pair()
    yield master_end, worker_end
    master_end.close()
    worker_end.close()
