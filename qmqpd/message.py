"""Connection facts, the message being handled, and every reply text in one table."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import BinaryIO

from qmqpd.fsio import write_all

CHUNK = 65536


# Plain classes, not dataclasses: importing dataclasses (with inspect, ast, dis) and
# defining a dataclass cost a `qmqpd session` start-up several milliseconds.
class Record:
    """A class whose fields are its ``__slots__``: equality and repr come from them."""

    __slots__ = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable: unhashable, like a dataclass

    def __repr__(self) -> str:
        values = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{self.__class__.__qualname__}({values})"


class FrozenRecord(Record):
    """A Record whose fields are set once, in ``__init__`` through ``_set``; hashable."""

    __slots__ = ()

    def _set(self, **values: object) -> None:
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}")

    def __hash__(self) -> int:
        return hash(self._fields())

    def __setstate__(self, state: tuple[None, dict[str, object]]) -> None:
        """copy and pickle restore the fields past __setattr__, as for a frozen dataclass."""
        self._set(**state[1])


class Client(FrozenRecord):
    """UCSPI-style facts about the peer, kept apart from the message, plus its rule env."""

    __slots__ = (
        "local_host",
        "local_ip",
        "local_port",
        "proto",
        "remote_host",
        "remote_info",
        "remote_ip",
        "remote_port",
        "rule_env",
    )
    remote_ip: str
    remote_port: str
    local_ip: str
    local_port: str
    remote_host: str
    remote_info: str
    local_host: str
    proto: str
    rule_env: Mapping[str, str | None]

    def __init__(self, remote_ip: str = "unknown", remote_port: str = "", local_ip: str = "",
                 local_port: str = "", remote_host: str = "", remote_info: str = "",
                 local_host: str = "", proto: str = "TCP",
                 rule_env: Mapping[str, str | None] | None = None) -> None:
        # Set one by one, not through _set(**fields): the master builds one per connection.
        set_field = object.__setattr__
        set_field(self, "remote_ip", remote_ip)
        set_field(self, "remote_port", remote_port)
        set_field(self, "local_ip", local_ip)
        set_field(self, "local_port", local_port)
        set_field(self, "remote_host", remote_host)
        set_field(self, "remote_info", remote_info)
        set_field(self, "local_host", local_host)
        set_field(self, "proto", proto)
        set_field(self, "rule_env", {} if rule_env is None else rule_env)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Client:
        """Facts as tcpserver, inetd wrappers or systemd-socket-proxyd style UCSPI set them."""
        return cls(
            remote_ip=environ.get("TCPREMOTEIP", "") or "unknown",
            remote_port=environ.get("TCPREMOTEPORT", ""),
            local_ip=environ.get("TCPLOCALIP", ""),
            local_port=environ.get("TCPLOCALPORT", ""),
            remote_host=environ.get("TCPREMOTEHOST", ""),
            remote_info=environ.get("TCPREMOTEINFO", ""),
            local_host=environ.get("TCPLOCALHOST", ""),
            proto=environ.get("PROTO", "TCP") or "TCP",
        )

    def ucspi_env(self) -> dict[str, str]:
        """The variables tcpserver would set for a child, for external queue programs."""
        env = {
            "PROTO": self.proto,
            "TCPREMOTEIP": self.remote_ip,
            "TCPREMOTEPORT": self.remote_port,
            "TCPLOCALIP": self.local_ip,
            "TCPLOCALPORT": self.local_port,
        }
        for name, value in (
            ("TCPREMOTEHOST", self.remote_host),
            ("TCPREMOTEINFO", self.remote_info),
            ("TCPLOCALHOST", self.local_host),
        ):
            if value:
                env[name] = value
        return env


def encode_env_item(name: str, value: str | None) -> str:
    """One rule env item as tcprules writes it: `+NAME=value` sets, `-NAME` unsets."""
    return f"-{name}" if value is None else f"+{name}={value}"


def decode_env_item(item: str) -> tuple[str, str | None] | None:
    """(name, value) of `+NAME=value`, (name, None) of `-NAME`; None for anything else."""
    if item.startswith("+") and "=" in item:
        name, _, value = item[1:].partition("=")
        return name, value
    if item.startswith("-") and len(item) > 1:
        return item[1:], None
    return None


class MessageData:
    """The message bytes as the client sent them: in memory, or in an unlinked spool file.

    A spool file is used above the protocol's memory threshold so that large messages are
    never held whole in memory; readers stream it in chunks.
    """

    def __init__(self, data: bytes | None = None, spool: BinaryIO | None = None) -> None:
        if (data is None) == (spool is None):
            raise ValueError("MessageData needs exactly one of data or spool")
        self._data = data
        self._spool = spool
        if spool is not None:
            self.size = os.fstat(spool.fileno()).st_size
        else:
            assert data is not None
            self.size = len(data)

    @property
    def in_memory(self) -> bool:
        return self._data is not None

    def bytes(self) -> bytes:
        """The whole content; reads a spool file fully, so callers check size first."""
        if self._data is not None:
            return self._data
        assert self._spool is not None
        self._spool.seek(0)
        return self._spool.read()

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        if self._data is not None:
            view = memoryview(self._data)
            for start in range(0, len(view), size):
                yield bytes(view[start : start + size])
            return
        assert self._spool is not None
        self._spool.seek(0)
        while block := self._spool.read(size):
            yield block

    def copy_to(self, fd: int) -> None:
        """Write the content to fd; a spool file goes through the kernel, not Python memory."""
        if self._data is not None:
            write_all(fd, self._data)
            return
        assert self._spool is not None
        self._spool.flush()
        src = self._spool.fileno()
        offset = 0
        while offset < self.size:
            sent = os.sendfile(fd, src, offset, min(self.size - offset, 1 << 30))
            if sent == 0:
                raise OSError("spool file shorter than expected")
            offset += sent

    def replace_prefix(self, length: int, new: bytes) -> None:
        """Put `new` (at most `length` bytes) in place of the first `length` bytes: a filter
        that drops header fields. A spool file is shifted in place, chunk by chunk."""
        if len(new) > length:
            raise ValueError("replace_prefix only shortens the data")
        if self._data is not None:
            self._data = new + self._data[length:]
            self.size = len(self._data)
            return
        spool = self._spool
        assert spool is not None
        spool.seek(0)
        spool.write(new)
        read_at, write_at = length, len(new)
        while True:
            spool.seek(read_at)
            block = spool.read(CHUNK)
            if not block:
                break
            spool.seek(write_at)
            spool.write(block)
            read_at += len(block)
            write_at += len(block)
        spool.truncate(write_at)
        spool.flush()
        self.size = write_at

    def close(self) -> None:
        if self._spool is not None:
            self._spool.close()


class Message(Record):
    """One QMQP request after parsing.

    The final message is ``headers`` (top first, added by filter stages) + ``received``
    (qmqpd's own Received line) + ``data`` (the client's bytes). Addresses are bytes as
    sent: qmail treats them as opaque octets.
    """

    __slots__ = ("data", "headers", "received", "recipients", "sender")

    def __init__(self, sender: bytes, recipients: list[bytes], data: MessageData,
                 received: bytes = b"", headers: list[bytes] | None = None) -> None:
        self.sender = sender
        self.recipients = recipients
        self.data = data
        self.received = received
        self.headers: list[bytes] = [] if headers is None else headers

    def prepend_header(self, header: bytes) -> None:
        """Put a header (one or more LF-terminated lines) above everything present."""
        if not header.endswith(b"\n"):
            header += b"\n"
        self.headers.insert(0, header)

    @property
    def head(self) -> bytes:
        return b"".join(self.headers) + self.received

    @property
    def size(self) -> int:
        return len(self.head) + self.data.size

    def final_chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The bytes that go into the queue, streamed."""
        yield self.head
        yield from self.data.chunks(size)

    def write_final(self, fd: int) -> None:
        write_all(fd, self.head)
        self.data.copy_to(fd)

    def close(self) -> None:
        self.data.close()


