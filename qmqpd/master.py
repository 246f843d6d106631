"""The master: one selector loop that accepts, applies rules and limits, and hands off.

accept -> [PROXY_PROTOCOL: the PROXY header, read and consumed, from PROXY_TRUSTED only,
within PROXY_TIMEOUT; it names the client] -> rules (deny: close, nothing sent) -> MAXPERIP
(over: Z and close) -> wait for the request (FIRST_BYTE_TIMEOUT for its first bytes, then
the MIN_RATE rule until the whole request or HANDOFF_BYTES of it are in the socket; an
idle or slow socket costs a descriptor, never a worker) -> MAXDAEMONS (all busy: the
connection waits, oldest first) -> the fd and the client's facts go to an idle worker.
The per-IP slot is taken once the client is known (at accept, or after its PROXY header)
and released exactly once: when a waiting connection is closed, when the worker reports
done, or when it is reaped holding the session.

Accounting is exact: a worker says done before it answers, and the master reads every
record its workers have sent before it accepts, refuses, hands off or forks (the worker
channels sit in their own selector, polled without waiting first), so a client that
reconnects at once is never counted twice.

The master never dies of load: RLIMIT_NOFILE is raised to its hard limit at start, the
client sockets it holds (waiting and lingering) are kept within a DescriptorBudget, and
EMFILE/ENFILE/ENOBUFS/ENOMEM anywhere in the loop shed load (close lingerers, then the
oldest idle connection; pause accepting) instead of ending it.

Signal handlers only record the signal; the loop acts on it (TERM/INT drain and exit,
HUP reload, CHLD reap). The master never parses mail.

It counts what it sees (connections handed, denied, refused; each session's answer and
stage verdicts from the workers' done records) and keeps STATUS_FILE for `qmqpd status`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import heapq
import itertools
import os
import selectors
import signal
import socket
import struct
import termios
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from qmqpd import log, metrics, procctl, proxy, status
from qmqpd.config import Config, ConfigError, problem
from qmqpd.limits import Capacity, DescriptorBudget, PerIpCounter, fold_ip
from qmqpd.message import Client, Reply
from qmqpd.pool import BootFailure, Ended, Exit, Pool, State, Worker
from qmqpd.rules import Rule, RuleTable

# Refused clients: after the Z, read and drop what they still send (bounded) so the
# answer is not destroyed by a reset, then close.
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024
LINGER_MAX = 1024
# At most one "all MAXDAEMONS busy" warning per this many seconds; the same for shedding.
BUSY_WARNING_INTERVAL = 60.0
SHED_WARNING_INTERVAL = 10.0
# After running out of descriptors or memory, stop accepting this long.
ACCEPT_PAUSE = 0.5
# Connections accepted in one go before the loop looks at timers and signals again.
ACCEPT_BATCH = 256
# The kernel's queue of connections not yet accepted: the master accepts eagerly (idle
# ones wait in the master without a worker), so this only absorbs bursts of connects.
LISTEN_BACKLOG = 1024
# Longest sleep of the loop: bounds how late a deadline is noticed.
TICK = 1.0
# Settings a HUP cannot change: the sockets are bound and privileges dropped.
RESTART_ONLY = ("LOCALIP", "PORT", "USER", "GROUP", "STATUS_FILE", "METRICS")
# The errors that mean "out of descriptors or memory": shed load, never exit.
SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A connection goes to a worker once its whole request, or this much of it, is in the
# socket: a worker then reads at memory speed instead of waiting on the client. Far below
# the kernel's receive buffer (128 KiB by default), so the window never closes first.
HANDOFF_BYTES = 64 * 1024
# The QMQP length prefix: up to this many digits then ':' (10 GB); a longer one goes to a
# worker at once, which answers it as it would any other.
LENGTH_DIGITS = 10
# Bytes peeked to read the prefix: the digits, the colon and a little of what follows.
PREFIX_PEEK = 16
# As a plain int: OR-ing the IntFlag members costs an enum construction per peek.
_PEEK_FLAGS = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)

# How often the loop looks whether the rules cdb was replaced (one stat).
RULES_CHECK_INTERVAL = 1.0

_LISTEN = "listen"
_WAKEUP = "wakeup"
_WORKERS = "workers"


@dataclass(eq=False)
class _Linger:
    sock: socket.socket
    deadline: float
    left: int = LINGER_BYTES


class Plans(Protocol):
    """The validated session plans of one configuration (qmqpd.plan.PlanBook), made by the
    planner `cli` passes in, so the master never loads filter or queue code itself."""

    def settings(self, env: Mapping[str, str | None]) -> Config: ...

    def rules_changed(self) -> bool: ...


Planner = Callable[[Config], Plans]  # raises ConfigError naming every bad setting
# A worker's entry gets the plans current when it was forked.
PlannedEntry = Callable[[socket.socket, Any], None]


class ListenError(Exception):
    def __init__(self, address: str, port: int, error: OSError) -> None:
        super().__init__(f"cannot listen on {address} port {port}: {error.strerror or error}")
        self.address_problem = not isinstance(error, socket.gaierror) and error.errno in (
            errno.EADDRINUSE, errno.EACCES)


# What a waiting connection waits for.
_HEADER = "header"  # its PROXY header: no rule and no per-IP slot yet
_FIRST = "first"  # its first bytes (FIRST_BYTE_TIMEOUT)
_REQUEST = "request"  # the rest of its request, or HANDOFF_BYTES of it (MIN_RATE)
_WORKER = "worker"  # an idle worker: it has what it needs


@dataclass(eq=False)
class _Waiting:
    """An accepted connection without a worker. It may first wait for its PROXY header
    (read and consumed here), then, once rules and MAXPERIP let it in (it then holds a
    per-IP slot), for its request: its bytes are only peeked, so the worker reads the whole
    request from the socket. Last, if every worker is busy, it waits for a worker."""

    sock: socket.socket
    peer: tuple[str, int]
    started: float  # accepted (or its PROXY header read): the MIN_RATE clock starts here
    phase: str = _FIRST
    deadline: float = 0.0  # of the current phase (the one armed in Master.timers)
    ip: str = ""  # the client's IP once it holds a per-IP slot
    client: Client | None = None
    header: proxy.HeaderReader | None = None
    min_rate: int = 0
    grace: float = 0.0
    lowat: int = 1  # the socket's SO_RCVLOWAT: select() wakes the master only at this
    watched: bool = False  # registered in the master's selector

    @property
    def has_data(self) -> bool:
        return self.phase == _WORKER


def netstring(text: str) -> bytes:
    data = text.encode("utf-8")
    return b"%d:%s," % (len(data), data)


def open_listeners(addresses: tuple[str, ...], port: int, backlog: int) -> list[socket.socket]:
    """One socket per address; `::` also takes IPv4 unless 0.0.0.0 is listed too."""
    listeners = []
    for address in addresses:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                v6only = address != "::" or "0.0.0.0" in addresses
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
            sock.bind((address, port))
            sock.listen(backlog)
            sock.setblocking(False)
        except OSError as error:
            sock.close()
            for opened in listeners:
                opened.close()
            raise ListenError(address, port, error) from None
        listeners.append(sock)
    return listeners


def _request_size(head: bytes) -> int | None:
    """Bytes to wait for before the handoff, from the first bytes of a QMQP request: the
    whole request (`length:...,`) up to HANDOFF_BYTES; None = the length prefix is not
    complete yet; 0 = not a length prefix (the worker answers the protocol error now)."""
    colon = head.find(b":")
    digits = head if colon < 0 else head[:colon]
    if not digits.isdigit() or len(digits) > LENGTH_DIGITS:
        return 0
    if colon < 0:
        return None if len(digits) < LENGTH_DIGITS else 0
    return min(colon + 1 + int(digits) + 1, HANDOFF_BYTES)


def _available(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue (FIONREAD): counted, not copied."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))
    return int(count)


class Master:
    def __init__(self, config: Config, worker_entry: PlannedEntry,
                 config_loader: Callable[[], Config], planner: Planner) -> None:
        self.config = config
        self.worker_entry = worker_entry
        self.config_loader = config_loader
        self.planner = planner
        self.plans: Plans | None = None
        self.next_rules_check = 0.0
        self.unusable_rules: set[str | None] = set()
        self.selector = selectors.DefaultSelector()
        # worker channels apart, so they can be read without waiting before every admit
        self.worker_selector = selectors.DefaultSelector()
        self.listeners: list[socket.socket] = []
        # both in arrival order: the oldest goes first when descriptors run short
        self.lingering: dict[_Linger, None] = {}
        self.waiting: dict[_Waiting, None] = {}
        self.ready: deque[_Waiting] = deque()  # have their request, wait for a worker
        # deadlines of waiting connections; an entry whose connection moved on is stale
        self.timers: list[tuple[float, int, _Waiting]] = []
        self.timer_order = itertools.count()
        self.proxy = proxy.Policy()
        self.per_ip = PerIpCounter()
        self.capacity = Capacity(config.maxdaemons)
        self.budget = DescriptorBudget(1024, config.maxdaemons + config.prefork)
        self.hostname = socket.gethostname()
        self.rules = RuleTable(None)
        self.pool: Pool | None = None
        self.signals: list[int] = []
        self.wakeup_r, self.wakeup_w = -1, -1
        self.accepting = True
        self.watching = False
        self.stop_deadline: float | None = None
        self.next_busy_warning = 0.0
        self.next_shed_warning = 0.0
        self.accept_paused_until = 0.0
        self.spawn_failures = 0
        self.title = ""
        self.title_shows: tuple[object, ...] = ()
        self.counters = status.SessionCounters()
        self.status = status.StatusWriter(config.status_file)
        self.started_at = time.time()
        self.listen_names: list[str] = []
        self.metrics = (metrics.Exporter(config.metrics, self._status,
                                         lambda: metrics.queue_dirs(self.config))
                        if config.metrics else None)

    # ---- start --------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        self.proxy = proxy.Policy.from_config(cfg)  # ValueError: refuse the start
        nofile = procctl.raise_fd_limit()
        # the metrics endpoint's connections come out of the limit before the clients'
        scrapes = self.metrics.size(nofile) if self.metrics is not None else 0
        self.budget = DescriptorBudget(nofile - scrapes, cfg.maxdaemons + cfg.prefork)
        try:
            self.listeners = open_listeners(cfg.localip, cfg.port,
                                            max(LISTEN_BACKLOG, cfg.maxdaemons))
        except ListenError as error:
            setting = "PORT" if error.address_problem else "LOCALIP"
            raise problem(setting, cfg.source(setting), str(error)) from None
        for sock in self.listeners:
            host, port = sock.getsockname()[:2]
            log.event("listen", addr=host, port=port, nofile=nofile,
                      client_fds=self.budget.clients)
            self.listen_names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        if self.metrics is not None:  # before the privilege drop: the port may be low
            self.metrics.open()
            self.metrics.register(self.selector)
        self.status.prepare(*_owner(cfg))
        procctl.drop_privileges(cfg.user, cfg.group)
        self.plans = self.planner(cfg)  # as the workers' user: keys, queues, every rule
        self.rules = self._open_rules(cfg)
        self._install_signals()
        self.selector.register(self.worker_selector.fileno(), selectors.EVENT_READ, _WORKERS)
        gc.collect()
        gc.freeze()
        self.pool = Pool(self._enter_worker, cfg, self.worker_selector,
                         after_fork=self._in_child)

    def _enter_worker(self, channel: socket.socket, _config: Config) -> None:
        """In a fresh worker: serve with the plans that were current at the fork."""
        self.worker_entry(channel, self.plans)

    def _open_rules(self, cfg: Config) -> RuleTable:
        if not cfg.rules:
            log.warning("RULES is not set: every client but loopback is denied",
                        setting="RULES")
            return RuleTable(None)
        return RuleTable(cfg.rules, report=lambda reason: log.error(
            "rules unusable; denying clients", rules=cfg.rules, reason=reason))

    def _install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, _WAKEUP)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.append(signum)

    def _in_child(self) -> None:
        """In a fresh worker: drop every master resource it inherited."""
        for sock in self.listeners:
            sock.close()
        for linger in self.lingering:
            linger.sock.close()
        for conn in self.waiting:
            conn.sock.close()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.metrics is not None:
            self.metrics.close()
        self.selector.close()
        self.worker_selector.close()

    # ---- loop ---------------------------------------------------------------------------
    def run(self) -> int:
        assert self.pool is not None
        try:
            while self.accepting or self.pool.workers:
                try:
                    self._tick()
                except OSError as error:
                    if error.errno not in SHORTAGE:
                        raise
                    self._short_of(error, time.monotonic())
                self._replan_if_rules_changed(time.monotonic())
        except BootFailure as failure:
            log.error("cannot start workers; stopping", reason=str(failure))
            self._abort()
            self._final_status(111)
            return 111
        self._close_clients()
        self._final_status(0)
        log.event("exit", status=0)
        return 0

    def _tick(self) -> None:
        assert self.pool is not None
        now = time.monotonic()
        self._handle_signals(now)
        self._poll_workers(now)
        self._release_exits(self.pool.reap(now))
        if not self.accepting and not self.pool.workers:
            return  # drained: exit now, not after the next sleep
        self.pool.maintain(now)
        self._note_spawn_failures(now)
        self._expire_lingering(now)
        if self.metrics is not None:
            self.metrics.expire(now)
        self._expire_waiting(now)
        self._serve_ready(now)
        self._watch_listeners(now)
        self._set_title()
        self.status.maybe_write(now, self._status)
        for key, _mask in self.selector.select(self._timeout(now)):
            self._dispatch(key.data, key.fileobj, time.monotonic())

    def _timeout(self, now: float) -> float:
        assert self.pool is not None
        soonest = [now + TICK]
        deadline = self.pool.next_deadline()
        if deadline is not None:
            soonest.append(deadline)
        if self.stop_deadline is not None:
            soonest.append(self.stop_deadline)
        if self.accept_paused_until > now:
            soonest.append(self.accept_paused_until)
        if self.timers:
            soonest.append(self.timers[0][0])
        if self.metrics is not None and (wakeup := self.metrics.next_wakeup()) is not None:
            soonest.append(wakeup)
        return max(0.0, min(soonest) - now)

    def _dispatch(self, data: object, fileobj: object, now: float) -> None:
        if data is _WAKEUP:
            self._drain_wakeup()
        elif data is _WORKERS:
            self._poll_workers(now)
        elif data is _LISTEN:
            assert isinstance(fileobj, socket.socket)
            self._accept(fileobj, now)
        elif isinstance(data, _Waiting):
            self._readable(data, now)
        elif isinstance(data, _Linger):
            self._linger_read(data)
        elif self.metrics is not None and self.metrics.owns(data):
            self.metrics.handle(data, now)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    # ---- workers ------------------------------------------------------------------------
    def _poll_workers(self, now: float) -> None:
        """Read every record the workers have sent so far, without waiting, then give the
        workers that became idle to connections waiting for one."""
        assert self.pool is not None
        for key, _mask in self.worker_selector.select(0):
            worker = key.data
            assert isinstance(worker, Worker)
            if worker.pid in self.pool.workers:
                ended = self.pool.on_readable(worker, now)
                if ended is not None:
                    self._session_ended(ended)
        self._serve_ready(now)

    def _note_spawn_failures(self, now: float) -> None:
        assert self.pool is not None
        if self.pool.spawn_failures != self.spawn_failures:
            self.spawn_failures = self.pool.spawn_failures
            self._shed(now, "a worker could not be started")

    # ---- accept -------------------------------------------------------------------------
    def _held(self) -> int:
        """Client sockets the master holds (they count against its descriptor budget)."""
        return len(self.lingering) + len(self.waiting)

    def _can_take(self, now: float) -> bool:
        if not self.accepting or now < self.accept_paused_until:
            return False
        # at the budget, only if an older socket can be given up for the new one
        return not self.budget.over(self._held()) or self._sheddable()

    def _sheddable(self) -> bool:
        return bool(self.lingering) or len(self.waiting) > len(self.ready)

    def _watch_listeners(self, now: float) -> None:
        want = self._can_take(now)
        if want != self.watching:
            for sock in self.listeners:
                if want:
                    self.selector.register(sock, selectors.EVENT_READ, _LISTEN)
                else:
                    self.selector.unregister(sock)
            self.watching = want
        if self.ready and self.capacity.full and now >= self.next_busy_warning:
            log.warning("all sessions busy; clients wait for a worker; "
                        "raise MAXDAEMONS if this persists",
                        setting="MAXDAEMONS", maxdaemons=self.capacity.maximum,
                        waiting=len(self.ready),
                        busiest=",".join(f"{ip}={n}" for ip, n in self.per_ip.busiest(3)))
            self.next_busy_warning = now + BUSY_WARNING_INTERVAL

    def _accept(self, listener: socket.socket, now: float) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._can_take(now):
                return
            if self.budget.over(self._held()):
                self._shed_one()
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in SHORTAGE:
                    self._short_of(error, now)
                    return
                if error.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    log.error("accept failed; pausing", error=error.strerror)
                    self.accept_paused_until = now + ACCEPT_PAUSE
                    return
                continue
            # Exact accounting: read the workers' records after the accept. This client
            # connected after its previous session's answer, which its worker sent only
            # after its done record; so that done is readable now (before the accept it
            # might not have been yet, and the client would be counted twice).
            self._poll_workers(now)
            try:
                self._admit(conn, peer, now)
            except OSError as error:  # the client went away while we looked at it
                log.event("drop", ip=fold_ip(str(peer[0])), error=error.strerror)
                self.counters.connection("dropped")
                conn.close()

    def _admit(self, conn: socket.socket, peer: tuple, now: float,
               local: tuple | None = None) -> None:
        """Rules, MAXPERIP, then the wait for the request. local is the address the client
        connected to, when a PROXY header named it (peer is then the header's client)."""
        if local is None and self.proxy.enabled:
            self._await_proxy_header(conn, peer, now)
            return
        ip = fold_ip(str(peer[0]))
        rule = self._lookup(ip)
        if not rule.allow:
            log.event("deny", ip=ip, rule=rule.key, reason=rule.reason or None)
            self._count_refusal(ip, "denied")
            conn.close()
            return
        settings = self._rule_settings(rule)
        limit = int(settings.maxperip)
        if not self.per_ip.acquire(ip, limit):
            log.event("perip_limit", ip=ip, count=self.per_ip.count(ip), maxperip=limit,
                      answer=Reply.named("too_many_per_ip").line)
            self._count_refusal(ip, "refused_perip")
            self._refuse(conn, now)
            return
        try:  # the socket stays blocking: it goes to the worker as accepted
            client = self._client(conn, ip, peer, rule, local)
        except OSError:
            self.per_ip.release(ip)
            raise
        waiting = _Waiting(conn, (ip, int(peer[1])), now, ip=ip, client=client,
                           min_rate=int(settings.min_rate), grace=float(settings.rate_grace))
        self.waiting[waiting] = None
        self._arm(waiting, now + self.config.first_byte_timeout)
        self._look(waiting, now, woken=False)  # often the request is there already
        if waiting.phase == _WORKER or waiting not in self.waiting:
            return
        self._watch(waiting, now)

    def _rule_settings(self, rule: Rule) -> Config:
        """The rule's validated settings (rule env over the global), as its worker applies
        them: MAXPERIP here, MIN_RATE and RATE_GRACE in the wait for the request."""
        assert self.plans is not None
        try:
            return self.plans.settings(rule.env)
        except ConfigError as error:  # only a rule added after the last planning
            if rule.key not in self.unusable_rules:  # once per rule, not per connection
                self.unusable_rules.add(rule.key)
                log.warning("rule settings unusable; using the global ones",
                            rule=rule.key, error=str(error))
            return self.config

    def _lookup(self, ip: str) -> Rule:
        try:
            return self.rules.lookup(ip)
        except Exception as error:  # an unreadable cdb drops the client, as tcpserver does
            return Rule(False, {}, None, f"rules lookup failed: {error}")

    def _client(self, conn: socket.socket, ip: str, peer: tuple, rule: Rule,
                local: tuple | None = None) -> Client:
        local = local or conn.getsockname()
        return Client(
            remote_ip=ip,
            remote_port=str(peer[1]),
            local_ip=fold_ip(str(local[0])),
            local_port=str(local[1]),
            local_host=self.hostname,
            proto="TCP6" if ":" in ip else "TCP",
            rule_env=dict(rule.env),
        )

    # ---- the PROXY header ---------------------------------------------------------------
    def _await_proxy_header(self, conn: socket.socket, peer: tuple, now: float) -> None:
        """PROXY_PROTOCOL on: only a trusted balancer may connect, and its header is read
        before anything else. Until then the connection counts against no client's
        MAXPERIP (its client is not known), only against the descriptor budget."""
        peer_ip = fold_ip(str(peer[0]))
        try:
            self.proxy.check_source(peer_ip)
        except proxy.ProxyError as error:
            self._proxy_rejected(peer_ip, str(error))
            conn.close()
            return
        waiting = _Waiting(conn, (peer_ip, int(peer[1])), now, phase=_HEADER,
                           header=self.proxy.reader())
        self.waiting[waiting] = None
        self._arm(waiting, now + self.proxy.timeout)
        self._watch(waiting, now)  # read when readable: the socket is blocking

    def _read_proxy_header(self, conn: _Waiting, now: float) -> None:
        assert conn.header is not None
        try:
            header = conn.header.read(conn.sock)
        except proxy.ProxyError as error:
            self._close_waiting(conn, str(error), rejected=True)
            return
        except OSError as error:
            self._close_waiting(conn, error.strerror or str(error), rejected=True)
            return
        if header is None:
            return  # a part of it: the rest within PROXY_TIMEOUT
        client = self.proxy.client_of(header, conn.peer)
        self._forget(conn)
        try:
            local = (header.destination if header.source is not None
                     else conn.sock.getsockname())
            self._admit(conn.sock, client, now, local=local)
        except OSError as error:  # the client went away while we looked at it
            log.event("drop", ip=fold_ip(str(client[0])), error=error.strerror)
            self.counters.connection("dropped")
            conn.sock.close()

    def _proxy_rejected(self, ip: str, reason: str) -> None:
        log.event("proxy_reject", ip=ip, reason=reason)
        self._count_refusal(ip, "proxy_rejected")

    def _count_refusal(self, ip: str, result: str) -> None:
        """A connection turned away: counted in the status and, per IP, in the metrics."""
        self.counters.connection(result)
        if self.metrics:
            self.metrics.refused(ip, result)

    # ---- connections waiting for their request, then for a worker -----------------------
    def _arm(self, conn: _Waiting, deadline: float) -> None:
        conn.deadline = deadline
        heapq.heappush(self.timers, (deadline, next(self.timer_order), conn))

    def _watch(self, conn: _Waiting, now: float) -> None:
        try:
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        except OSError as error:
            self._close_waiting(conn, "cannot watch the connection")
            if error.errno in SHORTAGE:
                self._short_of(error, now)
            return
        conn.watched = True

    def _unwatch(self, conn: _Waiting) -> None:
        """Out of the selector, if in it: a request already there when accepted was never
        watched (asking the selector instead costs a formatted KeyError per connection)."""
        if not conn.watched:
            return
        conn.watched = False
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)

    def _readable(self, conn: _Waiting, now: float) -> None:
        if conn not in self.waiting or conn.phase == _WORKER:
            return
        if conn.phase == _HEADER:
            self._read_proxy_header(conn, now)
        else:
            self._look(conn, now, woken=True)

    def _look(self, conn: _Waiting, now: float, woken: bool) -> None:
        """Peek at the request's first bytes and count the rest: hand the connection over
        once the whole request or HANDOFF_BYTES of it are in the socket, or its length
        prefix is malformed; else let select() wake the master only when enough has come
        (SO_RCVLOWAT), so a large request is not peeked again for every segment."""
        try:
            head = conn.sock.recv(PREFIX_PEEK, _PEEK_FLAGS)
            available = _available(conn.sock) if head else 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset, or anything else: the connection is of no further use
            head = b""
        if not head:
            self._close_waiting(conn, "closed before sending" if conn.phase == _FIRST
                                else "closed before its request was complete")
            return
        size = _request_size(head)
        if size == 0 or (size is not None and available >= size):
            self._to_worker(conn, now, woken)
            return
        if woken and available < conn.lowat:
            # Woken below the mark: the client closed its side, or the kernel's buffer is
            # under pressure. Nothing more will come by waiting; the worker takes over.
            self._to_worker(conn, now, woken)
            return
        wanted = size if size is not None else len(head) + 1
        if wanted != conn.lowat and not self._set_lowat(conn, wanted):
            return
        if conn.phase == _FIRST:
            conn.phase = _REQUEST
            self._arm(conn, self._rate_deadline(conn, available))

    def _set_lowat(self, conn: _Waiting, lowat: int) -> bool:
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        except OSError as error:
            self._close_waiting(conn, error.strerror or str(error))
            return False
        conn.lowat = lowat
        return True

    def _rate_deadline(self, conn: _Waiting, available: int) -> float:
        """The worker's MIN_RATE rule: RATE_GRACE from the connect, then 1/MIN_RATE seconds
        for each byte sent; with MIN_RATE 0, the handoff after RATE_GRACE."""
        if conn.min_rate <= 0:
            return conn.started + conn.grace
        return conn.started + conn.grace + available / conn.min_rate

    def _to_worker(self, conn: _Waiting, now: float, woken: bool) -> None:
        """The connection has what it needs: queue it for a worker (oldest first)."""
        if conn.lowat != 1 and not self._set_lowat(conn, 1):  # the worker reads as usual
            return
        self._unwatch(conn)  # watched unless just accepted
        conn.phase = _WORKER
        self.ready.append(conn)
        if woken:
            self._poll_workers(now)  # hands it at once if a worker is idle

    def _serve_ready(self, now: float) -> None:
        """Hand connections that have their request to idle workers, oldest first."""
        assert self.pool is not None
        while self.ready and self.accepting and not self.capacity.full:
            worker = self.pool.take_idle()
            if worker is None:
                return
            conn = self.ready.popleft()
            del self.waiting[conn]
            self.capacity.acquire()
            if self._hand(conn, worker, now):
                self.counters.connection("handed")
            else:
                self._release(conn.ip)
                self.counters.connection("dropped")
                log.event("drop", ip=conn.ip, error="no worker could take the connection")
            conn.sock.close()

    def _hand(self, conn: _Waiting, worker: Worker | None, now: float) -> bool:
        """To worker (idle, just taken), else to the next idle one that can take it."""
        assert self.pool is not None and conn.client is not None
        while worker is not None:
            if self.pool.hand(worker, conn.sock.fileno(), conn.client, conn.ip, now):
                return True
            worker = self.pool.take_idle()
        return False

    def _close_waiting(self, conn: _Waiting, reason: str, rejected: bool = False) -> None:
        """Close a connection that has no worker; rejected = its PROXY header failed."""
        if not self._forget(conn):
            return
        if rejected:
            self._proxy_rejected(conn.peer[0], reason)
        else:
            self.counters.connection("dropped")
            log.event("drop", ip=conn.ip or conn.peer[0], reason=reason)
        conn.sock.close()  # after the log line: a client that sees the close finds it

    def _forget(self, conn: _Waiting) -> bool:
        """Take a waiting connection out of the master's books (the socket stays open);
        False if it was not there."""
        if conn not in self.waiting:
            return False
        del self.waiting[conn]
        if conn.phase == _WORKER:
            self.ready.remove(conn)
        else:
            self._unwatch(conn)
        if conn.ip:
            self.per_ip.release(conn.ip)
        return True

    def _expire_waiting(self, now: float) -> None:
        """Connections past their phase's deadline: no PROXY header within PROXY_TIMEOUT
        or nothing sent within FIRST_BYTE_TIMEOUT: closed; a request arriving slower than
        MIN_RATE: answered Z, as its worker would (none was taken)."""
        while self.timers and self.timers[0][0] <= now:
            deadline, _order, conn = heapq.heappop(self.timers)
            if conn not in self.waiting or conn.deadline != deadline:
                continue  # stale: the connection moved on
            if conn.phase == _HEADER:
                self._close_waiting(conn, "no complete PROXY header within PROXY_TIMEOUT",
                                    rejected=True)
            elif conn.phase == _FIRST:
                self._close_waiting(conn, "nothing sent within FIRST_BYTE_TIMEOUT")
            elif conn.phase == _REQUEST:
                self._check_rate(conn, now)

    def _check_rate(self, conn: _Waiting, now: float) -> None:
        try:
            available = _available(conn.sock)
        except OSError:
            self._close_waiting(conn, "connection lost")
            return
        if conn.min_rate <= 0:  # no rate rule: the worker's TIMEOUT takes over
            self._to_worker(conn, now, woken=True)
            return
        deadline = self._rate_deadline(conn, available)
        if deadline > now:
            self._arm(conn, deadline)
            return
        self._forget(conn)
        with contextlib.suppress(OSError):  # the linger reads whatever comes
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        elapsed = now - conn.started
        error = (f"too slow: {available} bytes in {elapsed:.0f}s, below {conn.min_rate} "
                 f"bytes/s after {conn.grace:g}s")
        reply = Reply.named("too_slow", rate=conn.min_rate).line
        log.event("too_slow", ip=conn.ip, error=error, answer=reply)
        self._count_refusal(conn.ip, "too_slow")
        with contextlib.suppress(OSError):  # its unread bytes would turn the close into a reset
            conn.sock.recv(max(1, available), socket.MSG_DONTWAIT)
        self._refuse(conn.sock, now, reply)

    def _close_clients(self) -> None:
        for conn in list(self.waiting):
            self._close_waiting(conn, "server stopping")
        for linger in list(self.lingering):
            self._end_linger(linger)

    # ---- refused clients ----------------------------------------------------------------
    def _refuse(self, conn: socket.socket, now: float, reply: str = "") -> None:
        """Answer Z (MAXPERIP unless reply says otherwise) so a qmqpc-style client tries
        its next server, then linger briefly."""
        try:
            conn.setblocking(False)
            conn.send(netstring(reply or Reply.named("too_many_per_ip").line))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self.lingering) >= min(LINGER_MAX, self.budget.lingering):
            conn.close()
            return
        linger = _Linger(conn, now + LINGER_SECONDS)
        self.selector.register(conn, selectors.EVENT_READ, linger)
        self.lingering[linger] = None

    def _linger_read(self, linger: _Linger) -> None:
        try:
            data = linger.sock.recv(min(linger.left, 16384))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        linger.left -= len(data)
        if not data or linger.left <= 0:
            self._end_linger(linger)

    def _end_linger(self, linger: _Linger) -> None:
        if linger not in self.lingering:
            return
        del self.lingering[linger]
        self.selector.unregister(linger.sock)
        linger.sock.close()

    def _expire_lingering(self, now: float) -> None:
        for linger in list(self.lingering):
            if linger.deadline > now:
                break
            self._end_linger(linger)

    # ---- shedding -----------------------------------------------------------------------
    def _shed_one(self) -> bool:
        """Give up one held client socket: a lingerer (it has its answer) first, else the
        oldest connection that has sent nothing. False when there is none to give up."""
        if self.lingering:
            self._end_linger(next(iter(self.lingering)))
            return True
        for phases in ((_HEADER, _FIRST), (_REQUEST,)):
            for conn in self.waiting:
                if conn.phase in phases:
                    self._close_waiting(conn, "descriptor budget full; oldest idle closed")
                    return True
        return False

    def _shed(self, now: float, reason: str) -> None:
        """Out of descriptors or memory: free what the master can and pause accepting."""
        freed = 0
        want = max(16, self._held() // 8)
        while freed < want and self._shed_one():
            freed += 1
        self.accept_paused_until = now + ACCEPT_PAUSE
        if now >= self.next_shed_warning:
            log.warning("short of descriptors or memory; shedding load", reason=reason,
                        closed=freed, held=self._held(), client_fds=self.budget.clients)
            self.next_shed_warning = now + SHED_WARNING_INTERVAL

    def _short_of(self, error: OSError, now: float) -> None:
        self._shed(now, error.strerror or str(error))

    # ---- sessions ending ----------------------------------------------------------------
    def _release(self, ip: str) -> None:
        self.per_ip.release(ip)
        self.capacity.release()

    def _session_ended(self, ended: Ended) -> None:
        self._release(ended.session)
        if ended.outcome is None:
            self.counters.session_ended(None, ())
        else:
            self.counters.session_ended(ended.outcome.answer, ended.outcome.stages)
            if self.metrics:
                self.metrics.observe(ended.outcome.session_seconds, ended.outcome.commit_seconds)

    def _release_exits(self, exits: list[Exit]) -> None:
        for gone in exits:
            if gone.session is not None:
                self._release(gone.session)
                self.counters.worker_died()
                log.warning("worker died during a session", worker=gone.worker.pid,
                            ip=gone.session, status=gone.description)
            elif gone.status != 0 and not gone.worker.signals_sent:  # not one we stopped
                log.event("worker_exit", worker=gone.worker.pid, status=gone.description)

    # ---- signals ------------------------------------------------------------------------
    def _handle_signals(self, now: float) -> None:
        pending, self.signals = self.signals, []
        for signum in pending:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self._shutdown(now)
            elif signum == signal.SIGHUP:
                self._reload()

    def _shutdown(self, now: float) -> None:
        assert self.pool is not None
        if not self.accepting:  # a second TERM: do not wait any longer
            log.event("shutdown", phase="now")
            self.pool.hurry(now)
            return
        log.event("shutdown", phase="drain", busy=self.pool.busy,
                  grace=self.config.shutdown_timeout)
        self.accepting = False
        if self.watching:
            for sock in self.listeners:
                self.selector.unregister(sock)
            self.watching = False
        for sock in self.listeners:
            sock.close()
        # not yet handed to a worker: no session in progress, the client retries elsewhere
        for conn in list(self.waiting):
            self._close_waiting(conn, "server stopping")
        self.stop_deadline = now + self.config.shutdown_timeout
        self.pool.stop(now, self.stop_deadline)

    def _reload(self) -> None:
        assert self.pool is not None
        if not self.accepting:
            return
        try:
            new = self.config_loader()
            plans = self.planner(new)
            policy = proxy.Policy.from_config(new)
            rules = self._open_rules(new)
        except Exception as error:
            log.error("reload failed; keeping the running config", error=str(error))
            return
        stuck = [name for name in RESTART_ONLY if new[name] != self.config[name]]
        if stuck:
            log.warning("these settings take effect only after a restart",
                        settings=",".join(stuck))
        self.rules.close()
        self.rules = rules
        self.config = new
        self.plans = plans
        self.unusable_rules.clear()
        self.proxy = policy
        self.capacity.resize(new.maxdaemons)
        self.budget = DescriptorBudget(self.budget.nofile, new.maxdaemons + new.prefork)
        self.pool.reload(new)
        log.event("reload", generation=self.pool.generation, maxdaemons=new.maxdaemons,
                  maxperip=new.maxperip, prefork=new.prefork)

    def _replan_if_rules_changed(self, now: float) -> None:
        """A replaced rules cdb is planned again: every rule env checked (a bad one is
        one log line, and the running plans stay), the plans kept for workers forked from
        now on. Running workers are not restarted: they plan a rule env new to them on
        its first client, validated the same way."""
        if now < self.next_rules_check or self.plans is None or not self.accepting:
            return
        self.next_rules_check = now + RULES_CHECK_INTERVAL
        if not self.plans.rules_changed():
            return
        try:
            plans = self.planner(self.config)
        except Exception as error:
            log.error("rules changed but cannot be used; keeping the running plans",
                      rules=self.config.rules, error=str(error))
            return
        self.plans = plans
        self.unusable_rules.clear()
        log.event("replan", reason="rules changed", rules=self.config.rules)

    def _abort(self) -> None:
        assert self.pool is not None
        self.pool.spawning = False
        self.pool.kill_all()
        deadline = time.monotonic() + 5.0
        while self.pool.workers and time.monotonic() < deadline:
            self.pool.reap(time.monotonic())
            time.sleep(0.05)

    # ---- status -------------------------------------------------------------------------
    def _status(self, state: str = "") -> dict[str, object]:
        """What `qmqpd status` shows; no mail content, only counts and client IPs."""
        assert self.pool is not None
        workers = {s.value: len(self.pool.in_state(s)) for s in State}
        return {
            "version": status.FORMAT_VERSION,
            "pid": os.getpid(),
            "state": state or ("running" if self.accepting else "stopping"),
            "started": round(self.started_at, 3),
            "listen": list(self.listen_names),
            "maxdaemons": self.capacity.maximum,
            "maxperip": self.config.maxperip,
            "prefork": self.config.prefork,
            "generation": self.pool.generation,
            "workers": {**workers, "total": len(self.pool.workers)},
            "sessions": self.capacity.busy,
            "waiting": len(self.waiting),
            "clients": len(self.per_ip),
            "busiest": [{"ip": ip, "sessions": count}
                        for ip, count in self.per_ip.busiest(status.TOP_CLIENTS)],
            **self.counters.as_dict(),
        }

    def _final_status(self, code: int) -> None:
        self.status.write(time.monotonic(), {**self._status("stopped"), "exit": code})

    def _set_title(self) -> None:
        """Runs every loop turn: the title is built and set only when what it shows changed."""
        assert self.pool is not None
        busy, idle, waiting = self.capacity.busy, self.pool.idle, len(self.waiting)
        shown = (self.config, busy, idle, waiting, self.accepting)  # config: LOCALIP, PORT
        if shown == self.title_shows:
            return
        self.title_shows = shown
        where = ",".join(f"{cfg_ip}:{self.config.port}" for cfg_ip in self.config.localip)
        title = f"qmqpd: master {where} busy={busy} idle={idle} waiting={waiting}"
        if not self.accepting:
            title += " stopping"
        if title != self.title:
            procctl.set_title(title)
            self.title = title


def _owner(cfg: Config) -> tuple[int, int]:
    """(uid, gid) the master drops to; -1 = unchanged."""
    uid, gid = -1, -1
    if cfg.user:
        uid, gid, _name = procctl.resolve_user(cfg.user)
    if cfg.group:
        gids = procctl.resolve_groups(cfg.group)
        gid = gids[0] if gids else gid
    return uid, gid


def run(config: Config, worker_entry: PlannedEntry, config_loader: Callable[[], Config],
        planner: Planner) -> int:
    """`qmqpd serve`: bind, drop privileges, plan, prefork, serve until TERM; the exit
    status (111 with one line naming the setting when the configuration cannot work)."""
    master = Master(config, worker_entry, config_loader, planner)
    try:
        master.start()
    except (OSError, procctl.ProcError, ValueError) as error:
        log.error("cannot start", error=str(error))
        return 111
    return master.run()
