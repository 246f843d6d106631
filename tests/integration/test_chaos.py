"""Chaos: kill -9 of busy workers and of the master under load; no acknowledged mail lost.

Eight client threads send messages to a real `qmqpd serve` (its own queue, fsync and
syncdir on), each attempt with its own Message-Id, and record every answer. Meanwhile the
test kills a random busy worker every 200 ms, then kills the master a few times and
restarts it on the same queue and port (clients retry with a new attempt). Afterwards the
queue is read as qmail-send reads it (tests/queue_oracle.py) and every attempt is checked:
- every Message-Id that got K is committed exactly once, stored as sent: the Received
  line prepended and nothing else, the envelope as sent;
- an attempt answered Z or D is not queued; one with no answer may be (killed after the
  commit, before the answer): counted and reported;
- nothing committed is unusable, and pid/, intd/ and mess/ debris comes only from
  writers this test killed.

QMQPD_TEST_CHAOS_SECONDS (default 15), QMQPD_TEST_MASTER_KILLS (default 5) and
QMQPD_TEST_CHAOS_SEED make longer or repeatable runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from qmqpd.queue import create_queue
from tests.qmqp_oracle import answer_class, build_request, received_lines, split_received
from tests.queue_oracle import (
    Committed,
    QueueScan,
    debris_messages,
    leftover_writer_pid,
    scan_queue,
)
from tests.serve_process import ServeProcess, is_busy_worker, kill_child, title
from tests.support import wait_until

SESSIONS = 8
KILL_EVERY = 0.2
CHAOS_SECONDS = float(os.environ.get("QMQPD_TEST_CHAOS_SECONDS", "15"))
MASTER_KILLS = int(os.environ.get("QMQPD_TEST_MASTER_KILLS", "5"))
# Generous: a client waits this long for an answer on a loaded 2-core machine.
ANSWER_TIMEOUT = 30.0
MESSAGE_ID = re.compile(rb"^Message-Id: (<[^>\n]+>)$", re.M)


@dataclass
class Attempt:
    msgid: bytes
    ip: str
    sender: bytes
    recipients: tuple[bytes, ...]
    digest: bytes  # sha256 of the message as sent
    started: float
    ended: float = 0.0
    answer: str = "unsent"  # K, Z, D, none (closed or reset without one), timeout, garbled
    reply: bytes = b""


def make_message(rng: random.Random, msgid: bytes) -> bytes:
    size = rng.randint(200_000, 400_000) if rng.random() < 0.03 else rng.randint(100, 6000)
    filler = rng.randbytes(size // 2).hex().encode()
    lines = b"\n".join(filler[i:i + 76] for i in range(0, len(filler), 76))
    return b"Message-Id: %s\nSubject: chaos\n\n%s\n" % (msgid, lines)


class Load:
    """SESSIONS threads, each sending one message per connection until stopped."""

    def __init__(self, port: int, seed: int) -> None:
        self.port = port
        self.seed = seed
        self.attempts: list[Attempt] = []
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._session, args=(n,), daemon=True)
                        for n in range(SESSIONS)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(ANSWER_TIMEOUT + 10)
        assert not any(thread.is_alive() for thread in self.threads), "a client hung"

    def k_count(self) -> int:
        return sum(attempt.answer == "K" for attempt in self.attempts)

    def _session(self, number: int) -> None:
        rng = random.Random(f"{self.seed}-{number}")
        ip = f"127.0.0.{number + 1}"
        sequence = 0
        while not self.stopping.is_set():
            sequence += 1
            msgid = b"<chaos.%d.%d.%d@chaos.test>" % (self.seed, number, sequence)
            message = make_message(rng, msgid)
            recipients = tuple(b"r%d.%d@chaos.test" % (sequence, n)
                               for n in range(rng.randint(1, 3)))
            attempt = Attempt(msgid, ip, b"s%d@chaos.test" % number, recipients,
                              hashlib.sha256(message).digest(), time.time())
            self.attempts.append(attempt)
            self._send(attempt, build_request(message, attempt.sender, recipients))
            attempt.ended = time.time()
            if attempt.answer not in ("K", "D"):
                time.sleep(0.02)  # retry soon, as a relay with a queue would

    def _send(self, attempt: Attempt, payload: bytes) -> None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5,
                                            source_address=(attempt.ip, 0))
        except OSError:
            return  # nothing sent: the master is down or restarting
        with sock:
            sock.settimeout(ANSWER_TIMEOUT)
            attempt.answer = "none"
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as error:
                if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    raise
            try:
                while block := sock.recv(4096):
                    attempt.reply += block
            except TimeoutError:
                attempt.answer = "timeout"
                return
            except ConnectionResetError:
                pass
        attempt.answer = answer_class(attempt.reply)


def stored_msgid(entry: Committed) -> bytes | None:
    try:
        _received, rest = split_received(entry.stored)
    except ValueError:
        return None
    header = rest.split(b"\n\n", 1)[0]
    match = MESSAGE_ID.search(header)
    return match[1] if match else None


def check_entry(entry: Committed, attempt: Attempt, host: str) -> str | None:
    """Why a committed message is not exactly what the attempt sent, or None."""
    try:
        received, rest = split_received(entry.stored)
    except ValueError as error:
        return str(error)
    if received not in received_lines(attempt.ip, host, attempt.started, attempt.ended or
                                      time.time()):
        return f"unexpected Received line {received!r}"
    if hashlib.sha256(rest).digest() != attempt.digest:
        return "message bytes differ from what was sent (partial or altered)"
    if (entry.sender, entry.recipients) != (attempt.sender, attempt.recipients):
        return f"envelope {entry.sender!r} {entry.recipients!r} is not what was sent"
    if entry.uid != os.getuid():
        return f"u record {entry.uid} is not the writer's uid"
    return None


@dataclass
class Kills:
    workers: set[int] = field(default_factory=set)  # PIDs killed with -9 while busy
    masters: int = 0
    orphans: int = 0  # workers the killed masters left behind
    orphans_forced: int = 0  # orphans still there 30 s after the end (none expected)


def kill_busy_workers(server: ServeProcess, rng: random.Random, kills: Kills) -> None:
    stop = time.monotonic() + CHAOS_SECONDS
    while time.monotonic() < stop:
        tick = time.monotonic()
        busy = server.busy_workers()
        if busy:
            victim = rng.choice(busy)
            if kill_child(server.pid, victim, still=lambda pid: is_busy_worker(title(pid))):
                kills.workers.add(victim)
        time.sleep(max(0.0, tick + KILL_EVERY - time.monotonic()))


def wait_for_more_k(load: Load, more: int, what: str) -> None:
    target = load.k_count() + more
    wait_until(lambda: load.k_count() >= target, 60, what)


def kill_and_restart_master(server: ServeProcess, load: Load, rng: random.Random,
                            kills: Kills) -> None:
    for _ in range(MASTER_KILLS):
        wait_for_more_k(load, 20, "answers from the (re)started master")
        time.sleep(rng.uniform(0.2, 1.0))
        kills.orphans += server.kill_master()
        kills.masters += 1
        server.start()
    wait_for_more_k(load, 20, "answers after the last restart")


def judge(scan: QueueScan, load: Load, kills: Kills) -> tuple[dict[str, object], list[str]]:
    """Figures of the run and every failure found in the queue against the attempts."""
    failures = list(scan.problems)
    host = socket.gethostname()
    attempts = {attempt.msgid: attempt for attempt in load.attempts}
    queued: dict[bytes, list[Committed]] = {}
    for entry in scan.committed:
        msgid = stored_msgid(entry)
        if msgid not in attempts:
            failures.append(f"todo/{entry.qid}: no attempt has Message-Id {msgid!r}")
            continue
        queued.setdefault(msgid, []).append(entry)
        if (why := check_entry(entry, attempts[msgid], host)) is not None:
            failures.append(f"todo/{entry.qid} ({msgid!r}): {why}")
    answers = Counter(attempt.answer for attempt in load.attempts)
    lost = [a.msgid for a in load.attempts if a.answer == "K" and a.msgid not in queued]
    twice = {msgid: [e.qid for e in entries] for msgid, entries in queued.items()
             if len(entries) > 1}
    # Z or D tells the client to retry or bounce; an attempt never sent cannot be queued.
    refused_but_queued = [msgid for msgid in queued
                          if attempts[msgid].answer in ("Z", "D", "unsent")]
    without_k = [msgid for msgid in queued if attempts[msgid].answer in ("none", "timeout")]
    debris_writers = [leftover_writer_pid(name) for name in scan.pid_leftovers]
    debris_writers += [leftover_writer_pid(data) for data in scan.intd_leftovers.values()]
    strangers = [pid for pid in debris_writers if pid is not None and pid not in kills.workers]
    debris = debris_messages(scan)
    figures: dict[str, object] = {
        "seconds": CHAOS_SECONDS, "attempts": len(load.attempts), "answers": dict(answers),
        "k_checked": answers["K"], "lost": len(lost), "queued_twice": len(twice),
        "refused_but_queued": len(refused_but_queued), "queued_without_k": len(without_k),
        "worker_kills": len(kills.workers), "master_kills": kills.masters,
        "orphaned_workers": kills.orphans, "orphans_needing_kill": kills.orphans_forced,
        "committed": len(scan.committed), "pid_leftovers": len(scan.pid_leftovers),
        "intd_leftovers": len(scan.intd_leftovers), "mess_leftovers": len(scan.mess_leftovers),
        "debris_messages": debris,
    }
    if lost:
        failures.append(f"{len(lost)} acknowledged messages lost, e.g. {lost[:3]}")
    if twice:
        failures.append(f"{len(twice)} Message-Ids committed more than once: "
                        f"{list(twice.items())[:3]}")
    if refused_but_queued:
        failures.append(f"answered Z/D (or never sent) but queued: {refused_but_queued[:3]}")
    if answers["garbled"] or answers["timeout"]:
        failures.append(f"garbled or missing answers: {dict(answers)}")
    if strangers:
        failures.append(f"debris from writers that were not killed: {strangers}")
    if debris > len(kills.workers):
        failures.append(f"debris of {debris} messages from {len(kills.workers)} killed workers")
    if scan.delivered_side:
        failures.append(f"files only qmail-send writes: {scan.delivered_side[:3]}")
    if kills.orphans_forced:
        failures.append(f"{kills.orphans_forced} orphaned workers had to be killed")
    return figures, failures


def test_kill9_workers_and_master_under_load(tmp_path: Path) -> None:
    seed = int(os.environ.get("QMQPD_TEST_CHAOS_SEED", random.randrange(1 << 30)))
    print(f"chaos seed {seed} (QMQPD_TEST_CHAOS_SEED={seed} repeats the choices)")
    rng = random.Random(seed)
    queue = tmp_path / "queue"
    create_queue(str(queue))
    server = ServeProcess(tmp_path, queue, use_fsync=True, use_syncdir=True, prefork=4,
                          maxdaemons=32, maxperip=0, timeout=10, session_timeout=60)
    server.start()
    load = Load(server.port, seed)
    kills = Kills()
    try:
        load.start()
        wait_for_more_k(load, 20, "the first answers")
        kill_busy_workers(server, rng, kills)
        kill_and_restart_master(server, load, rng, kills)
    finally:
        try:
            load.stop()
        finally:
            status = server.stop()
            kills.orphans_forced = server.reap_orphans(30)
    assert status == 0, server.log()[-3000:]
    figures, failures = judge(scan_queue(str(queue)), load, kills)
    figures["seed"] = seed
    print("chaos figures", json.dumps(figures, sort_keys=True))
    assert not failures, f"seed {seed}, figures {figures}:\n" + "\n".join(failures[:30])
    # The run did what it claims: kills happened while messages were acknowledged.
    assert len(kills.workers) >= CHAOS_SECONDS and kills.masters == MASTER_KILLS, figures
    assert load.k_count() >= 200, figures
