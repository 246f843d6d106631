"""DKIM/DomainKeys building blocks: dkimpy-identical signatures, options, key paths, keygen,
domain validation, and our verifier against a real DNS responder on loopback."""

from __future__ import annotations

import base64
import hashlib
import os
import pwd
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import dkim as dkimpy
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmqpd.config import ConfigError
from qmqpd.filters import dk, keys, mailstream
from qmqpd.filters import dkim as fdkim
from tests.dnsstub import DnsStub

MESSAGE = (b"From: Joe <joe@Example.org>\nTo: a@b.example\nSubject:  hello\n   folded  \n"
           b"X-Mailer: test\nX-Spam: no\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
           b"Received: from somewhere\n\nbody  line \n\twith tab\n\n\n")


@pytest.fixture(scope="module")
def keydir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys")
    keys.keygen("example.org", "rsa", "rsa", 2048, str(path))
    keys.keygen("example.org", "ed", "ed25519", 0, str(path))
    return path


def rsa_key(keydir: Path) -> keys.PrivateKey:
    return keys.load_private_key(str(keydir / "example.org" / "rsa"))


def ed_key(keydir: Path) -> keys.PrivateKey:
    return keys.load_private_key(str(keydir / "example.org" / "ed"))


def dkimpy_and_ours(message: bytes, key_path: Path, key: keys.PrivateKey, algorithm: bytes,
                    canon: bytes) -> tuple[bytes, bytes]:
    headers, body = dkimpy.rfc822_parse(message)
    include = fdkim.headers_to_sign(headers, ())
    if algorithm.startswith(b"ed25519"):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        secret = base64.b64encode(raw)
    else:
        secret = key_path.read_bytes()
    reference = dkimpy.sign(message, key_path.name.encode(), b"example.org", secret,
                            canonicalize=tuple(canon.split(b"/")), include_headers=include,
                            signature_algorithm=algorithm, linesep=b"\n")
    when = int(re.search(rb"\bt=(\d+)", reference).group(1))
    ours = fdkim.sign_message(headers, body, b"example.org", key_path.name.encode(), key,
                              algorithm, include,
                              fdkim.SignOptions(canonicalize=canon, expire=None), when)
    return reference, ours


@pytest.mark.parametrize("canon", [b"relaxed/relaxed", b"simple/simple", b"relaxed/simple",
                                   b"simple/relaxed"])
@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"rsa-sha1"])
def test_rsa_signature_is_byte_identical_to_dkimpy(keydir: Path, canon: bytes,
                                                   algorithm: bytes) -> None:
    reference, ours = dkimpy_and_ours(MESSAGE, keydir / "example.org" / "rsa", rsa_key(keydir),
                                      algorithm, canon)
    assert ours == reference
    assert b"\r" not in ours and ours.endswith(b"\n")


def test_ed25519_signature_is_byte_identical_to_dkimpy(keydir: Path) -> None:
    reference, ours = dkimpy_and_ours(MESSAGE, keydir / "example.org" / "ed", ed_key(keydir),
                                      b"ed25519-sha256", b"relaxed/relaxed")
    assert ours == reference


header_text = st.text(st.sampled_from("abc XYZ\t;:=@.-"), min_size=0, max_size=60)
body_line = st.text(st.sampled_from("ab \t.-xyz"), max_size=50)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(subject=header_text, extra=header_text, lines=st.lists(body_line, max_size=8),
       canon=st.sampled_from([b"relaxed/relaxed", b"simple/simple"]))
def test_signatures_match_dkimpy_for_any_message(keydir: Path, subject: str, extra: str,
                                                 lines: list[str], canon: bytes) -> None:
    message = (f"From: a@example.org\nSubject: {subject}\n\t{extra}\nTo: b@example.net\n\n"
               + "".join(line + "\n" for line in lines)).encode()
    reference, ours = dkimpy_and_ours(message, keydir / "example.org" / "rsa", rsa_key(keydir),
                                      b"rsa-sha256", canon)
    assert ours == reference


