"""qmail-multi's job: pick a queue, check free space, queue natively or run QMAILQUEUE.

The queue is the least loaded one by its backlog (qmqpd.backlog) unless QUEUE_CHOICE is
random; past a QUEUE_MAX_* limit the answer is Z before the body is read, past
QUEUE_SOFT_TODO the session waits QUEUE_FLOW_DELAY first.
Every outcome is a Reply; an unknown result is a temporary failure, never a K.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from qmqpd import backlog, log
from qmqpd.config import Config, ConfigError, problem
from qmqpd.fsio import write_all
from qmqpd.message import Client, Message, Reply, reply_for_exit
from qmqpd.queue import (
    EXIT_READ,
    Queue,
    QueueError,
    QueueSetupError,
    commit_unsupported,
    detect_layout,
    envelope_records,
    free_bytes,
    unwritable,
)

if TYPE_CHECKING:
    import subprocess

# qmail reads at most this much custom error text from the queue program.
ERROR_TEXT_LIMIT = 1023
EXIT_EXEC_FAILED = 120


class Outcome(NamedTuple):
    """What happened to one message: the answer, where it went and its id there."""

    reply: Reply
    queue: str = ""
    qid: str = ""


def queue_paths(config: Config) -> list[str]:
    """The native queues a config names: QUEUEDIR, else QUEUE_BASE/queueN for N in
    QUEUE_START .. QUEUE_START+QUEUE_COUNT-1 (qmail-multi); empty when neither is set."""
    if config.queuedir:
        return [str(config.queuedir)]
    if not config.queue_base:
        return []
    start = config.queue_start
    return [os.path.join(config.queue_base, f"queue{n}")
            for n in range(start, start + config.queue_count)]


class Writer(NamedTuple):
    """Who writes the queue: the uid and groups the workers run as (USER/GROUP)."""

    uid: int
    gids: tuple[int, ...]
    name: str

    @classmethod
    def current(cls) -> Writer:
        gids = tuple(sorted({os.getegid(), *os.getgroups()}))
        return cls(os.geteuid(), gids, str(os.geteuid()))


def check_config(config: Config, writer: Writer | None = None) -> list[ConfigError]:
    """Every reason this config cannot queue a message, found before any client comes:
    no queue at all, a QMAILQUEUE program that cannot run, a queue that is missing, laid
    out with another SPLIT/TODO_LAYOUT, or not writable by the workers' user."""
    program = config.qmailqueue.split()
    if program:
        return _check_program(config, program[0])
    missing = _no_queue(config)
    if missing is not None:
        return [missing]
    writer = writer or Writer.current()
    found: list[ConfigError] = []
    if (reason := commit_unsupported(config.commit_mode)) is not None:
        found.append(problem("COMMIT_MODE", config.source("COMMIT_MODE"), reason))
    for path in queue_paths(config):
        reason = _check_queue(config, path, writer)
        if reason is not None:
            found.append(reason)
    return found


def _no_queue(config: Config) -> ConfigError | None:
    if config.qmailqueue.strip() or queue_paths(config):
        return None
    return problem("QUEUEDIR", config.source("QUEUEDIR"),
                   "no queue configured: set QUEUEDIR (one queue), QUEUE_BASE (queueN "
                   "directories under it) or QMAILQUEUE (a qmail-queue compatible program)")


def _queue_setting(config: Config) -> str:
    return "QUEUEDIR" if config.queuedir else "QUEUE_BASE"


def _check_program(config: Config, name: str) -> list[ConfigError]:
    source = config.source("QMAILQUEUE")
    import shutil  # a check of QMAILQUEUE only: not on a plain session's path

    path = name if os.sep in name else shutil.which(name)
    if path is None or not os.path.exists(path):
        return [problem("QMAILQUEUE", source, f"program {name} does not exist")]
    if not os.path.isfile(path) or not os.access(path, os.X_OK):
        return [problem("QMAILQUEUE", source, f"program {path} is not executable")]
    return []


def _check_queue(config: Config, path: str, writer: Writer) -> ConfigError | None:
    setting = _queue_setting(config)
    denied = unwritable(path, writer.uid, writer.gids, config.todo_layout)
    if denied is not None:
        return problem("USER", config.source("USER"),
                       f"user {writer.name} (uid {writer.uid}) cannot write queue {path}: "
                       f"{denied}; run as the queue's owner (qmailq) or hand messages to "
                       f"qmail-queue with QMAILQUEUE")
    try:
        layout = detect_layout(path)
    except QueueSetupError as error:
        return problem(setting, config.source(setting),
                       f"{error}; create it with `qmqpd queue create {path}`")
    if layout.split != config.split:
        return problem("SPLIT", config.source("SPLIT"),
                       f"{config.split}, but {path} is laid out with {layout.split} "
                       f"(mess/0 .. mess/{layout.split - 1}); qmail-send would never see "
                       f"the messages: set split = {layout.split}")
    if layout.todo_layout != config.todo_layout:
        return problem("TODO_LAYOUT", config.source("TODO_LAYOUT"),
                       f"{config.todo_layout}, but {path} has a {layout.todo_layout} todo/")
    return None


