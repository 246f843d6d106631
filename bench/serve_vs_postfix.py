#!/usr/bin/env python3
"""Benchmark `qmqpd serve` against Postfix's qmqpd, with Postfix's qmqp-source as the one client.

For every session count it drives the same N messages into qmqp-sink (the ceiling of
client + loopback), into `qmqpd serve` and into a private Postfix instance whose mail is
all discarded, and prints msgs/s, p50/p99 latency, CPU per message (the server's and the
whole machine's) and the qmqpd/Postfix ratio; then, in a short extra run under
`strace -f -c`, the sync system calls each server makes per message.

qmqpd runs with its limits on: the default MAXPERIP, and a tcprules rule that gives
127.0.0.1 (where qmqp-source and the probe connect from) the sessions the run needs.
The figures mean little on a busy machine: it refuses to start when the 1-minute load
average is above --max-load (1.0) unless --force is given, and prints the load with them.

Throughput: N divided by the wall time of one qmqp-source run (its `-c` counter drives the
progress bar). Latency: qmqp-source does not report it, so a small probe sends one message
at a time over its own connection during the run and times connect → answer.

Everything runs on 127.0.0.1 in a temporary directory and is stopped again (by PID and
`postfix -c DIR stop`), also on Ctrl-C or error. Must run as root: Postfix needs it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHECKOUT = str(Path(__file__).resolve().parents[1])
if CHECKOUT not in sys.path:
    sys.path.append(CHECKOUT)  # tests.serve_process: the controller the tests start qmqpd with

from tests.serve_process import ServeFailed, ServeProcess  # noqa: E402

QMQP_SOURCE = "/usr/sbin/qmqp-source"
QMQP_SINK = "/usr/sbin/qmqp-sink"
POSTFIX = "/usr/sbin/postfix"
POSTFIX_DAEMONS = "/usr/lib/postfix/sbin"
SENDER = "bench@example.com"
RECIPIENT = "sink@example.net"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0
DRAIN_TIMEOUT = 300.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Postfix: loopback only, a QMQP listener, every transport discards, no lookups that
# could leave the machine. chroot is off so the instance needs no copied files.
POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
command_directory = /usr/sbin
daemon_directory = {daemons}
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = bench.localdomain
mydomain = localdomain
mydestination =
local_recipient_maps =
relay_domains =
relayhost =
default_transport = discard
local_transport = discard
relay_transport = discard
virtual_transport = discard
qmqpd_authorized_clients = 127.0.0.0/8
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
smtputf8_enable = no
disable_dns_lookups = yes
smtp_dns_support_level = disabled
maillog_file_prefixes = {root}
maillog_file = {maillog}
"""

POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - qmqpd{qmqpd_options}
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
proxywrite unix - - n - 1 proxymap
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
showq unix n - n - - showq
postlog unix-dgram n - n - 1 postlogd
"""



SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "msync")


def qmqpd_config(port: int, queue: Path, maxdaemons: int, prefork: int, rules: Path,
                 extra: list[str]) -> str:
    """The TOML for `qmqpd serve`; `key = value` lines in extra replace or add settings.

    MAXPERIP keeps its default: the rules cdb raises it for the load generator only.
    """
    settings = {
        "localip": '"127.0.0.1"', "port": str(port), "queuedir": f'"{queue}"',
        "use_fsync": "true", "use_syncdir": "true", "maxdaemons": str(maxdaemons),
        "prefork": str(prefork), "rules": f'"{rules}"',
        # the bench runs as root (Postfix needs it); qmqpd runs as root only when told
        "allow_root": "true" if os.geteuid() == 0 else "false",
    }
    for line in extra:
        key, equals, value = line.partition("=")
        if not equals:
            raise BenchError(f"--qmqpd-setting wants key = value, not {line!r}")
        key, value = key.strip().lower(), value.strip()
        if key == "maxperip" and value == "0":
            raise BenchError("maxperip = 0 turns the per-IP limit off; the bench measures "
                             "with limits on (its rule gives 127.0.0.1 what the run needs)")
        settings[key] = value
    return "".join(f"{key} = {value}\n" for key, value in settings.items())


def load_generator_rules(max_sessions: int) -> str:
    """tcprules text: 127.0.0.1 may hold every session of the run, the latency probe and
    a few connections the client has closed but the master has not yet counted out."""
    needed = max_sessions + 1 + max(4, max_sessions // 4)
    return f'127.0.0.1:allow,MAXPERIP="{needed}"\n:deny\n'


def load_refusal(load: float, limit: float, force: bool) -> str | None:
    """Why the bench will not start (None: it may)."""
    if force or load <= limit:
        return None
    return (f"1-minute load average {load:.2f} is above {limit:.2f}: the figures would "
            "measure the other work; wait for a quiet machine or pass --force")


def parse_strace_counts(text: str) -> dict[str, int]:
    """`strace -c` table → calls per system call name."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            counts[fields[-1]] = int(fields[3])
    return counts


