"""DKIM (RFC 6376) signing and verification stage, with qmail-dkim's settings.

Signing produces exactly the header dkimpy would (its canonicalisation rules, tag order and
folding, kept in filters.dkimtags) but the RSA and Ed25519 operations run in OpenSSL
through `cryptography`: dkimpy's pure-Python RSA costs milliseconds per message. RSA
PKCS#1 v1.5 and Ed25519 are deterministic, so the bytes are identical (the tests compare
them with dkimpy's own, which the product does not import).

The message is read as a stream (filters.mailstream): the body hash is computed chunk by
chunk and header selection is one pass, so work is linear in the message and memory is the
header block. Verification parses the tags and key record itself with our own key lookup,
so that each outcome maps to one of qmail-dkim's result letters (A-Y), and a DNS failure is
a temporary result (P), never a silent pass.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from qmqpd.config import Config
from qmqpd.filters import dkimtags, keys, mailstream, signing
from qmqpd.message import Message

HEADER_NAME = b"DKIM-Signature"
DEFAULT_EXPIRE = 604800  # qmail-dkim: x= one week after signing
CANONICALISATIONS = {"r": b"relaxed/relaxed", "s": b"simple/simple",
                     "t": b"relaxed/simple", "u": b"simple/relaxed"}
ALGORITHMS = {"1": (b"rsa-sha1",), "2": (b"rsa-sha256",), "3": (b"rsa-sha1", b"rsa-sha256"),
              "4": (b"ed25519-sha256",)}
DIGESTS = {b"rsa-sha1": (hashlib.sha1, hashes.SHA1()),
           b"rsa-sha256": (hashlib.sha256, hashes.SHA256()),
           b"ed25519-sha256": (hashlib.sha256, hashes.SHA256())}
# Never signed: trace and result headers that change in transit, and other signatures.
NEVER_SIGNED = (b"received", b"return-path", b"authentication-results",
                b"arc-authentication-results", b"dkim-signature", b"domainkey-signature")

# --- signing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SignOptions:
    canonicalize: bytes = b"relaxed/relaxed"
    algorithms: tuple[bytes, ...] | None = None  # None: rsa-sha256 or by the key's type
    length: bool = False
    identity: bytes | None = None
    expire: int | None = DEFAULT_EXPIRE  # seconds after signing; None = no x=


def parse_sign_options(text: str, expire_setting: int | str | None = None,
                       setting: str = "DKIMSIGNOPTIONS") -> SignOptions:
    """qmail-dkim's getopt-style DKIMSIGNOPTIONS; DKIMEXPIRE (if set) wins over -x."""
    values: dict[str, object] = {}
    for flag, value in signing.options(text, "c:lqthi:x:z:", setting):
        if flag == "-c":
            if value not in CANONICALISATIONS:
                raise signing.OptionError(setting, f"-c takes r, s, t or u, not {value!r}")
            values["canonicalize"] = CANONICALISATIONS[value]
        elif flag == "-z":
            if value not in ALGORITHMS:
                raise signing.OptionError(setting, f"-z takes 1, 2, 3 or 4, not {value!r}")
            values["algorithms"] = ALGORITHMS[value]
        elif flag == "-l":
            values["length"] = True
        elif flag == "-i":
            values["identity"] = None if value == "-" else value.encode()
        elif flag == "-x":
            values["expire"] = None if value == "-" else _seconds(value, setting)
        elif flag == "-h":
            raise signing.OptionError(setting, "-h (z= copied headers) is not supported")
        # -q and -t: the q= and t= tags are always written (as dkimpy does).
    if expire_setting is not None:
        values["expire"] = None if expire_setting == "" else int(expire_setting)
    return SignOptions(**values)  # type: ignore[arg-type]


def _seconds(value: str, setting: str) -> int:
    if not value.isdigit():
        raise signing.OptionError(setting, f"-x takes seconds or -, not {value!r}")
    return int(value)


