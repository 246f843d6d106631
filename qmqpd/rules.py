"""Client access rules: tcprules text to cdb, and tcpserver's lookup.

The text format and the cdb are those of ucspi-tcp's ``tcprules``: a cdb written here is
read the same way by ``tcprulescheck``/``tcpserver``, and a cdb written by ``tcprules``
works here unchanged.

Text format, one rule per line::

    address:allow|deny[,VAR="value"][,!VAR]...

* ``#`` at the very start of a line makes a comment; trailing blanks and tabs are
  dropped; blank lines are skipped.
* The quote around a value is any character repeated at its end: ``X=/v/``.
* ``1.2.3.37-53`` expands to one key per address, ``10.2-3.`` to ``10.2.`` and ``10.3.``
  (the first ``-`` of an address without ``=`` or ``@``; the upper bound is cut at 255).
* Addresses: ``1.2.3.4``, prefixes ending in a dot (``10.``), ``=host``, ``=.suffix``,
  ``=``, ``info@ip``, ``info@=host``, and the empty address (the default rule).

Compiled data, byte for byte as ``tcprules`` writes it: nothing for ``allow``, ``D\\0`` for
``deny``, then ``+VAR=value\\0`` for each assignment and ``-VAR\\0`` for each unset.

Beyond Debian's ucspi-tcp 0.88 (which knows neither IPv6 nor CIDR), as IndiMail's fork and
ucspi-tcp6 do:

* ``,!VAR`` unsets a variable (``-VAR\\0``); Debian's tcprules rejects it.
* IPv6: the colon ending the address is the first one followed by ``allow`` or ``deny``.
  IPv6 addresses (also after ``info@``) are stored in the fully expanded form tcpserver
  looks up first (``2001:0DB8:0000:...``, upper case); an invalid one is an error.
* CIDR: ``10.0.0.0/8`` becomes a ``_`` key, ``2001:db8::/32`` a ``^`` key, in the bit
  string encoding tcpserver's lookup uses (IPv4: bit *k* set is the *k*-th letter of
  ``a..z1..6``; IPv6: the *n*-th set bit is the byte 96+n; a clear bit is ``0``).
  Debian's tcprules stores such a line literally and it never matches there. Prefix
  lengths are 1-32 and 1-128 (IndiMail's tcpserver never tries a /1 key).

Stricter than tcprules, on purpose: a non-blank line without ``:allow``/``:deny`` after
the address, a range that expands to no address (``1.2.3.9-5``), and a NUL character are
errors (Debian's tcprules silently writes nothing for the first two).

Lookup order (tcpserver's ``rules.c``; the first key found wins): ``info@ip``,
``info@=host``, the expanded IPv6 address, the address as given, ``=host``, IPv4 prefixes
ending in a dot (longest first), CIDR keys (longest first), ``=.suffix`` keys (longest
first), ``=``, then the empty key. No key at all means allow with no env. An IPv4-mapped
client (``::ffff:a.b.c.d``) is looked up as ``a.b.c.d``. A rule's ``MAXPERIP`` arrives
in its env like any other variable; the master reads it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import stat
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import cdbx

from qmqpd import fsio
from qmqpd.address import parse_ip
from qmqpd.errors import PermanentError
from qmqpd.message import decode_env_item

_IPV4_BIT_LETTERS = b"abcdefghijklmnopqrstuvwxyz123456"
_TRAILING_BLANKS = " \t\n"
_ULONG = 2**64
_HEADER_SIZE = 2048


class RulesError(PermanentError, ValueError):
    """A rules file that cannot be compiled or a cdb that cannot be used (exit 100, as
    tcprules exits for bad input)."""


@dataclass(frozen=True)
class Rule:
    """The decision for one client: allow or deny, plus the env the rule sets.

    env maps a name to its value, or to None for ``!VAR`` (unset). key is the cdb key
    that matched (None: no rule matched). reason says why no cdb was consulted.
    """

    allow: bool
    env: Mapping[str, str | None] = field(default_factory=dict)
    key: str | None = None
    reason: str = ""


# ---------------------------------------------------------------------------- text


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class _LineError(PermanentError):
    """A problem in one line; parse_text adds the file name and line number."""


def _split_rule(line: str) -> tuple[str, str]:
    """Address and instructions: the first colon followed by allow or deny separates them."""
    start = 0
    while (colon := line.find(":", start)) != -1:
        if line.startswith(("allow", "deny"), colon + 1):
            return line[:colon], line[colon + 1:]
        start = colon + 1
    if ":" not in line:
        raise _LineError("no colon: expected address:allow or address:deny")
    raise _LineError("instructions must start with allow or deny")


def _assignment(item: str) -> tuple[bytes, int]:
    """One ``,VAR=qvalueq`` or ``,!VAR`` item at the start of item: (data, length used)."""
    next_comma = item.find(",", 1)
    equals = item.find("=")
    if item.startswith(",!") and (equals == -1 or -1 < next_comma < equals):
        end = len(item) if next_comma == -1 else next_comma
        name = item[2:end]
        if not name:
            raise _LineError("',!' needs a variable name")
        return b"-" + _encode(name) + b"\0", end
    if equals == -1:
        raise _LineError(f"expected VAR=\"value\" or !VAR in {item!r}")
    if equals + 1 >= len(item):
        raise _LineError(f"no quoted value after '=' in {item!r}")
    quote = item[equals + 1]
    close = item.find(quote, equals + 2)
    if close == -1:
        raise _LineError(f"value not closed by {quote!r} in {item!r}")
    name, value = item[1:equals], item[equals + 2:close]
    return b"+" + _encode(name) + b"=" + _encode(value) + b"\0", close + 1


def _instructions(text: str) -> bytes:
    if text.startswith("deny"):
        data, rest = b"D\0", text[4:]
    else:
        data, rest = b"", text[5:]
    while rest:
        if not rest.startswith(","):
            raise _LineError(f"expected ',' before {rest!r}")
        item, used = _assignment(rest)
        data += item
        rest = rest[used:]
    return data


def _scan_ulong(digits: str) -> int:
    """The number in an all-digit string (empty = 0), wrapped like C's unsigned long."""
    if digits and not (digits.isascii() and digits.isdigit()):
        raise _LineError(f"range bound {digits!r} is not a number")
    return int(digits or "0") % _ULONG


