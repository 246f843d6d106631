"""The master: the loop and the lifecycle.

Owns: the selector, the signals, the order of one loop `turn()` — signals by name →
settle worker records → timers → select → dispatch — and start, reload, stop and abort.
It wires the parts together and keeps no connection or slot state of its own:
  listen.Listeners   the listening sockets (paused while no client can be taken)
  admission          PROXY policy, rules (one watcher), MAXPERIP → Deny / Refuse / Admit
  lobby.Lobby        connections without a worker, each phase with a deadline
  limits.Ledger      the slots; a `Lease` goes lobby → worker and is released once
  pool.Pool          the workers; `poll()` says which sessions ended and who died
  status.Observer    counters, status file, metrics feed, process title
Called by: `qmqpd serve` (cli) through `run()`.
Never touches: mail (no protocol, filter, injector or queue code is loaded here).

Exact accounting: a worker says done before it answers its client, and the master
settles every worker record (`settle`) in two places only: at the start of each turn,
and right after each accept, before the new client is admitted, so a client that
reconnects at once is never counted twice.

The master never dies of load or of a bookkeeping slip: RLIMIT_NOFILE is raised to its
hard limit, held client sockets stay within a DescriptorBudget, EMFILE/ENFILE/ENOBUFS/
ENOMEM shed load (lingerers, then the oldest idle connections; accepting paused) instead
of ending the loop, and whatever else escapes the loop stops the workers in order, writes
a final status and exits 111.
"""

from __future__ import annotations

import errno
import gc
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from types import FrameType
from typing import Any, Protocol

from qmqpd import admission, listen, log, metrics, procctl, proxy, status
from qmqpd.config import Config, problem
from qmqpd.limits import DescriptorBudget, Ledger
from qmqpd.lobby import HEADER_READ, SHORT, Conn, Event, Lobby
from qmqpd.pool import BootFailure, Ended, Exit, Pool, State

BUSY_WARNING_INTERVAL = 60.0  # at most one "all MAXDAEMONS busy" warning per this long
SHED_WARNING_INTERVAL = 10.0
ACCEPT_PAUSE = 0.5  # after running out of descriptors or memory, stop accepting this long
ACCEPT_BATCH = 256  # accepted in one go before the loop looks at timers and signals again
TICK = 1.0  # longest sleep of the loop: bounds how late a deadline is noticed
ABORT_GRACE = 5.0  # an aborting master waits this long for TERMed workers, then KILLs
# Settings a HUP cannot change: the sockets are bound and privileges dropped.
RESTART_ONLY = ("LOCALIP", "PORT", "USER", "GROUP", "STATUS_FILE", "METRICS")
# The errors that mean "out of descriptors or memory": shed load, never exit.
SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LISTEN, _WAKEUP, _WORKERS = "listen", "wakeup", "workers"


class Plans(Protocol):
    """The validated session plans of one configuration (qmqpd.plan.PlanBook), made by the
    planner `cli` passes in, so the master never loads filter or queue code itself."""

    def settings(self, env: Mapping[str, str | None]) -> Config: ...


Planner = Callable[[Config], Plans]  # raises ConfigError naming every bad setting
PlannedEntry = Callable[[socket.socket, Any], None]  # gets the plans current at its fork


