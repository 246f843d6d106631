"""`qmqpd session` under Debian's tcpserver, driven by Postfix's qmqp-source and by qmqpc.

A recording proxy between the client and tcpserver keeps each request's raw bytes and the
answer, so every queued message can be compared byte for byte with what the client sent.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from qmqpd.queue import create_queue, list_messages
from tests.support import (
    TcpServerSession,
    command,
    exchange,
    free_port,
    need_postfix,
    request,
)

RECEIVED_RE = re.compile(
    rb"Received: from unknown \(127\.0\.0\.1\)\n"
    rb"  by qmqpd\.test with QMQP; \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\n"
)


def split_netstrings(data: bytes) -> list[bytes]:
    """An independent minimal netstring splitter (not the code under test)."""
    items = []
    while data:
        length, _, rest = data.partition(b":")
        size = int(length)
        items.append(rest[:size])
        assert rest[size : size + 1] == b",", "bad netstring in a recorded request"
        data = rest[size + 1 :]
    return items


class RecordingProxy:
    """Loopback TCP proxy that records (request bytes, answer bytes) per connection."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.records: list[tuple[bytes, bytes]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream), timeout=30) as up:
            sent = bytearray()
            answer = bytearray()

            def pump_up() -> None:
                # qmqp-source does not half-close: it reads the answer, then closes (RST).
                try:
                    while block := client.recv(65536):
                        sent.extend(block)
                        up.sendall(block)
                    up.shutdown(socket.SHUT_WR)
                except OSError:
                    pass

            pumper = threading.Thread(target=pump_up, daemon=True)
            pumper.start()
            try:
                while block := up.recv(65536):
                    answer.extend(block)
                    client.sendall(block)
                client.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            finally:
                pumper.join(30)
                with self.lock:
                    self.records.append((bytes(sent), bytes(answer)))

    def wait_for(self, count: int, seconds: float) -> None:
        """The last connections may still be finishing in their threads."""
        stop = time.monotonic() + seconds
        while len(self.records) < count and time.monotonic() < stop:
            time.sleep(0.05)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def server(queue: Path, tcpserver_sessions):
    return lambda **env: tcpserver_sessions({"QUEUEDIR": str(queue), **env})


def queued_files(queue: Path, qid: int) -> tuple[bytes, bytes]:
    mess = (queue / "mess" / str(qid % 23) / str(qid)).read_bytes()
    envelope = (queue / "todo" / str(qid)).read_bytes()
    return mess, envelope


def assert_leftover_free(queue: Path) -> None:
    assert os.listdir(queue / "pid") == []
    assert sorted(os.listdir(queue / "intd")) == sorted(os.listdir(queue / "todo"))


def test_qmqp_source_1000_messages_byte_exact(server, queue: Path) -> None:
    session = server(USE_FSYNC="1", USE_SYNCDIR="1")
    proxy = RecordingProxy(session.port)
    try:
        run = subprocess.run(
            [need_postfix("/usr/sbin/qmqp-source"), "-m", "1000", "-s", "4", "-l", "2048",
             "-r", "2", "-f", "sender@source.example", "-t", "rcpt@dest.example",
             f"127.0.0.1:{proxy.port}"],
            capture_output=True, timeout=600,
        )
        proxy.wait_for(1000, seconds=30)
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    assert len(proxy.records) == 1000
    todo = os.listdir(queue / "todo")
    assert len(todo) == 1000
    for sent, answer in proxy.records:
        fields = split_netstrings(split_netstrings(sent)[0])
        message, sender, recipients = fields[0], fields[1], fields[2:]
        status = split_netstrings(answer)[0]
        match = re.fullmatch(rb"Kok \d+ qp (\d+)", status)
        assert match, status
        qid = int(match.group(1))
        mess, envelope = queued_files(queue, qid)
        received = RECEIVED_RE.match(mess)
        assert received, mess[:200]
        assert mess[received.end() :] == message
        expected = re.escape(b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients))
        assert re.fullmatch(rb"u%d\0p\d+\0" % os.getuid() + expected, envelope)
        assert not envelope.endswith(b"\0\0")
        assert len(recipients) == 2
        mode = stat.S_IMODE(os.stat(queue / "todo" / str(qid)).st_mode)
        assert mode == 0o644
    assert_leftover_free(queue)