# A hostile message may carry tens of thousands of header fields; the signature covers a
# bounded set: each name at most MAX_PER_NAME times (its bottom-most occurrences, as RFC 6376
# selects them) and at most MAX_SIGNED_HEADERS entries in h=, the names RFC 6376 §5.4.1
# recommends (plus the MIME and identity fields) first, then the others in message order.
MAX_PER_NAME = 8
MAX_SIGNED_HEADERS = 64
RECOMMENDED = frozenset((
    b"from", b"sender", b"reply-to", b"subject", b"date", b"to", b"cc", b"message-id",
    b"resent-date", b"resent-from", b"resent-sender", b"resent-to", b"resent-cc",
    b"in-reply-to", b"references", b"list-id", b"list-help", b"list-unsubscribe",
    b"list-subscribe", b"list-post", b"list-owner", b"list-archive", b"mime-version",
    b"content-type", b"content-transfer-encoding"))


def headers_to_sign(headers: Sequence[Sequence[bytes]], exclude: Sequence[bytes]) -> list[bytes]:
    """qmail-dkim's choice, bounded: every header but X-* (X-Mailer is kept), trace, results,
    signatures and EXCLUDE_DKIMSIGN prefixes; From always. Linear in the header count."""
    counts: dict[bytes, int] = {}
    for header in headers:
        lower = header[0].lower()
        if lower.startswith(b"x-") and lower != b"x-mailer":
            continue
        if lower in NEVER_SIGNED or any(lower.startswith(prefix) for prefix in exclude):
            continue
        counts[lower] = counts.get(lower, 0) + 1
    budget = MAX_SIGNED_HEADERS - (0 if b"from" in counts else 1)
    allowed: dict[bytes, int] = {}
    for name in sorted(counts, key=lambda n: n not in RECOMMENDED):  # stable: message order
        allowed[name] = min(counts[name], MAX_PER_NAME, budget)
        budget -= allowed[name]
    names = []
    for header in headers:
        lower = header[0].lower()
        if allowed.get(lower, 0) > 0:
            names.append(lower)
            allowed[lower] -= 1
    if b"from" not in counts:
        names.append(b"from")
    return names


def select_fields(headers: Sequence[Sequence[bytes]],
                  include: Sequence[bytes]) -> list[Sequence[bytes]]:
    """The fields h= names, in h= order, each repeat taking the next one up (dkimpy's
    select_headers, in one pass instead of one scan per h= entry)."""
    wanted = Counter(include)
    # only the bottom-most occurrences can be picked: as many per name as h= lists it
    positions = {name: deque(maxlen=count) for name, count in wanted.items()}
    for index, header in enumerate(headers):
        lower = header[0].lower()
        if lower in positions:
            positions[lower].append(index)
    picked = []
    for name in include:
        stack = positions.get(name)
        if stack:
            picked.append(headers[stack.pop()])
    return picked


def header_hash(hasher: object, canon: bytes, headers: Sequence[Sequence[bytes]],
                include: Sequence[bytes], signature_value: bytes) -> None:
    """Feed the signed fields, then the signature field with an empty b=, as RFC 6376 says
    (canon: the header canonicalisation, simple or relaxed)."""
    chosen = dkimtags.canonical_headers(canon, select_fields(headers, include))
    own = dkimtags.canonical_headers(canon, [(HEADER_NAME, dkimtags.blank_b(signature_value))])
    for name, value in chosen + [(x, y.rstrip()) for x, y in own]:
        hasher.update(name + b":" + value)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class BodyHash:
    digest: bytes
    length: int  # of the canonical body (the l= tag)


