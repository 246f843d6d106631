"""tests/serve_process.py, the controller every test and bench starts `qmqpd serve` with:
a port taken before the first start means another port, a start that fails says why (exit
code, likely cause, log tail), a server that does not listen in time is stopped, a kill -9
is followed by a restart on the same port.

Real `qmqpd serve` processes on loopback, each with its own port, queue and log.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.serve_process import ServeFailed, ServeProcess
from tests.support import exchange, free_port, listens, process_gone, request

PAYLOAD = request(b"Subject: x\n\nhello\n", b"a@example.org", [b"b@example.net"])


def test_a_port_taken_before_the_first_start_means_another(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, use_fsync=False, use_syncdir=False, prefork=1)
    chosen = server.port
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", chosen))
        holder.listen(1)
        try:
            server.start()
            assert server.port != chosen and listens(server.pid, server.port)
            assert b":Kok " in exchange(server.port, PAYLOAD)
        finally:
            assert server.stop() == 0
    assert "Address already in use" in server.log()  # the first try, then another port


def test_a_port_the_test_named_is_not_moved_and_the_clash_is_named(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        server = ServeProcess(tmp_path, port=port)
        with pytest.raises(ServeFailed) as raised:
            server.start()
    text = str(raised.value)
    assert raised.value.clash and "exit code 111" in text
    assert f"likely cause: a port clash: PORT: 127.0.0.1 port {port} is taken" in text, text
    assert "Address already in use" in text.split("log tail")[1]  # the log, quoted


def test_a_refused_setting_is_named(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, maxperip="lots")
    with pytest.raises(ServeFailed) as raised:
        server.start()
    text = str(raised.value)
    assert "qmqpd serve exited during start-up (exit code 111)" in text
    assert "likely cause: a refused setting: MAXPERIP (maxperip) from config file" in text
    assert not raised.value.clash


def test_a_server_that_does_not_listen_in_time_is_stopped(tmp_path: Path) -> None:
    # a command that runs but never listens (sh sleeps; "serve --config FILE" are its $0..)
    server = ServeProcess(tmp_path, qmqpd=["/bin/sh", "-c", "echo starting; exec sleep 60"])
    with pytest.raises(ServeFailed) as raised:
        server.start(seconds=1)
    text = str(raised.value)
    assert "qmqpd serve did not listen (still running)" in text
    assert "likely cause: no listen event in time" in text and "starting" in text
    assert server.proc is not None and process_gone(server.pid, timeout=10)


def test_kill_and_restart_on_the_same_port(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, use_fsync=False, use_syncdir=False, prefork=2).start()
    try:
        port, first = server.port, server.pid
        server.wait_idle(2)
        assert server.kill_master() == 2  # its two idle workers, held by pidfd
        assert server.reap_orphans(30) == 0  # they end on their own with their master
        server.start()
        assert (server.port, server.starts) == (port, 2) and server.pid != first
        assert b":Kok " in exchange(port, PAYLOAD)
        assert server.queued() == 1
    finally:
        assert server.stop() == 0


def test_settings_from_the_environment_without_a_config_file(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, config_file=False, use_fsync=False, use_syncdir=False,
                          prefork=1, port=free_port())
    assert server.config_path is None and "--config" not in server.argv()
    try:
        server.start()
        assert b":Kok " in exchange(server.port, PAYLOAD)
    finally:
        assert server.stop() == 0
    assert f"port={server.port}" in server.log()
