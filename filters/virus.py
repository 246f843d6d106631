"""The virus stage: the whole final message scanned by clamd, with IndiMail's QHPSI
settings.

clamd gets headers and body together, so it parses the message as mail and scans every
decoded MIME part (base64, quoted-printable, archives inside them). On a unix socket a
message held in memory is handed over as a descriptor of a memory file (FILDES), so clamd
scans it in place instead of receiving a stream and writing it to a temporary file first;
over TCP, and for spooled messages, it is streamed (INSTREAM) — spooled ones from their
file in chunks, never loaded whole. A scan that cannot be done (clamd down, hung,
answering an error, or closing the stream at its StreamMaxLength) is a temporary failure
unless QHPSI_PASS_ON_ERROR is set: an unscanned message is never accepted by accident.

The INSTREAM client is our own, a few lines of clamd's documented protocol (`man clamd`):
the clamd package's `instream` (1.0.2, the last release) connects with no time limit,
writes with `send` (a short write breaks the chunk framing), has a timeout per socket
operation instead of one for the scan, sends 1 KiB chunks, and cannot tell clamd's size
limit from a dead scanner once clamd has closed the stream — and it imports pkg_resources,
~70 ms for every `qmqpd session` process.

Called by filters.pipeline (from_config, process) and by the session plan (`ping`: is
clamd there at start and reload); never touches queues or other stages.
"""

from __future__ import annotations

import array
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from qmqpd import log
from qmqpd.address import split_host_port
from qmqpd.config import Config
from qmqpd.errors import TemporaryError
from qmqpd.filters.base import Verdict
from qmqpd.message import Message, Reply

CHUNK = 65536
ANSWER_LIMIT = 4096  # clamd's answer is one short line
_END = b"\0\0\0\0"  # a zero-length chunk: the end of the stream
_HAS_MEMFD = hasattr(os, "memfd_create")  # Linux; elsewhere every message is streamed

CLEAN = b"X-QHPSI: clean\n"
INFECTED = b"X-QHPSI: Virus found\n"
NOT_SCANNED_SIZE = b"X-QHPSI: not scanned (message size)\n"
NOT_SCANNED_ERROR = b"X-QHPSI: not scanned (scanner error)\n"


class ScannerError(TemporaryError):
    """clamd gave no usable answer: down, hung, closed early or answered an error."""


class StreamTooLong(ScannerError):
    """clamd stopped reading at its StreamMaxLength."""


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    name: str = ""


# clamd's answer: "stream: OK" (INSTREAM) or "fd[N]: OK" (FILDES), "...: NAME FOUND", "... ERROR".
_ANSWER = re.compile(r"(?P<path>.*): ((?P<name>.+) )?(?P<status>FOUND|OK|ERROR)\Z")