def hash_bodies(body: Iterable[bytes],
                wanted: Iterable[tuple[bytes, bytes, int | None]]
                ) -> dict[tuple[bytes, bytes, int | None], BodyHash]:
    """Body hashes for each (body canonicalisation, algorithm, l= or None), in one pass over
    the body chunks: memory stays one chunk whatever the body's size."""
    canonicalisers: dict[bytes, mailstream.BodyCanon] = {}
    made: dict[tuple[bytes, bytes, int | None], tuple[object, mailstream.BodyCanon]] = {}
    for key in set(wanted):
        canon, algorithm, limit = key
        canonicaliser = canonicalisers.setdefault(
            canon, mailstream.BodyCanon(canon.decode(), []))
        digest = DIGESTS[algorithm][0]()
        sink: mailstream.Sink = digest if limit is None else mailstream.LimitedSink(digest, limit)
        canonicaliser.sinks.append(sink)
        made[key] = (digest, canonicaliser)
    if canonicalisers:
        mailstream.feed(body, *canonicalisers.values())
    return {key: BodyHash(digest.digest(), canonicaliser.length)  # type: ignore[attr-defined]
            for key, (digest, canonicaliser) in made.items()}


def sign_message(headers: list[list[bytes]], body: bytes, domain: bytes, selector: bytes,
                 key: keys.PrivateKey, algorithm: bytes, include: Sequence[bytes],
                 options: SignOptions, now: int, linesep: bytes = b"\n") -> bytes:
    """The `DKIM-Signature: ...` header, byte for byte what dkimpy's DKIM.sign makes."""
    key_for_body = (dkimtags.parse_c(options.canonicalize)[1], algorithm, None)
    bodyhash = hash_bodies([body], [key_for_body])[key_for_body]
    return make_signature(headers, bodyhash, domain, selector, key, algorithm, include,
                          options, now, linesep)


