"""`qmqpd serve --envdir ./variables` under a real daemontools supervise: a changed
variables/ file is applied by `svc -h`, as the service's run script promises."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

from qmqpd.queue import create_queue
from tests.supervised import Supervised
from tests.support import command, exchange, free_port, request, wait_until

MESSAGE = request(b"Subject: hup\n\nhello\n", b"ops@example.org", [b"you@example.net"])


def make_service(tmp_path: Path, port: int) -> Path:
    queue = tmp_path / "queue"
    create_queue(str(queue))
    control = tmp_path / "control"
    control.mkdir()
    (control / "tcp.qmqp").write_text("127.:allow\n:deny\n")
    subprocess.run([*command("qmqpd"), "rules", "compile", str(control / "tcp.qmqp"),
                    str(control / "tcp.qmqp.cdb")], check=True, capture_output=True, timeout=60)
    extra = ["--set=ALLOW_ROOT=1"] if os.geteuid() == 0 else []
    subprocess.run(
        [*command("qmqpd"), "service", "create", f"--qmqp={port}",
         f"--servicedir={tmp_path / 'service'}", f"--queuedir={queue}",
         f"--cntrldir={control}", "--localip=127.0.0.1", "--maxperip=5", "--up",
         f"--logdir={tmp_path / 'log'}", "--set=PREFORK=1",
         f"--set=STATUS_FILE={tmp_path / 'status.json'}", *extra],
        check=True, capture_output=True, text=True, timeout=60)
    return tmp_path / "service" / f"qmqpd.{port}"


def second_answer(port: int) -> bytes:
    """The answer to a request sent while another connection from 127.0.0.1 is open."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as holder:
        holder.sendall(b"1")  # a request begun and not finished: holds its per-IP slot
        return exchange(port, MESSAGE)


def test_svc_h_applies_a_changed_variable(tmp_path: Path) -> None:
    port = free_port()
    service = make_service(tmp_path, port)
    run = (service / "run").read_text()
    assert "serve --envdir ./variables" in run and "envdir ./variables qmqpd" not in run
    supervised = Supervised(service, tmp_path / "output")
    try:
        wait_until(lambda: "event=listen" in supervised.text(), what="the server to listen",
                   explain=supervised.text)
        before = second_answer(port)
        assert b":K" in before[:8], before  # MAXPERIP=5: two at once are served
        # the other commands read the service's settings the same way
        variables = str(service / "variables")
        for args, expected in ((("check",), "ok: 1 session plan(s)"),
                               (("queue", "stat"), f"{tmp_path / 'queue'} todo="),
                               (("status",), f"pid {supervised.server_pid()}, running")):
            def shows(args: tuple[str, ...] = args, expected: str = expected) -> bool:
                done = subprocess.run([*command("qmqpd"), *args, "--envdir", variables],
                                      capture_output=True, text=True, timeout=60)
                return done.returncode == 0 and expected in done.stdout

            wait_until(shows, what=f"qmqpd {' '.join(args)} --envdir to show {expected!r}")

        (service / "variables" / "MAXPERIP").write_text("1\n")
        supervised.svc("-h")
        wait_until(lambda: "event=reload" in supervised.text(), what="the reload line",
                   explain=supervised.text)
        reload_line = next(line for line in supervised.text().splitlines()
                           if "event=reload" in line)
        assert "maxperip=1" in reload_line
        answer = second_answer(port)
        assert b":Z" in answer[:8] and b"too many connections" in answer, answer
        # one at a time is still served (once the master has seen the holder go)
        wait_until(lambda: b":K" in exchange(port, MESSAGE)[:8], what="a K for one client")
    finally:
        supervised.stop()
