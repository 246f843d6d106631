"""DKIM and DomainKeys through the real serving paths, checked by independent verifiers.

Messages go through `qmqpd session` under Debian's tcpserver (and `qmqpd serve` for the
per-rule case); the queued message is then verified by Perl's Mail::DKIM with the public
keys served from a file (no DNS), and Ed25519 by OpenDKIM's opendkim-testmsg inside a
private network namespace. Our own verification stage asks a DNS responder on loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dkim as dkimpy
import pytest

from qmqpd.filters import dk, keys
from qmqpd.filters import dkim as fdkim
from qmqpd.queue import list_messages
from tests.dnsstub import DnsStub, opendkim_in_namespace
from tests.serve_process import ServeProcess
from tests.support import (
    exchange,
    need,
    request,
)

ROOT = Path(__file__).resolve().parents[2]
VERIFIER = ROOT / "tests" / "peers" / "dkim-verify.pl"
MESSAGE = (b"From: Joe Sender <joe@Example.org>\nTo: rcpt@example.net\n"
           b"Subject: a folded\n\tsubject line  \nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
           b"Message-ID: <1@example.org>\nX-Mailer: test 1.0\n\n"
           b"Hello,  \n\tthis body has trailing blanks and tabs.\t\n\n-- \nJoe\n\n\n")

H_TAG = "h=Received:From:To:Subject:Date:Message-ID:X-Mailer;"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CONTROLDIR with domainkeys/example.org/{default (RSA-2048), ed (Ed25519)}."""
    path = tmp_path_factory.mktemp("control")
    keys.keygen("example.org", "default", "rsa", 2048, str(path / "domainkeys"))
    keys.keygen("example.org", "ed", "ed25519", 0, str(path / "domainkeys"))
    return path


def records(control: Path) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for selector in ("default", "ed"):
        key = keys.load_private_key(str(control / "domainkeys" / "example.org" / selector))
        found[f"{selector}._domainkey.example.org"] = keys.dns_record(key)
    return found


@pytest.fixture
def server(queue: Path, control: Path, tcpserver_sessions):
    return lambda **env: tcpserver_sessions(
        {"QUEUEDIR": str(queue), "CONTROLDIR": str(control), "USE_FSYNC": "0",
         "USE_SYNCDIR": "0", **env})


def send(port: int, message: bytes = MESSAGE, source: str | None = None) -> bytes:
    answer = exchange(port, request(message, b"joe@example.org", [b"rcpt@example.net"]),
                      source=source)
    length, _, rest = answer.partition(b":")
    return rest[: int(length)]


def queued(queue: Path) -> list[bytes]:
    found = []
    for item in sorted(list_messages(str(queue)), key=lambda m: int(m.id)):
        qid = int(item.id)
        found.append((queue / "mess" / str(qid % 23) / str(qid)).read_bytes())
    return found


def only_message(queue: Path) -> bytes:
    messages = queued(queue)
    assert len(messages) == 1
    return messages[0]


