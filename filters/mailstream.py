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

# The header block is what the stages hold in memory; beyond this the message is refused by
# a signing stage and gets a syntax result from a verifying one. 1 MiB is ~20,000 ordinary
# header lines, far above any real message, and matches the size above which the body is
# spooled to disk.
HEADER_LIMIT = 1 << 20

_NAME = re.compile(rb"([\x21-\x7e]+?):")
_END_OF_HEADER = re.compile(rb"(?:^|\n)(\r?\n)")
_WSP_RUN = re.compile(rb"[\t ]+")
_DK_DELETE = re.compile(rb"[ \t\r\n]")


class MalformedHeader(Exception):
    """The header block cannot be parsed into fields (or is larger than HEADER_LIMIT)."""


class HeaderTooLarge(MalformedHeader):
    pass


@dataclass
class Split:
    """The parsed header fields (dkimpy's form: [name, value + CRLF ...]) and the body."""

    fields: list[list[bytes]]
    body: Iterator[bytes]


def split(chunks: Iterable[bytes], limit: int = HEADER_LIMIT) -> Split:
    """Read the header block (at most `limit` bytes) and return it parsed with the rest of
    the stream as body chunks. Raises MalformedHeader."""
    stream = iter(chunks)
    buffer = b""
    searched = 0
    for chunk in stream:
        buffer += chunk
        found = _END_OF_HEADER.search(buffer, max(0, searched - 2))
        if found is not None:
            head = buffer[: found.start(1)]
            rest = buffer[found.end(1):]
            return Split(parse_fields(head), _prepend(rest, stream))
        if len(buffer) > limit:
            raise HeaderTooLarge(f"header block larger than {limit} bytes")
        searched = len(buffer)
    if len(buffer) > limit:
        raise HeaderTooLarge(f"header block larger than {limit} bytes")
    return Split(parse_fields(buffer), iter(()))


def _prepend(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def parse_fields(head: bytes) -> list[list[bytes]]:
    """Header lines into [name, value] pairs, exactly as dkimpy's rfc822_parse."""
    lines = re.split(rb"\r?\n", head)
    if lines and lines[-1] == b"":
        lines.pop()
    fields: list[list[bytes]] = []
    for line in lines:
        if line[:1] in (b"\t", b" "):
            if not fields:
                raise MalformedHeader("the header block starts with a continuation line")
            fields[-1][1] += line + b"\r\n"
            continue
        match = _NAME.match(line)
        if match is not None:
            fields.append([match.group(1), line[match.end(0):] + b"\r\n"])
        elif not line.startswith(b"From "):
            raise MalformedHeader(f"not a header field: {line[:60]!r}")
    return fields


def raw_field(field: list[bytes]) -> bytes:
    """The field as it was sent, lines joined by CRLF and ending in CRLF."""
    return field[0] + b":" + field[1]


# --- body canonicalisation -----------------------------------------------------------------

class Sink(Protocol):
    def update(self, data: bytes, /) -> None: ...


class _LineStream:
    """Splits body chunks into lines (LF or CRLF) without holding a line whole: a long line is
    passed on in pieces. Subclasses say what each piece and each line end becomes."""

    def __init__(self) -> None:
        self._carry = b""  # a CR that may be the first half of a CRLF

    def feed(self, chunk: bytes) -> None:
        data = self._carry + chunk
        self._carry = b""
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            line = data[start:end]
            if line.endswith(b"\r"):
                line = line[:-1]
            self._piece(line)
            self._line_end(final=False)
            start = end + 1
        tail = data[start:]
        if tail.endswith(b"\r"):
            tail, self._carry = tail[:-1], b"\r"
        self._piece(tail)

    def finish(self) -> None:
        self._piece(self._carry)
        self._carry = b""
        self._line_end(final=True)

    def _piece(self, data: bytes) -> None:
        raise NotImplementedError

    def _line_end(self, final: bool) -> None:
        raise NotImplementedError


class DkimBody(_LineStream):
    """RFC 6376 body canonicalisation (simple or relaxed) fed to hash sinks, byte for byte
    what dkimpy's canonicalize_body gives, with the canonical length counted."""

    def __init__(self, relaxed: bool, sinks: list[Sink]) -> None:
        super().__init__()
        self.relaxed = relaxed
        self.sinks = sinks
        self.length = 0
        self._empty_lines = 0  # empty lines held back: dropped if nothing follows
        self._line_has_text = False
        self._any_text = False
        self._space = False  # relaxed: a whitespace run not yet written

    def _emit(self, data: bytes) -> None:
        if data:
            self.length += len(data)
            for sink in self.sinks:
                sink.update(data)

    def _text(self, data: bytes) -> None:
        if not self._line_has_text:
            self._line_has_text = self._any_text = True
            self._emit(b"\r\n" * self._empty_lines)
            self._empty_lines = 0
        self._emit(data)

    def _piece(self, data: bytes) -> None:
        if not data:
            return
        if not self.relaxed:
            self._text(data)
            return
        stripped = data.rstrip(b" \t")
        if not stripped:
            self._space = True
            return
        text = _WSP_RUN.sub(b" ", stripped)
        if self._space and text[:1] != b" ":
            text = b" " + text
        self._text(text)
        self._space = len(stripped) < len(data)

    def _line_end(self, final: bool) -> None:
        if self._space and final:
            self._text(b" ")  # dkimpy keeps a last line's trailing space (no CRLF after it)
        self._space = False
        if self._line_has_text:
            self._emit(b"\r\n")
        elif not final:
            self._empty_lines += 1
        self._line_has_text = False
        if final and not self._any_text and not self.relaxed:
            self._emit(b"\r\n")  # simple: an empty body is one CRLF


class LimitedSink:
    """Passes on only the first `limit` bytes (a signature's l= tag)."""

    def __init__(self, sink: Sink, limit: int) -> None:
        self.sink = sink
        self.left = limit

    def update(self, data: bytes, /) -> None:
        if self.left > 0:
            self.sink.update(data[: self.left])
            self.left -= min(len(data), self.left)


class DkBody(_LineStream):
    """RFC 4870 body canonicalisation (simple or nofws): every line with CRLF, trailing empty
    lines dropped, and the CRLF that separates body from header only when a line is left."""

    def __init__(self, nofws: bool, sink: Sink) -> None:
        super().__init__()
        self.nofws = nofws
        self.sink = sink
        self._empty_lines = 0
        self._line_has_text = False
        self._separated = False

    def _piece(self, data: bytes) -> None:
        if self.nofws:
            data = _DK_DELETE.sub(b"", data)
        if not data:
            return
        if not self._line_has_text:
            self._line_has_text = True
            if not self._separated:
                self.sink.update(b"\r\n")
                self._separated = True
            self.sink.update(b"\r\n" * self._empty_lines)
            self._empty_lines = 0
        self.sink.update(data)

    def _line_end(self, final: bool) -> None:
        if self._line_has_text:
            self.sink.update(b"\r\n")
        elif not final:
            self._empty_lines += 1
        self._line_has_text = False


def feed(body: Iterable[bytes], *consumers: _LineStream) -> None:
    """One pass over the body chunks into every canonicaliser."""
    for chunk in body:
        for consumer in consumers:
            consumer.feed(chunk)
    for consumer in consumers:
        consumer.finish()
