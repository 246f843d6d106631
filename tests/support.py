"""Helpers shared by the integration tests: free ports, raw QMQP requests, real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qmqpd.netstring import encode

BIN = Path(sys.executable).parent


def command(name: str) -> list[str]:
    """The installed console script, or the module when running from a checkout."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"qmqpd": "qmqpd", "qmqpc": "qmqpd.client"}[name]
    return [sys.executable, "-m", module]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        if host == "::":  # free for a dual-stack listener: on IPv4 addresses as well
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, 0))
        return sock.getsockname()[1]


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
    """Send raw bytes, half-close, return the raw answer."""
    with socket.create_connection((host, port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        return read_reply(sock)


def need(program: str) -> str:
    path = shutil.which(program) or (program if os.path.exists(program) else None)
    if path is None:
        raise RuntimeError(f"{program} is not installed: run .ci/run (it installs the test peers)")
    return path


def wait_for_port(port: int, host: str = "127.0.0.1", seconds: float = 10) -> None:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {host}:{port} after {seconds}s")


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, seconds: float = 10) -> None:
    """Stop a process we started, by its PID, and reap it."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(seconds)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(seconds)


class TcpServerSession:
    """Debian's ucspi-tcp tcpserver running `qmqpd session` on loopback."""

    def __init__(self, env: dict[str, str], log: Path, host: str = "127.0.0.1",
                 rules_cdb: str | None = None, limit: int = 40) -> None:
        self.host = host
        self.port = free_port(host)
        self.log = log
        argv = [need("tcpserver"), "-v", "-H", "-R", "-l", "qmqpd.test", "-c", str(limit)]
        if rules_cdb:
            argv += ["-x", rules_cdb]
        argv += [host, str(self.port), *command("qmqpd"), "session"]
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env}
        self._log_file = open(log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, env=full_env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