class Reply(FrozenRecord):
    """One QMQP answer: status K, Z or D and the human-readable text after it."""

    __slots__ = ("status", "text")
    status: str
    text: str

    def __init__(self, status: str, text: str) -> None:
        if status not in ("K", "Z", "D"):
            raise ValueError(f"reply status must be K, Z or D, not {status!r}")
        self._set(status=status, text=text)

    @property
    def line(self) -> str:
        return self.status + self.text

    @classmethod
    def ok(cls, when: int, qp: int | str) -> Reply:
        return cls("K", f"ok {when} qp {qp}")

    @classmethod
    def named(cls, name: str, **values: object) -> Reply:
        line = REPLIES[name].format(**values) if values else REPLIES[name]
        return cls(line[0], line[1:])

    @classmethod
    def from_line(cls, line: str) -> Reply:
        """A custom text from a filter or queue program; anything not D/Z is made Z."""
        line = line.strip().replace("\n", " ").replace("\r", " ")
        if len(line) > 2 and line[0] in ("D", "Z"):
            return cls(line[0], line[1:])
        return cls.named("temporary")


# Every text qmqpd can answer with. Names are used in code and logs; texts follow
# qmail/IndiMail where an equivalent exists so clients and operators see familiar words.
REPLIES: dict[str, str] = {
    "bad_address": "Dsorry, I can't accept addresses like that (#5.1.3)",
    "no_recipients": "Dno recipients given (#5.1.3)",
    "too_big": "Dmessage too big (#5.3.4)",
    "too_many_recipients": "Dtoo many recipients: at most {limit} per message (#5.5.3)",
    "too_slow": "Zconnection too slow: below {rate} bytes per second (#4.4.2)",
    "protocol": "Dprotocol error: {reason} (#5.5.2)",
    "disk_full": "Zqq write error or disk full (#4.3.0)",
    "read_error": "Zqq read error (#4.3.0)",
    "temporary": "Zqq temporary problem (#4.3.0)",
    "permanent": "Dqq permanent problem (#5.3.0)",
    "crashed": "Zqq crashed (#4.3.0)",
    "exec_failed": "Zqq unable to exec qq (#4.3.0)",
    "timeout": "Zqq timeout (#4.3.0)",
    "out_of_memory": "Zqq out of memory (#4.3.0)",
    "config": "Zqq unable to read configuration (#4.3.0)",
    "too_many_per_ip": "Ztoo many connections from your IP (#4.3.2)",
    "queue_backlog": "Zqueue backlog too large, try another server (#4.3.1)",
    "filter_failed": "Zqq temporary problem in filter {stage} (#4.3.0)",
    "virus": "Dqq message contains virus (#5.7.1)",
    "scanner_unavailable": "Zvirus scanner unavailable (#4.3.0)",
    "scanner_size_limit": "Zmessage larger than the virus scanner accepts (#4.3.4)",
    # The signing stages (dk, dkim) answer alike (filters/signing.py): a key the operator
    # must fix is temporary, a header block that cannot be parsed is permanent, and a
    # message without From: or Sender: is temporary, as qmail-dkim answers it.
    "key_unreadable": "Z{stage}: unable to read private key (#4.3.0)",
    "key_unusable": "Z{stage}: unable to use private key (#4.3.0)",
    "sign_malformed": "D{stage}: message header is malformed, cannot sign (#5.6.0)",
    "sign_no_identity": "Z{stage}: could not find From: or Sender: header in message (#4.1.7)",
    # A verification result the operator listed (DKVERIFY/DKIMVERIFY letters)
    "verify_rejected": "D{stage}: {text} (#5.7.1)",
    "verify_tempfailed": "Z{stage}: {text} (#4.7.1)",
}

