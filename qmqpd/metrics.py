"""Prometheus metrics of the master, served by the master's own selector loop.

`GET /metrics` on the address METRICS names (off by default) answers in the Prometheus
text format, rendered by prometheus-client from a custom collector that reads the status
the master already builds for STATUS_FILE (`Master._status`), plus what only this module
keeps: refusals per client IP (a bounded top-N), two histograms, and the scrape
connections this endpoint itself dropped; the queues' backlog gauges come from
qmqpd.backlog's summaries (the master never scans a queue).

Why in the loop and not prometheus-client's threaded server: the master forks workers. A
second thread could hold a lock (stderr, the registry's) at the moment of a fork and leave
the worker with it locked forever, it would read the master's counters while the loop
changes them, and a thread per connection makes 1,000 idle scrapers 1,000 threads. So the
endpoint is a non-blocking listening socket in the master's loop. Its sockets live in a
selector of their own, which the master's selector watches as one descriptor and which is
looked at most once per SERVE_INTERVAL: whatever scrapers send, they wake the master at
most that often (each wakeup costs the master its housekeeping). Each scrape is a small
state machine that no scraper can hold up:
- reading: the request line and headers must be in within HEADER_SECONDS of the accept
  and within REQUEST_BYTES (else closed, or 431);
- held: a complete request waits for its turn; answers go out at most ANSWERS_PER_SECOND
  (a short burst allowed), the address with the fewest requests held first, then the one
  that asked least lately (halved each ASKED_WINDOW), so a flood costs the master a
  bounded share of its time and a scraper, one request at a time once per interval, goes
  before the addresses that flood;
- sending: the answer, without blocking, within ANSWER_SECONDS of the request.
Connections are capped (a sixteenth of the descriptor limit, CONNECTIONS_MIN to
CONNECTIONS_MAX, and the master budgets them); a new connection at the cap is never
refused: of the VICTIM_SAMPLE oldest connections still reading their request, the one
whose address holds the most connections makes room (only when none is reading, one of
the oldest held ones). The body is rendered at most once per RENDER_INTERVAL (the rest
get that body): a flood costs little CPU and the counters are at most that old. At most
ACCEPT_BATCH connections are accepted per look (a connection flood beyond that waits in
the kernel's backlog). Out of descriptors, the listener is paused for SHORTAGE_PAUSE and
one warning is logged per SHORTAGE_WARNING_INTERVAL.

The master calls: `Exporter(...)`, `open()` (before the privilege drop: the port may be
low), `size(nofile)` (how many descriptors it keeps), `register()`, `handle(data, now)`
from its `_dispatch` for every selector entry `owns(data)`, `expire(now)` each tick,
`next_wakeup()` for its select timeout, `close()` in a forked child and at exit; and the
feed: `refused(ip, reason)` at each per-IP refusal, `observe(session, commit)` with each
done record but a health check's (its session and queue-commit times, measured by the
worker, feed the histograms). It never decides anything for the master.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import os
import selectors
import socket
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qmqpd import backlog, listen, log
from qmqpd.status import ANSWER_NAMES

# Text format 0.0.4: what every Prometheus and promtool reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RENDER_INTERVAL = 0.5
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

# ---- the endpoint's bounds (see the module doc) ---------------------------------------
# A scraper sends its request as soon as it is connected (Prometheus: a few hundred bytes).
HEADER_SECONDS = 2.0
REQUEST_BYTES = 8192
# From the complete request to the answer's last byte: the wait for a turn and the send.
ANSWER_SECONDS = 10.0
# Prometheus scrapes once per interval (15 s by default); an HA pair, a federation and a
# few people with curl need far less than this, and a flood is held to it.
ANSWERS_PER_SECOND = 100.0
ANSWER_BURST = 10
# The endpoint's sockets are looked at most this often (a scrape waits at most this long).
SERVE_INTERVAL = 0.02
CONNECTIONS_MIN = 16
CONNECTIONS_MAX = 4096
# At the cap, the oldest this many are looked at for the one to close.
VICTIM_SAMPLE = 8
# Requests per address are counted over about this long (halved at each end of it).
ASKED_WINDOW = 1.0
# Connections accepted per look: a burst of a thousand reconnects drains in four looks,
# while an endless connect flood costs at most this many accepts per SERVE_INTERVAL.
ACCEPT_BATCH = 256
# Evictions per look at the cap (looks come at most once per SERVE_INTERVAL): 200 a second.
EVICTIONS_PER_LOOK = 4
# Deep enough for a burst of reconnects to wait in the kernel instead of being dropped
# (a dropped SYN costs a scraper a 1 s retransmission); the kernel caps it at somaxconn.
LISTEN_BACKLOG = 4096
SHORTAGE_PAUSE = 1.0
SHORTAGE_WARNING_INTERVAL = 10.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large"}


def split_address(address: str) -> tuple[str, int]:
    """METRICS `ip:port` or `[v6]:port` (validated by config; port 0 lets the kernel
    choose, as tests do) -> (host, port)."""
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
                 queues: Callable[[], list[str]], refusals: RefusalsByIp,
                 dropped: Mapping[str, int] | None = None) -> None:
        self.snapshot = snapshot
        self.queues = queues
        self.refusals = refusals
        self.dropped = dropped if dropped is not None else {}

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
            "wait for its request), proxy_rejected (bad or missing PROXY header), busy (no "
            "worker within TIMEOUT), gave_way (the slowest session while others waited)",
            labels=["result"])
        for result, count in status.get("connections", {}).items():
            connections.add_metric([result], count)
        yield connections
        yield CounterMetricFamily(
            "qmqpd_health_checks", "Health checks: a balancer's probe (an empty request, "
            "answered D and not counted in qmqpd_answers) or a PROXY LOCAL connection that "
            "closed without a request", value=status.get("health_checks", 0))
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
        scrapes = CounterMetricFamily(
            "qmqpd_metrics_connections_dropped", "Connections to this endpoint closed "
            "without an answer: evicted (room for a newer one at the cap), slow (request "
            "or answer past its deadline)", labels=["reason"])
        for reason, count in self.dropped.items():
            scrapes.add_metric([reason], count)
        yield scrapes
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


READING, HELD, SENDING = "reading", "held", "sending"


@dataclass(eq=False)
class Scrape:
    """One scraper's connection: reading its request, held for its turn, sending."""

    sock: socket.socket
    ip: str
    deadline: float
    state: str = READING
    registered: bool = False
    request: bytearray = field(default_factory=bytearray)
    code: int = 0
    error_body: bytes = b""
    answer: memoryview | None = None


