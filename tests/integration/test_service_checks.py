"""`qmqpd service create` checks what it wrote, as `serve --envdir ./variables` will read
it, and prints each problem with the command that fixes it; `--rmsvc` stops the server and
its logger under a real daemontools svscan and waits for both before removing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from qmqpd.queue import create_queue
from qmqpd.rules import compile_rules
from tests.serve_process import children
from tests.support import command, exchange, free_port, need, process_gone, request, wait_until

MESSAGE = request(b"Subject: rm\n\nhello\n", b"ops@example.org", [b"you@example.net"])


def qmqpd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*command("qmqpd"), *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_create_names_each_problem_with_its_fix(tmp_path: Path) -> None:
    services = tmp_path / "service"
    control = tmp_path / "control"
    control.mkdir()
    result = qmqpd("service", "create", "--qmqp=7629", f"--servicedir={services}",
                   f"--qbase={tmp_path / 'queues'}", "--qcount=2", "--qstart=1",
                   f"--cntrldir={control}", "--user=no-such-qmqpd-user", "--group=nogroup",
                   f"--logdir={tmp_path / 'log'}")
    assert result.returncode == 111, result.stderr
    err = result.stderr
    assert ("fix: useradd --system --no-create-home --shell /usr/sbin/nologin --gid nogroup "
            "no-such-qmqpd-user") in err
    assert f"fix: qmqpd rules compile {control}/tcp.qmqp {control}/tcp.qmqp.cdb" in err
    assert "USER (user) from envdir" in err and "RULES (rules) from envdir" in err
    assert f"qmqpd check --envdir {services}/qmqpd.7629/variables" in err
    # written all the same: the operator fixes and starts it
    assert (services / "qmqpd.7629" / "run").exists()
    assert (services / "qmqpd.7629" / "variables" / "USER").read_text() == "no-such-qmqpd-user\n"


def test_create_names_missing_queues(tmp_path: Path) -> None:
    control = tmp_path / "control"
    control.mkdir()
    (control / "tcp.qmqp").write_text("127.:allow\n")
    compile_rules(str(control / "tcp.qmqp"), str(control / "tcp.qmqp.cdb"))
    result = qmqpd("service", "create", "--qmqp=7630", f"--servicedir={tmp_path / 'service'}",
                   f"--queuedir={tmp_path / 'queue'}", f"--cntrldir={control}",
                   "--set=ALLOW_ROOT=1", f"--set=STATUS_FILE={tmp_path / 'status.json'}",
                   f"--logdir={tmp_path / 'log'}")
    assert result.returncode == 111, result.stderr
    assert f"fix: qmqpd queue create {tmp_path / 'queue'}" in result.stderr
    create_queue(str(tmp_path / "queue"))
    again = qmqpd("service", "create", "--qmqp=7630", f"--servicedir={tmp_path / 'service'}",
                  f"--queuedir={tmp_path / 'queue'}", f"--cntrldir={control}",
                  "--set=ALLOW_ROOT=1", f"--set=STATUS_FILE={tmp_path / 'status.json'}",
                  f"--logdir={tmp_path / 'log'}")
    assert again.returncode == 0, again.stderr


def test_systemd_unit_runs_as_the_user_without_a_user_variable(tmp_path: Path) -> None:
    unit = tmp_path / "qmqpd.service"
    result = qmqpd("service", "create", "--qmqp=628", f"--queuedir={tmp_path / 'queue'}",
                   "--user=nobody", "--group=nogroup,daemon", f"--systemd={unit}")
    # checked like a service directory: here the queue is missing (the unit is kept)
    assert result.returncode == 111, result.stderr
    assert f"fix: qmqpd queue create {tmp_path / 'queue'}" in result.stderr
    text = unit.read_text()
    assert "User=nobody\nGroup=nogroup\nSupplementaryGroups=daemon\n" in text
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in text
    assert "USER=" not in text and "GROUP=" not in text


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_rmsvc_stops_server_and_logger_before_removing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("svscan's services run as root here")
    queue = tmp_path / "queue"
    create_queue(str(queue))
    control = tmp_path / "control"
    control.mkdir()
    (control / "tcp.qmqp").write_text("127.:allow\n:deny\n")
    compile_rules(str(control / "tcp.qmqp"), str(control / "tcp.qmqp.cdb"))
    services = tmp_path / "service"
    services.mkdir()
    port = free_port()
    options = [f"--qmqp={port}", f"--servicedir={services}", f"--queuedir={queue}",
               f"--cntrldir={control}", "--localip=127.0.0.1", f"--logdir={tmp_path / 'log'}",
               "--set=ALLOW_ROOT=1", "--set=PREFORK=1",
               f"--set=STATUS_FILE={tmp_path / 'status.json'}"]
    created = qmqpd("service", "create", *options, "--up")
    assert created.returncode == 0, created.stderr
    service = services / f"qmqpd.{port}"
    svscan = subprocess.Popen([need("svscan"), str(services)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: b":K" in exchange(port, MESSAGE)[:8] if _listening(port) else False,
                   what="the supervised server to serve")
        supervisors = children(svscan.pid)
        assert len(supervisors) == 2  # supervise of the service and of its log
        server = int(subprocess.run([need("svstat"), str(service)], capture_output=True,
                                    text=True, timeout=10).stdout.split("(pid ")[1]
                     .split(")")[0])
        logger = int(subprocess.run([need("svstat"), str(service / "log")],
                                    capture_output=True, text=True, timeout=10)
                     .stdout.split("(pid ")[1].split(")")[0])
        removed = qmqpd("service", "create", *options, "--rmsvc")
        assert removed.returncode == 0 and "removed" in removed.stdout, removed.stderr
        # When --rmsvc returns, everything it stopped is gone, and nothing came back.
        assert not service.exists()
        for pid in (server, logger, *supervisors):
            assert process_gone(pid), pid
        assert not _listening(port)
        assert "event=exit" in (tmp_path / "log" / "current").read_text(errors="replace")
        os.kill(svscan.pid, 0)  # svscan itself keeps running
        wait_until(lambda: not children(svscan.pid) or None, seconds=8,
                   what="svscan to start nothing again") if children(svscan.pid) else None
        assert not children(svscan.pid)
    finally:
        os.killpg(svscan.pid, signal.SIGTERM)
        svscan.wait(10)
        for leftover in services.glob(".*"):
            subprocess.run([need("svc"), "-dx", str(leftover), str(leftover / "log")],
                           timeout=10, check=False)