def _expand_range(address: str, dash: int) -> list[str]:
    """tcprules' ``a.b.c.x-y`` and ``a.x-y.`` abbreviations: one address per number."""
    left = address.rfind(".", 0, dash) + 1
    right = address.find(".", dash + 1)
    right = len(address) if right == -1 else right
    bottom = _scan_ulong(address[left:dash])
    top = min(_scan_ulong(address[dash + 1:right]), 255)
    if bottom > top:
        raise _LineError(f"range {address[left:right]!r} contains no number 0-255")
    return [address[:left] + str(n) + address[right:] for n in range(bottom, top + 1)]


def expand_ipv6(address: str) -> str:
    """IndiMail's expanded IPv6 form: eight groups of four upper-case hex digits."""
    return ipaddress.IPv6Address(address).exploded.upper()


def _ipv6_key(address: str) -> bytes:
    try:
        return _encode(expand_ipv6(address))
    except ValueError:
        raise _LineError(f"invalid IPv6 address {address!r}") from None


def _ipv4_bits(value: int, length: int) -> bytes:
    return bytes(
        _IPV4_BIT_LETTERS[k] if value >> (31 - k) & 1 else ord("0") for k in range(length)
    )


def _ipv6_bits(value: int, length: int) -> bytes:
    out = bytearray()
    ones = 0
    for k in range(length):
        if value >> (127 - k) & 1:
            out.append((96 + ones) % 256)
            ones += 1
        else:
            out.append(ord("0"))
    return bytes(out)


def _prefix_length(text: str, most: int) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= most:
        raise _LineError(f"prefix length {text!r} must be 1-{most}")
    return int(text)


def _ipv4_cidr_key(address: str) -> bytes:
    network, _, length_text = address.partition("/")
    length = _prefix_length(length_text, 32)
    octets = network.split(".")
    if network.endswith(".") and len(octets) > 1:
        octets.pop()  # "127./8" as well as "127/8"
    if len(octets) > 4 or not all(o.isascii() and o.isdigit() and int(o) < 256 for o in octets):
        raise _LineError(f"invalid IPv4 network {network!r}")
    if len(octets) * 8 < length:
        raise _LineError(f"{network!r} has fewer than {length} bits")
    value = int.from_bytes(bytes(int(o) for o in octets + ["0"] * (4 - len(octets))), "big")
    return b"_" + _ipv4_bits(value, length)


