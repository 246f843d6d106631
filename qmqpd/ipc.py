"""Master <-> worker records on an AF_UNIX SOCK_SEQPACKET socketpair.

One record is one packet: a kind byte, then fields, each a 2-byte big-endian length and
that many bytes. A handoff carries the client's fd (SCM_RIGHTS via socket.send_fds) and its
facts; rule env entries are encoded as tcprules stores them (``+NAME=value``, ``-NAME``).
A done record carries the exiting flag, then optionally the session's outcome: the answer's
status letter, then optionally its timing (``@S`` or ``@S/C``: whole microseconds from the
session's start to its answer, and spent making the message durable in the queue), then
``#health`` when the request was a health check's probe, then ``stage=verdict`` entries
(bounded names, at most MAX_STAGES). A record without the timing field (as older workers
send) decodes with no durations; a malformed one is refused.
Sizes are bounded so neither side can be made to hold more than MAX_RECORD bytes.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import socket
import struct
from dataclasses import dataclass

from qmqpd.errors import TemporaryError
from qmqpd.message import Client, decode_env_item, encode_env_item

MAX_RECORD = 64 * 1024
_FIELD = struct.Struct(">H")
# Client facts in record order; the rule env follows them.
_FACTS = ("remote_ip", "remote_port", "local_ip", "local_port", "remote_host",
          "remote_info", "local_host", "proto")


class Kind(enum.IntEnum):
    HANDOFF = 1  # master -> worker: serve this fd
    READY = 2  # worker -> master: booted, waiting for work
    DONE = 3  # worker -> master: session over (flag: the worker exits now)
    RETIRE = 4  # master -> worker: exit when idle


# Record kinds to and from their byte, looked up rather than built per record.
_KIND_BYTE = {kind: bytes([kind]) for kind in Kind}
_KIND_OF = {int(kind): kind for kind in Kind}
# As a plain int: OR-ing the IntFlag members builds an enum member on every record.
_TRUNCATED = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)

# A done record's outcome is bounded: the master keeps counters keyed by these names.
MAX_STAGES = 16
ANSWERS = ("K", "Z", "D", "")  # "" = the session ended without an answer
_STAGE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ACTION = re.compile(r"[a-z]{1,16}")
# "@" cannot start a stage name, so the timing field is never mistaken for a verdict.
_TIMING = re.compile(r"@([0-9]{1,12})(?:/([0-9]{1,12}))?")
MAX_MICROSECONDS = 10**12 - 1  # what 12 digits hold: about 11 days
# Neither a stage name nor a timing can start with "#".
_HEALTH = "#health"


class ChannelError(TemporaryError):
    """A malformed, oversized or unexpected record: the peer cannot be trusted further."""


@dataclass(frozen=True)
class Outcome:
    """How a session ended, for the master's counters: the answer's status letter ("" when
    none was sent) and each filter stage's verdict, in the order the stages ran."""

    answer: str = ""
    stages: tuple[tuple[str, str], ...] = ()
    # seconds from the session's start to its answer (None: not measured)
    session_seconds: float | None = None
    # seconds spent making the message durable in the queue (None: nothing was queued)
    commit_seconds: float | None = None
    # the request was a health check's probe: counted as such, not as an answer
    health: bool = False


def valid_stage(name: str, action: str) -> bool:
    """A stage name and verdict that fit a done record (short lower-case words)."""
    return bool(_STAGE_NAME.fullmatch(name) and _ACTION.fullmatch(action))


@dataclass
class Record:
    kind: Kind
    client: Client | None = None
    fd: int | None = None
    exiting: bool = False
    outcome: Outcome | None = None  # DONE only; None from a worker that sent no outcome


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(master end, worker end); both close-on-exec, the worker end is kept across fork."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _pack(kind: Kind, fields: list[bytes]) -> bytes:
    parts = [_KIND_BYTE[kind]]
    pack = _FIELD.pack
    for value in fields:
        size = len(value)
        if size > 0xFFFF:
            raise ChannelError("record field too long")
        parts += (pack(size), value)
    packet = b"".join(parts)
    if len(packet) > MAX_RECORD:
        raise ChannelError("record too long")
    return packet


def _unpack(packet: bytes) -> tuple[Kind, list[bytes]]:
    if not packet:
        raise ChannelError("empty record")
    kind = _KIND_OF.get(packet[0])
    if kind is None:
        raise ChannelError(f"unknown record kind {packet[0]}")
    fields: list[bytes] = []
    end = len(packet)
    pos = 1
    while pos < end:
        if pos + 2 > end:
            raise ChannelError("truncated field length")
        start = pos + 2
        pos = start + (packet[pos] << 8 | packet[pos + 1])  # the 2-byte big-endian size
        if pos > end:
            raise ChannelError("truncated field")
        fields.append(packet[start:pos])
    return kind, fields


def encode_client(client: Client) -> list[bytes]:
    # The facts named one by one, in _FACTS order: no getattr per field per connection.
    facts = (client.remote_ip, client.remote_port, client.local_ip, client.local_port,
             client.remote_host, client.remote_info, client.local_host, client.proto)
    fields = [str(fact).encode("utf-8", "surrogateescape") for fact in facts]
    for name, value in client.rule_env.items():
        fields.append(encode_env_item(name, value).encode("utf-8", "surrogateescape"))
    return fields