def make_signature(headers: Sequence[Sequence[bytes]], bodyhash: BodyHash, domain: bytes,
                   selector: bytes, key: keys.PrivateKey, algorithm: bytes,
                   include: Sequence[bytes], options: SignOptions, now: int,
                   linesep: bytes = b"\n") -> bytes:
    """The header for a body already hashed (see hash_bodies)."""
    canon = dkimtags.parse_c(options.canonicalize)
    hasher, digest_algorithm = DIGESTS[algorithm]
    identity = options.identity or b"@" + domain
    fields = [x for x in (
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", b"/".join(canon)),
        (b"d", domain),
        (b"i", identity),
        options.length and (b"l", str(bodyhash.length).encode()),
        (b"q", b"dns/txt"),
        (b"s", selector),
        (b"t", str(now).encode()),
        options.expire is not None and (b"x", str(now + options.expire).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", base64.b64encode(bodyhash.digest)),
        (b"b", b"0" * 60),  # forces b= onto its own line, as dkimpy does
    ) if x]
    unsigned = dkimtags.fold(b"; ".join(b"=".join(x) for x in fields),
                             namelen=len(HEADER_NAME), linesep=b"\r\n")
    unsigned = dkimtags.blank_b(unsigned)
    hashed = hasher()
    header_hash(hashed, canon[0], headers, include, b" " + unsigned)
    signature = signing.sign_digest(key, hashed.digest(), digest_algorithm)
    fields[-1] = (b"b", base64.b64encode(signature))
    value = b"; ".join(b"=".join(x) for x in fields) + linesep
    return HEADER_NAME + b": " + dkimtags.fold(value, namelen=len(HEADER_NAME), linesep=linesep)


def algorithms_for(key: keys.PrivateKey, options: SignOptions) -> tuple[bytes, ...]:
    kind = keys.key_kind(key)
    if options.algorithms is None:
        return (b"ed25519-sha256",) if kind == "ed25519" else (b"rsa-sha256",)
    for algorithm in options.algorithms:
        if algorithm.startswith(b"ed25519") != (kind == "ed25519"):
            raise keys.KeyUnparsable(f"a {kind} key cannot make {algorithm.decode()} signatures")
    return options.algorithms


# --- verification --------------------------------------------------------------------------

# qmail-dkim's result letters and the RFC 8601 result each stands for.
RESULTS = {
    "A": ("pass", "good"), "G": ("fail", "signature failed"),
    "H": ("permerror", "bad signature syntax"), "I": ("fail", "signature did not verify"),
    "K": ("fail", "signature expired"), "L": ("permerror", "selector invalid"),
    "N": ("permerror", "key revoked"), "P": ("temperror", "DNS temporary failure"),
    "Q": ("permerror", "no key for signature"), "R": ("permerror", "public key invalid"),
    "S": ("none", "no signatures"), "U": ("fail", "body hash mismatch"),
    "V": ("permerror", "algorithm mismatch"),
}
DEFAULT_MAX_SIGNATURES = 5
MIN_KEY_BITS = 1024  # dkimpy's minimum for an RSA key that verifies


@dataclass(frozen=True)
class SignatureResult:
    letter: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    b_prefix: str = ""
    detail: str = ""

    @property
    def result(self) -> str:
        return RESULTS[self.letter][0]

    @property
    def text(self) -> str:
        return self.detail or RESULTS[self.letter][1]


@dataclass(frozen=True)
class _Prepared:
    """A signature whose tags parsed: what is needed to check it."""

    sig: dict[bytes, bytes]
    include: list[bytes]
    field: Sequence[bytes]
    canon: tuple[bytes, bytes]  # header and body canonicalisation
    body_key: tuple[bytes, bytes, int | None]
    found: SignatureResult


def _prepare(sig_field: Sequence[bytes]) -> _Prepared | SignatureResult:
    try:
        sig = dkimtags.parse_tags(sig_field[1])
        dkimtags.check_signature(sig)
    except dkimtags.TagError as error:
        return SignatureResult(error.letter, detail=str(error)[:200])
    found = SignatureResult("A", sig[b"d"].decode(errors="replace"),
                            sig[b"s"].decode(errors="replace"),
                            sig[b"a"].decode(errors="replace"),
                            base64_prefix(sig.get(b"b", b"")))
    try:
        canon = dkimtags.parse_c(sig.get(b"c", b"simple/simple"))
    except dkimtags.TagError as error:
        return _with(found, error.letter, str(error)[:200])
    if sig.get(b"l") == b"":
        return _with(found, "H", "l= value is empty")
    include = [x.lower() for x in re.split(rb"\s*:\s*", sig[b"h"])]
    limit = int(sig[b"l"]) if b"l" in sig else None
    return _Prepared(sig, include, sig_field, canon, (canon[1], sig[b"a"], limit), found)


def _check(prepared: _Prepared, headers: Sequence[Sequence[bytes]],
           bodyhash: BodyHash, lookup: keys.TxtLookup, timeout: float | None) -> SignatureResult:
    sig, found = prepared.sig, prepared.found
    try:
        record = lookup(sig[b"s"] + b"._domainkey." + sig[b"d"] + b".", timeout)
    except keys.DnsTempError as error:
        return _with(found, "P", str(error))
    if record is None:
        return _with(found, "Q")
    tags = keys.tag_list(record)
    if not tags.get(b"p"):
        return _with(found, "N")
    try:
        public, ktag, service = public_key(tags)
    except ValueError as error:
        return _with(found, "R", str(error)[:200])
    if service == b"tlsrpt":
        return _with(found, "H", "key is for TLS reports only")
    if (ktag == b"ed25519") != sig[b"a"].startswith(b"ed25519"):
        return _with(found, "V")
    expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
    if bodyhash.digest != expected:
        return _with(found, "U")
    include = list(prepared.include)
    if b"from" in include:
        include.append(b"from")  # a From added above the signed one must break it (as dkimpy)
    hashed = DIGESTS[sig[b"a"]][0]()
    header_hash(hashed, prepared.canon[0], headers, include, prepared.field[1])
    signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, hashed.digest())
        else:
            if public.key_size < MIN_KEY_BITS:
                return _with(found, "R", f"public key too small: {public.key_size}")
            public.verify(signature, hashed.digest(), padding.PKCS1v15(),
                          utils.Prehashed(DIGESTS[sig[b"a"]][1]))
    except InvalidSignature:
        return _with(found, "I")
    return found


