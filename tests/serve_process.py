"""`qmqpd serve` as a real process: the one controller the tests and the benches start it with.

It owns the config file it writes (TOML from keyword settings, or the environment for a
server run without --config), the server's log file, the process it started and, by
pidfd, the workers a killed master left behind. It picks a free port and moves to another
when someone took the port before the first start, waits for the "event=listen" line (the
master logs it last in its start-up, after every start warning), stops by PID with a bound,
kills -9 and restarts on the same port. When the server exits during start-up or does not
listen in time it fails with ServeFailed: the exit code, the likely cause and the tail of
the log.

Called by the integration tests (test_master's Server is this class with that file's
defaults), a few unit tests (children) and bench/*.py (ServeFailed → their BenchError).
It never touches a process it did not start: workers are children of its master's PID
(/proc/<pid>/task/*/children), never found by name, and are signalled through a pidfd
after checking they are still that master's children, so a recycled PID is never hit. It
reads the server's log and /proc only, never the product's internals.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from qmqpd.config import SETTINGS
from qmqpd.queue import create_queue, list_messages
from tests.support import command, free_port, port_clash, toml_text

ROOT = Path(__file__).resolve().parents[1]
LISTENING = "event=listen"
TAIL_LINES = 25


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


def _held_children(parent: int) -> list[int]:
    """pidfds of parent's children, each checked to be its child after it was opened."""
    held = []
    for pid in children(parent):
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(pid)
            if parent_of(pid) == parent:
                held.append(pidfd)
            else:
                os.close(pidfd)
    return held


def _ended(pidfd: int, seconds: float) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0.0, seconds) * 1000))


# ---- why a start failed -----------------------------------------------------------------

_REFUSAL = re.compile(r'msg="cannot start".*?error="((?:[^"\\]|\\.)*)"')
_CLASH_NAME = re.compile(r"\b([A-Z_]+) \([a-z_]+\) from [^:]*: cannot listen on (\S+) port (\d+)")


def likely_cause(log: str, returncode: int | None, port: int | None = None) -> str:
    """The likely cause of a failed start, from what this start logged and its exit code
    (None: still running, it did not listen in time)."""
    if port_clash(log):
        clash = _CLASH_NAME.search(log)
        if clash:
            return (f"a port clash: {clash.group(1)}: {clash.group(2)} port {clash.group(3)} is "
                    "taken by another process (two runs on one port, or a server left over)")
        if "METRICS" in log:
            return "a port clash: the METRICS port is taken by another process"
        return f"a port clash: port {port} is taken by another process"
    refusal = _REFUSAL.search(log)
    if refusal:
        reason = refusal.group(1).replace('\\"', '"')
        if "started as root" in reason:
            return ("root refused: started as root without USER; set allow_root (the "
                    "benches do when run as root) or ALLOW_ROOT=1, or USER")
        return f"a refused setting: {reason}"
    if "No module named" in log:
        return ("the qmqpd command cannot import what it needs (the venv or PYTHONPATH "
                "of the command)")
    if "Traceback (most recent call last)" in log:
        last = [line for line in log.splitlines() if line and not line.startswith(" ")]
        return f"a crash during start-up: {last[-1] if last else 'see the traceback'}"
    if returncode is None:
        return ("no listen event in time: the server is still running but did not log "
                f"{LISTENING} (a very slow start on a loaded machine, or stuck before bind)")
    if returncode < 0:
        return f"killed by signal {-returncode} during start-up"
    if returncode in (126, 127):
        return "the command could not be run (not found or not executable)"
    return f"exit {returncode} without a refusal line in the log"


def failure_text(what: str, log: str, returncode: int | None, port: int | None,
                 log_path: Path | None, argv: Sequence[str]) -> str:
    """ServeFailed's message: what happened, the exit code, the likely cause, the command
    and the tail of what this start logged."""
    state = "still running" if returncode is None else f"exit code {returncode}"
    tail = "\n".join(log.splitlines()[-TAIL_LINES:]) or "(nothing logged)"
    where = f" of {log_path}" if log_path else ""
    return (f"qmqpd serve {what} ({state})\n"
            f"likely cause: {likely_cause(log, returncode, port)}\n"
            f"command: {' '.join(argv)}\n"
            f"log tail{where}:\n{tail}")


class ServeFailed(AssertionError):
    """`qmqpd serve` did not come up: the message has the exit code, the likely cause and
    the tail of its log (an AssertionError, so a test reports it as a failure)."""

    def __init__(self, text: str, clash: bool = False) -> None:
        super().__init__(text)
        self.clash = clash


# ---- the environment a server runs in ----------------------------------------------------

