"""qmqpc's pure parts: qmqpservers lines, answers, qmail-queue envelopes, message sizing."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmqpd import client
from qmqpd.client import (
    BrokenSession,
    EnvelopeError,
    Server,
    parse_envelope,
    parse_reply,
    parse_server,
    parse_servers,
    servers_file,
)


@pytest.mark.parametrize(("spec", "server"), [
    ("192.0.2.1", Server("192.0.2.1", 628)),
    ("192.0.2.1:6280", Server("192.0.2.1", 6280)),
    ("::1", Server("::1", 628)),
    ("2001:db8::25", Server("2001:db8::25", 628)),
    ("[2001:db8::25]", Server("2001:db8::25", 628)),
    ("[::1]:10628", Server("::1", 10628)),
    ("mx.example.org", Server("mx.example.org", 628)),
    ("mx.example.org.", Server("mx.example.org.", 628)),
    ("relay-1:7000", Server("relay-1", 7000)),
    ("  localhost  ", Server("localhost", 628)),
])
def test_server_forms(spec: str, server: Server) -> None:
    assert parse_server(spec) == server


@pytest.mark.parametrize("spec", [
    "", "host:", "host:0", "host:65536", "host:http", "host:-1", "[::1", "[::1]x",
    "[::1]:", "[mx.example.org]:628", "2001:db8:::1", "bad host", "-lead.example",
    "under_score.example", "a" * 64 + ".example", "1.2.3.4:628:1",
])
def test_bad_server_forms(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_server(spec)


def test_server_text_brackets_ipv6() -> None:
    assert str(Server("::1", 628)) == "[::1]:628"
    assert str(Server("10.0.0.1", 7)) == "10.0.0.1:7"


def test_servers_file_skips_comments_and_reports_bad_lines() -> None:
    warnings: list[str] = []
    text = ("# central relays\n\n10.0.0.1\n  \nnot a host\n[::1]:6280  # local\n"
            "relay.example:99999\nrelay.example\n")
    servers = parse_servers(text, warn=warnings.append)
    assert servers == [Server("10.0.0.1"), Server("::1", 6280), Server("relay.example")]
    assert len(warnings) == 2
    assert "line 5" in warnings[0] and "line 7" in warnings[1]


def test_servers_file_warning_goes_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_servers("no way\n127.0.0.1\n") == [Server("127.0.0.1")]
    assert capsys.readouterr().err.startswith("qmqpc: warning: qmqpservers line 1")


def test_servers_file_location() -> None:
    assert servers_file({}) == "/var/qmail/control/qmqpservers"
    assert servers_file({"QMAILHOME": "/opt/q"}) == "/opt/q/control/qmqpservers"
    assert servers_file({"QMAILHOME": "/opt/q", "QMQPSERVERS": "/etc/s"}) == "/etc/s"


@pytest.mark.parametrize(("data", "answer"), [
    (b"22:Kok 1795913427 qp 6877,", ("K", "ok 1795913427 qp 6877")),
    (b"3:KOk,", ("K", "Ok")),
    (b"37:Zqq write error or disk full (#4.3.0),", ("Z", "qq write error or disk full (#4.3.0)")),
    (b"5:Dno\r\n,", ("D", "no")),
    (b"1:D,trailing", ("D", "")),
])
def test_answers(data: bytes, answer: tuple[str, str]) -> None:
    assert parse_reply(data) == answer


@pytest.mark.parametrize("data", [b"", b"2", b"22:Kok", b"3:KO"])
def test_incomplete_answers_ask_for_more(data: bytes) -> None:
    assert parse_reply(data) is None


@pytest.mark.parametrize("data", [
    b"3:Xok,", b"0:,", b"3:Kok;", b"x:Kok,", b"Kok 1 qp 2", b"123456789012", b"99999:K",
    b"+3:Kok,", b"HTTP/1.0 400",
])
def test_malformed_answers_are_broken_sessions(data: bytes) -> None:
    with pytest.raises(BrokenSession):
        parse_reply(data)


@given(st.binary(max_size=64))
def test_answer_parser_never_fails_otherwise(data: bytes) -> None:
    try:
        answer = parse_reply(data)
    except BrokenSession:
        return
    assert answer is None or answer[0] in ("K", "Z", "D")


@pytest.mark.parametrize(("data", "envelope"), [
    (b"Fa@b\0Tc@d\0\0", (b"a@b", [b"c@d"])),
    (b"F\0Tc@d\0Te@f\0\0", (b"", [b"c@d", b"e@f"])),
    (b"Fa@b\0\0", (b"a@b", [])),
    (b"Fa@b\0T\0\0ignored", (b"a@b", [b""])),
])
def test_envelopes(data: bytes, envelope: tuple[bytes, list[bytes]]) -> None:
    assert parse_envelope(data) == envelope


@pytest.mark.parametrize("data", [
    b"", b"Tc@d\0\0", b"Fa@b", b"Fa@b\0", b"Fa@b\0Tc@d\0", b"Fa@b\0Tc@d", b"Fa@b\0Xc@d\0\0",
    b"Fa@b\0Fc@d\0\0",
])
def test_bad_envelopes(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_envelope(data)


addresses = st.binary(max_size=40).filter(lambda b: b"\0" not in b)


@given(addresses, st.lists(addresses, max_size=5))
def test_envelope_round_trip(sender: bytes, recipients: list[bytes]) -> None:
    data = b"F" + sender + b"\0" + b"".join(b"T" + r + b"\0" for r in recipients) + b"\0"
    assert parse_envelope(data) == (sender, recipients)


def test_read_envelope_stops_at_the_terminator() -> None:
    read_end, write_end = os.pipe()
    try:
        # The writer keeps its end open: reading must stop at the terminator, not at EOF.
        os.write(write_end, b"Fa@b\0Tc@d\0\0")
        assert client.read_envelope(read_end) == (b"a@b", [b"c@d"])
    finally:
        os.close(read_end)
        os.close(write_end)


def _body_bytes(body: client._Body) -> bytes:
    return b"".join(body.chunks())


def test_body_from_bytes_and_in_memory_file() -> None:
    assert _body_bytes(client._prepare_body(b"abc")) == b"abc"
    stream = io.BytesIO(b"skipped|kept")
    stream.seek(8)
    body = client._prepare_body(stream)
    assert body.size == 4 and not body.spooled
    assert _body_bytes(body) == _body_bytes(body) == b"kept"


def test_body_from_regular_file_is_not_copied(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(b"x" * 200_000)
    with open(path, "rb") as file:
        body = client._prepare_body(file)
        assert body.size == 200_000 and not body.spooled
        assert _body_bytes(body) == b"x" * 200_000


def test_body_from_pipe_is_spooled() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"piped message\n")
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        body = client._prepare_body(pipe)
    assert body.spooled and body.size == 14
    assert _body_bytes(body) == b"piped message\n"
    body.close()


def test_body_that_shrinks_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "message"
    path.write_bytes(b"0123456789")
    with open(path, "rb") as file:
        body = client._prepare_body(file)
        path.write_bytes(b"01234")
        with pytest.raises(client.InputError):
            _body_bytes(body)