def test_qmqpc_through_tcpserver(server, queue: Path, tmp_path: Path) -> None:
    session = server()
    servers = tmp_path / "qmqpservers"
    servers.write_text(f"127.0.0.1:{free_port()}\n127.0.0.1:{session.port}\n")
    message = b"From: a@example.org\nSubject: via qmqpc\n\nhello\n"
    for n in range(20):
        run = subprocess.run(
            [*command("qmqpc"), "--servers", str(servers), "--from", "a@example.org",
             "--to", f"r{n}@example.net"],
            input=message, capture_output=True, timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(b"K")
    items = list(list_messages(str(queue)))
    assert len(items) == 20
    assert {item.recipients[0] for item in items} == {f"r{n}@example.net".encode()
                                                      for n in range(20)}
    for item in items:
        mess, _ = queued_files(queue, int(item.id))
        assert mess.endswith(message)
        assert item.sender == b"a@example.org"
    listing = subprocess.run([*command("qmqpd"), "queue", "list", str(queue)],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    lines = listing.splitlines()
    assert len(lines) == 20
    for line in lines:
        assert re.fullmatch(
            re.escape(str(queue)) + r" \d+ todo age=\d+s size=\d+ from=a@example\.org "
            r"to=r\d+@example\.net", line), line
    stat_line = subprocess.run([*command("qmqpd"), "queue", "stat", str(queue)],
                               capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"{queue} todo=20 queued=0 broken=0" in stat_line


def answer_of(raw: bytes) -> bytes:
    return split_netstrings(raw)[0] if raw else b""


def test_too_big_answer_reaches_a_client_still_sending(server, queue: Path) -> None:
    session = server(DATABYTES="100000")
    payload = request(b"x" * 5_000_000, b"a@b", [b"c@d"])
    with socket.create_connection(("127.0.0.1", session.port), timeout=30) as sock:
        sock.sendall(payload)  # blocks unless the server drains what it refused
        sock.shutdown(socket.SHUT_WR)
        raw = sock.recv(4096)
    assert answer_of(raw) == b"Dmessage too big (#5.3.4)"
    assert os.listdir(queue / "todo") == []


@pytest.mark.parametrize(
    ("payload", "answer"),
    [
        (request(b"x\n", b"a" * 1000, [b"c@d"]),
         b"Dsorry, I can't accept addresses like that (#5.1.3)"),
        (request(b"x\n", b"a@b", [b"c\0d"]),
         b"Dsorry, I can't accept addresses like that (#5.1.3)"),
        (request(b"x\n", b"a@b", []), b"Dno recipients given (#5.1.3)"),
        (b"12x:", b"Dprotocol error: bad netstring length (#5.5.2)"),
        (b"5:1:x,1:a;", b"Dprotocol error: request longer than its outer length (#5.5.2)"),
    ],
)
def test_bad_requests_get_d(server, queue: Path, payload: bytes, answer: bytes) -> None:
    session = server()
    assert answer_of(exchange(session.port, payload)) == answer
    assert os.listdir(queue / "todo") == []


def test_early_eof_queues_nothing(server, queue: Path) -> None:
    session = server()
    raw = exchange(session.port, request(b"x" * 100, b"a@b", [b"c@d"])[:50])
    assert raw == b""
    assert os.listdir(queue / "todo") == [] and os.listdir(queue / "pid") == []
    assert 'error="early eof"' in session.log.read_text()


def test_idle_timeout_closes(server, queue: Path) -> None:
    session = server(TIMEOUT="1")
    with socket.create_connection(("127.0.0.1", session.port), timeout=10) as sock:
        sock.sendall(b"100:5:hel")
        assert sock.recv(100) == b""  # closed by the server after 1 s
    assert os.listdir(queue / "todo") == []


def test_min_free_answers_z(server, queue: Path) -> None:
    session = server(MIN_FREE=str(1 << 62))
    raw = exchange(session.port, request(b"x\n", b"a@b", [b"c@d"]))
    assert answer_of(raw) == b"Zqq write error or disk full (#4.3.0)"
    assert os.listdir(queue / "todo") == []


def test_queue_base_spreads_over_queues(server, tmp_path: Path) -> None:
    base = tmp_path / "multi"
    for n in (3, 4, 5):
        create_queue(str(base / f"queue{n}"))
    session = server(QUEUEDIR="", QUEUE_BASE=str(base), QUEUE_COUNT="3", QUEUE_START="3")
    for _ in range(60):
        assert answer_of(exchange(session.port, request(b"x\n", b"a@b", [b"c@d"])))[:1] == b"K"
    counts = [len(os.listdir(base / f"queue{n}" / "todo")) for n in (3, 4, 5)]
    assert sum(counts) == 60 and min(counts) > 0


@pytest.mark.parametrize("layout", ["flat", "split"])
@pytest.mark.parametrize("sync", ["0", "1"])
def test_layouts_and_sync_switches(tmp_path: Path, layout: str, sync: str) -> None:
    queue = tmp_path / "q"
    create_queue(str(queue), split=7, todo_layout=layout)
    session = TcpServerSession(
        {"QUEUEDIR": str(queue), "SPLIT": "7", "TODO_LAYOUT": layout, "USE_FSYNC": sync,
         "USE_SYNCDIR": sync}, tmp_path / "log")
    try:
        raw = exchange(session.port, request(b"hello\n", b"a@b", [b"c@d"]))
    finally:
        session.stop()
    qid = int(answer_of(raw).split()[-1])
    todo = queue / "todo" / (f"{qid % 7}/{qid}" if layout == "split" else str(qid))
    assert todo.read_bytes().endswith(b"Fa@b\0Tc@d\0")
    assert (queue / "mess" / str(qid % 7) / str(qid)).read_bytes().endswith(b"hello\n")


def test_external_qmailqueue_program(server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    program = tmp_path / "qq"
    program.write_text(
        "#!/bin/sh\ncat > " + str(out) + ".msg\ncat <&1 > " + str(out) + ".env\nexit 0\n")
    program.chmod(0o755)
    failing = tmp_path / "qq-fail"
    failing.write_text("#!/bin/sh\ncat >/dev/null\necho 'Dno thanks (#5.7.1)' >&2\nexit 88\n")
    failing.chmod(0o755)
    ok = server(QMAILQUEUE=str(program), QUEUEDIR="")
    raw = exchange(ok.port, request(b"Subject: ext\n\nbody\n", b"a@b", [b"c@d", b"e@f"]))
    assert re.fullmatch(rb"Kok \d+ qp \d+", answer_of(raw))
    assert out.with_suffix(".msg").read_bytes().endswith(b"Subject: ext\n\nbody\n")
    assert out.with_suffix(".env").read_bytes() == b"Fa@b\0Tc@d\0Te@f\0\0"
    bad = server(QMAILQUEUE=str(failing), QUEUEDIR="")
    raw = exchange(bad.port, request(b"x\n", b"a@b", [b"c@d"]))
    assert answer_of(raw) == b"Dno thanks (#5.7.1)"
