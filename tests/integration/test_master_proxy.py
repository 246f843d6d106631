"""`qmqpd serve` with PROXY_PROTOCOL on: the master reads the header a trusted balancer
sends, before rules and MAXPERIP, so the client it names drives both, and the session's
TCPREMOTEIP, Received line and log. Real processes and sockets on loopback: 127.0.0.10
stands for the balancer (trusted only with PROXY_TRUSTED_UNSAFE: any local user can bind a
loopback address, which the tests at the end show); the headers name documentation
addresses (192.0.2.0/24, 198.51.100.0/24) as the clients behind it.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qmqpd.rules import compile_rules
from qmqpd.status import read_status
from tests.integration.test_master import (
    MESSAGE,
    ROOT,
    TOO_MANY,
    Server,
    answer_within,
    is_ok,
    server_factory,  # noqa: F401 - the fixture
    wait_until,
)
from tests.support import process_title, read_reply, request

BALANCER = "127.0.0.10"
RULES = """\
127.0.0.10:allow,MAXPERIP="1"
192.0.2.7:allow,MAXPERIP="1"
198.51.100.4:deny
192.0.2.:allow
198.51.100.:allow,DATABYTES="200"
:deny
"""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PAYLOAD = request(MESSAGE, b"sender@example.org", [b"rcpt@example.org"])
TOO_SLOW = b"57:Zconnection too slow: below 512 bytes per second (#4.4.2),"


def v1(client: str, port: int = 40000) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 628\r\n".encode()


def v2(client: str, port: int = 40000) -> bytes:
    addresses = struct.pack(">4s4sHH", ipaddress.IPv4Address(client).packed,
                            ipaddress.IPv4Address("127.0.0.1").packed, port, 628)
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack(">H", len(addresses)) + addresses


V2_LOCAL = V2_SIGNATURE + bytes([0x20, 0x00, 0x00, 0x00])


def through(port: int, data: bytes, source: str = BALANCER) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(data)
    return sock


def send(port: int, data: bytes, source: str = BALANCER) -> bytes:
    """The answer to data; b"" when the server closed the connection without one (closing
    with the client's bytes unread resets it, so the send itself may fail)."""
    try:
        with through(port, data, source) as sock:
            sock.shutdown(socket.SHUT_WR)
            return read_reply(sock)
    except (BrokenPipeError, ConnectionResetError):
        return b""
    except OSError as error:
        if error.errno != errno.ENOTCONN:
            raise
        return b""


def start(factory: Callable[..., Server], tmp_path: Path, **settings: object) -> Server:
    (tmp_path / "rules").write_text(RULES)
    compile_rules(str(tmp_path / "rules"), str(tmp_path / "rules.cdb"))
    settings = {"proxy_trusted": BALANCER, "proxy_trusted_unsafe": True, **settings}
    server = factory(rules=str(tmp_path / "rules.cdb"), proxy_protocol="any",
                     **settings).start()
    server.wait_idle(2)
    return server


def test_the_header_names_the_client(server_factory: Callable[..., Server],  # noqa: F811
                                     tmp_path: Path) -> None:
    server = start(server_factory, tmp_path)
    assert is_ok(send(server.port, v1("192.0.2.7") + PAYLOAD))
    assert is_ok(send(server.port, v2("192.0.2.8", 41000) + PAYLOAD))
    # the rules of the named client: its deny, its DATABYTES
    assert send(server.port, v2("198.51.100.4") + PAYLOAD) == b""
    big = request(b"x" * 500, b"sender@example.org", [b"rcpt@example.org"])
    assert re.fullmatch(rb"\d+:D.*,", send(server.port, v2("198.51.100.5") + big), re.DOTALL)
    # a health check (LOCAL): served as the balancer itself, the empty probe gets D
    assert re.fullmatch(rb"\d+:D.*,", send(server.port, V2_LOCAL + b"6:0:,0:,,"), re.DOTALL)
    log = server.log()
    assert re.search(r"event=session pid=\d+ ip=192\.0\.2\.7 ", log), log
    assert re.search(r"event=session pid=\d+ ip=192\.0\.2\.8 ", log), log
    assert re.search(r"event=deny pid=\d+ ip=198\.51\.100\.4 ", log), log
    # ... logged as a health check, not as a session
    assert re.search(rf"event=health pid=\d+ ip={re.escape(BALANCER)} ", log), log
    assert not re.search(rf"event=session pid=\d+ ip={re.escape(BALANCER)} ", log), log
    received = sorted(path.read_bytes() for path in (server.queue / "mess").rglob("*")
                      if path.is_file())
    assert len(received) == 2
    assert any(b"Received: from unknown (192.0.2.7)\n" in text for text in received)
    assert any(b"Received: from unknown (192.0.2.8)\n" in text for text in received)


def test_untrusted_malformed_and_missing_headers_are_closed(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    server = start(server_factory, tmp_path, proxy_timeout=3)  # the protocol's least
    # a direct client claiming an address: not a trusted balancer
    assert send(server.port, v2("192.0.2.7") + PAYLOAD, source="127.0.0.2") == b""
    assert send(server.port, b"HELO there\r\n" + PAYLOAD) == b""  # no header at all
    assert send(server.port, b"PROXY TCP4 192.0.2.7 nowhere 1 2\r\n" + PAYLOAD) == b""
    with through(server.port, b"PROXY TCP4 192.0.2.") as partial:  # the rest never comes
        started = time.monotonic()
        assert answer_within(partial, 10) == b""
        waited = time.monotonic() - started
    assert 2.8 < waited < 8, waited  # PROXY_TIMEOUT 3 and a 1 s loop tick, generous
    log = server.log()
    assert 'event=proxy_reject pid=' in log
    assert 'ip=127.0.0.2 reason="connection from 127.0.0.2, not in PROXY_TRUSTED"' in log
    assert 'reason="the connection does not start with a PROXY v1 or v2 header"' in log
    assert "reason=\"PROXY v1 address 'nowhere' is not an IP address\"" in log
    assert 'reason="no complete PROXY header within PROXY_TIMEOUT"' in log
    assert "event=session" not in log
    wait_until(lambda: read_status(str(server.tmp / "status.json"))["connections"]
               ["proxy_rejected"] == 4, what="4 rejects in the status counters")


def test_per_ip_limits_count_the_named_client(server_factory: Callable[..., Server],  # noqa: F811
                                              tmp_path: Path) -> None:
    """MAXPERIP 1 for 192.0.2.7 and for the balancer: a second session of 192.0.2.7 gets
    Z while others through the same balancer are served; connections still waiting for
    their header count against no client (the balancer's own limit is not hit)."""
    server = start(server_factory, tmp_path, rate_grace=2)
    silent = [through(server.port, b"") for _ in range(3)]  # no header yet
    held = through(server.port, v2("192.0.2.7") + b"1000:")  # a request under way
    try:
        wait_until(lambda: "waiting=4" in process_title(server.pid), what="four waiting")
        assert send(server.port, v2("192.0.2.7") + PAYLOAD) == TOO_MANY
        assert is_ok(send(server.port, v2("192.0.2.9") + PAYLOAD))
        # the header, then the start of a request and no more: the MIN_RATE rule cuts it
        # in the master once RATE_GRACE (2 s here) is over; the client's slot is free again
        assert answer_within(held, 15) == TOO_SLOW
    finally:
        held.close()
        for sock in silent:
            sock.close()
    assert is_ok(send(server.port, v2("192.0.2.7") + PAYLOAD))
    assert "event=too_slow" in server.log()


def test_proxy_protocol_without_trusted_balancers_refuses_to_start(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "PROXY_PROTOCOL": "v2", "PORT": "0", "STATUS_FILE": "", "ALLOW_ROOT": "1"}
    run = subprocess.run([sys.executable, "-m", "qmqpd", "serve"], capture_output=True,
                         text=True, timeout=30, env=env, cwd=tmp_path, check=False)
    assert run.returncode == 111
    assert "PROXY_PROTOCOL is v2 but PROXY_TRUSTED is empty" in run.stdout + run.stderr


# ---- trust a local user cannot borrow --------------------------------------------------
OTHER_CLIENT_RULES = """\
10.1.2.3:allow
:deny
"""
# Run as user nobody with the system's Python (standard library only): bind a source
# address, send a PROXY v2 header naming 10.1.2.3 and a QMQP request, print the answer
# (or the error).
AS_NOBODY = """
import socket, struct, sys
source, port, request = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
header = (b"\\r\\n\\r\\n\\x00\\r\\nQUIT\\n" + bytes([0x21, 0x11]) + struct.pack(">H", 12)
          + socket.inet_aton("10.1.2.3") + socket.inet_aton("127.0.0.1")
          + struct.pack(">HH", 40000, 628))
try:
    with socket.socket() as sock:
        sock.bind((source, 0))
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        sock.sendall(header + request)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while block := sock.recv(4096):
            answer += block
    print(answer.decode(errors="replace") or "closed")
except OSError as error:
    print(f"error: {error.strerror}")
"""


def as_nobody(source: str, port: int) -> str:
    """What user nobody gets when it claims to be 10.1.2.3 from source."""
    run = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                          "/usr/bin/python3", "-I", "-c", AS_NOBODY, source, str(port),
                          PAYLOAD.hex()],
                         capture_output=True, text=True, timeout=60, check=False, cwd="/")
    assert run.returncode == 0 and run.stderr == "", run.stderr
    return run.stdout.strip()


