"""/metrics of a real `qmqpd serve`: the counters after real sessions, promtool's check, a
scraper that never asks does not hold up mail, and a real Prometheus scrapes the master.

127.0.0.x source addresses stand for different clients (127.0.0.6 is denied by the rules,
127.0.0.7 may hold one session at a time).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmqpd import metrics
from qmqpd.rules import compile_rules
from tests.integration.test_master import Server, begin, deliver, is_ok, wait_until
from tests.support import (
    PortTaken,
    port_clash,
    start_on_free_port,
    stop_process,
    wait_listening,
)
from tests.unit.test_metrics import promtool_check, samples

RULES = """\
127.0.0.6:deny
127.0.0.7:allow,MAXPERIP="1"
127.:allow
:deny
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, int]]:
    """A server with METRICS on; (server, metrics port)."""
    (tmp_path / "tcp.qmqp").write_text(RULES)
    compile_rules(str(tmp_path / "tcp.qmqp"), str(tmp_path / "tcp.qmqp.cdb"))

    def start(metrics_port: int) -> Server:
        server = Server(tmp_path, rules=str(tmp_path / "tcp.qmqp.cdb"), prefork=2,
                        metrics=f"127.0.0.1:{metrics_port}")
        try:
            return server.start()
        except AssertionError:  # Server.start retries its PORT; METRICS's is ours to retry
            if port_clash(server.log()):
                raise PortTaken(server.log()) from None
            raise

    started = start_on_free_port(start)
    yield started, int(started.settings["metrics"].rsplit(":", 1)[1])  # type: ignore[union-attr]
    started.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return answer.read().decode()


def denied(port: int, source: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.settimeout(10)
        assert sock.recv(100) == b""  # closed without a word


def test_counters_after_real_sessions(served: tuple[Server, int]) -> None:
    server, port = served
    for _ in range(3):
        assert is_ok(deliver(server.port, "127.0.0.2"))
    denied(server.port, "127.0.0.6")
    held = begin(server.port, "127.0.0.7")  # its one session; the next is over MAXPERIP
    try:
        refused = deliver(server.port, "127.0.0.7")
    finally:
        held.close()  # the held session ends without an answer
    assert b":Z" in refused, refused

    def counted() -> dict[str, float] | None:
        found = samples(scrape(port))
        done = (found.get('qmqpd_answers_total{answer="K"}') == 3
                and found.get('qmqpd_answers_total{answer="none"}') == 1
                and found.get('qmqpd_connections_total{result="denied"}') == 1)
        return found if done else None

    found = wait_until(counted, seconds=15, what="3 K, 1 without answer, 1 denied in /metrics")
    assert isinstance(found, dict)
    assert found['qmqpd_connections_total{result="handed"}'] == 4
    assert found['qmqpd_connections_total{result="refused_perip"}'] == 1
    assert found['qmqpd_refused_by_ip_total{ip="127.0.0.6",reason="denied"}'] == 1
    assert found['qmqpd_refused_by_ip_total{ip="127.0.0.7",reason="refused_perip"}'] == 1
    # times measured by the workers: every session has one, only the 3 queued a commit
    assert found["qmqpd_session_seconds_count"] == 4
    assert found['qmqpd_session_seconds_bucket{le="+Inf"}'] == 4
    assert found["qmqpd_session_seconds_sum"] > 0
    assert found["qmqpd_queue_commit_seconds_count"] == 3
    assert 0 < found["qmqpd_queue_commit_seconds_sum"] <= found["qmqpd_session_seconds_sum"]
    assert found["qmqpd_waiting_connections"] == 0
    assert found["qmqpd_sessions_in_service"] == 0
    assert found["qmqpd_maxdaemons"] == 75
    assert found["qmqpd_accepting"] == 1
    assert found[f'qmqpd_queue_free_bytes{{queue="{server.queue}"}}'] > 0
    assert found['qmqpd_workers{state="idle"}'] >= 1
    done = promtool_check(scrape(port))
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_silent_scraper_does_not_hold_up_mail(served: tuple[Server, int]) -> None:
    server, port = served
    silent = [socket.create_connection(("127.0.0.1", port), timeout=5)
              for _ in range(metrics.MAX_CLIENTS)]
    try:
        assert is_ok(deliver(server.port, "127.0.0.2"))
        with pytest.raises((urllib.error.URLError, ConnectionError, TimeoutError)):
            scrape(port)  # every scrape slot is taken: refused at once, not queued
    finally:
        for sock in silent:
            sock.close()
    assert 'answer="K"} 1.0' in wait_until(lambda: _scrape_or_empty(port), what="a scrape")


def _scrape_or_empty(port: int) -> str:
    try:
        return scrape(port)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return ""


def test_a_real_prometheus_scrapes_the_master(served: tuple[Server, int], tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        raise RuntimeError("prometheus is not installed: run tests/install-and-run.sh")
    server, port = served
    for _ in range(4):
        assert is_ok(deliver(server.port, "127.0.0.2"))
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: qmqpd\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{port}']\n")
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below

    def start(web: int) -> tuple[subprocess.Popen[bytes], int]:
        mark = log.tell()
        proc = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{web}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=tmp_path)
        wait_listening(proc, lambda: (tmp_path / "prometheus.log").read_text()[mark:],
                       seconds=90, ready="Listening on")
        return proc, web

    try:
        proc, web = start_on_free_port(start)
    except BaseException:
        log.close()
        raise
    query = urllib.parse.quote('qmqpd_answers_total{answer="K"}')

    def accepted() -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}/api/v1/query?query={query}",
                                        timeout=5) as answer:
                data = json.load(answer)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        # Generous: Prometheus starts, replays an empty WAL and scrapes on a loaded machine.
        value = wait_until(lambda: accepted() == 4 and 4, seconds=90,
                           what="Prometheus to return qmqpd's accepted counter")
        assert value == 4
    finally:
        stop_process(proc)
        log.close()
    assert proc.returncode == 0, (tmp_path / "prometheus.log").read_text()[-2000:]
