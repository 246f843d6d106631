"""bench/session_startup.py --peers end to end with a few connections: real tcpserver
running `qmqpd session` (no filters and DKIM) and a private Postfix's qmqpd (reused
processes and max_use=1) on 127.0.0.1, timed in turn; the figures of all four appear, and
every process it started is gone afterwards, also after SIGTERM mid-run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import interrupt_when, needs_postfix, process_gone

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "session_startup.py"
PEERS = ("tcpserver + qmqpd session", "tcpserver + qmqpd session, DKIM",
         "Postfix qmqpd (master reuses it)", "Postfix qmqpd, max_use=1")
FIGURES = re.compile(r"^(?P<name>.+?)\s+answer median\s+(?P<answer>[\d.]+) ms p90\s+[\d.]+"
                     r"\s+closed median\s+(?P<closed>[\d.]+) ms p90\s+[\d.]+"
                     r"\s+server CPU\s+(?P<cpu>[\d.]+) ms/connection$", re.MULTILINE)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the peers include Postfix, which needs root"),
    needs_postfix,
    pytest.mark.skipif(not all(os.access(tool, os.X_OK) for tool in (
        "/usr/bin/tcpserver", "/usr/bin/tcprules")), reason="Debian's ucspi-tcp is not installed"),
]


def _started(stderr: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"started (.+) pid (\d+) port", stderr)}


def _peers_root(stderr: str) -> str:
    match = re.search(r"peers in (\S+)", stderr)
    assert match, stderr[-2000:]
    return match[1]


def _working_below(root: str) -> list[int]:
    """Processes whose working directory is under root: tcpserver and its sessions run
    there, Postfix's daemons in their queue directory below it."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                pid = int(entry.name)
                if os.readlink(entry / "cwd").startswith(root) and not process_gone(pid):
                    found.append(pid)
            except OSError:
                continue
    return found


def _all_stopped(pids: dict[str, int], root: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(process_gone(pid) for pid in pids.values()) and not _working_below(root):
            break
        time.sleep(0.1)
    for name, pid in pids.items():
        assert process_gone(pid), f"{name} (pid {pid}) still running"
    assert _working_below(root) == [], "processes left below the peers' directory"
    assert not Path(root).exists()


def test_peers_are_timed_in_the_same_run_and_stopped(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--runs", "3", "--messages", "0", "--peers"],
        capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no filters  " in result.stdout  # the session cases still run first
    figures = {match["name"]: match for match in FIGURES.finditer(result.stdout)}
    assert set(figures) == set(PEERS), result.stdout
    for name, match in figures.items():
        # every connection answered K (the bench stops otherwise), before it was closed
        assert 0 < float(match["answer"]) <= float(match["closed"]), name
    # Python with dkimpy costs more CPU than a bare session; /proc counts in 10 ms ticks,
    # so the tiny Postfix runs may round to nothing
    session_cpu = float(figures[PEERS[0]]["cpu"])
    assert session_cpu > 0 and float(figures[PEERS[1]]["cpu"]) > session_cpu
    started = _started(result.stderr)
    assert set(started) == set(PEERS)
    _all_stopped(started, _peers_root(result.stderr))


def test_sigterm_stops_every_peer(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, str(BENCH), "--runs", "2", "--messages", "0", "--peers"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    # every server is up: stop it now
    seen, rest = interrupt_when(process, lambda seen: len(_started(seen)) >= len(PEERS),
                                signal.SIGTERM)
    assert process.returncode == 130, rest[-2000:]
    assert "interrupted" in rest
    _all_stopped(_started(seen), _peers_root(seen))
