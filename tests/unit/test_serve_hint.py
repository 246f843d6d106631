"""The hint tests/serve_process.py gives when `qmqpd serve` does not come up: the likely
cause read from what the start logged and its exit code."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serve_process import failure_text, likely_cause

CONFIG = "config file /tmp/t/qmqpd.toml"


@pytest.mark.parametrize(("log", "returncode", "cause"), [
    (f'event=error pid=7 msg="cannot start" error="PORT (port) from {CONFIG}: cannot listen '
     'on 127.0.0.1 port 12000: Address already in use"\n', 111,
     "a port clash: PORT: 127.0.0.1 port 12000 is taken by another process"),
    ('event=error pid=7 msg="cannot start" error="METRICS 127.0.0.1:9100: Address already '
     'in use"\n', 111, "a port clash: the METRICS port is taken"),
    (f'event=error pid=7 msg="cannot start" error="MAXPERIP (maxperip) from {CONFIG}: '
     '\\"lots\\" is not an integer >= 0"\n', 111,
     f'a refused setting: MAXPERIP (maxperip) from {CONFIG}: "lots" is not an integer'),
    ('event=error pid=7 msg="cannot start" error="started as root with USER unset: set USER '
     '(and GROUP)"\n', 111, "root refused: started as root without USER; set allow_root"),
    ("Traceback (most recent call last):\n  File \"x\", line 1\nRuntimeError: boom\n", 1,
     "a crash during start-up: RuntimeError: boom"),
    ("/venv/bin/python: No module named qmqpd\n", 1,
     "the qmqpd command cannot import what it needs"),
    ("event=warning pid=7 msg=slow\n", None, "no listen event in time"),
    ("", -9, "killed by signal 9 during start-up"),
    ("", 127, "the command could not be run"),
    ("", 3, "exit 3 without a refusal line in the log"),
])
def test_likely_cause(log: str, returncode: int | None, cause: str) -> None:
    assert likely_cause(log, returncode, 12000).startswith(cause), likely_cause(
        log, returncode, 12000)


def test_failure_text_has_the_exit_code_the_cause_the_command_and_the_log_tail() -> None:
    log = "".join(f"event=info pid=7 line={n}\n" for n in range(40))
    log += 'event=error pid=7 msg="cannot start" error="QUEUEDIR (queuedir) from default: nope"\n'
    text = failure_text("exited during start-up", log, 111, 12000, Path("/tmp/t/qmqpd.log"),
                        ["qmqpd", "serve", "--config", "/tmp/t/qmqpd.toml"])
    first, cause, command, tail_title, *tail = text.splitlines()
    assert first == "qmqpd serve exited during start-up (exit code 111)"
    assert cause == "likely cause: a refused setting: QUEUEDIR (queuedir) from default: nope"
    assert command == "command: qmqpd serve --config /tmp/t/qmqpd.toml"
    assert tail_title == "log tail of /tmp/t/qmqpd.log:"
    assert len(tail) == 25 and tail[-1].startswith("event=error") and "line=39" in tail[-2]
