"""The virus stage against a real clamd, through `qmqpd serve` and `qmqpd session` (tcpserver).

clamd runs from a private directory with a database written at run time (an EICAR body
signature), on its own unix socket and TCP port. Clients are real TCP sockets on
127.0.0.0/8; the queue is read back as qmail-send would see it.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import tempfile
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qmqpd.filters import virus
from qmqpd.message import Message, MessageData
from qmqpd.queue import list_messages
from tests.clamd import SIGNATURE, Clamd, eicar
from tests.serve_process import ServeProcess
from tests.support import (
    TcpServerSession,
    exchange,
    need,
    request,
)

ROOT = Path(__file__).resolve().parents[2]
SENDER = b"joe@example.org"
RECIPIENTS = [b"one@example.net", b"two@example.net"]
VIRUS_REPLY = b"Dqq message contains virus (#5.7.1)"
UNAVAILABLE_REPLY = b"Zvirus scanner unavailable (#4.3.0)"
SIZE_LIMIT_REPLY = b"Zmessage larger than the virus scanner accepts (#4.3.4)"
_counter = iter(range(1_000_000))


# --- messages ------------------------------------------------------------------------------

def clean_message(padding: int = 0) -> bytes:
    """Unique each time, so clamd's clean-result cache is not what answers."""
    return (f"From: joe@example.org\nTo: one@example.net\nSubject: clean {next(_counter)} "
            f"{time.time_ns()}\n\nJust text.\n").encode() + b"x" * padding + b"\n"


def raw_eicar(padding: int = 0) -> bytes:
    return b"Subject: raw\n\n" + b"y" * padding + b"\n" + eicar() + b"\n"


def _multipart(content_type: str, filename: str, payload: bytes) -> bytes:
    encoded = base64.encodebytes(payload)
    return (b"From: joe@example.org\nSubject: attachment\nMIME-Version: 1.0\n"
            b'Content-Type: multipart/mixed; boundary="XYZ"\n\n'
            b"--XYZ\nContent-Type: text/plain\n\nSee attached.\n"
            b"--XYZ\nContent-Type: " + content_type.encode() + b"\n"
            b"Content-Transfer-Encoding: base64\n"
            b'Content-Disposition: attachment; filename="' + filename.encode() + b'"\n\n'
            + encoded + b"--XYZ--\n")


def base64_eicar() -> bytes:
    message = _multipart("application/octet-stream", "test.com", eicar())
    assert eicar() not in message
    return message


def zipped_eicar() -> bytes:
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        zipped.writestr("test.com", eicar())
    message = _multipart("application/zip", "test.zip", archive.getvalue())
    assert eicar() not in message
    return message


INFECTED = {"raw": raw_eicar, "base64": base64_eicar, "zip": zipped_eicar}


# --- servers -------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def clamd_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clamd]:
    """One clamd for the whole run; tests that stop or pause clamd start their own."""
    daemon = Clamd(tmp_path_factory.mktemp("clamd")).start()
    yield daemon
    daemon.stop()


@pytest.fixture
def own_clamd(tmp_path: Path) -> Iterator[Clamd]:
    daemon = Clamd(tmp_path / "own-clamd").start()
    yield daemon
    daemon.stop()


class Serve(ServeProcess):
    """`qmqpd serve --config FILE` with settings as TOML strings (every setting parses text)."""

    def __init__(self, tmp: Path, queue: Path, settings: dict[str, str]) -> None:
        super().__init__(tmp, queue, name=f"serve-{next(_counter)}", use_fsync="0",
                         use_syncdir="0", prefork="2", **settings)
        self.start(seconds=20)


class Session:
    """`qmqpd session` under Debian's tcpserver."""

    def __init__(self, tmp: Path, queue: Path, settings: dict[str, str],
                 rules_cdb: str | None = None) -> None:
        self.log_path = tmp / f"session-{next(_counter)}.log"
        env = {"QUEUEDIR": str(queue), "USE_FSYNC": "0", "USE_SYNCDIR": "0",
               "PYTHONPATH": str(ROOT), **settings}
        self.server = TcpServerSession(env, self.log_path, rules_cdb=rules_cdb)
        self.port = self.server.port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.server.stop()