@dataclass(eq=False)
class _Listener:
    sock: socket.socket


@dataclass(eq=False)
class _Sockets:
    """The master's selector entry for the endpoint's own selector."""


class Exporter:
    def __init__(self, address: str, snapshot: Callable[[], Mapping[str, Any]],
                 queues: Callable[[], list[str]] = list) -> None:
        self.address = address
        self.loop: selectors.BaseSelector | None = None  # the master's
        self.selector: selectors.BaseSelector | None = None  # the endpoint's sockets
        self.entry = _Sockets()
        self.watched = False  # the endpoint's selector is in the master's
        self.next_look = 0.0
        self.listener: _Listener | None = None
        self.listening = False
        self.max_clients = CONNECTIONS_MIN
        # every open scrape connection; reading and answering (held or sending) each in
        # the order their deadlines fall; open connections per address
        self.scrapes: dict[Scrape, None] = {}
        self.reading: dict[Scrape, None] = {}
        self.answering: dict[Scrape, None] = {}
        self.per_ip: dict[str, int] = {}
        # held requests per address, and whose turn is next: a heap of (requests held,
        # requests lately, order, address) as they were when the entry was made (checked
        # when it comes up); `turns` names each held address's live entry
        self.held: dict[str, deque[Scrape]] = {}
        self.queue: list[tuple[int, int, int, str]] = []
        self.turns: dict[str, int] = {}
        self.order = itertools.count()
        self.asked: dict[str, int] = {}
        self.window_ends = 0.0
        self.tokens = float(ANSWER_BURST)
        self.tokens_at = 0.0
        self.paused_until: float | None = None
        self.shortages = 0
        self.next_shortage_warning = 0.0
        self.dropped = {"evicted": 0, "slow": 0}
        self.accepted = 0
        self.refusals = RefusalsByIp()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(snapshot, queues, self.refusals, self.dropped))
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
        try:
            sock = listen.open_socket(host, port, LISTEN_BACKLOG)
        except listen.ListenError as error:
            raise OSError(f"METRICS: {error}") from None
        self.listener = _Listener(sock)
        self.selector = selectors.DefaultSelector()
        log.event("metrics_listen", addr=host, port=sock.getsockname()[1],
                  connections=self.max_clients)

    def size(self, nofile: int) -> int:
        """Fit the connection cap to the descriptor limit; the descriptors it may hold
        (its listener and selector included), for the master to keep out of its client
        budget."""
        self.max_clients = max(CONNECTIONS_MIN, min(CONNECTIONS_MAX, nofile // 16))
        return self.max_clients + 2

    @property
    def port(self) -> int:
        assert self.listener is not None
        return int(self.listener.sock.getsockname()[1])

    def register(self, selector: selectors.BaseSelector) -> None:
        """Into the master's selector: one entry, the endpoint's own selector."""
        assert self.listener is not None
        self.loop = selector
        self._listen(True)
        self._watch_endpoint(True)

    def owns(self, data: object) -> bool:
        """A selector entry's data that `handle` serves."""
        return data is self.entry

    def handle(self, data: object, now: float) -> None:
        """The endpoint's sockets have news: serve every ready one, then rest until
        SERVE_INTERVAL is over (`expire` watches again)."""
        assert self.selector is not None
        for key, _mask in self.selector.select(0):
            ready = key.data
            if isinstance(ready, _Listener):
                self._accept(now)
            elif isinstance(ready, Scrape) and ready in self.scrapes:
                if ready.state == READING:
                    self._read(ready, now)
                elif ready.state == SENDING:
                    self._send(ready)
        self._pump(now)
        self._watch_endpoint(False)
        self.next_look = now + SERVE_INTERVAL

    def expire(self, now: float) -> None:
        """Each tick: deadlines, the end of a pause, answers whose turn has come."""
        if not self.watched and now >= self.next_look:
            self._watch_endpoint(True)
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            self._listen(True)
        for queue in (self.reading, self.answering):
            while queue:
                first = next(iter(queue))
                if first.deadline > now:
                    break
                self._end(first, "slow")
        self._pump(now)

    def next_wakeup(self) -> float | None:
        """The monotonic time `expire` has work next, for the master's select timeout."""
        times = [next(iter(queue)).deadline for queue in (self.reading, self.answering)
                 if queue]
        if self.paused_until is not None:
            times.append(self.paused_until)
        if not self.watched:
            times.append(self.next_look)
        if self.held:
            times.append(self.tokens_at + max(0.0, 1 - self.tokens) / ANSWERS_PER_SECOND)
        return min(times) if times else None

    def close(self) -> None:
        """Drop every descriptor (in a forked child, or when the master exits); no
        selector calls: a child's selector is not its own to change."""
        for scrape in self.scrapes:
            scrape.sock.close()
        for kept in (self.scrapes, self.reading, self.answering, self.per_ip, self.held,
                     self.turns):
            kept.clear()
        self.queue.clear()
        if self.listener is not None:
            self.listener.sock.close()
            self.listener = None
        if self.selector is not None:
            self.selector.close()
            self.selector = None

    # ---- accepting --------------------------------------------------------------------
    def _watch_endpoint(self, on: bool) -> None:
        assert self.loop is not None and self.selector is not None
        if on and not self.watched:
            self.loop.register(self.selector.fileno(), selectors.EVENT_READ, self.entry)
        elif not on and self.watched:
            self.loop.unregister(self.selector.fileno())
        self.watched = on

    def _listen(self, on: bool) -> None:
        assert self.listener is not None and self.selector is not None
        if on and not self.listening:
            self.selector.register(self.listener.sock, selectors.EVENT_READ, self.listener)
        elif not on and self.listening:
            self.selector.unregister(self.listener.sock)
        self.listening = on

    def _accept(self, now: float) -> None:
        assert self.listener is not None and self.selector is not None
        evicted = 0
        for _ in range(ACCEPT_BATCH):  # then the master's other work has its turn
            if len(self.scrapes) >= self.max_clients and evicted >= EVICTIONS_PER_LOOK:
                # At the cap every accept costs an eviction, and an evicted attacker is
                # back at once: bounded per look, such churn costs the master a small,
                # fixed share; the rest wait in the kernel's backlog for the next look.
                return
            try:
                conn, peer = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self._pause(now, error)  # EMFILE and the like: the scraper waits
                return
            self.accepted += 1
            if len(self.scrapes) >= self.max_clients:
                self._end(self._victim(), "evicted")
                evicted += 1
            conn.setblocking(False)
            scrape = Scrape(conn, str(peer[0]), now + HEADER_SECONDS)
            self.scrapes[scrape] = None
            self.reading[scrape] = None
            self.per_ip[scrape.ip] = self.per_ip.get(scrape.ip, 0) + 1
            self._read(scrape, now)  # often the request is there already
            if scrape.state == READING and scrape in self.scrapes:
                self._watch(scrape, selectors.EVENT_READ)

    def _pause(self, now: float, error: OSError) -> None:
        """Out of descriptors or memory: stop listening for a while (a listener left
        registered would wake the loop at once, again and again), and say so once."""
        self._listen(False)
        self.paused_until = now + SHORTAGE_PAUSE
        self.shortages += 1
        if now >= self.next_shortage_warning:
            log.warning("metrics: cannot accept; scrapes wait", error=error.strerror,
                        pauses=self.shortages, paused=SHORTAGE_PAUSE,
                        connections=len(self.scrapes))
            self.shortages = 0
            self.next_shortage_warning = now + SHORTAGE_WARNING_INTERVAL

    def _victim(self) -> Scrape:
        """Who makes room at the cap: among the oldest connections still reading their
        request (only when none is, the oldest answering ones), the oldest of the address
        with the most connections, so a crowd from one place does not push out another
        address's scrape. A sample, not a search: constant work per connection."""
        oldest = itertools.islice(self.reading or self.answering, VICTIM_SAMPLE)
        return max(oldest, key=lambda scrape: self.per_ip[scrape.ip])  # first of equals

    # ---- one connection ---------------------------------------------------------------
    def _watch(self, scrape: Scrape, events: int) -> None:
        assert self.selector is not None
        try:
            if scrape.registered:
                self.selector.modify(scrape.sock, events, scrape)
            else:
                self.selector.register(scrape.sock, events, scrape)
                scrape.registered = True
        except OSError:  # ENOMEM in epoll_ctl: this one goes, the loop goes on
            self._end(scrape, None)

    def _read(self, scrape: Scrape, now: float) -> None:
        try:
            data = scrape.sock.recv(REQUEST_BYTES - len(scrape.request))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._end(scrape, None)
            return
        scrape.request += data
        if b"\r\n\r\n" in scrape.request or b"\n\n" in scrape.request:
            scrape.code, scrape.error_body = _route(bytes(scrape.request))
        elif len(scrape.request) >= REQUEST_BYTES:
            scrape.code, scrape.error_body = 431, b"request header too large\n"
        else:
            return
        self._hold(scrape, now)

    def _hold(self, scrape: Scrape, now: float) -> None:
        """A complete request: wait, off the selector, for its turn."""
        if scrape.registered:
            assert self.selector is not None
            self.selector.unregister(scrape.sock)
            scrape.registered = False
        del self.reading[scrape]
        scrape.state = HELD
        scrape.deadline = now + ANSWER_SECONDS
        self.answering[scrape] = None
        self.asked[scrape.ip] = self.asked.get(scrape.ip, 0) + 1
        mine = self.held.setdefault(scrape.ip, deque())
        mine.append(scrape)
        if len(mine) == 1:
            self._queue_turn(scrape.ip)

    def _standing(self, ip: str) -> tuple[int, int]:
        """An address's place in line: requests held, then requests lately."""
        return len(self.held[ip]), self.asked.get(ip, 0)

    def _queue_turn(self, ip: str) -> None:
        turn = next(self.order)
        self.turns[ip] = turn
        heapq.heappush(self.queue, (*self._standing(ip), turn, ip))

    def _pump(self, now: float) -> None:
        """Answer held requests while the rate allows, one per turn: the address with the
        fewest held, then the one that asked least lately, first."""
        if now >= self.window_ends:  # forget old requests, by halves
            self.asked = {ip: n // 2 for ip, n in self.asked.items() if n > 1}
            self.window_ends = now + ASKED_WINDOW
        if not self.held:
            self.queue.clear()  # only entries of requests that went while held
            return
        self.tokens = min(float(ANSWER_BURST),
                          self.tokens + (now - self.tokens_at) * ANSWERS_PER_SECOND)
        self.tokens_at = now
        while self.held and self.tokens >= 1:
            held, asked, turn, ip = heapq.heappop(self.queue)
            if self.turns.get(ip) != turn:
                continue  # its requests went (closed while held); a later entry stands
            if self._standing(ip) > (held, asked):  # it asked more since: back in line
                self._queue_turn(ip)
                continue
            mine = self.held[ip]
            scrape = mine.popleft()
            if mine:
                self._queue_turn(ip)
            else:
                del self.held[ip], self.turns[ip]
            self.tokens -= 1
            self._answer(scrape, now)

    def _answer(self, scrape: Scrape, now: float) -> None:
        body = self._rendered(now) if scrape.code == 200 else scrape.error_body
        kind = CONTENT_TYPE if scrape.code == 200 else "text/plain; charset=utf-8"
        head = (f"HTTP/1.1 {scrape.code} {REASONS[scrape.code]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("ascii")
        scrape.answer = memoryview(head + body)
        scrape.state = SENDING
        self._send(scrape)
        if scrape.state == SENDING and scrape in self.scrapes and not scrape.registered:
            self._watch(scrape, selectors.EVENT_WRITE)

    def _rendered(self, now: float) -> bytes:
        if now - self._rendered_at >= RENDER_INTERVAL:
            self._body = self.render()
            self._rendered_at = now
        return self._body

    def _send(self, scrape: Scrape) -> None:
        assert scrape.answer is not None
        try:
            sent = scrape.sock.send(scrape.answer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._end(scrape, None)
            return
        scrape.answer = scrape.answer[sent:]
        if not scrape.answer:
            self._end(scrape, None)

    def _end(self, scrape: Scrape, reason: str | None) -> None:
        """Close one connection; reason counts one dropped without its answer."""
        if scrape not in self.scrapes:
            return
        del self.scrapes[scrape]
        self.reading.pop(scrape, None)
        self.answering.pop(scrape, None)
        self.per_ip[scrape.ip] -= 1
        if not self.per_ip[scrape.ip]:
            del self.per_ip[scrape.ip]
        if scrape.state == HELD:
            mine = self.held[scrape.ip]
            mine.remove(scrape)
            if not mine:
                del self.held[scrape.ip], self.turns[scrape.ip]
        if scrape.registered and self.selector is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.selector.unregister(scrape.sock)
        scrape.sock.close()
        if reason is not None:
            self.dropped[reason] += 1


def _route(request: bytes) -> tuple[int, bytes]:
    """The answer's status, and its body unless it is the metrics (rendered in turn)."""
    parts = request.split(b"\r\n", 1)[0].split(b"\n", 1)[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return 400, b"bad request\n"
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if method != b"GET":
        return 405, b"only GET\n"
    if target != b"/metrics":
        return 404, b"qmqpd: metrics are at /metrics\n"
    return 200, b""