def busy_seconds(stat_line: str) -> float:
    """CPU seconds the whole machine spent not idle, from /proc/stat's `cpu` line."""
    values = [int(value) for value in stat_line.split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    return (sum(values[:8]) - values[3] - values[4]) / CLK_TCK


def device_flushes(path: Path) -> int | None:
    """Flush requests completed by the device holding path (field 16 of its block stat,
    Linux 5.5 and later); None where there is no such count."""
    name = os.path.basename(mount_of(path)[0])
    try:
        return int(Path(f"/sys/class/block/{name}/stat").read_text().split()[15])
    except (OSError, IndexError, ValueError):
        return None


def machine_busy_seconds() -> float:
    with open("/proc/stat") as handle:
        return busy_seconds(handle.readline())


def mount_of(path: Path) -> tuple[str, str, str]:
    """(device, filesystem type, options) of the mount holding path, from /proc/mounts."""
    best = ("", "", "unknown", "")
    target = str(path.resolve())
    with open("/proc/mounts") as handle:
        for line in handle:
            device, mount, kind, options, *_ = line.split()
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[1]):
                best = (device, mount, kind, options)
    return best[0], best[2], best[3]


def describe_filesystem(path: Path) -> str:
    """`ext4 on /dev/vda (options), no journal`: ext4 without a journal syncs each file and
    directory with its own cache flush, so the journal matters to every sync figure."""
    device, kind, options = mount_of(path)
    text = f"{kind} on {device} ({options})"
    with contextlib.suppress(OSError):
        task = Path(f"/sys/fs/ext4/{os.path.basename(device)}/journal_task").read_text()
        text += ", no journal" if task.strip() == "<none>" else ", journal"
    return text


class BenchError(Exception):
    """Something in the set-up failed; the message says what."""


# -- small pure helpers -------------------------------------------------------------------
def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def qmqp_request(body: bytes, sender: bytes, recipients: list[bytes]) -> bytes:
    """One QMQP request: a netstring of the message, sender and recipient netstrings."""
    return netstring(netstring(body) + netstring(sender) + b"".join(map(netstring, recipients)))


def message_of_length(length: int) -> bytes:
    """A plain message of exactly `length` bytes (headers included), like qmqp-source -l."""
    head = f"From: <{SENDER}>\nTo: <{RECIPIENT}>\nSubject: latency probe\n\n".encode()
    body_length = max(0, length - len(head))
    line = b"x" * 71 + b"\n"
    body = (line * (body_length // len(line) + 1))[:body_length]
    return head + body


def parse_counter(buffer: str) -> tuple[int | None, str]:
    """qmqp-source -c writes `1\\r2\\r...`: return the last complete count and the rest."""
    *complete, rest = buffer.split("\r")
    numbers = [int(item) for item in complete if item.strip().isdigit()]
    return (numbers[-1] if numbers else None), rest


def percentile(samples: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile (rank = ceil(fraction * n)); None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), math.ceil(fraction * len(ordered) - 1e-9)))
    return ordered[rank - 1]