class Route(NamedTuple):
    """Where one plan's messages go, built once: the QMAILQUEUE argv, or the native queue
    writers to pick from for each message."""

    program: tuple[str, ...]
    queues: tuple[Queue, ...]
    queuedir: str = ""  # QUEUEDIR handed to an external program
    watch: backlog.Watch | None = None  # the queues' backlog (None: QUEUE_SCAN_INTERVAL 0)

    @classmethod
    def from_config(cls, config: Config) -> Route:
        program = tuple(config.qmailqueue.split())
        if program:
            return cls(program, (), str(config.queuedir))
        paths = queue_paths(config)
        queues = tuple(
            Queue(path, split=config.split, todo_layout=config.todo_layout,
                  fsync=config.use_fsync, syncdir=config.use_syncdir,
                  commit_mode=config.commit_mode)
            for path in paths)
        return cls((), queues, "", backlog.Watch.from_config(config, paths))


def _pick(indexes: list[int]) -> int:
    if len(indexes) == 1:
        return indexes[0]
    import random  # several queues only: a session with one queue never loads it

    return random.SystemRandom().choice(indexes)


def _choose(route: Route, limits: backlog.Limits) -> tuple[Queue | None, backlog.Flow]:
    """The queue for this session's message and what flow control says about it."""
    if not route.queues:
        return None, backlog.Flow()
    if route.watch is None:  # no backlog known: qmail-multi's random pick
        return route.queues[_pick(list(range(len(route.queues))))], backlog.Flow()
    now = time.time()
    backlogs = route.watch.all()
    index = backlog.choose(backlogs, limits, now, _pick)
    return route.queues[index], backlog.verdict(backlogs[index], limits, now)


class Injector:
    """One session's way into the queue; the queue is chosen once, at construction."""

    def __init__(self, config: Config, client: Client, route: Route) -> None:
        """config and route: the session plan's (plan.py), its settings the base merged
        with the client's rule env, its queues checked when the plan was made."""
        self.config = config
        self.client = client
        self.program = list(route.program)
        # An external program picks its own queue unless QUEUEDIR names one. Native:
        # QUEUEDIR, or one of QUEUE_BASE/queueN by backlog (or at random, as qmail-multi).
        self._queue, self.flow = _choose(route, backlog.Limits.from_config(config))
        self._watch = route.watch
        self.queue_path = self._queue.path if self._queue is not None else route.queuedir

    @property
    def external(self) -> bool:
        return bool(self.program)

    @property
    def spool_dir(self) -> str | None:
        """Where a large message waits: the queue's own pid/, so it is on the queue's disk."""
        return None if self.program else os.path.join(self.queue_path, "pid")

    def check_space(self, length: int = 0) -> Reply | None:
        """None when there is room (or no check); the Z answer when the chosen queue is
        past a backlog limit, or its filesystem would fall below MIN_FREE after taking
        ``length`` more bytes (the announced size). Past the soft backlog mark the first
        call waits QUEUE_FLOW_DELAY (before the body is read)."""
        if self.flow.refusal:
            log.event("queue_backlog", queue=self.queue_path, reason=self.flow.refusal)
            return Reply.named("queue_backlog")
        if self.flow.delay:
            log.event("queue_flow_delay", queue=self.queue_path, seconds=self.flow.delay)
            time.sleep(self.flow.delay)
            self.flow = backlog.Flow()
        if not self.config.min_free or not self.queue_path:
            return None
        try:
            available = free_bytes(self.queue_path)
        except OSError as exc:
            log.event("queue_statvfs_failed", queue=self.queue_path, error=exc.strerror)
            return reply_for_exit(EXIT_READ)
        if available - length < self.config.min_free:
            log.event("queue_min_free", queue=self.queue_path, free=available, length=length,
                      min_free=self.config.min_free)
            return Reply.named("disk_full")
        return None

    def inject(self, message: Message, deadline: float | None = None) -> Outcome:
        """Queue the message; deadline is time.monotonic() based (default SESSION_TIMEOUT)."""
        # Again with the size: a message spooled on the queue's disk is copied to mess/.
        refusal = self.check_space(message.size)
        if refusal is not None:
            return Outcome(refusal, self.queue_path)
        if self.external:
            if deadline is None:
                deadline = time.monotonic() + self.config.session_timeout
            return self._run_program(message, deadline)
        assert self._queue is not None
        try:
            qid = self._queue.write(message)
        except QueueError as exc:
            log.event("queue_failed", queue=self.queue_path, code=exc.exit_code,
                      reason=exc.reason)
            return Outcome(reply_for_exit(exc.exit_code), self.queue_path)
        if self._watch is not None:
            self._watch.queued(self.queue_path)
        return Outcome(Reply.ok(int(time.time()), qid), self.queue_path, str(qid))

    # -- external QMAILQUEUE program ----------------------------------------------------
    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.client.ucspi_env())
        if self.queue_path:
            env["QUEUEDIR"] = self.queue_path
        for name, value in self.client.rule_env.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def _run_program(self, message: Message, deadline: float) -> Outcome:
        import subprocess  # only with QMAILQUEUE: a native queue never loads it

        name = self.program[0]
        envelope = _envelope_input(message)
        pipes = _Pipes()
        try:
            process = subprocess.Popen(
                self.program, stdin=pipes.message_r, stdout=pipes.envelope_r,
                stderr=pipes.error_w, env=self._environment(), close_fds=True,
                start_new_session=True)
        except OSError as exc:
            pipes.close_all()
            log.event("qmailqueue_exec_failed", program=name, error=exc.strerror or str(exc))
            return Outcome(reply_for_exit(EXIT_EXEC_FAILED), name)
        pipes.close_child_ends()
        feeders = [
            _Feeder(pipes.message_w, message.write_final),
            _Feeder(pipes.envelope_w, lambda fd: write_all(fd, envelope)),
        ]
        custom, overrun = _read_errors(pipes.error_r, deadline)
        code = _wait(process, deadline) if not overrun else None
        if code is None:
            _kill(process)
            log.event("qmailqueue_timeout", program=name, qp=process.pid)
            reply = Reply.named("timeout")
        else:
            write_failed = any(feeder.join(deadline) for feeder in feeders)
            reply = self._reply(code, custom, write_failed, process.pid)
        for feeder in feeders:
            feeder.join(time.monotonic() + 1)
        os.close(pipes.error_r)
        qid = str(process.pid) if reply.status == "K" else ""
        return Outcome(reply, name, qid)

    def _reply(self, code: int, custom: bytes, write_failed: bool, pid: int) -> Reply:
        if code < 0:
            log.event("qmailqueue_crashed", program=self.program[0], qp=pid, signal=-code)
            return Reply.named("crashed")
        if code == 0:
            # qmail: a message the program did not read whole is not queued safely.
            return reply_for_exit(EXIT_READ) if write_failed else Reply.ok(int(time.time()), pid)
        text = custom.decode("utf-8", "replace")
        log.event("qmailqueue_failed", program=self.program[0], qp=pid, code=code,
                  text=text.strip() or None)
        return reply_for_exit(code, text)