class Scanner:
    """INSTREAM to one clamd: one deadline for the whole scan (connect included), whole
    chunks written with sendall, and clamd's size-limit answer read back after it closes
    the stream on us."""

    def __init__(self, timeout: float | None = None) -> None:
        self.timeout = timeout

    def _connect(self, timeout: float | None) -> socket.socket:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def scan(self, message: Message) -> ScanResult:
        """The final message, headers and body: streamed (INSTREAM)."""
        return self.scan_chunks(message.final_chunks(CHUNK))

    def scan_chunks(self, chunks: Iterable[bytes]) -> ScanResult:
        return self._ask(lambda sock, deadline: _stream(sock, chunks, deadline))

    def _ask(self, talk: Callable[[socket.socket, float | None], str]) -> ScanResult:
        """One connection, one command, one answer, all within CLAMD_TIMEOUT."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            try:
                sock = self._connect(self.timeout)
            except TimeoutError:
                raise
            except OSError as error:
                raise ScannerError(f"cannot connect to clamd at {self.describe()}: "
                                   f"{_describe(error)}") from None
            try:
                answer = talk(sock, deadline)
            finally:
                sock.close()
        except TimeoutError:
            raise ScannerError(f"clamd did not finish within CLAMD_TIMEOUT ({self.timeout}s)")\
                from None
        except OSError as error:
            raise ScannerError(_describe(error)) from None
        return _result(answer)

    def ping(self, timeout: float) -> str | None:
        """None when clamd answers PING with PONG within timeout, else why not (the check
        at planning: clamd may be down now and started later)."""
        deadline = time.monotonic() + timeout
        try:
            sock = self._connect(timeout)
            try:
                _send(sock, b"zPING\0", deadline)
                answer = _read_answer(sock, deadline)
            finally:
                sock.close()
        except OSError as error:
            return error.strerror or type(error).__name__
        return None if answer.startswith("PONG") else f"answered {answer[:32]!r} to PING"


class UnixScanner(Scanner):
    """clamd on a local socket. A message held in memory is handed over as a file
    descriptor (FILDES, as clamdscan and clamav-milter do): clamd scans it in place,
    instead of receiving the stream and writing it to a file of its own first."""

    def __init__(self, path: str, timeout: float | None = None) -> None:
        super().__init__(timeout)
        self.path = path

    def describe(self) -> str:
        return self.path

    def scan(self, message: Message) -> ScanResult:
        if not (message.data.in_memory and _HAS_MEMFD):
            return super().scan(message)  # a spooled message is streamed, never copied whole
        head, body = message.head, message.data.bytes()
        return self._ask(lambda sock, deadline: _pass_fd(sock, head, body, deadline))

    def _connect(self, timeout: float | None) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        return sock


class TcpScanner(Scanner):
    def __init__(self, host: str, port: int, timeout: float | None = None) -> None:
        super().__init__(timeout)
        self.host = host
        self.port = port

    def describe(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _connect(self, timeout: float | None) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=timeout)


def _stream(sock: socket.socket, chunks: Iterable[bytes], deadline: float | None) -> str:
    try:
        for block in _writes(chunks):
            _send(sock, block, deadline)
    except (BrokenPipeError, ConnectionResetError) as error:
        # At StreamMaxLength clamd writes why and closes; the line may still be readable.
        try:
            answer = _read_answer(sock, deadline)
        except OSError:
            answer = ""
        if "size limit" in answer:
            raise StreamTooLong(answer) from None
        raise ScannerError(f"clamd closed the stream: {_describe(error)}") from None
    return _read_answer(sock, deadline)


def _pass_fd(sock: socket.socket, head: bytes, body: bytes, deadline: float | None) -> str:
    """FILDES: the message in an anonymous memory file, its descriptor sent to clamd."""
    fd = os.memfd_create("qmqpd-scan", os.MFD_CLOEXEC)
    try:
        written = os.writev(fd, [head, body])
        if written != len(head) + len(body):  # a memory file is written whole or fails
            raise OSError(f"short write to the scan's memory file ({written} bytes)")
        os.lseek(fd, 0, os.SEEK_SET)  # clamd reads from the descriptor's offset
        _send(sock, b"zFILDES\0", deadline)
        sock.settimeout(_remaining(deadline))
        # the descriptor travels with one byte of data, as clamdscan sends it
        sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                 array.array("i", [fd]))])
    finally:
        os.close(fd)  # clamd holds its own copy once the message is sent
    return _read_answer(sock, deadline)


def _result(answer: str) -> ScanResult:
    if "size limit" in answer:
        raise StreamTooLong(answer)
    if not answer:
        raise ScannerError("clamd closed the connection without an answer")
    found = _ANSWER.match(answer)
    if found is None or found["status"] == "ERROR":
        raise ScannerError(f"clamd answered {answer!r}")
    if found["status"] == "FOUND":
        return ScanResult(infected=True, name=found["name"] or "unknown")
    return ScanResult(infected=False)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _writes(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The whole INSTREAM (command, length-prefixed chunks, end mark) as few writes as
    possible: the pieces are joined into chunks of up to CHUNK bytes, and the command and
    the end mark ride on the first and last write. A message under CHUNK is one write, so
    neither side pays a system call and a wake-up per piece (the queue's head is one piece,
    the client's bytes another). Empty pieces are left out: a zero-length chunk ends the
    stream."""
    command = b"zINSTREAM\0"
    pending: list[memoryview] = []
    size = 0
    for chunk in chunks:
        piece = memoryview(chunk)  # slices of a view are not copies
        while piece:
            take = piece[: CHUNK - size]
            piece = piece[len(take):]
            pending.append(take)
            size += len(take)
            if size == CHUNK:
                yield command + _frame(pending, size)
                command, pending, size = b"", [], 0
    tail = _frame(pending, size) if size else b""
    yield command + tail + _END