# qmail-queue exit code -> the answer line (status letter and text), as qmail.c maps them
# (IndiMail's texts); a code not listed gets reply_for_exit's default.
EXIT_REPLIES: dict[int, str] = {
    11: "Dqq envelope address too long (#5.1.3)",
    115: "Dqq envelope address too long (#5.1.3)",
    31: "Dqq mail server permanently rejected message (#5.3.0)",
    32: "Dqq spam or junk mail threshold exceeded (#5.7.1)",
    33: "Dqq message contains virus (#5.7.1)",
    34: "Dqq message contains banned attachment (#5.7.1)",
    35: "Dqq private key file does not exist (#5.3.5)",
    41: "Zqq trouble duplicating file descriptors (#4.3.0)",
    50: "Zqq unable to get privilege to run virus scanner (#4.3.0)",
    51: "Zqq out of memory (#4.3.0)",
    52: "Zqq timeout (#4.3.0)",
    53: "Zqq write error or disk full (#4.3.0)",
    54: "Zqq read error (#4.3.0)",
    55: "Zqq unable to read configuration (#4.3.0)",
    56: "Zqq trouble making network connection (#4.3.0)",
    60: "Zqq trouble creating pipes/sockets (#4.3.0)",
    61: "Zqq trouble in home directory (#4.3.0)",
    62: "Zqq unable to access mess file (#4.3.0)",
    63: "Zqq trouble doing cd to root directory (#4.3.0)",
    64: "Zqq trouble syncing message to disk (#4.3.0)",
    65: "Zqq trouble creating files in intd. (#4.3.0)",
    66: "Zqq trouble linking todofn to intdfn (#4.3.0)",
    67: "Zqq trouble linking messfn to pidfn (#4.3.0)",
    68: "Zqq trouble creating temporary files (#4.3.0)",
    69: "Zqq trouble syncing dir to disk (#4.3.0)",
    70: "Zqq trouble with pid file (#4.3.0)",
    71: "Zqq mail server temporarily rejected message (#4.3.0)",
    72: "Zqq connection to mail server timed out (#4.4.1)",
    73: "Zqq connection to mail server rejected (#4.4.1)",
    74: "Zqq communication with mail server failed (#4.4.2)",
    75: "Zqq unable to exec (#4.3.0)",
    76: "Zqq temporary problem with SPAM filter (#4.3.0)",
    77: "Zqq unable to run QHPSI scanner (#4.3.0)",
    78: "Zqq trouble getting uids/gids (#4.3.0)",
    79: "Zqq envelope format error (#4.3.0)",
    81: "Zqq internal bug (#4.3.0)",
    87: "Zqq mail system incorrectly configured. (#4.3.5)",
    91: "Zqq envelope format error (#4.3.0)",
    120: "Zqq unable to exec qq (#4.3.0)",
    121: "Zqq unable to fork (#4.3.0)",
    122: "Zqq waitpid surprise (#4.3.0)",
    123: "Zqq crashed (#4.3.0)",
}

# Exit codes whose custom text (D... or Z...) is read from the program's error fd.
CUSTOM_ERROR_EXITS = (82, 88)


def reply_for_exit(code: int, custom: str = "") -> Reply:
    """Map a qmail-queue-style exit code to the answer qmail would give."""
    if code in CUSTOM_ERROR_EXITS and len(custom.strip()) > 2:
        return Reply.from_line(custom)
    if code in EXIT_REPLIES:
        line = EXIT_REPLIES[code]
        return Reply(line[0], line[1:])
    if 11 <= code <= 40:
        return Reply.named("permanent")
    return Reply.named("temporary")

