"""The message as DKIM and DomainKeys see it, read as a stream: a bounded header block, then
body chunks that are canonicalised and hashed on the fly.

Only the header block is held in memory, and at most HEADER_LIMIT bytes of it; the body,
whatever its size, passes through in chunks (it is read from the spool file above 1 MiB).
Header fields are parsed as dkimpy's `rfc822_parse` does, so that signatures stay
byte-identical to dkimpy's: lines end at LF or CRLF, a line starting with SP or HTAB
continues the field above, an mbox `From ` line is skipped, and any other line without a
`name:` is malformed. The header block ends at the first empty line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from qmqpd.errors import PermanentError

# The header block is what the stages hold in memory; beyond this the message is refused by
# a signing stage and gets a syntax result from a verifying one. 1 MiB is ~20,000 ordinary
# header lines, far above any real message, and matches the size above which the body is
# spooled to disk.
HEADER_LIMIT = 1 << 20

_NAME = re.compile(rb"([\x21-\x7e]+?):")
_END_OF_HEADER = re.compile(rb"(?:^|\n)(\r?\n)")


class MalformedHeader(PermanentError):
    """The header block cannot be parsed into fields (or is larger than HEADER_LIMIT)."""


class HeaderTooLarge(MalformedHeader):
    pass


@dataclass
class Split:
    """The parsed header fields (dkimpy's form: [name, value + CRLF ...]) and the body."""

    fields: list[list[bytes]]
    body: Iterator[bytes]
    head_end: int = 0  # where the header block ends in the stream (the separator's start)
    body_start: int = 0  # where the body starts (after the separator)
    lead: bytes = b""  # with orphan_lines: continuation lines at the top, as a value


def split(chunks: Iterable[bytes], limit: int = HEADER_LIMIT,
          orphan_lines: bool = False) -> Split:
    """Read the header block (at most `limit` bytes) and return it parsed with the rest of
    the stream as body chunks. Raises MalformedHeader. With orphan_lines, continuation
    lines at the very top are returned as `lead` (they continue a field above the stream)
    instead of being malformed."""
    stream = iter(chunks)
    buffer = b""
    searched = 0
    for chunk in stream:
        buffer += chunk
        found = _END_OF_HEADER.search(buffer, max(0, searched - 2))
        if found is not None:
            if found.start(1) > limit:
                raise HeaderTooLarge(f"header block larger than {limit} bytes")
            head = buffer[: found.start(1)]
            rest = buffer[found.end(1):]
            fields, lead = _parse(head, orphan_lines)
            return Split(fields, _prepend(rest, stream), found.start(1), found.end(1), lead)
        if len(buffer) > limit:
            raise HeaderTooLarge(f"header block larger than {limit} bytes")
        searched = len(buffer)
    if len(buffer) > limit:
        raise HeaderTooLarge(f"header block larger than {limit} bytes")
    fields, lead = _parse(buffer, orphan_lines)
    return Split(fields, iter(()), len(buffer), len(buffer), lead)


def _parse(head: bytes, orphan_lines: bool) -> tuple[list[list[bytes]], bytes]:
    """(fields, continuation lines before the first field, as a value) of a header block."""
    if not orphan_lines:
        return parse_fields(head), b""
    lead: list[bytes] = []
    return parse_fields(head, lead), b"".join(lead)


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def parse_fields(head: bytes, lead: list[bytes] | None = None) -> list[list[bytes]]:
    """Header lines into [name, value] pairs, exactly as dkimpy's rfc822_parse. With a
    `lead` list, continuation lines before the first field go there (they continue a field
    above this block) instead of being malformed."""
    fields: list[list[bytes]] = []
    # One object per distinct name and short value: a 1 MiB block of tiny fields is
    # ~350,000 of them.
    shared: dict[bytes, bytes] = {}
    for line in _lines(head):
        if line[:1] in (b"\t", b" "):
            if fields:
                fields[-1][1] += line + b"\r\n"
            elif lead is not None:
                lead.append(line + b"\r\n")
            else:
                raise MalformedHeader("the header block starts with a continuation line")
            continue
        match = _NAME.match(line)
        if match is not None:
            name, value = match.group(1), line[match.end(0):] + b"\r\n"
            if len(value) <= 16:
                value = shared.setdefault(value, value)
            fields.append([shared.setdefault(name, name), value])
        elif not line.startswith(b"From "):
            raise MalformedHeader(f"not a header field: {line[:60]!r}")
    return fields


def _lines(head: bytes) -> Iterator[bytes]:
    """The lines of head, split at LF or CRLF, one at a time (no list of them all)."""
    start = 0
    while start < len(head):
        end = head.find(b"\n", start)
        if end < 0:
            yield head[start:]
            return
        yield head[start:end - 1] if head[end - 1:end] == b"\r" and end > start else \
            head[start:end]
        start = end + 1


def raw_field(field: list[bytes]) -> bytes:
    """The field as it was sent, lines joined by CRLF and ending in CRLF."""
    return field[0] + b":" + field[1]


# --- body canonicalisation -----------------------------------------------------------------

class Sink(Protocol):
    def update(self, data: bytes, /) -> None: ...


_WSP_BEFORE_EOL = re.compile(rb"[\t ]+\r\n")
_WSP_TO_COMPRESS = re.compile(rb" [\t ]+|\t[\t ]*")  # a lone space stays as it is


class BodyCanon:
    """One body canonicalisation, chunk by chunk, at the speed of bytes operations.

    Lines end at LF or CRLF (made CRLF). What is emitted is final; what may still change
    is held back as a count: the trailing empty lines (dropped if nothing follows) and,
    for relaxed, whether a whitespace run follows them. So a body of 100 MB of spaces or
    empty lines costs a few integers of memory.

    kinds: "simple", "relaxed" (RFC 6376, byte for byte dkimpy's canonicalize_body) and
    "dk-simple", "dk-nofws" (RFC 4870: a CRLF before the body when it has a line left).
    """

    def __init__(self, kind: str, sinks: list[Sink]) -> None:
        if kind not in ("simple", "relaxed", "dk-simple", "dk-nofws"):
            raise ValueError(f"unknown body canonicalisation {kind!r}")
        self.kind = kind
        self.sinks = sinks
        self.length = 0
        self._carry = b""  # a CR that may be the first half of a CRLF
        self._empty_lines = 0  # line ends held back
        self._space = False  # relaxed: a whitespace run after them
        self._text = False  # anything but line ends written yet

    def _emit(self, data: bytes) -> None:
        if data:
            self.length += len(data)
            for sink in self.sinks:
                sink.update(data)

    def _emit_line_ends(self, count: int) -> None:
        block = b"\r\n" * min(count, 32768)
        while count > 0:
            self._emit(block[: 2 * min(count, 32768)])
            count -= 32768

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk
        self._carry = b""
        if data.endswith(b"\r"):
            data, self._carry = data[:-1], b"\r"
        if data:
            self._take(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    def _take(self, text: bytes) -> None:
        """text: CRLF line ends, no CR at its end that could pair with a later LF."""
        if self.kind == "dk-nofws":  # every SP, HTAB and lone CR goes
            text = text.replace(b"\r\n", b"\n").translate(None, b" \t\r").replace(
                b"\n", b"\r\n")
        blanks = b" \t\r\n" if self.kind == "relaxed" else b"\r\n"
        kept = len(text.rstrip(blanks))
        if kept < len(text):
            # a CR without its LF in the blank tail is text: keep up to and with it
            bare = text.replace(b"\r\n", b"\0\0").rfind(b"\r", kept)
            if bare >= 0:
                kept = bare + 1
        body, tail = text[:kept], text[kept:]
        if body:
            if not self._text and self.kind.startswith("dk-"):
                self._emit(b"\r\n")  # the separator RFC 4870 keeps only before a body
            self._emit_line_ends(self._empty_lines)
            self._empty_lines = 0
            if self.kind == "relaxed":
                if self._space:
                    body = b" " + body
                body = _WSP_TO_COMPRESS.sub(b" ", _WSP_BEFORE_EOL.sub(b"\r\n", body))
            self._space = False
            self._emit(body)
            self._text = True
        ends = tail.count(b"\n")
        if ends:
            self._empty_lines += ends
            self._space = tail.rfind(b"\n") < len(tail) - 1
        elif tail:
            self._space = True

    def finish(self) -> None:
        if self._carry:
            self._take(self._carry)  # a lone CR at the very end is text
            self._carry = b""
        if self._space:
            # dkimpy keeps a last line's trailing whitespace (it has no CRLF after it)
            self._emit_line_ends(self._empty_lines)
            self._emit(b" \r\n")
        elif self._text or self.kind == "simple":
            self._emit(b"\r\n")  # the last line's end; simple: an empty body is one CRLF
        self._empty_lines = 0
        self._space = False


class LimitedSink:
    """Passes on only the first `limit` bytes (a signature's l= tag)."""

    def __init__(self, sink: Sink, limit: int) -> None:
        self.sink = sink
        self.left = limit

    def update(self, data: bytes, /) -> None:
        if self.left > 0:
            self.sink.update(data[: self.left])
            self.left -= min(len(data), self.left)


def feed(body: Iterable[bytes], *consumers: BodyCanon) -> None:
    """One pass over the body chunks into every canonicaliser."""
    for chunk in body:
        for consumer in consumers:
            consumer.feed(chunk)
    for consumer in consumers:
        consumer.finish()