def _frame(pieces: list[memoryview], size: int) -> bytes:
    return struct.pack("!L", size) + b"".join(pieces)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("clamd did not finish within CLAMD_TIMEOUT")
    return left


def _send(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(data)


def _read_answer(sock: socket.socket, deadline: float | None) -> str:
    """One NUL- (or newline-) terminated answer, or what came before EOF."""
    answer = b""
    while len(answer) < ANSWER_LIMIT:
        sock.settimeout(_remaining(deadline))
        block = sock.recv(ANSWER_LIMIT - len(answer))
        if not block:
            break
        answer += block
        if b"\0" in answer or b"\n" in answer:
            break
    return answer.split(b"\0")[0].strip().decode("utf-8", "replace")


def scanner_for(config: Config) -> UnixScanner | TcpScanner:
    """CLAMD_TCP when set, else CLAMD_SOCKET."""
    if config.clamd_tcp:
        host, port = split_host_port(config.clamd_tcp)
        return TcpScanner(host=host, port=port, timeout=config.clamd_timeout)
    return UnixScanner(path=config.clamd_socket, timeout=config.clamd_timeout)


def quarantine_header(recipients: list[bytes]) -> bytes:
    """X-Quarantine-ID: the original recipients, one per line, folded."""
    safe = [r.replace(b"\r", b"?").replace(b"\n", b"?").replace(b"\0", b"?") for r in recipients]
    listed = b",\n ".join(b"<" + r + b">" for r in safe)
    return b"X-Quarantine-ID: " + listed + b"\n"


@dataclass
class VirusStage:
    scanner: UnixScanner | TcpScanner
    min_size: int = 0  # QHPSIMINSIZE, 0 = none
    max_size: int = 0  # QHPSIMAXSIZE, 0 = none
    reject_mode: int = 1  # REJECTVIRUS: 0 header, 1 reject, 2 discard
    forward: str = ""  # VIRUSFORWARD
    pass_on_error: bool = False  # QHPSI_PASS_ON_ERROR
    name: str = "virus"

    def process(self, message: Message) -> Verdict:
        size = message.size
        if self._outside_limits(size):
            return Verdict.accept(NOT_SCANNED_SIZE, result="skipped", size=size)
        try:
            result = self.scanner.scan(message)
        except StreamTooLong as error:
            return self._could_not_scan(Reply.named("scanner_size_limit"), error)
        except ScannerError as error:
            return self._could_not_scan(Reply.named("scanner_unavailable"), error)
        if not result.infected:
            return Verdict.accept(CLEAN, result="clean")
        return self._infected(message, result.name)

    def check(self) -> list[tuple[str, str]]:
        return []  # clamd is asked per message: it may come and go while we serve

    def _outside_limits(self, size: int) -> bool:
        return (self.min_size > 0 and size < self.min_size) or (
            self.max_size > 0 and size > self.max_size)

    def _could_not_scan(self, reply: Reply, error: ScannerError) -> Verdict:
        if self.pass_on_error:
            log.warning("message queued unscanned (QHPSI_PASS_ON_ERROR)", stage=self.name,
                        error=str(error))
            return Verdict.accept(NOT_SCANNED_ERROR, result="unscanned", error=str(error))
        return Verdict.tempfail(reply.text, result="error", error=str(error))

    def _infected(self, message: Message, name: str) -> Verdict:
        if self.forward:
            original = message.recipients
            message.recipients = [self.forward.encode()]
            return Verdict.accept(INFECTED, quarantine_header(original), result="quarantined",
                                  found=name, quarantine=self.forward)
        if self.reject_mode == 0:
            return Verdict.accept(INFECTED, result="found", found=name)
        if self.reject_mode == 2:
            return Verdict.discard(result="discarded", found=name)
        return Verdict.reject(Reply.named("virus").text, result="found", found=name)


def from_config(config: Config) -> VirusStage | None:
    if not config.qhpsi:
        return None
    return VirusStage(
        scanner=scanner_for(config),
        min_size=config.qhpsiminsize,
        max_size=config.qhpsimaxsize,
        reject_mode=config.rejectvirus,
        forward=config.virusforward.strip(),
        pass_on_error=config.qhpsi_pass_on_error,
    )