def _ipv6_cidr_key(address: str) -> bytes:
    network, _, length_text = address.partition("/")
    length = _prefix_length(length_text, 128)
    try:
        value = int(ipaddress.IPv6Address(network))
    except ValueError:
        raise _LineError(f"invalid IPv6 network {network!r}") from None
    return b"^" + _ipv6_bits(value, length)


def _address_keys(address: str) -> list[bytes]:
    """The cdb keys one rule address stands for."""
    if "=" in address:
        return [_encode(address)]
    if "@" in address:
        info, _, ip = address.partition("@")
        if ":" in ip and "/" not in ip:
            return [_encode(info + "@") + _ipv6_key(ip)]
        return [_encode(address)]
    if ":" in address:
        return [_ipv6_cidr_key(address) if "/" in address else _ipv6_key(address)]
    if "/" in address:
        return [_ipv4_cidr_key(address)]
    if "-" in address:
        return [_encode(key) for key in _expand_range(address, address.index("-"))]
    return [_encode(address)]


def _parse_line(line: str) -> list[tuple[bytes, bytes]]:
    if "\0" in line:
        raise _LineError("NUL character")
    address, instructions = _split_rule(line)
    data = _instructions(instructions)
    return [(key, data) for key in _address_keys(address)]


def parse_text(text: str, source: str = "tcp.qmqp") -> list[tuple[bytes, bytes]]:
    """Rules text to (key, data) records in file order, as tcprules would add them.

    Raises RulesError naming source, line number and the problem for a bad line.
    """
    records: list[tuple[bytes, bytes]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        if raw.startswith("#"):
            continue
        line = raw.rstrip(_TRAILING_BLANKS)
        if not line:
            continue
        try:
            records.extend(_parse_line(line))
        except _LineError as problem:
            raise RulesError(f"{source}:{number}: {problem}: {line!r}") from None
    return records


# ----------------------------------------------------------------------------- cdb


def write_cdb(records: list[tuple[bytes, bytes]], cdb_path: str) -> None:
    """Write records to a temp file beside cdb_path, fsync, and rename it over cdb_path."""
    # 0644: readable after the server drops privileges
    with fsio.atomic_file(cdb_path, 0o644, sync=True) as out:
        maker = cdbx.CDB.make(out)
        for key, data in records:
            maker.add(key, data)
        maker.commit().close()
    fsio.fsync_dir(os.path.dirname(os.path.abspath(cdb_path)))


def compile_rules(text_path: str, cdb_path: str) -> int:
    """Compile a rules text file to cdb_path atomically; returns the number of keys."""
    with open(text_path, "rb") as source:
        text = _decode(source.read())
    records = parse_text(text, text_path)
    write_cdb(records, cdb_path)
    return len(records)


def _looks_like_text(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(2048)
    except OSError:
        return False
    return b"\0" not in head


def _open_cdb(path: str) -> tuple[cdbx.CDB, tuple[int, int, int, int], frozenset[int]]:
    """Open and read through the cdb; returns it, the file's identity and its CIDR lengths.

    Reading every key once finds a file that is not a cdb before any client is judged by
    it, and tells lookups which CIDR prefix lengths exist.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RulesError(f"{path}: not a regular file")
        db, lengths = _read_cdb(fd, info.st_size)
    except OSError as error:
        os.close(fd)
        if _looks_like_text(path):
            raise RulesError(
                f"{path} is a rules text file, not a cdb; compile it first: "
                f"qmqpd rules compile {path} {path}.cdb"
            ) from None
        raise RulesError(f"{path}: not a cdb ({error})") from None
    except BaseException:
        os.close(fd)
        raise
    return db, _identity(info), lengths


def _read_cdb(fd: int, size: int) -> tuple[cdbx.CDB, frozenset[int]]:
    if not _valid_header(os.pread(fd, _HEADER_SIZE, 0), size):
        raise OSError("Format Error")
    db = cdbx.CDB(os.dup(fd), close=True)
    try:
        lengths = frozenset(len(key) for key in db if key[:1] in (b"_", b"^"))
    except BaseException:
        db.close()
        raise
    os.close(fd)
    return db, lengths


def _valid_header(header: bytes, size: int) -> bool:
    """Every one of the 256 hash tables the header names lies inside the file."""
    if len(header) < _HEADER_SIZE:
        return False
    for table in range(256):
        position, slots = struct.unpack_from("<II", header, table * 8)
        if position < _HEADER_SIZE or position + 8 * slots > size:
            return False
    return True


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)


# -------------------------------------------------------------------------- lookup


@dataclass(frozen=True)
class _Client:
    ip: str
    ipv6: bool
    expanded: str | None  # valid IPv6 only
    bits: bytes | None  # "_"/"^" plus the full bit string, None if ip is not an address


# The master looks up the same few client addresses over and over: their parsed forms
# (immutable) are remembered, bounded, instead of parsed and bit-expanded every time.
CLIENT_CACHE = 4096


@functools.lru_cache(maxsize=CLIENT_CACHE)
def _client(ip: str) -> _Client:
    """The forms of the client address the lookup needs; v4-mapped becomes dotted IPv4."""
    ip = ip.strip()
    if ":" in ip:
        address = parse_ip(ip)  # with a colon: IPv6, or the IPv4 it maps
        if address is None:
            return _Client(ip, True, None, None)
        if isinstance(address, ipaddress.IPv6Address):
            bits = b"^" + _ipv6_bits(int(address), 128)
            return _Client(address.compressed, True, expand_ipv6(str(address)), bits)
        ip = str(address)
    try:
        value = int(ipaddress.IPv4Address(ip))
    except ValueError:
        return _Client(ip, False, None, None)
    return _Client(ip, False, None, b"_" + _ipv4_bits(value, 32))


def candidate_keys(
    ip: str, host: str = "", info: str = "", cidr_lengths: frozenset[int] | None = None
) -> Iterator[str]:
    """Every key tcpserver tries for this client, in its order (empty host/info = unset).

    cidr_lengths, when given, limits the CIDR keys to those lengths (the ones the cdb has).
    """
    client = _client(ip)
    ip_form = client.expanded or client.ip
    if info:
        yield f"{info}@{ip_form}"
        if host:
            yield f"{info}@={host}"
    if client.expanded:
        yield client.expanded
    yield client.ip
    if host:
        yield f"={host}"
    if not client.ipv6:
        for end in range(len(client.ip), 0, -1):
            if client.ip[end - 1] == ".":
                yield client.ip[:end]
    if client.bits is not None:
        for size in range(len(client.bits), 1, -1):
            if cidr_lengths is None or size in cidr_lengths:
                yield _decode(client.bits[:size])
    if host:
        for position, char in enumerate(host):
            if char == ".":
                yield "=" + host[position:]
        yield "="
    yield ""


def _find(
    db: cdbx.CDB, ip: str, host: str, info: str, cidr_lengths: frozenset[int] | None = None
) -> tuple[str, bytes] | None:
    for key in candidate_keys(ip, host, info, cidr_lengths):
        data = db.get(_encode(key))
        if data is not None:
            return key, data
    return None


def _items(data: bytes) -> Iterator[bytes]:
    """The NUL-terminated items of a rule's data; an unterminated tail is ignored."""
    *complete, _tail = data.split(b"\0")
    yield from complete


def rule_from_data(key: str, data: bytes) -> Rule:
    """Decode a rule's data the way tcpserver does: items in order, ``D`` ends it."""
    env: dict[str, str | None] = {}
    for item in _items(data):
        if item.startswith(b"D"):
            return Rule(False, env, key)
        decoded = decode_env_item(_decode(item))
        if decoded is not None:
            env[decoded[0]] = decoded[1]
    return Rule(True, env, key)


def describe(key: str | None, data: bytes) -> str:
    """tcprulescheck's report for a found rule (key None = no rule matched)."""
    if key is None:
        return "default:\nallow connection\n"
    lines = [f"rule {key}:"]
    for item in _items(data):
        if item.startswith(b"D"):
            lines.append("deny connection")
            return "\n".join(lines) + "\n"
        if item.startswith(b"+"):
            lines.append("set environment variable " + _decode(item[1:]))
        elif item.startswith(b"-"):
            lines.append("unset environment variable " + _decode(item[1:]))
    lines.append("allow connection")
    return "\n".join(lines) + "\n"


def check(path: str, ip: str, host: str = "", info: str = "") -> str:
    """What tcprulescheck prints for this client under the cdb at path.

    Raises RulesError (or OSError) when the cdb cannot be read, as tcprulescheck exits 111.
    """
    db, _, lengths = _open_cdb(path)
    try:
        found = _find(db, ip, host, info, lengths)
    finally:
        db.close()
    return describe(None, b"") if found is None else describe(*found)


def is_loopback(ip: str) -> bool:
    address = parse_ip(ip.strip())
    return address is not None and address.is_loopback


NO_RULES_REASON = "no rules configured: only loopback clients are allowed"
# Client addresses whose rule a RuleTable remembers at once.
RULE_CACHE = 4096


class RuleTable:
    """Lookups in one rules cdb, reopened when the file changes (tcprules' atomic rename).

    path None means no rules configured: loopback clients are allowed, all others denied.
    A cdb that cannot be read denies every client, with the reason in Rule.reason; the
    optional report callback hears each new such reason once.
    """

    def __init__(self, path: str | None, report: Callable[[str], None] | None = None) -> None:
        self.path = path
        self._report = report
        self._db: cdbx.CDB | None = None
        self._identity: tuple[int, int, int, int] | None = None
        self._cidr_lengths: frozenset[int] = frozenset()
        self._error = ""
        # The rule found per client address in the open cdb: the master looks up the same
        # few addresses over and over, and a cdb never changes while open (a new file is a
        # reopen, which forgets them). Bounded by RULE_CACHE. A remembered Rule is shared:
        # callers read its env, never change it.
        self._found: dict[str, Rule] = {}
        if path is not None:
            self._refresh()
            if self._error and _looks_like_text(path):
                raise RulesError(self._error)

    def lookup(self, ip: str, host: str = "", info: str = "", refresh: bool = True) -> Rule:
        """refresh=False: the caller stats the file itself (`refresh()`), e.g. once per
        loop turn instead of once per lookup."""
        if self.path is None:
            return Rule(is_loopback(ip), {}, None, NO_RULES_REASON)
        if refresh:
            self._refresh()
        if self._db is None:
            return Rule(False, {}, None, self._error)
        if host or info:
            return self._read(ip, host, info)
        rule = self._found.get(ip)
        if rule is None:
            rule = self._read(ip, "", "")
            if self._db is not None:  # read without error
                if len(self._found) >= RULE_CACHE:
                    self._found.clear()
                self._found[ip] = rule
        return rule

    def _read(self, ip: str, host: str, info: str) -> Rule:
        assert self._db is not None
        try:
            found = _find(self._db, ip, host, info, self._cidr_lengths)
        except OSError as error:  # a cdb damaged in place, not replaced by rename
            self._fail(f"unable to read {self.path}: {error}")
            return Rule(False, {}, None, self._error)
        return Rule(True, {}, None) if found is None else rule_from_data(*found)

    def refresh(self) -> bool:
        """Reopen the file if it was replaced (one stat); True when it was."""
        if self.path is None:
            return False
        before = self._identity
        self._refresh()
        return self._identity != before

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db = None
        self._identity = None
        self._found.clear()

    def _refresh(self) -> None:
        """Reopen when the file's identity changed; one stat per lookup when it did not."""
        assert self.path is not None
        try:
            current = _identity(os.stat(self.path))
        except OSError as error:
            self._fail(f"unable to read {self.path}: {error.strerror}")
            return
        if current == self._identity and self._db is not None:
            return
        try:
            db, identity, lengths = _open_cdb(self.path)
        except RulesError as error:
            self._fail(str(error))
            return
        except OSError as error:
            self._fail(f"unable to read {self.path}: {error.strerror or error}")
            return
        self.close()
        self._db, self._identity, self._error = db, identity, ""
        self._cidr_lengths = lengths

    def _fail(self, reason: str) -> None:
        self.close()
        if reason != self._error and self._report is not None:
            self._report(reason)
        self._error = reason

    def __enter__(self) -> RuleTable:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def rule_envs(path: str) -> list[tuple[str, dict[str, str | None]]]:
    """(key, env) of every allowing rule in the cdb, in file order, for checking each
    rule's settings before any client meets it. Raises RulesError when it is unreadable."""
    try:
        db, _, _ = _open_cdb(path)
    except OSError as error:
        raise RulesError(f"unable to read {path}: {error.strerror or error}") from None
    try:
        found = []
        for key, data in db.items():
            rule = rule_from_data(_decode(key), data)
            if rule.allow:
                found.append((rule.key or "", dict(rule.env)))
        return found
    finally:
        db.close()
