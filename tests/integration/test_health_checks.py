"""A balancer's health checks are counted and logged as health checks, not as sessions.

A real `qmqpd serve` with PORT, PROXY_SOCKET and METRICS on. Health checks: the shipped
HAProxy check's probe (an empty request, `6:0:,0:,,`) sent plainly on PORT and after a
PROXY v2 LOCAL header on PROXY_SOCKET, and PROXY LOCAL connections that send nothing
(HAProxy's plain TCP check). Each probe is answered exactly as before (the D that
HAProxy expects, nothing queued) but counted in health_checks (status file, `qmqpd
status`, qmqpd_health_checks_total) and logged as one `event=health` line: never in the
D answers, the session histogram or the dropped connections. A client's request with a
sender but no recipients is not the probe: still a D answer and a session.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmqpd.protocol import PROBE
from qmqpd.rules import compile_rules
from qmqpd.status import read_status
from tests.integration.test_master import ROOT, Server, deliver, is_ok, wait_until
from tests.integration.test_master_proxy import V2_LOCAL
from tests.support import PortTaken, exchange, port_clash, read_reply, request, start_on_free_port
from tests.unit.test_metrics import promtool_check, samples

RULES = "127.0.0.:allow\n:deny\n"
PROBE_ANSWER = b"29:Dno recipients given (#5.1.3),"
# probes on PORT, probes after LOCAL; LOCAL (and v1 UNKNOWN) connections sending nothing:
# closed at once, or held open until FIRST_BYTE_TIMEOUT
PLAIN, LOCAL, SILENT = 4, 3, 4


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, Path, int]]:
    """(server, its PROXY_SOCKET, its METRICS port)."""
    (tmp_path / "tcp.qmqp").write_text(RULES)
    compile_rules(str(tmp_path / "tcp.qmqp"), str(tmp_path / "tcp.qmqp.cdb"))
    run_dir = Path(tempfile.mkdtemp(prefix="qmqpd-health-"))  # a short unix socket path
    lb = run_dir / "lb.sock"

    def start(metrics_port: int) -> Server:
        server = Server(tmp_path, rules=str(tmp_path / "tcp.qmqp.cdb"), prefork=2,
                        proxy_socket=str(lb), metrics=f"127.0.0.1:{metrics_port}",
                        first_byte_timeout=1)
        try:
            return server.start()
        except AssertionError:
            if port_clash(server.log()):
                raise PortTaken(server.log()) from None
            raise

    server = start_on_free_port(start)
    try:
        yield server, lb, int(str(server.settings["metrics"]).rsplit(":", 1)[1])
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def over_unix(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return read_reply(sock)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        return str(answer.read().decode())


def test_probes_and_local_connections_are_health_checks(
        served: tuple[Server, Path, int]) -> None:
    server, lb, metrics_port = served
    for _ in range(PLAIN):
        assert exchange(server.port, PROBE) == PROBE_ANSWER
    for _ in range(LOCAL):
        assert over_unix(lb, V2_LOCAL + PROBE) == PROBE_ANSWER
    for header in (V2_LOCAL, V2_LOCAL, b"PROXY UNKNOWN\r\n"):
        assert over_unix(lb, header) == b""  # closed: nothing to answer
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:  # sends nothing more
        held.settimeout(10)
        held.connect(str(lb))
        held.sendall(V2_LOCAL)
        assert read_reply(held) == b""  # closed after FIRST_BYTE_TIMEOUT
    # not the probe: a client that names a sender but no recipient, and a real message
    no_rcpt = exchange(server.port, request(b"Subject: x\n\nbody\n", b"a@example.org", []))
    assert no_rcpt == PROBE_ANSWER  # the same D, but this one is a session
    assert is_ok(deliver(server.port))
    checks = PLAIN + LOCAL + SILENT
    status_file = str(server.tmp / "status.json")

    def settled() -> dict | None:
        status = read_status(status_file)
        answers = status["answers"]
        return status if (status.get("health_checks") == checks and answers["accepted"] == 1
                          and answers["rejected"] == 1) else None

    status = wait_until(settled, seconds=20, what=f"{checks} health checks in the status")
    assert isinstance(status, dict)
    assert status["answers"]["no_answer"] == 0
    assert status["connections"]["dropped"] == 0  # the silent LOCAL ones are checks
    assert server.queued() == 1  # only the real message
    found = samples(scrape(metrics_port))
    assert found["qmqpd_health_checks_total"] == checks
    assert found['qmqpd_answers_total{answer="D"}'] == 1
    assert found["qmqpd_session_seconds_count"] == 2  # the two sessions, no probe
    checked = promtool_check(scrape(metrics_port))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    shown = subprocess.run([sys.executable, "-m", "qmqpd", "status", "--config",
                            str(server.config_path)], capture_output=True, text=True,
                           timeout=60, check=False, cwd=ROOT)
    assert f"health checks since start: {checks}\n" in shown.stdout, shown.stdout
    assert "0 rejected (D)" not in shown.stdout and "1 rejected (D)" in shown.stdout
    log = server.log()
    health = [line for line in log.splitlines() if "event=health " in line]
    sessions = [line for line in log.splitlines() if "event=session " in line]
    assert len(health) == checks, health
    assert sum('answer="Dno recipients given' in line for line in health) == PLAIN + LOCAL
    assert sum("answer=none" in line for line in health) == SILENT
    assert sum("FIRST_BYTE_TIMEOUT" in line for line in health) == 1
    assert len(sessions) == 2, sessions
    assert sum('answer="Dno recipients given' in line for line in sessions) == 1
    assert sum('answer="Kok ' in line for line in sessions) == 1
    assert "event=drop" not in log
