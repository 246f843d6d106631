"""One QMQP session on a connected fd: read, filter, inject, answer, log one line.

Shared by `qmqpd session` (fd 0/1 under tcpserver, inetd, systemd) and the prefork
workers, so both serving paths behave identically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from qmqpd import log
from qmqpd.config import Config, ConfigError
from qmqpd.filters import pipeline
from qmqpd.injector import Injector
from qmqpd.message import Client, Message, Record, Reply
from qmqpd.netstring import EarlyEOF, FdSource, IdleTimeout, NetstringError, TooSlow
from qmqpd.protocol import (
    BadEnvelope,
    Refused,
    protocol_error,
    read_request,
    received_line,
    write_reply,
)

if TYPE_CHECKING:
    from qmqpd.plan import PlanBook, SessionPlan

# After an early answer the client may still be sending; read and drop at most this much
# (and for at most DRAIN_SECONDS) so the answer is not destroyed by a TCP reset.
DRAIN_BYTES = 256 << 20
DRAIN_SECONDS = 30.0


class SessionResult(Record):
    __slots__ = (
        "commit_seconds",
        "error",
        "facts",
        "fatal",
        "health",
        "qid",
        "queue",
        "recipients",
        "reply",
        "sender",
        "session_seconds",
        "size",
        "verdicts",
    )

    def __init__(self, reply: Reply | None = None, fatal: bool = False, queue: str = "",
                 qid: str = "", size: int = 0, sender: bytes = b"", recipients: int = 0,
                 error: str = "", facts: dict[str, object] | None = None,
                 session_seconds: float | None = None, commit_seconds: float | None = None,
                 verdicts: list[pipeline.StageVerdict] | None = None) -> None:
        self.reply = reply
        self.fatal = fatal
        self.queue = queue
        self.qid = qid
        self.size = size
        self.sender = sender
        self.recipients = recipients
        self.error = error
        self.facts: dict[str, object] = {} if facts is None else facts
        # seconds from the session's start to its answer (to its end when none was sent)
        self.session_seconds = session_seconds
        # seconds in the injector making the message durable (None: nothing was queued)
        self.commit_seconds = commit_seconds
        self.verdicts: list[pipeline.StageVerdict] = [] if verdicts is None else verdicts
        # the request was a health check's probe (protocol.PROBE): not a session
        self.health = False


def _shutdown_write(fd: int) -> None:
    """Half-close a socket so the client sees our answer followed by EOF."""
    import socket  # only after an early answer: a plain session never loads it

    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()


# Called once with the settled result just before the answer is written (a worker reports
# done then, so its master has counted the session as ended before the client can
# reconnect). After an early answer it is called once the drain is over instead: until
# then the client is still sending, so its connection is still open.
BeforeAnswer = Callable[[SessionResult], None]


class _Announce:
    def __init__(self, result: SessionResult, hook: BeforeAnswer | None,
                 started: float) -> None:
        self.result = result
        self.hook = hook
        self.started = started

    def stamp(self) -> None:
        """The answer is going out now: the session's time ends here."""
        if self.result.session_seconds is None:
            self.result.session_seconds = time.monotonic() - self.started

    def __call__(self) -> None:
        self.stamp()
        hook, self.hook = self.hook, None
        if hook is not None:
            hook(self.result)


def _answer_and_drain(source: FdSource, wfd: int, reply: Reply, unread: int,
                      timeout: float, announce: _Announce) -> None:
    announce.stamp()  # the drain after an early answer is not the session's time
    write_reply(wfd, reply, timeout)
    _shutdown_write(wfd)
    source.drain(min(unread, DRAIN_BYTES), min(DRAIN_SECONDS, timeout))
    announce()


