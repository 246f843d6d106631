"""QMQP client: ``qmqpc``, a qmail-queue drop-in with qmqpservers failover.

One request per connection: a single outer netstring holding the message, the envelope
sender and every recipient as inner netstrings. The answer is one netstring whose first
byte is K (queued), Z (try later) or D (bounce). Exit codes follow qmail-qmqpc, so
programs that run qmail-queue read the outcome the same way.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import BinaryIO

from qmqpd.address import split_host_port
from qmqpd.errors import TemporaryError
from qmqpd.netstring import encode

QMQP_PORT = 628
CHUNK = 65536
# A QMQP answer is a status byte and one line of text; anything longer is not an answer.
REPLY_MAX = 4096
# qmail-queue envelopes are small; this only stops an endless fd 1 from eating memory.
ENVELOPE_MAX = 64 << 20
# After a failed write, how long to look for an answer the server sent before closing.
EARLY_ANSWER_WAIT = 2.0

EXIT_OK = 0
EXIT_PERMANENT = 31  # D
EXIT_READ = 54  # the message or the envelope could not be read
EXIT_NO_SERVERS = 55  # qmqpservers missing or empty, or no server could be tried
EXIT_SOCKET = 56  # socket() failed
EXIT_TEMPORARY = 71  # Z
EXIT_CONNECT_TIMEOUT = 72  # every connect timed out (the last failure was a timeout)
EXIT_CONNECT_REFUSED = 73  # every connect failed (the last failure was not a timeout)
EXIT_SESSION = 74  # read/write error, timeout, EOF or a malformed answer after connecting
EXIT_ENVELOPE = 91  # the envelope on fd 1 is not in qmail-queue format

EXIT_FOR_STATUS = {"K": EXIT_OK, "Z": EXIT_TEMPORARY, "D": EXIT_PERMANENT}


@dataclass(frozen=True)
class Server:
    host: str
    port: int = QMQP_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass
class Result:
    """What happened to one message: the server's answer, or why there was none."""

    status: str | None
    text: str
    exit_code: int
    server: Server | None = None
    # One entry per failed attempt, "server: reason", in the order they were tried.
    failures: list[str] = field(default_factory=list)

    @property
    def answer(self) -> str:
        """The server's answer as one line, e.g. ``K ok 1795913427 qp 6877``."""
        return f"{self.status} {self.text}" if self.status else ""

    @property
    def error(self) -> str:
        """One line saying why there is no answer (empty when there is one)."""
        if self.status:
            return ""
        return self.text + ("" if not self.failures else ": " + "; ".join(self.failures))


# qmail-queue's interface has its own codes, all temporary outside 11-40: each error below
# carries its code, the one qmqpc exits with.


class InputError(TemporaryError):
    """The message could not be read (exit 54); no server is to blame."""

    exit_code = EXIT_READ


class BrokenSession(TemporaryError):
    """The connection was made but no valid answer came back (exit 74)."""

    exit_code = EXIT_SESSION


# ---------------------------------------------------------------------------- servers

_HOSTNAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


def parse_server(spec: str) -> Server:
    """One server: IPv4, bare IPv6, ``[IPv6]:port``, hostname, or ``host:port``."""
    spec = spec.strip()
    host, port = split_host_port(spec, QMQP_PORT)
    if ":" not in host and not _HOSTNAME.fullmatch(host):  # an IPv6 host is checked there
        raise ValueError(f"bad server {spec!r}")
    return Server(host, port)


def _warn(text: str) -> None:
    print(f"qmqpc: warning: {text}", file=sys.stderr)


def parse_servers(text: str, warn: Callable[[str], None] = _warn) -> list[Server]:
    """A qmqpservers file: one server per line; ``#`` comments and blank lines skipped.

    A line that is not a server is reported through ``warn`` and skipped, so one typo
    does not take the other servers out of service.
    """
    servers = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            servers.append(parse_server(line))
        except ValueError as error:
            warn(f"qmqpservers line {number} skipped: {error}")
    return servers


def servers_file(environ: Mapping[str, str]) -> str:
    """``$QMQPSERVERS`` if set, else ``$QMAILHOME/control/qmqpservers``."""
    if environ.get("QMQPSERVERS"):
        return environ["QMQPSERVERS"]
    home = environ.get("QMAILHOME") or "/var/qmail"
    return os.path.join(home, "control", "qmqpservers")


# ---------------------------------------------------------------------------- message body


