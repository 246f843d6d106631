"""Prometheus metrics of the master, served by the master's own selector loop.

`GET /metrics` on the address METRICS names (off by default) answers in the Prometheus
text format, rendered by prometheus-client from a custom collector that reads the status
the master already builds for STATUS_FILE (`Master._status`), plus what only this module
keeps: refusals per client IP (a bounded top-N) and two histograms; the queues' backlog
gauges come from qmqpd.backlog's summaries (the master never scans a queue).

Why in the loop and not a thread: the master is single-threaded and forks workers. A
second thread could hold a lock (stderr, the registry's) at the moment of a fork and leave
the worker with it locked forever, and it would read the master's counters while the loop
changes them. So the exporter is a non-blocking listening socket the master registers in
its selector; each scrape is a small state machine (read the request, bounded in bytes and
time; send the body without blocking) and at most MAX_CLIENTS scrapes are open at once, so
a slow or hostile scraper costs a few descriptors and never stalls an accept. A body is
rendered at most once per RENDER_INTERVAL (the rest get that body): cheap under a scrape
storm, and the counters are at most that old.

The master calls: `Exporter(...)`, `open()` (before the privilege drop: the port may be
low), `register()`, `handle(data, now)` from its `_dispatch` for every selector entry whose
data is a `Scrape`, `expire(now)` each tick, `close()` in a forked child and at exit; and
the feed: `refused(ip, reason)` at each per-IP refusal, `observe(session, commit)` with each
done record (its session and queue-commit times, measured by the worker, feed the histograms).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import selectors
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qmqpd import backlog, log
from qmqpd.status import ANSWER_NAMES

# Text format 0.0.4: what every Prometheus and promtool reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CLIENTS = 4
REQUEST_BYTES = 8192
SCRAPE_SECONDS = 5.0
RENDER_INTERVAL = 0.5
# After a failed accept (out of descriptors) the listener pauses this long; one warning
# per WARNING_INTERVAL.
ACCEPT_PAUSE = 1.0
WARNING_INTERVAL = 60.0
TOP_IPS = 10
# Refusal counts kept per IP: past this, the least refused half is forgotten.
TRACKED_IPS = 4096
# Session and queue-commit times: from a fast local commit to the session limit.
SESSION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 300.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0)
# status.ANSWERS names -> the answer class label (the QMQP status letter)
ANSWER_CLASSES = {name: letter or "none" for letter, name in ANSWER_NAMES.items()}


def split_address(address: str) -> tuple[str, int]:
    """METRICS `ip:port` or `[v6]:port` (validated by config) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def queue_dirs(config: Any) -> list[str]:
    """The queues the master's settings name (none when QMAILQUEUE takes the mail), with
    how their backlog is scanned."""
    return backlog.watched(config)


