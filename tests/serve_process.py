"""`qmqpd serve` as a real process that a test may kill -9 and restart on the same port.

Workers are found as children of the master's PID (/proc/<pid>/task/*/children), never
by name, and are signalled through a pidfd after checking they are still that master's
children, so a recycled PID can never be hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support import command, free_port, port_clash, stop_process, toml_text, wait_until

# Settings a developer's environment might hold: the test's config file must decide.
_SETTING_ENV = ("LOCALIP", "PORT", "MAXPERIP", "MAXDAEMONS", "PREFORK", "RULES", "SOFT_MEM",
                "QUEUEDIR", "USE_FSYNC", "USE_SYNCDIR", "TIMEOUT", "SESSION_TIMEOUT",
                "DATABYTES", "MAX_REQUESTS", "STATUS_FILE", "QMAILQUEUE")


def children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_busy_worker(process_title: str) -> bool:
    # "qmqpd: worker idle" or "qmqpd: worker <client ip> <what it does>"
    return process_title.startswith("qmqpd: worker ") and not process_title.endswith(" idle")


def kill_child(parent: int, pid: int, sig: int = signal.SIGKILL,
               still: Callable[[int], bool] = lambda _pid: True) -> bool:
    """Signal pid only if it is (still) a child of parent and `still(pid)` holds."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        # Checked after the pidfd is open: if pid was recycled since, the pidfd is stale
        # and the signal below fails instead of reaching another process.
        if parent_of(pid) != parent or not still(pid):
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


class ServeProcess:
    """One `qmqpd serve --config FILE`; start() may be called again after a kill."""

    def __init__(self, tmp: Path, queue: Path, **settings: object) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.queue = queue
        self.config_path = tmp / "qmqpd.toml"
        self.log_path = tmp / "qmqpd.log"
        self.status_path = tmp / "status.json"
        values: dict[str, object] = {"port": self.port, "queuedir": str(queue),
                                     "status_file": str(self.status_path)}
        values.update(settings)
        self.values = values
        self.settings_given = set(settings)
        self.config_path.write_text(toml_text(values))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.orphans: list[int] = []  # pidfds of workers a killed master left behind

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, seconds: float = 30) -> ServeProcess:
        """Start and wait until it listens; retried while the port is still held (a
        killed master's orphaned workers may hold it until their sessions end)."""
        env = {k: v for k, v in os.environ.items() if k not in _SETTING_ENV}
        stop = time.monotonic() + seconds
        while True:
            mark = len(self.log())
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [*command("qmqpd"), "serve", "--config", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=self.tmp)
            self._wait_listening(self.proc, mark, seconds)
            if self.proc.poll() is None:
                self.starts += 1
                return self
            if time.monotonic() > stop or not port_clash(self.log()[mark:]):
                raise AssertionError(f"qmqpd serve did not start:\n{self.log()[mark:]}")
            if self.starts == 0 and "port" not in self.settings_given:
                # never served: another process took the port since free_port chose it
                self.port = self.values["port"] = free_port()
                self.config_path.write_text(toml_text(self.values))
            time.sleep(0.1)

    def _wait_listening(self, proc: subprocess.Popen[bytes], mark: int, seconds: float) -> None:
        wait_until(lambda: "event=listen" in self.log()[mark:] or proc.poll() is not None,
                   seconds, "qmqpd serve to listen")

    def workers(self) -> list[int]:
        return children(self.pid)

    def busy_workers(self) -> list[int]:
        """Workers whose title says they are in a session (not idle)."""
        return [pid for pid in self.workers() if is_busy_worker(title(pid))]

    def kill_master(self) -> int:
        """kill -9 the master; returns how many workers it left behind (orphans). They
        are held by pidfd so that cleanup can reach them and nothing else."""
        assert self.proc is not None
        before = len(self.orphans)
        for pid in self.workers():
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
                if parent_of(pid) == self.pid:
                    self.orphans.append(pidfd)
                else:
                    os.close(pidfd)
        self.proc.kill()
        self.proc.wait(10)
        return len(self.orphans) - before

    def reap_orphans(self, seconds: float) -> int:
        """Wait for the orphaned workers to end (they finish their session and exit);
        SIGKILL those still there after `seconds`. Returns how many needed the kill."""
        stop = time.monotonic() + seconds
        forced = 0
        for pidfd in self.orphans:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(max(0.0, stop - time.monotonic()) * 1000):
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    forced += 1
            os.close(pidfd)
        self.orphans.clear()
        return forced

    def stop(self) -> int | None:
        """TERM and reap; returns the exit status (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        stop_process(self.proc, seconds=30)
        return self.proc.returncode

    def status(self) -> dict[str, object]:
        return json.loads(self.status_path.read_text())
