"""The master: one selector loop that accepts, applies rules and limits, and hands off.

accept -> rules (deny: close, nothing sent) -> MAXPERIP (over: Z and close) -> MAXDAEMONS
(all busy: stop watching the listen sockets; the kernel backlog holds the rest) -> the fd
and the client's facts go to an idle worker. The per-IP slot is released exactly once:
when the worker reports done, or when it is reaped holding the session.

Signal handlers only record the signal; the loop acts on it (TERM/INT drain and exit,
HUP reload, CHLD reap). The master never parses mail.

It counts what it sees (connections handed, denied, refused; each session's answer and
stage verdicts from the workers' done records) and keeps STATUS_FILE for `qmqpd status`.
"""

from __future__ import annotations

import errno
import gc
import os
import select
import selectors
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from qmqpd import log, procctl, status
from qmqpd.config import Config, ConfigError, problem
from qmqpd.limits import Capacity, PerIpCounter, fold_ip
from qmqpd.message import Client, Reply
from qmqpd.pool import BootFailure, Ended, Exit, Pool, State, Worker
from qmqpd.rules import Rule, RuleTable

# Refused clients: after the Z, read and drop what they still send (bounded) so the
# answer is not destroyed by a reset, then close.
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024
LINGER_MAX = 1024
# At most one "all MAXDAEMONS busy" warning per this many seconds.
BUSY_WARNING_INTERVAL = 60.0
# After an accept error such as EMFILE, stop accepting this long.
ACCEPT_PAUSE = 0.5
# Longest sleep of the loop: bounds how late a deadline is noticed.
TICK = 1.0
# Settings a HUP cannot change: the sockets are bound and privileges dropped.
RESTART_ONLY = ("LOCALIP", "PORT", "USER", "GROUP", "STATUS_FILE")

# How often the loop looks whether the rules cdb was replaced (one stat).
RULES_CHECK_INTERVAL = 1.0

