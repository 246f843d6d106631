"""A private clamd for tests and benchmarks: own directory, unix socket and TCP port, and a
signature database written at run time (one EICAR body signature). No freshclam, no network.

The EICAR test string is assembled from pieces here so that the repository itself never
holds it and scanners on developer machines leave the checkout alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support import PortTaken, free_port, port_clash

SIGNATURE = "Eicar-Test-Signature"
STREAM_MAX_LENGTH = 2 << 20  # small on purpose: the size-limit tests cross it


def eicar() -> bytes:
    """The 68-byte EICAR anti-virus test file, built from parts."""
    parts = (r"X5O!P%@AP[4\PZX54(P^)7CC)7}$", "EICAR-STANDARD-", "ANTIVIRUS-TEST-", "FILE!$H+H*")
    return "".join(parts).encode()


class Clamd:
    """`clamd -c DIR/clamd.conf` as a child process, started and stopped by PID."""

    def __init__(self, base: Path, stream_max_length: int = STREAM_MAX_LENGTH,
                 temporary_directory: Path | None = None) -> None:
        self.base = base
        self.socket_path = base / "clamd.sock"
        self.port = free_port()
        self.log_path = base / "clamd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        binary = shutil.which("clamd") or "/usr/sbin/clamd"
        if not os.path.exists(binary):
            raise RuntimeError("clamd is not installed: apt-get install clamav-daemon "
                               "(run .ci/run, it installs the test peers)")
        self.binary = binary
        self.stream_max_length = stream_max_length
        self.temporary_directory = temporary_directory or base
        self._write_files(stream_max_length, self.temporary_directory)

    def _write_files(self, stream_max_length: int, temporary_directory: Path) -> None:
        db = self.base / "db"
        db.mkdir(parents=True, exist_ok=True)
        (db / "local-eicar.ndb").write_text(f"{SIGNATURE}:0:*:{eicar().hex()}\n")
        self.conf = self.base / "clamd.conf"
        self.conf.write_text(
            "Foreground yes\n"
            f"LocalSocket {self.socket_path}\n"
            "LocalSocketMode 600\n"
            "FixStaleSocket yes\n"
            f"TCPSocket {self.port}\n"
            "TCPAddr 127.0.0.1\n"
            f"DatabaseDirectory {db}\n"
            # clamd writes every INSTREAM to a file here before scanning it.
            f"TemporaryDirectory {temporary_directory}\n"
            f"LogFile {self.log_path}\n"
            f"StreamMaxLength {stream_max_length}\n"
            # Larger than the stream limit so no object is passed unscanned as "OK".
            f"MaxFileSize {stream_max_length * 2}\n"
            f"MaxScanSize {stream_max_length * 4}\n"
        )

    @property
    def tcp(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, seconds: float = 30) -> Clamd:
        """Start clamd and wait for PING; a TCP port another process took since free_port
        chose it means a fresh port (the conf is rewritten), not a failure."""
        for _attempt in range(10):
            try:
                return self._start(seconds)
            except PortTaken:
                self.port = free_port()
                self._write_files(self.stream_max_length, self.temporary_directory)
        raise AssertionError(f"clamd lost its port 10 times in a row: {self.log()[-2000:]}")

    def _start(self, seconds: float) -> Clamd:
        mark = len(self.log())
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            said = self.log()[mark:]
            if port_clash(said):  # clamd goes on without its TCP socket: not ours to use
                self.stop()
                raise PortTaken(said)
            if self.proc.poll() is not None:
                raise RuntimeError(f"clamd exited with {self.proc.returncode}: {self.log()}")
            if self.ping():
                return self
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"clamd did not answer PING within {seconds}s: {self.log()}")

    def ping(self) -> bool:
        """PING on both the unix socket and the TCP port."""
        try:
            for family, address in ((socket.AF_UNIX, str(self.socket_path)),
                                    (socket.AF_INET, ("127.0.0.1", self.port))):
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.settimeout(2)
                    sock.connect(address)
                    sock.sendall(b"zPING\0")
                    if not sock.recv(16).startswith(b"PONG"):
                        return False
        except OSError:
            return False
        return True

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def pause(self) -> None:
        """SIGSTOP: clamd still accepts (the kernel backlog) but never answers: a hung clamd."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
