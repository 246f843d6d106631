"""The virus stage's settings, stage selection and infected-message actions (no clamd needed)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmqpd import config
from qmqpd.filters import pipeline, virus
from qmqpd.message import Message, MessageData


def settings(**env: str) -> config.Config:
    return config.load(environ=env)


@pytest.mark.parametrize(("raw", "on"), [
    ("1", True), ("yes", True), ("/usr/bin/clamdscan %s --quiet", True),
    ("", None), ("0", None), ("off", None), ("No", None),
])
def test_qhpsi_switch(raw: str, on: bool | None) -> None:
    assert settings(QHPSI=raw).qhpsi is on


def test_qhpsi_is_off_by_default_and_a_rule_turns_it_off() -> None:
    assert settings().qhpsi is None
    assert settings(QHPSI="1").overlay({"QHPSI": ""}, "rule env").qhpsi is None


@pytest.mark.parametrize("good", ["127.0.0.1:3310", "clamd.example:3310", "[::1]:3310"])
def test_clamd_tcp_accepts(good: str) -> None:
    assert settings(CLAMD_TCP=good).clamd_tcp == good


@pytest.mark.parametrize("bad", ["localhost", ":3310", "h:0", "h:70000", "::1:3310", "h:x"])
def test_clamd_tcp_refuses_with_the_name(bad: str) -> None:
    with pytest.raises(config.ConfigError, match="CLAMD_TCP"):
        settings(CLAMD_TCP=bad)


@pytest.mark.parametrize(("name", "bad"), [("REJECTVIRUS", "-1"), ("QHPSIMAXSIZE", "1M"),
                                           ("CLAMD_TIMEOUT", "0"),
                                           ("QHPSI_PASS_ON_ERROR", "maybe")])
def test_bad_virus_settings_name_the_key(name: str, bad: str) -> None:
    with pytest.raises(config.ConfigError, match=name):
        settings(**{name: bad})


def test_scanner_for_prefers_tcp() -> None:
    tcp = virus.scanner_for(settings(CLAMD_TCP="[::1]:3311", CLAMD_TIMEOUT="2.5"))
    assert isinstance(tcp, virus.TcpScanner)
    assert (tcp.host, tcp.port, tcp.timeout) == ("::1", 3311, 2.5)
    unix = virus.scanner_for(settings(CLAMD_SOCKET="/tmp/c.sock"))
    assert isinstance(unix, virus.UnixScanner)
    assert unix.path == "/tmp/c.sock"


def test_virus_stage_runs_first_and_only_when_switched_on() -> None:
    assert [s.name for s in pipeline.build_stages(settings())] == []
    every = settings(QHPSI="1", DKSIGN="/nonexistent/key", DKIMSIGN="/nonexistent/key")
    assert [s.name for s in pipeline.build_stages(every)] == ["virus", "dk", "dkim"]
    ruled = every.overlay({"QHPSI": ""}, "rule env")
    assert [s.name for s in pipeline.build_stages(ruled)] == ["dk", "dkim"]


def test_from_config_carries_the_settings() -> None:
    stage = virus.from_config(settings(QHPSI="1", QHPSIMINSIZE="10", QHPSIMAXSIZE="20",
                                       REJECTVIRUS="0", VIRUSFORWARD=" q@example.com ",
                                       QHPSI_PASS_ON_ERROR="1"))
    assert stage is not None
    assert (stage.min_size, stage.max_size, stage.reject_mode, stage.forward,
            stage.pass_on_error) == (10, 20, 0, "q@example.com", True)


@pytest.mark.parametrize(("low", "high", "size", "skipped"), [
    (0, 0, 10**9, False), (100, 0, 99, True), (100, 0, 100, False),
    (0, 100, 100, False), (0, 100, 101, True),
])
def test_size_limits(low: int, high: int, size: int, skipped: bool) -> None:
    stage = virus.VirusStage(virus.scanner_for(settings()), min_size=low, max_size=high)
    assert stage._outside_limits(size) is skipped


def message() -> Message:
    return Message(b"a@example.org", [b"one@example.net", b"two@example.net"],
                   MessageData(b"Subject: x\n\nbody\n"))


@pytest.mark.parametrize(("mode", "action", "reply"), [
    (0, "accept", None), (1, "reject", "Dqq message contains virus (#5.7.1)"),
    (2, "discard", None), (3, "reject", "Dqq message contains virus (#5.7.1)"),
])
def test_infected_actions_follow_rejectvirus(mode: int, action: str, reply: str | None) -> None:
    stage = virus.VirusStage(virus.scanner_for(settings()), reject_mode=mode)
    msg = message()
    verdict = stage._infected(msg, "Eicar")
    assert verdict.action == action
    assert (verdict.reply().line if verdict.reply() else None) == reply
    assert verdict.facts["found"] == "Eicar"
    assert verdict.headers == ((virus.INFECTED,) if action == "accept" else ())
    assert msg.recipients == [b"one@example.net", b"two@example.net"]


def test_virusforward_wins_over_reject_and_replaces_recipients() -> None:
    stage = virus.VirusStage(virus.scanner_for(settings()), reject_mode=1,
                             forward="q@example.com")
    msg = message()
    verdict = stage._infected(msg, "Eicar")
    assert verdict.action == "accept"
    assert msg.recipients == [b"q@example.com"]
    assert verdict.headers[1] == (b"X-Quarantine-ID: <one@example.net>,\n"
                                  b" <two@example.net>\n")


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=8))
def test_quarantine_header_is_one_well_formed_field(recipients: list[bytes]) -> None:
    header = virus.quarantine_header(recipients)
    lines = header.split(b"\n")
    assert lines[-1] == b""
    assert lines[0].startswith(b"X-Quarantine-ID: <")
    assert all(line.startswith(b" <") for line in lines[1:-1])
    assert len(lines) == len(recipients) + 1
    assert b"\r" not in header and b"\0" not in header


@pytest.mark.parametrize(("answer", "infected", "name"), [
    ("stream: OK", False, ""), ("stream: Eicar-Test-Signature FOUND", True,
                                "Eicar-Test-Signature"),
    ("stream: Win.Test.EICAR_HDB-1 FOUND", True, "Win.Test.EICAR_HDB-1"),
])
def test_clamd_answers(answer: str, infected: bool, name: str) -> None:
    assert virus._result(answer) == virus.ScanResult(infected, name)


@pytest.mark.parametrize(("answer", "error"), [
    ("INSTREAM size limit exceeded. ERROR", virus.StreamTooLong),
    ("stream: Can't allocate memory ERROR", virus.ScannerError),
    ("UNKNOWN COMMAND", virus.ScannerError), ("", virus.ScannerError),
])
def test_clamd_errors_are_typed(answer: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        virus._result(answer)


def test_no_clamd_at_the_socket_is_a_scanner_error(tmp_path) -> None:
    scanner = virus.UnixScanner(str(tmp_path / "absent.sock"), timeout=1)
    with pytest.raises(virus.ScannerError, match="cannot connect to clamd at"):
        scanner.scan_chunks([b"x"])


def _instream_payload(writes: list[bytes]) -> tuple[bytes, list[int]]:
    """What clamd reads from an INSTREAM: the data and each chunk's length."""
    stream = b"".join(writes)
    assert stream.startswith(b"zINSTREAM\0")
    at, data, lengths = len(b"zINSTREAM\0"), b"", []
    while True:
        (length,) = struct.unpack("!L", stream[at:at + 4])
        at += 4
        if length == 0:
            break
        lengths.append(length)
        data += stream[at:at + length]
        at += length
    assert at == len(stream), "bytes after the end mark"
    return data, lengths


@given(st.lists(st.binary(max_size=3 * virus.CHUNK), max_size=5))
def test_instream_carries_every_piece_in_order(pieces: list[bytes]) -> None:
    writes = list(virus._writes(pieces))
    data, lengths = _instream_payload(writes)
    assert data == b"".join(pieces)
    assert all(0 < length <= virus.CHUNK for length in lengths)
    assert len(writes) == len(data) // virus.CHUNK + 1  # full chunks, then the rest and the end


def test_a_small_message_is_one_write() -> None:
    """The queue's head and the client's bytes go to clamd in one write, not four."""
    writes = list(virus._writes([b"Received: x\n", b"Subject: s\n\nbody\n"]))
    assert writes == [b"zINSTREAM\0" + struct.pack("!L", 29)
                      + b"Received: x\nSubject: s\n\nbody\n" + b"\0\0\0\0"]
