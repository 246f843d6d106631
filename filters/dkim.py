"""DKIM (RFC 6376) signing and verification stage, with qmail-dkim's settings.

Signing produces exactly the header dkimpy would (its canonicalisation, header selection and
folding are reused) but the RSA and Ed25519 operations run in OpenSSL through
`cryptography`: dkimpy's pure-Python RSA costs milliseconds per message. RSA PKCS#1 v1.5 and
Ed25519 are deterministic, so the bytes are identical.

Verification uses dkimpy's parsing and hashing with our own key lookup, so that each
outcome maps to one of qmail-dkim's result letters (A-Y), and a DNS failure is a temporary
result (P), never a silent pass.
"""

from __future__ import annotations

import base64
import getopt
import hashlib
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, utils
from dkim.canonicalization import CanonicalizationPolicy

from filters import keys
from filters.base import Verdict
from qmqpd import log
from qmqpd.config import Config, ConfigError
from qmqpd.message import Message, Reply

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
    try:
        pairs, rest = getopt.getopt(shlex.split(text), "c:lqthi:x:z:")
    except (getopt.GetoptError, ValueError) as error:
        raise ConfigError(f"{setting}: {error}") from None
    if rest:
        raise ConfigError(f"{setting}: unexpected {' '.join(rest)!r}")
    values: dict[str, object] = {}
    for flag, value in pairs:
        if flag == "-c":
            if value not in CANONICALISATIONS:
                raise ConfigError(f"{setting}: -c takes r, s, t or u, not {value!r}")
            values["canonicalize"] = CANONICALISATIONS[value]
        elif flag == "-z":
            if value not in ALGORITHMS:
                raise ConfigError(f"{setting}: -z takes 1, 2, 3 or 4, not {value!r}")
            values["algorithms"] = ALGORITHMS[value]
        elif flag == "-l":
            values["length"] = True
        elif flag == "-i":
            values["identity"] = None if value == "-" else value.encode()
        elif flag == "-x":
            values["expire"] = None if value == "-" else _seconds(value, setting)
        elif flag == "-h":
            raise ConfigError(f"{setting}: -h (z= copied headers) is not supported")
        # -q and -t: the q= and t= tags are always written (as dkimpy does).
    if expire_setting is not None:
        values["expire"] = None if expire_setting == "" else int(expire_setting)
    return SignOptions(**values)  # type: ignore[arg-type]


def _seconds(value: str, setting: str) -> int:
    if not value.isdigit():
        raise ConfigError(f"{setting}: -x takes seconds or -, not {value!r}")
    return int(value)


def headers_to_sign(headers: Sequence[tuple[bytes, bytes]],
                    exclude: Sequence[bytes]) -> list[bytes]:
    """qmail-dkim's choice: every header but X-* (X-Mailer is kept), trace, results,
    signatures and EXCLUDE_DKIMSIGN prefixes; From always."""
    names = []
    for name, _value in headers:
        lower = name.lower()
        if lower.startswith(b"x-") and lower != b"x-mailer":
            continue
        if lower in NEVER_SIGNED or any(lower.startswith(prefix) for prefix in exclude):
            continue
        names.append(lower)
    if b"from" not in names:
        names.append(b"from")
    return names


def sign_message(headers: list[list[bytes]], body: bytes, domain: bytes, selector: bytes,
                 key: keys.PrivateKey, algorithm: bytes, include: Sequence[bytes],
                 options: SignOptions, now: int, linesep: bytes = b"\n") -> bytes:
    """The `DKIM-Signature: ...` header, byte for byte what dkimpy's DKIM.sign makes."""
    policy = CanonicalizationPolicy.from_c_value(options.canonicalize)
    hasher, digest_algorithm = DIGESTS[algorithm]
    canonical_body = policy.canonicalize_body(body)
    bodyhash = base64.b64encode(hasher(canonical_body).digest())
    identity = options.identity or b"@" + domain
    fields = [x for x in (
        (b"v", b"1"),
        (b"a", algorithm),
        (b"c", policy.to_c_value()),
        (b"d", domain),
        (b"i", identity),
        options.length and (b"l", str(len(canonical_body)).encode()),
        (b"q", b"dns/txt"),
        (b"s", selector),
        (b"t", str(now).encode()),
        options.expire is not None and (b"x", str(now + options.expire).encode()),
        (b"h", b" : ".join(include)),
        (b"bh", bodyhash),
        (b"b", b"0" * 60),  # forces b= onto its own line, as dkimpy does
    ) if x]
    unsigned = dkim.fold(b"; ".join(b"=".join(x) for x in fields),
                         namelen=len(HEADER_NAME), linesep=b"\r\n")
    unsigned = dkim.RE_BTAG.sub(b"\\1", unsigned)
    header_hash = hasher()
    dkim.hash_headers(header_hash, policy, policy.canonicalize_headers(headers), list(include),
                      (HEADER_NAME, b" " + unsigned), dict(fields))
    digest = header_hash.digest()
    if isinstance(key, ed25519.Ed25519PrivateKey):
        signature = key.sign(digest)
    else:
        signature = key.sign(digest, padding.PKCS1v15(), utils.Prehashed(digest_algorithm))
    fields[-1] = (b"b", base64.b64encode(signature))
    value = b"; ".join(b"=".join(x) for x in fields) + linesep
    return HEADER_NAME + b": " + dkim.fold(value, namelen=len(HEADER_NAME), linesep=linesep)


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