def test_headers_to_sign_follows_qmail_dkim() -> None:
    headers, _ = dkimpy.rfc822_parse(MESSAGE + b"")
    headers.insert(0, [b"Authentication-Results", b" x\r\n"])
    headers.append([b"List-Id", b" x\r\n"])
    names = fdkim.headers_to_sign(headers, (b"list-",))
    assert names == [b"from", b"to", b"subject", b"x-mailer", b"date"]
    assert fdkim.headers_to_sign([[b"To", b" x\r\n"]], ()) == [b"to", b"from"]


def test_sign_options() -> None:
    options = fdkim.parse_sign_options("-c s -z 3 -l -i joe@example.org -x 60")
    assert options.canonicalize == b"simple/simple"
    assert options.algorithms == (b"rsa-sha1", b"rsa-sha256")
    assert options.length and options.identity == b"joe@example.org" and options.expire == 60
    assert fdkim.parse_sign_options("").expire == fdkim.DEFAULT_EXPIRE
    assert fdkim.parse_sign_options("-x -").expire is None
    assert fdkim.parse_sign_options("-x 60", "").expire is None  # DKIMEXPIRE="" wins
    assert fdkim.parse_sign_options("", 30).expire == 30
    for bad in ("-c q", "-z 9", "-k", "-h", "stray"):
        with pytest.raises(ConfigError, match="DKIMSIGNOPTIONS"):
            fdkim.parse_sign_options(bad)
    assert dk.parse_options("-c simple -h -b 8") == dk.DkOptions("simple", True, None)
    with pytest.raises(ConfigError, match="DKSIGNOPTIONS"):
        dk.parse_options("-c relaxed")


# --- domains and key paths -----------------------------------------------------------------

@pytest.mark.parametrize("raw", ["../../etc", "a/b", "..", "a..b", ".", "", "-a.org", "a_b.org",
                                 "x" * 64 + ".org", ("a." * 130) + "org", "exa mple.org",
                                 "ex\x00ample.org", "é.org"])
def test_bad_signing_domains_are_refused(raw: str) -> None:
    assert keys.valid_domain(raw) is None


def test_good_signing_domain_is_lowercased() -> None:
    assert keys.valid_domain("Mail.Example.ORG.") == "mail.example.org"
    assert keys.address_domain(b'"Joe" <joe@Example.org>') == "Example.org"


@given(st.text(max_size=80))
def test_an_accepted_domain_can_never_leave_the_key_directory(raw: str) -> None:
    domain = keys.valid_domain(raw)
    if domain is not None:
        assert "/" not in domain and ".." not in domain and domain == domain.lower()
        assert os.path.normpath(os.path.join("/k", domain, "d")).startswith("/k/")


