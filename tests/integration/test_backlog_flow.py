"""Flow control of a real `qmqpd serve` with nothing draining its queue (no qmail-send):
past QUEUE_MAX_TODO the answer is Z with the backlog reason (raw QMQP clients and qmqpc
see it), taking the todo entries as qmail-send does brings K back; with two queues and
one stuck, new mail goes to the other; the backlog gauges of a 100,000-message queue match
its content while scrapes stay quick and the master's CPU small.

The figures each test measures are printed (`pytest -s`) as `figure: ...` lines.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

from qmqpd.queue import create_queue
from qmqpd.rules import compile_rules
from tests.integration.test_master import Server
from tests.support import command, exchange, free_port, request, wait_until
from tests.unit.test_metrics import promtool_check, samples

SPLIT = 23
BACKLOG_Z = b"Zqueue backlog too large, try another server (#4.3.1)"
PAYLOAD = request(b"Subject: backlog\n\nhello\n", b"relay@example.org", [b"rcpt@example.org"])


def answer(port: int) -> bytes:
    raw = exchange(port, PAYLOAD)
    return raw.partition(b":")[2].rstrip(b",")


def todo_ids(queue: Path) -> list[int]:
    return [int(name) for name in os.listdir(queue / "todo") if name.isdigit()]


def take_as_qmail_send(queue: Path, qid: int) -> None:
    """What qmail-send does with todo/N: info/N (the sender) and local/N (the
    recipients) in their split dirs, then qmail-clean unlinks intd/N and todo/N."""
    envelope = (queue / "todo" / str(qid)).read_bytes()
    records = envelope.split(b"\0")
    sender = next(r for r in records if r.startswith(b"F"))
    recipients = b"".join(r + b"\0" for r in records if r.startswith(b"T"))
    (queue / "info" / str(qid % SPLIT) / str(qid)).write_bytes(sender + b"\0")
    (queue / "local" / str(qid % SPLIT) / str(qid)).write_bytes(recipients)
    os.unlink(queue / "intd" / str(qid))
    os.unlink(queue / "todo" / str(qid))


def qmqpc(port: int) -> subprocess.CompletedProcess[str]:
    """The project's qmqpc, as a relay's queue runs it (message on stdin)."""
    return subprocess.run(
        [*command("qmqpc"), "--server", f"127.0.0.1:{port}", "--from", "relay@example.org",
         "--to", "rcpt@example.org"], input="Subject: relay\n\nhi\n", capture_output=True,
        text=True, timeout=60, check=False)


def test_z_past_the_backlog_limit_and_k_once_drained(tmp_path: Path) -> None:
    server = Server(tmp_path, queue_max_todo=20, queue_soft_todo=0,
                    queue_scan_interval="0.5").start()
    try:
        accepted = 0
        started = time.monotonic()
        while (reply := answer(server.port)).startswith(b"K"):
            accepted += 1
            assert accepted < 1000, "no Z after 1000 messages"
        onset = time.monotonic() - started
        assert reply == BACKLOG_Z
        # Z once the count passes 20: the last scan plus the tally of mail queued since
        assert 20 < accepted <= 25
        assert len(todo_ids(server.queue)) == accepted
        relay = qmqpc(server.port)
        assert relay.returncode == 71, relay  # qmail-qmqpc's exit code for Z
        assert "queue backlog too large, try another server (#4.3.1)" in (
            relay.stdout + relay.stderr)
        assert re.search(r'event=queue_backlog .* reason="todo \d+ > QUEUE_MAX_TODO 20"',
                         server.log())
        time.sleep(0.6)  # the summary is a scan old: let `queue stat` make a new one
        stat = subprocess.run([*command("qmqpd"), "queue", "stat", "--config",
                               str(server.config_path)], capture_output=True, text=True,
                              timeout=60, check=True).stdout
        assert f"{server.queue} todo={accepted} " in stat, stat
        assert f" mess={accepted} oldest_todo=" in stat, stat

        drained_at = time.monotonic()
        for qid in todo_ids(server.queue):
            take_as_qmail_send(server.queue, qid)
        wait_until(lambda: answer(server.port).startswith(b"K"), seconds=30,
                   what="K once qmail-send took the todo entries")
        recovery = time.monotonic() - drained_at
        print(f"figure: QUEUE_MAX_TODO=20, scan 0.5 s: first Z after {accepted} K "
              f"({onset:.2f} s of sequential sends); K again {recovery:.2f} s after the "
              "todo entries were taken")
        assert recovery < 10
    finally:
        server.stop()


def test_a_stuck_queue_is_avoided_while_another_has_room(tmp_path: Path) -> None:
    base = tmp_path / "queues"
    for n in (1, 2):
        create_queue(str(base / f"queue{n}"))
    stuck = base / "queue1"
    old = time.time() - 600
    for qid in range(500, 505):  # qmail-send has not taken these for ten minutes
        for name in (stuck / "mess" / str(qid % SPLIT) / str(qid), stuck / "intd" / str(qid),
                     stuck / "todo" / str(qid)):
            name.touch()
            os.utime(name, (old, old))
    server = Server(tmp_path, queuedir="", queue_base=str(base), queue_count=2,
                    queue_stuck_age=60, queue_max_todo_age=0).start()
    try:
        for _ in range(30):
            assert answer(server.port).startswith(b"K")
        assert len(todo_ids(stuck)) == 5
        assert len(todo_ids(base / "queue2")) == 30
    finally:
        server.stop()


def fill_known(queue: Path, messages: int, todo: int) -> None:
    """`messages` empty mess files, the first `todo` of them also in todo/ (qmail-send has
    taken the others); the oldest message is an hour old, the oldest todo 5 minutes."""
    now = time.time()
    for n in range(messages):
        qid = 1000 + n
        mess = queue / "mess" / str(qid % SPLIT) / str(qid)
        os.close(os.open(mess, os.O_CREAT | os.O_WRONLY, 0o644))
        if n < todo:
            os.close(os.open(queue / "todo" / str(qid), os.O_CREAT | os.O_WRONLY, 0o644))
    os.utime(queue / "mess" / str(1000 % SPLIT) / "1000", (now - 3600, now - 3600))
    os.utime(queue / "todo" / "1001", (now - 300, now - 300))


def master_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_gauges_of_100000_queued_messages(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    create_queue(str(queue))
    fill_known(queue, 100_000, 20_000)
    metrics_port = free_port()
    server = Server(tmp_path, metrics=f"127.0.0.1:{metrics_port}", queue_scan_interval=2,
                    queue_max_todo=0, queue_max_todo_age=0).start()
    try:
        cpu_before = master_cpu(server.pid)
        started = time.monotonic()
        scrapes: list[float] = []
        found: dict[str, float] = {}
        label = f'{{queue="{queue}"}}'
        while time.monotonic() - started < 30:
            began = time.monotonic()
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as reply:
                text = reply.read().decode()
            scrapes.append(time.monotonic() - began)
            found = samples(text)
            if f"qmqpd_queue_messages{label}" in found and len(scrapes) >= 20:
                break
            time.sleep(0.2)
        window = time.monotonic() - started
        cpu = master_cpu(server.pid) - cpu_before
        assert found[f"qmqpd_queue_todo_messages{label}"] == 20_000
        assert found[f"qmqpd_queue_messages{label}"] == 100_000
        assert 299 <= found[f"qmqpd_queue_oldest_todo_age_seconds{label}"] <= 360
        assert 3599 <= found[f"qmqpd_queue_oldest_message_age_seconds{label}"] <= 3660
        assert found[f"qmqpd_queue_free_inodes{label}"] > 0
        scan = found[f"qmqpd_queue_scan_duration_seconds{label}"]
        median = sorted(scrapes)[len(scrapes) // 2]
        print(f"figure: 120,000 entries (100,000 mess, 20,000 todo, flat): scan {scan:.3f} s "
              f"(in the scanner child); {len(scrapes)} scrapes in {window:.1f} s, slowest "
              f"{max(scrapes) * 1000:.0f} ms, median {median * 1000:.0f} ms; master CPU "
              f"{cpu:.2f} s in that window")
        assert max(scrapes) < 1.0
        assert cpu < 0.1 * window + 0.5  # the master never scans: reading summaries only
        done = promtool_check(text)
        assert done.returncode == 0, done.stdout + done.stderr
        shown = subprocess.run([*command("qmqpd"), "status", "--config",
                                str(server.config_path)], capture_output=True, text=True,
                               timeout=60, check=False).stdout
        assert f"queue {queue}: todo 20000 (oldest 5m" in shown
        assert "100000 messages (oldest 1h00m" in shown
    finally:
        server.stop()


def test_past_the_soft_mark_each_message_waits(tmp_path: Path) -> None:
    queue = tmp_path / "queue"
    create_queue(str(queue))
    server = Server(tmp_path, queue_soft_todo=5, queue_flow_delay="0.5", queue_max_todo=0,
                    queue_scan_interval="0.3").start()
    try:
        def timed() -> float:
            began = time.monotonic()
            assert answer(server.port).startswith(b"K")
            return time.monotonic() - began

        below = [timed() for _ in range(3)]
        fill_known(queue, 10, 10)  # qmail-send behind: 10 todo entries
        time.sleep(0.5)  # the next session finds the summary stale and rescans
        above = [timed() for _ in range(4)]
        print(f"figure: QUEUE_SOFT_TODO=5, QUEUE_FLOW_DELAY=0.5: a K took "
              f"{max(below) * 1000:.0f} ms at most below the mark, "
              f"{min(above) * 1000:.0f}-{max(above) * 1000:.0f} ms above it")
        assert max(below) < 0.5
        assert min(above) >= 0.5
        assert "event=queue_flow_delay" in server.log()
    finally:
        server.stop()


def test_a_rule_sets_its_own_limit(tmp_path: Path) -> None:
    """A bulk sender (127.0.0.3) gets Z past its own QUEUE_MAX_TODO while other clients
    keep getting K from the same queue."""
    (tmp_path / "tcp.qmqp").write_text('127.0.0.3:allow,QUEUE_MAX_TODO="5"\n127.:allow\n')
    compile_rules(str(tmp_path / "tcp.qmqp"), str(tmp_path / "tcp.qmqp.cdb"))
    queue = tmp_path / "queue"
    create_queue(str(queue))
    fill_known(queue, 10, 10)
    server = Server(tmp_path, rules=str(tmp_path / "tcp.qmqp.cdb"),
                    queue_scan_interval="0.5").start()
    try:
        bulk = exchange(server.port, PAYLOAD, source="127.0.0.3")
        assert bulk.partition(b":")[2].rstrip(b",") == BACKLOG_Z
        other = exchange(server.port, PAYLOAD, source="127.0.0.2")
        assert other.partition(b":")[2].startswith(b"K")
    finally:
        server.stop()
