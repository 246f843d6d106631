"""The metrics exporter on its own: what it renders from the master's status, validated by
Debian's promtool; the bounded per-IP refusals; the HTTP side on a real loopback socket,
driven by a selector loop the way the master drives it."""

from __future__ import annotations

import selectors
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qmqpd import config as config_mod
from qmqpd import metrics
from qmqpd.status import SessionCounters


def master_status() -> dict[str, Any]:
    """A status as Master._status builds it, with counters fed like the master feeds them."""
    counters = SessionCounters()
    for _ in range(3):
        counters.connection("handed")
    counters.connection("denied")
    counters.connection("refused_perip")
    counters.session_ended("K", [("virus", "accept"), ("dkim", "accept")])
    counters.session_ended("K", [("virus", "accept")])
    counters.session_ended("Z", [("virus", "tempfail")])
    counters.worker_died()
    return {"version": 1, "pid": 1, "state": "running", "started": 1700000000.5,
            "listen": ["127.0.0.1:6280"], "maxdaemons": 75, "maxperip": 25, "prefork": 4,
            "generation": 1, "workers": {"starting": 0, "idle": 3, "busy": 1, "retiring": 0,
                                         "total": 4},
            "sessions": 1, "clients": 1, "busiest": [{"ip": "127.0.0.2", "sessions": 1}],
            **counters.as_dict()}


def samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample line."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        raise RuntimeError("promtool is not installed: run tests/install-and-run.sh "
                           "(Debian package prometheus)")
    return subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def exporter(tmp_path: Path) -> metrics.Exporter:
    return metrics.Exporter("127.0.0.1:0", master_status, lambda: [str(tmp_path), "/nonexistent"])


def test_rendered_counters_follow_the_master_status(exporter: metrics.Exporter) -> None:
    exporter.refused("127.0.0.6", "denied")
    exporter.observe_session(0.02)
    exporter.observe_session(3.0)
    exporter.observe_commit(0.004)
    found = samples(exporter.render().decode())
    assert found['qmqpd_answers_total{answer="K"}'] == 2
    assert found['qmqpd_answers_total{answer="Z"}'] == 1
    assert found['qmqpd_answers_total{answer="D"}'] == 0
    assert found['qmqpd_answers_total{answer="none"}'] == 0
    assert found['qmqpd_answers_total{answer="worker_died"}'] == 1
    assert found['qmqpd_stage_verdicts_total{stage="virus",verdict="tempfail"}'] == 1
    assert found['qmqpd_stage_verdicts_total{stage="virus",verdict="accept"}'] == 2
    assert found['qmqpd_connections_total{result="denied"}'] == 1
    assert found['qmqpd_connections_total{result="refused_perip"}'] == 1
    assert found['qmqpd_workers{state="idle"}'] == 3
    assert found["qmqpd_sessions_in_service"] == 1
    assert (found["qmqpd_maxdaemons"], found["qmqpd_maxperip"]) == (75, 25)
    assert found['qmqpd_refused_by_ip_total{ip="127.0.0.6",reason="denied"}'] == 1
    assert found["qmqpd_session_seconds_count"] == 2
    assert found['qmqpd_session_seconds_bucket{le="0.025"}'] == 1
    assert found["qmqpd_queue_commit_seconds_count"] == 1
    free = [v for k, v in found.items() if k.startswith("qmqpd_queue_free_bytes")]
    assert len(free) == 1 and free[0] > 0  # the missing queue is left out, not zero


def test_promtool_accepts_the_exposition(exporter: metrics.Exporter) -> None:
    for n in range(30):
        exporter.refused(f"192.0.2.{n}", "refused_perip")
    exporter.observe_session(0.5)
    done = promtool_check(exporter.render().decode())
    assert done.returncode == 0, done.stdout + done.stderr


def test_per_ip_series_stay_bounded() -> None:
    refusals = metrics.RefusalsByIp(tracked=100)
    for n in range(1000):
        refusals.add(f"10.0.{n // 256}.{n % 256}", "denied")
    for _ in range(50):
        refusals.add("10.9.9.9", "refused_perip")
    assert len(refusals.counts) <= 100
    top = refusals.top(10)
    assert len(top) == 10
    assert top[0] == ("10.9.9.9", "refused_perip", 50)


def test_queue_dirs_from_the_settings() -> None:
    multi = config_mod.load(environ={"QUEUE_BASE": "/q", "QUEUE_START": "2",
                                     "QUEUE_COUNT": "3"})
    assert metrics.queue_dirs(multi) == ["/q/queue2", "/q/queue3", "/q/queue4"]
    assert metrics.queue_dirs(config_mod.load(environ={"QUEUEDIR": "/one"})) == ["/one"]
    program = config_mod.load(environ={"QUEUEDIR": "/one", "QMAILQUEUE": "/bin/true"})
    assert metrics.queue_dirs(program) == []
    assert metrics.split_address("[::1]:9628") == ("::1", 9628)


# ---- the HTTP side --------------------------------------------------------------------
def _serve_until(exporter: metrics.Exporter, selector: selectors.BaseSelector,
                 client: socket.socket, seconds: float = 10) -> bytes:
    """Turn the loop like the master does while the client reads its whole answer."""
    client.setblocking(False)
    answer = b""
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        for key, _ in selector.select(0.05):
            assert exporter.owns(key.data)
            exporter.handle(key.data, time.monotonic())
        exporter.expire(time.monotonic())
        try:
            block = client.recv(65536)
        except BlockingIOError:
            continue
        except ConnectionResetError:  # closed with the client's bytes unread
            return answer
        if not block:
            return answer
        answer += block
    raise AssertionError("no complete answer")


@pytest.fixture
def served(exporter: metrics.Exporter):  # type: ignore[no-untyped-def]
    selector = selectors.DefaultSelector()
    exporter.open()
    exporter.register(selector)
    yield exporter, selector
    exporter.close()
    selector.close()


def _get(port: int, request: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(request)
    return sock


def test_get_metrics_over_http(served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    exporter, selector = served
    with _get(exporter.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") as sock:
        answer = _serve_until(exporter, selector, sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b'qmqpd_answers_total{answer="K"} 2.0' in body
    assert not exporter.scrapes


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
    (b"hello\r\n\r\n", b"400"),
])
def test_bad_requests_get_an_error(served: tuple[metrics.Exporter, selectors.BaseSelector],
                                   request_bytes: bytes, status: bytes) -> None:
    exporter, selector = served
    with _get(exporter.port, request_bytes) as sock:
        answer = _serve_until(exporter, selector, sock)
    assert answer.split(b" ")[1] == status
    assert not exporter.scrapes


def test_an_endless_request_is_cut_at_the_budget(
        served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    exporter, selector = served
    with _get(exporter.port, b"GET /metrics HTTP/1.1\r\n" + b"X: y\r\n" * 1500) as sock:
        answer = _serve_until(exporter, selector, sock)
    # 431, unless the reset for the unread rest of the request overtook it
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 ")
    assert not exporter.scrapes


def test_silent_scrapers_are_bounded_and_expire(
        served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    exporter, selector = served
    silent: list[socket.socket] = []
    try:
        for _ in range(metrics.MAX_CLIENTS + 2):
            silent.append(socket.create_connection(("127.0.0.1", exporter.port), timeout=5))
            for key, _ in selector.select(5):
                exporter.handle(key.data, time.monotonic())
        assert len(exporter.scrapes) == metrics.MAX_CLIENTS  # the rest were closed
        exporter.expire(time.monotonic() + metrics.SCRAPE_SECONDS)
        assert not exporter.scrapes
    finally:
        for sock in silent:
            sock.close()