def parse_sessions(text: str) -> list[int]:
    counts = [int(item) for item in text.split(",") if item.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("session counts are integers >= 1, comma separated")
    return counts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, alive: Callable[[], bool], timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise BenchError(f"server for port {port} exited during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


# -- /proc readings -----------------------------------------------------------------------
def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(item) for item in handle.read().split())
    return found


def process_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def tree_cpu_seconds(pid: int) -> float:
    """user+system CPU of a process, its reaped children and its live descendants."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the comm field: state is fields[0], utime..cstime are fields[11..14]
    ticks = sum(int(value) for value in fields[11:15])
    return ticks / CLK_TCK + sum(tree_cpu_seconds(child) for child in children_of(pid))


def memory_kib(pid: int) -> dict[str, int]:
    """Pss, Rss and private pages of one process from smaps_rollup, in KiB."""
    wanted = {"Rss", "Pss", "Private_Clean", "Private_Dirty"}
    values: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0])
    return values


# -- servers under test -------------------------------------------------------------------
class Target:
    """A QMQP server on 127.0.0.1:port that can be started, measured and stopped."""

    name = ""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def main_pid(self) -> int | None:
        return None

    def accepted(self) -> int | None:
        """Messages the server has acknowledged so far, counted on the server side."""
        return None

    def settle(self) -> None:
        """Wait until work queued by the last run (e.g. Postfix delivery) is done."""

    def cpu_seconds(self) -> float | None:
        pid = self.main_pid()
        return tree_cpu_seconds(pid) if pid else None


def _stop_process(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """TERM the process we started, then KILL its process group if it does not exit."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


class SinkTarget(Target):
    name = "qmqp-sink"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [QMQP_SINK, f"127.0.0.1:{self.port}", "1024"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for_port(self.port, lambda: self.process is not None and self.process.poll() is None)

    def stop(self) -> None:
        if self.process is not None:
            _stop_process(self.process)

    def main_pid(self) -> int | None:
        return self.process.pid if self.process else None


class QmqpdTarget(Target):
    name = "qmqpd"

    def __init__(self, root: Path, command: list[str], maxdaemons: int, prefork: int,
                 max_sessions: int, extra: list[str]) -> None:
        super().__init__(root)
        self.command = command
        self.dir = root / "qmqpd"
        self.max_sessions = max_sessions
        self.maxdaemons = maxdaemons
        self.prefork = prefork
        self.extra = extra
        self.server: ServeProcess | None = None

    @property
    def queue(self) -> Path:
        return self.dir / "queue"

    def start(self) -> None:
        """`qmqpd serve` through the tests' controller (tests/serve_process.py), on a port
        it picks; BenchError with its hint (exit code, likely cause, log tail) if it does
        not listen."""
        self.dir.mkdir()
        # cwd: a `python -m qmqpd` command must not pick up a qmqpd/ from where we started
        subprocess.run([*self.command, "queue", "create", str(self.queue)], check=True,
                       stdout=subprocess.DEVNULL, cwd=self.dir)
        rules_text, rules = self.dir / "tcp.qmqp", self.dir / "tcp.qmqp.cdb"
        rules_text.write_text(load_generator_rules(self.max_sessions))
        subprocess.run([*self.command, "rules", "compile", str(rules_text), str(rules)],
                       check=True, stdout=subprocess.DEVNULL, cwd=self.dir)
        settings = tomllib.loads(qmqpd_config(self.port, self.queue, self.maxdaemons,
                                              self.prefork, rules, self.extra))
        del settings["port"]  # the controller's: a free one, another if it is taken
        self.server = ServeProcess(self.dir, qmqpd=self.command, new_session=True, **settings)
        try:
            self.server.start(seconds=START_TIMEOUT)
        except ServeFailed as failed:
            raise BenchError(str(failed)) from None
        self.port = self.server.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(STOP_TIMEOUT)

    def main_pid(self) -> int | None:
        running = self.server is not None and self.server.proc is not None
        return self.server.pid if running and self.server.proc.poll() is None else None

    def accepted(self) -> int:
        return self.server.log().count(' answer="K') if self.server else 0

    def settle(self) -> None:
        """Empty the queue between runs (untimed), standing in for qmail-send, so every
        run starts from the same near-empty queue as Postfix's drained one."""
        for top in ("mess", "intd", "todo"):
            for directory, _, files in os.walk(self.queue / top):
                for name in files:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))

    def idle_workers(self, at_least: int = 0, timeout: float = 10.0) -> list[int]:
        """Idle workers; waits (bounded) for `at_least` of them, as the master forks its
        prefork workers after it starts listening."""
        deadline = time.monotonic() + timeout
        while True:
            idle = list(self.server.titled("worker idle")) if self.main_pid() else []
            if len(idle) >= at_least or time.monotonic() >= deadline:
                return idle
            time.sleep(0.1)


class PostfixTarget(Target):
    name = "postfix"
    # Lines a subclass adds to main.cf / master.cf (e.g. a milter and the services it needs).
    main_cf_extra = ""
    master_cf_extra = ""

    def __init__(self, root: Path, qmqpd_options: str = "") -> None:
        """qmqpd_options: master.cf arguments of the QMQP service, e.g. `-o max_use=1`."""
        super().__init__(root)
        self.qmqpd_options = qmqpd_options
        self.dir = root / "postfix"
        self.conf = self.dir / "conf"
        self.queue = self.dir / "queue"
        self.data = self.dir / "data"
        self.maillog = self.dir / "maillog"
        self.started = False
        self.master_pid: int | None = None

    def _postfix(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.conf), action], capture_output=True,
                              text=True, timeout=STOP_TIMEOUT, check=False)

    def start(self) -> None:
        for path in (self.conf, self.queue, self.data):
            path.mkdir(parents=True)
        shutil.chown(self.data, user="postfix")
        (self.conf / "main.cf").write_text(POSTFIX_MAIN_CF.format(
            queue=self.queue, data=self.data, daemons=POSTFIX_DAEMONS, root=self.root,
            maillog=self.maillog) + self.main_cf_extra)
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(
            port=self.port, qmqpd_options=f" {self.qmqpd_options}" if self.qmqpd_options
            else "") + self.master_cf_extra)
        self.started = True
        result = self._postfix("start")
        if result.returncode != 0:
            raise BenchError(f"postfix start failed: {result.stderr.strip()} "
                             f"{self._log_tail()}")
        wait_for_port(self.port, lambda: True)
        self.master_pid = self._read_master_pid()

    def _read_master_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        return None

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return " | ".join(self.maillog.read_text().splitlines()[-3:])
        return ""

    def stop(self) -> None:
        if not self.started:
            return
        self._postfix("stop")
        pid = self.master_pid or self._read_master_pid()
        deadline = time.monotonic() + STOP_TIMEOUT
        while pid and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid and Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.started = False

    def main_pid(self) -> int | None:
        return self.master_pid

    def accepted(self) -> int:
        try:
            text = self.maillog.read_text(errors="replace")
        except OSError:
            return 0
        return len(re.findall(r"postfix/qmqpd\[\d+\]: \w+: client=", text))

    def delivered(self) -> int:
        try:
            return self.maillog.read_text(errors="replace").count("status=sent")
        except OSError:
            return 0

    def queued_files(self) -> int:
        return sum(len(files) for top in ("incoming", "active", "deferred", "maildrop")
                   for _, _, files in os.walk(self.queue / top))

    def settle(self) -> None:
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while self.queued_files() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.queued_files():
            raise BenchError(f"postfix queue did not drain in {DRAIN_TIMEOUT:.0f}s")

    def qmqpd_processes(self) -> list[int]:
        if not self.master_pid:
            return []
        return [child for child in children_of(self.master_pid)
                if process_title(child).startswith("qmqpd")]


