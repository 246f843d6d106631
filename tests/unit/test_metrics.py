"""The metrics exporter on its own: what it renders from the master's status, validated by
Debian's promtool; the bounded per-IP refusals; the HTTP side on a real loopback socket,
driven by a selector loop the way the master drives it."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from qmqpd import config as config_mod
from qmqpd import log, metrics
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
            "sessions": 1, "waiting": 2, "clients": 1,
            "busiest": [{"ip": "127.0.0.2", "sessions": 1}],
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
    exporter.observe(0.2, None)  # a session that queued nothing
    exporter.observe(None, None)  # a done record without times
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
    assert found["qmqpd_waiting_connections"] == 2
    assert found["qmqpd_session_seconds_count"] == 3
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
def served(exporter: metrics.Exporter, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """An open exporter in a selector; its sockets looked at on every turn (the tests hold
    the clock still: SERVE_INTERVAL's own test sets it back)."""
    monkeypatch.setattr(metrics, "SERVE_INTERVAL", 0.0)
    selector = selectors.DefaultSelector()
    exporter.open()
    exporter.register(selector)
    yield exporter, selector
    exporter.close()
    selector.close()


def _get(port: int, request: bytes, source: str = "127.0.0.1") -> socket.socket:
    sock = _connect(port, source)
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


def _turn(exporter: metrics.Exporter, selector: selectors.BaseSelector, now: float,
          seconds: float = 0.2) -> None:
    """One loop turn at the given clock: what is ready, then the timers."""
    for key, _ in selector.select(seconds):
        exporter.handle(key.data, now)
    exporter.expire(now)


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def _accept_all(exporter: metrics.Exporter, selector: selectors.BaseSelector, count: int,
                now: float) -> None:
    stop = time.monotonic() + 10
    while exporter.accepted < count and time.monotonic() < stop:
        _turn(exporter, selector, now, 0.05)
    assert exporter.accepted >= count


def test_sizes_follow_the_descriptor_limit(exporter: metrics.Exporter) -> None:
    assert exporter.size(1024) == 64 + 2  # a sixteenth, the listener and its selector
    assert exporter.size(100) == metrics.CONNECTIONS_MIN + 2
    assert exporter.size(1 << 20) == metrics.CONNECTIONS_MAX + 2


def test_silent_scrapers_make_room_and_expire(
        served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    """At the cap a new connection is never refused: the oldest silent one goes. A silent
    one is closed HEADER_SECONDS after its accept."""
    exporter, selector = served
    exporter.size(0)  # the smallest cap
    cap, now = metrics.CONNECTIONS_MIN, time.monotonic()
    silent: list[socket.socket] = []
    try:
        for n in range(cap + 5):
            silent.append(_connect(exporter.port))
            _accept_all(exporter, selector, n + 1, now)  # one at a time: "oldest" is clear
        assert len(exporter.scrapes) == cap
        assert exporter.dropped["evicted"] == 5
        assert all(answer_within(sock, 2) == b"" for sock in silent[:5])  # the oldest
        # a scraper that asks still gets its answer, and takes a silent one's place
        with _get(exporter.port, b"GET /metrics HTTP/1.1\r\n\r\n") as sock:
            answer = _serve_until(exporter, selector, sock)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert exporter.dropped["evicted"] == 6
        exporter.expire(now + metrics.HEADER_SECONDS)
        assert not exporter.scrapes
        assert exporter.dropped["slow"] == cap - 1
    finally:
        for sock in silent:
            sock.close()


def test_the_crowded_address_makes_room_first(
        served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    """One address holding most connections loses its own oldest, not another address's
    older connection."""
    exporter, selector = served
    exporter.size(0)
    now = time.monotonic()
    other = _connect(exporter.port, "127.0.0.3")  # the oldest of all
    crowd: list[socket.socket] = []
    try:
        _accept_all(exporter, selector, 1, now)
        for n in range(metrics.CONNECTIONS_MIN + 3):
            crowd.append(_connect(exporter.port, "127.0.0.2"))
            _accept_all(exporter, selector, n + 2, now)
        assert answer_within(other, 0.05) is None  # still open
        assert all(answer_within(sock, 2) == b"" for sock in crowd[:4])
    finally:
        other.close()
        for sock in crowd:
            sock.close()


def test_a_flood_is_paced_and_another_address_goes_first(
        served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    """Answers beyond the burst wait for the rate; a second address, answered less lately,
    is answered before the rest of the first address's queue."""
    exporter, selector = served
    exporter.size(1 << 20)  # room for every one of them
    now = time.monotonic()
    request = b"GET /metrics HTTP/1.1\r\n\r\n"
    flood = [_get(exporter.port, request, "127.0.0.2") for _ in range(metrics.ANSWER_BURST + 10)]
    try:
        _accept_all(exporter, selector, len(flood), now)
        scraper = _get(exporter.port, request, "127.0.0.3")
        _accept_all(exporter, selector, len(flood) + 1, now)
        answered = [sock for sock in flood if answer_within(sock, 0.5)]
        assert len(answered) == metrics.ANSWER_BURST  # the clock has not moved
        assert len(exporter.held["127.0.0.2"]) == 10 and exporter.held["127.0.0.3"]
        wakeup = exporter.next_wakeup()
        assert wakeup is not None and wakeup <= now + 1 / metrics.ANSWERS_PER_SECOND + 1e-9
        exporter.expire(now + 1.5 / metrics.ANSWERS_PER_SECOND)  # one more answer
        assert (answer_within(scraper, 2) or b"").startswith(b"HTTP/1.1 200 OK")
        assert len(exporter.held["127.0.0.2"]) == 10
        exporter.expire(now + 1)
        assert not exporter.held
        assert all(answer_within(sock, 2) for sock in flood if sock not in answered)
    finally:
        scraper.close()
        for sock in flood:
            sock.close()


def test_out_of_descriptors_pauses_the_listener_with_one_warning(
        served: tuple[metrics.Exporter, selectors.BaseSelector]) -> None:
    """EMFILE on accept: the listener leaves the selector (a registered one would wake
    every turn) for SHORTAGE_PAUSE, one warning per SHORTAGE_WARNING_INTERVAL, then the
    pending scraper is served."""
    exporter, selector = served
    pending = _get(exporter.port, b"GET /metrics HTTP/1.1\r\n\r\n")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    spare: list[int] = []
    logged = io.StringIO()
    log.set_stream(logged)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_open_descriptors() + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                spare.append(os.open(os.devnull, os.O_RDONLY))
        now = time.monotonic()
        turns, stop = 0, time.monotonic() + 1
        while time.monotonic() < stop:  # the loop, the clock standing before the pause end
            _turn(exporter, selector, now, 0.05)
            turns += 1
        assert not exporter.listening and exporter.accepted == 0
        assert turns <= 25  # slept in select: nothing woke it
        assert exporter.next_wakeup() == now + metrics.SHORTAGE_PAUSE
        exporter.expire(now + metrics.SHORTAGE_PAUSE)  # resumes: still short, pauses again
        _turn(exporter, selector, now + metrics.SHORTAGE_PAUSE)
    finally:
        for fd in spare:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        log.set_stream(sys.stderr)
    assert logged.getvalue().count("metrics: cannot accept") == 1, logged.getvalue()
    now += 2 * metrics.SHORTAGE_PAUSE
    exporter.expire(now)
    with pending:
        answer = _serve_until(exporter, selector, pending)
    assert answer.startswith(b"HTTP/1.1 200 OK")


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def answer_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the peer sent before it closed (b"" for a close without a word), or None
    when it is still open and silent after seconds."""
    sock.settimeout(seconds)
    data = b""
    try:
        while block := sock.recv(65536):
            data += block
    except TimeoutError:
        return data or None
    except ConnectionResetError:
        pass
    return data


def test_scrapers_wake_the_loop_at_most_once_per_interval(
        served: tuple[metrics.Exporter, selectors.BaseSelector],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever arrives after a look waits, out of the master's selector, until
    SERVE_INTERVAL has passed: then the next look serves it."""
    monkeypatch.setattr(metrics, "SERVE_INTERVAL", 0.02)
    exporter, selector = served
    now = time.monotonic()
    first = _connect(exporter.port)
    try:
        _turn(exporter, selector, now)
        assert exporter.accepted == 1 and exporter.next_wakeup() == now + 0.02
        with _get(exporter.port, b"GET /metrics HTTP/1.1\r\n\r\n") as second:
            assert selector.select(0.3) == []  # not watched: the loop sleeps
            _turn(exporter, selector, now + 0.01)
            assert exporter.accepted == 1
            exporter.expire(now + 0.02)  # the master's tick: watched again
            _turn(exporter, selector, now + 0.02)  # ready at once
            assert exporter.accepted == 2
            assert (answer_within(second, 2) or b"").startswith(b"HTTP/1.1 200 OK")
    finally:
        first.close()