Server = Serve | Session
Starter = Callable[..., Server]


@pytest.fixture(params=["serve", "session"])
def start(request: pytest.FixtureRequest, tmp_path: Path, queue: Path) -> Iterator[Starter]:
    """Start the serving path under test with settings given by name (environment style)."""
    started: list[Server] = []

    def starter(rules_cdb: str | None = None, **settings: str) -> Server:
        if request.param == "serve":
            if rules_cdb:
                settings["RULES"] = rules_cdb
            server: Server = Serve(tmp_path, queue, settings)
        else:
            server = Session(tmp_path, queue, settings, rules_cdb)
        started.append(server)
        return server

    yield starter
    for server in started:
        server.stop()


@pytest.fixture
def serve(tmp_path: Path, queue: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def starter(**settings: str) -> Serve:
        started.append(Serve(tmp_path, queue, settings))
        return started[-1]

    yield starter
    for server in started:
        server.stop()


def send(port: int, message: bytes, recipients: list[bytes] = RECIPIENTS,
         source: str | None = None) -> bytes:
    answer = exchange(port, request(message, SENDER, recipients), source=source)
    length, _, rest = answer.partition(b":")
    assert length.isdigit(), f"no QMQP answer: {answer!r}"
    return rest[: int(length)]


def queued(queue: Path) -> list[tuple[list[bytes], bytes]]:
    """(recipients, message file) of every queued message, oldest first."""
    found = []
    for item in sorted(list_messages(str(queue)), key=lambda m: int(m.id)):
        qid = int(item.id)
        found.append((item.recipients, (queue / "mess" / str(qid % 23) / str(qid)).read_bytes()))
    return found


def scanning(clamd_daemon: Clamd, **more: str) -> dict[str, str]:
    return {"QHPSI": "1", "CLAMD_SOCKET": str(clamd_daemon.socket_path),
            "CLAMD_TIMEOUT": "10", **more}


def compile_rules(tmp: Path, text: str) -> str:
    source = tmp / "tcp.qmqp"
    source.write_text(text)
    cdb = tmp / "tcp.qmqp.cdb"
    with open(source, "rb") as handle:
        subprocess.run([need("tcprules"), str(cdb), str(tmp / "tcp.qmqp.tmp")], stdin=handle,
                       check=True, timeout=30)
    return str(cdb)


def wait_for_log(server: Server, text: str, seconds: float = 10) -> str:
    stop = time.monotonic() + seconds
    while text not in server.log():
        assert time.monotonic() < stop, f"{text!r} not in log:\n{server.log()}"
        time.sleep(0.02)
    return server.log()


# --- verdicts ------------------------------------------------------------------------------

def test_clean_is_queued_and_infected_is_rejected(start: Starter, clamd_daemon: Clamd,
                                                  queue: Path) -> None:
    server = start(**scanning(clamd_daemon))
    message = clean_message()
    assert send(server.port, message).startswith(b"K")
    for kind, make in INFECTED.items():
        assert send(server.port, make()) == VIRUS_REPLY, kind
    [(recipients, queued_message)] = queued(queue)
    assert recipients == RECIPIENTS
    assert queued_message.startswith(b"X-QHPSI: clean\nReceived: from unknown (127.0.0.1)")
    assert queued_message.endswith(message)
    log = wait_for_log(server, "virus=reject")
    assert log.count(f"virus_found={SIGNATURE}") >= 1
    assert "virus_ms=" in log


@pytest.mark.parametrize("kind", sorted(INFECTED))
def test_rejectvirus_0_queues_with_the_header_over_tcp(serve: Callable[..., Serve],
                                                      clamd_daemon: Clamd, queue: Path,
                                                      kind: str) -> None:
    server = serve(QHPSI="1", CLAMD_TCP=clamd_daemon.tcp, REJECTVIRUS="0")
    message = INFECTED[kind]()
    assert send(server.port, message).startswith(b"K")
    [(recipients, queued_message)] = queued(queue)
    assert recipients == RECIPIENTS
    assert queued_message.startswith(b"X-QHPSI: Virus found\nReceived: ")
    assert queued_message.endswith(message)
    assert f"virus_found={SIGNATURE}" in wait_for_log(server, "virus_result=found")


def test_rejectvirus_2_answers_k_and_queues_nothing(start: Starter, clamd_daemon: Clamd,
                                                   queue: Path) -> None:
    server = start(**scanning(clamd_daemon, REJECTVIRUS="2"))
    assert send(server.port, zipped_eicar()).startswith(b"Kok ")
    assert queued(queue) == []
    assert send(server.port, clean_message()).startswith(b"K")
    assert len(queued(queue)) == 1
    log = wait_for_log(server, "virus_result=discarded")
    assert "queue=discarded" in log


def test_virusforward_quarantines_with_the_original_recipients(start: Starter,
                                                              clamd_daemon: Clamd,
                                                              queue: Path) -> None:
    server = start(**scanning(clamd_daemon, VIRUSFORWARD="quarantine@example.com"))
    infected = base64_eicar()
    assert send(server.port, infected).startswith(b"K")
    assert send(server.port, clean_message()).startswith(b"K")
    (first_rcpts, first), (second_rcpts, second) = queued(queue)
    assert first_rcpts == [b"quarantine@example.com"]
    assert first.startswith(b"X-QHPSI: Virus found\n"
                            b"X-Quarantine-ID: <one@example.net>,\n <two@example.net>\n"
                            b"Received: ")
    assert first.endswith(infected)
    assert second_rcpts == RECIPIENTS
    assert second.startswith(b"X-QHPSI: clean\n")
    assert "virus_quarantine=quarantine@example.com" in wait_for_log(server, "quarantined")


# --- per client rule -----------------------------------------------------------------------

def test_rule_env_turns_scanning_off_for_one_client(start: Starter, clamd_daemon: Clamd,
                                                   queue: Path, tmp_path: Path) -> None:
    rules = compile_rules(tmp_path, '127.0.0.2:allow,QHPSI=""\n127.:allow\n')
    server = start(rules_cdb=rules, **scanning(clamd_daemon))
    message = raw_eicar()
    assert send(server.port, message, source="127.0.0.2").startswith(b"K")
    assert send(server.port, message, source="127.0.0.1") == VIRUS_REPLY
    [(_, queued_message)] = queued(queue)
    assert queued_message.startswith(b"Received: from unknown (127.0.0.2)")
    assert b"X-QHPSI" not in queued_message


def test_rule_env_turns_scanning_on_and_sets_the_action(start: Starter, clamd_daemon: Clamd,
                                                       queue: Path, tmp_path: Path) -> None:
    rules = compile_rules(tmp_path, '127.0.0.2:allow,QHPSI="1",REJECTVIRUS="0"\n:allow\n')
    server = start(rules_cdb=rules, CLAMD_SOCKET=str(clamd_daemon.socket_path))
    assert send(server.port, raw_eicar(), source="127.0.0.2").startswith(b"K")
    assert send(server.port, raw_eicar(), source="127.0.0.1").startswith(b"K")
    # queue ids are inode numbers: their order is not the order of arrival
    (_, scanned), (_, unscanned) = sorted(
        queued(queue), key=lambda item: b"from unknown (127.0.0.1)" in item[1])
    assert scanned.startswith(b"X-QHPSI: Virus found\n")
    assert unscanned.startswith(b"Received: ")


# --- clamd down, hung, too small -----------------------------------------------------------

def test_clamd_stopped_mid_run_gives_z_then_k_after_restart(serve: Callable[..., Serve],
                                                           own_clamd: Clamd,
                                                           queue: Path) -> None:
    server = serve(QHPSI="1", CLAMD_SOCKET=str(own_clamd.socket_path), CLAMD_TIMEOUT="5")
    assert send(server.port, clean_message()).startswith(b"K")
    own_clamd.stop()
    for _ in range(3):
        assert send(server.port, clean_message()) == UNAVAILABLE_REPLY
    assert len(queued(queue)) == 1
    own_clamd.start()
    assert send(server.port, clean_message()).startswith(b"K")
    assert send(server.port, raw_eicar()) == VIRUS_REPLY
    assert server.proc.poll() is None
    assert len(queued(queue)) == 2
    assert "virus_result=error" in server.log()


def test_hung_clamd_gives_z_after_clamd_timeout(start: Starter, own_clamd: Clamd,
                                               queue: Path) -> None:
    server = start(QHPSI="1", CLAMD_TCP=own_clamd.tcp, CLAMD_TIMEOUT="1")
    own_clamd.pause()
    try:
        assert send(server.port, clean_message()) == UNAVAILABLE_REPLY
    finally:
        own_clamd.resume()
    assert queued(queue) == []
    assert send(server.port, clean_message()).startswith(b"K")
    assert "within CLAMD_TIMEOUT" in wait_for_log(server, "virus_result=error")


def test_pass_on_error_queues_unscanned_with_a_warning(start: Starter, queue: Path,
                                                      tmp_path: Path) -> None:
    server = start(QHPSI="1", CLAMD_SOCKET=str(tmp_path / "no-clamd.sock"),
                   QHPSI_PASS_ON_ERROR="1")
    assert send(server.port, raw_eicar()).startswith(b"K")
    [(_, queued_message)] = queued(queue)
    assert queued_message.startswith(b"X-QHPSI: not scanned (scanner error)\n")
    log = wait_for_log(server, "event=warning")
    assert "QHPSI_PASS_ON_ERROR" in log
    assert "virus_result=unscanned" in log


def test_message_over_streammaxlength_is_z_not_a_crash(start: Starter, clamd_daemon: Clamd,
                                                       queue: Path) -> None:
    server = start(**scanning(clamd_daemon))
    assert send(server.port, raw_eicar(padding=3 << 20)) == SIZE_LIMIT_REPLY
    assert queued(queue) == []
    assert "INSTREAM size limit" in wait_for_log(server, "virus_result=error")


def test_spooled_message_is_scanned_to_its_end(start: Starter, clamd_daemon: Clamd,
                                               queue: Path) -> None:
    """1.5 MB: above the protocol's in-memory threshold, below clamd's StreamMaxLength."""
    server = start(**scanning(clamd_daemon))
    assert send(server.port, raw_eicar(padding=3 << 19)) == VIRUS_REPLY
    assert queued(queue) == []


def test_size_limits_skip_scanning_with_a_header(start: Starter, clamd_daemon: Clamd,
                                                 queue: Path) -> None:
    server = start(**scanning(clamd_daemon, QHPSIMINSIZE="300", QHPSIMAXSIZE="5000"))
    small = raw_eicar()
    assert len(small) + 150 < 300  # even with the Received line
    large = raw_eicar(padding=6000)
    assert send(server.port, small).startswith(b"K")
    assert send(server.port, large).startswith(b"K")
    assert send(server.port, raw_eicar(padding=1000)) == VIRUS_REPLY
    (_, first), (_, second) = queued(queue)
    assert first.startswith(b"X-QHPSI: not scanned (message size)\n")
    assert second.startswith(b"X-QHPSI: not scanned (message size)\n")
    assert "virus_result=skipped" in wait_for_log(server, "virus=reject")


# --- the stage itself ----------------------------------------------------------------------

def test_ping_finds_clamd_or_says_why_not(clamd_daemon: Clamd, tmp_path: Path) -> None:
    """What start and check ask before they warn that every message would get Z."""
    assert virus.UnixScanner(path=str(clamd_daemon.socket_path)).ping(10.0) is None
    assert virus.UnixScanner(path=str(tmp_path / "none")).ping(1.0) == "No such file or directory"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(tmp_path / "silent"))
        silent.listen(1)  # connects, never answers
        assert virus.UnixScanner(path=str(tmp_path / "silent")).ping(0.2) == "TimeoutError"