_LISTEN = "listen"
_WAKEUP = "wakeup"


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
        self.listeners: list[socket.socket] = []
        self.lingering: set[_Linger] = set()
        self.per_ip = PerIpCounter()
        self.capacity = Capacity(config.maxdaemons)
        self.hostname = socket.gethostname()
        self.rules = RuleTable(None)
        self.pool: Pool | None = None
        self.signals: list[int] = []
        self.wakeup_r, self.wakeup_w = -1, -1
        self.accepting = True
        self.watching = False
        self.stop_deadline: float | None = None
        self.next_busy_warning = 0.0
        self.accept_paused_until = 0.0
        self.title = ""
        self.counters = status.SessionCounters()
        self.status = status.StatusWriter(config.status_file)
        self.started_at = time.time()
        self.listen_names: list[str] = []

    # ---- start --------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        try:
            self.listeners = open_listeners(cfg.localip, cfg.port, max(64, cfg.maxdaemons))
        except ListenError as error:
            setting = "PORT" if error.address_problem else "LOCALIP"
            raise problem(setting, cfg.source(setting), str(error)) from None
        for sock in self.listeners:
            host, port = sock.getsockname()[:2]
            log.event("listen", addr=host, port=port)
            self.listen_names.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        self.status.prepare(*_owner(cfg))
        procctl.drop_privileges(cfg.user, cfg.group)
        self.plans = self.planner(cfg)  # as the workers' user: keys, queues, every rule
        self.rules = self._open_rules(cfg)
        self._install_signals()
        gc.collect()
        gc.freeze()
        self.pool = Pool(self._enter_worker, cfg, self.selector, after_fork=self._in_child)

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
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        self.selector.close()

    # ---- loop ---------------------------------------------------------------------------
    def run(self) -> int:
        assert self.pool is not None
        try:
            while self.accepting or self.pool.workers:
                self._tick()
                self._replan_if_rules_changed(time.monotonic())
        except BootFailure as failure:
            log.error("cannot start workers; stopping", reason=str(failure))
            self._abort()
            self._final_status(111)
            return 111
        self._final_status(0)
        log.event("exit", status=0)
        return 0

    def _tick(self) -> None:
        assert self.pool is not None
        now = time.monotonic()
        self._handle_signals(now)
        self._release_exits(self.pool.reap(now))
        self.pool.maintain(now)
        self._expire_lingering(now)
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
        return max(0.0, min(soonest) - now)

    def _dispatch(self, data: object, fileobj: object, now: float) -> None:
        assert self.pool is not None
        if data is _WAKEUP:
            self._drain_wakeup()
        elif data is _LISTEN:
            assert isinstance(fileobj, socket.socket)
            self._accept(fileobj, now)
        elif isinstance(data, Worker):
            if data.pid in self.pool.workers:
                ended = self.pool.on_readable(data, now)
                if ended is not None:
                    self._session_ended(ended)
        elif isinstance(data, _Linger):
            self._linger_read(data)

    def _drain_wakeup(self) -> None:
        try:
            while os.read(self.wakeup_r, 512):
                pass
        except BlockingIOError:
            pass

    # ---- accept -------------------------------------------------------------------------
    def _can_take(self) -> bool:
        assert self.pool is not None
        if time.monotonic() < self.accept_paused_until:
            return False
        return self.accepting and not self.capacity.full and self.pool.idle > 0

    def _watch_listeners(self, now: float) -> None:
        want = self._can_take()
        if want != self.watching:
            for sock in self.listeners:
                if want:
                    self.selector.register(sock, selectors.EVENT_READ, _LISTEN)
                else:
                    self.selector.unregister(sock)
            self.watching = want
        if self.accepting and self.capacity.full and now >= self.next_busy_warning:
            self._warn_if_waiting(now)

    def _warn_if_waiting(self, now: float) -> None:
        """Warn (rate-limited) only when a client is really waiting in the backlog."""
        waiting, _, _ = select.select(self.listeners, [], [], 0)
        if waiting:
            log.warning("all sessions busy; clients wait in the listen backlog; "
                        "raise MAXDAEMONS if this persists",
                        setting="MAXDAEMONS", maxdaemons=self.capacity.maximum,
                        busiest=",".join(f"{ip}={n}" for ip, n in self.per_ip.busiest(3)))
            self.next_busy_warning = now + BUSY_WARNING_INTERVAL

    def _accept(self, listener: socket.socket, now: float) -> None:
        while self._can_take():
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    # e.g. EMFILE: the connection stays queued; pause instead of spinning
                    log.error("accept failed; pausing", error=error.strerror)
                    self.accept_paused_until = now + ACCEPT_PAUSE
                    return
                continue
            try:
                self._admit(conn, peer, now)
            except OSError as error:  # the client went away while we looked at it
                log.event("drop", ip=fold_ip(str(peer[0])), error=error.strerror)
                self.counters.connection("dropped")
                conn.close()

    def _admit(self, conn: socket.socket, peer: tuple, now: float) -> None:
        ip = fold_ip(str(peer[0]))
        rule = self._lookup(ip)
        if not rule.allow:
            log.event("deny", ip=ip, rule=rule.key, reason=rule.reason or None)
            self.counters.connection("denied")
            conn.close()
            return
        limit = self._rule_limit(rule)
        if not self.per_ip.acquire(ip, limit):
            log.event("perip_limit", ip=ip, count=self.per_ip.count(ip), maxperip=limit,
                      answer=Reply.named("too_many_per_ip").line)
            self.counters.connection("refused_perip")
            self._refuse(conn, now)
            return
        self.capacity.acquire()
        client = self._client(conn, ip, peer, rule)
        if self._hand(conn, client, ip, now):
            self.counters.connection("handed")
        else:
            self._release(ip)
            self.counters.connection("dropped")
            log.event("drop", ip=ip, error="no worker could take the connection")
        conn.close()

    def _rule_limit(self, rule: Rule) -> int:
        """MAXPERIP from the rule's validated settings (rule env over the global)."""
        assert self.plans is not None
        try:
            return int(self.plans.settings(rule.env).maxperip)
        except ConfigError as error:  # only a rule added after the last planning
            if rule.key not in self.unusable_rules:  # once per rule, not per connection
                self.unusable_rules.add(rule.key)
                log.warning("rule settings unusable; using the global MAXPERIP",
                            rule=rule.key, error=str(error))
            return int(self.config.maxperip)

    def _lookup(self, ip: str) -> Rule:
        try:
            return self.rules.lookup(ip)
        except Exception as error:  # an unreadable cdb drops the client, as tcpserver does
            return Rule(False, {}, None, f"rules lookup failed: {error}")

    def _client(self, conn: socket.socket, ip: str, peer: tuple, rule: Rule) -> Client:
        local = conn.getsockname()
        return Client(
            remote_ip=ip,
            remote_port=str(peer[1]),
            local_ip=fold_ip(str(local[0])),
            local_port=str(local[1]),
            local_host=self.hostname,
            proto="TCP6" if ":" in ip else "TCP",
            rule_env=dict(rule.env),
        )

    def _hand(self, conn: socket.socket, client: Client, ip: str, now: float) -> bool:
        assert self.pool is not None
        while (worker := self.pool.take_idle()) is not None:
            if self.pool.hand(worker, conn.fileno(), client, ip, now):
                return True
        return False

    def _refuse(self, conn: socket.socket, now: float) -> None:
        """Answer Z so a qmqpc-style client tries its next server, then linger briefly."""
        try:
            conn.setblocking(False)
            conn.send(netstring(Reply.named("too_many_per_ip").line))
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self.lingering) >= LINGER_MAX:
            conn.close()
            return
        linger = _Linger(conn, now + LINGER_SECONDS)
        self.lingering.add(linger)
        self.selector.register(conn, selectors.EVENT_READ, linger)

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
        self.lingering.discard(linger)
        self.selector.unregister(linger.sock)
        linger.sock.close()

    def _expire_lingering(self, now: float) -> None:
        for linger in [item for item in self.lingering if item.deadline <= now]:
            self._end_linger(linger)

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
        self.pool.stop(now)
        self.stop_deadline = now + self.config.shutdown_timeout
        self.pool.hurry(self.stop_deadline)

    def _reload(self) -> None:
        assert self.pool is not None
        if not self.accepting:
            return
        try:
            new = self.config_loader()
            plans = self.planner(new)
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
        self.capacity.resize(new.maxdaemons)
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
            "clients": len(self.per_ip),
            "busiest": [{"ip": ip, "sessions": count}
                        for ip, count in self.per_ip.busiest(status.TOP_CLIENTS)],
            **self.counters.as_dict(),
        }

    def _final_status(self, code: int) -> None:
        self.status.write(time.monotonic(), {**self._status("stopped"), "exit": code})

    def _set_title(self) -> None:
        assert self.pool is not None
        where = ",".join(f"{cfg_ip}:{self.config.port}" for cfg_ip in self.config.localip)
        title = f"qmqpd: master {where} busy={self.capacity.busy} idle={self.pool.idle}"
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