# -- the client side ----------------------------------------------------------------------
class Progress:
    """A one-line progress bar on stderr (a line per 10% when stderr is not a terminal)."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1

    def update(self, done: int) -> None:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        fraction = min(done / self.total, 1.0) if self.total else 1.0
        text = (f"{self.label:<22} {done:>7}/{self.total} {done / elapsed:8.0f} msg/s")
        if self.tty:
            bar = "#" * int(fraction * 30)
            sys.stderr.write(f"\r{text} [{bar:<30}]")
            sys.stderr.flush()
        elif int(fraction * 10) > self.last_tenth:
            self.last_tenth = int(fraction * 10)
            sys.stderr.write(f"{text}\n")

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


class LatencyProbe(threading.Thread):
    """One message at a time on its own connection; times connect → answer."""

    def __init__(self, port: int, length: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.request = qmqp_request(message_of_length(length), SENDER.encode(),
                                    [RECIPIENT.encode()])
        self.pause = pause
        self.halt = threading.Event()
        self.samples: list[float] = []
        self.failures: collections.Counter[str] = collections.Counter()

    def one(self) -> None:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", self.port), timeout=60) as conn:
            conn.sendall(self.request)
            answer = b""
            while not answer.endswith(b","):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        elapsed = time.monotonic() - started
        status = answer.partition(b":")[2][:1]
        if status == b"K":
            self.samples.append(elapsed)
        else:
            self.failures[answer.decode(errors="replace")[:60] or "no answer"] += 1

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.one()
            except OSError as error:
                self.failures[type(error).__name__] += 1
            self.halt.wait(self.pause)

    def stop(self) -> None:
        self.halt.set()
        self.join(70)


@dataclass
class RunResult:
    target: str
    sessions: int
    messages: int
    seconds: float
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    probes: int
    probe_failures: dict[str, int]
    accepted: int | None
    server_cpu: float | None
    client_cpu: float
    machine_cpu: float
    client_errors: list[str] = field(default_factory=list)
    samples: list[float] = field(default_factory=list, repr=False)
    # cache flushes the queue's device completed during the run (every writer's, not only
    # the server's: a figure only on a device the run has to itself, e.g. a loop image)
    flushes: int | None = None


def run_qmqp_source(port: int, messages: int, sessions: int, length: int,
                    progress: Progress | None) -> tuple[float, float, list[str]]:
    """Run qmqp-source once; returns wall seconds, its CPU seconds and its stderr lines."""
    command = [QMQP_SOURCE, "-c", "-m", str(messages), "-s", str(sessions), "-l", str(length),
               "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert process.stdout is not None and process.stderr is not None
        pending = ""
        while chunk := os.read(process.stdout.fileno(), 4096):
            count, pending = parse_counter(pending + chunk.decode())
            if count is not None and progress is not None:
                progress.update(count)
        errors = process.stderr.read().decode(errors="replace").splitlines()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
    seconds = time.monotonic() - started
    if process.returncode != 0:
        errors.append(f"qmqp-source exit {process.returncode}")
    return seconds, usage.ru_utime + usage.ru_stime, errors


def stable_count(read: Callable[[], int | None], quiet: float = 0.5) -> int | None:
    """Read a server-side count once it stopped changing (logs are written asynchronously)."""
    value = read()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(quiet)
        again = read()
        if again == value:
            break
        value = again
    return value


def measure(target: Target, messages: int, sessions: int, length: int, warmup: int,
            probe_pause: float, profile: Callable[[], contextlib.AbstractContextManager[None]]
            | None = None) -> RunResult:
    if warmup:
        _, _, errors = run_qmqp_source(target.port, warmup, sessions, length, None)
        if errors:
            raise BenchError(f"{target.name} warm-up failed: {errors[:3]}")
    target.settle()
    accepted_before = stable_count(target.accepted)  # qmqpd logs after it answers
    cpu_before = target.cpu_seconds()
    machine_before = machine_busy_seconds()
    flushes_before = device_flushes(target.root)
    progress = Progress(f"{target.name} s={sessions}", messages)
    probe = LatencyProbe(target.port, length, probe_pause)
    with profile() if profile else contextlib.nullcontext():
        probe.start()
        try:
            seconds, client_cpu, errors = run_qmqp_source(target.port, messages, sessions,
                                                          length, progress)
        finally:
            probe.stop()
            progress.finish()
    cpu_after = target.cpu_seconds()
    machine_cpu = machine_busy_seconds() - machine_before
    flushes_after = device_flushes(target.root)
    target.settle()
    accepted_after = stable_count(target.accepted)
    accepted = None
    if accepted_before is not None and accepted_after is not None:
        accepted = accepted_after - accepted_before - len(probe.samples)
    samples = probe.samples
    p50, p99 = percentile(samples, 0.50), percentile(samples, 0.99)
    return RunResult(
        target=target.name, sessions=sessions, messages=messages, seconds=seconds,
        rate=messages / seconds, p50_ms=p50 * 1000 if p50 is not None else None,
        p99_ms=p99 * 1000 if p99 is not None else None, probes=len(samples),
        probe_failures=dict(probe.failures), accepted=accepted,
        server_cpu=(cpu_after - cpu_before) if cpu_before is not None and cpu_after is not None
        else None,
        client_cpu=client_cpu, machine_cpu=machine_cpu, client_errors=errors[:5],
        samples=samples,
        flushes=(flushes_after - flushes_before if flushes_before is not None
                 and flushes_after is not None else None))


# -- sync system calls per message ----------------------------------------------------------
def tree_pids(pid: int) -> list[int]:
    pids = [pid]
    for child in children_of(pid):
        pids += tree_pids(child)
    return pids


def _traced_by(pid: int) -> int:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def strace_counts(pids: list[int], output: Path) -> Iterator[None]:
    """`strace -f -c` of the sync calls of running processes (and the children they fork)
    for the duration of the block; the summary table goes to output."""
    binary = shutil.which("strace")
    if binary is None:
        raise BenchError("strace not found (Debian package strace); or --sync-messages 0")
    process = subprocess.Popen(
        [binary, "-f", "-qq", "-c", "-o", str(output), "-e", "trace=" + ",".join(SYNC_CALLS),
         *(f"-p{pid}" for pid in pids)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while any(_traced_by(pid) != process.pid for pid in pids if Path(f"/proc/{pid}").exists()):
            if process.poll() is not None or time.monotonic() > deadline:
                error = process.stderr.read().decode(errors="replace") if process.stderr else ""
                raise BenchError(f"strace could not attach to {pids}: {error.strip()}")
            time.sleep(0.05)
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)  # detach and write the summary
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def syncs_per_message(target: Target, messages: int, length: int) -> dict[str, float]:
    """One extra run of `messages` at one session with strace counting the server's
    sync calls (its rate under strace is no figure)."""
    pid = target.main_pid()
    if pid is None:
        raise BenchError(f"{target.name} is not running; cannot count its syncs")
    output = target.root / f"strace-{target.name}.txt"
    with strace_counts(tree_pids(pid), output):
        _, _, errors = run_qmqp_source(target.port, messages, 1, length, None)
        target.settle()
    if errors:
        raise BenchError(f"{target.name} run under strace failed: {errors[:3]}")
    counts = parse_strace_counts(output.read_text())
    return {name: counts.get(name, 0) / messages for name in SYNC_CALLS
            if counts.get(name) or name in ("fsync", "fdatasync")}


# -- profile of qmqpd under load ----------------------------------------------------------
@contextlib.contextmanager
def py_spy(pid: int, output: Path, rate: int) -> Iterator[None]:
    """py-spy record of the master and all its workers for the duration of the block."""
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.access(binary, os.X_OK):
        raise BenchError("py-spy not found (pip install py-spy)")
    process = subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--subprocesses", "--idle", "--nonblocking",
         "--rate", str(rate), "--format", "raw", "--output", str(output)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # let py-spy attach before the load starts
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^():]+)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """`serve_connection (qmqpd/handler.py:120)` → `qmqpd/handler.py:serve_connection`."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    parts = Path(path).parts
    for anchor in ("qmqpd", "filters"):
        if anchor in parts:
            path = "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
            break
    else:
        path = Path(path).name
    return f"{path}:{match['func']}"


