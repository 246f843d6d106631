"""What the DomainKeys and DKIM stages share: the flow of one message (verify, then sign),
option parsing, key choice with IndiMail's `%` rules, the private-key operation, the
result letters' answers, the message's header block parsed once, and the
Authentication-Results header (RFC 8601) with its values checked and quoted.

filters.dk and filters.dkim subclass SigningStage and say only how they verify and what
they sign; filters.pipeline asks a stage for its problems through `check()`. It never
touches sockets or queues.

Values copied from a client's signature (d=, s=, b=, a reason that quotes it) reach our
Authentication-Results header only as an RFC 2045 token or as a quoted-string, so no value
can close a result and start another. An incoming Authentication-Results header that claims
our authserv-id is removed before ours is added (RFC 8601 section 5): downstream it would
read as our own verdict.
"""

from __future__ import annotations

import getopt
import glob
import os
import shlex
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, utils

from qmqpd import log
from qmqpd.config import Config, ConfigError, problem
from qmqpd.filters import keys, mailstream
from qmqpd.filters.base import Verdict
from qmqpd.message import Message, MessageData, Reply

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
    current = b""
    start = 0
    while start < len(head):
        end = head.find(b"\n", start)
        end = len(head) if end < 0 else end + 1
        line, start = head[start:end], end
        if line[:1] in (b" ", b"\t") or not current:
            current += line
            continue
        yield current
        current = line
    if current:
        yield current


# --- options -------------------------------------------------------------------------------


