"""The shipped Prometheus rules (packaging/prometheus/): valid for Debian's promtool, their
unit tests pass, every alert is shown firing there, and every qmqpd metric they use is
one a real `qmqpd serve` exposes (so a renamed metric cannot leave a rule silent)."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

from tests.integration.test_master import Server
from tests.support import free_port, wait_until
from tests.unit.test_metrics import promtool_check

RULES_DIR = Path(__file__).resolve().parents[2] / "packaging" / "prometheus"
RULES = RULES_DIR / "qmqpd-rules.yml"
RULE_TESTS = RULES_DIR / "qmqpd-rules.test.yml"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    program = shutil.which("promtool")
    if program is None:
        raise RuntimeError("promtool is not installed: run tests/install-and-run.sh "
                           "(Debian package prometheus)")
    return subprocess.run([program, *args], capture_output=True, text=True, timeout=120,
                          cwd=RULES_DIR, check=False)


def test_promtool_accepts_the_rules() -> None:
    done = promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 14 rules found" in done.stdout


def test_promtool_test_rules_passes() -> None:
    done = promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_test_rules_fails_on_a_wrong_expectation(tmp_path: Path) -> None:
    (tmp_path / RULES.name).write_text(RULES.read_text())
    wrong = RULE_TESTS.read_text().replace("instance: a:9628", "instance: c:9628", 1)
    (tmp_path / RULE_TESTS.name).write_text(wrong)
    done = subprocess.run([shutil.which("promtool") or "promtool", "test", "rules",
                           RULE_TESTS.name], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, check=False)
    assert done.returncode != 0 and "FAILED" in done.stdout + done.stderr


def test_every_alert_is_shown_firing() -> None:
    alerts = set(re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M))
    assert len(alerts) == 9
    tests = RULE_TESTS.read_text()
    firing = set(re.findall(r"alertname: (\w+)\n\s+exp_alerts:", tests))
    assert firing == alerts, alerts - firing


def test_the_rules_use_only_metrics_a_real_server_exposes(tmp_path: Path) -> None:
    used = set(re.findall(r"\b(qmqpd_[a-z_]+)", RULES.read_text()))
    metrics_port = free_port()
    server = Server(tmp_path, metrics=f"127.0.0.1:{metrics_port}",
                    queue_scan_interval="0.5").start()
    try:
        def scraped() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                        timeout=10) as reply:
                text = reply.read().decode()
            return text if "qmqpd_queue_todo_messages{" in text else None

        text = wait_until(scraped, seconds=30, what="the backlog gauges in /metrics")
        assert isinstance(text, str)
    finally:
        server.stop()
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    exposed |= {f"{name}_total" for name in exposed}  # counters' samples end in _total
    assert used <= exposed, used - exposed
    done = promtool_check(text)
    assert done.returncode == 0, done.stdout + done.stderr