SESSION_FRAME = "qmqpd/handler.py:serve_connection"


def _top(counter: collections.Counter[str], total: int, top: int) -> list[tuple[str, float]]:
    return [(name, 100.0 * value / total) for name, value in counter.most_common(top)]


def summarise_profile(raw: str, top: int = 15) -> dict[str, object]:
    """Self and inclusive sample shares per process kind from py-spy's raw output.

    With --subprocesses a worker's stack starts with the master's `process` frame and then
    its own, so the number of leading `process` frames tells master from worker. Worker
    shares are of busy samples (inside a session); idle waiting is counted apart.
    """
    own = {"master": collections.Counter[str](), "worker": collections.Counter[str]()}
    inclusive = {"master": collections.Counter[str](), "worker": collections.Counter[str]()}
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        frames = stack_text.split(";")
        processes = sum(1 for frame in frames if frame.startswith("process "))
        names = [frame_name(frame) for frame in frames if not frame.startswith("process ")]
        if not names:
            continue
        kind = "master"
        if processes > 1:  # a worker: busy while inside a session, else waiting for one
            kind = "worker" if SESSION_FRAME in names else "worker_idle"
        count = int(count_text)
        totals[kind] += count
        if kind == "worker_idle":
            continue
        own[kind][names[-1]] += count
        # inclusive: only frames inside the session (or below the master's loop), which
        # leaves out the start-up frames every sample shares
        inner = names[names.index(SESSION_FRAME) + 1:] if kind == "worker" else names
        for name in set(inner):
            inclusive[kind][name] += count
    return {
        "samples": dict(totals),
        **{f"{kind}_self": _top(own[kind], totals[kind] or 1, top) for kind in own},
        **{f"{kind}_inclusive": _top(inclusive[kind], totals[kind] or 1, top)
           for kind in inclusive},
    }