def _letter_for_validation(error: Exception) -> str:
    text = str(error)
    if "x= value is past" in text:
        return "K"
    if "unknown signature algorithm" in text:
        return "V"
    if "body hash mismatch" in text:
        return "U"
    return "H"


def verify_one(message: bytes, index: int, lookup: keys.TxtLookup) -> SignatureResult:
    checker = dkim.DKIM(message)
    try:
        prepared = checker.verify_headerprep(index)
    except (dkim.ValidationError, dkim.MessageFormatError) as error:
        return SignatureResult(_letter_for_validation(error), detail=str(error)[:200])
    sig, include, sig_headers = prepared
    found = SignatureResult("A", sig[b"d"].decode(errors="replace"),
                            sig[b"s"].decode(errors="replace"),
                            sig[b"a"].decode(errors="replace"),
                            base64_prefix(sig.get(b"b", b"")))
    try:
        record = lookup(sig[b"s"] + b"._domainkey." + sig[b"d"] + b".")
    except keys.DnsTempError as error:
        return _with(found, "P", str(error))
    if record is None:
        return _with(found, "Q")
    tags = keys.tag_list(record)
    if not tags.get(b"p"):
        return _with(found, "N")
    try:
        checker.pk, checker.keysize, checker.ktag, checker.seqtlsrpt = dkim.evaluate_pk(
            b"key", record)
    except (dkim.KeyFormatError, ValueError) as error:
        return _with(found, "R", str(error)[:200])
    if (checker.ktag == b"ed25519") != sig[b"a"].startswith(b"ed25519"):
        return _with(found, "V")
    try:
        good = checker.verify_sig_process(sig, include, sig_headers[index], None)
    except dkim.ValidationError as error:
        return _with(found, _letter_for_validation(error))
    except dkim.DKIMException as error:
        return _with(found, "R", str(error)[:200])
    return found if good else _with(found, "I")


def _with(found: SignatureResult, letter: str, detail: str = "") -> SignatureResult:
    return SignatureResult(letter, found.domain, found.selector, found.algorithm,
                           found.b_prefix, detail)


def base64_prefix(value: bytes) -> str:
    return b"".join(value.split())[:8].decode(errors="replace")


def verify_message(message: bytes, lookup: keys.TxtLookup) -> list[SignatureResult]:
    headers, _body = dkim.rfc822_parse(message)
    count = sum(1 for name, _ in headers if name.lower() == b"dkim-signature")
    return [verify_one(message, index, lookup) for index in range(count)]


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
        return f"Authentication-Results: {authserv_id};\n\tdkim=none\n".encode()
    parts = []
    for result in results:
        part = f"dkim={result.result}"
        if result.letter != "A":
            part += f' reason="{_quoted(result.text)}"'
        if result.domain:
            part += f" header.d={result.domain} header.s={result.selector}"
        if result.b_prefix:
            part += f" header.b={result.b_prefix}"
        parts.append(part)
    return ("Authentication-Results: " + authserv_id + ";\n\t"
            + ";\n\t".join(parts) + "\n").encode()


def _quoted(text: str) -> str:
    clean = "".join(ch if 32 <= ord(ch) < 127 else "?" for ch in text)
    return clean.replace("\\", "\\\\").replace('"', "'")[:120]


# --- the stage -----------------------------------------------------------------------------


@dataclass(frozen=True)
class SignSpec:
    pattern: str
    options: SignOptions
    use_domain_table: bool


