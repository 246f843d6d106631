"""Hostile sessions against real processes: slow senders under `qmqpd serve`, a 16 MiB
envelope of one-byte recipients through `qmqpd session` (CPU and memory of the child from
getrusage), MAXRECIPIENTS from a rule, and MIN_FREE against the announced length on a
small tmpfs.

Clients are real sockets on 127.0.0.0/8; 127.0.0.2.. as source addresses stand for
different client IPs.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmqpd.netstring import encode
from qmqpd.queue import create_queue, list_messages
from tests.serve_process import ServeProcess
from tests.support import (
    command,
    read_reply,
    request,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = b"Subject: test\n\nhello\n"
MIB = 1 << 20


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """Start `qmqpd serve` with its own queue (tmp/queue), log and port, no fsync; every
    one started is stopped by PID at the end."""
    started: list[ServeProcess] = []

    def start(**settings: object) -> ServeProcess:
        server = ServeProcess(tmp_path, use_fsync=False, use_syncdir=False, **settings)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def deliver(port: int, payload: bytes, source: str = "127.0.0.1", timeout: float = 60) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_reply(sock)


# -- slow senders ----------------------------------------------------------------------------

@dataclass
class SlowSender:
    sock: socket.socket
    started: float
    sent: int = 0
    answer: bytes = b""
    cut_after: float | None = None


def trickle(senders: list[SlowSender], payload: bytes, stop: threading.Event) -> None:
    """One byte per second on every socket until the server answers or closes it."""
    while not stop.is_set():
        for sender in senders:
            if sender.cut_after is not None:
                continue
            try:
                sender.sock.sendall(payload[sender.sent : sender.sent + 1])
                sender.sent += 1
            except OSError:
                sender.cut_after = time.monotonic() - sender.started
        stop.wait(1.0)


def watch_answers(senders: list[SlowSender], stop: threading.Event) -> None:
    """Record the first answer (or close) each slow sender sees, and when."""
    waiting = {sender.sock.fileno(): sender for sender in senders}
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    while waiting and not stop.is_set():
        for fd, _ in poller.poll(50):
            sender = waiting.pop(fd)
            poller.unregister(fd)
            try:
                block = sender.sock.recv(4096)
            except OSError:
                block = b""
            if sender.cut_after is None:
                sender.cut_after = time.monotonic() - sender.started
            sender.answer = block or b"(closed)"


GRACE = 4  # RATE_GRACE for this test: short so the test stays fast; the default is 20


def test_slow_senders_do_not_deny_a_fresh_client(serve: Callable[..., ServeProcess]) -> None:
    """75 clients at 1 byte/s from 3 IPs (MAXDAEMONS 75, MAXPERIP 25) wait in the master
    without a worker (it hands a connection over only once its request is in the socket),
    so a client from a 4th IP is answered K at once; the master cuts them with the rate
    rule's Z about RATE_GRACE seconds after they connected. Without the master's wait they
    held every worker until the rate rule cut them; without the rule (MIN_RATE 0) for
    SESSION_TIMEOUT (3600 s)."""
    server = serve(maxdaemons=75, maxperip=25, prefork=4, rate_grace=GRACE, min_rate=512)
    wait_until(lambda: len(server.titled("worker idle")) == 4, seconds=60, what="4 idle workers")
    payload = request(b"x" * 5000, b"slow@example.org", [b"rcpt@example.org"])
    senders: list[SlowSender] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            for _ in range(25):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                                source_address=(source, 0))
                sock.settimeout(None)  # one-byte sends; answers are polled for
                senders.append(SlowSender(sock, time.monotonic()))
        threads = [threading.Thread(target=trickle, args=(senders, payload, stop)),
                   threading.Thread(target=watch_answers, args=(senders, stop))]
        for thread in threads:
            thread.start()
        wait_until(lambda: all(sender.sent >= 2 for sender in senders), seconds=GRACE,
                   what="75 slow senders under way")
        assert not server.titled(" receiving")
        first_slow = min(sender.started for sender in senders)

        asked = time.monotonic()
        answer = deliver(server.port, request(MESSAGE, b"fresh@example.org",
                                              [b"rcpt@example.org"]), source="127.0.0.5")
        waited = time.monotonic() - asked
        print(f"\nfresh client: K after {waited:.1f} s; the slow senders had started "
              f"{asked - first_slow:.1f} s before it")
        assert b":Kok " in answer, answer
        # Served at once (milliseconds on loopback; 2 s leaves room for a loaded machine).
        assert waited < 2.0, waited

        wait_until(lambda: all(s.answer for s in senders), seconds=20, what="all cut")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        for sender in senders:
            sender.sock.close()
    too_slow = encode(b"Zconnection too slow: below 512 bytes per second (#4.4.2)")
    assert [s.answer for s in senders] == [too_slow] * 75
    cut_after = sorted(s.cut_after for s in senders if s.cut_after is not None)
    print(f"slow senders cut after {cut_after[0]:.1f} .. {cut_after[-1]:.1f} s "
          f"(RATE_GRACE {GRACE}, 1 byte/s)")
    assert cut_after[0] >= GRACE  # the master's clock starts at the client's connect
    assert server.log().count('error="too slow: ') == 75, server.log()[-2000:]
    assert server.queued() == 1


def slow_then_fast(port: int, source: str, payload: bytes, slow_seconds: float) -> bytes:
    """Ten bytes a second for slow_seconds, then the rest at once."""
    with socket.create_connection(("127.0.0.1", port), timeout=30,
                                  source_address=(source, 0)) as sock:
        sent = 0
        stop = time.monotonic() + slow_seconds
        try:
            while time.monotonic() < stop:
                sock.sendall(payload[sent : sent + 1])
                sent += 1
                time.sleep(0.1)
            sock.sendall(payload[sent:])
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # cut: the answer says why
        return read_reply(sock)


def test_min_rate_from_a_rule(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    """A rule can exempt a known slow relay; everyone else is held to MIN_RATE."""
    rules = tmp_path / "rules.txt"
    rules.write_text('127.0.0.2:allow,MIN_RATE="0"\n:allow\n')
    cdb = tmp_path / "rules.cdb"
    subprocess.run([*command("qmqpd"), "rules", "compile", str(rules), str(cdb)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
    server = serve(rules=str(cdb), rate_grace=1, min_rate=512)
    payload = request(MESSAGE, b"s@example.org", [b"r@example.org"])
    assert b":Kok " in slow_then_fast(server.port, "127.0.0.2", payload, 2.5)
    assert slow_then_fast(server.port, "127.0.0.3", payload, 2.5) == encode(
        b"Zconnection too slow: below 512 bytes per second (#4.4.2)")
    assert server.queued() == 1


# -- a 16 MiB envelope of one-byte recipients, measured in the child -------------------------

@dataclass
class Usage:
    answer: bytes
    cpu: float
    max_rss_mib: float


# Runs the command and reports its CPU seconds and peak RSS (KiB) on stderr. A child's
# ru_maxrss also counts the memory of the process that forked it (until its exec), so the
# session is started from this small process, never from the test process itself.
MEASURE = (
    "import resource, subprocess, sys\n"
    "subprocess.call(sys.argv[1:])\n"
    "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
    "print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss, file=sys.stderr)\n"
)


def run_session(queue: Path, payload: bytes, half_close: bool = True, **env: str) -> Usage:
    """`qmqpd session` on a socketpair; CPU and peak RSS of that process (getrusage).

    Without half_close the client sends the payload and then only waits for the answer."""
    ours, theirs = socket.socketpair()
    environ = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
               "QUEUEDIR": str(queue), "USE_FSYNC": "0", "USE_SYNCDIR": "0",
               "TCPREMOTEIP": "127.0.0.1", **env}
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, *command("qmqpd"), "session"],
                            stdin=theirs, stdout=theirs, stderr=subprocess.PIPE, env=environ)
    theirs.close()

    def send() -> None:
        with contextlib.suppress(OSError):
            ours.sendall(payload)
            if half_close:
                ours.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=send)
    writer.start()
    ours.settimeout(120)
    answer = read_reply(ours)
    writer.join(120)
    ours.close()
    _, report = proc.communicate(timeout=120)
    cpu, max_rss_kib = report.split()[-2:]
    return Usage(answer, float(cpu), int(max_rss_kib) / 1024)


def one_byte_recipients(envelope_bytes: int) -> tuple[bytes, int]:
    count = envelope_bytes // 4
    inner = encode(MESSAGE) + encode(b"s@example.org") + b"1:a," * count
    return encode(inner), count


@pytest.mark.parametrize("limit", ["100000", "0"])
def test_16_mib_envelope_of_one_byte_recipients(queue: Path, limit: str) -> None:
    """Before: 13.8 s CPU and 1.1 GB; the bound here is a regression guard for a loaded
    2-core machine (measured 0.1 s refused, 0.5 s queued; 7 / 56 MiB above idle)."""
    idle = run_session(queue, request(MESSAGE, b"s@example.org", [b"a"]))
    assert b":Kok " in idle.answer
    payload, count = one_byte_recipients(16 * MIB - 1000)
    used = run_session(queue, payload, MAXRECIPIENTS=limit)
    print(f"\nMAXRECIPIENTS={limit}: {count} recipients, cpu {used.cpu:.2f} s, peak RSS "
          f"{used.max_rss_mib:.1f} MiB ({used.max_rss_mib - idle.max_rss_mib:.1f} above the "
          f"{idle.max_rss_mib:.1f} MiB of a one-recipient session)")
    assert used.cpu < 5
    assert used.max_rss_mib - idle.max_rss_mib < 64
    queued = list(list_messages(str(queue)))
    if limit == "0":
        assert b":Kok " in used.answer, used.answer
        assert len(queued) == 2
        todo = max((queue / "todo").iterdir(), key=lambda p: p.stat().st_size).read_bytes()
        assert todo.endswith(b"Fs@example.org\0" + b"Ta\0" * count)
    else:
        assert used.answer == encode(
            b"Dtoo many recipients: at most 100000 per message (#5.5.3)")
        assert len(queued) == 1


def test_maxrecipients_from_a_rule(serve: Callable[..., ServeProcess], tmp_path: Path) -> None:
    rules = tmp_path / "rules.txt"
    rules.write_text('127.0.0.2:allow,MAXRECIPIENTS="3"\n127.0.0.3:allow,MAXRECIPIENTS="0"\n'
                     ":allow\n")
    cdb = tmp_path / "rules.cdb"
    subprocess.run([*command("qmqpd"), "rules", "compile", str(rules), str(cdb)], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True)
    server = serve(maxrecipients=5, rules=str(cdb))

    def answer(source: str, count: int) -> bytes:
        recipients = [b"r%d@example.org" % i for i in range(count)]
        return deliver(server.port, request(MESSAGE, b"s@example.org", recipients), source)

    too_many = b"Dtoo many recipients: at most %d per message (#5.5.3)"
    assert b":Kok " in answer("127.0.0.2", 3)
    assert answer("127.0.0.2", 4) == encode(too_many % 3)
    assert b":Kok " in answer("127.0.0.1", 5)
    assert answer("127.0.0.1", 6) == encode(too_many % 5)
    assert b":Kok " in answer("127.0.0.3", 2000)
    assert server.queued() == 3


# -- MIN_FREE against the announced length ---------------------------------------------------

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, unmounted afterwards; the test is skipped where mounting is denied."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def queue_files(queue: Path) -> list[str]:
    return sorted(str(p.relative_to(queue)) for top in ("pid", "mess", "intd", "todo")
                  for p in (queue / top).rglob("*") if p.is_file())


def test_min_free_counts_the_announced_length(small_tmpfs: Path) -> None:
    queue = small_tmpfs / "queue"
    create_queue(str(queue))
    env = {"MIN_FREE": str(4 * MIB), "TIMEOUT": "20"}
    # Only the lengths: the answer must come before any of the 5 MiB body is sent (without
    # the announced length the server would wait for the body, then spool it on the tmpfs).
    five = 5 * MIB
    lengths = b"%d:%d:" % (five + len(b"%d:," % five) + len(b"1:s,3:r@x,"), five)
    big = run_session(queue, lengths, half_close=False, **env)
    assert big.answer == encode(b"Zqq write error or disk full (#4.3.0)"), big.answer
    assert queue_files(queue) == []
    small = run_session(queue, request(os.urandom(MIB), b"s@example.org", [b"r@x"]), **env)
    assert b":Kok " in small.answer, small.answer
    assert len(list(list_messages(str(queue)))) == 1


def test_min_free_holds_after_the_spool_copy(small_tmpfs: Path) -> None:
    """Above 1 MiB the body waits in the queue's pid/ and is then copied to mess/: the second
    check, with the size, keeps that copy from taking the last MIN_FREE bytes."""
    queue = small_tmpfs / "queue"
    create_queue(str(queue))
    env = {"MIN_FREE": str(MIB)}
    fits = run_session(queue, request(os.urandom(3 * MIB), b"s@example.org", [b"r@x"]), **env)
    assert b":Kok " in fits.answer, fits.answer
    free = os.statvfs(queue).f_bavail * os.statvfs(queue).f_frsize
    # Passes the first check (free - size >= MIN_FREE), but the spool and its copy do not fit.
    size = (free - MIB) // 2 + MIB // 4
    tight = run_session(queue, request(os.urandom(size), b"s@example.org", [b"r@x"]), **env)
    assert tight.answer == encode(b"Zqq write error or disk full (#4.3.0)"), tight.answer
    assert len(list(list_messages(str(queue)))) == 1
    assert not list((queue / "pid").iterdir())
    assert os.statvfs(queue).f_bavail * os.statvfs(queue).f_frsize >= MIB
