"""Signing keys for the DKIM and DomainKeys stages: where they are, loading them, making them.

Key paths follow IndiMail: a pattern such as `domainkeys/%/default` (relative to CONTROLDIR),
every `%` replaced by the signing domain, the selector being the key file's basename. The
signing domain comes from a message header, so it is validated as a hostname before it
touches a path. Public keys of other domains are looked up as DNS TXT records with a short
timeout; a DNS failure is reported as temporary, never as "no key".
"""

from __future__ import annotations

import argparse
import base64
import email.utils
import errno
import os
import re
import socket
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.name
import dns.resolver
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from qmqpd import fsio, log
from qmqpd.address import split_host_port
from qmqpd.errors import EXIT_PERMANENT, EXIT_TEMPORARY, TemporaryError
from qmqpd.filters.base import Verdict
from qmqpd.message import Reply

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
# (name as in the signature, seconds left or None) -> the TXT key record, None when there
# is none. The time limit is the smaller of DNS_TIMEOUT and the seconds left.
TxtLookup = Callable[[bytes, float | None], bytes | None]

MAX_DOMAIN = 253
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")
DEFAULT_CONTROLDIR = "/etc/qmqpd"
DEFAULT_KEY_PATTERN = "domainkeys/%/default"


class KeyProblem(TemporaryError):
    """Base of the key problems a stage turns into an answer (Z: the operator fixes the key)."""


class KeyMissing(KeyProblem):
    """No key file and the pattern had no `%`: the operator promised a key."""


class KeyUnreadable(KeyProblem):
    """The key exists but cannot be used safely (permissions, I/O): temporary."""


class KeyUnparsable(KeyProblem):
    """The key file is not a private key we can sign with: permanent."""


class DnsTempError(TemporaryError):
    """The key lookup failed for a reason that may pass (timeout, SERVFAIL, no resolver)."""


# --- the signing domain -------------------------------------------------------------------

def valid_domain(raw: str | bytes | None) -> str | None:
    """The domain lowercased if it is a plain hostname, else None (it never reaches a path)."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            return None
    domain = raw.strip().rstrip(".").lower()
    if not domain or len(domain) > MAX_DOMAIN:
        return None
    labels = domain.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    return domain


def address_domain(value: bytes) -> str | None:
    """The raw domain of the first address in a From:/Sender: value (not yet validated)."""
    text = value.decode("ascii", errors="replace")
    addresses = email.utils.getaddresses([text])
    for _name, address in addresses:
        if "@" in address:
            return address.rsplit("@", 1)[1]
    return None


def identity_header(fields: Sequence[Sequence[bytes]]) -> tuple[bytes, bytes] | None:
    """The Sender: field, else the From: field (the signing identity of DK and DKIM), its
    value unfolded (continuation lines joined by a space)."""
    found: Sequence[bytes] | None = None
    for field in fields:
        lower = field[0].lower()
        if lower == b"sender":
            found = field
            break
        if lower == b"from" and found is None:
            found = field
    if found is None:
        return None
    return found[0], b" ".join(line.strip() for line in found[1].split(b"\n")).strip()


# --- finding and loading private keys ------------------------------------------------------

@dataclass(frozen=True)
class KeyFile:
    path: str
    selector: str


def under(controldir: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(controldir, path)


def _exists(path: str) -> bool:
    """True when path is a regular file; False when absent; KeyUnreadable for anything else."""
    try:
        info = os.stat(path)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            return False
        raise KeyUnreadable(f"{path}: {error.strerror}") from None
    return stat.S_ISREG(info.st_mode)


def resolve_key(pattern: str, domain: str, controldir: str) -> KeyFile | None:
    """The key file for domain, IndiMail's `%` rules; None = sign nothing (pattern had `%`).

    `%` becomes the domain; if that file is missing the `%` is dropped instead; if that is
    missing too the message goes unsigned. Without `%` a missing file is KeyMissing.
    """
    if "%" not in pattern:
        path = under(controldir, pattern)
        if not _exists(path):
            raise KeyMissing(path)
        return KeyFile(path, os.path.basename(path))
    with_domain = under(controldir, pattern.replace("%", domain))
    if _exists(with_domain):
        return KeyFile(with_domain, os.path.basename(with_domain))
    without = re.sub(r"/{2,}", "/", pattern.replace("%", "")).rstrip("/")
    if without:
        fallback = under(controldir, without)
        if _exists(fallback):
            return KeyFile(fallback, os.path.basename(fallback))
    return None


def domain_key_table(path: str) -> dict[str, str]:
    """A `dkimkeys` control file: lines `domain:keypath[:envstr]`; # comments; missing = empty."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except FileNotFoundError:
        return {}
    except OSError as error:
        raise KeyUnreadable(f"{path}: {error.strerror}") from None
    table: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        domain, _, rest = line.partition(":")
        keypath = rest.split(":", 1)[0].strip()
        clean = valid_domain(domain)
        if clean and keypath:
            table.setdefault(clean, keypath)
    return table


