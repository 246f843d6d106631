"""Helpers shared by the integration tests: ports (drawn, reserved, a clash retried), raw QMQP
requests, real processes, whether Debian's postfix may be used."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from qmqpd.netstring import encode

BIN = Path(sys.executable).parent


def operator_environ(**extra: str) -> dict[str, str]:
    """The environment a documented command runs in on an operator's machine: this
    environment without the ALLOW_ROOT that tests/conftest.py adds for the suite's own
    servers (a bench run with sudo must say so itself)."""
    return {**{k: v for k, v in os.environ.items() if k != "ALLOW_ROOT"}, **extra}


def command(name: str) -> list[str]:
    """The installed console script, or the module when running from a checkout."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"qmqpd": "qmqpd", "qmqpc": "qmqpd.client"}[name]
    return [sys.executable, "-m", module]


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
            low, high = (int(field) for field in handle.read().split())
            return low, high
    except (OSError, ValueError):
        return 32768, 60999


_ports = random.SystemRandom()  # not the global `random`: hypothesis seeds that one
# Test runs side by side on one machine hand each port out once per period: a port is
# taken by creating PORTS_DIR/<port>.<period> (O_EXCL), so two runs never get the same port
# between one's probe and its server's bind.
PORTS_DIR = Path(tempfile.gettempdir()) / "qmqpd-test-ports"
PORT_PERIOD = 300