def _envelope_input(message: Message) -> bytes:
    """qmail-queue's fd 1 input: F<sender>\\0, T<rcpt>\\0 each, then the closing \\0."""
    return envelope_records(message.sender, message.recipients) + b"\0"


class _Pipes:
    """Message (child fd 0), envelope (child fd 1) and error (child fd 2) pipes."""

    def __init__(self) -> None:
        self.message_r, self.message_w = os.pipe()
        self.envelope_r, self.envelope_w = os.pipe()
        self.error_r, self.error_w = os.pipe()

    def close_child_ends(self) -> None:
        for fd in (self.message_r, self.envelope_r, self.error_w):
            os.close(fd)

    def close_all(self) -> None:
        self.close_child_ends()
        for fd in (self.message_w, self.envelope_w, self.error_r):
            os.close(fd)


class _Feeder:
    """Writes one pipe in its own thread, so the program may read fd 0 and fd 1 in any order."""

    def __init__(self, fd: int, write: Callable[[int], None]) -> None:
        self.fd = fd
        self.failed = False
        self._write = write
        import threading  # the QMAILQUEUE path only

        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._write(self.fd)
        except OSError:
            self.failed = True  # EPIPE: the program stopped reading
        finally:
            os.close(self.fd)

    def join(self, deadline: float) -> bool:
        """True when the write failed (or has not finished by the deadline)."""
        self._thread.join(max(0.0, deadline - time.monotonic()))
        return self.failed or self._thread.is_alive()


def _read_errors(fd: int, deadline: float) -> tuple[bytes, bool]:
    """The custom error text (first 1023 bytes) until every program closed fd 2.

    Returns the text and whether the deadline passed first.
    """
    import selectors  # the QMAILQUEUE path only

    kept = bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                return bytes(kept), True
            block = os.read(fd, 4096)
            if not block:
                return bytes(kept), False
            kept += block[: max(0, ERROR_TEXT_LIMIT - len(kept))]


def _wait(process: subprocess.Popen[bytes], deadline: float) -> int | None:
    """The exit status (negative = signal), or None when the deadline passed."""
    import subprocess

    try:
        return process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Stop the program and whatever it started (it leads its own session)."""
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()
