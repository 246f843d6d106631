"""A preforked worker: serve handed-over connections one at a time, report each as done.

The worker reports done (with the outcome) before it writes the answer, so by the time a
client can reconnect its master has already counted the session as ended.

The worker caps its own memory after fork (SOFT_MEM), so a session that blows the cap
answers Z, the worker exits, and the master lives on. It exits when the master retires it,
closes the channel, or dies (PR_SET_PDEATHSIG plus a getppid check); a master gone while
the worker was busy costs one log line, the client still gets its answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING

from qmqpd import ipc, log, procctl
from qmqpd.handler import SessionResult, serve_connection

if TYPE_CHECKING:
    from qmqpd.plan import PlanBook

IDLE_TITLE = "qmqpd: worker idle"


class _Lifecycle:
    """TERM while idle exits at once; TERM while busy lets the session finish first."""

    def __init__(self) -> None:
        self.busy = False
        self.stop = False

    def on_term(self, _signum: int, _frame: FrameType | None) -> None:
        if not self.busy:
            raise SystemExit(0)
        self.stop = True


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def outcome_of(result: SessionResult) -> ipc.Outcome:
    answer = result.reply.status if result.reply is not None else ""
    stages = [(v.stage, v.action) for v in result.verdicts if ipc.valid_stage(*v)]
    return ipc.Outcome(answer, tuple(stages[: ipc.MAX_STAGES]),
                       result.session_seconds, result.commit_seconds, result.health)


class _Reporter:
    """Sends one session's done record; a master gone (EPIPE, reset) is noted, not raised,
    so the answer to the client is still written."""

    def __init__(self, channel: socket.socket, life: _Lifecycle, master_pid: int) -> None:
        self.channel = channel
        self.life = life
        self.master_pid = master_pid
        self.sent = False
        self.exiting = False
        self.master_gone = False

    def done(self, result: SessionResult) -> None:
        if self.sent:
            return
        self.sent = True
        self.exiting = (result.fatal or self.life.stop
                        or not procctl.parent_alive(self.master_pid))
        try:
            ipc.send_done(self.channel, exiting=self.exiting, outcome=outcome_of(result))
        except OSError:
            self.master_gone = True


def _master_gone() -> None:
    log.warning("master gone; worker exits", master=os.getppid())


def worker_main(channel: socket.socket, plans: PlanBook) -> None:
    """Serve with the plans the master made before forking this worker."""
    config = plans.config
    master_pid = os.getppid()
    procctl.die_with_parent(signal.SIGTERM)
    if not procctl.parent_alive(master_pid):
        return
    procctl.set_memory_limit(config.soft_mem)
    life = _Lifecycle()
    signal.signal(signal.SIGTERM, life.on_term)
    procctl.set_title(IDLE_TITLE)
    try:
        ipc.send_ready(channel)
        _serve(channel, plans, life, master_pid)
    except (BrokenPipeError, ConnectionResetError):
        _master_gone()


def _serve(channel: socket.socket, plans: PlanBook, life: _Lifecycle,
           master_pid: int) -> None:
    while True:
        record = ipc.receive(channel)
        if record is None or record.kind is ipc.Kind.RETIRE:
            return
        if record.kind is not ipc.Kind.HANDOFF or record.fd is None or record.client is None:
            log.error("unexpected record from master", kind=record.kind.name)
            return
        life.busy = True
        procctl.set_title(f"qmqpd: worker {record.client.remote_ip} receiving")
        report = _Reporter(channel, life, master_pid)
        try:
            result = serve_connection(record.fd, record.fd, record.client, plans,
                                      before_answer=report.done)
        finally:
            _close(record.fd)
        report.done(result)  # a session that ended without an answer
        if report.master_gone:
            _master_gone()
            return
        if report.exiting:
            return
        life.busy = False
        if life.stop:  # TERM arrived after the done record
            return
        procctl.set_title(IDLE_TITLE)