# -- the run ------------------------------------------------------------------------------
def missing_for_postfix(_args: argparse.Namespace) -> str | None:
    """Why this bench cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return ("must run as root (Postfix's master needs it); "
                "try: sudo .venv/bin/python bench/serve_vs_postfix.py")
    for tool in (QMQP_SOURCE, QMQP_SINK, POSTFIX):
        if not os.access(tool, os.X_OK):
            return f"{tool} not found (Debian package postfix)"
    return None


def version_of(command: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
        return (result.stdout or result.stderr).strip().splitlines()[0]
    return "unknown"


def machine_facts(qmqpd_cmd: list[str], root: Path) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as handle:
        memory_kb = int(handle.readline().split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "model name": cpu,
        "memory": f"{memory_kb // 1024} MiB",
        "kernel": platform.release(),
        "queue filesystem": describe_filesystem(root),
        "load before": load_text(),
        "python": platform.python_version(),
        "postfix": version_of(["postconf", "-d", "-h", "mail_version"]),
        "qmqpd": " ".join(qmqpd_cmd),
    }


def load_text() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def memory_report(qmqpd: QmqpdTarget, postfix: PostfixTarget | None) -> dict[str, object]:
    workers = {pid: memory_kib(pid) for pid in qmqpd.idle_workers(at_least=qmqpd.prefork)}
    master = qmqpd.main_pid()
    report: dict[str, object] = {
        "qmqpd_idle_workers": workers,
        "qmqpd_master": memory_kib(master) if master else {},
    }
    if postfix is not None:
        report["postfix_qmqpd"] = {pid: memory_kib(pid) for pid in postfix.qmqpd_processes()}
    return report


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise_runs(rows: list[RunResult]) -> dict[str, float | None]:
    """Median rate and CPU over repeats; latency percentiles of all probes pooled."""
    samples = [sample for row in rows for sample in row.samples]
    p50, p99 = percentile(samples, 0.50), percentile(samples, 0.99)
    return {
        "rate": median([row.rate for row in rows]),
        "p50_ms": p50 * 1000 if p50 is not None else None,
        "p99_ms": p99 * 1000 if p99 is not None else None,
        "probes": len(samples),
        "server_ms_per_msg": median([row.server_cpu * 1000 / row.messages for row in rows
                                     if row.server_cpu is not None]),
        "client_ms_per_msg": median([row.client_cpu * 1000 / row.messages for row in rows]),
        "machine_ms_per_msg": median([row.machine_cpu * 1000 / row.messages for row in rows]),
        "flushes_per_msg": median([row.flushes / row.messages for row in rows
                                   if row.flushes is not None]),
    }


def print_table(results: list[RunResult], sessions: list[int]) -> None:
    print("\n| sessions | server | msgs/s (median) | runs msgs/s | p50 ms | p99 ms | probes "
          "| server CPU ms/msg | client CPU ms/msg | machine CPU ms/msg | device flushes/msg "
          "| vs Postfix |")
    print("| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for count in sessions:
        names = list(dict.fromkeys(row.target for row in results if row.sessions == count))
        summaries = {name: summarise_runs([row for row in results
                                           if row.sessions == count and row.target == name])
                     for name in names}
        postfix = summaries.get("postfix", {}).get("rate")
        for name, summary in summaries.items():
            rate = summary["rate"] or 0.0
            runs = ", ".join(f"{row.rate:,.0f}" for row in results
                             if row.sessions == count and row.target == name)
            ratio = f"{rate / postfix:.2f}" if postfix else ""
            print(f"| {count} | {name} | {rate:,.0f} | {runs} | {fmt(summary['p50_ms'])} "
                  f"| {fmt(summary['p99_ms'])} | {summary['probes']} "
                  f"| {fmt(summary['server_ms_per_msg'], 2)} "
                  f"| {fmt(summary['client_ms_per_msg'], 2)} "
                  f"| {fmt(summary['machine_ms_per_msg'], 2)} "
                  f"| {fmt(summary['flushes_per_msg'], 2)} | {ratio} |")


def _mib(values: list[int]) -> str:
    if not values:
        return "n/a"
    return (f"{min(values) / 1024:.2f} / {statistics.median(values) / 1024:.2f} / "
            f"{max(values) / 1024:.2f}")


def print_memory(label: str, report: dict[str, object]) -> None:
    """PSS and private (clean + dirty) in MiB as min / median / max per process kind."""
    print(f"\nmemory {label} (smaps_rollup, MiB, min / median / max):")
    kinds = {
        "qmqpd master": {0: report["qmqpd_master"]},
        "qmqpd idle workers": report["qmqpd_idle_workers"],
        "postfix qmqpd processes": report.get("postfix_qmqpd", {}),
    }
    for kind, processes in kinds.items():
        values = list(processes.values())  # type: ignore[attr-defined]
        pss = [item.get("Pss", 0) for item in values if item]
        private = [item.get("Private_Clean", 0) + item.get("Private_Dirty", 0)
                   for item in values if item]
        print(f"  {kind:<24} n={len(pss):<3} PSS {_mib(pss)}   private {_mib(private)}")


def print_profile(summary: dict[str, object]) -> None:
    print(f"\nprofile (py-spy): samples {summary['samples']} "
          "(worker = in a session, worker_idle = waiting for one)")
    for key in ("worker_inclusive", "worker_self", "master_self"):
        print(f"  top {key.replace('_', ' ')} (share of that kind's samples):")
        for name, share in summary[key]:  # type: ignore[attr-defined]
            print(f"    {share:5.1f}%  {name}")


def check(result: RunResult) -> list[str]:
    """Every message must have been answered K: a fast server that refuses is no result."""
    problems = []
    if result.client_errors:
        problems.append(f"{result.target} s={result.sessions}: client said "
                        f"{result.client_errors[:3]}")
    if result.probe_failures:
        problems.append(f"{result.target} s={result.sessions}: probe failures "
                        f"{result.probe_failures}")
    if result.accepted is not None and result.accepted != result.messages:
        problems.append(f"{result.target} s={result.sessions}: server accepted "
                        f"{result.accepted} of {result.messages}")
    return problems


def bench_options(description: str, messages: int, unit: str, repeat: int = 1,
                  probe: bool = True) -> argparse.ArgumentParser:
    """The parser of a serve bench (its description: the first line of description) with
    the options every one shares: the load, the qmqpd build and its settings, the load
    gate, the report (and the latency probe's pause where a probe runs beside the load).
    The bench adds its own; bench_main parses them."""
    parser = argparse.ArgumentParser(description=description.splitlines()[0])
    parser.add_argument("-m", "--messages", type=int, default=messages)
    parser.add_argument("-s", "--sessions", type=parse_sessions, default=[1, 8, 32],
                        help="session counts, comma separated (default 1,8,32)")
    parser.add_argument("-l", "--length", type=int, default=2048, help="message bytes")
    parser.add_argument("--repeat", type=int, default=repeat,
                        help=f"timed runs per {unit} and session count; the median is shown")
    parser.add_argument("--warmup", type=int, default=200,
                        help="untimed messages before each timed run (default 200)")
    if probe:
        parser.add_argument("--probe-pause", type=float, default=0.005,
                            help="seconds between latency probes (default 0.005)")
    parser.add_argument("--qmqpd", type=shlex.split, default=[sys.executable, "-m", "qmqpd"],
                        metavar="COMMAND",
                        help="command that runs qmqpd (default: this python -m qmqpd)")
    parser.add_argument("--qmqpd-setting", action="append", default=[], metavar="LINE",
                        help='a qmqpd setting as TOML, e.g. "use_syncdir = false" '
                             "(repeatable; replaces the bench's value)")
    parser.add_argument("--maxdaemons", type=int, default=75)
    parser.add_argument("--prefork", type=int, default=4)
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="refuse to start above this 1-minute load average (default 1.0)")
    parser.add_argument("--force", action="store_true",
                        help="run even above --max-load (the figures then say little)")
    parser.add_argument("--json", type=Path, help="also write all figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = bench_options(__doc__, 10_000, "server")
    parser.add_argument("--targets", default="sink,qmqpd,postfix",
                        help="which of sink,qmqpd,postfix to run (default all)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, one extra qmqpd run at the largest "
                             "session count under py-spy")
    parser.add_argument("--profile-rate", type=int, default=250)
    parser.add_argument("--sync-messages", type=int, default=200,
                        help="messages of the extra run under strace -f -c that counts each "
                             "server's sync calls (0: skip)")
    return parser


def _raise_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace, root: Path, stack: contextlib.ExitStack) -> int:
    wanted = {item.strip() for item in args.targets.split(",")}
    command = args.qmqpd
    targets: list[Target] = []
    if "sink" in wanted:
        targets.append(SinkTarget(root))
    qmqpd = QmqpdTarget(root, command, args.maxdaemons, args.prefork, max(args.sessions),
                        args.qmqpd_setting)
    targets.append(qmqpd)
    postfix = PostfixTarget(root) if "postfix" in wanted else None
    if postfix:
        targets.append(postfix)
    for target in targets:
        stack.callback(target.stop)  # registered first, so a failed start is cleaned up too
        target.start()
        print(f"started {target.name} pid {target.main_pid()} port {target.port}",
              file=sys.stderr, flush=True)

    facts = machine_facts(command, root)
    print("machine: " + "; ".join(f"{key} {value}" for key, value in facts.items()))
    print(f"run: {args.messages} messages of {args.length} bytes, sessions "
          f"{','.join(map(str, args.sessions))}, warm-up {args.warmup}, "
          f"probe pause {args.probe_pause * 1000:.0f} ms")
    memory_before = memory_report(qmqpd, postfix)
    measured = [target for target in targets if target is not qmqpd or "qmqpd" in wanted]
    results: list[RunResult] = []
    for repeat in range(args.repeat):
        for sessions in args.sessions:
            # alternate the order so neither server always runs right after the other
            for target in measured if repeat % 2 == 0 else measured[::-1]:
                results.append(measure(target, args.messages, sessions, args.length,
                                       args.warmup, args.probe_pause))
    load_after = load_text()
    time.sleep(1.0)  # workers go back to idle
    memory_after = memory_report(qmqpd, postfix)

    syncs: dict[str, dict[str, float]] = {}
    if args.sync_messages > 0:
        for target in measured:
            if target.name != "qmqp-sink":
                syncs[target.name] = syncs_per_message(target, args.sync_messages, args.length)

    profile_summary = None
    if args.profile:
        output = root / "py-spy.raw"
        main_pid = qmqpd.main_pid()
        if main_pid is None:
            raise BenchError("qmqpd master is gone; nothing to profile")
        measure(qmqpd, args.messages, max(args.sessions), args.length, args.warmup,
                args.probe_pause, profile=lambda: py_spy(main_pid, output, args.profile_rate))
        profile_summary = summarise_profile(output.read_text())

    print(f"\nload average (1, 5, 15 min): before {facts['load before']}, "
          f"after the timed runs {load_after}")
    print_table(results, args.sessions)
    if syncs:
        print(f"\nsync calls per message (strace -f -c of the server's processes, "
              f"{args.sync_messages} messages, 1 session):")
        for name, calls in syncs.items():
            print(f"  {name:<8} " + ", ".join(f"{call} {value:.2f}"
                                               for call, value in calls.items()))
    print_memory("idle, before the runs", memory_before)
    print_memory("idle, 1 s after the runs", memory_after)
    if profile_summary:
        print_profile(profile_summary)
    return report(args, results, targets, {
        "machine": facts, "load_after": load_after, "syncs_per_message": syncs,
        "memory_before": memory_before, "memory_after": memory_after,
        "profile": profile_summary})


def report(args: argparse.Namespace, results: list[RunResult], targets: list[Target],
           figures: dict[str, object]) -> int:
    """Say every problem the runs had; with --json, write the figures, the runs and the
    servers' PIDs. The exit status: 1 if anything went wrong."""
    problems = [problem for result in results for problem in check(result)]
    for problem in problems:
        print(f"PROBLEM: {problem}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            **figures,
            "args": {k: str(v) for k, v in vars(args).items()},
            "pids": {target.name: target.main_pid() for target in targets},
            "results": [{**asdict(result), "samples": len(result.samples)}
                        for result in results],
            "problems": problems}, indent=2))
    return 1 if problems else 0


