"""Authentication-Results (RFC 8601) that no client can forge: values copied from a
signature come out as tokens or quoted-strings, read back by an independent parser
(Mail::AuthenticationResults), and incoming headers that claim our authserv-id are removed
before ours is added, from memory and from a spool file alike. Also: the header block that
both stages share is the one mailstream.split reads from the whole message."""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmqpd.filters import dk, keys, mailstream, pipeline, signing
from qmqpd.filters import dkim as fdkim
from qmqpd.message import Message, MessageData
from tests.support import need

ROOT = Path(__file__).resolve().parents[2]
PARSER = ROOT / "tests" / "peers" / "authres-parse.pl"
OURS = "mx.test"
BODY = b"From: joe@example.org\nTo: a@example.net\n\nbody\n"


def parse(header: bytes) -> dict[str, object]:
    """What Mail::AuthenticationResults reads in the header."""
    need("perl")
    run = subprocess.run(["perl", str(PARSER)], input=header, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr.decode()
    return json.loads(run.stdout)


def message_of(data: bytes, spooled: bool = False) -> Message:
    if spooled:
        spool = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the message
        spool.write(data)
        spool.flush()
        content = MessageData(spool=spool)
    else:
        content = MessageData(data=data)
    return Message(b"joe@example.org", [b"a@example.net"], content,
                   received=b"Received: from unknown (127.0.0.1)\n  by test with QMQP\n")


def no_key(_name: bytes, _left: float | None) -> None:
    return None


# --- values copied from a signature --------------------------------------------------------

@pytest.mark.parametrize(("text", "written"), [
    ("example.org", "example.org"),
    ("x dkim=pass header.d=paypal.com", '"x dkim=pass header.d=paypal.com"'),
    ("ab/cdefg", '"ab/cdefg"'),
    ("a;b", '"a;b"'),
    ('say "hi" \\o/', '"say \'hi\' \\\\o/"'),
    ("line\r\nbreak\x00\x7f\u00e9", '"line  break???"'),
    ("", '""'),
])
def test_values_are_tokens_or_quoted_strings(text: str, written: str) -> None:
    assert signing.value(text) == written


def test_a_long_value_is_cut_and_quoted() -> None:
    written = signing.value("a" * 1000)
    assert written == '"' + "a" * signing.VALUE_LIMIT + '"'


FORGED_DKIM = [
    # (signature field, what header.s / header.d must read back as)
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=x dkim=pass header.d=paypal.com;"
     b" h=from; bh=AAAA; b=ab/cdefg\n", ("example.org", "x dkim=pass header.d=paypal.com")),
    (b"DKIM-Signature: v=1; a=rsa-sha256; d=exa\"mple.org\r\n dkim=pass; s=x\r\n\tdkim=pass;"
     b" h=from; bh=AAAA; b=ab/cdefg\n", ("exa'mple.org   dkim=pass", "x   dkim=pass")),
]


@pytest.mark.parametrize(("field", "expected"), FORGED_DKIM)
def test_a_forged_dkim_selector_or_domain_stays_one_result(field: bytes,
                                                           expected: tuple[str, str]) -> None:
    stage = fdkim.DkimStage(verify_letters="", lookup=no_key, authserv_id=OURS)
    verdict = stage.process(message_of(field + BODY))
    (header,) = verdict.headers
    assert b"\r" not in header
    assert all(line.startswith(b"\t") for line in header.split(b"\n")[1:-1])
    read = parse(header)
    assert read["id"] == OURS
    [(method, result, properties)] = read["results"]
    assert (method, result) == ("dkim", "permerror")
    found = dict(properties)
    assert (found["header.d"], found["header.s"]) == expected
    assert found["header.b"] == "ab/cdefg"
    assert "dkim" not in found


def test_a_forged_domainkeys_domain_stays_one_result() -> None:
    field = b"DomainKey-Signature: a=rsa-sha1; d=x dkim=pass header.d=paypal.com; s=s; b=AAAA\n"
    stage = dk.DkStage(verify_letters="", lookup=no_key, authserv_id=OURS)
    (header,) = stage.process(message_of(field + BODY)).headers
    [(method, result, properties)] = parse(header)["results"]
    assert (method, result) == ("domainkeys", "fail")
    assert dict(properties)["header.d"] == "xdkim=passheader.d=paypal.com"


def test_our_own_results_read_back_as_written() -> None:
    results = [fdkim.SignatureResult("A", "example.org", "s1", "rsa-sha256", "AbCd+123"),
               fdkim.SignatureResult("U", "example.net", "s2", "rsa-sha256", "Zz/9abcd")]
    read = parse(fdkim.authentication_results(OURS, results))
    assert read == {"id": OURS, "results": [
        ["dkim", "pass", [["header.d", "example.org"], ["header.s", "s1"],
                          ["header.b", "AbCd+123"]]],
        ["dkim", "fail", [["reason", "body hash mismatch"], ["header.d", "example.net"],
                          ["header.s", "s2"], ["header.b", "Zz/9abcd"]]]]}


# --- incoming headers that claim our authserv-id -------------------------------------------

CLAIMING = [
    b"Authentication-Results: mx.test; dkim=pass header.d=paypal.com\n",
    b"Authentication-Results: MX.Test;\n\tdkim=pass header.d=paypal.com\n",
    b"Authentication-Results:\n mx.test;\n  dkim=pass\n",
    b'Authentication-Results: "mx.test"; dkim=pass\n',
    b'Authentication-Results: " mx\\.test"; dkim=pass\n',
    b"Authentication-Results: (a (nested) comment)\r\n mx.test 1; dkim=pass\n",
    b"authentication-results: mx.test(no space); spf=pass\n",
]
NOT_CLAIMING = [
    b"Authentication-Results: mx.test.evil; dkim=pass\n",
    b"Authentication-Results: mx.testing; dkim=pass\n",
    b"Authentication-Results: other.example; dkim=pass\n",
    b'Authentication-Results: "mx.test.evil"; dkim=pass\n',
    b"X-Authentication-Results: mx.test; dkim=pass\n",
    b"ARC-Authentication-Results: i=1; mx.test; dkim=pass\n",
]


