"""DomainKeys (RFC 4870) signing and verification stage, with qmail-dk's settings.

No maintained library signs DomainKeys, so the two canonicalisations are written here from
the RFC: `simple` keeps every line as it is, `nofws` unfolds header fields and deletes all
whitespace. Both end each line with CRLF, drop trailing empty body lines, and drop the
header/body separator when the body is then empty. The data is hashed with SHA-1 and
signed RSASSA-PKCS1-v1_5. The signature covers the header fields below it, so it is put on
top; it is not itself hashed.

Header and body go through one SHA-1 as a stream (filters.mailstream): the header block is
held in memory (at most mailstream.HEADER_LIMIT bytes), the body never is.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

from qmqpd.config import Config
from qmqpd.filters import keys, mailstream, signing
from qmqpd.message import Message

HEADER_NAME = b"DomainKey-Signature"
_WSP = re.compile(rb"[ \t\r\n]")
# With -h, h= names at most this many distinct fields (the first ones from the top); fields
# of other names are then not signed, which RFC 4870 allows.
MAX_H_NAMES = 64

# --- canonicalisation ----------------------------------------------------------------------


def field_name(field: Sequence[bytes]) -> bytes:
    return field[0].strip().lower()


def _canonical_field(field: Sequence[bytes], method: str) -> bytes:
    raw = mailstream.raw_field(list(field))
    if method == "nofws":
        return _WSP.sub(b"", raw) + b"\r\n"
    return raw


def hash_data(fields: Sequence[Sequence[bytes]], body: Iterable[bytes], method: str,
              signed_names: Sequence[bytes] | None = None) -> bytes:
    """The SHA-1 of the bytes RFC 4870 signs for these fields and body chunks."""
    digest = hashlib.sha1()
    _feed(digest, fields, body, method, signed_names)
    return digest.digest()


def _feed(sink: mailstream.Sink, fields: Sequence[Sequence[bytes]], body: Iterable[bytes],
          method: str, signed_names: Sequence[bytes] | None) -> None:
    wanted = None if signed_names is None else {name.lower() for name in signed_names}
    for field in fields:
        if wanted is None or field_name(field) in wanted:
            sink.update(_canonical_field(field, method))
    mailstream.feed(body, mailstream.BodyCanon(f"dk-{method}", [sink]))


# --- signing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DkOptions:
    method: str = "nofws"
    with_h: bool = False
    keyfile: str | None = None


def parse_options(text: str) -> DkOptions:
    """qmail-dk's DKSIGNOPTIONS: -c nofws|simple, -h (add h=), -b N (ignored), -s keyfile."""
    values: dict[str, object] = {}
    for flag, value in signing.options(text, "b:c:hs:r", "DKSIGNOPTIONS"):
        if flag == "-c":
            if value not in ("nofws", "simple"):
                raise signing.OptionError("DKSIGNOPTIONS",
                                          f"-c takes nofws or simple, not {value!r}")
            values["method"] = value
        elif flag == "-h":
            values["with_h"] = True
        elif flag == "-s":
            values["keyfile"] = value
        elif flag == "-r":
            raise signing.OptionError("DKSIGNOPTIONS",
                                      "-r (skip duplicate headers) is not supported")
    return DkOptions(**values)  # type: ignore[arg-type]


def h_names(fields: Sequence[Sequence[bytes]]) -> list[bytes]:
    """The distinct field names from the top, as written, at most MAX_H_NAMES."""
    names: list[bytes] = []
    seen: set[bytes] = set()
    for field in fields:
        name = field[0].strip()
        if name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
            if len(names) == MAX_H_NAMES:
                break
    return names


def sign_message(message: bytes | mailstream.Split, domain: str, selector: str,
                 key: rsa.RSAPrivateKey, options: DkOptions) -> bytes:
    """The `DomainKey-Signature:` header (LF line ends) for the message it goes on top of."""
    parsed = message if isinstance(message, mailstream.Split) else mailstream.split([message])
    names = h_names(parsed.fields) if options.with_h else None
    digest = hash_data(parsed.fields, parsed.body, options.method, names)
    signature = signing.sign_digest(key, digest, hashes.SHA1())
    tags = [f"a=rsa-sha1; q=dns; c={options.method};", f"s={selector}; d={domain};"]
    if names is not None:
        tags.append("h=" + ":".join(n.decode("ascii", "replace") for n in names) + ";")
    encoded = base64.b64encode(signature).decode()
    folded = "\n  ".join(encoded[i:i + 72] for i in range(0, len(encoded), 72))
    return (HEADER_NAME.decode() + ": " + "\n  ".join(tags) + "\n  b=" + folded + "\n").encode()


# --- verification --------------------------------------------------------------------------

# qmail-dk's result letters: (name, RFC 8601 result).
RESULTS = {
    "A": ("good", "pass"), "B": ("bad signature", "fail"), "C": ("no signature", "none"),
    "D": ("no key", "permerror"), "E": ("bad key", "permerror"),
    "F": ("cannot verify", "temperror"), "G": ("bad signature syntax", "permerror"),
    "J": ("key revoked", "permerror"),
}


@dataclass(frozen=True)
class DkResult:
    letter: str
    domain: str = ""
    detail: str = ""

    @property
    def text(self) -> str:
        return self.detail or RESULTS[self.letter][0]