# Parsed keys per process, keyed by the file's identity so an edited key is re-read.
_KEY_CACHE: dict[str, tuple[tuple[int, int, int, int], PrivateKey]] = {}


def load_private_key(path: str) -> PrivateKey:
    """An RSA or Ed25519 private key (PEM, or dkimpy's base64 Ed25519 seed), read safely."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise KeyMissing(path) from None
        raise KeyUnreadable(f"{path}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyUnreadable(f"{path}: not a regular file")
        if info.st_mode & stat.S_IROTH:
            raise KeyUnreadable(f"{path}: readable by everyone (mode {info.st_mode & 0o777:o});"
                                " refusing to use it, run chmod o-rwx on it")
        identity = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_size)
        cached = _KEY_CACHE.get(path)
        if cached and cached[0] == identity:
            return cached[1]
        data = handle.read(1 << 16)
    key = parse_private_key(data, path)
    _KEY_CACHE[path] = (identity, key)
    return key


def parse_private_key(data: bytes, path: str = "key") -> PrivateKey:
    if b"-----BEGIN" in data:
        try:
            # OpenSSL's full RSA key check costs ~0.1 s, paid by every `qmqpd session`
            # process; a test signature verified with the public half catches a broken key
            # (and the faulty signatures that could leak it) for a fraction of that.
            key = serialization.load_pem_private_key(data, password=None,
                                                     unsafe_skip_rsa_key_validation=True)
        except (ValueError, TypeError, UnsupportedAlgorithm) as error:
            raise KeyUnparsable(f"{path}: {error}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise KeyUnparsable(f"{path}: only RSA and Ed25519 keys can sign")
        if isinstance(key, rsa.RSAPrivateKey):
            _self_test(key, path)
        return key
    try:
        seed = base64.b64decode(data.strip(), validate=True)
    except ValueError:
        seed = b""
    if len(seed) != 32:
        raise KeyUnparsable(f"{path}: neither a PEM key nor a base64 Ed25519 seed")
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def _self_test(key: rsa.RSAPrivateKey, path: str) -> None:
    probe = b"qmqpd key self-test"
    try:
        signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
    except (InvalidSignature, ValueError) as error:
        raise KeyUnparsable(f"{path}: RSA key is inconsistent: "
                            f"{str(error) or 'its own signature does not verify'}") from None


def key_kind(key: PrivateKey) -> str:
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"


def problem_verdict(stage: str, error: KeyProblem) -> Verdict:
    """The one answer both signing stages give for a key they cannot use: Z, logged."""
    if isinstance(error, KeyMissing):
        log.event(f"{stage}_key_missing", path=str(error))
        return Verdict.from_reply(Reply.named("key_unreadable", stage=stage))
    if isinstance(error, KeyUnreadable):
        log.event(f"{stage}_key_refused", problem=str(error))
        return Verdict.from_reply(Reply.named("key_unreadable", stage=stage))
    log.event(f"{stage}_key_unparsable", problem=str(error))
    return Verdict.from_reply(Reply.named("key_unusable", stage=stage))


# --- public keys from DNS ------------------------------------------------------------------

_RESOLVERS: dict[tuple[tuple[str, ...], float], dns.resolver.Resolver] = {}


def _resolver(servers: tuple[str, ...], timeout: float) -> dns.resolver.Resolver:
    cached = _RESOLVERS.get((servers, timeout))
    if cached is not None:
        return cached
    if servers:
        resolver = dns.resolver.Resolver(configure=False)
        addresses, ports = [], {}
        for server in servers:
            host, port = split_host_port(server, 53)  # DNS_SERVERS, checked by config
            addresses.append(host)
            ports[host] = port
        resolver.nameservers = addresses
        resolver.nameserver_ports = ports
    else:
        try:
            resolver = dns.resolver.Resolver()
        except dns.resolver.NoResolverConfiguration as error:
            raise DnsTempError(f"no resolver configuration: {error}") from None
    resolver.timeout = timeout
    resolver.lifetime = timeout
    _RESOLVERS[(servers, timeout)] = resolver
    return resolver


def txt_record(name: str, timeout: float, servers: tuple[str, ...] = (),
               lifetime: float | None = None) -> bytes | None:
    """The key record at name (the first TXT with `p=`), None if there is none for sure.
    `lifetime` (at most timeout) bounds the whole lookup, retries included."""
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException:
        return None  # a name that cannot exist in DNS has no key
    try:
        limit = timeout if lifetime is None else max(0.001, min(lifetime, timeout))
        answer = _resolver(servers, timeout).resolve(name, "TXT", search=False, lifetime=limit)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except dns.exception.Timeout:
        raise DnsTempError(f"{name}: DNS timeout after {limit:g}s") from None
    except dns.exception.DNSException as error:
        raise DnsTempError(f"{name}: {type(error).__name__}: {error}") from None
    records = [b"".join(rdata.strings) for rdata in answer]
    for record in records:
        if re.search(rb"(^|;)\s*p\s*=", record):
            return record
    return records[0] if records else None


def dns_lookup(servers: tuple[str, ...], timeout: float) -> TxtLookup:
    def lookup(name: bytes, left: float | None = None) -> bytes | None:
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            return None
        return txt_record(text, timeout, servers, left)

    return lookup


def tag_list(record: bytes) -> dict[bytes, bytes]:
    """A `tag=value; ...` list with whitespace removed from values (DNS key records)."""
    tags: dict[bytes, bytes] = {}
    for part in record.split(b";"):
        name, equals, value = part.partition(b"=")
        if equals:
            tags.setdefault(name.strip(), re.sub(rb"\s+", b"", value))
    return tags


_HOSTNAME: list[str] = []


def authserv_id() -> str:
    """The name in our Authentication-Results headers (RFC 8601 authserv-id)."""
    if not _HOSTNAME:
        _HOSTNAME.append(socket.gethostname() or "localhost")
    return _HOSTNAME[0]


# --- key generation ------------------------------------------------------------------------

def dns_record(key: PrivateKey) -> str:
    """The TXT value to publish. An RSA record has no `h=`, so DomainKeys verifiers accept it."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()