@pytest.mark.parametrize("field", CLAIMING)
def test_a_claiming_header_is_recognised(field: bytes) -> None:
    payload = field.partition(b":")[2]
    assert signing.claims(payload, OURS)


@pytest.mark.parametrize("field", NOT_CLAIMING[:4])
def test_another_authserv_id_is_not_ours(field: bytes) -> None:
    payload = field.partition(b":")[2]
    assert not signing.claims(payload, OURS)


STAGES = {
    "dk": lambda: dk.DkStage(verify_letters="", lookup=no_key, authserv_id=OURS),
    "dkim": lambda: fdkim.DkimStage(verify_letters="", lookup=no_key, authserv_id=OURS),
}


@pytest.mark.parametrize("spooled", [False, True], ids=["memory", "spool"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_claiming_headers_are_removed_and_the_rest_kept_byte_for_byte(
        stage: str, spooled: bool) -> None:
    kept = [b"From: joe@example.org\r\n", *NOT_CLAIMING, b"Subject: folded\n\tline\n"]
    head = [line for pair in itertools.zip_longest(kept, CLAIMING) for line in pair if line]
    data = b"".join(head) + b"\nbody\n" + b"x" * 200_000 + b"\n"
    message = message_of(data, spooled)
    verdict = STAGES[stage]().process(message)
    assert verdict.facts["results_removed"] == len(CLAIMING)
    expected = b"".join(kept) + b"\nbody\n" + b"x" * 200_000 + b"\n"
    assert message.data.bytes() == expected
    assert message.data.size == len(expected)
    (ours,) = [h for h in verdict.headers if h.startswith(b"Authentication-Results:")]
    assert parse(ours)["id"] == OURS
    message.close()


def test_nothing_is_removed_when_only_signing(tmp_path: Path) -> None:
    data = CLAIMING[0] + BODY
    message = message_of(data)
    stage = fdkim.DkimStage(signs=[signing.KeySpec(str(tmp_path / "%" / "none"), "DKIMSIGN",
                                                   fdkim.SignOptions())])
    assert stage.process(message).action == "accept"
    assert message.data.bytes() == data


# --- one parse of the header block for every stage -----------------------------------------

HEAD_LINE = st.sampled_from([b"From: a@example.org", b"To: b", b" folded", b"\tmore",
                             b"From mbox line", b"no colon", b"X-A:", b"\r"])


@settings(max_examples=300, deadline=None)
@given(stage_headers=st.lists(st.sampled_from([b"X-One: 1\n", b"X-Two: 2\n  two\n"]),
                              max_size=2),
       received=st.sampled_from([b"", b"Received: by test\n"]),
       lines=st.lists(HEAD_LINE, max_size=6), crlf=st.booleans(),
       body=st.sampled_from([b"", b"body\n", b"\n\n", b"a\r\nb"]))
def test_the_shared_view_is_split_of_the_whole_message(stage_headers: list[bytes],
                                                       received: bytes, lines: list[bytes],
                                                       crlf: bool, body: bytes) -> None:
    end = b"\r\n" if crlf else b"\n"
    data = b"".join(line + end for line in lines) + end + body
    message = Message(b"s", [b"r"], MessageData(data=data), received=received,
                      headers=list(stage_headers))
    try:
        expected = mailstream.split(message.final_chunks())
    except mailstream.MalformedHeader:
        with pytest.raises(mailstream.MalformedHeader):
            signing.header_view(message)
        return
    for _ in range(2):  # the second time from the cache
        view = signing.header_view(message)
        assert view.fields == expected.fields
        assert b"".join(view.body) == b"".join(mailstream.split(message.final_chunks()).body)


def test_dk_and_dkim_verifying_and_signing_parse_the_header_block_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: four parses per message (DK verify and sign, DKIM verify and sign)."""
    keys.keygen("example.org", "default", "rsa", 1024, str(tmp_path / "domainkeys"))
    record = keys.dns_record(keys.load_private_key(
        str(tmp_path / "domainkeys" / "example.org" / "default"))).encode()
    spec = ("domainkeys/%/default", "DKSIGN")
    stages = [
        dk.DkStage(signs=[signing.KeySpec(*spec, dk.DkOptions())], verify_letters="",
                   controldir=str(tmp_path), lookup=lambda _n, _t: record, authserv_id=OURS),
        fdkim.DkimStage(signs=[signing.KeySpec(*spec, fdkim.SignOptions())],
                        verify_letters="", controldir=str(tmp_path),
                        lookup=lambda _n, _t: record, authserv_id=OURS),
    ]
    calls = []
    split = mailstream.split
    monkeypatch.setattr(mailstream, "split", lambda *a, **k: calls.append(1) or split(*a, **k))
    message = message_of(BODY)
    result = pipeline.run(stages, message)
    assert result.reply is None and [v.action for v in result.verdicts] == ["accept"] * 2
    assert len(calls) == 1
    final = b"".join(message.final_chunks())
    assert final.index(b"DKIM-Signature:") < final.index(b"DomainKey-Signature:")
    checked = fdkim.verify_message(final, lambda _n, _t: record)
    assert [r.letter for r in checked] == ["A"]
    assert dk.verify_message(final, lambda _n, _t: record).letter == "A"
