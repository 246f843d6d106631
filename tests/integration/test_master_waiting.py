"""Connections waiting for a worker: a client that gives up is never committed behind its
back, one that half-closes after its request is still served, none waits forever, and
what reaches the master cannot kill or spin it (a rule env too big for a hand-off record,
workers that die while they boot)."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from qmqpd.status import read_status
from tests.integration.test_master import (
    PAYLOAD,
    Server,
    connect,
    is_ok,
    server_factory,  # noqa: F401 - the fixture
    tcprules,
    wait_until,
)
from tests.support import read_reply


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def waiting(server: Server) -> int:
    return int(read_status(str(server.tmp / "status.json")).get("waiting", -1))


SLOW_QUEUE = """#!/bin/sh
# a qmail-queue stand-in that takes as long as {delay} says: the worker stays busy with a
# request it has all received (one that never gives way)
cat > "{out}/$$.msg"
cat <&1 > /dev/null
seconds=$(cat {delay}); echo 0 > {delay}  # one slow message, then fast ones
sleep "$seconds"
exit 0
"""


def slow_queue(tmp: Path) -> tuple[Path, Path, Path]:
    """(the QMAILQUEUE script, the file holding its delay in seconds, where it keeps mail)."""
    out, delay, script = tmp / "mail", tmp / "delay", tmp / "slow-queue"
    out.mkdir()
    delay.write_text("0")
    script.write_text(SLOW_QUEUE.format(out=out, delay=delay))
    script.chmod(0o755)
    return script, delay, out


def occupy(server: Server, delay: Path, seconds: float) -> socket.socket:
    """The one worker busy for `seconds` with a whole request (it cannot give way)."""
    delay.write_text(f"{seconds:g}")
    holder = connect(server.port)
    holder.sendall(PAYLOAD)
    wait_until(lambda: len(server.titled("worker")) == 1 and not server.titled("idle"),
               what="the busy worker")
    return holder


def test_a_client_that_gave_up_waiting_is_not_committed(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    script, delay, mail = slow_queue(tmp_path)
    server = server_factory(maxdaemons=1, prefork=1, maxperip=0, qmailqueue=str(script)).start()
    server.wait_idle(1)
    holder = occupy(server, delay, 5)
    try:
        gives_up = connect(server.port, "127.0.0.2")
        gives_up.sendall(PAYLOAD)  # a whole request, then silence: it waits for a worker
        wait_until(lambda: waiting(server) == 1, what="the first one waiting")
        time.sleep(1.5)  # its client times out: silent for longer than GONE_AFTER_SILENCE_MS
        gives_up.close()
        wait_until(lambda: "client gone while waiting for a worker" in server.log(),
                   seconds=3, what="the departure noticed while it waited")
        half_closes = connect(server.port, "127.0.0.3")
        half_closes.sendall(PAYLOAD)
        half_closes.shutdown(socket.SHUT_WR)  # with its request: it still reads the answer
        holder.settimeout(20)
        assert is_ok(read_reply(holder))
        half_closes.settimeout(20)
        assert is_ok(read_reply(half_closes))
    finally:
        holder.close()
    assert len(os.listdir(mail)) == 2  # the holder's and the half-closed one's only
    assert server.log().count("client gone while waiting") == 1


def test_a_client_waiting_too_long_gets_busy_and_its_slot_back(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    script, delay, mail = slow_queue(tmp_path)
    server = server_factory(maxdaemons=1, prefork=1, maxperip=1, timeout=2,
                            qmailqueue=str(script)).start()
    server.wait_idle(1)
    holder = occupy(server, delay, 8)
    try:
        with connect(server.port, "127.0.0.2") as patient:
            patient.sendall(PAYLOAD)
            patient.settimeout(10)
            answer = read_reply(patient)
        assert b"Zserver busy" in answer, answer
        assert "event=busy" in server.log()
        # its per-IP slot (MAXPERIP 1) came back at once: the next one from there waits
        with connect(server.port, "127.0.0.2") as again:
            again.sendall(PAYLOAD)
            wait_until(lambda: waiting(server) == 1, what="the next one waiting")
    finally:
        holder.close()
    assert len(os.listdir(mail)) == 1  # only the holder's


def test_a_rule_env_too_big_for_a_handoff_costs_that_client_only(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    huge = "x" * 70_000  # over the 65,535 bytes a record field holds
    rules = tcprules(tmp_path, f"127.0.0.2:allow,NOTE=\"{huge}\"\n127.:allow\n")
    server = server_factory(rules=str(rules), prefork=2).start()
    server.wait_idle(2)
    master = server.pid
    with connect(server.port, "127.0.0.2") as sock:
        sock.sendall(PAYLOAD)
        sock.settimeout(10)
        assert read_reply(sock) == b"30:Zqq temporary problem (#4.3.0),"
    with connect(server.port, "127.0.0.1") as sock:
        sock.sendall(PAYLOAD)
        sock.settimeout(10)
        assert is_ok(read_reply(sock))
    assert server.proc is not None and server.proc.poll() is None and server.pid == master
    assert "client facts do not fit a handoff record" in server.log()


FLAKY_LAUNCHER = textwrap.dedent("""
    import os, sys
    from qmqpd import config, master, worker
    from qmqpd.cli import planner

    failures = sys.argv[2]

    def flaky_worker(channel, plans):
        # the first three die while they boot: each claims one of three names, atomically,
        # since workers boot side by side
        for slot in range(3):
            try:
                os.close(os.open(os.path.join(failures, str(slot)),
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue
            raise RuntimeError("worker cannot boot yet")
        worker.worker_main(channel, plans)

    cfg = config.load(sys.argv[1])
    sys.exit(master.run(cfg, flaky_worker, lambda: cfg, planner))
""")


def test_workers_dying_at_boot_back_off_then_spawning_resumes_idle(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    server = server_factory(prefork=2)
    launcher = tmp_path / "flaky.py"
    launcher.write_text(FLAKY_LAUNCHER)
    failures = tmp_path / "failures"
    failures.mkdir()
    server.start([sys.executable, str(launcher), str(server.config_path), str(failures)])
    server.wait_idle(2)
    assert len(os.listdir(failures)) == 3 and "died before it was ready" in server.log()
    master = server.pid
    time.sleep(1.0)  # past every back-off: nothing left to wake the loop early
    before = cpu_seconds(master)
    time.sleep(3.0)
    used = cpu_seconds(master) - before
    assert used < 0.3, f"the idle master used {used:.2f} s of CPU in 3 s"
    assert server.pid == master
    with connect(server.port) as sock:
        sock.sendall(PAYLOAD)
        sock.settimeout(10)
        assert is_ok(read_reply(sock))
