"""The DKIM-Signature field's syntax, as dkimpy 1.1 reads and writes it: the tag=value list
(RFC 6376 3.2), the checks of a signature's tags (each failure typed with qmail-dkim's
result letter), header canonicalisation (3.4.1, 3.4.2), the b= value blanked for hashing
(3.5), and folding at column 72.

Our signatures must equal dkimpy's byte for byte (the tests compare them with dkimpy's
own), so this follows its code, written here so that nothing depends on dkimpy's private
functions or on the wording of its errors. Called by filters.dkim; pure functions on bytes,
no keys, DNS or I/O.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence

from qmqpd.errors import PermanentError

SIGNATURE_ALGORITHMS = frozenset((b"rsa-sha1", b"rsa-sha256", b"ed25519-sha256"))
MANDATORY = (b"v", b"a", b"b", b"bh", b"d", b"h", b"s")
CLOCK_SLOP = 36000  # seconds of leeway for signers' clocks (dkimpy's 10 hours)

_TAG_NAME = re.compile(rb"[a-zA-Z]\w*")
_BASE64 = re.compile(rb"[\s0-9A-Za-z+/]+[\s=]*\Z")
_DOMAIN_SPECIALS = re.compile(rb"[()<>\[\]:;@\\,]")
_FWS = rb"(?:(?:\s*\r?\n)?\s+)?"
_B_VALUE = re.compile(rb"([;\s]b" + _FWS + rb"=)(?:" + _FWS + rb"[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")


class TagError(PermanentError, ValueError):
    """A signature whose tags cannot be checked; `letter` is qmail-dkim's result letter."""

    def __init__(self, letter: str, text: str) -> None:
        super().__init__(text)
        self.letter = letter


def _shown(value: bytes) -> str:
    return value[:60].decode("ascii", "replace")


def parse_tags(tag_list: bytes) -> dict[bytes, bytes]:
    """A `tag=value; ...` list (values stripped; a trailing `;` allowed). TagError H for a
    part without `=`, a bad tag name or a tag given twice."""
    tags: dict[bytes, bytes] = {}
    specs = tag_list.strip().split(b";")
    if not specs[-1]:
        specs.pop()
    for spec in specs:
        name, equals, value = spec.partition(b"=")
        name = name.strip()
        if not equals or _TAG_NAME.match(name) is None:
            raise TagError("H", f"invalid tag spec {_shown(spec)}")
        if name in tags:
            raise TagError("H", f"duplicate tag {_shown(name)}")
        tags[name] = value.strip()
    return tags


def check_signature(sig: dict[bytes, bytes], now: int | None = None) -> None:
    """RFC 6376 3.5's checks of a signature's tags, in dkimpy's order and with its limits.
    TagError: V for an unknown a=, K for an x= in the past, H for the rest."""
    for name in MANDATORY:
        if name not in sig:
            raise TagError("H", f"missing {name.decode()}=")
    if sig[b"a"] not in SIGNATURE_ALGORITHMS:
        raise TagError("V", f"unknown signature algorithm: {_shown(sig[b'a'])}")
    for name in (b"b", b"bh"):
        value = sig[name]
        if _BASE64.match(value) is None or len(re.sub(rb"\s+", b"", value)) % 4:
            raise TagError("H", f"{name.decode()}= value is not valid base64")
    if _DOMAIN_SPECIALS.search(sig[b"d"]) and sig[b"d"].isascii():
        raise TagError("H", f"d= value is not valid ({_shown(sig[b'd'])})")
    if b"i" in sig:
        identity, domain = sig[b"i"].lower(), sig[b"d"].lower()
        if not identity.endswith(domain) or identity[-len(domain) - 1:][:1] not in b"@.":
            raise TagError("H", "i= domain is not a subdomain of d=")
    if b"l" in sig and re.match(rb"\d{,76}\Z", sig[b"l"]) is None:
        raise TagError("H", "l= value is not a decimal integer")
    if b"q" in sig and sig[b"q"] != b"dns/txt":
        raise TagError("H", "q= value is not dns/txt")
    now = int(time.time()) if now is None else now
    signed = None
    if b"t" in sig:
        if re.match(rb"\d+\Z", sig[b"t"]) is None:
            raise TagError("H", "t= value is not a decimal integer")
        signed = int(sig[b"t"])
        if signed > now + CLOCK_SLOP:
            raise TagError("H", "t= value is in the future")
    if sig[b"v"] != b"1":
        raise TagError("H", "v= value is not 1")
    if b"x" in sig:
        if re.match(rb"\d+\Z", sig[b"x"]) is None:
            raise TagError("H", "x= value is not a decimal integer")
        expires = int(sig[b"x"])
        if expires < now - CLOCK_SLOP:
            raise TagError("K", "x= value is past")
        if signed and expires < signed:
            raise TagError("H", "x= value is less than t= value")


# --- canonicalisation of header fields ---------------------------------------------------

CANONICALISATIONS = (b"simple", b"relaxed")


def parse_c(value: bytes) -> tuple[bytes, bytes]:
    """(header, body) canonicalisation of a c= value (`simple` when one is left out)."""
    parts = value.split(b"/")
    if len(parts) == 1:
        parts.append(b"simple")
    if len(parts) != 2 or not all(part in CANONICALISATIONS for part in parts):
        raise TagError("H", f"invalid c= value: {_shown(value)}")
    return parts[0], parts[1]


def canonical_headers(kind: bytes, fields: Sequence[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
    """simple: as they are; relaxed: name lowercased, value unfolded, runs of WSP made one
    space, stripped, ended with CRLF."""
    if kind == b"simple":
        return [(name, value) for name, value in fields]
    return [(name.lower().rstrip(),
             re.sub(rb"[\t ]+", b" ", re.sub(rb"\r?\n", b"", value)).strip() + b"\r\n")
            for name, value in fields]


def blank_b(value: bytes) -> bytes:
    """The field value with the b= tag's value removed (what the signature covers)."""
    return _B_VALUE.sub(b"\\1", value)


def fold(header: bytes, namelen: int = 0, linesep: bytes = b"\r\n") -> bytes:
    """Fold at column 72 at spaces (long words are cut), the first line shorter by the
    field name's length: dkimpy's fold, so the signature field is laid out as it lays it."""
    maxlen = 72 - namelen
    if len(header) <= maxlen:
        return header
    if len(header) - header.rfind(b"\r\n") == 2 and len(header) <= maxlen + 2:
        return header
    at = header.rfind(b"\r\n ")
    if at == -1:
        pre = b""
    else:
        at += 3
        pre, header = header[:at], header[at:]
    while len(header) > maxlen:
        at = header[:maxlen].rfind(b" ")
        if at == -1:
            pre += header[:maxlen] + linesep + b" "
            header = header[maxlen:]
        else:
            pre += header[:at] + linesep + b" "
            header = header[at + 1:]
        maxlen = 71
    return pre + header