def zone_line(domain: str, selector: str, record: str) -> str:
    """The record as a zone-file line, split into strings of at most 255 bytes."""
    parts = [record[i:i + 255] for i in range(0, len(record), 255)]
    quoted = " ".join(f'"{part}"' for part in parts)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def keygen(domain: str, selector: str, key_type: str = "rsa", bits: int = 2048,
           keydir: str = os.path.join(DEFAULT_CONTROLDIR, "domainkeys"),
           owner: tuple[int, int] | None = None, force: bool = False) -> tuple[str, str]:
    """Write keydir/domain/selector; return (path, TXT value).

    The private key is mode 0600 and, with `owner` (uid, gid; -1 keeps one), owned by the
    user that serves from the moment it has its name; the directories made for it are
    0750 with the same owner, whatever the umask."""
    clean = valid_domain(domain)
    if clean is None:
        raise ValueError(f"not a valid domain: {domain!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", selector):
        raise ValueError(f"not a valid selector: {selector!r}")
    key: PrivateKey
    if key_type == "rsa":
        if not 1024 <= bits <= 8192:
            raise ValueError("RSA key size must be 1024-8192 bits")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif key_type == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"key type must be rsa or ed25519, not {key_type!r}")
    directory = os.path.join(keydir, clean)
    _make_key_dirs(directory, owner)
    path = os.path.join(directory, selector)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(path, pem, 0o600, force, owner)
    record = dns_record(key)
    _write_new(path + ".pub", (zone_line(clean, selector, record) + "\n").encode(), 0o644, True,
               owner)
    return path, record