def public_key(tags: dict[bytes, bytes]) -> tuple[rsa.RSAPublicKey | ed25519.Ed25519PublicKey,
                                                  bytes, bytes]:
    """(key, k= tag, s= service) of a DKIM key record (RFC 6376 3.6.1, RFC 8463).

    Read with `cryptography` (the same library that signs), so Ed25519 needs no libsodium.
    Raises ValueError with the reason for a record that holds no usable key.
    """
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        raise ValueError("bad version in v= tag")
    kind = tags.get(b"k", b"rsa")
    service = tags.get(b"s", b"*")
    if not {b"*", b"email", b"tlsrpt"} & set(service.split(b":")):
        raise ValueError(f"unknown service type in s= tag: {service.decode(errors='replace')}")
    try:
        data = base64.b64decode(tags[b"p"], validate=True)
    except (KeyError, binascii.Error) as error:
        raise ValueError(f"public key is not base64: {error}") from None
    if kind == b"ed25519":
        try:
            return ed25519.Ed25519PublicKey.from_public_bytes(data), kind, service
        except ValueError as error:
            raise ValueError(f"could not parse ed25519 public key: {error}") from None
    if kind != b"rsa":
        raise ValueError(f"unknown algorithm in k= tag: {kind.decode(errors='replace')}")
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError) as error:
        raise ValueError(f"could not parse RSA public key: {error}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("k=rsa but the key is not an RSA key")
    return key, kind, service


def _with(found: SignatureResult, letter: str, detail: str = "") -> SignatureResult:
    return SignatureResult(letter, found.domain, found.selector, found.algorithm,
                           found.b_prefix, detail)


def base64_prefix(value: bytes) -> str:
    return b"".join(value.split())[:8].decode(errors="replace")


def verify_message(message: bytes | mailstream.Split, lookup: keys.TxtLookup,
                   max_signatures: int = DEFAULT_MAX_SIGNATURES,
                   deadline: float | None = None) -> list[SignatureResult]:
    """The results of the first (topmost) max_signatures signatures; the others are not
    looked at. `deadline` (time.monotonic()) bounds all key lookups together: a signature
    whose lookup cannot start before it is a temporary failure (P). Raises MalformedHeader."""
    parsed = message if isinstance(message, mailstream.Split) else mailstream.split([message])
    signatures = [f for f in parsed.fields if f[0].lower() == b"dkim-signature"]
    prepared = [_prepare(f) for f in signatures[:max_signatures]]
    wanted = [p.body_key for p in prepared if isinstance(p, _Prepared)]
    bodies = hash_bodies(parsed.body, wanted)
    results = []
    for item in prepared:
        if isinstance(item, SignatureResult):
            results.append(item)
            continue
        timeout = None
        if deadline is not None:
            timeout = deadline - time.monotonic()
            if timeout <= 0:
                results.append(_with(item.found, "P", "no time left for the key lookup"))
                continue
        results.append(_check(item, parsed.fields, bodies[item.body_key], lookup, timeout))
    return results


def overall_letter(results: Sequence[SignatureResult]) -> str:
    """Any good signature wins; else the first failure; no signatures is S."""
    if not results:
        return "S"
    for result in results:
        if result.letter == "A":
            return "A"
    return results[0].letter


def authentication_results(authserv_id: str, results: Sequence[SignatureResult]) -> bytes:
    """RFC 8601 header naming each signature's result (dkim=none when there is none)."""
    if not results:
        return signing.results_header(authserv_id, ["dkim=none"])
    parts = []
    for result in results:
        properties = []
        if result.domain:
            properties += [("header.d", result.domain), ("header.s", result.selector)]
        if result.b_prefix:
            properties.append(("header.b", result.b_prefix))
        reason = None if result.letter == "A" else result.text
        parts.append(signing.resinfo("dkim", result.result, reason, properties))
    return signing.results_header(authserv_id, parts)


# --- the stage -----------------------------------------------------------------------------


@dataclass
class DkimStage(signing.SigningStage):
    """DKIM verification (DKIMVERIFY) and signing (DKIMSIGN, DKIMSIGNEXTRA) of one message,
    with the policy of signing.SigningStage.

    The message is read as a stream: the header block (at most mailstream.HEADER_LIMIT
    bytes) in memory, the body hashed chunk by chunk. Verification looks at the topmost
    `max_signatures` signatures with one `verify_timeout` for all their key lookups.
    """

    name: str = "dkim"
    exclude: tuple[bytes, ...] = ()
    max_signatures: int = DEFAULT_MAX_SIGNATURES
    verify_timeout: float | None = None
    signatures_first: ClassVar[bool] = True

    def verify(self, message: Message, facts: dict[str, object]) -> signing.Checked:
        assert self.lookup is not None
        deadline = None
        if self.verify_timeout is not None:
            deadline = time.monotonic() + self.verify_timeout
        try:
            view = signing.header_view(message)
            found = sum(1 for f in view.fields if f[0].lower() == b"dkim-signature")
            results = verify_message(view, self.lookup, self.max_signatures, deadline)
        except mailstream.MalformedHeader as error:
            results = [SignatureResult("H", detail=str(error)[:200])]
            found = 0
        if found > len(results):
            facts["unchecked"] = found - len(results)
        letter = overall_letter(results)
        text = results[0].text if results and letter != "A" else RESULTS[letter][1]
        return signing.Checked(letter, text, authentication_results(self.authserv_id, results))

    def sign(self, view: mailstream.Split, domain: str, found: list[signing.SigningKey],
             facts: dict[str, object]) -> list[bytes]:
        jobs = []
        for chosen in found:
            options = chosen.spec.options
            assert isinstance(options, SignOptions)
            body = dkimtags.parse_c(options.canonicalize)[1]
            for algorithm in algorithms_for(chosen.key, options):
                jobs.append((chosen, options, algorithm, (body, algorithm, None)))
        bodies = hash_bodies(view.body, [body_key for *_, body_key in jobs])
        include = headers_to_sign(view.fields, self.exclude)
        now = int(time.time())
        signatures = [make_signature(view.fields, bodies[body_key], domain.encode(),
                                     chosen.selector.encode(), chosen.key, algorithm, include,
                                     options, now)
                      for chosen, options, algorithm, body_key in jobs]
        facts["signatures"] = len(signatures)
        facts["signed_headers"] = len(include)
        return signatures


def from_config(config: Config) -> DkimStage | None:
    """The stage when DKIMSIGN, DKIMSIGNEXTRA or DKIMVERIFY is set, else None."""
    signs = []
    try:
        if config.dkimsign is not None:
            options = parse_sign_options(config.dkimsignoptions, config.dkimexpire)
            signs.append(signing.KeySpec(config.dkimsign or config.dkimkey,
                                         "DKIMSIGN" if config.dkimsign else "DKIMKEY",
                                         options, config.dkimkeys))
        if config.dkimsignextra:
            options = parse_sign_options(config.dkimsignoptionsextra, config.dkimexpire,
                                         "DKIMSIGNOPTIONSEXTRA")
            signs.append(signing.KeySpec(config.dkimsignextra, "DKIMSIGNEXTRA", options))
    except signing.OptionError as error:
        raise signing.named(config, error) from None
    if not signs and config.dkimverify is None:
        return None
    exclude = tuple(n.strip().lower().encode() for n in config.exclude_dkimsign.split(":")
                    if n.strip())
    return DkimStage(signs=signs, verify_letters=config.dkimverify,
                     controldir=config.controldir, exclude=exclude,
                     lookup=keys.dns_lookup(config.dns_servers, config.dns_timeout),
                     authserv_id=keys.authserv_id(),
                     max_signatures=config.dkimverify_max_signatures,
                     verify_timeout=config.dkimverify_timeout)
