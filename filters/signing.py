"""What the DomainKeys and DKIM stages share: the message's header block parsed once, and
the Authentication-Results header (RFC 8601) with its values checked and quoted.

Called by filters.dk and filters.dkim only. It never touches sockets, queues or the
stages' own cryptography.

Values copied from a client's signature (d=, s=, b=, a reason that quotes it) reach our
Authentication-Results header only as an RFC 2045 token or as a quoted-string, so no value
can close a result and start another. An incoming Authentication-Results header that claims
our authserv-id is removed before ours is added (RFC 8601 section 5): downstream it would
read as our own verdict.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

from qmqpd.filters import mailstream
from qmqpd.message import Message, MessageData

RESULTS_HEADER = b"Authentication-Results"
# Copied values are cut to this many characters: a signature's tags are client data, and
# one header line must stay well under the 998 octets RFC 5322 allows.
VALUE_LIMIT = 200

# --- the header block, parsed once per message --------------------------------------------


class _Parsed:
    """The client's header block (mailstream.split of the message data), and where its
    body starts. The header lines filter stages add above it are parsed per use: they are
    a few short fields."""

    __slots__ = ("body_start", "error", "fields", "head_end", "lead")

    def __init__(self, data: MessageData) -> None:
        self.error: mailstream.MalformedHeader | None = None
        self.fields: list[list[bytes]] = []
        self.lead = b""  # continuation lines at the very top: they extend the field above
        self.head_end = self.body_start = 0
        try:
            found = mailstream.split(data.chunks(), orphan_lines=True)
        except mailstream.MalformedHeader as error:
            self.error = error
            return
        self.fields, self.lead = found.fields, found.lead
        self.head_end, self.body_start = found.head_end, found.body_start


# Keyed by the data object: a stage that replaces or edits the data drops the entry.
_PARSED: weakref.WeakKeyDictionary[MessageData, _Parsed] = weakref.WeakKeyDictionary()


def _parsed(message: Message) -> _Parsed:
    found = _PARSED.get(message.data)
    if found is None:
        found = _PARSED[message.data] = _Parsed(message.data)
    return found


def header_view(message: Message) -> mailstream.Split:
    """The final message (stage headers, Received line, client data) as mailstream.split
    would see it, with the client's header block parsed once per message. The body is a
    fresh stream on each call. Raises MalformedHeader."""
    parsed = _parsed(message)
    if parsed.error is not None:
        raise parsed.error
    head = message.head
    fields = mailstream.parse_fields(head) if head else []
    if parsed.lead:
        if not fields:
            raise mailstream.MalformedHeader(
                "the header block starts with a continuation line")
        fields[-1] = [fields[-1][0], fields[-1][1] + parsed.lead]
    return mailstream.Split(fields + parsed.fields,
                            _skip(message.data.chunks(), parsed.body_start))


def _skip(chunks: Iterator[bytes], count: int) -> Iterator[bytes]:
    for chunk in chunks:
        if count >= len(chunk):
            count -= len(chunk)
            continue
        yield chunk[count:] if count else chunk
        count = 0


# --- Authentication-Results ----------------------------------------------------------------

_TSPECIALS = frozenset('()<>@,;:\\"/[]?=')


def is_token(text: str) -> bool:
    """An RFC 2045 token: printable ASCII without space or tspecials."""
    return bool(text) and all(33 <= ord(ch) < 127 and ch not in _TSPECIALS for ch in text)


def quoted_string(text: str, limit: int = VALUE_LIMIT) -> str:
    """text as an RFC 5322 quoted-string, cut to `limit` characters first: `\\` escaped,
    whitespace controls made spaces, other controls and non-ASCII made `?`, and `"` made
    `'` — parsers that ignore quoted-pairs (Mail::AuthenticationResults among them) would
    end the string at an escaped quote and read the client's rest as results."""
    clean = []
    for ch in text[:limit]:
        if ch in "\t\r\n":
            clean.append(" ")
        elif not 32 <= ord(ch) < 127:
            clean.append("?")
        elif ch == '"':
            clean.append("'")
        elif ch == "\\":
            clean.append("\\\\")
        else:
            clean.append(ch)
    return '"' + "".join(clean) + '"'