def mail_dkim(message: bytes, keyrecords: dict[str, str | None], tmp: Path) -> list[str]:
    """Mail::DKIM's line per signature ("DKIM example.org default pass (pass)")."""
    need("perl")
    path = tmp / "records.json"
    path.write_text(json.dumps({k: v for k, v in keyrecords.items() if v is not None}))
    run = subprocess.run(["perl", str(VERIFIER), str(path)],
                         input=message.replace(b"\n", b"\r\n"), capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    return run.stdout.decode().splitlines()


def tamper(message: bytes) -> bytes:
    changed = message.replace(b"this body has", b"this body had")
    assert changed != message
    return changed


# --- signing, checked by Mail::DKIM --------------------------------------------------------

@pytest.mark.parametrize(("env", "kind", "canon"), [
    ({"DKIMSIGN": "", "DKIMSIGNOPTIONS": "-c r"}, "DKIM", "c=relaxed/relaxed"),
    ({"DKIMSIGN": "domainkeys/%/default", "DKIMSIGNOPTIONS": "-c s"}, "DKIM",
     "c=simple/simple"),
    ({"DKSIGN": ""}, "DK", "c=nofws"),
    ({"DKSIGN": "", "DKSIGNOPTIONS": "-c simple"}, "DK", "c=simple"),
    ({"DKSIGN": "", "DKSIGNOPTIONS": "-c nofws -h"}, "DK", H_TAG),
    ({"DKSIGN": "", "DKSIGNOPTIONS": "-c simple -h"}, "DK", H_TAG),
])
def test_signatures_pass_mail_dkim_and_tampering_fails(server, queue: Path, control: Path,
                                                       tmp_path: Path, env: dict[str, str],
                                                       kind: str, canon: str) -> None:
    session = server(**env)
    assert send(session.port).startswith(b"K")
    message = only_message(queue)
    name = b"DKIM-Signature: " if kind == "DKIM" else b"DomainKey-Signature: "
    assert message.startswith(name), message[:200]
    signature = re.match(rb"[^\n]*\n(?:[ \t][^\n]*\n)*", message).group(0).decode()
    assert canon in re.sub(r"\s+", "", signature), signature
    # The signature sits above qmqpd's Received line and uses the queue's LF line ends.
    assert message.index(b"\nReceived: ") > message.index(name)
    assert b"\r" not in message
    results = mail_dkim(message, records(control), tmp_path)
    assert results[0] == f"{kind} example.org default pass (pass)", results
    altered = mail_dkim(tamper(message), records(control), tmp_path)
    assert altered[0].startswith(f"{kind} example.org default fail"), altered


def test_dk_and_dkim_on_one_message_both_pass(server, queue: Path, control: Path,
                                              tmp_path: Path) -> None:
    session = server(DKSIGN="", DKIMSIGN="", DKIMEXPIRE="3600")
    assert send(session.port).startswith(b"K")
    message = only_message(queue)
    assert message.startswith(b"DKIM-Signature: ")
    signature = message.split(b"\nDomainKey-Signature:")[0]
    expires = int(re.search(rb"x=(\d+)", signature).group(1))
    signed_at = int(re.search(rb"t=(\d+)", signature).group(1))
    assert expires - signed_at == 3600
    assert sorted(mail_dkim(message, records(control), tmp_path)) == [
        "DK example.org default pass (pass)", "DKIM example.org default pass (pass)",
        "overall pass"]


def test_rsa_and_ed25519_signatures_at_once(server, queue: Path, control: Path,
                                            tmp_path: Path) -> None:
    session = server(DKIMSIGN="", DKIMSIGNEXTRA="domainkeys/%/ed")
    assert send(session.port).startswith(b"K")
    message = only_message(queue)
    assert message.count(b"DKIM-Signature: ") == 2
    assert b"a=ed25519-sha256" in message and b"a=rsa-sha256" in message
    lines = mail_dkim(message, records(control), tmp_path)
    assert "DKIM example.org default pass (pass)" in lines
    # Debian 12's Mail::DKIM has no Ed25519; our verifier checks that signature too.
    stub = DnsStub(records(control))
    try:
        results = fdkim.verify_message(message, keys.dns_lookup((stub.address,), 2.0))
    finally:
        stub.close()
    assert sorted((r.selector, r.letter) for r in results) == [("default", "A"), ("ed", "A")]


def test_ed25519_signature_passes_opendkim(server, queue: Path, control: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("opendkim-testmsg"):
        pytest.skip("opendkim-testmsg runs offline only as root in a private namespace "
                    "(unshare -mn) and needs opendkim-tools")
    session = server(DKIMSIGN="domainkeys/%/ed")
    assert send(session.port).startswith(b"K")
    message = only_message(queue)
    assert b"a=ed25519-sha256" in message and b"s=ed;" in message
    wire = message.replace(b"\n", b"\r\n")
    code, output = opendkim_in_namespace(wire, records(control))
    assert (code, output) == (0, "")
    code, output = opendkim_in_namespace(tamper(wire), records(control))
    assert code != 0 and "Bad signature" in output


# --- keys that are missing, unsafe, or out of reach ----------------------------------------

# A key named without `%` is checked when the session's plan is made, before the message
# is read: the client gets Z (nothing is lost) and the log names the setting and the file.
CONFIG_Z = b"Zqq unable to read configuration (#4.3.0)"


def test_missing_key_without_percent_is_a_temporary_failure(server, queue: Path,
                                                            tmp_path: Path) -> None:
    session = server(DKIMSIGN=str(tmp_path / "no-such-key"))
    assert send(session.port) == CONFIG_Z
    assert queued(queue) == []
    assert (f"DKIMSIGN (dkimsign) from environment: key file {tmp_path / 'no-such-key'} "
            "does not exist") in session.log.read_text()


def test_missing_key_with_percent_queues_unsigned(server, queue: Path) -> None:
    session = server(DKIMSIGN="domainkeys/%/default", DKSIGN="domainkeys/%/default")
    other = MESSAGE.replace(b"joe@Example.org", b"joe@other.example")
    assert send(session.port, other).startswith(b"K")
    message = only_message(queue)
    assert message.startswith(b"Received: ")
    assert "no key for domain" in session.log.read_text()


def test_missing_domainkeys_key_without_percent_is_a_config_error(server, queue: Path,
                                                                   tmp_path: Path) -> None:
    session = server(DKSIGN=str(tmp_path / "no-such-key"))
    assert send(session.port) == CONFIG_Z
    assert queued(queue) == []
    assert "DKSIGN (dksign) from environment: key file" in session.log.read_text()


def test_world_readable_key_is_refused_with_a_log_line(server, queue: Path, control: Path,
                                                       tmp_path: Path) -> None:
    loose = tmp_path / "loose"
    shutil.copy(control / "domainkeys" / "example.org" / "default", loose)
    loose.chmod(0o644)
    session = server(DKIMSIGN=str(loose))
    assert send(session.port) == CONFIG_Z
    assert queued(queue) == []
    log = session.log.read_text()
    assert "DKIMSIGN (dkimsign) from environment" in log and "readable by everyone" in log


def test_crafted_from_domain_never_reaches_the_filesystem(server, queue: Path,
                                                          tmp_path: Path) -> None:
    # A usable key waits where `domainkeys/../../etc/default` would lead.
    base = tmp_path / "base"
    (base / "domainkeys").mkdir(parents=True)
    bait = base / "domainkeys" / ".." / ".." / "etc"
    bait.mkdir(parents=True)
    keys.keygen("example.org", "default", "rsa", 1024, str(tmp_path / "made"))
    shutil.copy(tmp_path / "made" / "example.org" / "default", bait / "default")
    session = server(DKIMSIGN=str(base / "domainkeys" / "%" / "default"),
                     DKSIGN=str(base / "domainkeys" / "%" / "default"))
    for crafted in (b"x@../../etc", b"<x@../../etc>", b"x@a/../../../etc"):
        message = MESSAGE.replace(b"Joe Sender <joe@Example.org>", crafted)
        assert send(session.port, message).startswith(b"K")
    messages = queued(queue)
    assert len(messages) == 3
    assert all(m.startswith(b"Received: ") for m in messages)
    assert session.log.read_text().count("signing domain is not a hostname") == 6


# --- verification --------------------------------------------------------------------------

def sign_offline(control: Path, message: bytes = MESSAGE) -> bytes:
    headers, body = dkimpy.rfc822_parse(message)
    key = keys.load_private_key(str(control / "domainkeys" / "example.org" / "default"))
    header = fdkim.sign_message(headers, body, b"example.org", b"default", key, b"rsa-sha256",
                                fdkim.headers_to_sign(headers, ()), fdkim.SignOptions(),
                                int(time.time()))
    return header + message


def dk_sign_offline(control: Path, message: bytes = MESSAGE) -> bytes:
    key = keys.load_private_key(str(control / "domainkeys" / "example.org" / "default"))
    assert isinstance(key, dk.rsa.RSAPrivateKey)
    return dk.sign_message(message, "example.org", "default", key, dk.DkOptions()) + message


def authentication_results(message: bytes) -> str:
    head = message.split(b"\nReceived: ")[0].decode()
    return re.sub(r"\s+", " ", head)


def by_kind(messages: list[bytes], signature: bytes) -> list[str]:
    """The Authentication-Results of the signed, the tampered and the unsigned message, in
    that order (queue ids are inode numbers: their order is not the order of sending)."""
    def kind(message: bytes) -> int:
        return 2 if signature not in message else 1 if b"this body had" in message else 0

    assert sorted(kind(m) for m in messages) == [0, 1, 2]
    return [authentication_results(m) for m in sorted(messages, key=kind)]


@pytest.fixture
def dns(control: Path) -> Iterator[DnsStub]:
    stub = DnsStub(records(control))
    yield stub
    stub.close()


def test_dkim_verification_results_and_letters(server, queue: Path, control: Path,
                                               dns: DnsStub) -> None:
    signed = sign_offline(control)
    lenient = server(DKIMVERIFY="", DNS_SERVERS=dns.address)
    for message in (signed, tamper(signed), MESSAGE):
        assert send(lenient.port, message).startswith(b"K")
    results = by_kind(queued(queue), b"DKIM-Signature:")
    assert re.match(r"Authentication-Results: \S+; dkim=pass header.d=example.org "
                    r'header.s=default header.b=(?:[\w+]{8}|"[\w+/]{8}")$', results[0]), \
        results[0]
    assert re.match(r'Authentication-Results: \S+; dkim=fail reason="body hash mismatch" '
                    r"header.d=example.org", results[1]), results[1]
    assert re.match(r"Authentication-Results: \S+; dkim=none$", results[2]), results[2]
    strict = server(DKIMVERIFY="GHIKLMNOQRTUVWjps", DNS_SERVERS=dns.address)
    assert send(strict.port, tamper(signed)) == b"Ddkim: body hash mismatch (#5.7.1)"
    assert send(strict.port, MESSAGE) == b"Zdkim: no signatures (#4.7.1)"
    assert send(strict.port, signed).startswith(b"K")
    assert len(queued(queue)) == 4


def test_dkim_dns_failure_is_temporary_never_a_pass(server, queue: Path, control: Path) -> None:
    silent = DnsStub({"default._domainkey.example.org": None})
    try:
        session = server(DKIMVERIFY="p", DNS_SERVERS=silent.address, DNS_TIMEOUT="0.5")
        answer = send(session.port, sign_offline(control))
    finally:
        silent.close()
    assert answer.startswith(b"Zdkim: ") and answer.endswith(b"(#4.7.1)")
    assert b"timeout" in answer.lower()
    assert queued(queue) == []


def test_dk_verification_results_and_letters(server, queue: Path, control: Path,
                                             dns: DnsStub) -> None:
    signed = dk_sign_offline(control)
    lenient = server(DKVERIFY="", DNS_SERVERS=dns.address)
    for message in (signed, tamper(signed), MESSAGE):
        assert send(lenient.port, message).startswith(b"K")
    results = by_kind(queued(queue), b"DomainKey-Signature:")
    assert re.match(r"Authentication-Results: \S+; domainkeys=pass header.d=example.org$",
                    results[0]), results[0]
    assert "domainkeys=fail" in results[1] and "domainkeys=none" in results[2]
    strict = server(DKVERIFY="BDEGIJKfhc", DNS_SERVERS=dns.address)
    assert send(strict.port, tamper(signed)) == b"Ddk: bad signature (#5.7.1)"
    assert send(strict.port, MESSAGE) == b"Zdk: no signature (#4.7.1)"


def test_results_claiming_our_id_are_replaced_by_ours(server, queue: Path, control: Path,
                                                      dns: DnsStub) -> None:
    """A client's Authentication-Results under our authserv-id (the host name) is removed;
    one under another id stays; ours reads back as one result per signature."""
    ours = keys.authserv_id()
    forged = (f"Authentication-Results: {ours};\n\tdkim=pass header.d=paypal.com\n"
              f'Authentication-Results: "{ours.upper()}"; dkim=pass\n'
              f"Authentication-Results: {ours}.example; dkim=pass\n").encode()
    session = server(DKIMVERIFY="", DKVERIFY="", DNS_SERVERS=dns.address)
    assert send(session.port, sign_offline(control, forged + MESSAGE)).startswith(b"K")
    message = only_message(queue)
    head = message.split(b"\nReceived: ")[0] + b"\n"
    fields = re.findall(rb"Authentication-Results:[^\n]*\n(?:\t[^\n]*\n)*", head)
    assert len(fields) == 2, head  # ours: domainkeys, then dkim
    assert b"paypal" not in message and f'"{ours.upper()}"'.encode() not in message
    assert f"Authentication-Results: {ours}.example; dkim=pass\n".encode() in message
    for field, method in zip(fields, ("dkim", "domainkeys"), strict=True):
        read = parse_results(field)
        assert read["id"] == ours
        [(found, result, _properties)] = read["results"]
        assert (found, result) == (method, "pass" if method == "dkim" else "none")
    assert "dk_results_removed=2" in session.log.read_text()  # DK runs first


def parse_results(header: bytes) -> dict:
    run = subprocess.run(["perl", str(ROOT / "tests" / "peers" / "authres-parse.pl")],
                         input=header, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    return json.loads(run.stdout)


# --- per client rule, through `qmqpd serve` ------------------------------------------------

def test_rule_env_signs_for_one_client_only(tmp_path: Path, queue: Path, control: Path) -> None:
    rules_text = tmp_path / "rules.txt"
    rules_text.write_text('127.0.0.2:allow,DKIMSIGN=""\n127.0.0.1:allow\n')
    rules_cdb = tmp_path / "rules.cdb"
    with open(rules_text, "rb") as text:
        subprocess.run([need("tcprules"), str(rules_cdb), str(tmp_path / "rules.tmp")],
                       stdin=text, check=True, timeout=30)
    server = ServeProcess(tmp_path, queue, controldir=str(control),
                          rules=str(rules_cdb), use_fsync=False, use_syncdir=False,
                          prefork=2, status_file=None).start()
    try:
        assert send(server.port, source="127.0.0.2").startswith(b"K")
        assert send(server.port, source="127.0.0.1").startswith(b"K")
    finally:
        server.stop()
    # queue ids are inode numbers: their order is not the order of arrival
    first, second = sorted(queued(queue), key=lambda m: b"from unknown (127.0.0.1)" in m)
    assert first.startswith(b"DKIM-Signature: ")
    assert second.startswith(b"Received: from unknown (127.0.0.1)")
    assert mail_dkim(first, records(control), tmp_path)[0] == \
        "DKIM example.org default pass (pass)"
