"""Worker slots as a state machine: fork, hand work, reap, deadlines, recycling, throttle.

    STARTING --ready--> IDLE --handoff--> BUSY --done--> IDLE
        |                 |                 |   \\--done + recycle--> RETIRING
        +-- dies: boot    +-- retire ------>+------------------------> RETIRING --exit--> gone
            failure

Owns: worker processes, their channels and the selector those sit in, and what a busy
worker holds for its client (its `Lease`, handed in by the hand-off with the connection).
Called by: the master (maintain, which spawns; poll, reload, stop, hurry, abort) and the
hand-off (has_idle, hand_to_idle).
Never touches: rules, limits' counters or a client's data; `poll()` returns what happened
(`Ended`, `Exit`) and the master settles the leases.

The pool never imports the worker code: the entry function is passed in, so the master
side does not load protocol, filter or queue code paths. Deadlines use time.monotonic().
Every state change goes through `_change_state`, which refuses one ALLOWED_FROM does not
list. A worker says done before it answers its client, so a worker the pool holds busy
is really serving. On stop, SHUTDOWN_TIMEOUT bounds the whole drain: a worker still busy
at the bound is killed.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from qmqpd import ipc, log
from qmqpd.config import Config
from qmqpd.errors import QmqpdError, TemporaryError
from qmqpd.limits import Lease

WorkerEntry = Callable[[socket.socket, Config], None]

# A worker that has not said ready by then is killed (counts as a boot failure).
BOOT_TIMEOUT = 30.0
# Workers dying before ready this many times in a row stop the master.
BOOT_FAILURE_LIMIT = 5
# Respawn delay after a boot failure: doubles per failure up to the cap.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
# Between TERM and KILL for a worker past its deadline.
KILL_GRACE = 5.0
# A busy worker may overrun SESSION_TIMEOUT by the drain of an early answer and this slack.
SESSION_SLACK = 10.0
# Idle workers beyond PREFORK are retired after this long without work.
IDLE_SURPLUS_TIMEOUT = 60.0
# After a failed fork or socketpair (EMFILE, ENOMEM, EAGAIN): wait this long, warn this rarely.
SPAWN_RETRY = 1.0
SPAWN_WARNING_INTERVAL = 60.0


class State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    RETIRING = "retiring"


# The one table of state changes: a state and the states it may be entered from.
ALLOWED_FROM: dict[State, frozenset[State]] = {
    State.STARTING: frozenset(),  # only at fork
    State.IDLE: frozenset({State.STARTING, State.BUSY}),
    State.BUSY: frozenset({State.IDLE}),
    State.RETIRING: frozenset({State.STARTING, State.IDLE, State.BUSY}),
}


class StateError(QmqpdError, AssertionError):
    """A state change the table does not allow: a bug in the pool, never a client's doing."""


class BootFailure(TemporaryError):
    """Workers keep dying before they are ready: respawning would only loop."""


@dataclass(eq=False)
class Worker:
    pid: int
    channel: socket.socket
    generation: int
    started: float
    max_requests: int
    state: State = State.STARTING
    served: int = 0
    session: Lease | None = None  # the client's slots, released when the session ends
    idle_since: float = 0.0
    deadline: float | None = None  # next escalation (TERM, then KILL)
    signals_sent: list[int] = field(default_factory=list)
    retire_when_done: bool = False
    channel_open: bool = True


@dataclass
class Exit:
    """A reaped worker; `session` is not None when it died holding a session."""

    worker: Worker
    status: int
    session: Lease | None

    @property
    def description(self) -> str:
        if os.WIFSIGNALED(self.status):
            return f"killed by signal {os.WTERMSIG(self.status)}"
        return f"exit {os.waitstatus_to_exitcode(self.status)}"


@dataclass
class Ended:
    """A session a worker reported done: what the master must release, and how it ended
    (None when the worker sent no outcome)."""

    session: Lease
    outcome: ipc.Outcome | None


