"""bench/filter_vs_milter.py end to end with a few messages: `qmqpd serve` with its DKIM or
virus stage beside a private Postfix with OpenDKIM or clamav-milter (and one shared clamd),
all real, on 127.0.0.1. Every timed message is answered K and counted by its server, the
bench's own check passes (signatures from both sides verified by Mail::DKIM; EICAR refused
by both), the figures are printed, and everything it started is gone afterwards."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

import pytest

from tests.support import interrupt_when, needs_postfix, operator_environ, process_gone

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "filter_vs_milter.py"
MESSAGES = 20
SESSIONS = (1, 3)
PEERS = {"dkim": "/usr/sbin/opendkim", "virus": "/usr/sbin/clamav-milter"}
LABELS = {"dkim": ("qmqpd (DKIM stage)", "Postfix + OpenDKIM"),
          "virus": ("qmqpd (virus stage)", "Postfix + clamav-milter")}

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason="the benchmark runs Postfix, which needs root")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("filter_vs_milter", BENCH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["filter_vs_milter"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load()


# -- its pieces -------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [2048, 20480])
def test_messages_are_distinct_in_body_and_of_the_asked_length(length: int) -> None:
    messages = bench.Messages(length)
    made = [messages.make() for _ in range(200)]
    assert {len(message) for message in made} == {length}
    bodies = {message.partition(b"\n\n")[2] for message in made}
    assert len(bodies) == len(made)  # clamd's clean cache never answers for one of them
    assert made[0].startswith(b"From: <bench@example.com>\n")
    again = bench.Messages(length).make()  # another bench run: still another message
    assert again not in made


def test_reply_status_waits_for_the_whole_netstring() -> None:
    assert bench.reply_status(b"") is None
    assert bench.reply_status(b"3:Kok") is None
    assert bench.reply_status(b"3:Kok,") == "K"
    assert bench.reply_status(b"26:Zqq temporary problem here,") == "Z"
    assert bench.reply_status(b"HTTP/1.0 400 Bad") == "?"


def test_dns_record_joins_the_zone_line_strings() -> None:
    line = 'sel._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=QUJD" "REVG" )'
    assert bench.dns_record(line) == "v=DKIM1; k=rsa; p=QUJDREVG"
    with pytest.raises(bench.BenchError):
        bench.dns_record('x IN TXT ( "v=DKIM1; k=ed25519; p=QUJD" )')


class _Answering(socketserver.BaseRequestHandler):
    """Reads one whole QMQP request, answers K, or Z when the message says `refuse`."""

    def handle(self) -> None:
        data = b""
        while b":" not in data:
            data += self.request.recv(65536)
        length, _, rest = data.partition(b":")
        while len(rest) < int(length) + 1:
            rest += self.request.recv(65536)
        answer = b"Zrefused" if b"refuse" in rest else b"Kqueued"
        self.request.sendall(b"%d:%s," % (len(answer), answer))


def test_drive_times_every_answered_message_over_its_sessions() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Answering)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        messages = bench.Messages(20480)
        sent = []

        def make() -> bytes:
            extra = b"refuse\n" if len(sent) % 5 == 4 else b""
            sent.append(messages.request(extra))
            return sent[-1]

        load = bench.drive(server.server_address[1], 50, 7, make)
    finally:
        server.shutdown()
        server.server_close()
    assert len(sent) == 50
    assert load.answers == {"K": 40, "Z": 10}
    assert len(load.latencies) == 40 and min(load.latencies) > 0
    assert load.errors and load.errors[0].startswith("Z")
    assert load.seconds > 0


# -- end to end (root, Postfix, the milters) ---------------------------------------------------


def _need_peer(case: str) -> None:
    if not os.access(PEERS[case], os.X_OK):
        pytest.skip(f"{PEERS[case]} is not installed (Debian packages opendkim, "
                    "clamav-milter: tests/install-and-run.sh installs them)")


def _command(case: str, *args: str) -> list[str]:
    qmqpd = f"env PYTHONPATH={ROOT} {sys.executable} -m qmqpd"  # qmqpd from this tree
    # --force: the test checks that the bench works, not its figures, so any load will do
    return [sys.executable, str(BENCH), "--case", case, "--qmqpd", qmqpd, "--force", *args]


def _run(case: str, tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str],
                                                           dict]:
    _need_peer(case)
    report = tmp_path / "bench.json"
    result = subprocess.run(
        _command(case, "-m", str(MESSAGES), "-s", ",".join(map(str, SESSIONS)), "--repeat",
                 "2", "--warmup", "5", "--check", "2", "--json", str(report), *extra),
        capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path,
        env=operator_environ())
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(report.read_text())


def _assert_runs_and_figures(case: str, result: subprocess.CompletedProcess[str],
                             data: dict) -> None:
    runs = data["results"]
    # two interleaved rounds of each side at each session count
    assert sorted((row["target"], row["sessions"]) for row in runs) == sorted(
        (name, count) for name in ("qmqpd", "postfix") for count in SESSIONS for _ in "ab")
    for row in runs:
        assert row["rate"] > 0
        assert row["probes"] == MESSAGES, row  # every message timed and answered K
        assert row["client_errors"] == []
        assert row["accepted"] == MESSAGES, row  # and counted by the server itself
        assert row["server_cpu"] is not None and row["server_cpu"] >= 0
    assert data["problems"] == []
    ours, theirs = LABELS[case]
    for count in SESSIONS:
        mine = re.search(rf"^\| {count} \| {re.escape(ours)} \| [\d,]+ \| .* \| ([\d.]+) \|$",
                         result.stdout, re.MULTILINE)
        assert mine, result.stdout
        assert re.search(rf"^\| {count} \| {re.escape(theirs)} \| [\d,]+ \| ", result.stdout,
                         re.MULTILINE), result.stdout
    for summary in data["summary"].values():  # p50/p99 of every message beside each rate
        assert 0 < summary["p50_ms"] <= summary["p99_ms"]
    assert "load average (1, 5, 15 min): before" in result.stdout
    assert len(data["round_loads"]) == 2
    for name, pid in data["pids"].items():
        assert pid and process_gone(pid, 10.0), f"{name} (pid {pid}) still running"


@needs_root
@needs_postfix
def test_dkim_both_sides_sign_verifiably(tmp_path: Path) -> None:
    result, data = _run("dkim", tmp_path)
    _assert_runs_and_figures("dkim", result, data)
    assert set(data["pids"]) == {"qmqpd", "postfix", "opendkim"}
    # Mail::DKIM verified the samples of both sides with the key qmqpd dkim keygen made
    for label in LABELS["dkim"]:
        assert data["check"][label] == ["DKIM example.com default pass (pass)"] * 2
    assert "check (before the runs):" in result.stdout
    assert data["rsa_sign_ms"] > 0 and "RSA-2048 signature alone" in result.stdout


@needs_root
@needs_postfix
def test_virus_both_sides_scan_with_one_clamd(tmp_path: Path) -> None:
    result, data = _run("virus", tmp_path, "-l", "4096")
    _assert_runs_and_figures("virus", result, data)
    assert set(data["pids"]) == {"qmqpd", "postfix", "clamav-milter", "clamd"}
    for label in LABELS["virus"]:
        clean, eicar = data["check"][label]
        assert clean == "2 clean, marked"
        assert eicar.startswith("EICAR answered D"), eicar


@needs_root
@needs_postfix
def test_interrupt_stops_every_process(tmp_path: Path) -> None:
    """Ctrl-C during a timed run: clamd, clamav-milter, qmqpd and Postfix are stopped and
    the temporary directory is gone."""
    _need_peer("virus")
    bench_tmp = Path(tempfile.mkdtemp(prefix="bench-test-"))
    bench_tmp.chmod(0o755)  # not below pytest's 0700 tree: Postfix's daemons need to reach it
    try:
        process = subprocess.Popen(
            _command("virus", "-m", "200000", "-s", "2", "--warmup", "0", "--check", "1"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
            env=operator_environ(TMPDIR=str(bench_tmp)))
        seen, rest = interrupt_when(process, lambda seen: "msg/s" in seen, signal.SIGINT)
        assert process.returncode == 130, rest[-2000:]
        pids = {name: int(pid) for name, pid in re.findall(r"started (\S+) pid (\d+)", seen)}
        assert set(pids) == {"clamd", "clamav-milter", "qmqpd", "postfix"}
        for name, pid in pids.items():
            assert process_gone(pid, 10.0), f"{name} (pid {pid}) still running after Ctrl-C"
        assert list(bench_tmp.glob("qmqpd-filter-bench-*")) == []
    finally:
        shutil.rmtree(bench_tmp, ignore_errors=True)


def test_refuses_to_start_above_the_load_limit(tmp_path: Path) -> None:
    """A limit no load average can be under: the bench refuses before starting anything."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--case", "dkim", "--max-load", "-1", "-m", "5"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 75, result.stderr
    assert "--force" in result.stderr and "load average" in result.stderr
    assert "started" not in result.stderr