class RefusalsByIp:
    """Refused connections per (ip, reason), memory bounded; the top N are exported."""

    def __init__(self, tracked: int = TRACKED_IPS) -> None:
        self.tracked = tracked
        self.counts: dict[tuple[str, str], int] = {}

    def add(self, ip: str, reason: str) -> None:
        key = (ip, reason)
        if key not in self.counts and len(self.counts) >= self.tracked:
            keep = heapq.nlargest(self.tracked // 2, self.counts.items(), key=lambda kv: kv[1])
            self.counts = dict(keep)
        self.counts[key] = self.counts.get(key, 0) + 1

    def top(self, n: int = TOP_IPS) -> list[tuple[str, str, int]]:
        best = heapq.nlargest(n, self.counts.items(), key=lambda kv: (kv[1], kv[0]))
        return [(ip, reason, count) for (ip, reason), count in best]


class MasterCollector:
    """Reads the master's status dict at scrape time; yields metric families."""

    def __init__(self, snapshot: Callable[[], Mapping[str, Any]],
                 queues: Callable[[], list[str]], refusals: RefusalsByIp) -> None:
        self.snapshot = snapshot
        self.queues = queues
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        status = self.snapshot()
        answers = CounterMetricFamily(
            "qmqpd_answers", "Sessions by the answer sent: K, Z, D, none (no answer), "
            "worker_died, unreported", labels=["answer"])
        for name, count in status.get("answers", {}).items():
            answers.add_metric([ANSWER_CLASSES.get(name, name)], count)
        yield answers
        stages = CounterMetricFamily("qmqpd_stage_verdicts",
                                     "Filter stage verdicts", labels=["stage", "verdict"])
        for stage, verdicts in status.get("stages", {}).items():
            for verdict, count in verdicts.items():
                stages.add_metric([stage, verdict], count)
        yield stages
        connections = CounterMetricFamily(
            "qmqpd_connections", "Accepted connections by what the master did: handed to a "
            "worker, denied (rules), refused_perip (MAXPERIP), dropped, too_slow (cut in the "
            "wait for its request), proxy_rejected (bad or missing PROXY header)",
            labels=["result"])
        for result, count in status.get("connections", {}).items():
            connections.add_metric([result], count)
        yield connections
        workers = GaugeMetricFamily("qmqpd_workers", "Worker processes by state",
                                    labels=["state"])
        for state, count in status.get("workers", {}).items():
            if state != "total":
                workers.add_metric([state], count)
        yield workers
        for name, key, text in (
                ("qmqpd_sessions_in_service", "sessions", "Sessions being served now"),
                ("qmqpd_waiting_connections", "waiting", "Connections the master holds, "
                 "waiting for their first bytes or for a worker"),
                ("qmqpd_clients_connected", "clients", "Distinct client IPs being served now"),
                ("qmqpd_maxdaemons", "maxdaemons", "MAXDAEMONS: sessions served at once"),
                ("qmqpd_maxperip", "maxperip", "MAXPERIP: sessions at once per IP (0 = no "
                 "limit)"),
                ("qmqpd_prefork", "prefork", "PREFORK: idle workers kept ready"),
                ("qmqpd_start_time_seconds", "started", "Master start, seconds since the "
                 "epoch")):
            if isinstance(status.get(key), int | float):
                yield GaugeMetricFamily(name, text, value=status[key])
        yield GaugeMetricFamily("qmqpd_accepting", "1 while the master accepts connections",
                                value=1 if status.get("state") == "running" else 0)
        by_ip = CounterMetricFamily(
            "qmqpd_refused_by_ip", f"Refused connections of the {TOP_IPS} most refused "
            "client IPs, by reason", labels=["ip", "reason"])
        for ip, reason, count in self.refusals.top():
            by_ip.add_metric([ip, reason], count)
        yield by_ip
        free = GaugeMetricFamily("qmqpd_queue_free_bytes",
                                 "Free space on each queue's filesystem", labels=["queue"])
        for path in self.queues():
            with contextlib.suppress(OSError):
                stat = os.statvfs(path)
                free.add_metric([path], stat.f_bavail * stat.f_frsize)
        yield free
        yield from self.backlog()

    def backlog(self) -> Iterator[Metric]:
        """The queues' backlog gauges (read from their summaries: no scan in the master)."""
        queues = self.queues()
        if isinstance(queues, backlog.WatchedQueues):
            for name, text, values in backlog.gauges(queues):
                family = GaugeMetricFamily(name, text, labels=["queue"])
                for path, value in values:
                    family.add_metric([path], value)
                yield family


@dataclass(eq=False)
class Scrape:
    """One scraper's connection: reading its request, then sending the answer."""

    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None


@dataclass(eq=False)
class _Listener:
    sock: socket.socket


class Exporter:
    def __init__(self, address: str, snapshot: Callable[[], Mapping[str, Any]],
                 queues: Callable[[], list[str]] = list) -> None:
        self.address = address
        self.selector: selectors.BaseSelector | None = None
        self.listener: _Listener | None = None
        self.scrapes: set[Scrape] = set()
        self.refusals = RefusalsByIp()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(snapshot, queues, self.refusals))
        self.session_seconds = Histogram(
            "qmqpd_session_seconds", "Time from a worker's start on a session to its "
            "answer (to its end when none was sent)",
            buckets=SESSION_BUCKETS, registry=self.registry)
        self.commit_seconds = Histogram(
            "qmqpd_queue_commit_seconds", "Time in the injector making one message durable "
            "in the queue (or handing it to QMAILQUEUE)",
            buckets=COMMIT_BUCKETS, registry=self.registry)
        self._body = b""
        self._rendered_at = float("-inf")
        self.paused_until = 0.0  # the listener is out of the selector until then
        self.failed_accepts = 0
        self.next_warning = 0.0

    # ---- what the master feeds --------------------------------------------------------
    def refused(self, ip: str, reason: str) -> None:
        self.refusals.add(ip, reason)

    def observe(self, session_seconds: float | None, commit_seconds: float | None) -> None:
        """A done record's durations (None: not measured, e.g. nothing was queued)."""
        if session_seconds is not None:
            self.observe_session(session_seconds)
        if commit_seconds is not None:
            self.observe_commit(commit_seconds)

    def observe_session(self, seconds: float) -> None:
        self.session_seconds.observe(max(0.0, seconds))

    def observe_commit(self, seconds: float) -> None:
        self.commit_seconds.observe(max(0.0, seconds))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- the socket -------------------------------------------------------------------
    def open(self) -> None:
        host, port = split_address(self.address)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(16)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            raise OSError(error.errno, f"METRICS {self.address}: {error.strerror}") from None
        self.listener = _Listener(sock)
        log.event("metrics_listen", addr=host, port=sock.getsockname()[1])

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.sock.getsockname()[1])

    def register(self, selector: selectors.BaseSelector) -> None:
        assert self.listener is not None
        self.selector = selector
        selector.register(self.listener.sock, selectors.EVENT_READ, self.listener)

    def owns(self, data: object) -> bool:
        """A selector entry's data that `handle` serves."""
        return isinstance(data, Scrape | _Listener)

    def handle(self, data: object, now: float) -> None:
        if isinstance(data, _Listener):
            self._accept(now)
        elif isinstance(data, Scrape) and data in self.scrapes:
            if data.answer is None:
                self._read(data, now)
            else:
                self._send(data)

    def expire(self, now: float) -> None:
        for scrape in [s for s in self.scrapes if s.deadline <= now]:
            self._end(scrape)
        if self.paused_until and now >= self.paused_until and self.listener is not None:
            self.paused_until = 0.0
            assert self.selector is not None
            self.selector.register(self.listener.sock, selectors.EVENT_READ, self.listener)

    def _pause(self, now: float, error: OSError) -> None:
        """An accept failed (out of descriptors): the listener leaves the selector for
        ACCEPT_PAUSE, so a pending scrape cannot spin the loop; one warning a minute."""
        assert self.listener is not None and self.selector is not None
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener.sock)
        self.paused_until = now + ACCEPT_PAUSE
        self.failed_accepts += 1
        if now >= self.next_warning:
            log.warning("metrics accept failed; pausing the metrics listener",
                        error=error.strerror, failures=self.failed_accepts)
            self.next_warning = now + WARNING_INTERVAL

    def close(self) -> None:
        """Drop every descriptor (in a forked child, or when the master exits); no
        selector calls: a child's selector is not its own to change."""
        for scrape in self.scrapes:
            scrape.sock.close()
        self.scrapes.clear()
        if self.listener is not None:
            self.listener.sock.close()
            self.listener = None

    def _accept(self, now: float) -> None:
        assert self.listener is not None and self.selector is not None
        while True:
            try:
                conn, _peer = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # e.g. EMFILE: pause; the scraper waits in the backlog
                self._pause(now, error)
                return
            if len(self.scrapes) >= MAX_CLIENTS:
                conn.close()
                continue
            conn.setblocking(False)
            scrape = Scrape(conn, now + SCRAPE_SECONDS)
            self.scrapes.add(scrape)
            self.selector.register(conn, selectors.EVENT_READ, scrape)

    def _read(self, scrape: Scrape, now: float) -> None:
        try:
            data = scrape.sock.recv(REQUEST_BYTES - len(scrape.request))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(scrape)
            return
        scrape.request += data
        if b"\r\n\r\n" not in scrape.request and b"\n\n" not in scrape.request:
            if len(scrape.request) >= REQUEST_BYTES:
                self._answer(scrape, 431, b"request header too large\n")
            return
        self._answer(scrape, *self._route(bytes(scrape.request), now))

    def _route(self, request: bytes, now: float) -> tuple[int, bytes]:
        parts = request.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return 400, b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method != b"GET":
            return 405, b"only GET\n"
        if target != b"/metrics":
            return 404, b"qmqpd: metrics are at /metrics\n"
        if now - self._rendered_at >= RENDER_INTERVAL:
            self._body = self.render()
            self._rendered_at = now
        return 200, self._body

    def _answer(self, scrape: Scrape, code: int, body: bytes) -> None:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large"}[code]
        kind = CONTENT_TYPE if code == 200 else "text/plain; charset=utf-8"
        head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
        scrape.answer = memoryview(head + body)
        assert self.selector is not None
        self.selector.modify(scrape.sock, selectors.EVENT_WRITE, scrape)
        self._send(scrape)

    def _send(self, scrape: Scrape) -> None:
        assert scrape.answer is not None
        try:
            sent = scrape.sock.send(scrape.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(scrape)
            return
        scrape.answer = scrape.answer[sent:]
        if not scrape.answer:
            self._end(scrape)

    def _end(self, scrape: Scrape) -> None:
        self.scrapes.discard(scrape)
        if self.selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(scrape.sock)
        scrape.sock.close()

