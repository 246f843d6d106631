"""bench/benchlib.py, the helpers the stage and master benchmarks share."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from bench.benchlib import BenchError, cpu_seconds, loopback_rules, start_qmqpd
from qmqpd.rules import check
from tests.support import command


def test_cpu_seconds_counts_this_process_alone() -> None:
    user, system = cpu_seconds(os.getpid())
    stop = time.process_time() + 0.05
    while time.process_time() < stop:
        pass
    after = cpu_seconds(os.getpid())
    assert user >= 0 and system >= 0
    assert sum(after) >= user + system


@pytest.mark.parametrize(("sessions", "limit"), [(1, 5), (8, 12), (32, 40)])
def test_loopback_rules_give_the_load_generator_its_sessions(tmp_path: Path, sessions: int,
                                                            limit: int) -> None:
    cdb = str(loopback_rules(command("qmqpd"), tmp_path, sessions))
    assert check(cdb, "127.0.0.1") == (
        f"rule 127.0.0.1:\nset environment variable MAXPERIP={limit}\nallow connection\n")
    assert check(cdb, "127.0.0.2").endswith("deny connection\n")


def test_a_server_that_does_not_start_is_a_bench_error_with_the_cause(tmp_path: Path) -> None:
    with pytest.raises(BenchError) as raised:
        start_qmqpd(tmp_path, maxperip="lots")
    text = str(raised.value)
    assert "exit code 111" in text
    assert "likely cause: a refused setting: MAXPERIP (maxperip)" in text, text