Runner = Callable[[argparse.Namespace, Path, contextlib.ExitStack], int]


def bench_main(name: str, parser: argparse.ArgumentParser, argv: list[str] | None,
               missing: Callable[[argparse.Namespace], str | None], run_with: Runner,
               prefix: str, prepare: Callable[[Path], None] | None = None) -> int:
    """A serve bench's frame: parse its options (bench_options and its own); refuse above
    the load limit (75: try later) and say what the machine lacks to run it (111); then run
    in a temporary directory that is removed afterwards (unless --keep); everything the
    run registered on the stack is stopped on an error, Ctrl-C or TERM. The exit status."""
    args = parser.parse_args(argv)
    refusal = load_refusal(os.getloadavg()[0], args.max_load, args.force)
    if refusal:
        print(f"{name}: {refusal}", file=sys.stderr)
        return 75  # EX_TEMPFAIL: try again later
    lacking = missing(args)
    if lacking:
        print(f"{name}: {lacking}", file=sys.stderr)
        return 111
    signal.signal(signal.SIGTERM, _raise_interrupt)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    if prepare is not None:
        prepare(root)
    with contextlib.ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, root, True)
        else:
            print(f"keeping {root}", file=sys.stderr)
        try:
            return run_with(args, root, stack)
        except BenchError as error:
            print(f"{name}: {error}", file=sys.stderr)
            return 111
        except KeyboardInterrupt:
            print(f"\n{name}: interrupted; stopping servers", file=sys.stderr)
            return 130


def _readable_by_postfix(root: Path) -> None:
    root.chmod(0o755)  # Postfix daemons run as user postfix below this directory


def main(argv: list[str] | None = None) -> int:
    return bench_main("serve_vs_postfix", build_parser(), argv, missing_for_postfix, run,
                      "qmqpd-bench-", _readable_by_postfix)


if __name__ == "__main__":
    sys.exit(main())
