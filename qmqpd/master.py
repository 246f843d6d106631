"""The master: the loop and the lifecycle.

Owns: the selector, the signals, one loop `turn()` (signals by name → settle worker
records → timers → select → dispatch), and start, reload, stop and abort. It wires the
parts and keeps no connection or slot state: listen (listening sockets), admission (PROXY
policy, rules, MAXPERIP → a decision), lobby (connections without a worker, within the
descriptor budget), handoff (lobby → worker; the slowest session giving way), limits'
Ledger (slots; a Lease goes lobby → worker, released once), pool (workers; `poll()` says
which sessions ended and who died), status.Observer (counters, status, metrics, title).
Called by: `qmqpd serve` (cli) through `run()`.
Never touches: mail (no protocol, filter, injector or queue code is loaded here).

Exact accounting: a worker says done before it answers its client, and the master
settles worker records (`settle`) in two places only: at the start of each turn, and
right after each accept, before the new client is admitted, so a client that reconnects
at once is never counted twice.

The master never dies of load or of a slip: out of descriptors or memory it sheds load
(lingerers, then the oldest idle connections; accepting paused); whatever else escapes
the loop stops the workers in order, writes a final status and exits 111.
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from qmqpd import admission, listen, log, metrics, procctl, status
from qmqpd.config import Config
from qmqpd.handoff import Handoff
from qmqpd.limits import DescriptorBudget, Ledger
from qmqpd.lobby import HEADER_READ, HEALTH, SHORT, Conn, Event, Lobby
from qmqpd.pool import BootFailure, Ended, Pool

ACCEPT_PAUSE = 0.5  # after running out of descriptors or memory, stop accepting this long
TICK = 1.0  # longest sleep of the loop: bounds how late a deadline is noticed
ABORT_GRACE = 5.0  # an aborting master waits this long for TERMed workers, then KILLs
# Settings a HUP cannot change (sockets bound, privileges dropped).
RESTART_ONLY = ("LOCALIP", "PORT", "USER", "GROUP", "STATUS_FILE", "METRICS", "PROXY_SOCKET",
                "PROXY_SOCKET_USER", "PROXY_SOCKET_GROUP", "PROXY_SOCKET_MODE")
_LISTEN, _WAKEUP, _HANGUP, _WORKERS = "listen", "wakeup", "hangup", "workers"
# cli passes the planner (qmqpd.plan; raises ConfigError): no filter or queue code here
Planner = Callable[[Config], admission.Plans]
PlannedEntry = Callable[[socket.socket, Any], None]  # gets the plans current at its fork


class Master:
    def __init__(self, config: Config, worker_entry: PlannedEntry,
                 config_loader: Callable[[], Config], planner: Planner) -> None:
        self.config = config
        self.worker_entry = worker_entry
        self.config_loader = config_loader
        self.planner = planner
        self.selector = selectors.DefaultSelector()
        self.listeners = listen.Listeners(self.selector, _LISTEN)
        self.ledger = Ledger(config.maxdaemons)
        self.lobby = Lobby(self.selector, self.ledger,
                           DescriptorBudget(1024, config.maxdaemons + config.prefork))
        self.exporter = (metrics.Exporter(config.metrics, self._status,
                                          lambda: metrics.queue_dirs(self.config))
                         if config.metrics else None)
        self.observer = status.Observer(config.status_file, procctl.set_title, self.exporter)
        self.admission: admission.Admission | None = None  # once planned, in start
        self.pool = Pool(self._enter_worker, config, after_fork=self._in_child)
        self.handoff = Handoff(self.lobby, self.ledger, self.pool, self.observer)
        self.signals: list[str] = []  # names, in the order they came
        self.reap_due = True
        self.wakeup_r, self.wakeup_w = -1, -1
        self.accepting = True
        self.stop_deadline: float | None = None
        self.accept_paused_until = 0.0
        self.started_at = time.time()

    def start(self) -> None:
        cfg = self.config
        policy = admission.proxy_policy(cfg)  # ValueError: refuse the start before binding
        nofile = procctl.raise_fd_limit()
        # the metrics endpoint's connections come out of the limit before the clients'
        scrapes = self.exporter.size(nofile) if self.exporter is not None else 0
        self.lobby.configure(cfg.first_byte_timeout, cfg.timeout,
                             DescriptorBudget(nofile - scrapes, cfg.maxdaemons + cfg.prefork))
        # before the privilege drop: the ports may be low (ConfigError names the setting)
        self.listeners.open(cfg)
        if self.exporter is not None:
            self.exporter.open()
            self.exporter.register(self.selector)
        self.observer.writer.prepare(*procctl.identity(cfg.user, cfg.group)[:2])
        procctl.drop_privileges(cfg.user, cfg.group)
        plans = self.planner(cfg)  # as the workers' user: keys, queues, every rule
        self.admission = admission.Admission(cfg, plans, self.ledger, socket.gethostname(),
                                             policy)
        self._install_signals()
        gc.collect()
        gc.freeze()
        self.selector.register(self.pool.fileno(), selectors.EVENT_READ, _WORKERS)
        self.selector.register(self.lobby.hangup.fileno(), selectors.EVENT_READ, _HANGUP)
        # last: once "listen" is logged, every start warning is out and clients are served
        self.listeners.log(nofile=nofile, client_fds=self.lobby.budget.clients)

    def _enter_worker(self, channel: socket.socket, _config: Config) -> None:
        """In a fresh worker: serve with the plans that were current at the fork."""
        assert self.admission is not None
        self.worker_entry(channel, self.admission.plans)

    def _install_signals(self) -> None:
        self.wakeup_r, self.wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        self.selector.register(self.wakeup_r, selectors.EVENT_READ, _WAKEUP)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals.append(signal.Signals(signum).name)

    def _in_child(self) -> None:
        """In a fresh worker: drop every master resource it inherited."""
        self.listeners.close_fds()
        self.lobby.close_fds()
        self.handoff.close_fds()
        for fd in (self.wakeup_r, self.wakeup_w):
            os.close(fd)
        if self.exporter is not None:
            self.exporter.close()
        self.selector.close()

    def run(self) -> int:
        try:
            while self.accepting or self.pool.workers:
                try:
                    self.turn()
                except OSError as error:
                    if error.errno not in listen.SHORTAGE:
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
        assert self.admission is not None
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
        assert self.admission is not None
        if self.pool.maintain(now):
            self._shed(now, "a worker could not be started")
        self._count(self.lobby.expire(now), now)
        if self.exporter is not None:
            self.exporter.expire(now)
        if self.accepting:  # a replaced rules cdb: planned again
            self.admission.replan_if_changed(now, self.planner)
        if self.lobby.ready:
            self._hand_ready(now)
            self.handoff.give_way(now)
        self.listeners.watch(self._can_take(now))
        self.lobby.watch_waiting()
        self.observer.warn_busy(now, self.lobby.ready, self.ledger)
        self.observer.show(now, self.listeners.names, self.ledger.capacity.busy, self.pool.idle,
                           len(self.lobby.conns), self.accepting, self._status)

    def _timeout(self, now: float) -> float:
        """The soonest of every deadline, at most TICK away."""
        paused = self.accept_paused_until if self.accept_paused_until > now else None
        soonest = min(d for d in (now + TICK, self.pool.next_deadline(), self.stop_deadline,
                                  self.lobby.next_deadline(), paused,
                                  self.exporter.next_wakeup() if self.exporter else None)
                      if d is not None)
        return max(0.0, soonest - now)

    def _dispatch(self, data: object, fileobj: object, now: float) -> None:
        if isinstance(data, Conn):
            self._count(self.lobby.readable(data, now), now)
            self._hand_ready(now)
        elif data is _LISTEN:
            self._accept(fileobj, now)  # type: ignore[arg-type]  # a listening socket
        elif data is _HANGUP:
            self._count(self.lobby.hangups(), now)
        elif data is _WAKEUP:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wakeup_r, 512):
                    pass
        elif self.exporter is not None and self.exporter.owns(data):
            self.exporter.handle(data, now)

    def settle(self, now: float) -> None:
        """Read the workers' records, reap the dead, give back the leases of ended sessions,
        hand waiting connections to idle workers. Each turn and after each accept only."""
        reap, self.reap_due = self.reap_due, False
        for event in self.pool.poll(now, reap):
            if event.session is not None:
                self.handoff.ended(event.session)
            if isinstance(event, Ended):
                self.ledger.release(event.session)
                self.observer.session_ended(event.outcome)
            elif event.session is not None:  # died in a session (the pool logged it)
                self.ledger.release(event.session)
                self.observer.worker_died()
        if self.lobby.ready:
            self._hand_ready(now)

    def _hand_ready(self, now: float) -> None:  # waiting connections to idle workers
        if self.accepting:
            self._count(self.handoff.run(now), now)  # those found gone before their turn

    def _can_take(self, now: float) -> bool:
        return self.accepting and now >= self.accept_paused_until and self.lobby.has_room()

    def _room(self, now: float) -> bool:
        """One more client may be accepted (an older held socket given up if need be)."""
        if not self._can_take(now):
            return False
        self._count(self.lobby.make_room(), now)
        return True

    def _accept(self, listener: socket.socket, now: float) -> None:
        for sock, peer in self.listeners.accept(listener, lambda: self._room(now)):
            # Exact accounting: this client connected after its previous session's
            # answer, which its worker sent only after its done record; settle it now.
            self.settle(now)
            unix = listener.family == socket.AF_UNIX  # PROXY_SOCKET: a balancer on this host
            self._admit(sock, ("127.0.0.1", 0) if unix else peer, None, now, unix)
        error = self.listeners.failure
        if error is not None and error.errno in listen.SHORTAGE:
            self._shed(now, error.strerror or str(error))
        elif error is not None:
            log.error("accept failed; pausing", error=error.strerror)
            self.accept_paused_until = now + ACCEPT_PAUSE

    def _admit(self, sock: socket.socket, peer: tuple, local: tuple | None, now: float,
               balancer: bool = False, own: bool = False) -> None:
        """local is None for a fresh connection, else the address its PROXY header named;
        own: that header was LOCAL (the balancer itself, e.g. its health check)."""
        assert self.admission is not None
        try:
            if local is None and not self.admission.policy.enabled and not balancer:
                local = sock.getsockname()
            decision = self.admission.decide(peer, local, balancer)
        except OSError as error:  # the client went away while we looked at it
            log.event("drop", ip=str(peer[0]), error=error.strerror)
            self.observer.connection("dropped", str(peer[0]))
            sock.close()
            return
        if isinstance(decision, admission.AwaitHeader):
            self._count(self.lobby.await_header(sock, (str(peer[0]), int(peer[1])),
                                                decision.reader, decision.timeout, now), now)
        elif isinstance(decision, admission.Admit):
            self._count(self.lobby.enter(sock, peer, decision.lease, decision.client,
                                         decision.min_rate, decision.grace, now, own), now)
            self._hand_ready(now)
        else:  # turned away (logged by admission): Z over MAXPERIP, else closed
            self.observer.connection(decision.result, decision.ip)
            if isinstance(decision, admission.Refuse):
                self.lobby.refuse(sock, decision.answer, now)
            else:
                sock.close()

    def _count(self, events: Iterable[Event], now: float) -> None:
        assert self.admission is not None  # lobby events: counted; a PROXY header admitted
        for event in events:
            if event.result == HEADER_READ:
                assert event.conn is not None and event.header is not None
                client = self.admission.client_of(event.header, event.conn.peer)
                self._admit(event.conn.sock, client, event.local, now,
                            own=event.header.own)
            elif event.result == HEALTH:
                self.observer.health_check()
            elif event.result == SHORT:
                self._shed(now, "cannot watch a connection")
            else:
                self.observer.connection(event.result, event.ip)

    def _shed(self, now: float, reason: str) -> None:  # free what it can, pause accepting
        self._count(self.lobby.shed_load(now, reason), now)
        self.accept_paused_until = now + ACCEPT_PAUSE

    def _handle_signals(self, now: float) -> None:
        pending, self.signals = self.signals, []
        for name in pending:
            if name == "SIGCHLD":
                self.reap_due = True  # settle reaps
            elif name in ("SIGTERM", "SIGINT"):
                self._shutdown(now)
            elif name == "SIGHUP":
                self._reload()

    def _shutdown(self, now: float) -> None:
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
        assert self.admission is not None
        if not self.accepting:
            return
        try:
            new = self.config_loader()
            plans = self.planner(new)
            admitting = admission.Admission(new, plans, self.ledger, self.admission.hostname)
        except Exception as error:
            log.error("reload failed; keeping the running config", error=str(error))
            return
        stuck = [name for name in RESTART_ONLY if new[name] != self.config[name]]
        if stuck:
            log.warning("these settings take effect only after a restart",
                        settings=",".join(stuck))
        self.config = new
        self.admission.rules.close()
        self.admission = admitting
        self.ledger.capacity.resize(new.maxdaemons)
        self.lobby.configure(new.first_byte_timeout, new.timeout, DescriptorBudget(
            self.lobby.budget.nofile, new.maxdaemons + new.prefork))
        self.pool.reload(new)
        log.event("reload", generation=self.pool.generation, maxdaemons=new.maxdaemons,
                  maxperip=new.maxperip, prefork=new.prefork)

    def _abort(self) -> int:
        """Stop accepting, TERM then KILL every worker, write the final status: exit 111."""
        self.accepting = False
        with contextlib.suppress(Exception):  # the workers go whatever state the rest is in
            self.listeners.close()
            self.lobby.close_all("server stopping")
        for gone in self.pool.abort(time.monotonic(), ABORT_GRACE):
            if gone.session is not None:
                self.ledger.release(gone.session)
        self.observer.final(time.monotonic(), self._status(), 111)
        log.event("exit", status=111)
        return 111

    def _status(self) -> dict[str, object]:
        """What `qmqpd status` and the metrics show: counts and client IPs, no mail."""
        return self.observer.status(
            state="running" if self.accepting else "stopping", started=self.started_at,
            listen=self.listeners.names, config=self.config, waiting=len(self.lobby.conns),
            workers=self.pool.counts(), generation=self.pool.generation, ledger=self.ledger)


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
