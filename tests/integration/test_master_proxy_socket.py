"""PROXY_SOCKET: a listener for a local balancer that ordinary local users cannot reach.
Its connections must start with a PROXY header; the socket's owner, group and mode are
the trust, so another local user cannot borrow the balancer's identity by binding its
address (any user may bind any 127.x source)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from qmqpd.rules import compile_rules
from tests.integration.test_master import Server, is_ok, server_factory  # noqa: F401
from tests.integration.test_master_proxy import PAYLOAD, RULES, V2_LOCAL, v1, v2
from tests.support import read_reply

# the probe runs as nobody, who cannot run the checkout's virtualenv
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def over_unix(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return read_reply(sock)


def test_the_balancer_socket_names_clients_and_others_cannot_use_it(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "rules").write_text(RULES)
    compile_rules(str(tmp_path / "rules"), str(tmp_path / "rules.cdb"))
    run_dir = Path(tempfile.mkdtemp(prefix="qmqpd-lb-"))  # others may look in it
    run_dir.chmod(0o755)
    path = run_dir / "lb.sock"
    server = server_factory(rules=str(tmp_path / "rules.cdb"), proxy_socket=str(path),
                            proxy_socket_mode="0600").start()
    server.wait_idle(2)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert f"path={path} proxy=required" in server.log()
    # a header names the client: its rule applies
    assert is_ok(over_unix(path, v2("192.0.2.9") + PAYLOAD))
    assert is_ok(over_unix(path, v1("192.0.2.10") + PAYLOAD))
    assert over_unix(path, v2("198.51.100.4") + PAYLOAD) == b""  # denied by its rule
    assert "ip=198.51.100.4 rule=198.51.100.4" in server.log()
    # no header: closed, counted as a rejected PROXY header
    assert over_unix(path, PAYLOAD) == b""
    assert "event=proxy_reject" in server.log()
    # LOCAL (a balancer's own check) is this host, 127.0.0.1: these rules deny it
    assert over_unix(path, V2_LOCAL + PAYLOAD) == b""
    assert "ip=127.0.0.1 rule=" in server.log()
    assert re_ip(server.log(), "192.0.2.9") and re_ip(server.log(), "192.0.2.10")
    # an ordinary local user cannot connect at all
    if os.geteuid() != 0:
        pytest.skip("needs root to try as another user")
    def as_nobody() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SYSTEM_PYTHON, "-c", "import socket; s = socket.socket(socket.AF_UNIX); "
             f"s.connect({str(path)!r})"], user="nobody", capture_output=True, text=True,
            timeout=30, check=False)

    try:
        probe = as_nobody()
        assert probe.returncode != 0 and "PermissionError" in probe.stderr, probe.stderr
        path.chmod(0o666)  # the control: the mode alone decides
        assert as_nobody().returncode == 0
        server.stop()
        assert not path.exists()  # removed at exit
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def re_ip(log: str, ip: str) -> bool:
    return f"ip={ip} " in log