def _make_key_dirs(directory: str, owner: tuple[int, int] | None) -> None:
    """Make the missing levels of directory, each 0750 (chmod: mkdir's mode goes through
    the umask) and owned by owner; the key's own directory is made 0750 if it existed."""
    missing = []
    level = os.path.abspath(directory)
    while not os.path.isdir(level):
        missing.append(level)
        level = os.path.dirname(level)
    for made in reversed(missing):
        os.mkdir(made, 0o750)
        if owner is not None:
            os.chown(made, owner[0], owner[1])
    os.chmod(directory, 0o750)


def _write_new(path: str, data: bytes, mode: int, replace: bool,
               owner: tuple[int, int] | None = None) -> None:
    """Create the file with its final mode and owner from the start (no window where it is
    readable by others, or named while root owns it); replace=False: FileExistsError if
    path exists."""
    with fsio.atomic_file(path, mode, sync=True, owner=owner, replace=replace) as out:
        out.write(data)


def _owner(user: str | None, group: str | None) -> tuple[int, int] | None:
    if not user and not group:
        return None
    import grp
    import pwd

    uid = pwd.getpwnam(user).pw_uid if user else -1
    gid = grp.getgrnam(group).gr_gid if group else -1
    return uid, gid


def main(argv: Sequence[str] | None = None) -> int:
    """`qmqpd dkim keygen --domain D --selector S [--type rsa|ed25519] [--bits N] ...`."""
    parser = argparse.ArgumentParser(prog="qmqpd dkim", description="DKIM/DomainKeys keys")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("keygen", help="make a private key and print its DNS record")
    gen.add_argument("--domain", required=True)
    gen.add_argument("--selector", default="default")
    gen.add_argument("--type", dest="key_type", choices=("rsa", "ed25519"), default="rsa")
    gen.add_argument("--bits", type=int, default=2048)
    gen.add_argument("--keydir", default=None,
                     help="key directory (default: $CONTROLDIR/domainkeys)")
    gen.add_argument("--user", help="owner of the key (the service user)")
    gen.add_argument("--group", help="group of the key")
    gen.add_argument("--force", action="store_true", help="replace an existing key")
    args = parser.parse_args(argv)
    keydir = args.keydir or os.path.join(
        os.environ.get("CONTROLDIR") or DEFAULT_CONTROLDIR, "domainkeys")
    try:
        path, record = keygen(args.domain, args.selector, args.key_type, args.bits, keydir,
                              _owner(args.user, args.group), args.force)
    except FileExistsError:
        print(f"qmqpd dkim: key {args.selector} for {args.domain} exists; --force replaces it",
              file=sys.stderr)
        return EXIT_PERMANENT
    except (ValueError, KeyError) as error:  # a bad domain, selector, size, user or group
        print(f"qmqpd dkim: {error}", file=sys.stderr)
        return EXIT_PERMANENT
    except OSError as error:  # the key could not be written: try again
        print(f"qmqpd dkim: {error}", file=sys.stderr)
        return EXIT_TEMPORARY
    print(f"# private key: {path}", file=sys.stderr)
    print(zone_line(valid_domain(args.domain) or args.domain, args.selector, record))
    return 0