@dataclass
class _Body:
    """The message with a known size, re-readable from its start for each server tried."""

    size: int
    data: bytes | None = None
    file: BinaryIO | None = None
    start: int = 0
    spooled: bool = False

    def chunks(self) -> Iterable[bytes]:
        if self.data is not None:
            view = memoryview(self.data)
            for offset in range(0, self.size, CHUNK):
                yield view[offset : offset + CHUNK].tobytes()
            return
        assert self.file is not None
        left = self.size
        try:
            self.file.seek(self.start)
            while left:
                block = self.file.read(min(left, CHUNK))
                if not block:
                    raise InputError("message shorter than its size (changed while sending)")
                left -= len(block)
                yield block
        except OSError as error:
            raise InputError(f"cannot read the message: {error.strerror or error}") from error

    def close(self) -> None:
        if self.spooled and self.file is not None:
            self.file.close()


def _os_file_mode(message: BinaryIO) -> int | None:
    """st_mode of the file behind ``message``, None for in-memory files such as BytesIO."""
    try:
        fd = message.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is both
        return None
    return os.fstat(fd).st_mode


def _prepare_body(message: bytes | BinaryIO) -> _Body:
    """Know the size before sending (the outer length needs it); spool a pipe to a temp file."""
    if isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message)
        return _Body(len(data), data=data)
    try:
        mode = _os_file_mode(message)
        in_memory = mode is None and message.seekable()
        if in_memory or (mode is not None and stat.S_ISREG(mode)):
            start = message.tell()
            end = message.seek(0, os.SEEK_END)
            return _Body(max(end - start, 0), file=message, start=start)
        return _spool(message)
    except OSError as error:
        raise InputError(f"cannot read the message: {error.strerror or error}") from error


def _spool(message: BinaryIO) -> _Body:
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _Body.close)
    try:
        while block := message.read(CHUNK):
            spool.write(block)
        spool.flush()
    except BaseException:
        spool.close()
        raise
    return _Body(spool.tell(), file=spool, spooled=True)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- one session


def _request_parts(body: _Body, sender: bytes, recipients: list[bytes]) -> tuple[bytes, bytes]:
    """Bytes before and after the message body, so the body itself can be streamed."""
    tail = b"," + encode(sender) + b"".join(encode(r) for r in recipients)
    message_prefix = b"%d:" % body.size
    outer = len(message_prefix) + body.size + len(tail)
    return b"%d:" % outer + message_prefix, tail + b","


def parse_reply(buffer: bytes) -> tuple[str, str] | None:
    """(status, text) from a complete answer, None if more bytes are needed."""
    colon = buffer.find(b":", 0, 12)
    if colon < 0:
        if len(buffer) >= 12 or (buffer and not buffer.isdigit()):
            raise BrokenSession("answer is not a netstring")
        return None
    digits = buffer[:colon]
    if not digits.isdigit():
        raise BrokenSession("answer is not a netstring")
    length = int(digits)
    if length > REPLY_MAX:
        raise BrokenSession(f"answer longer than {REPLY_MAX} bytes")
    end = colon + 1 + length
    if len(buffer) <= end:
        return None
    if buffer[end : end + 1] != b",":
        raise BrokenSession("answer netstring has no comma")
    payload = buffer[colon + 1 : end]
    status = payload[:1].decode("ascii", "replace")
    if status not in EXIT_FOR_STATUS:
        raise BrokenSession("answer does not start with K, Z or D")
    text = payload[1:].decode("utf-8", "replace")
    return status, " ".join(text.split())


def _read_reply(sock: socket.socket, timeout: float) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    buffer = b""
    while True:
        reply = parse_reply(buffer)
        if reply is not None:
            return reply
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out waiting for the answer")
        sock.settimeout(left)
        block = sock.recv(REPLY_MAX + 16)
        if not block:
            raise BrokenSession("connection closed without an answer")
        buffer += block


def _session(sock: socket.socket, body: _Body, sender: bytes, recipients: list[bytes],
             timeout: float) -> tuple[str, str]:
    head, tail = _request_parts(body, sender, recipients)
    sock.settimeout(timeout)
    try:
        sock.sendall(head)
        for block in body.chunks():
            sock.sendall(block)
        sock.sendall(tail)
    except OSError as error:
        # A server may answer (D: too big) and close before reading everything: keep
        # that answer rather than the write error.
        try:
            return _read_reply(sock, min(timeout, EARLY_ANSWER_WAIT))
        except (OSError, BrokenSession):
            raise error from None
    return _read_reply(sock, timeout)


def _addresses(server: Server) -> list[tuple]:
    return socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM)