def value(text: str) -> str:
    """An RFC 2045 value: the token itself when it is one, else a quoted-string."""
    return text if is_token(text) and len(text) <= VALUE_LIMIT else quoted_string(text)


def resinfo(method: str, result: str, reason: str | None = None,
            properties: Sequence[tuple[str, str]] = ()) -> str:
    """One `method=result [reason=...] [ptype.property=value ...]`; method and result are
    ours (fixed words), reason and property values may come from the client."""
    text = f"{method}={result}"
    if reason is not None:
        text += f" reason={quoted_string(reason, 120)}"
    for name, found in properties:
        text += f" {name}={value(found)}"
    return text


def results_header(authserv_id: str, resinfos: Sequence[str]) -> bytes:
    """The `Authentication-Results:` header (LF line ends), one result per line."""
    return (f"{RESULTS_HEADER.decode()}: {value(authserv_id)};\n\t"
            + ";\n\t".join(resinfos) + "\n").encode()


def _skip_cfws(text: str, at: int) -> int:
    """The index after any folding white space and (nested) comments from `at`."""
    depth = 0
    while at < len(text):
        ch = text[at]
        if depth:
            if ch == "\\":
                at += 1
            elif ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
        elif ch == "(":
            depth = 1
        elif ch not in " \t\r\n":
            break
        at += 1
    return at


def authserv_id_of(payload: bytes) -> str | None:
    """The authserv-id an Authentication-Results value claims: a token or a quoted-string
    after optional CFWS (a quoted-string left open counts up to the end). None if absent."""
    text = payload.decode("latin-1")
    at = _skip_cfws(text, 0)
    if text[at:at + 1] == '"':
        found = []
        at += 1
        while at < len(text) and text[at] != '"':
            if text[at] == "\\" and at + 1 < len(text):
                at += 1
            if text[at] not in "\r\n":
                found.append(text[at])
            at += 1
        return "".join(found).strip()
    end = at
    while end < len(text) and is_token(text[end]):
        end += 1
    return text[at:end] or None


def claims(payload: bytes, authserv_id: str) -> bool:
    found = authserv_id_of(payload)
    return found is not None and found.lower() == authserv_id.lower()


def drop_claimed_results(message: Message, authserv_id: str) -> int:
    """Remove every Authentication-Results field of the client's header block that claims
    authserv_id (RFC 8601 section 5); the number removed. The rest of the data, line ends
    included, stays byte for byte as sent."""
    parsed = _parsed(message)
    if parsed.error is not None or not any(
            name.lower() == b"authentication-results" and claims(payload, authserv_id)
            for name, payload in parsed.fields):
        return 0
    head = b""
    for chunk in message.data.chunks():
        head += chunk
        if len(head) >= parsed.head_end:
            break
    kept, dropped = [], 0
    for field in _raw_fields(head[:parsed.head_end]):
        name, colon, payload = field.partition(b":")
        if colon and name.lower() == b"authentication-results" and claims(
                payload, authserv_id):
            dropped += 1
        else:
            kept.append(field)
    message.data.replace_prefix(parsed.head_end, b"".join(kept))
    _PARSED.pop(message.data, None)
    return dropped


def _raw_fields(head: bytes) -> Iterator[bytes]:
    """The header block as sent, one field (with its continuation lines) at a time."""
    field = b""
    start = 0
    while start < len(head):
        end = head.find(b"\n", start)
        end = len(head) if end < 0 else end + 1
        line, start = head[start:end], end
        if line[:1] in (b" ", b"\t") or not field:
            field += line
            continue
        yield field
        field = line
    if field:
        yield field
