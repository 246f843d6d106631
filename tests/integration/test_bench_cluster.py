"""bench/cluster.py end to end with a few messages: three real `qmqpd serve` nodes behind
two real HAProxy processes (the shipped config), driven by Postfix's qmqp-source; every
message is answered K by a node, the three-node balancer spreads them, everything it
started is gone afterwards; and it refuses to start on a loaded machine unless forced."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.integration.test_cluster import PROXY_IN_CLUSTER_TESTS
from tests.support import needs_postfix, operator_environ, process_gone

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "cluster.py"
PATHS = ("direct to 1 node", "haproxy to 1 node", "haproxy to 3 nodes")

pytestmark = [needs_postfix, pytest.mark.skipif(
    not os.access("/usr/sbin/haproxy", os.X_OK), reason="Debian's haproxy is not installed")]


def _bench() -> ModuleType:
    sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_cluster", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shipped_config_cut_to_the_node_count() -> None:
    bench = _bench()
    shipped = bench.HAPROXY_CONFIG.read_text()
    one = bench.balancer_config(shipped, 1, proxy=True)
    assert "server node1 " in one and "node2" not in one.split("\nbackend ")[1]
    assert "send-proxy-v2 check-send-proxy" in one
    three = bench.balancer_config(shipped, 3, proxy=False)
    assert all(f"server node{n} " in three for n in (1, 2, 3))
    assert "send-proxy" not in three
    assert "tcp-check expect" in three and "stick-table" in three  # the rest as shipped


def test_small_run_through_one_and_three_nodes(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    # qmqpd from this tree; --force: the test checks that the bench works, not its figures
    qmqpd = f"env PYTHONPATH={ROOT} {sys.executable} -m qmqpd"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--qmqpd", qmqpd, "--force", "-m", "12", "-s", "1,3",
         "--warmup", "2", "--prefork", "2", "--proxy", "on" if PROXY_IN_CLUSTER_TESTS else "off",
         "--json", str(report)],
        capture_output=True, text=True, timeout=240, check=False, cwd=tmp_path,
        env=operator_environ())
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(report.read_text())
    runs = {(row["target"], row["sessions"]): row for row in data["results"]}
    assert set(runs) == {(path, count) for path in PATHS for count in (1, 3)}
    for row in runs.values():
        assert row["rate"] > 0 and row["client_errors"] == []
        assert row["accepted"] == 12  # every message answered K by a node itself
    per_node = data["accepted_per_node"]
    # node2 and node3 are reached only through the balancer to three nodes
    assert per_node["node2"] > 0 and per_node["node3"] > 0, per_node
    assert sum(per_node.values()) >= 6 * 12
    assert "load average (1, 5, 15 min): before" in result.stdout
    assert "| 3 | haproxy to 3 nodes |" in result.stdout
    assert data["problems"] == []
    # with PROXY on, the direct baseline is a node0 of its own that takes no header
    direct = {"node0"} if PROXY_IN_CLUSTER_TESTS else set()
    assert set(data["pids"]) == {"node1", "node2", "node3", "haproxy to 1 node",
                                 "haproxy to 3 nodes", *direct}
    for name, pid in data["pids"].items():
        assert pid and process_gone(pid, 10.0), f"{name} (pid {pid}) still running"


def test_refuses_to_start_above_the_load_limit(tmp_path: Path) -> None:
    """A limit no load average can be under: the bench refuses before starting anything."""
    result = subprocess.run(
        [sys.executable, str(BENCH), "--max-load", "-1", "-m", "5", "-s", "1"],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 75, result.stderr
    assert "--force" in result.stderr and "load average" in result.stderr
    assert "started" not in result.stderr