class _SocketFailure(TemporaryError):
    """socket() itself failed: the local system is out of something; stop at once."""

    exit_code = EXIT_SOCKET


def _connect(address: tuple, connect_timeout: float) -> socket.socket:
    family, kind, proto, _, sockaddr = address
    try:
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise _SocketFailure(str(error)) from error
    try:
        sock.settimeout(connect_timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


# ---------------------------------------------------------------------------- send


def send(message: bytes | BinaryIO, sender: bytes, recipients: list[bytes],
         servers: list[Server], timeout: float = 60, connect_timeout: float = 10,
         retry_broken: bool = True, retry_temporary: bool = True) -> Result:
    """Deliver one message to the first server that takes it; see the module doc.

    Servers are tried in order. A failed connect moves on to the next one, and so does a
    timeout or broken session before any answer when ``retry_broken`` is set (the message
    may then reach two servers if the first queued it but its answer was lost; qmail-qmqpc
    never retries here). A Z answer (nothing queued: a server short of room, its queue
    backlogged, a scanner down) moves on too when ``retry_temporary`` is set, so a cluster
    spreads the load; qmail-qmqpc stops there. K and D are final; when every server that
    answered said Z, the last Z is the result.
    """
    try:
        body = _prepare_body(message)
    except InputError as error:
        return Result(None, str(error), error.exit_code)
    try:
        return _send_body(body, sender, recipients, servers, timeout, connect_timeout,
                          retry_broken, retry_temporary)
    finally:
        body.close()


def _send_body(body: _Body, sender: bytes, recipients: list[bytes], servers: list[Server],
               timeout: float, connect_timeout: float, retry_broken: bool,
               retry_temporary: bool = True) -> Result:
    failures: list[str] = []
    last_error = EXIT_NO_SERVERS
    deferred: Result | None = None  # the last Z, given when no other server takes the message
    for server in servers:
        try:
            addresses = _addresses(server)
        except OSError as error:
            failures.append(f"{server}: cannot resolve: {_describe(error)}")
            continue
        for address in addresses:
            try:
                sock = _connect(address, connect_timeout)
            except _SocketFailure as error:
                return Result(None, f"cannot create a socket: {error}", error.exit_code, server,
                              failures)
            except OSError as error:
                timed_out = isinstance(error, TimeoutError)
                last_error = EXIT_CONNECT_TIMEOUT if timed_out else EXIT_CONNECT_REFUSED
                failures.append(f"{server}: connect: {_describe(error)}")
                continue
            try:
                with sock:
                    status, text = _session(sock, body, sender, recipients, timeout)
            except InputError as error:
                return Result(None, str(error), error.exit_code, server, failures)
            except (OSError, BrokenSession) as error:
                failures.append(f"{server}: {_describe(error)}")
                if not retry_broken:
                    return Result(None, "no answer from the server", EXIT_SESSION, server,
                                  failures)
                last_error = EXIT_SESSION
                break  # a broken session: try the next server, not this one's other address
            result = Result(status, text, EXIT_FOR_STATUS[status], server, failures)
            if status != "Z" or not retry_temporary:
                return result
            failures.append(f"{server}: {result.answer}")
            deferred = result
            break  # nothing was queued: try the next server
    if deferred is not None:
        return Result(deferred.status, deferred.text, deferred.exit_code, deferred.server,
                      failures)
    return Result(None, _NO_ANSWER[last_error], last_error, None, failures)


_NO_ANSWER = {
    EXIT_NO_SERVERS: "no usable QMQP server",
    EXIT_CONNECT_TIMEOUT: "connection to every QMQP server failed, the last one timed out",
    EXIT_CONNECT_REFUSED: "connection to every QMQP server failed",
    EXIT_SESSION: "no QMQP server answered",
}


# ---------------------------------------------------------------------------- qmail-queue mode


class EnvelopeError(TemporaryError):
    """The envelope is not ``F<sender>\\0`` ``T<rcpt>\\0``... ``\\0`` (exit 91)."""

    exit_code = EXIT_ENVELOPE


def parse_envelope(data: bytes) -> tuple[bytes, list[bytes]]:
    """qmail-queue's envelope; bytes after the terminating NUL are ignored, as qmail does."""
    if not data.startswith(b"F"):
        raise EnvelopeError("envelope does not start with F")
    end = data.find(b"\0")
    if end < 0:
        raise EnvelopeError("envelope ends before the sender's NUL")
    sender, position, recipients = data[1:end], end + 1, []
    while True:
        if position >= len(data):
            raise EnvelopeError("envelope ends before its terminating NUL")
        if data[position] == 0:
            return sender, recipients
        if data[position : position + 1] != b"T":
            raise EnvelopeError("envelope record is not T")
        end = data.find(b"\0", position)
        if end < 0:
            raise EnvelopeError("envelope ends before a recipient's NUL")
        recipients.append(data[position + 1 : end])
        position = end + 1


def read_envelope(fd: int) -> tuple[bytes, list[bytes]]:
    """Read fd until the envelope's terminating NUL (or EOF) and parse it."""
    data = b""
    # Every record starts with F or T after a NUL, so two NULs in a row can only be the end.
    while data.find(b"\0\0", max(len(data) - CHUNK - 1, 0)) < 0:
        if len(data) > ENVELOPE_MAX:
            raise EnvelopeError(f"envelope longer than {ENVELOPE_MAX} bytes")
        block = os.read(fd, CHUNK)
        if not block:
            break
        data += block
    return parse_envelope(data)


# ---------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmqpc",
        description="Send one message by QMQP. Without --from/--to it is a qmail-queue "
        "drop-in: message on fd 0, envelope on fd 1.")
    parser.add_argument("--server", action="append", default=[], metavar="HOST[:PORT]",
                        help="server to try, in order (repeatable); overrides --servers")
    parser.add_argument("--servers", metavar="FILE",
                        help="qmqpservers file (default $QMQPSERVERS, else "
                        "$QMAILHOME/control/qmqpservers)")
    parser.add_argument("--from", dest="sender", metavar="ADDR", help="envelope sender")
    parser.add_argument("--to", action="append", default=[], metavar="ADDR",
                        help="envelope recipient (repeatable)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds for each write and for the answer (default 60)")
    parser.add_argument("--connect-timeout", type=float, default=10.0,
                        help="seconds to connect to one server (default 10)")
    parser.add_argument("--no-retry-broken", dest="retry_broken", action="store_false",
                        help="do not try the next server after a broken session")
    parser.add_argument("--no-retry-z", dest="retry_temporary", action="store_false",
                        help="stop at the first Z answer, as qmail-qmqpc does (default: a Z "
                        "moves on to the next server)")
    return parser


