"""qmqpc against real peers: Postfix's qmqp-sink and small QMQP servers run by the test."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmqpd.client import Result, Server, send
from tests.support import (
    PortTaken,
    command,
    free_port,
    listens,
    need_postfix,
    start_on_free_port,
    stop_process,
    wait_until,
)

MESSAGE = b"From: a@example.org\nSubject: qmqpc test\n\nhello\n"
ROOT = Path(__file__).resolve().parents[2]


def decode_netstring(data: bytes) -> tuple[bytes, bytes]:
    """(payload, rest); an independent reader so the client's encoder is really checked."""
    length, colon, rest = data.partition(b":")
    assert colon and length.isdigit(), f"not a netstring: {data[:40]!r}"
    size = int(length)
    assert rest[size : size + 1] == b",", "netstring without its comma"
    return rest[:size], rest[size + 1 :]


def decode_request(data: bytes) -> tuple[bytes, bytes, list[bytes]]:
    inner, rest = decode_netstring(data)
    assert rest == b"", "bytes after the outer netstring"
    message, inner = decode_netstring(inner)
    sender, inner = decode_netstring(inner)
    recipients = []
    while inner:
        recipient, inner = decode_netstring(inner)
        recipients.append(recipient)
    return message, sender, recipients


class QmqpPeer:
    """A QMQP server in a thread: reads each whole request, then answers as told.

    ``answer`` is the raw bytes sent back; None closes without answering; "hang" keeps the
    connection open, silent, until the peer is stopped. With ``read_only`` it answers after
    that many bytes and closes with the rest unread, as a server rejecting a size does.
    """

    def __init__(self, answer: bytes | str | None, read_only: int | None = None) -> None:
        self.answer = answer
        self.read_only = read_only
        self.requests: list[bytes] = []
        self.connections = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.server = Server("127.0.0.1", self.port)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                self.connections += 1
                self._handle(conn)

    def _read_request(self, conn: socket.socket) -> bytes:
        conn.settimeout(5)
        data = b""
        while b":" not in data:
            data += conn.recv(100)
        length, _, _ = data.partition(b":")
        total = len(length) + 1 + int(length) + 1
        while len(data) < total:
            block = conn.recv(total - len(data))
            if not block:
                break
            data += block
        return data

    def _handle(self, conn: socket.socket) -> None:
        if self.read_only is not None:
            conn.settimeout(5)
            self.requests.append(conn.recv(self.read_only))
        else:
            self.requests.append(self._read_request(conn))
        if self.answer == "hang":
            self._stop.wait(10)
        elif isinstance(self.answer, bytes):
            conn.sendall(self.answer)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


@pytest.fixture
def peers() -> Iterator[list[QmqpPeer]]:
    started: list[QmqpPeer] = []
    yield started
    for peer in started:
        peer.stop()


def peer(peers: list[QmqpPeer], answer: bytes | str | None) -> QmqpPeer:
    new = QmqpPeer(answer)
    peers.append(new)
    return new