def serve_for_other_client(factory: Callable[..., Server], tmp_path: Path,
                           **settings: object) -> Server:
    (tmp_path / "rules").write_text(OTHER_CLIENT_RULES)
    compile_rules(str(tmp_path / "rules"), str(tmp_path / "rules.cdb"))
    return factory(rules=str(tmp_path / "rules.cdb"), proxy_protocol="v2",
                   **settings).start()


def test_a_local_user_borrows_a_trusted_loopback_balancer(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    """The risk the override accepts, shown: user nobody binds the balancer's loopback
    address and gets 10.1.2.3's rule (K where every local address is denied). The start
    says so, loudly."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as user nobody")
    server = serve_for_other_client(server_factory, tmp_path, proxy_trusted=BALANCER,
                                    proxy_trusted_unsafe=True)
    assert re.search(r'event=warning .*msg="PROXY_TRUSTED_UNSAFE accepts it: '
                     r'127\.0\.0\.10/32 is a loopback address', server.log()), server.log()
    answer = as_nobody(BALANCER, server.port)
    assert is_ok(answer.encode()), answer
    wait_until(lambda: re.search(r"event=session pid=\d+ ip=10\.1\.2\.3 ", server.log()),
               what="the session logged as 10.1.2.3")


def test_a_local_user_cannot_borrow_a_balancer_on_another_host(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    """Trust that names only another host's balancer: user nobody can neither send from
    that address (not this host's) nor be believed from a loopback one."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as user nobody")
    server = serve_for_other_client(server_factory, tmp_path, proxy_trusted="192.0.2.10")
    assert as_nobody("192.0.2.10", server.port) == "error: Cannot assign requested address"
    for source in (BALANCER, "127.0.0.1"):  # closed at once: no answer (or a reset)
        answer = as_nobody(source, server.port)
        assert answer == "closed" or answer.startswith("error: "), answer
    log = server.log()
    assert "event=session" not in log and "PROXY_TRUSTED_UNSAFE" not in log
    assert log.count("not in PROXY_TRUSTED") == 2


def test_loopback_or_wildcard_trust_refuses_start_check_and_reload(
        server_factory: Callable[..., Server], tmp_path: Path) -> None:  # noqa: F811
    """Without the override: `serve` exits 111 with one line naming PROXY_TRUSTED and why,
    `qmqpd check` lists it, and a HUP to such a config keeps the running one."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "PROXY_PROTOCOL": "v2", "PORT": "0", "STATUS_FILE": "", "ALLOW_ROOT": "1"}
    for trusted, why in (("127.0.0.10", "is a loopback address: any local user can bind it"),
                         ("::1", "is a loopback address"), ("0.0.0.0/0", "is wider than /8"),
                         ("::/0", "is wider than /16")):
        for command in ("serve", "check"):
            run = subprocess.run([sys.executable, "-m", "qmqpd", command], capture_output=True,
                                 text=True, timeout=60, env={**env, "PROXY_TRUSTED": trusted},
                                 cwd=tmp_path, check=False)
            assert run.returncode == 111, run.stderr
            lines = [line for line in run.stderr.splitlines() if "PROXY_TRUSTED" in line]
            assert len(lines) == 1 and why in lines[0], run.stderr
            assert "PROXY_TRUSTED (proxy_trusted) from environment" in lines[0]
            assert "PROXY_TRUSTED_UNSAFE" in lines[0]
    server = serve_for_other_client(server_factory, tmp_path, proxy_trusted="192.0.2.10")
    server.write_config({**server.settings, "proxy_trusted": "127.0.0.0/8"})
    server.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in server.log(), what="the reload refused")
    assert "is a loopback address" in server.log()
    assert send(server.port, v2("10.1.2.3") + PAYLOAD) == b""  # still the old trust