def write_key(path: Path, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys._write_new(str(path), b"not used", mode, True)
    return path


def test_percent_rules(tmp_path: Path) -> None:
    write_key(tmp_path / "domainkeys" / "example.org" / "default")
    found = keys.resolve_key("domainkeys/%/default", "example.org", str(tmp_path))
    assert found == keys.KeyFile(str(tmp_path / "domainkeys/example.org/default"), "default")
    # no key for the domain and none without the %: sign nothing
    assert keys.resolve_key("domainkeys/%/default", "other.org", str(tmp_path)) is None
    # the % removed: domainkeys/default
    write_key(tmp_path / "domainkeys" / "default")
    found = keys.resolve_key("domainkeys/%/default", "other.org", str(tmp_path))
    assert found and found.path == str(tmp_path / "domainkeys" / "default")
    # % last: the selector is the domain
    write_key(tmp_path / "sel" / "example.org")
    found = keys.resolve_key(str(tmp_path / "sel" / "%"), "example.org", "/nonexistent")
    assert found and found.selector == "example.org"
    with pytest.raises(keys.KeyMissing):
        keys.resolve_key("domainkeys/missing", "example.org", str(tmp_path))


def test_world_readable_key_is_refused(tmp_path: Path, keydir: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes((keydir / "example.org" / "rsa").read_bytes())
    path.chmod(0o644)
    with pytest.raises(keys.KeyUnreadable, match="readable by everyone"):
        keys.load_private_key(str(path))
    path.chmod(0o600)
    assert keys.key_kind(keys.load_private_key(str(path))) == "rsa"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(keys.KeyUnparsable):
        keys.load_private_key(str(path))


def test_inconsistent_rsa_key_is_refused(keydir: Path) -> None:
    good = rsa_key(keydir).private_numbers()
    public = rsa.RSAPublicNumbers(3, good.public_numbers.n)  # e does not match d
    broken = rsa.RSAPrivateNumbers(good.p, good.q, good.d, good.dmp1, good.dmq1, good.iqmp,
                                   public).private_key(unsafe_skip_rsa_key_validation=True)
    pem = broken.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    with pytest.raises(keys.KeyUnparsable, match="does not verify"):
        keys.parse_private_key(pem)


def test_dkimkeys_table(tmp_path: Path) -> None:
    table = tmp_path / "dkimkeys"
    table.write_text("# comment\nExample.org:/keys/%/s1:DKIMSIGNOPTIONS=x\nbad/dom:/x\n")
    assert keys.domain_key_table(str(table)) == {"example.org": "/keys/%/s1"}
    assert keys.domain_key_table(str(tmp_path / "missing")) == {}


def test_keygen_writes_safe_files_and_records(tmp_path: Path) -> None:
    path, record = keys.keygen("Example.ORG", "s2024", "rsa", 1024, str(tmp_path))
    assert path == str(tmp_path / "example.org" / "s2024")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "example.org").st_mode) == 0o750
    assert record.startswith("v=DKIM1; k=rsa; p=") and "h=" not in record
    public = serialization.load_der_public_key(base64.b64decode(record.split("p=")[1]))
    assert public.key_size == 1024
    with pytest.raises(FileExistsError):
        keys.keygen("example.org", "s2024", "rsa", 1024, str(tmp_path))
    _, ed_record = keys.keygen("example.org", "e", "ed25519", 0, str(tmp_path))
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/]{43}=", ed_record)
    with pytest.raises(ValueError):
        keys.keygen("../etc", "s", "rsa", 2048, str(tmp_path))