@pytest.fixture
def qmqp_sink() -> Iterator[Server]:
    sink = need_postfix("/usr/sbin/qmqp-sink")

    def start(port: int) -> tuple[subprocess.Popen[bytes], int]:
        proc = subprocess.Popen([sink, "-4", f"127.0.0.1:{port}", "10"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # qmqp-sink exits at once when it cannot bind: the port may answer for another
        wait_until(lambda: proc.poll() is not None or listens(proc.pid, port), 10,
                   f"qmqp-sink to listen on {port}")
        if proc.poll() is not None:
            raise PortTaken(f"qmqp-sink exited {proc.returncode} on port {port}")
        return proc, port

    proc, port = start_on_free_port(start)
    try:
        yield Server("127.0.0.1", port)
    finally:
        stop_process(proc)


@pytest.fixture
def refused() -> Server:
    """A loopback port nothing listens on (bound once, then closed)."""
    return Server("127.0.0.1", free_port())


@pytest.fixture
def unreachable() -> Iterator[Server]:
    """A port whose accept queue is full: the kernel drops new SYNs, so connects time out."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(16):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                break
            finally:
                probe.close()
        else:
            pytest.skip("this kernel answers SYNs on a full accept queue: no loopback timeout")
        yield Server("127.0.0.1", port)
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


def quick_send(servers: list[Server], **options: object) -> Result:
    settings: dict = {"timeout": 1.0, "connect_timeout": 0.3, **options}
    return send(MESSAGE, b"a@example.org", [b"b@example.org", b"c@example.net"], servers,
                **settings)


# ---------------------------------------------------------------------------- library


def test_real_qmqp_sink_accepts(qmqp_sink: Server) -> None:
    result = quick_send([qmqp_sink])
    assert (result.status, result.exit_code, result.server) == ("K", 0, qmqp_sink)
    assert result.answer.startswith("K ")


def test_request_bytes_are_the_qmqp_netstring(peers: list[QmqpPeer]) -> None:
    server = peer(peers, b"22:Kok 1795913427 qp 6877,")
    result = quick_send([server.server])
    assert (result.status, result.text, result.exit_code) == ("K", "ok 1795913427 qp 6877", 0)
    assert decode_request(server.requests[0]) == (
        MESSAGE, b"a@example.org", [b"b@example.org", b"c@example.net"])


def test_empty_sender_and_no_recipients_are_sent_as_is(peers: list[QmqpPeer]) -> None:
    server = peer(peers, b"3:Kok,")
    result = send(b"", b"", [], [server.server], timeout=1)
    assert result.exit_code == 0
    assert server.requests == [b"6:0:,0:,,"]


Z_ANSWER = b"37:Zqq write error or disk full (#4.3.0),"


@pytest.mark.parametrize(("answer", "status", "code", "options"), [
    (Z_ANSWER, "Z", 71, {"retry_temporary": False}),
    (b"51:Dsorry, I can't accept addresses like that (#5.1.3),", "D", 31, {}),
])
def test_d_is_final_and_z_when_asked(peers: list[QmqpPeer], answer: bytes, status: str,
                                     code: int, options: dict) -> None:
    first, second = peer(peers, answer), peer(peers, b"3:Kok,")
    result = quick_send([first.server, second.server], **options)
    assert (result.status, result.exit_code, result.server) == (status, code, first.server)
    assert second.connections == 0


def test_z_moves_on_to_the_next_server(peers: list[QmqpPeer]) -> None:
    first, second = peer(peers, Z_ANSWER), peer(peers, b"3:Kok,")
    result = quick_send([first.server, second.server])
    assert (result.status, result.exit_code, result.server) == ("K", 0, second.server)
    assert first.connections == 1 and second.connections == 1
    assert any("write error or disk full" in failure for failure in result.failures)


def test_z_from_every_server_is_71_with_the_last_answer(peers: list[QmqpPeer]) -> None:
    first = peer(peers, b"9:Zbusy one,")
    second = peer(peers, b"9:Zbusy two,")
    result = quick_send([first.server, second.server])
    assert (result.status, result.text, result.exit_code) == ("Z", "busy two", 71)
    assert result.server == second.server and len(result.failures) == 2


@pytest.mark.parametrize("answer", [None, "hang", b"HTTP/1.0 400 Bad Request\r\n\r\n",
                                    b"3:Xok,", b"100:Kok"])
def test_broken_session_is_74_without_retry(peers: list[QmqpPeer],
                                            answer: bytes | str | None) -> None:
    broken, healthy = peer(peers, answer), peer(peers, b"3:Kok,")
    result = quick_send([broken.server, healthy.server], timeout=0.5, retry_broken=False)
    assert (result.status, result.exit_code, result.server) == (None, 74, broken.server)
    assert healthy.connections == 0
    assert str(broken.server) in result.error


@pytest.mark.parametrize("answer", [None, "hang", b"garbage"])
def test_broken_session_moves_on_by_default(peers: list[QmqpPeer],
                                            answer: bytes | str | None) -> None:
    broken, healthy = peer(peers, answer), peer(peers, b"3:Kok,")
    result = quick_send([broken.server, healthy.server], timeout=0.5)
    assert (result.status, result.exit_code, result.server) == ("K", 0, healthy.server)
    assert len(result.failures) == 1 and str(broken.server) in result.failures[0]
    assert decode_request(healthy.requests[0])[0] == MESSAGE


def test_answer_sent_before_the_request_ends_is_kept(peers: list[QmqpPeer]) -> None:
    early = QmqpPeer(b"25:Dmessage too big (#5.3.4),", read_only=100)
    peers.append(early)
    result = send(b"x" * (8 << 20), b"a", [b"b"], [early.server], timeout=5)
    assert (result.status, result.text, result.exit_code) == ("D", "message too big (#5.3.4)", 31)
    assert early.requests[0].startswith(b"8388625:8388608:")


def test_only_broken_servers_give_74(peers: list[QmqpPeer]) -> None:
    result = quick_send([peer(peers, None).server, peer(peers, b"junk").server])
    assert (result.status, result.exit_code, len(result.failures)) == (None, 74, 2)


def test_refused_moves_on_in_order(peers: list[QmqpPeer], refused: Server) -> None:
    healthy = peer(peers, b"3:Kok,")
    result = quick_send([refused, healthy.server])
    assert (result.exit_code, result.server) == (0, healthy.server)
    assert result.failures == [f"{refused}: connect: Connection refused"]


def test_all_refused_is_73(refused: Server) -> None:
    result = quick_send([refused, Server("::1", refused.port)])
    assert (result.status, result.exit_code, len(result.failures)) == (None, 73, 2)


def test_connect_timeout_is_72(unreachable: Server) -> None:
    result = quick_send([unreachable], connect_timeout=0.3)
    assert (result.exit_code, result.failures) == (72, [f"{unreachable}: connect: timed out"])


def test_last_failure_decides_between_72_and_73(unreachable: Server, refused: Server) -> None:
    assert quick_send([refused, unreachable]).exit_code == 72
    assert quick_send([unreachable, refused]).exit_code == 73


def test_no_usable_server_is_55() -> None:
    assert quick_send([]).exit_code == 55
    assert quick_send([Server("no-such-host.invalid")]).exit_code == 55


def test_socket_failure_is_56(refused: Server) -> None:
    """socket() failing (no fds left) stops at once with 56; run in a child to spare ours."""
    child = os.fork()
    if child == 0:  # pragma: no cover (child)
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            holders = []
            try:
                while True:
                    holders.append(os.open("/dev/null", os.O_RDONLY))
            except OSError:
                pass
            code = quick_send([refused]).exit_code
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 56


def test_large_message_streams_from_a_file(peers: list[QmqpPeer], tmp_path: Path) -> None:
    body = b"".join(b"line %d\n" % n for n in range(300_000))
    path = tmp_path / "big"
    path.write_bytes(body)
    server = peer(peers, b"3:Kok,")
    with open(path, "rb") as file:
        result = send(file, b"s", [b"r"], [server.server], timeout=5)
    assert result.exit_code == 0
    assert decode_request(server.requests[0]) == (body, b"s", [b"r"])


# ---------------------------------------------------------------------------- console script


def run_qmqpc(args: list[str], message: bytes | int = MESSAGE,
              envelope: bytes | None = None, env: dict[str, str] | None = None
              ) -> tuple[int, str, str]:
    """Run qmqpc; with ``envelope`` its fd 1 is a pipe we write the envelope into, as in qmail.

    Returns (exit code, stdout, stderr); stdout is empty in that mode.
    """
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
                **(env or {})}
    stdin = message if isinstance(message, int) else subprocess.PIPE
    data = None if isinstance(message, int) else message
    if envelope is None:
        feed: dict = {"input": data} if data is not None else {"stdin": stdin}
        proc = subprocess.run([*command("qmqpc"), *args], **feed, capture_output=True,
                              env=full_env, timeout=30, check=False)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen([*command("qmqpc"), *args], stdin=stdin, stdout=read_end,
                                 stderr=subprocess.PIPE, env=full_env)
    finally:
        os.close(read_end)
    try:
        if child.stdin is not None:
            child.stdin.write(data or b"")
            child.stdin.close()
        with os.fdopen(write_end, "wb") as pipe, contextlib.suppress(BrokenPipeError):
            pipe.write(envelope)
        assert child.stderr is not None
        stderr = child.stderr.read()
        child.wait(30)
    finally:
        stop_process(child)
        if child.stderr is not None:
            child.stderr.close()
    return child.returncode, "", stderr.decode()


def test_command_line_mode_prints_the_answer(qmqp_sink: Server) -> None:
    code, out, err = run_qmqpc(["--server", str(qmqp_sink), "--from", "a@example.org",
                                "--to", "b@example.org"])
    assert (code, err) == (0, "")
    assert out.startswith("K ")


def test_command_line_mode_prints_d_text(peers: list[QmqpPeer]) -> None:
    server = peer(peers, b"25:Dmessage too big (#5.3.4),")
    code, out, _ = run_qmqpc(["--server", f"127.0.0.1:{server.port}", "--from", "a@b",
                              "--to", "c@d", "--to", "e@f"])
    assert (code, out) == (31, "D message too big (#5.3.4)\n")
    assert decode_request(server.requests[0]) == (MESSAGE, b"a@b", [b"c@d", b"e@f"])


def test_command_line_failover_and_error_line(peers: list[QmqpPeer], refused: Server) -> None:
    z_server = peer(peers, b"30:Zqq temporary problem (#4.3.0),")
    code, out, err = run_qmqpc(["--server", str(refused), "--server", str(z_server.server),
                                "--from", "a", "--to", "b"])
    assert (code, out, err) == (71, "Z qq temporary problem (#4.3.0)\n", "")
    code, out, err = run_qmqpc(["--server", str(refused), "--from", "a", "--to", "b"])
    assert (code, out) == (73, "")
    assert err.count("\n") == 1 and "Connection refused" in err


def test_unreadable_message_is_54(peers: list[QmqpPeer]) -> None:
    server = peer(peers, b"3:Kok,")
    # fd 0 is the write end of a pipe: every read() on it fails (EBADF).
    read_end, write_end = os.pipe()
    try:
        code, _, err = run_qmqpc(["--server", str(server.server), "--from", "a", "--to", "b"],
                                 message=write_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert code == 54 and "cannot read the message" in err
    assert server.connections == 0


def test_drop_in_mode_reads_the_envelope_from_fd1(peers: list[QmqpPeer],
                                                  tmp_path: Path) -> None:
    server = peer(peers, b"3:Kok,")
    servers = tmp_path / "qmqpservers"
    servers.write_text(f"# test\n127.0.0.1:{server.port}\n")
    code, _, err = run_qmqpc(["--servers", str(servers)],
                             envelope=b"Fa@example.org\0Tb@example.org\0Tc@d\0\0")
    assert (code, err) == (0, "")
    assert decode_request(server.requests[0]) == (MESSAGE, b"a@example.org",
                                                  [b"b@example.org", b"c@d"])


def test_drop_in_mode_spools_a_large_piped_message(peers: list[QmqpPeer]) -> None:
    body = os.urandom(3 << 20)
    server = peer(peers, b"3:Kok,")
    code, _, _ = run_qmqpc(["--server", str(server.server), "--timeout", "10"],
                           message=body, envelope=b"F\0Tpostmaster\0\0")
    assert code == 0
    assert decode_request(server.requests[0]) == (body, b"", [b"postmaster"])


@pytest.mark.parametrize("envelope", [b"Tb@c\0\0", b"Fa@b\0Xb@c\0\0", b"Fa@b\0Tb@c\0", b""])
def test_drop_in_mode_bad_envelope_is_91(peers: list[QmqpPeer], envelope: bytes) -> None:
    server = peer(peers, b"3:Kok,")
    code, _, err = run_qmqpc(["--server", str(server.server)], envelope=envelope)
    assert code == 91 and "envelope" in err
    assert server.connections == 0


def test_drop_in_mode_z_exit_code_and_stderr(peers: list[QmqpPeer]) -> None:
    server = peer(peers, b"30:Zqq temporary problem (#4.3.0),")
    code, _, err = run_qmqpc(["--server", str(server.server)], envelope=b"Fa\0Tb\0\0")
    assert code == 71
    assert err == f"qmqpc: {server.server}: Z qq temporary problem (#4.3.0)\n"


def test_drop_in_mode_servers_from_environment(peers: list[QmqpPeer], tmp_path: Path) -> None:
    server = peer(peers, b"3:Kok,")
    listed = tmp_path / "listed"
    listed.write_text(f"127.0.0.1:{server.port}\n")
    home = tmp_path / "qmail"
    (home / "control").mkdir(parents=True)
    (home / "control" / "qmqpservers").write_text(f"localhost:{server.port}\n")
    assert run_qmqpc([], envelope=b"Fa\0Tb\0\0", env={"QMQPSERVERS": str(listed)})[0] == 0
    assert run_qmqpc([], envelope=b"Fa\0Tb\0\0", env={"QMAILHOME": str(home)})[0] == 0
    assert len(server.requests) == 2


def test_missing_or_empty_servers_file_is_55(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("# nothing here\n\n")
    code, _, err = run_qmqpc([], envelope=b"Fa\0Tb\0\0", env={"QMAILHOME": str(tmp_path)})
    assert code == 55 and "control/qmqpservers" in err
    code, _, err = run_qmqpc(["--servers", str(empty)], envelope=b"Fa\0Tb\0\0")
    assert code == 55 and f"no servers in {empty}" in err
    code, _, err = run_qmqpc(["--server", "bad host", "--from", "a", "--to", "b"])
    assert code == 55 and "bad server" in err


def test_drop_in_mode_refused_everywhere_is_73(refused: Server) -> None:
    code, _, err = run_qmqpc(["--server", str(refused)], envelope=b"Fa\0Tb\0\0")
    assert code == 73 and str(refused) in err