def decode_client(fields: list[bytes]) -> Client:
    if len(fields) < len(_FACTS):
        raise ChannelError("handoff without client facts")
    text = [f.decode("utf-8", "surrogateescape") for f in fields]
    facts = dict(zip(_FACTS, text[: len(_FACTS)], strict=True))
    env: dict[str, str | None] = {}
    for item in text[len(_FACTS) :]:
        decoded = decode_env_item(item)
        if decoded is None:
            raise ChannelError("bad rule env entry in handoff")
        env[decoded[0]] = decoded[1]
    return Client(rule_env=env, **facts)


def send_handoff(channel: socket.socket, fd: int, client: Client) -> None:
    packet = _pack(Kind.HANDOFF, encode_client(client))
    socket.send_fds(channel, [packet], [fd])


def _send(channel: socket.socket, kind: Kind, fields: list[bytes] | None = None) -> None:
    channel.send(_pack(kind, fields or []))


def send_ready(channel: socket.socket) -> None:
    _send(channel, Kind.READY)


def encode_outcome(outcome: Outcome) -> list[bytes]:
    if outcome.answer not in ANSWERS:
        raise ChannelError(f"bad answer status {outcome.answer!r}")
    if len(outcome.stages) > MAX_STAGES:
        raise ChannelError("too many stages in an outcome")
    fields = [outcome.answer.encode("ascii")]
    if outcome.session_seconds is not None:
        timing = f"@{_microseconds(outcome.session_seconds)}"
        if outcome.commit_seconds is not None:
            timing += f"/{_microseconds(outcome.commit_seconds)}"
        fields.append(timing.encode("ascii"))
    elif outcome.commit_seconds is not None:
        raise ChannelError("a commit time without a session time")
    if outcome.health:
        fields.append(_HEALTH.encode("ascii"))
    for name, action in outcome.stages:
        if not valid_stage(name, action):
            raise ChannelError(f"bad stage verdict {name!r}={action!r}")
        fields.append(f"{name}={action}".encode("ascii"))
    return fields


def _microseconds(seconds: float) -> int:
    """A duration for the record: whole microseconds, clamped to what the field holds."""
    return min(MAX_MICROSECONDS, max(0, round(seconds * 1_000_000)))


def _decode_timing(entry: str) -> tuple[float, float | None]:
    found = _TIMING.fullmatch(entry)
    if found is None:
        raise ChannelError(f"bad timing {entry!r}")
    session, commit = found.groups()
    return int(session) / 1_000_000, None if commit is None else int(commit) / 1_000_000


def decode_outcome(fields: list[bytes]) -> Outcome:
    if len(fields) > MAX_STAGES + 3:
        raise ChannelError("too many stages in an outcome")
    try:
        answer, *entries = [f.decode("ascii") for f in fields]
    except UnicodeDecodeError:
        raise ChannelError("outcome is not ASCII") from None
    if answer not in ANSWERS:
        raise ChannelError(f"bad answer status {answer!r}")
    session = commit = None
    if entries and entries[0].startswith("@"):
        session, commit = _decode_timing(entries.pop(0))
    health = bool(entries) and entries[0] == _HEALTH
    if health:
        entries.pop(0)
    if len(entries) > MAX_STAGES:
        raise ChannelError("too many stages in an outcome")
    stages = []
    for entry in entries:
        name, _, action = entry.partition("=")
        if not valid_stage(name, action):
            raise ChannelError(f"bad stage verdict {entry!r}")
        stages.append((name, action))
    return Outcome(answer, tuple(stages), session, commit, health)


def send_done(channel: socket.socket, exiting: bool = False,
              outcome: Outcome | None = None) -> None:
    fields = [b"1" if exiting else b"0"]
    if outcome is not None:
        fields += encode_outcome(outcome)
    _send(channel, Kind.DONE, fields)


def send_retire(channel: socket.socket) -> None:
    _send(channel, Kind.RETIRE)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def receive(channel: socket.socket) -> Record | None:
    """The next record, or None when the peer has closed its end."""
    packet, fds, flags, _ = socket.recv_fds(channel, MAX_RECORD, 1)
    if flags & _TRUNCATED:
        _close_all(fds)
        raise ChannelError("record truncated")
    if not packet and not fds:
        return None
    try:
        kind, fields = _unpack(packet)
        if kind is Kind.HANDOFF:
            if len(fds) != 1:
                raise ChannelError("handoff without exactly one fd")
            return Record(kind, client=decode_client(fields), fd=fds[0])
        if fds:
            raise ChannelError(f"unexpected fd with {kind.name}")
        if kind is Kind.DONE:
            outcome = decode_outcome(fields[1:]) if len(fields) > 1 else None
            return Record(kind, exiting=fields[:1] == [b"1"], outcome=outcome)
        return Record(kind)
    except ChannelError:
        _close_all(fds)
        raise