def _fail(text: str, code: int) -> int:
    print(f"qmqpc: {text}", file=sys.stderr)
    return code


def _load_servers(options: argparse.Namespace) -> list[Server]:
    """Servers from --server, else the qmqpservers file; ValueError says why there are none."""
    if options.server:
        return [parse_server(spec) for spec in options.server]
    path = options.servers or servers_file(os.environ)
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            servers = parse_servers(file.read())
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from error
    if not servers:
        raise ValueError(f"no servers in {path}")
    return servers


def _input() -> BinaryIO:
    return os.fdopen(0, "rb", closefd=False)


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    command_line = options.sender is not None or bool(options.to)
    if command_line and (options.sender is None or not options.to):
        return _fail("--from and at least one --to are needed together", 2)
    try:
        servers = _load_servers(options)
    except ValueError as error:
        return _fail(str(error), EXIT_NO_SERVERS)
    with _input() as message:
        if command_line:
            envelope = (os.fsencode(options.sender), [os.fsencode(to) for to in options.to])
            result = send(message, *envelope, servers, options.timeout,
                          options.connect_timeout, options.retry_broken,
                          options.retry_temporary)
        else:
            result = _send_queue_style(message, servers, options)
    if result.status:
        if command_line:
            print(result.answer, flush=True)
        elif result.status != "K":
            print(f"qmqpc: {result.server}: {result.answer}", file=sys.stderr)
        return result.exit_code
    return _fail(result.error, result.exit_code)


def _send_queue_style(message: BinaryIO, servers: list[Server],
                      options: argparse.Namespace) -> Result:
    """qmail-queue order: the whole message from fd 0 first, then the envelope from fd 1."""
    try:
        body = _prepare_body(message)
    except InputError as error:
        return Result(None, str(error), error.exit_code)
    try:
        try:
            sender, recipients = read_envelope(1)
        except EnvelopeError as error:
            return Result(None, str(error), error.exit_code)
        except OSError as error:
            return Result(None, f"cannot read the envelope: {_describe(error)}", EXIT_READ)
        return _send_body(body, sender, recipients, servers, options.timeout,
                          options.connect_timeout, options.retry_broken,
                          options.retry_temporary)
    finally:
        body.close()


if __name__ == "__main__":
    sys.exit(main())