def _reserve(port: int) -> bool:
    period = int(time.time() // PORT_PERIOD)
    try:
        PORTS_DIR.mkdir(mode=0o1777, exist_ok=True)
        os.close(os.open(PORTS_DIR / f"{port}.{period}", os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError:
        return False
    except OSError:  # no usable temp dir: the probe and the retries still hold
        return True
    if _ports.random() < 0.01:  # now and then, forget the periods that are over
        for old in PORTS_DIR.iterdir():
            if not old.name.endswith(f".{period}") and not old.name.endswith(f".{period - 1}"):
                with contextlib.suppress(OSError):
                    old.unlink()
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, for a server the test starts next. It is drawn at
    random below the kernel's ephemeral range: every outgoing connection on the machine (and
    a load test opens thousands) takes its local port from that range, so a port the kernel
    handed out as "free" there is soon taken by someone's client. Probed without
    SO_REUSEADDR, so a port with connections in TIME_WAIT is not chosen, and reserved for
    this run (_reserve). Still only free *now* for other programs: start servers through
    start_on_free_port, which retries a clash."""
    low = _ephemeral_range()[0]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _attempt in range(1000):
        port = _ports.randrange(10000, max(low, 10001))
        with socket.socket(family) as sock:
            if host == "::":  # free for a dual-stack listener: on IPv4 addresses as well
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                sock.bind((host, port))
            except OSError as error:
                if error.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
        if _reserve(port):
            return port
    raise RuntimeError(f"no free port on {host} in 1000 tries")


class PortTaken(Exception):
    """A server could not bind the port it was given: someone took it after free_port."""


# What servers say when their port is taken: Python/qmqpd ("[Errno 98] Address already in
# use"), djb's tcpserver ("unable to bind: address already used"), clamd, haproxy
# ("cannot bind socket"), Go programs such as prometheus ("bind: address already in use").
PORT_CLASH = re.compile(r"address already in use|address already used|cannot bind socket"
                        r"|EADDRINUSE", re.IGNORECASE)


def port_clash(text: str) -> bool:
    """True when a server's output says its port was taken."""
    return PORT_CLASH.search(text) is not None


T = TypeVar("T")


def start_on_free_port(start: Callable[[int], T], host: str = "127.0.0.1",
                       attempts: int = 10) -> T:
    """Start a server on a free port and return what start(port) returns; start raises
    PortTaken when the server lost the port to another process (tell with port_clash on
    its output), and it is started again on a fresh port. Any other error is the test's."""
    for _attempt in range(attempts):
        try:
            return start(free_port(host))
        except PortTaken:
            continue
    raise AssertionError(f"the port was taken {attempts} times in a row on {host}")


def request(message: bytes, sender: bytes, recipients: list[bytes]) -> bytes:
    inner = encode(message) + encode(sender) + b"".join(encode(r) for r in recipients)
    return encode(inner)


def read_reply(sock: socket.socket, limit: int = 4096) -> bytes:
    """Everything the server sends until it closes (bounded)."""
    data = b""
    while len(data) < limit:
        try:
            block = sock.recv(limit - len(data))
        except ConnectionResetError:
            break
        if not block:
            break
        data += block
    return data


def exchange(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 20,
             source: str | None = None) -> bytes:
    """Send raw bytes, half-close, return the raw answer (b"" from a server that closed
    or reset the connection before taking it all, e.g. a denied client)."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as error:  # the server's close or reset arrived first
            if error.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                raise
        return read_reply(sock)


def need(program: str) -> str:
    path = shutil.which(program) or (program if os.path.exists(program) else None)
    if path is None:
        raise RuntimeError(f"{program} is not installed: run .ci/run (it installs the test peers)")
    return path


POSTFIX_TOOLS = ("/usr/sbin/qmqp-source", "/usr/sbin/qmqp-sink", "/usr/sbin/postfix")


def postfix_missing() -> str:
    """Why Debian's postfix (qmqp-source, qmqp-sink, postfix) cannot be used here, or "".
    tests/install-and-run.sh leaves postfix out on a host with another mail system, as it
    would replace it, and says so in QMQPD_TEST_NO_POSTFIX."""
    if all(os.access(tool, os.X_OK) for tool in POSTFIX_TOOLS):
        return ""
    return os.environ.get("QMQPD_TEST_NO_POSTFIX") or (
        "Debian's postfix (qmqp-source, qmqp-sink) is not installed: run "
        "tests/install-and-run.sh")


# for tests and modules that need Postfix's tools
needs_postfix = pytest.mark.skipif(bool(postfix_missing()), reason=postfix_missing() or "-")


def need_postfix(tool: str = "/usr/sbin/qmqp-source") -> str:
    """The path of one of Postfix's tools; the test skips, saying why, without them."""
    why = postfix_missing()
    if why:
        pytest.skip(why)
    return tool


def wait_for_port(port: int, host: str = "127.0.0.1", seconds: float = 10) -> None:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {seconds}s")


def listens(pid: int, port: int) -> bool:
    """True when process pid holds a TCP socket listening on port (IPv4 or IPv6): the
    server itself is bound there, not another process that holds the port."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                return True
    return False


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, seconds: float = 10) -> None:
    """Stop a process we started, by its PID, and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(seconds)


def _log_since(log: Path, mark: int) -> str:
    with open(log, "rb") as handle:
        handle.seek(mark)
        return handle.read().decode(errors="replace")


def wait_listening(proc: subprocess.Popen, said: Callable[[], str], seconds: float = 30,
                   ready: str = "event=listen") -> None:
    """Wait until a server we started says ready (qmqpd serve: its listen event); PortTaken
    when it exited because its port was taken, AssertionError with its output for any
    other exit. said() returns what this start of the server has written so far."""
    wait_until(lambda: ready in said() or proc.poll() is not None, seconds,
               what=f"{ready!r} from the server")
    if proc.poll() is not None:
        text = said()
        if port_clash(text):
            raise PortTaken(text)
        raise AssertionError(f"the server exited {proc.returncode}:\n{text}")


class TcpServerSession:
    """Debian's ucspi-tcp tcpserver running `qmqpd session` on loopback."""

    def __init__(self, env: dict[str, str], log: Path, host: str = "127.0.0.1",
                 rules_cdb: str | None = None, limit: int = 40) -> None:
        self.host = host
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in stop)
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}

        def start(port: int) -> subprocess.Popen[bytes]:
            argv = [need("tcpserver"), "-v", "-H", "-R", "-l", "qmqpd.test", "-c", str(limit)]
            if rules_cdb:
                argv += ["-x", rules_cdb]
            argv += [host, str(port), *command("qmqpd"), "session"]
            mark = log.stat().st_size
            proc = subprocess.Popen(argv, env=full_env, stdout=self._log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            # -v: tcpserver says "status: 0/N" once it is bound, "unable to bind" if not
            wait_until(lambda: proc.poll() is not None or "status:" in _log_since(log, mark),
                       what="tcpserver to bind")
            if proc.poll() is not None:
                text = _log_since(log, mark)
                if port_clash(text):
                    raise PortTaken(text)
                raise RuntimeError(f"tcpserver exited {proc.returncode}: {text}")
            self.port = port
            return proc

        self.proc = start_on_free_port(start, host)
        wait_for_port(self.port, host)

    def stop(self) -> None:
        stop_process(self.proc)
        self._log_file.close()


def process_gone(pid: int, timeout: float = 0.0) -> bool:
    """True once pid has exited (gone, or a zombie nobody reaped yet), waiting up to
    timeout seconds for it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def wait_until(check: Callable[[], object], seconds: float = 30, what: str = "",
               explain: Callable[[], str] | None = None) -> object:
    """Poll check until it returns something true, and return that; fail after seconds
    (generous: the machine is shared and servers fork their workers at start)."""
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    detail = f"\n{explain()}" if explain is not None else ""
    raise AssertionError(f"timed out after {seconds}s waiting for {what or check}{detail}")


def toml_text(settings: dict[str, object]) -> str:
    """A qmqpd config file: one `key = value` line per setting (booleans, integers,
    everything else as a quoted string)."""
    lines = []
    for key, value in settings.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = json.dumps(str(value))
        lines.append(f"{key} = {text}\n")
    return "".join(lines)


def process_title(pid: int) -> str:
    """What a process shows as its command line (a qmqpd process's title); "" once gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().decode(errors="replace")
    except OSError:
        return ""


def interrupt_when(process: subprocess.Popen[str], ready: Callable[[str], bool], sig: int,
                   timeout: float = 90) -> tuple[str, str]:
    """Read a running program's stderr until ready(what it said so far), then send it sig
    and let it finish (killed if it does not); (stderr before the signal, the rest)."""
    assert process.stderr is not None
    seen = ""
    try:
        while not ready(seen):
            line = process.stderr.readline()
            assert line, f"ended early: {seen[-2000:]}"
            seen += line
        process.send_signal(sig)
        _, rest = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return seen, rest
