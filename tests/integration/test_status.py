"""`qmqpd status` against a real `qmqpd serve`: K, Z and D answers, a denied client, two
sessions held open from one IP, a stage verdict, and the master's exit.

127.0.0.x source addresses stand for different clients; the rules give them different
settings (a QMAILQUEUE that fails for a Z, DKIM verification for a stage verdict).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qmqpd.rules import compile_rules
from tests.integration.test_master import ROOT, Server, begin, connect, deliver, wait_until
from tests.support import read_reply, request

RULES = """\
127.0.0.3:allow,QMAILQUEUE="/bin/false"
127.0.0.5:allow,DKIMVERIFY="",DNS_SERVERS="127.0.0.1:9"
127.0.0.6:deny
127.:allow
:deny
"""


def qmqpd_status(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qmqpd", "status", "--config", str(config), *options],
        capture_output=True, text=True, timeout=20, cwd=ROOT, check=False,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))


def status_json(server: Server) -> dict[str, Any]:
    done = qmqpd_status(server.config_path, "--json")
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def status_when(server: Server, check: Callable[[dict[str, Any]], object],
                what: str) -> dict[str, Any]:
    """The first status (written at most once a second) for which check holds."""
    found: dict[str, Any] = {}

    def probe() -> bool:
        found.clear()
        found.update(status_json(server))
        return bool(check(found))

    wait_until(probe, seconds=15, what=what)
    return found


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    (tmp_path / "tcp.qmqp").write_text(RULES)
    compile_rules(str(tmp_path / "tcp.qmqp"), str(tmp_path / "tcp.qmqp.cdb"))
    started = Server(tmp_path, rules=str(tmp_path / "tcp.qmqp.cdb"), prefork=2,
                     status_file=str(tmp_path / "run" / "status.json"))
    yield started.start()
    started.stop()


def send(port: int, source: str, recipient: bytes = b"rcpt@example.org") -> bytes:
    with connect(port, source) as sock:
        sock.sendall(request(b"Subject: status\n\nhello\n", b"sender@example.org", [recipient]))
        sock.shutdown(socket.SHUT_WR)
        return read_reply(sock)


def hold_open(port: int, source: str) -> socket.socket:
    """A session that has started its request (a worker has it) and then goes quiet."""
    return begin(port, source)


def test_status_counts_answers_clients_and_stages(server: Server) -> None:
    assert b":Kok " in deliver(server.port)
    assert b":Kok " in send(server.port, "127.0.0.5")
    assert send(server.port, "127.0.0.1", b"bad\0address@example.org").split(b":")[1][:1] == b"D"
    assert send(server.port, "127.0.0.3").split(b":")[1][:1] == b"Z"
    with connect(server.port, "127.0.0.6") as denied:
        assert read_reply(denied) == b""
    held = [hold_open(server.port, "127.0.0.4") for _ in range(2)]
    try:
        data = status_when(server, lambda d: d["workers"]["busy"] == 2
                           and d["answers"]["tempfailed"] == 1, "two busy workers")
        assert data["running"] is True and data["state"] == "running"
        assert data["pid"] == server.pid
        assert data["listen"] == [f"127.0.0.1:{server.port}"]
        assert data["maxdaemons"] == 75 and data["sessions"] == 2
        assert data["workers"]["total"] >= 4
        assert data["busiest"] == [{"ip": "127.0.0.4", "sessions": 2}]
        assert data["answers"]["accepted"] == 2 and data["answers"]["rejected"] == 1
        assert data["answers"]["no_answer"] == 0 and data["answers"]["worker_died"] == 0
        assert data["connections"]["handed"] == 6 and data["connections"]["denied"] == 1
        assert data["stages"]["dkim"]["accept"] == 1
        assert data["uptime"] >= 0

        text = qmqpd_status(server.config_path)
        assert text.returncode == 0, text.stderr
        assert f"qmqpd master pid {server.pid}, running" in text.stdout
        assert f"listening on 127.0.0.1:{server.port}" in text.stdout
        assert "2 busy" in text.stdout and "MAXDAEMONS 75" in text.stdout
        assert "  127.0.0.4 2" in text.stdout
        assert "2 accepted (K), 1 tempfailed (Z), 1 rejected (D)" in text.stdout
        assert "1 denied by rules" in text.stdout
        assert "stage dkim: 1 accept" in text.stdout
    finally:
        for sock in held:
            sock.close()

    data = status_when(server, lambda d: d["answers"]["no_answer"] == 2, "the closed sessions")
    assert data["workers"]["busy"] == 0 and data["busiest"] == []


def test_status_after_the_master_stopped(server: Server) -> None:
    assert b":Kok " in deliver(server.port)
    status_when(server, lambda d: d["answers"]["accepted"] == 1, "the first answer")
    server.stop()
    done = qmqpd_status(server.config_path)
    assert done.returncode == 1
    assert f"qmqpd master pid {server.pid} is not running" in done.stdout
    assert "state stopped" in done.stdout and "1 accepted (K)" in done.stdout


def test_status_without_a_status_file(tmp_path: Path) -> None:
    config = tmp_path / "qmqpd.toml"
    config.write_text(f'status_file = "{tmp_path / "none.json"}"\n')
    done = qmqpd_status(config)
    assert done.returncode == 111 and "none.json" in done.stderr