def _receive_and_inject(source: FdSource, wfd: int, client: Client, plan: SessionPlan,
                        result: SessionResult, announce: _Announce) -> None:
    config = plan.config
    injector = Injector(config, client, plan.route)
    result.queue = injector.queue_path or config.qmailqueue
    message: Message | None = None
    try:
        message = read_request(
            source,
            config.databytes,
            received_line(client, time.time()),
            spool_dir=injector.spool_dir,
            before_body=injector.check_space,
            max_recipients=config.maxrecipients,
        )
        result.size = message.size
        result.sender = message.sender
        result.recipients = len(message.recipients)
        filtered = pipeline.run(plan.stages, message)
        result.facts = filtered.facts
        result.verdicts = filtered.verdicts
        if filtered.reply is not None:
            result.reply = filtered.reply
        elif filtered.discard:
            result.reply = Reply.ok(int(time.time()), 0)
            result.queue = "discarded"
        else:
            committing = time.monotonic()
            outcome = injector.inject(message, source.deadline)
            result.commit_seconds = time.monotonic() - committing
            result.reply = outcome.reply
            result.qid = outcome.qid
            result.queue = outcome.queue or result.queue
    finally:
        if message is not None:
            message.close()
    announce()
    write_reply(wfd, result.reply, config.timeout)


def _source(rfd: int, config: Config, started: float) -> FdSource:
    """The session's reader: idle timeout, session limit and the minimum transfer rate."""
    return FdSource(rfd, config.timeout, started + config.session_timeout,
                    min_rate=config.min_rate, grace=config.rate_grace)


def serve_connection(rfd: int, wfd: int, client: Client, plans: PlanBook,
                     before_answer: BeforeAnswer | None = None) -> SessionResult:
    """Serve exactly one request; never raises for anything the client or the queue does.
    Settings, queue and stages come from the client's plan, made before it connected."""
    started = time.monotonic()
    config = plans.config
    result = SessionResult()
    announce = _Announce(result, before_answer, started)
    source = _source(rfd, config, started)
    try:
        plan = plans.for_env(client.rule_env)
        session_config = plan.config
        source = _source(rfd, session_config, started)
        _receive_and_inject(source, wfd, client, plan, result, announce)
    except Refused as refusal:
        result.reply = refusal.reply
        result.health = refusal.probe
        _answer_and_drain(source, wfd, refusal.reply, refusal.unread, config.timeout,
                          announce)
    except BadEnvelope as bad:
        result.reply = bad.reply
        result.health = bad.probe
        announce()
        write_reply(wfd, bad.reply, config.timeout)
    except EarlyEOF:
        result.error = "early eof"
    except TooSlow as slow:
        # A cut slow sender is not drained: that would hold the slot it just lost.
        result.error = str(slow)
        result.reply = Reply.named("too_slow", rate=source.min_rate)
        announce()
        write_reply(wfd, result.reply, config.timeout)
    except IdleTimeout as timeout:
        result.error = f"timeout {timeout}"
    except NetstringError as error:
        result.error = error.reason
        result.reply = protocol_error(error)
        _answer_and_drain(source, wfd, result.reply, 1 << 20, 1.0, announce)
    except ConfigError as error:
        result.error = str(error)
        result.reply = Reply.named("config")
        announce()
        write_reply(wfd, result.reply, config.timeout)
    except MemoryError:
        # The worker's memory cap was hit: answer while we still can, then the worker exits.
        result.error = "memory cap reached"
        result.reply = Reply.named("out_of_memory")
        result.fatal = True
        announce()
        write_reply(wfd, result.reply, config.timeout)
    except Exception as error:  # unknown outcome: temporary failure, never a lost K
        result.error = f"{type(error).__name__}: {error}"
        result.reply = Reply.named("temporary")
        announce()
        write_reply(wfd, result.reply, config.timeout)
    if result.session_seconds is None:  # ended without an answer
        result.session_seconds = time.monotonic() - started
    _log_session(client, result, started)
    return result


def _log_session(client: Client, result: SessionResult, started: float) -> None:
    if result.health:  # one short line: a balancer sends one every second or so
        log.event("health", ip=client.remote_ip, port=client.remote_port or None,
                  answer=result.reply.line if result.reply else "none",
                  ms=round((time.monotonic() - started) * 1000, 1))
        return
    log.event(
        "session",
        ip=client.remote_ip,
        port=client.remote_port or None,
        bytes=result.size,
        sender=result.sender,
        rcpts=result.recipients,
        queue=result.queue or None,
        id=result.qid or None,
        answer=result.reply.line if result.reply else "none",
        error=result.error or None,
        ms=round((time.monotonic() - started) * 1000, 1),
        **result.facts,
    )