@dataclass
class DkimStage:
    name: str = "dkim"
    signs: list[SignSpec] = field(default_factory=list)
    verify_letters: str | None = None
    controldir: str = keys.DEFAULT_CONTROLDIR
    domain_table: str = ""
    exclude: tuple[bytes, ...] = ()
    lookup: keys.TxtLookup | None = None
    authserv_id: str = ""

    def process(self, message: Message) -> Verdict:
        raw = message.final_bytes()
        added: list[bytes] = []
        facts: dict[str, object] = {}
        if self.verify_letters is not None:
            verdict = self._verify(raw, added, facts)
            if verdict is not None:
                return verdict
        if self.signs:
            verdict = self._sign(raw, added, facts)
            if verdict is not None:
                return verdict
        return Verdict.accept(*added, **facts)

    def _verify(self, raw: bytes, added: list[bytes], facts: dict[str, object]) -> Verdict | None:
        assert self.lookup is not None and self.verify_letters is not None
        try:
            results = verify_message(raw, self.lookup)
        except dkim.MessageFormatError as error:
            results = [SignatureResult("H", detail=str(error)[:200])]
        letter = overall_letter(results)
        facts["verify"] = letter
        text = results[0].text if results and letter != "A" else RESULTS[letter][1]
        if letter in self.verify_letters:
            return Verdict.reject(Reply.named("dkim_rejected", text=text).text, verify=letter)
        if letter.lower() in self.verify_letters:
            return Verdict.tempfail(Reply.named("dkim_tempfailed", text=text).text, verify=letter)
        added.append(authentication_results(self.authserv_id, results))
        return None

    def _sign(self, raw: bytes, added: list[bytes], facts: dict[str, object]) -> Verdict | None:
        try:
            headers, body = dkim.rfc822_parse(raw)
        except dkim.MessageFormatError as error:
            return Verdict.reject(Reply.named("dkim_header_malformed").text,
                                  error=str(error)[:200])
        identity = keys.identity_header([(name, value) for name, value in headers])
        if identity is None:
            return Verdict.tempfail(Reply.named("dkim_no_identity").text)
        raw_domain = keys.address_domain(b" ".join(identity[1].split()))
        domain = keys.valid_domain(raw_domain)
        if domain is None:
            log.event("dkim_unsigned", reason="signing domain is not a hostname",
                      domain=(raw_domain or "")[:100])
            facts["unsigned"] = "bad domain"
            return None
        include = headers_to_sign([(name, value) for name, value in headers], self.exclude)
        now = int(time.time())
        signatures: list[bytes] = []
        for spec in self.signs:
            try:
                made = self._sign_with(spec, domain, headers, body, include, now)
            except keys.KeyMissing as error:
                log.event("dkim_key_missing", path=str(error))
                return Verdict.tempfail(Reply.named("dkim_key_unreadable").text)
            except keys.KeyUnreadable as error:
                log.event("dkim_key_refused", problem=str(error))
                return Verdict.tempfail(Reply.named("dkim_key_unreadable").text)
            except keys.KeyUnparsable as error:
                log.event("dkim_key_unparsable", problem=str(error))
                return Verdict.reject(Reply.named("dkim_key_unparsable").text)
            if not made:
                log.event("dkim_unsigned", reason="no key for domain", domain=domain,
                          pattern=spec.pattern)
                facts.setdefault("unsigned", "no key")
            signatures.extend(made)
        if signatures:
            facts["d"] = domain
            facts["signatures"] = len(signatures)
        added[:0] = signatures
        return None

    def _sign_with(self, spec: SignSpec, domain: str, headers: list[list[bytes]], body: bytes,
                   include: list[bytes], now: int) -> list[bytes]:
        pattern = spec.pattern
        if spec.use_domain_table and self.domain_table:
            table = keys.domain_key_table(keys.under(self.controldir, self.domain_table))
            pattern = table.get(domain, pattern)
        found = keys.resolve_key(pattern, domain, self.controldir)
        if found is None:
            return []
        key = keys.load_private_key(found.path)
        made = []
        for algorithm in algorithms_for(key, spec.options):
            made.append(sign_message(headers, body, domain.encode(), found.selector.encode(),
                                     key, algorithm, include, spec.options, now))
        return made


def from_config(config: Config) -> DkimStage | None:
    """The stage when DKIMSIGN, DKIMSIGNEXTRA or DKIMVERIFY is set, else None."""
    signs = []
    if config.dkimsign is not None:
        options = parse_sign_options(config.dkimsignoptions, config.dkimexpire)
        signs.append(SignSpec(config.dkimsign or config.dkimkey, options, True))
    if config.dkimsignextra:
        options = parse_sign_options(config.dkimsignoptionsextra, config.dkimexpire,
                                     "DKIMSIGNOPTIONSEXTRA")
        signs.append(SignSpec(config.dkimsignextra, options, False))
    if not signs and config.dkimverify is None:
        return None
    exclude = tuple(n.strip().lower().encode() for n in config.exclude_dkimsign.split(":")
                    if n.strip())
    return DkimStage(signs=signs, verify_letters=config.dkimverify,
                     controldir=config.controldir, domain_table=config.dkimkeys,
                     exclude=exclude,
                     lookup=keys.dns_lookup(config.dns_servers, config.dns_timeout),
                     authserv_id=keys.authserv_id())