def verify_message(message: bytes | mailstream.Split, lookup: keys.TxtLookup) -> DkResult:
    """The first DomainKey-Signature (from the top) checked against the fields below it.
    A header block that cannot be parsed is G (bad syntax)."""
    try:
        parsed = message if isinstance(message, mailstream.Split) else mailstream.split(
            [message])
    except mailstream.MalformedHeader as error:
        return DkResult("G", "", str(error)[:200])
    for index, field in enumerate(parsed.fields):
        if field_name(field) == HEADER_NAME.lower():
            return _verify(field, parsed.fields[index + 1:], parsed.body, lookup)
    return DkResult("C")


def _verify(sig_field: Sequence[bytes], below: Sequence[Sequence[bytes]],
            body: Iterable[bytes], lookup: keys.TxtLookup) -> DkResult:
    tags = keys.tag_list(sig_field[1])
    domain_raw, selector = tags.get(b"d", b""), tags.get(b"s", b"")
    domain = domain_raw.decode("ascii", "replace")
    if not domain_raw or not selector or b"b" not in tags:
        return DkResult("G", domain, "missing d=, s= or b=")
    if tags.get(b"a", b"rsa-sha1") != b"rsa-sha1" or tags.get(b"q", b"dns") != b"dns":
        return DkResult("G", domain, "unsupported a= or q=")
    method = tags.get(b"c", b"simple").decode("ascii", "replace")
    if method not in ("simple", "nofws"):
        return DkResult("G", domain, f"unknown canonicalisation {method[:20]}")
    if not _identity_matches(below, domain_raw):
        return DkResult("B", domain, "sender not in d= domain")
    try:
        record = lookup(selector + b"._domainkey." + domain_raw + b".", None)
    except keys.DnsTempError as error:
        return DkResult("F", domain, str(error)[:200])
    if record is None:
        return DkResult("D", domain)
    key_tags = keys.tag_list(record)
    if not key_tags.get(b"p"):
        return DkResult("J", domain)
    if b"h" in key_tags and b"sha1" not in key_tags[b"h"].split(b":"):
        return DkResult("E", domain, "key does not allow sha1")
    try:
        public = serialization.load_der_public_key(base64.b64decode(key_tags[b"p"]))
    except (ValueError, UnsupportedAlgorithm) as error:
        return DkResult("E", domain, str(error)[:200])
    if not isinstance(public, rsa.RSAPublicKey):
        return DkResult("E", domain, "not an RSA key")
    names = tags[b"h"].split(b":") if b"h" in tags else None
    digest = hash_data(below, body, method, names)
    try:
        public.verify(base64.b64decode(tags[b"b"]), digest, padding.PKCS1v15(),
                      utils.Prehashed(hashes.SHA1()))
    except (InvalidSignature, ValueError):
        return DkResult("B", domain)
    return DkResult("A", domain)


def _identity_matches(fields: Sequence[Sequence[bytes]], domain: bytes) -> bool:
    """RFC 4870: the Sender: (else From:) domain is d= or a subdomain of it."""
    found = keys.identity_header(fields)
    if found is None:
        return False
    sender = (keys.address_domain(found[1]) or "").lower().encode()
    wanted = domain.lower()
    return sender == wanted or sender.endswith(b"." + wanted)


def authentication_results(authserv_id: str, result: DkResult) -> bytes:
    reason = None if result.letter == "A" else result.text
    properties = [("header.d", result.domain)] if result.domain else []
    return signing.results_header(authserv_id, [
        signing.resinfo("domainkeys", RESULTS[result.letter][1], reason, properties)])


# --- the stage -----------------------------------------------------------------------------


@dataclass
class DkStage(signing.SigningStage):
    """DomainKeys verification (DKVERIFY) and signing (DKSIGN) of one message, read as a
    stream (see the module docstring), with the policy of signing.SigningStage."""

    name: str = "dk"
    rsa_only: ClassVar[bool] = True

    def verify(self, message: Message, facts: dict[str, object]) -> signing.Checked:
        assert self.lookup is not None
        try:
            result = verify_message(signing.header_view(message), self.lookup)
        except mailstream.MalformedHeader as error:
            result = DkResult("G", "", str(error)[:200])
        return signing.Checked(result.letter, result.text,
                               authentication_results(self.authserv_id, result))

    def sign(self, view: mailstream.Split, domain: str, found: list[signing.SigningKey],
             facts: dict[str, object]) -> list[bytes]:
        (chosen,) = found
        if not isinstance(chosen.key, rsa.RSAPrivateKey):
            raise keys.KeyUnparsable(f"{chosen.path}: DomainKeys needs an RSA key")
        options = chosen.spec.options
        assert isinstance(options, DkOptions)
        # Below any Authentication-Results of ours: the signature covers what is under it.
        return [sign_message(view, domain, chosen.selector, chosen.key, options)]


def from_config(config: Config) -> DkStage | None:
    """The stage when DKSIGN or DKVERIFY is set, else None."""
    if config.dksign is None and config.dkverify is None:
        return None
    try:
        options = parse_options(config.dksignoptions)
    except signing.OptionError as error:
        raise signing.named(config, error) from None
    signs = []
    if config.dksign is not None:
        setting = "DKSIGNOPTIONS" if options.keyfile else "DKSIGN" if config.dksign else "DKKEY"
        signs.append(signing.KeySpec(options.keyfile or config.dksign or config.dkkey, setting,
                                     options))
    return DkStage(signs=signs, verify_letters=config.dkverify, controldir=config.controldir,
                   lookup=keys.dns_lookup(config.dns_servers, config.dns_timeout),
                   authserv_id=keys.authserv_id())
