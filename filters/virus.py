"""The virus stage: the whole final message streamed to clamd (INSTREAM), with IndiMail's
QHPSI settings.

clamd gets headers and body together, so it parses the message as mail and scans every
decoded MIME part (base64, quoted-printable, archives inside them). Spooled messages are
streamed from their file in chunks, never loaded whole. A scan that cannot be done (clamd
down, hung, answering an error, or closing the stream at its StreamMaxLength) is a
temporary failure unless QHPSI_PASS_ON_ERROR is set: an unscanned message is never
accepted by accident.
"""

from __future__ import annotations

import socket
import struct
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType

from qmqpd import log
from qmqpd.config import Config
from qmqpd.filters.base import Verdict
from qmqpd.message import Message, Reply


def _import_clamd() -> ModuleType:
    """clamd 1.0.2 asks pkg_resources for its own version at import, which costs ~70 ms per
    process (and each `qmqpd session` is one). The version is never used, so that lookup is
    made to fail fast; clamd catches the ImportError itself."""
    if "pkg_resources" in sys.modules:
        import clamd

        return clamd
    sys.modules["pkg_resources"] = None  # type: ignore[assignment]
    try:
        import clamd
    finally:
        del sys.modules["pkg_resources"]
    return clamd


clamd = _import_clamd()

CHUNK = 65536
ANSWER_LIMIT = 4096  # clamd's answer is one short line

CLEAN = b"X-QHPSI: clean\n"
INFECTED = b"X-QHPSI: Virus found\n"
NOT_SCANNED_SIZE = b"X-QHPSI: not scanned (message size)\n"
NOT_SCANNED_ERROR = b"X-QHPSI: not scanned (scanner error)\n"


class ScannerError(Exception):
    """clamd gave no usable answer: down, hung, closed early or answered an error."""


class StreamTooLong(ScannerError):
    """clamd stopped reading at its StreamMaxLength."""


@dataclass(frozen=True)
class ScanResult:
    infected: bool
    name: str = ""


class _Streaming:
    """INSTREAM over the clamd package's connection classes, with what they lack: one
    deadline for the whole scan (connect included), whole chunks written with sendall, and
    clamd's size-limit answer read back after it closes the stream on us."""

    timeout: float
    clamd_socket: socket.socket

    def _connect(self) -> socket.socket:
        raise NotImplementedError

    def _init_socket(self) -> None:
        try:
            self.clamd_socket = self._connect()
        except OSError as error:
            raise clamd.ConnectionError(self._error_message(error)) from None  # type: ignore[attr-defined]

    def scan_chunks(self, chunks: Iterable[bytes]) -> ScanResult:
        deadline = time.monotonic() + self.timeout
        try:
            self._init_socket()
            try:
                answer = self._stream(chunks, deadline)
            finally:
                self.clamd_socket.close()
            return self._result(answer)
        except ScannerError:
            raise
        except TimeoutError:
            raise ScannerError(f"clamd did not finish within CLAMD_TIMEOUT ({self.timeout}s)")\
                from None
        except (clamd.ClamdError, OSError) as error:
            raise ScannerError(_describe(error)) from None

    def _stream(self, chunks: Iterable[bytes], deadline: float) -> str:
        sock = self.clamd_socket
        try:
            _send(sock, b"zINSTREAM\0", deadline)
            for chunk in _nonempty(chunks):
                _send(sock, struct.pack("!L", len(chunk)) + chunk, deadline)
            _send(sock, b"\0\0\0\0", deadline)
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

    def _result(self, answer: str) -> ScanResult:
        if "size limit" in answer:
            raise StreamTooLong(answer)
        if not answer:
            raise ScannerError("clamd closed the connection without an answer")
        try:
            _path, name, status = self._parse_response(answer)  # type: ignore[attr-defined]
        except clamd.ResponseError:
            raise ScannerError(f"clamd answered {answer!r}") from None
        if status == "OK":
            return ScanResult(infected=False)
        if status == "FOUND":
            return ScanResult(infected=True, name=name or "unknown")
        raise ScannerError(f"clamd answered {answer!r}")


class UnixScanner(_Streaming, clamd.ClamdUnixSocket):
    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.unix_socket)
        except OSError:
            sock.close()
            raise
        return sock


class TcpScanner(_Streaming, clamd.ClamdNetworkSocket):
    def _connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=self.timeout)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _nonempty(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A zero-length chunk ends an INSTREAM, so empty pieces are left out."""
    return (chunk for chunk in chunks if chunk)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("clamd did not finish within CLAMD_TIMEOUT")
    return left


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    sock.settimeout(_remaining(deadline))
    sock.sendall(data)


def _read_answer(sock: socket.socket, deadline: float) -> str:
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
        host, _, port = config.clamd_tcp.rpartition(":")
        return TcpScanner(host=host.strip("[]"), port=int(port), timeout=config.clamd_timeout)
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
            result = self.scanner.scan_chunks(message.final_chunks(CHUNK))
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
