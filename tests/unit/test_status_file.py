"""Status pieces without a server: the done record's outcome, the counters, the status
file (real files, a real process titled as a master) and the `qmqpd status` output."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmqpd import config, ipc, status
from qmqpd.filters.pipeline import StageVerdict
from qmqpd.handler import SessionResult
from qmqpd.message import Reply
from qmqpd.worker import outcome_of


@pytest.fixture
def fake_master() -> Iterator[int]:
    """A real process whose title says `qmqpd: master`, as a running master's does."""
    code = ("import setproctitle, time; setproctitle.setproctitle('qmqpd: master test'); "
            "print('titled', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"titled\n"
    yield proc.pid
    proc.kill()
    proc.wait(5)


# ---- the done record ------------------------------------------------------------------
def test_done_carries_the_outcome(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    outcome = ipc.Outcome("D", (("dk", "accept"), ("dkim", "reject")))
    ipc.send_done(worker_end, exiting=True, outcome=outcome)
    ipc.send_done(worker_end, outcome=ipc.Outcome(""))
    ipc.send_done(worker_end)
    first, second, third = (ipc.receive(master_end) for _ in range(3))
    assert first is not None and first.exiting and first.outcome == outcome
    assert second is not None and not second.exiting and second.outcome == ipc.Outcome("", ())
    assert third is not None and third.outcome is None


def test_done_carries_the_session_and_commit_times(
        pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    timed = ipc.Outcome("K", (("dkim", "accept"),), session_seconds=0.0123456,
                        commit_seconds=0.0031)
    ipc.send_done(worker_end, outcome=timed)
    ipc.send_done(worker_end, outcome=ipc.Outcome("", (), session_seconds=30.0))
    ipc.send_done(worker_end, outcome=ipc.Outcome("Z", session_seconds=1e9))  # clamped
    first, second, third = (ipc.receive(master_end) for _ in range(3))
    assert first is not None and first.outcome is not None
    assert first.outcome.stages == (("dkim", "accept"),)
    assert first.outcome.session_seconds == 0.012346  # whole microseconds
    assert first.outcome.commit_seconds == 0.0031
    assert second is not None and second.outcome == ipc.Outcome("", (), 30.0, None)
    assert third is not None and third.outcome is not None
    assert third.outcome.session_seconds == ipc.MAX_MICROSECONDS / 1e6


def test_a_done_record_without_times_still_decodes(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """The record as workers sent it before the times were added: no durations."""
    master_end, worker_end = pair
    worker_end.send(ipc._pack(ipc.Kind.DONE, [b"0", b"K", b"dk=accept"]))
    record = ipc.receive(master_end)
    assert record is not None
    assert record.outcome == ipc.Outcome("K", (("dk", "accept"),), None, None)


@pytest.mark.parametrize("fields", [
    [b"0", b"K", b"@"],  # no digits
    [b"0", b"K", b"@1.5"],  # not whole microseconds
    [b"0", b"K", b"@-1"],
    [b"0", b"K", b"@1/"],
    [b"0", b"K", b"@1/2/3"],
    [b"0", b"K", b"@1234567890123"],  # more than 12 digits
    [b"0", b"K", b"@ 1"],
    [b"0", b"K", b"@1", b"@2"],  # one timing only
    [b"0", b"K", b"dk=accept", b"@1"],  # the timing comes right after the answer
    [b"0", b"K", b"@1"] + [b"s%d=accept" % n for n in range(ipc.MAX_STAGES + 1)],
])
def test_bad_timings_are_channel_errors(pair: tuple[socket.socket, socket.socket],
                                        fields: list[bytes]) -> None:
    master_end, worker_end = pair
    worker_end.send(ipc._pack(ipc.Kind.DONE, fields))
    with pytest.raises(ipc.ChannelError):
        ipc.receive(master_end)


def test_a_health_check_is_counted_apart(pair: tuple[socket.socket, socket.socket]) -> None:
    """A probe's done record says so; the observer counts it as a health check, not as
    an answer, and feeds no session time to the metrics."""
    master_end, worker_end = pair
    probe = ipc.Outcome("D", (), session_seconds=0.001, health=True)
    ipc.send_done(worker_end, outcome=probe)
    ipc.send_done(worker_end, outcome=ipc.Outcome("D", (), session_seconds=0.001))
    first, second = (ipc.receive(master_end) for _ in range(2))
    assert first is not None and first.outcome == probe
    assert second is not None and second.outcome is not None and not second.outcome.health
    observed: list[object] = []

    class Feed:
        def refused(self, ip: str, reason: str) -> None:
            observed.append((ip, reason))

        def observe(self, session: float | None, commit: float | None) -> None:
            observed.append(session)

    observer = status.Observer("", lambda _title: None, Feed())
    observer.session_ended(first.outcome)
    observer.health_check()  # a PROXY LOCAL connection without a request
    observer.session_ended(second.outcome)
    counts = observer.counters.as_dict()
    assert counts["health_checks"] == 2 and counts["answers"]["rejected"] == 1
    assert observed == [0.001]  # only the session's time


def test_a_commit_time_needs_a_session_time(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ipc.ChannelError):
        ipc.send_done(pair[1], outcome=ipc.Outcome("K", commit_seconds=0.1))


@pytest.mark.parametrize("fields", [
    [b"0", b"X"],  # not an answer status
    [b"0", b"K", b"Dkim=accept"],  # stage names are lower case
    [b"0", b"K", b"dkim"],  # no verdict
    [b"0", b"K", b"dkim=" + b"a" * 17],  # verdict too long
    [b"0", b"K"] + [b"s%d=accept" % n for n in range(ipc.MAX_STAGES + 1)],
])
def test_bad_outcomes_are_channel_errors(pair: tuple[socket.socket, socket.socket],
                                         fields: list[bytes]) -> None:
    master_end, worker_end = pair
    worker_end.send(ipc._pack(ipc.Kind.DONE, fields))
    with pytest.raises(ipc.ChannelError):
        ipc.receive(master_end)


def test_a_bad_outcome_is_not_sent(pair: tuple[socket.socket, socket.socket]) -> None:
    with pytest.raises(ipc.ChannelError):
        ipc.send_done(pair[1], outcome=ipc.Outcome("K", (("a b", "accept"),)))


def test_worker_sends_the_typed_stage_verdicts() -> None:
    # Log facts that look like stage names are not verdicts: only the typed list counts.
    facts: dict[str, object] = {"virus": "accept", "virus_ms": 0.4}
    verdicts = [StageVerdict("dk", "accept"), StageVerdict("dkim", "tempfail"),
                StageVerdict("bad name", "accept")]
    result = SessionResult(reply=Reply("Z", "try later"), facts=facts, verdicts=verdicts)
    assert outcome_of(result) == ipc.Outcome("Z", (("dk", "accept"), ("dkim", "tempfail")))
    assert outcome_of(SessionResult()) == ipc.Outcome("", ())
    timed = SessionResult(reply=Reply("K", "ok"), session_seconds=0.5, commit_seconds=0.01)
    assert outcome_of(timed) == ipc.Outcome("K", (), 0.5, 0.01)


# ---- counters -------------------------------------------------------------------------
def test_counters_by_answer_and_stage() -> None:
    counters = status.SessionCounters()
    counters.session_ended("K", [("dkim", "accept")])
    counters.session_ended("D", [("dkim", "reject")])
    counters.session_ended("Z", [])
    counters.session_ended("", [])
    counters.session_ended(None, [])
    counters.session_ended("K", [("virus", "discard"), ("dkim", "weird")])
    counters.worker_died()
    counters.connection("denied")
    data = counters.as_dict()
    assert data["answers"] == {"accepted": 2, "tempfailed": 1, "rejected": 1, "no_answer": 1,
                               "worker_died": 1, "unreported": 1}
    assert data["stages"]["dkim"] == {"accept": 1, "tempfail": 0, "reject": 1, "discard": 0,
                                      "other": 1}
    assert data["stages"]["virus"]["discard"] == 1
    assert data["connections"]["denied"] == 1 and data["connections"]["handed"] == 0


def test_stage_names_are_bounded() -> None:
    counters = status.SessionCounters()
    for n in range(status.MAX_STAGE_NAMES + 5):
        counters.session_ended("K", [(f"s{n}", "accept")])
    stages = counters.as_dict()["stages"]
    assert len(stages) == status.MAX_STAGE_NAMES + 1
    assert stages["other"]["accept"] == 5


# ---- the file -------------------------------------------------------------------------
def sample(pid: int, **extra: object) -> dict[str, object]:
    counters = status.SessionCounters()
    counters.session_ended("K", [("dkim", "accept")])
    counters.connection("handed")
    data: dict[str, object] = {
        "version": status.FORMAT_VERSION, "pid": pid, "state": "running",
        "started": time.time() - 3725, "listen": ["127.0.0.1:6280"], "maxdaemons": 75,
        "maxperip": 25, "prefork": 4, "generation": 0,
        "workers": {"starting": 0, "idle": 3, "busy": 2, "retiring": 0, "total": 5},
        "sessions": 2, "waiting": 3, "clients": 1, "busiest": [{"ip": "10.1.2.3", "sessions": 2}],
        **counters.as_dict(),
    }
    data.update(extra)
    return data


def test_writer_is_rate_limited_and_atomic(tmp_path: Path) -> None:
    path = tmp_path / "run" / "status.json"
    writer = status.StatusWriter(str(path))
    writer.prepare()
    assert writer.enabled and path.parent.is_dir()
    builds = []

    def build() -> dict[str, object]:
        builds.append(1)
        return {"version": 1, "n": len(builds)}

    writer.maybe_write(100.0, build)
    assert json.loads(path.read_text())["n"] == 1
    writer.maybe_write(100.5, build)  # within the interval: not even built
    assert len(builds) == 1
    writer.maybe_write(101.0, build)
    assert json.loads(path.read_text())["n"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["status.json"]


def test_unchanged_status_is_rewritten_only_when_old(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    writer = status.StatusWriter(str(path))
    writer.maybe_write(100.0, lambda: {"version": 1})
    first = json.loads(path.read_text())["written"]
    time.sleep(0.01)
    writer.maybe_write(102.0, lambda: {"version": 1})
    assert json.loads(path.read_text())["written"] == first
    writer.maybe_write(100.0 + status.REFRESH_SECONDS, lambda: {"version": 1})
    assert json.loads(path.read_text())["written"] > first


def test_writer_refuses_another_live_masters_file(tmp_path: Path, fake_master: int,
                                                  events: io.StringIO) -> None:
    path = tmp_path / "status.json"
    path.write_text(json.dumps(sample(fake_master)))
    writer = status.StatusWriter(str(path))
    writer.prepare()
    assert not writer.enabled
    assert "setting=STATUS_FILE" in events.getvalue()
    writer.write(1.0, {"version": 1})
    assert json.loads(path.read_text())["pid"] == fake_master


def test_writer_takes_over_a_dead_masters_file(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(5)
    path = tmp_path / "status.json"
    path.write_text(json.dumps(sample(dead.pid)))
    writer = status.StatusWriter(str(path))
    writer.prepare()
    writer.write(1.0, {"version": 1, "pid": os.getpid()})
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_unwritable_directory_warns_once(tmp_path: Path, events: io.StringIO) -> None:
    writer = status.StatusWriter(str(tmp_path / "missing" / "status.json"))
    writer.write(1.0, {"version": 1})
    writer.write(2.0, {"version": 1})
    assert events.getvalue().count("cannot write the status file") == 1


# ---- the command ----------------------------------------------------------------------
def load(path: Path) -> config.Config:
    return config.load(None, {"STATUS_FILE": str(path)})


def test_running_master_in_words_and_json(tmp_path: Path, fake_master: int,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "status.json"
    status.write_atomic(str(path), {**sample(fake_master), "written": time.time()})
    assert status.run(load(path)) == status.EXIT_RUNNING
    text = capsys.readouterr().out
    assert f"qmqpd master pid {fake_master}, running, up 1h02m" in text
    assert "listening on 127.0.0.1:6280" in text
    assert "2 busy, 3 idle" in text and "MAXDAEMONS 75" in text
    assert "2 sessions in service, 3 connections waiting" in text
    assert "  10.1.2.3 2" in text
    assert "1 accepted (K), 0 tempfailed (Z), 0 rejected (D)" in text
    assert "unreported" not in text
    assert "stage dkim: 1 accept, 0 tempfail, 0 reject, 0 discard" in text
    assert status.run(load(path), as_json=True) == status.EXIT_RUNNING
    data = json.loads(capsys.readouterr().out)
    assert data["running"] is True and data["stale"] is False
    assert data["workers"]["busy"] == 2 and data["answers"]["accepted"] == 1
    assert 3700 < data["uptime"] < 3800


def test_stale_status_of_a_live_master(tmp_path: Path, fake_master: int,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "status.json"
    old = time.time() - status.STALE_AFTER - 5
    status.write_atomic(str(path), {**sample(fake_master), "written": old})
    assert status.run(load(path)) == status.EXIT_NOT_RUNNING
    assert "the master may be stuck" in capsys.readouterr().out


def test_stopped_or_gone_master(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "status.json"
    status.write_atomic(str(path), {**sample(os.getpid()), "written": time.time() - 90})
    assert status.run(load(path)) == status.EXIT_NOT_RUNNING  # pytest is no master
    out = capsys.readouterr().out
    assert f"pid {os.getpid()} is not running (last status 1m30s ago, state running)" in out
    status.write_atomic(str(path), {**sample(1, state="stopped"), "written": time.time()})
    assert status.run(load(path), as_json=True) == status.EXIT_NOT_RUNNING
    assert json.loads(capsys.readouterr().out)["running"] is False


@pytest.mark.parametrize("content", [None, "not json", '{"version": 99}', "[1]",
                                     '{"version": 1, "pid": "x"}'])
def test_no_usable_status(tmp_path: Path, content: str | None,
                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "status.json"
    if content is not None:
        path.write_text(content)
    assert status.run(load(path)) == status.EXIT_NO_STATUS
    err = capsys.readouterr().err
    assert str(path) in err


def test_empty_status_file_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert status.run(config.load(None, {"STATUS_FILE": ""})) == status.EXIT_NO_STATUS
    assert "STATUS_FILE is empty" in capsys.readouterr().err


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (59.9, "59s"), (61, "1m01s"), (3725, "1h02m05s"), (2 * 86400 + 3700, "2d01h01m")])
def test_duration(seconds: float, text: str) -> None:
    assert status.duration(seconds) == text