def test_keygen_modes_hold_under_umask_000(tmp_path: Path) -> None:
    """`qmqpd dkim keygen` run with umask 000 (and the key directory not there yet): the
    key is 0600, every directory it made 0750, nothing writable or readable by others."""
    keydir = tmp_path / "control" / "domainkeys"
    code = ("import os, sys; os.umask(0); from qmqpd.filters import keys; "
            "sys.exit(keys.main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "keygen", "--domain", "example.org",
                          "--selector", "s1", "--type", "ed25519", "--keydir", str(keydir)],
                         capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr
    mode = lambda path: stat.S_IMODE(os.stat(path).st_mode)  # noqa: E731
    assert mode(keydir / "example.org" / "s1") == 0o600
    assert [mode(d) for d in (tmp_path / "control", keydir, keydir / "example.org")] == \
        [0o750] * 3
    assert mode(keydir / "example.org" / "s1.pub") == 0o644
    # an existing, too open key directory is closed as well
    (keydir / "example.org").chmod(0o777)
    keys.keygen("example.org", "s2", "ed25519", 0, str(keydir))
    assert mode(keydir / "example.org") == 0o750


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")
def test_keygen_user_owns_the_key_and_its_directories(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    keydir = tmp_path / "domainkeys"
    assert keys.main(["keygen", "--domain", "example.org", "--selector", "s1", "--type",
                      "ed25519", "--keydir", str(keydir), "--user", "nobody"]) == 0
    for item in (keydir, keydir / "example.org", keydir / "example.org" / "s1"):
        assert os.stat(item).st_uid == nobody.pw_uid, item
    assert stat.S_IMODE(os.stat(keydir / "example.org" / "s1").st_mode) == 0o600


def test_keygen_main_prints_the_zone_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = keys.main(["keygen", "--domain", "example.com", "--selector", "s1", "--bits", "1024",
                      "--keydir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith('s1._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert all(len(part) <= 255 for part in re.findall(r'"([^"]*)"', out))
    # the key exists: a permanent failure, qmail's 100 (--force replaces it)
    assert keys.main(["keygen", "--domain", "example.com", "--selector", "s1",
                      "--keydir", str(tmp_path)]) == 100


# --- DomainKeys canonicalisation -----------------------------------------------------------

def test_dk_canonicalisation_in_words() -> None:
    """hash_data hashes exactly the bytes RFC 4870 describes for each method."""
    def signed(message: bytes, method: str, names: list[bytes] | None = None) -> bytes:
        parsed = mailstream.split([message])
        return dk.hash_data(parsed.fields, parsed.body, method, names)

    message = b"From: a@b\nSubject: x\n  y \n\n l1 \n\n\n"
    assert signed(message, "simple") == hashlib.sha1(
        b"From: a@b\r\nSubject: x\r\n  y \r\n\r\n l1 \r\n").digest()
    assert signed(message, "nofws") == hashlib.sha1(
        b"From:a@b\r\nSubject:xy\r\n\r\nl1\r\n").digest()
    assert signed(message, "nofws", [b"subject"]) == hashlib.sha1(
        b"Subject:xy\r\n\r\nl1\r\n").digest()
    assert signed(b"From: a@b\n\n \n\t\n", "nofws") == hashlib.sha1(b"From:a@b\r\n").digest()


# --- our verifier, keys served by a real DNS responder on loopback --------------------------

@pytest.fixture
def signed(keydir: Path) -> bytes:
    headers, body = dkimpy.rfc822_parse(MESSAGE)
    include = fdkim.headers_to_sign(headers, ())
    header = fdkim.sign_message(headers, body, b"example.org", b"rsa", rsa_key(keydir),
                                b"rsa-sha256", include, fdkim.SignOptions(), int(time.time()))
    return header + MESSAGE


def test_dkim_verify_results_through_dns(keydir: Path, signed: bytes) -> None:
    record = keys.dns_record(rsa_key(keydir))
    stub = DnsStub({"rsa._domainkey.example.org": record})
    try:
        lookup = keys.dns_lookup((stub.address,), 2.0)
        assert [r.letter for r in fdkim.verify_message(signed, lookup)] == ["A"]
        tampered = signed.replace(b"body  line", b"body line!")
        assert [r.letter for r in fdkim.verify_message(tampered, lookup)] == ["U"]
        assert [r.letter for r in fdkim.verify_message(signed.replace(b"hello", b"HELLO"),
                                                       lookup)] == ["I"]
        assert fdkim.verify_message(MESSAGE, lookup) == []
        assert fdkim.overall_letter([]) == "S"
        other = signed.replace(b"s=rsa;", b"s=nokey;")
        assert [r.letter for r in fdkim.verify_message(other, lookup)] == ["Q"]
        header = fdkim.authentication_results("mx.test", fdkim.verify_message(signed, lookup))
        assert re.fullmatch(rb"Authentication-Results: mx\.test;\n\tdkim=pass header\.d="
                            rb"example\.org header\.s=rsa header\.b=(?:[\w+]{8}|\"[\w+/]{8}\")\n",
                            header)
    finally:
        stub.close()


def test_dns_timeout_is_a_temporary_result(keydir: Path, signed: bytes) -> None:
    stub = DnsStub({"rsa._domainkey.example.org": None})  # never answers
    try:
        results = fdkim.verify_message(signed, keys.dns_lookup((stub.address,), 0.3))
    finally:
        stub.close()
    assert [r.letter for r in results] == ["P"]
    assert results[0].result == "temperror"