def test_spooled_message_is_streamed_not_loaded(clamd_daemon: Clamd) -> None:
    """Scanning a 1.8 MB spooled message allocates only about one chunk at a time."""
    with tempfile.TemporaryFile() as spool:
        spool.write(b"Subject: big\n\n" + b"z" * (1800 << 10) + b"\n" + eicar() + b"\n")
        spool.flush()
        message = Message(SENDER, list(RECIPIENTS), MessageData(spool=spool),
                          received=b"Received: test\n")
        stage = virus.VirusStage(virus.UnixScanner(path=str(clamd_daemon.socket_path),
                                                   timeout=10))
        tracemalloc.start()
        try:
            verdict = stage.process(message)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert verdict.action == "reject"
    assert str(verdict.facts["found"]).startswith(SIGNATURE)
    assert peak < 512 << 10, f"peak {peak} bytes while scanning"


def _in_memory(body: bytes) -> Message:
    return Message(SENDER, list(RECIPIENTS), MessageData(body), received=b"Received: test\n")


def test_in_memory_message_goes_by_descriptor_on_the_socket_and_streamed_over_tcp(
        tmp_path: Path) -> None:
    """A clamd whose StreamMaxLength (64 KiB) is below a 100 KB message: on the unix socket
    the message is handed over as a descriptor and scanned to its end (EICAR found after
    the padding); over TCP it must be streamed and clamd's size-limit answer is a Z."""
    daemon = Clamd(tmp_path / "small-clamd", stream_max_length=64 << 10).start()
    try:
        body = b"Subject: padded\n\n" + b"p" * (100 << 10) + b"\n" + eicar() + b"\n"
        by_fd = virus.VirusStage(virus.UnixScanner(str(daemon.socket_path), timeout=10))
        verdict = by_fd.process(_in_memory(body))
        assert verdict.action == "reject"
        assert str(verdict.facts["found"]).startswith(SIGNATURE)
        host, port = daemon.tcp.split(":")
        streamed = virus.VirusStage(virus.TcpScanner(host, int(port), timeout=10))
        verdict = streamed.process(_in_memory(body))
        assert verdict.action == "tempfail"
        assert "INSTREAM size limit" in str(verdict.facts["error"])
    finally:
        daemon.stop()


def test_scans_by_descriptor_leave_no_descriptor_open(clamd_daemon: Clamd) -> None:
    stage = virus.VirusStage(virus.UnixScanner(str(clamd_daemon.socket_path), timeout=10))
    before = len(os.listdir("/proc/self/fd"))
    for number in range(20):
        assert stage.process(_in_memory(clean_message(number))).action == "accept"
    assert stage.process(_in_memory(raw_eicar())).action == "reject"
    assert len(os.listdir("/proc/self/fd")) == before


def test_silent_clamd_socket_is_z_at_the_deadline(tmp_path: Path) -> None:
    """A socket that takes connections but never answers (clamd hung): the descriptor is
    sent into the socket's buffer, and the answer's wait ends at CLAMD_TIMEOUT."""
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as silent:
        silent.bind(str(path))
        silent.listen(4)
        stage = virus.VirusStage(virus.UnixScanner(str(path), timeout=0.5))
        started = time.monotonic()
        verdict = stage.process(_in_memory(clean_message()))
        took = time.monotonic() - started
    assert verdict.action == "tempfail"
    assert "CLAMD_TIMEOUT" in str(verdict.facts["error"])
    assert 0.4 < took < 5