class Master:
    def __init__(self, config: Config, worker_entry: PlannedEntry,
                 config_loader: Callable[[], Config], planner: Planner) -> None:
        self.config = config
        self.worker_entry = worker_entry
        self.config_loader = config_loader
        self.planner = planner
        self.plans: Plans | None = None
        self.selector = selectors.DefaultSelector()
        self.listeners = listen.Listeners(self.selector, _LISTEN)
        self.ledger = Ledger(config.maxdaemons)
        self.budget = DescriptorBudget(1024, config.maxdaemons + config.prefork)
        self.lobby = Lobby(self.selector, self.ledger, self.budget,
                           config.first_byte_timeout, config.timeout)
        self.exporter = (metrics.Exporter(config.metrics, self._status,
                                          lambda: metrics.queue_dirs(self.config))
                         if config.metrics else None)
        self.observer = status.Observer(config.status_file, procctl.set_title, self.exporter)
        self.admission: admission.Admission | None = None
        self.pool: Pool | None = None
        self.signals: list[int] = []
        self.wakeup_r, self.wakeup_w = -1, -1
        self.accepting = True
        self.stop_deadline: float | None = None
        self.next_busy_warning = 0.0
        self.next_shed_warning = 0.0
        self.accept_paused_until = 0.0
        self.spawn_failures = 0
        self.started_at = time.time()

    # ---- start --------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        proxy.Policy.from_config(cfg)  # ValueError: refuse the start before binding
        nofile = procctl.raise_fd_limit()
        self.budget = self.lobby.budget = DescriptorBudget(nofile, cfg.maxdaemons + cfg.prefork)
        try:
            self.listeners.open(cfg.localip, cfg.port, cfg.maxdaemons)
        except listen.ListenError as error:
            setting = "PORT" if error.address_problem else "LOCALIP"
            raise problem(setting, cfg.source(setting), str(error)) from None
        for where in self.listeners.names:
            log.event("listen", addr=where.rpartition(":")[0].strip("[]"),
                      port=int(where.rpartition(":")[2]), nofile=nofile,
                      client_fds=self.budget.clients)
        if self.exporter is not None:  # before the privilege drop: the port may be low
            self.exporter.open()
            self.exporter.register(self.selector)
        self.observer.writer.prepare(*_owner(cfg))
        procctl.drop_privileges(cfg.user, cfg.group)
        self.plans = self.planner(cfg)  # as the workers' user: keys, queues, every rule
        self.admission = admission.Admission(cfg, self.plans, admission.open_rules(cfg),
                                             self.ledger, socket.gethostname())
        self._install_signals()
        gc.collect()
        gc.freeze()
        self.pool = Pool(self._enter_worker, cfg, after_fork=self._in_child)
        self.selector.register(self.pool.fileno(), selectors.EVENT_READ, _WORKERS)

    def _enter_worker(self, channel: socket.socket, _config: Config) -> None:
        """In a fresh worker: serve with the plans that were current at the fork."""
        self.worker_entry(channel, self.plans)

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
        self.listeners.close_fds()
        self.lobby.close_fds()
        os.close(self.wakeup_r)
        os.close(self.wakeup_w)
        if self.exporter is not None:
            self.exporter.close()
        self.selector.close()

    # ---- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        assert self.pool is not None
        try:
            while self.accepting or self.pool.workers:
                try:
                    self.turn()
                except OSError as error:
                    if error.errno not in SHORTAGE:
                        raise
                    self._shed(time.monotonic(), error.strerror or str(error))
        except BootFailure as failure:
            log.error("cannot start workers; stopping", reason=str(failure))
            return self._abort()
        except Exception as error:  # a bug: stop the workers in order, leave a status
            log.error("master failed; stopping", error=f"{type(error).__name__}: {error}")
            return self._abort()
        self._count(self.lobby.close_all("server stopping"), time.monotonic())
        self.observer.final(time.monotonic(), self._status(), 0)
        log.event("exit", status=0)
        return 0

    def turn(self) -> None:
        """One turn: signals by name → settle worker records → timers → select → dispatch."""
        assert self.pool is not None and self.admission is not None
        now = time.monotonic()
        self._handle_signals(now)
        self.admission.rules.new_turn()
        self.settle(now)
        if not self.accepting and not self.pool.workers:
            return  # drained: exit now, not after the next sleep
        self._timers(now)
        for key, _mask in self.selector.select(self._timeout(now)):
            self._dispatch(key.data, key.fileobj, time.monotonic())

    def _timers(self, now: float) -> None:
        assert self.pool is not None and self.admission is not None
        self.pool.maintain(now)
        if self.pool.spawn_failures != self.spawn_failures:
            self.spawn_failures = self.pool.spawn_failures
            self._shed(now, "a worker could not be started")
        self._count(self.lobby.expire(now), now)
        if self.exporter is not None:
            self.exporter.expire(now)
        if self.admission.rules.changed(now):
            self._replan()
        self._hand_ready(now)
        self.listeners.watch(self._can_take(now))
        self._warn_busy(now)
        self.observer.show(now, self.listeners.names, self.ledger.capacity.busy,
                           self.pool.idle, len(self.lobby.conns), self.accepting, self._status)

    def _timeout(self, now: float) -> float:
        assert self.pool is not None
        soonest = [now + TICK]
        for deadline in (self.pool.next_deadline(), self.stop_deadline,
                         self.lobby.next_deadline()):
            if deadline is not None:
                soonest.append(deadline)
        if self.accept_paused_until > now:
            soonest.append(self.accept_paused_until)
        return max(0.0, min(soonest) - now)

    def _dispatch(self, data: object, fileobj: object, now: float) -> None:
        if isinstance(data, Conn):
            self._count(self.lobby.readable(data, now), now)
            self._hand_ready(now)
        elif data is _LISTEN:
            assert isinstance(fileobj, socket.socket)
            self._accept(fileobj, now)
        elif data is _WAKEUP:
            try:
                while os.read(self.wakeup_r, 512):
                    pass
            except BlockingIOError:
                pass
        elif self.exporter is not None and self.exporter.owns(data):
            self.exporter.handle(data, now)
        # _WORKERS: the next turn settles what they sent

    # ---- workers ------------------------------------------------------------------------
    def settle(self, now: float) -> None:
        """Read every record the workers have sent and reap the dead; give back the
        leases of ended sessions; then hand waiting connections to idle workers. Called
        at the start of each turn and after each accept, and nowhere else."""
        assert self.pool is not None
        for event in self.pool.poll(now):
            if isinstance(event, Ended):
                self.ledger.release(event.session)
                self.observer.session_ended(event.outcome)
            else:
                self._exited(event)
        self._hand_ready(now)

    def _exited(self, gone: Exit) -> None:
        if gone.session is not None:
            self.ledger.release(gone.session)
            self.observer.worker_died()
            log.warning("worker died during a session", worker=gone.worker.pid,
                        ip=gone.session.ip, status=gone.description)
        elif gone.status != 0 and not gone.worker.signals_sent:  # not one we stopped
            log.event("worker_exit", worker=gone.worker.pid, status=gone.description)

    def _hand_ready(self, now: float) -> None:
        """Connections that have their request go to idle workers, oldest first."""
        assert self.pool is not None
        while self.lobby.ready and self.accepting and not self.ledger.full:
            worker = self.pool.take_idle()
            if worker is None:
                return
            conn = self.lobby.take_ready()
            assert conn is not None and conn.lease is not None and conn.client is not None
            self.ledger.start(conn.lease)
            while worker is not None and not self.pool.hand(
                    worker, conn.sock.fileno(), conn.client, conn.lease, now):
                worker = self.pool.take_idle() if worker.state is not State.IDLE else None
            if worker is not None:
                self.observer.connection("handed", conn.ip)
            else:
                self.ledger.release(conn.lease)
                self.observer.connection("dropped", conn.ip)
                log.event("drop", ip=conn.ip, error="no worker could take the connection")
            conn.sock.close()

    # ---- accepting ----------------------------------------------------------------------
    def _can_take(self, now: float) -> bool:
        if not self.accepting or now < self.accept_paused_until:
            return False
        # at the budget, only if an older socket can be given up for the new one
        return not self.budget.over(self.lobby.held()) or self.lobby.sheddable()

    def _accept(self, listener: socket.socket, now: float) -> None:
        for _ in range(ACCEPT_BATCH):
            if not self._can_take(now):
                return
            if self.budget.over(self.lobby.held()):
                self._count(self.lobby.shed(1)[1], now)
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in SHORTAGE:
                    self._shed(now, error.strerror or str(error))
                    return
                if error.errno not in (errno.ECONNABORTED, errno.EPROTO):
                    log.error("accept failed; pausing", error=error.strerror)
                    self.accept_paused_until = now + ACCEPT_PAUSE
                    return
                continue
            # Exact accounting: this client connected after its previous session's
            # answer, which its worker sent only after its done record; settle it now.
            self.settle(now)
            self._admit(sock, peer, None, now)

    def _admit(self, sock: socket.socket, peer: tuple, local: tuple | None,
               now: float) -> None:
        """local is None for a fresh connection, else the address its PROXY header named."""
        assert self.admission is not None
        try:
            if local is None and self.admission.needs_header():
                ip = str(peer[0])
                reason = self.admission.check_source(ip)
                if reason:
                    log.event("proxy_reject", ip=ip, reason=reason)
                    self.observer.connection("proxy_rejected", ip)
                    sock.close()
                    return
                policy = self.admission.policy
                self._count(self.lobby.await_header(sock, (ip, int(peer[1])), policy.reader(),
                                                    policy.timeout, now), now)
                return
            decision = self.admission.decide(peer, local or sock.getsockname())
        except OSError as error:  # the client went away while we looked at it
            log.event("drop", ip=str(peer[0]), error=error.strerror)
            self.observer.connection("dropped", str(peer[0]))
            sock.close()
            return
        if isinstance(decision, admission.Deny):
            log.event("deny", ip=decision.ip, rule=decision.rule, reason=decision.reason or None)
            self.observer.connection("denied", decision.ip)
            sock.close()
        elif isinstance(decision, admission.Refuse):
            log.event("perip_limit", ip=decision.ip, count=decision.count,
                      maxperip=decision.limit, answer=decision.answer)
            self.observer.connection("refused_perip", decision.ip)
            self.lobby.refuse(sock, decision.answer, now)
        else:
            self._count(self.lobby.enter(sock, peer, decision.lease, decision.client,
                                         decision.min_rate, decision.grace, now), now)
            self._hand_ready(now)

    def _count(self, events: Iterable[Event], now: float) -> None:
        """What the lobby reports: counted; a PROXY header read goes on to admission."""
        assert self.admission is not None
        for event in events:
            if event.result == HEADER_READ:
                assert event.conn is not None and event.header is not None
                client = self.admission.policy.client_of(event.header, event.conn.peer)
                self._admit(event.conn.sock, client, event.local, now)
            elif event.result == SHORT:
                self._shed(now, "cannot watch a connection")
            else:
                self.observer.connection(event.result, event.ip)

    def _shed(self, now: float, reason: str) -> None:
        """Out of descriptors or memory: free what the master can and pause accepting."""
        freed, events = self.lobby.shed(max(16, self.lobby.held() // 8))
        self._count(events, now)
        self.accept_paused_until = now + ACCEPT_PAUSE
        if now >= self.next_shed_warning:
            log.warning("short of descriptors or memory; shedding load", reason=reason,
                        closed=freed, held=self.lobby.held(), client_fds=self.budget.clients)
            self.next_shed_warning = now + SHED_WARNING_INTERVAL

    def _warn_busy(self, now: float) -> None:
        if self.lobby.ready and self.ledger.full and now >= self.next_busy_warning:
            log.warning("all sessions busy; clients wait for a worker; "
                        "raise MAXDAEMONS if this persists",
                        setting="MAXDAEMONS", maxdaemons=self.ledger.capacity.maximum,
                        waiting=len(self.lobby.ready), busiest=",".join(
                            f"{ip}={n}" for ip, n in self.ledger.per_ip.busiest(3)))
            self.next_busy_warning = now + BUSY_WARNING_INTERVAL

    # ---- signals, reload, stop, abort ---------------------------------------------------
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
        self.listeners.close()
        self._count(self.lobby.close_all("server stopping"), now)
        self.stop_deadline = now + self.config.shutdown_timeout
        self.pool.stop(now, self.stop_deadline)

    def _reload(self) -> None:
        assert self.pool is not None and self.admission is not None
        if not self.accepting:
            return
        try:
            new = self.config_loader()
            plans = self.planner(new)
            policy = proxy.Policy.from_config(new)
            rules = admission.open_rules(new)
        except Exception as error:
            log.error("reload failed; keeping the running config", error=str(error))
            return
        stuck = [name for name in RESTART_ONLY if new[name] != self.config[name]]
        if stuck:
            log.warning("these settings take effect only after a restart",
                        settings=",".join(stuck))
        self.config, self.plans = new, plans
        self.admission.replace(new, plans, rules, policy)
        self.ledger.capacity.resize(new.maxdaemons)
        self.budget = self.lobby.budget = DescriptorBudget(self.budget.nofile,
                                                           new.maxdaemons + new.prefork)
        self.lobby.first_byte_timeout, self.lobby.wait_timeout = (new.first_byte_timeout,
                                                                  new.timeout)
        self.pool.reload(new)
        log.event("reload", generation=self.pool.generation, maxdaemons=new.maxdaemons,
                  maxperip=new.maxperip, prefork=new.prefork)

    def _replan(self) -> None:
        """A replaced rules cdb is planned again: every rule env checked (a bad one is one
        log line, and the running plans stay), the plans kept for workers forked from now
        on. Running workers plan a rule env new to them on its first client."""
        assert self.admission is not None
        if not self.accepting:
            return
        try:
            plans = self.planner(self.config)
        except Exception as error:
            log.error("rules changed but cannot be used; keeping the running plans",
                      rules=self.config.rules, error=str(error))
            return
        self.plans = plans
        self.admission.replace(self.config, plans)
        log.event("replan", reason="rules changed", rules=self.config.rules)

    def _abort(self) -> int:
        """Stop accepting, TERM then KILL every worker, write the final status: exit 111."""
        assert self.pool is not None
        self.accepting = False
        try:
            self.listeners.close()
            self.lobby.close_all("server stopping")
        except Exception as error:  # the workers must go whatever state the rest is in
            log.error("cannot close clients", error=str(error))
        for gone in self.pool.abort(time.monotonic(), ABORT_GRACE):
            if gone.session is not None:
                self.ledger.release(gone.session)
        self.observer.final(time.monotonic(), self._status(), 111)
        log.event("exit", status=111)
        return 111

    # ---- status -------------------------------------------------------------------------
    def _status(self) -> dict[str, object]:
        """What `qmqpd status` shows; no mail content, only counts and client IPs."""
        assert self.pool is not None
        workers = {s.value: len(self.pool.in_state(s)) for s in State}
        per_ip = self.ledger.per_ip
        return {
            "version": status.FORMAT_VERSION, "pid": os.getpid(),
            "state": "running" if self.accepting else "stopping",
            "started": round(self.started_at, 3), "listen": list(self.listeners.names),
            "maxdaemons": self.ledger.capacity.maximum, "maxperip": self.config.maxperip,
            "prefork": self.config.prefork, "generation": self.pool.generation,
            "workers": {**workers, "total": len(self.pool.workers)},
            "sessions": self.ledger.capacity.busy, "waiting": len(self.lobby.conns),
            "clients": len(per_ip),
            "busiest": [{"ip": ip, "sessions": count}
                        for ip, count in per_ip.busiest(status.TOP_CLIENTS)],
            **self.observer.counters.as_dict(),
        }


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
