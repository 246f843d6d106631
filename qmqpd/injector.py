"""qmail-multi's job: pick a queue, check free space, queue natively or run QMAILQUEUE.

Every outcome is a Reply; an unknown result is a temporary failure, never a K.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from qmqpd import log
from qmqpd.config import Config, ConfigError
from qmqpd.message import Client, Message, Reply, reply_for_exit
from qmqpd.queue import EXIT_READ, Queue, QueueError, free_bytes

# qmail reads at most this much custom error text from the queue program.
ERROR_TEXT_LIMIT = 1023
EXIT_EXEC_FAILED = 120

_random = random.SystemRandom()


@dataclass(frozen=True)
class Outcome:
    """What happened to one message: the answer, where it went and its id there."""

    reply: Reply
    queue: str = ""
    qid: str = ""


def check_config(config: Config) -> None:
    """Fail early (at startup) when no queue is configured at all."""
    if not (config.queuedir or config.queue_base or config.qmailqueue.strip()):
        raise ConfigError(
            "no queue configured: set QUEUEDIR (one queue), QUEUE_BASE (queueN directories "
            "under it) or QMAILQUEUE (a qmail-queue compatible program)"
        )


def choose_queue(config: Config) -> str:
    """QUEUEDIR, else QUEUE_BASE/queueN with N random in QUEUE_START..+QUEUE_COUNT-1."""
    if config.queuedir:
        return str(config.queuedir)
    if not config.queue_base:
        return ""
    number = config.queue_start + _random.randrange(config.queue_count)
    return os.path.join(config.queue_base, f"queue{number}")


class Injector:
    """One session's way into the queue; the queue is chosen once, at construction."""

    def __init__(self, config: Config, client: Client) -> None:
        self.config = config  # already overlaid with the client's rule env by the handler
        self.client = client
        check_config(self.config)
        self.program = self.config.qmailqueue.split()
        # An external program picks its own queue unless QUEUEDIR names one.
        self.queue_path = self.config.queuedir if self.program else choose_queue(self.config)
        self._queue = None if self.program else Queue(
            self.queue_path, split=self.config.split, todo_layout=self.config.todo_layout,
            fsync=self.config.use_fsync, syncdir=self.config.use_syncdir)

    @property
    def external(self) -> bool:
        return bool(self.program)

    @property
    def spool_dir(self) -> str | None:
        """Where a large message waits: the queue's own pid/, so it is on the queue's disk."""
        return None if self.program else os.path.join(self.queue_path, "pid")

    def check_space(self, length: int = 0) -> Reply | None:
        """None when there is room (or no check); the Z answer when the queue filesystem
        would fall below MIN_FREE after taking ``length`` more bytes (the announced size)."""
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
            _Feeder(pipes.envelope_w, lambda fd: _write_all(fd, envelope)),
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
    parts = [b"F", message.sender, b"\0"]
    for recipient in message.recipients:
        parts += (b"T", recipient, b"\0")
    parts.append(b"\0")
    return b"".join(parts)


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
    try:
        return process.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return None


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Stop the program and whatever it started (it leads its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    process.wait()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
