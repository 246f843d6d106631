"""DomainKeys (RFC 4870) signing and verification stage, with qmail-dk's settings.

No maintained library signs DomainKeys, so the two canonicalisations are written here from
the RFC: `simple` keeps every line as it is, `nofws` unfolds header fields and deletes all
whitespace. Both end each line with CRLF, drop trailing empty body lines, and drop the
header/body separator when the body is then empty. The data is hashed with SHA-1 and
signed RSASSA-PKCS1-v1_5. The signature covers the header fields below it, so it is put on
top; it is not itself hashed.
"""

from __future__ import annotations

import base64
import getopt
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from filters import keys
from filters.base import Verdict
from qmqpd import log
from qmqpd.config import Config, ConfigError
from qmqpd.message import Message, Reply

HEADER_NAME = b"DomainKey-Signature"
_WSP = re.compile(rb"[ \t\r\n]")

# --- canonicalisation ----------------------------------------------------------------------


def split_message(message: bytes) -> tuple[list[list[bytes]], list[bytes]]:
    """Header fields (each a list of its lines) and body lines; CRLF or LF separated."""
    lines = re.split(rb"\r?\n", message)
    if lines and lines[-1] == b"":
        lines.pop()  # the final line terminator does not start a line
    fields: list[list[bytes]] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if line == b"":
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    return fields, lines[index:]


def field_name(field: list[bytes]) -> bytes:
    return field[0].split(b":", 1)[0].strip().lower()


def canonical_data(fields: Sequence[list[bytes]], body: Sequence[bytes], method: str,
                   signed_names: Sequence[bytes] | None = None) -> bytes:
    """The bytes RFC 4870 hashes for these header fields and body lines."""
    if signed_names is not None:
        wanted = {name.lower() for name in signed_names}
        fields = [f for f in fields if field_name(f) in wanted]
    if method == "nofws":
        head = [_WSP.sub(b"", b"".join(f)) + b"\r\n" for f in fields]
        lines = [_WSP.sub(b"", line) for line in body]
    else:
        head = [b"".join(line + b"\r\n" for line in f) for f in fields]
        lines = list(body)
    while lines and lines[-1] == b"":
        lines.pop()
    data = b"".join(head)
    if lines:
        data += b"\r\n" + b"".join(line + b"\r\n" for line in lines)
    return data


# --- signing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DkOptions:
    method: str = "nofws"
    with_h: bool = False
    keyfile: str | None = None


def parse_options(text: str) -> DkOptions:
    """qmail-dk's DKSIGNOPTIONS: -c nofws|simple, -h (add h=), -b N (ignored), -s keyfile."""
    try:
        pairs, rest = getopt.getopt(shlex.split(text), "b:c:hs:r")
    except (getopt.GetoptError, ValueError) as error:
        raise ConfigError(f"DKSIGNOPTIONS: {error}") from None
    if rest:
        raise ConfigError(f"DKSIGNOPTIONS: unexpected {' '.join(rest)!r}")
    values: dict[str, object] = {}
    for flag, value in pairs:
        if flag == "-c":
            if value not in ("nofws", "simple"):
                raise ConfigError(f"DKSIGNOPTIONS: -c takes nofws or simple, not {value!r}")
            values["method"] = value
        elif flag == "-h":
            values["with_h"] = True
        elif flag == "-s":
            values["keyfile"] = value
        elif flag == "-r":
            raise ConfigError("DKSIGNOPTIONS: -r (skip duplicate headers) is not supported")
    return DkOptions(**values)  # type: ignore[arg-type]


def sign_message(message: bytes, domain: str, selector: str, key: rsa.RSAPrivateKey,
                 options: DkOptions) -> bytes:
    """The `DomainKey-Signature:` header (LF line ends) for the message it goes on top of."""
    fields, body = split_message(message)
    names: list[bytes] | None = None
    if options.with_h:
        names = []
        for field in fields:
            name = field[0].split(b":", 1)[0].strip()
            if name.lower() not in (n.lower() for n in names):
                names.append(name)
    data = canonical_data(fields, body, options.method, names)
    signature = key.sign(data, padding.PKCS1v15(), hashes.SHA1())
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


def verify_message(message: bytes, lookup: keys.TxtLookup) -> DkResult:
    """The first DomainKey-Signature (from the top) checked against the fields below it."""
    fields, body = split_message(message)
    for index, field in enumerate(fields):
        if field_name(field) == HEADER_NAME.lower():
            return _verify(field, fields[index + 1:], body, lookup)
    return DkResult("C")


def _verify(sig_field: list[bytes], below: list[list[bytes]], body: list[bytes],
            lookup: keys.TxtLookup) -> DkResult:
    tags = keys.tag_list(b"".join(sig_field).split(b":", 1)[1])
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
        record = lookup(selector + b"._domainkey." + domain_raw + b".")
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
    except ValueError as error:
        return DkResult("E", domain, str(error)[:200])
    if not isinstance(public, rsa.RSAPublicKey):
        return DkResult("E", domain, "not an RSA key")
    names = tags[b"h"].split(b":") if b"h" in tags else None
    data = canonical_data(below, body, method, names)
    try:
        public.verify(base64.b64decode(tags[b"b"]), data, padding.PKCS1v15(), hashes.SHA1())
    except (InvalidSignature, ValueError):
        return DkResult("B", domain)
    return DkResult("A", domain)


