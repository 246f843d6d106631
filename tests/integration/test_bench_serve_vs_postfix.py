"""bench/serve_vs_postfix.py end to end with a few messages: real qmqp-sink, `qmqpd serve`
(limits on) and a private Postfix on 127.0.0.1, driven by Postfix's qmqp-source, with the
sync calls counted under strace; everything it started is gone afterwards, also after
Ctrl-C; and it refuses to start on a loaded machine unless forced."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import interrupt_when, needs_postfix, operator_environ, process_gone

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "serve_vs_postfix.py"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the benchmark runs Postfix, which needs root"),
    needs_postfix,
]


def _command(*args: str) -> list[str]:
    # qmqpd from this tree, whatever is installed in the interpreter
    qmqpd = f"env PYTHONPATH={ROOT} {sys.executable} -m qmqpd"
    # --force: the test checks that the bench works, not its figures, so any load will do
    return [sys.executable, str(BENCH), "--qmqpd", qmqpd, "--force", *args]


def _started_pids(stderr: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"started (\S+) pid (\d+)", stderr)}


def test_small_run_measures_all_three_and_stops_them(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    result = subprocess.run(
        _command("-m", "30", "-s", "1,3", "--warmup", "5", "--sync-messages", "10",
                 "--json", str(report)),
        capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path,
        env=operator_environ())
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(report.read_text())
    runs = {(row["target"], row["sessions"]): row for row in data["results"]}
    assert set(runs) == {(name, count) for name in ("qmqp-sink", "qmqpd", "postfix")
                         for count in (1, 3)}
    for (name, _), row in runs.items():
        assert row["rate"] > 0
        assert row["client_errors"] == []
        if name != "qmqp-sink":
            assert row["accepted"] == 30  # every message answered K by the server itself
        # /proc/stat counts in ticks of 10 ms: one tiny run may round to none
        assert row["machine_cpu"] >= 0
    assert sum(row["machine_cpu"] for row in runs.values()) > 0
    assert data["memory_after"]["qmqpd_idle_workers"], "idle workers were measured"
    assert "| 3 | qmqpd |" in result.stdout
    assert "load average (1, 5, 15 min): before" in result.stdout
    for fact in ("nproc", "model name", "kernel", "queue filesystem", "load before"):
        assert data["machine"][fact], fact
    # qmqpd's commit: fdatasync of mess and intd, fsync of mess/N/ and todo/, per message
    syncs = data["syncs_per_message"]
    assert syncs["qmqpd"]["fdatasync"] == 2.0 and syncs["qmqpd"]["fsync"] == 2.0
    assert syncs["postfix"]["fsync"] + syncs["postfix"]["fdatasync"] >= 1.0
    assert data["problems"] == []
    for name, pid in data["pids"].items():
        assert pid and process_gone(pid, 10.0), f"{name} (pid {pid}) still running"


@pytest.fixture
def bench_tmp() -> Iterator[Path]:
    """TMPDIR for the bench: outside pytest's 0700 tree, since Postfix daemons run as
    user postfix below it."""
    path = Path(tempfile.mkdtemp(prefix="bench-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_interrupt_stops_every_server(tmp_path: Path, bench_tmp: Path) -> None:
    process = subprocess.Popen(
        _command("-m", "200000", "-s", "2", "--warmup", "0", "--targets", "qmqpd,postfix",
                 "--sync-messages", "0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
        env=operator_environ(TMPDIR=str(bench_tmp)))
    # wait until both servers are up and the first timed run is under way
    seen, rest = interrupt_when(
        process, lambda seen: "postfix" in _started_pids(seen) and "msg/s" in seen,
        signal.SIGINT)
    assert process.returncode == 130, rest[-2000:]
    pids = _started_pids(seen)
    assert set(pids) == {"qmqpd", "postfix"}
    for name, pid in pids.items():
        assert process_gone(pid, 10.0), f"{name} (pid {pid}) still running after Ctrl-C"
    leftovers = [path for path in Path("/tmp").glob("qmqpd-bench-*")
                 if path.stat().st_mtime > time.time() - 120]
    assert not any(str(pid) in shutil.which("true") or "" for pid in pids.values())
    assert leftovers == [], leftovers


def test_refuses_to_start_above_the_load_limit(tmp_path: Path) -> None:
    """A limit no load average can be under: the bench refuses before starting anything."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--max-load", "-1", "-m", "5", "-s", "1"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 75, result.stderr
    assert "--force" in result.stderr and "load average" in result.stderr
    assert "started" not in result.stderr