def serve_environ(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """base (default: this process's environment) without any qmqpd setting, so only the
    server's config decides; ALLOW_ROOT stays (tests/conftest.py sets it for the suite's
    servers, a bench run as root sets allow_root in the config instead); then extra."""
    source = os.environ if base is None else base
    env = {k: v for k, v in source.items() if k not in SETTINGS or k == "ALLOW_ROOT"}
    return {**env, **extra}


def _env_text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


class ServeProcess:
    """One `qmqpd serve`; start() may be called again after a stop or a kill -9.

    settings are keyword settings (names in any case); None leaves a setting out. Defaults:
    a free port (on LOCALIP's address, or dual-stack for ::), the queue (tmp/queue, made if
    missing) and a status file in tmp. qmqpd is the command that runs qmqpd (default: this
    checkout's), e.g. a wheel's venv script, a bench's --qmqpd, or a wrapper that execs it.
    With config_file=False the settings go into the environment and `serve` runs without
    --config. environ is the environment to start from (default this process's, with
    PYTHONPATH at this checkout when qmqpd is the default command); env adds to it.
    """

    def __init__(self, tmp: Path, queue: Path | None = None, *,
                 qmqpd: Sequence[str] | None = None, name: str = "qmqpd",
                 config_file: bool = True, environ: Mapping[str, str] | None = None,
                 env: Mapping[str, str] | None = None, new_session: bool = False,
                 **settings: object) -> None:
        self.tmp = tmp
        given = {key.lower(): value for key, value in settings.items()}
        localip = str(given.get("localip") or "127.0.0.1")
        self.host = "::" if localip == "::" else localip.split(",")[0].strip()
        self.port_given = "port" in given
        if "queuedir" in given:
            self.queue = Path(str(given["queuedir"])) if given["queuedir"] else None
        else:
            self.queue = queue or tmp / "queue"
            if not (self.queue / "todo").exists():
                create_queue(str(self.queue))
        base: dict[str, object] = {"queuedir": str(self.queue) if self.queue else None,
                                   "status_file": str(tmp / "status.json")}
        if not self.port_given:
            base["port"] = free_port(self.host)
        self.settings: dict[str, object] = {**base, **given}
        status_file = self.settings["status_file"]
        self.status_path = Path(str(status_file)) if status_file else None
        self.qmqpd = list(qmqpd) if qmqpd else command("qmqpd")
        self.config_path: Path | None = tmp / f"{name}.toml" if config_file else None
        self.log_path = tmp / f"{name}.log"
        if environ is None:
            environ = dict(os.environ)
            if qmqpd is None:  # this checkout's code, whatever the console script's venv
                environ["PYTHONPATH"] = str(ROOT)
        self.environ = {**serve_environ(environ), **(env or {})}
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.orphans: list[int] = []  # pidfds of workers a killed master left behind
        self.write_config()

    # -- configuration ----------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(str(self.settings.get("port", 0)))

    def write_config(self, settings: dict[str, object] | None = None) -> None:
        """Write the settings (replaced by settings when given) where the server reads
        them: the config file (read again on HUP), or the next start's environment."""
        if settings is not None:
            self.settings = settings
        if self.config_path is not None:
            present = {k: v for k, v in self.settings.items() if v is not None}
            self.config_path.write_text(toml_text(present))

    def argv(self) -> list[str]:
        config = ["--config", str(self.config_path)] if self.config_path else []
        return [*self.qmqpd, "serve", *config]

    def _environment(self) -> dict[str, str]:
        if self.config_path is not None:
            return dict(self.environ)
        return {**self.environ, **{k.upper(): _env_text(v) for k, v in self.settings.items()
                                   if v is not None}}

    # -- the log ----------------------------------------------------------------------------
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_size(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as handle:
            handle.seek(mark)
            return handle.read().decode(errors="replace")

    # -- starting ---------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self, argv: Sequence[str] | None = None) -> subprocess.Popen[bytes]:
        """Start the process (argv: another command line, e.g. a launcher) and return at
        once; start() is spawn and the wait for the listen event."""
        line = list(argv) if argv else self.argv()
        with open(self.log_path, "ab") as log:
            try:
                self.proc = subprocess.Popen(line, stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log, env=self._environment(),
                                             cwd=self.tmp, start_new_session=self.new_session)
            except OSError as error:
                raise ServeFailed(f"qmqpd serve could not be run: {error}\n"
                                  f"likely cause: the command could not be run "
                                  f"(not found or not executable)\n"
                                  f"command: {' '.join(line)}") from None
        return self.proc

    def start(self, argv: Sequence[str] | None = None, *, seconds: float = 30) -> ServeProcess:
        """Start and wait until it listens. Before the first start, a port someone took
        since it was chosen means a fresh port (when the test did not name one); after a
        kill, the same port is tried again until `seconds` are over (a killed master's
        orphaned workers may hold it until their sessions end). Anything else: ServeFailed."""
        stop = time.monotonic() + seconds
        moves = 0
        while True:
            mark = self.log_size()
            proc = self.spawn(argv)
            if self._listens(proc, mark, stop):
                self.starts += 1
                return self
            said = self.log_since(mark)
            ours = proc.poll() is not None and self._clash_on_our_port(said)
            if ours and self.starts == 0 and not self.port_given and moves < 10:
                moves += 1  # never served: another process took the port since
                self.settings["port"] = free_port(self.host)
                self.write_config()
                continue
            if ours and self.starts > 0 and time.monotonic() < stop:
                time.sleep(0.1)
                continue
            returncode = proc.poll()
            if returncode is None:  # it did not listen in time: it is ours to stop
                self.stop(seconds=10)
                said = self.log_since(mark)
            what = ("did not listen" if returncode is None
                    else "exited during start-up")
            raise ServeFailed(failure_text(what, said, returncode, self.port, self.log_path,
                                           argv or self.argv()), clash=port_clash(said))

    def _listens(self, proc: subprocess.Popen[bytes], mark: int, stop: float) -> bool:
        """True once this start logged the listen event; False when it exited first or
        the time is over."""
        while LISTENING not in self.log_since(mark):
            if proc.poll() is not None and LISTENING not in self.log_since(mark):
                return False
            if time.monotonic() > stop:
                return False
            time.sleep(0.05)
        return True

    def _clash_on_our_port(self, said: str) -> bool:
        if not port_clash(said):
            return False
        clash = _CLASH_NAME.search(said)
        return clash.group(1) == "PORT" if clash else "METRICS" not in said

    # -- the running server -----------------------------------------------------------------
    def workers(self) -> dict[int, str]:
        """pid -> process title of every child of the master."""
        return {pid: title(pid) for pid in children(self.pid)}

    def titled(self, word: str) -> dict[int, str]:
        return {pid: t for pid, t in self.workers().items() if word in t}

    def busy_workers(self) -> list[int]:
        """Workers whose title says they are in a session (not idle)."""
        return [pid for pid, t in self.workers().items() if is_busy_worker(t)]

    def wait_idle(self, count: int, seconds: float = 30) -> dict[int, str]:
        """At least count idle workers (the master forks them after it listens)."""
        stop = time.monotonic() + seconds
        while True:
            idle = self.titled("worker idle")
            if len(idle) >= count:
                return idle
            if time.monotonic() > stop or (self.proc is not None and self.proc.poll() is not None):
                raise AssertionError(f"{len(idle)} of {count} idle workers after {seconds}s; "
                                     f"log tail:\n{self.log()[-2000:]}")
            time.sleep(0.05)

    def queued(self) -> int:
        assert self.queue is not None
        return sum(1 for _ in list_messages(str(self.queue)))

    def status(self) -> dict[str, object]:
        assert self.status_path is not None
        return json.loads(self.status_path.read_text())

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, seconds: float = 15) -> int:
        assert self.proc is not None
        return self.proc.wait(seconds)

    # -- ending -----------------------------------------------------------------------------
    def kill_master(self) -> int:
        """kill -9 the master; returns how many workers it left behind (orphans). They
        are held by pidfd so that cleanup can reach them and nothing else."""
        assert self.proc is not None
        held = _held_children(self.pid)
        self.orphans += held
        self.proc.kill()
        self.proc.wait(10)
        return len(held)

    def reap_orphans(self, seconds: float) -> int:
        """Wait for the orphaned workers to end (they finish their session and exit);
        SIGKILL those still there after `seconds`. Returns how many needed the kill."""
        stop = time.monotonic() + seconds
        forced = 0
        for pidfd in self.orphans:
            if not _ended(pidfd, stop - time.monotonic()):
                with contextlib.suppress(OSError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    forced += 1
            os.close(pidfd)
        self.orphans.clear()
        return forced

    def stop(self, seconds: float = 30) -> int | None:
        """TERM, wait up to seconds, then KILL; reaped either way. Workers of this master
        still there after it ended are killed too. The exit status (None if it was not
        running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        held = _held_children(self.pid)
        try:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            for pidfd in held:  # stragglers only: a clean exit leaves none
                if not _ended(pidfd, 0):
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            for pidfd in held:
                os.close(pidfd)
        return self.proc.returncode