class OptionError(ConfigError):
    """A signing option that cannot be used; `setting` names it, `reason` says why."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}", setting)
        self.reason = reason


def named(config: Config, error: OptionError) -> ConfigError:
    """The option error as a validation problem naming where the setting came from."""
    return problem(error.setting, config.source(error.setting), error.reason)


def options(text: str, letters: str, setting: str) -> list[tuple[str, str]]:
    """qmail-dk/qmail-dkim style getopt flags of a *SIGNOPTIONS setting: (flag, value)."""
    try:
        pairs, rest = getopt.getopt(shlex.split(text), letters)
    except (getopt.GetoptError, ValueError) as error:
        raise OptionError(setting, str(error)) from None
    if rest:
        raise OptionError(setting, f"unexpected {' '.join(rest)!r}")
    return pairs


# --- keys ----------------------------------------------------------------------------------


class KeySpec(NamedTuple):
    """One key a stage signs with: its path pattern (`%` = the signing domain), the setting
    that named it, the stage's options for its signatures, and a domain table (IndiMail's
    dkimkeys: `domain:keypath`) that may name another pattern per domain."""

    pattern: str
    setting: str
    options: object = None
    table: str = ""


class SigningKey(NamedTuple):
    key: keys.PrivateKey
    selector: str
    path: str
    spec: KeySpec


def choose_key(spec: KeySpec, domain: str, controldir: str) -> SigningKey | None:
    """The key for domain, or None: sign nothing (a `%` pattern with no file). Raises
    KeyProblem for a key the operator must fix."""
    pattern = spec.pattern
    if spec.table:
        pattern = keys.domain_key_table(keys.under(controldir, spec.table)).get(domain, pattern)
    found = keys.resolve_key(pattern, domain, controldir)
    if found is None:
        return None
    return SigningKey(keys.load_private_key(found.path), found.selector, found.path, spec)


def key_problem(pattern: str, controldir: str, rsa_only: bool) -> str | None:
    """Why the key at pattern cannot sign, or None. A `%` pattern depends on the sender's
    domain (and a missing file then means "do not sign"), so it is checked per message.
    Loading the key here leaves it parsed in this process (keys' cache)."""
    if "%" in pattern:
        return None
    try:
        found = keys.resolve_key(pattern, "", controldir)
        assert found is not None  # without % a missing file raises KeyMissing
        key = keys.load_private_key(found.path)
    except keys.KeyMissing as error:
        return f"key file {error} does not exist"
    except (keys.KeyUnreadable, keys.KeyUnparsable) as error:
        return f"key file {error}"
    if rsa_only and keys.key_kind(key) != "rsa":
        return f"key file {found.path}: DomainKeys needs an RSA key"
    return None


def domain_key_problems(pattern: str, controldir: str) -> list[str]:
    """Why each key file that exists under a `%` pattern cannot be loaded, if it cannot."""
    where = glob.escape(keys.under(controldir, pattern)).replace("%", "*")
    found = []
    for path in sorted(glob.glob(where)):
        if os.path.isdir(path):
            continue
        try:
            keys.load_private_key(path)
        except keys.KeyProblem as error:
            found.append(f"key file {error}: mail of that domain would get Z until it is "
                         "fixed")
    return found


def sign_digest(key: keys.PrivateKey, digest: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    """The signature of a finished digest: Ed25519 over the digest bytes (RFC 8463), RSA
    PKCS#1 v1.5 with the digest as prehashed. Both deterministic, so equal to dkimpy's."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(digest)
    return key.sign(digest, padding.PKCS1v15(), utils.Prehashed(algorithm))


# --- one message through a signing stage ---------------------------------------------------


class Checked(NamedTuple):
    """A verification's outcome: the result letter, its text, our Authentication-Results."""

    letter: str
    text: str
    header: bytes


@dataclass
class SigningStage:
    """Verification (when `verify_letters` is set) then signing (with `keys`).

    Policy, the same for DomainKeys and DKIM:
    - an incoming Authentication-Results that claims our authserv-id is removed before
      verifying; the result letters listed in verify_letters refuse the message
      (uppercase D, lowercase Z), any other result adds our Authentication-Results;
    - a key that is missing (path without `%`), unreadable or unusable is the operator's to
      fix: Z (`unable to read private key` / `unable to use private key`, #4.3.0), and the
      client retries once it is fixed;
    - a header block that cannot be parsed (or is over mailstream.HEADER_LIMIT) cannot be
      signed as it is, now or later: D (`message header is malformed, cannot sign`,
      #5.6.0); when only verifying it is a syntax result letter and the letters decide;
    - no key for the domain under a `%` pattern, or a Sender/From domain that is not a
      hostname: queued unsigned, with a log line (IndiMail's rule);
    - no From: or Sender: header: Z (#4.1.7), as qmail-dkim answers.
    """

    name: str = ""
    signs: Sequence[KeySpec] = ()
    verify_letters: str | None = None
    controldir: str = keys.DEFAULT_CONTROLDIR
    lookup: keys.TxtLookup | None = None
    authserv_id: str = ""
    # DKIM's signatures go above our results, DomainKeys' below them.
    signatures_first: ClassVar[bool] = False
    rsa_only: ClassVar[bool] = False  # DomainKeys signs with RSA only

    def verify(self, message: Message, facts: dict[str, object]) -> Checked:
        raise NotImplementedError

    def sign(self, view: mailstream.Split, domain: str, found: list[SigningKey],
             facts: dict[str, object]) -> list[bytes]:
        raise NotImplementedError

    def check(self) -> list[tuple[str, str]]:
        """(setting, reason) for each key named without `%` that cannot sign, and for each
        key that exists under a `%` path and cannot be used by this process (the service's
        user): that domain's mail would get Z for as long as it lasts."""
        found = []
        for spec in self.signs:
            reasons = (domain_key_problems(spec.pattern, self.controldir) if "%" in spec.pattern
                       else [key_problem(spec.pattern, self.controldir, self.rsa_only)])
            found += [(spec.setting, reason) for reason in reasons if reason is not None]
        return found

    def process(self, message: Message) -> Verdict:
        added: list[bytes] = []
        facts: dict[str, object] = {}
        if self.verify_letters is not None:
            removed = drop_claimed_results(message, self.authserv_id)
            if removed:
                facts["results_removed"] = removed
            checked = self.verify(message, facts)
            facts["verify"] = checked.letter
            for letter, reply in ((checked.letter, "verify_rejected"),
                                  (checked.letter.lower(), "verify_tempfailed")):
                if letter in self.verify_letters:
                    return Verdict.from_reply(
                        Reply.named(reply, stage=self.name, text=checked.text), **facts)
            added.append(checked.header)
        if self.signs:
            verdict = self._sign(message, added, facts)
            if verdict is not None:
                return verdict
        return Verdict.accept(*added, **facts)

    def _sign(self, message: Message, added: list[bytes],
              facts: dict[str, object]) -> Verdict | None:
        try:
            view = header_view(message)
        except mailstream.MalformedHeader as error:
            log.event(f"{self.name}_malformed", problem=str(error)[:200])
            return Verdict.from_reply(Reply.named("sign_malformed", stage=self.name),
                                      error=str(error)[:200])
        identity = keys.identity_header(view.fields)
        if identity is None:
            return Verdict.from_reply(Reply.named("sign_no_identity", stage=self.name))
        raw_domain = keys.address_domain(b" ".join(identity[1].split()))
        domain = keys.valid_domain(raw_domain)
        if domain is None:
            log.event(f"{self.name}_unsigned", reason="signing domain is not a hostname",
                      domain=(raw_domain or "")[:100])
            facts["unsigned"] = "bad domain"
            return None
        found: list[SigningKey] = []
        for spec in self.signs:
            try:
                chosen = choose_key(spec, domain, self.controldir)
            except keys.KeyProblem as error:
                return keys.problem_verdict(self.name, error)
            if chosen is None:
                log.event(f"{self.name}_unsigned", reason="no key for domain", domain=domain,
                          pattern=spec.pattern)
                facts.setdefault("unsigned", "no key")
            else:
                found.append(chosen)
        if not found:
            return None
        try:
            signatures = self.sign(view, domain, found, facts)
        except keys.KeyProblem as error:
            return keys.problem_verdict(self.name, error)
        facts["d"] = domain
        if self.signatures_first:
            added[:0] = signatures
        else:
            added.extend(signatures)
        return None
