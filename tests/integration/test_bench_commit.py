"""bench/commit.py end to end with a few messages on a loop-mounted ext4 image it makes
itself: both commit modes, a fresh and a drained queue, flushes and CPU per message in its
table; the image is unmounted and removed afterwards."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "commit.py"
ROW = re.compile(r"^\| (?P<mode>each|syncfs) \| (?P<state>fresh|drained) \| (?P<writers>\d+) "
                 r"\| (?P<messages>\d+) \|.*\| flushes (?P<flushes>[\d.]+), journal commits "
                 r"[\d.]+ \| (?P<cpu>[\d,]+) \|", re.MULTILINE)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mkfs.ext4") is None,
    reason="a loop mount needs root and mkfs.ext4")


def _mounts_below(path: Path) -> list[str]:
    with open("/proc/mounts") as handle:
        return [line for line in handle if f" {path}" in line]


def test_loop_image_runs_both_modes_and_is_removed(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--loop", "ext4", "--dir", str(tmp_path),
         "--modes", "each,syncfs", "--writers", "1,2", "--messages", "20", "--warmup", "0",
         "--drained", "100"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "journal" in result.stdout  # the filesystem line
    rows = [match.groupdict() for match in ROW.finditer(result.stdout)]
    assert {(row["mode"], row["state"], row["writers"]) for row in rows} == {
        (mode, state, writers) for mode in ("each", "syncfs")
        for state in ("fresh", "drained") for writers in ("1", "2")}
    for row in rows:
        assert row["messages"] == "20"
        assert float(row["flushes"]) > 0  # the image's own device: only the bench's writes
        assert int(row["cpu"].replace(",", "")) > 0
    assert _mounts_below(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