def jittered(max_requests: int) -> int:
    """Recycling point per worker, spread so workers do not all restart together."""
    if max_requests <= 0:
        return 0
    return max_requests + random.randint(0, max_requests // 10)


class Pool:
    def __init__(self, entry: WorkerEntry, config: Config,
                 after_fork: Callable[[], None] | None = None) -> None:
        self.entry = entry
        self.config = config
        # the workers' channels, apart: read without waiting before every admit
        self.selector = selectors.DefaultSelector()
        self.after_fork = after_fork
        self.workers: dict[int, Worker] = {}
        self.generation = 0
        self.boot_failures = 0
        self.last_boot_failure = ""
        self.next_spawn_at = 0.0
        self.spawning = True
        self.stop_at: float | None = None  # the shutdown bound, once stopping
        self.next_spawn_warning = 0.0
        self.spawn_failures = 0  # fork/socketpair failures since start (the master sheds)

    # ---- counts -------------------------------------------------------------------------
    def in_state(self, state: State) -> list[Worker]:
        return [w for w in self.workers.values() if w.state is state]

    def counts(self) -> dict[str, int]:
        """Workers per state, and in all (for the status)."""
        counts = {state.value: 0 for state in State}
        for worker in self.workers.values():
            counts[worker.state.value] += 1
        return {**counts, "total": len(self.workers)}

    @property
    def busy(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is State.BUSY)

    @property
    def idle(self) -> int:
        return sum(1 for w in self.workers.values() if w.state is State.IDLE)

    def _current(self, *states: State) -> list[Worker]:
        return [w for w in self.workers.values()
                if w.generation == self.generation and w.state in states]

    # ---- fork ---------------------------------------------------------------------------
    def spawn(self, now: float) -> Worker:
        """Fork one worker; OSError (EMFILE, ENFILE, ENOMEM, EAGAIN) leaves nothing behind."""
        master_end, worker_end = ipc.channel_pair()
        gc.freeze()  # keep the master's objects in shared pages after fork
        try:
            pid = os.fork()
        except OSError:
            master_end.close()
            worker_end.close()
            raise
        if pid == 0:
            self._child(master_end, worker_end)
        worker_end.close()
        worker = Worker(pid=pid, channel=master_end, generation=self.generation, started=now,
                        max_requests=jittered(self.config.max_requests))
        worker.deadline = now + BOOT_TIMEOUT
        self.workers[pid] = worker
        try:
            self.selector.register(master_end, selectors.EVENT_READ, worker)
        except OSError:  # ENOMEM in epoll: the worker cannot be heard, so it goes
            self._close_channel(worker)
            self._change_state(worker, State.RETIRING)
            self._signal(worker, signal.SIGKILL)
            raise
        return worker

    @staticmethod
    def _change_state(worker: Worker, new: State) -> None:
        """Every state change goes through here and must be one the table allows."""
        if worker.state not in ALLOWED_FROM[new]:
            raise StateError(f"worker {worker.pid}: {worker.state.value} -> {new.value}")
        worker.state = new

    def _child(self, master_end: socket.socket, worker_end: socket.socket) -> None:
        code = 70
        try:
            master_end.close()
            for other in self.workers.values():
                other.channel.close()
            self.selector.close()
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            # Ctrl-C and HUP go to the process group: the master decides for its workers.
            for sig in (signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            if self.after_fork is not None:
                self.after_fork()
            self.entry(worker_end, self.config)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0
        except BaseException:
            traceback.print_exc(file=sys.stderr)
        finally:
            try:
                sys.stderr.flush()
            finally:
                os._exit(code)

    # ---- work ---------------------------------------------------------------------------
    def take_idle(self) -> Worker | None:
        """An idle worker, preferring the current generation (after a reload)."""
        idle = self.in_state(State.IDLE)
        if not idle:
            return None
        idle.sort(key=lambda w: (w.generation != self.generation, -w.idle_since))
        return idle[0]

    def has_idle(self) -> bool:
        return any(w.state is State.IDLE for w in self.workers.values())

    def hand_to_idle(self, fd: int, client: ipc.Client, session: Lease, now: float) -> bool:
        """To an idle worker, the next one if its channel fails; False when none took it."""
        while (worker := self.take_idle()) is not None:
            if self.hand(worker, fd, client, session, now):
                return True
            if worker.state is State.IDLE:  # the worker is fine: the record cannot be made
                return False
        return False

    def hand(self, worker: Worker, fd: int, client: ipc.Client, session: Lease,
             now: float) -> bool:
        """Pass the connection; False when it cannot go: the worker is being retired (its
        channel failed), or the client's facts do not fit a record (the worker is fine)."""
        try:
            ipc.send_handoff(worker.channel, fd, client)
        except ipc.ChannelError as error:
            log.error("client facts do not fit a handoff record", worker=worker.pid,
                      ip=session.ip, error=str(error))
            return False
        except OSError as error:
            log.warning("handoff failed", worker=worker.pid, error=error.strerror)
            self._close_channel(worker)
            self._retire(worker, now)
            return False
        self._change_state(worker, State.BUSY)
        worker.session = session
        worker.deadline = now + self.config.session_timeout + self.config.timeout + SESSION_SLACK
        worker.signals_sent.clear()
        return True

    def poll(self, now: float, reap: bool = True) -> list[Ended | Exit]:
        """Every record the workers have sent so far (read without waiting), then (reap:
        a child has exited since the last look) every worker that exited: what the master
        must settle, in that order."""
        events: list[Ended | Exit] = []
        for key, _mask in self.selector.select(0):
            worker = key.data
            if worker.pid in self.workers:
                ended = self.on_readable(worker, now)
                if ended is not None:
                    events.append(ended)
        if reap:
            events.extend(self.reap(now))
        return events

    def fileno(self) -> int:
        """Readable when a worker has sent a record (for the master's selector)."""
        return self.selector.fileno()

    def on_readable(self, worker: Worker, now: float) -> Ended | None:
        """Handle one record; a DONE returns the session it ended, anything else None."""
        try:
            record = ipc.receive(worker.channel)
        except ConnectionResetError:
            record = None  # the worker died with a record unread: an ordinary exit
        except (ipc.ChannelError, OSError) as error:
            log.error("bad record from worker; killing it", worker=worker.pid, error=str(error))
            self._close_channel(worker)
            self._signal(worker, signal.SIGKILL)
            if worker.state is not State.RETIRING:
                self._change_state(worker, State.RETIRING)
            return None
        if record is None:  # the worker is exiting; reap will tell how
            self._close_channel(worker)
            if worker.state is State.IDLE:  # starting and busy keep their state for reap
                self._change_state(worker, State.RETIRING)
            if worker.deadline is None or worker.deadline > now + KILL_GRACE:
                worker.deadline = now + KILL_GRACE
            worker.signals_sent.clear()
            return None
        if record.kind is ipc.Kind.READY and worker.state is State.STARTING:
            self.boot_failures = 0
            self._set_idle(worker, now)
            return None
        if record.kind is ipc.Kind.READY and worker.state is State.RETIRING:
            return None  # told to stop while it booted: it exits on its own
        if record.kind is ipc.Kind.DONE and worker.state is State.BUSY:
            return Ended(self._done(worker, record.exiting, now), record.outcome)
        log.error("unexpected record from worker; killing it", worker=worker.pid,
                  kind=record.kind.name, state=worker.state.value)
        self._signal(worker, signal.SIGKILL)
        return None

    def _done(self, worker: Worker, exiting: bool, now: float) -> Lease:
        session, worker.session = worker.session, None
        assert session is not None  # busy workers hold their client's lease
        worker.served += 1
        recycle = worker.max_requests and worker.served >= worker.max_requests
        if exiting:
            self._change_state(worker, State.RETIRING)
            worker.deadline = self._bounded(now + KILL_GRACE)
        elif (recycle or worker.retire_when_done or worker.generation != self.generation
              or not self.spawning):
            self._set_idle(worker, now)  # the session is over; retiring starts from idle
            self._retire(worker, now)
        else:
            self._set_idle(worker, now)
        return session

    def _bounded(self, deadline: float) -> float:
        """A deadline no later than the shutdown bound, while stopping."""
        return deadline if self.stop_at is None else min(deadline, self.stop_at)

    def _set_idle(self, worker: Worker, now: float) -> None:
        self._change_state(worker, State.IDLE)
        worker.idle_since = now
        worker.deadline = None
        worker.signals_sent.clear()

    def _retire(self, worker: Worker, now: float) -> None:
        """Idle: told to exit now. Busy: exits after its session. Bounded by KILL_GRACE."""
        if worker.state is State.BUSY:
            worker.retire_when_done = True
            return
        if worker.state is State.RETIRING:
            return
        self._change_state(worker, State.RETIRING)
        worker.deadline = self._bounded(now + KILL_GRACE)
        if worker.channel_open:
            try:
                ipc.send_retire(worker.channel)
            except OSError:
                self._signal(worker, signal.SIGTERM)

    def _close_channel(self, worker: Worker) -> None:
        if worker.channel_open:
            worker.channel_open = False
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(worker.channel)
            worker.channel.close()

    def _signal(self, worker: Worker, sig: int) -> None:
        worker.signals_sent.append(sig)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)

    # ---- reap ---------------------------------------------------------------------------
    def reap(self, now: float) -> list[Exit]:
        exits = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            self._close_channel(worker)
            gone = Exit(worker, status, worker.session)
            worker.session = None
            if worker.state is State.STARTING and self.spawning:
                self._boot_failed(gone, now)
            elif gone.session is not None:
                log.warning("worker died during a session", worker=pid, ip=gone.session.ip,
                            status=gone.description)
            elif status != 0 and not worker.signals_sent:  # not one we stopped
                log.event("worker_exit", worker=pid, status=gone.description)
            exits.append(gone)
        return exits

    def _boot_failed(self, gone: Exit, now: float) -> None:
        self.boot_failures += 1
        self.last_boot_failure = gone.description
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.boot_failures - 1))
        self.next_spawn_at = now + delay
        log.error("worker died before it was ready", worker=gone.worker.pid,
                  status=gone.description, failures=self.boot_failures, respawn_in=delay)

    # ---- keep the pool at size ----------------------------------------------------------
    def maintain(self, now: float) -> bool:
        """Deadlines, then respawn; True when a fork failed (out of descriptors, memory or
        processes: the master sheds load); raises BootFailure when workers cannot start."""
        self._enforce_deadlines(now)
        if self.boot_failures >= BOOT_FAILURE_LIMIT:
            raise BootFailure(
                f"{self.boot_failures} workers in a row died before becoming ready "
                f"(last: {self.last_boot_failure}); see the worker errors above")
        if not self.spawning:
            return False
        failed = False
        self._retire_stale(now)
        self._retire_surplus(now)
        want = max(self.config.prefork, 1)
        while now >= self.next_spawn_at:
            ready = len(self._current(State.IDLE, State.STARTING))
            active = len(self._current(State.IDLE, State.STARTING, State.BUSY))
            if ready >= want or active >= self.config.maxdaemons:
                break
            try:
                self.spawn(now)
            except OSError as error:  # out of descriptors, memory or processes: retry later
                self.next_spawn_at = now + SPAWN_RETRY
                if now >= self.next_spawn_warning:
                    log.error("cannot start a worker; retrying", error=error.strerror,
                              retry_in=SPAWN_RETRY)
                    self.next_spawn_warning = now + SPAWN_WARNING_INTERVAL
                self.spawn_failures += 1
                failed = True
                break
        if self.next_spawn_at <= now:  # the back-off is over: no deadline left to wake for
            self.next_spawn_at = 0.0
        return failed

    def _enforce_deadlines(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if worker.deadline is None or now < worker.deadline:
                continue
            if self.stop_at is not None and now >= self.stop_at:
                if signal.SIGKILL not in worker.signals_sent:
                    log.warning("shutdown bound reached; KILL", worker=worker.pid,
                                state=worker.state.value, setting="SHUTDOWN_TIMEOUT")
                    self._signal(worker, signal.SIGKILL)
                worker.deadline = now + KILL_GRACE
            elif signal.SIGTERM not in worker.signals_sent:
                log.warning("worker past its deadline; TERM", worker=worker.pid,
                            state=worker.state.value)
                self._signal(worker, signal.SIGTERM)
                worker.deadline = now + KILL_GRACE
            else:
                log.warning("worker ignored TERM; KILL", worker=worker.pid,
                            state=worker.state.value)
                self._signal(worker, signal.SIGKILL)
                worker.deadline = now + KILL_GRACE

    def _retire_stale(self, now: float) -> None:
        """After a reload: old idle workers go once a new one is ready to take work."""
        if not self._current(State.IDLE) and self.config.prefork > 0:
            return
        for worker in self.in_state(State.IDLE):
            if worker.generation != self.generation:
                self._retire(worker, now)

    def _retire_surplus(self, now: float) -> None:
        idle = sorted(self._current(State.IDLE), key=lambda w: w.idle_since)
        surplus = len(idle) - max(self.config.prefork, 1)
        for worker in idle[: max(surplus, 0)]:
            if now - worker.idle_since >= IDLE_SURPLUS_TIMEOUT:
                self._retire(worker, now)

    def next_deadline(self) -> float | None:
        times = [w.deadline for w in self.workers.values() if w.deadline is not None]
        if self.spawning and self.next_spawn_at > 0:
            times.append(self.next_spawn_at)
        return min(times) if times else None

    # ---- reload and stop ----------------------------------------------------------------
    def reload(self, config: Config) -> None:
        """New workers get the new config; old ones retire once new ones are ready."""
        self.config = config
        self.generation += 1
        for worker in self.in_state(State.BUSY):
            worker.retire_when_done = True

    def stop(self, now: float, bound: float) -> None:
        """No more spawning; idle and starting workers go now, busy ones after their session.
        At `bound` whatever is left is killed: the bound is the whole shutdown."""
        self.spawning = False
        self.stop_at = bound
        for worker in list(self.workers.values()):
            if worker.state is State.STARTING:
                self._signal(worker, signal.SIGTERM)
                self._change_state(worker, State.RETIRING)
                worker.deadline = self._bounded(now + KILL_GRACE)
            else:
                self._retire(worker, now)
        self.hurry(bound)

    def hurry(self, deadline: float) -> None:
        """Bring every worker's deadline forward to `deadline` (drain bound, second TERM)."""
        if self.stop_at is not None:
            self.stop_at = min(self.stop_at, deadline)
        for worker in self.workers.values():
            if worker.deadline is None or worker.deadline > deadline:
                worker.deadline = deadline

    def abort(self, now: float, seconds: float) -> list[Exit]:
        """No more spawning; TERM every worker, KILL those left after `seconds`, and reap
        them (a KILLed one for up to KILL_GRACE more)."""
        self.spawning = False
        exits: list[Exit] = []
        for sig, bound in ((signal.SIGTERM, now + seconds),
                           (signal.SIGKILL, now + seconds + KILL_GRACE)):
            for worker in self.workers.values():
                self._signal(worker, sig)
            while self.workers and time.monotonic() < bound:
                exits += self.reap(time.monotonic())
                time.sleep(0.02)
        return exits