def _identity_matches(fields: Sequence[list[bytes]], domain: bytes) -> bool:
    """RFC 4870: the Sender: (else From:) domain is d= or a subdomain of it."""
    unfolded = [(field[0].split(b":", 1)[0].strip(), b" ".join(x.strip() for x in field)
                 .split(b":", 1)[1]) for field in fields if b":" in field[0]]
    found = keys.identity_header(unfolded)
    if found is None:
        return False
    sender = (keys.address_domain(found[1]) or "").lower().encode()
    wanted = domain.lower()
    return sender == wanted or sender.endswith(b"." + wanted)


def authentication_results(authserv_id: str, result: DkResult) -> bytes:
    text = f"domainkeys={RESULTS[result.letter][1]}"
    if result.letter != "A":
        text += f' reason="{result.text[:120]}"'.replace("\n", " ")
    if result.domain:
        text += f" header.d={result.domain}"
    return f"Authentication-Results: {authserv_id};\n\t{text}\n".encode()


# --- the stage -----------------------------------------------------------------------------


@dataclass
class DkStage:
    name: str = "dk"
    pattern: str | None = None
    options: DkOptions = DkOptions()
    verify_letters: str | None = None
    controldir: str = keys.DEFAULT_CONTROLDIR
    lookup: keys.TxtLookup | None = None
    authserv_id: str = ""

    def process(self, message: Message) -> Verdict:
        raw = message.final_bytes()
        added: list[bytes] = []
        facts: dict[str, object] = {}
        if self.verify_letters is not None:
            assert self.lookup is not None
            result = verify_message(raw, self.lookup)
            facts["verify"] = result.letter
            if result.letter in self.verify_letters:
                return Verdict.reject(Reply.named("dk_rejected", text=result.text).text,
                                      verify=result.letter)
            if result.letter.lower() in self.verify_letters:
                return Verdict.tempfail(Reply.named("dk_tempfailed", text=result.text).text,
                                        verify=result.letter)
            added.append(authentication_results(self.authserv_id, result))
        if self.pattern is not None:
            verdict = self._sign(raw, added, facts)
            if verdict is not None:
                return verdict
        return Verdict.accept(*added, **facts)

    def _sign(self, raw: bytes, added: list[bytes], facts: dict[str, object]) -> Verdict | None:
        assert self.pattern is not None
        fields, _body = split_message(raw)
        unfolded = [(f[0].split(b":", 1)[0].strip(), b" ".join(x.strip() for x in f)
                     .split(b":", 1)[1]) for f in fields if b":" in f[0]]
        identity = keys.identity_header(unfolded)
        if identity is None:
            return Verdict.tempfail(Reply.named("dk_no_identity").text)
        raw_domain = keys.address_domain(identity[1])
        domain = keys.valid_domain(raw_domain)
        if domain is None:
            log.event("dk_unsigned", reason="signing domain is not a hostname",
                      domain=(raw_domain or "")[:100])
            facts["unsigned"] = "bad domain"
            return None
        try:
            found = keys.resolve_key(self.pattern, domain, self.controldir)
            if found is None:
                log.event("dk_unsigned", reason="no key for domain", domain=domain,
                          pattern=self.pattern)
                facts["unsigned"] = "no key"
                return None
            key = keys.load_private_key(found.path)
        except keys.KeyMissing as error:
            log.event("dk_key_missing", path=str(error))
            return Verdict.reject(Reply.named("dk_key_missing").text)
        except keys.KeyUnreadable as error:
            log.event("dk_key_refused", problem=str(error))
            return Verdict.tempfail(Reply.named("dk_key_unreadable").text)
        except keys.KeyUnparsable as error:
            log.event("dk_key_unparsable", problem=str(error))
            return Verdict.tempfail(Reply.named("dk_key_unusable").text)
        if not isinstance(key, rsa.RSAPrivateKey):
            log.event("dk_key_unparsable", problem=f"{found.path}: DomainKeys needs an RSA key")
            return Verdict.tempfail(Reply.named("dk_key_unusable").text)
        # Below any Authentication-Results of ours: the signature covers what is under it.
        added.append(sign_message(raw, domain, found.selector, key, self.options))
        facts["d"] = domain
        return None


def from_config(config: Config) -> DkStage | None:
    """The stage when DKSIGN or DKVERIFY is set, else None."""
    if config.dksign is None and config.dkverify is None:
        return None
    options = parse_options(config.dksignoptions)
    pattern = None
    if config.dksign is not None:
        pattern = options.keyfile or config.dksign or config.dkkey
    return DkStage(pattern=pattern, options=options, verify_letters=config.dkverify,
                   controldir=config.controldir,
                   lookup=keys.dns_lookup(config.dns_servers, config.dns_timeout),
                   authserv_id=keys.authserv_id())
