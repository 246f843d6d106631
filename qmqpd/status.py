"""`qmqpd status`: what the running master is doing, from the status file it keeps.

The master writes STATUS_FILE (JSON) with tmp + rename: at most once a second when
something changed, every REFRESH_SECONDS anyway (so a stuck master shows as stale), and
once more at exit. A file and not a control socket, because
- the master stays a loop that only serves clients and workers: a slow or stuck reader
  cannot hold it, and there is no second listener to protect, authorize or bound;
- reading needs only file permissions, works while the master is busy or hung (the
  `written` time tells), and the last state survives the master for a post-mortem;
- the rename is atomic, so a reader never sees half a file.
The price is up to about two seconds of lag, which is fine for counters read by people.

The writer side (`Observer`, which owns `SessionCounters` and a `StatusWriter` and also
feeds the metrics and the process title) is used by the master; the reader side
(`read_status`, `render_text`, `run`) by the command. Both share the format, so it lives
in one module. Imports: config, log and the standard library; the command also reads the
queues' backlog (backlog).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from qmqpd import log
from qmqpd.config import Config
from qmqpd.errors import TemporaryError
from qmqpd.fsio import replace_file

FORMAT_VERSION = 1
WRITE_INTERVAL = 1.0
REFRESH_SECONDS = 10.0
# A running master's file older than this means the master loop is not turning.
STALE_AFTER = 3 * REFRESH_SECONDS
TOP_CLIENTS = 10
# Bounds on what the counters keep, whatever the workers report.
MAX_STAGE_NAMES = 32
ACTIONS = ("accept", "tempfail", "reject", "discard")
ANSWER_NAMES = {"K": "accepted", "Z": "tempfailed", "D": "rejected", "": "no_answer"}
ANSWERS = ("accepted", "tempfailed", "rejected", "no_answer", "worker_died", "unreported")
CONNECTIONS = ("handed", "denied", "refused_perip", "dropped", "too_slow",
               "proxy_rejected", "busy", "gave_way")
# `qmqpd status` exit codes: running; not running (the last status is shown); no status.
EXIT_RUNNING = 0
EXIT_NOT_RUNNING = 1
EXIT_NO_STATUS = 111


class SessionCounters:
    """Since-start counts kept by the master: connections, answers, stage verdicts."""

    def __init__(self) -> None:
        self.connections = dict.fromkeys(CONNECTIONS, 0)
        self.answers = dict.fromkeys(ANSWERS, 0)
        self.stages: dict[str, dict[str, int]] = {}
        # a balancer's probes and PROXY LOCAL connections: neither answers nor sessions
        self.health_checks = 0

    def connection(self, what: str) -> None:
        self.connections[what] += 1

    def session_ended(self, answer: str | None, stages: Iterable[tuple[str, str]]) -> None:
        """One session a worker reported; answer None = the worker sent no outcome."""
        self.answers["unreported" if answer is None else ANSWER_NAMES[answer]] += 1
        for name, action in stages:
            self._stage(name)[action if action in ACTIONS else "other"] += 1

    def worker_died(self) -> None:
        self.answers["worker_died"] += 1

    def _stage(self, name: str) -> dict[str, int]:
        if name not in self.stages and len(self.stages) >= MAX_STAGE_NAMES:
            name = "other"
        counts = self.stages.setdefault(name, dict.fromkeys(ACTIONS, 0))
        counts.setdefault("other", 0)
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": dict(self.connections),
            "answers": dict(self.answers),
            "stages": {name: dict(self.stages[name]) for name in sorted(self.stages)},
            "health_checks": self.health_checks,
        }


# ---- the file -------------------------------------------------------------------------
def master_alive(pid: int) -> bool:
    """pid is a live qmqpd master (its process title says so where /proc can tell)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().startswith(b"qmqpd: master")
    except OSError:
        return True  # no /proc: trust the signal check


class StatusError(TemporaryError):
    """No usable status: the message names STATUS_FILE and what is wrong."""


def read_status(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise StatusError(f"no status file {path} (STATUS_FILE): is `qmqpd serve` running "
                          "with this configuration?") from None
    except OSError as error:
        raise StatusError(f"cannot read the status file {path}: {error.strerror}") from None
    except ValueError as error:
        raise StatusError(f"status file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise StatusError(f"status file {path} is not a version {FORMAT_VERSION} status")
    return data


def write_atomic(path: str, data: dict[str, Any]) -> None:
    """tmp + rename in the same directory: readers see the old file or the new one."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    replace_file(path, text.encode("utf-8"), 0o640)  # client IPs: not for every user


class StatusWriter:
    """The master's side of the file: rate-limited atomic writes, errors logged once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.enabled = bool(path)
        self.last_write = float("-inf")
        self.last_data: dict[str, Any] | None = None
        self.last_error = ""

    def prepare(self, uid: int = -1, gid: int = -1) -> None:
        """Before the privilege drop: make the directory (owned by the user the master
        becomes) and refuse to overwrite another running master's status."""
        if not self.enabled:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            if not os.path.isdir(directory):
                os.makedirs(directory, 0o755, exist_ok=True)
                if uid >= 0 or gid >= 0:
                    os.chown(directory, uid, gid)
        except OSError as error:
            self._disable(f"cannot create {directory}: {error.strerror}")
            return
        with contextlib.suppress(StatusError):
            other = read_status(self.path)
            pid = other.get("pid")
            if (other.get("state") != "stopped" and isinstance(pid, int)
                    and pid != os.getpid() and master_alive(pid)):
                self._disable(f"master {pid} writes it; give each server its own STATUS_FILE")

    def _disable(self, reason: str) -> None:
        self.enabled = False
        log.error("no status file; `qmqpd status` will not work", setting="STATUS_FILE",
                  path=self.path, reason=reason)

    def due(self, now: float) -> bool:
        return self.enabled and now - self.last_write >= WRITE_INTERVAL

    def maybe_write(self, now: float, build: Callable[[], dict[str, Any]]) -> None:
        """Write when the status changed (at most once a WRITE_INTERVAL) or got old."""
        if not self.due(now):
            return
        data = build()
        if data == self.last_data and now - self.last_write < REFRESH_SECONDS:
            return
        self.write(now, data)

    def write(self, now: float, data: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.last_write = now
        self.last_data = data
        try:
            write_atomic(self.path, {**data, "written": time.time()})
        except OSError as error:
            if error.strerror != self.last_error:  # once per distinct failure
                log.warning("cannot write the status file", setting="STATUS_FILE",
                            path=self.path, error=error.strerror)
            self.last_error = error.strerror or str(error)
            return
        self.last_error = ""


# ---- the observer ---------------------------------------------------------------------
# Connection results that are refusals: also counted per client IP in the metrics.
BUSY_WARNING_INTERVAL = 60.0  # at most one "all MAXDAEMONS busy" warning per this long
REFUSALS = frozenset({"denied", "refused_perip", "proxy_rejected", "too_slow", "busy",
                      "gave_way"})


class Feed(Protocol):
    """What the observer passes on to the metrics exporter (qmqpd.metrics.Exporter)."""

    def refused(self, ip: str, reason: str) -> None: ...

    def observe(self, session_seconds: float | None, commit_seconds: float | None) -> None: ...


class Observer:
    """The one observer of the master: it owns the counters and keeps the status file,
    the metrics feed and the process title in step with them. The master tells it what
    happened (connections, sessions ended, workers died) and, each turn, what it shows;
    the observer decides nothing about clients or workers."""

    def __init__(self, status_file: str, set_title: Callable[[str], None],
                 feed: Feed | None = None) -> None:
        self.counters = SessionCounters()
        self.writer = StatusWriter(status_file)
        self.set_title = set_title
        self.feed = feed
        self.title_shows: tuple[object, ...] = ()
        self.next_busy_warning = 0.0

    def connection(self, result: str, ip: str = "") -> None:
        self.counters.connections[result] += 1  # counters.connection(), once per client
        if self.feed is not None and result in REFUSALS:
            self.feed.refused(ip, result)

    def session_ended(self, outcome: Any) -> None:
        """A done record's outcome (qmqpd.ipc.Outcome), or None when it had none."""
        if outcome is None:
            self.counters.session_ended(None, ())
            return
        if outcome.health:  # a probe: its answer and time say nothing about the mail
            self.health_check()
            return
        self.counters.session_ended(outcome.answer, outcome.stages)
        if self.feed is not None:
            self.feed.observe(outcome.session_seconds, outcome.commit_seconds)

    def worker_died(self) -> None:
        self.counters.worker_died()

    def health_check(self) -> None:
        """A health check: a probe a worker answered, or a PROXY LOCAL connection that
        closed without a request."""
        self.counters.health_checks += 1

    def show(self, now: float, listening: Iterable[str], busy: int, idle: int, waiting: int,
             accepting: bool, build: Callable[[], dict[str, Any]]) -> None:
        """Each loop turn: the title when what it shows changed (the addresses actually
        bound, not the configured ones), the status file when due."""
        shown = (tuple(listening), busy, idle, waiting, accepting)
        if shown != self.title_shows:
            self.title_shows = shown
            title = (f"qmqpd: master {','.join(shown[0])} busy={busy} idle={idle} "
                     f"waiting={waiting}")
            self.set_title(title if accepting else title + " stopping")
        self.writer.maybe_write(now, build)

    def status(self, *, state: str, started: float, listen: Iterable[str], config: Config,
               waiting: int, workers: dict[str, int], generation: int,
               ledger: Any) -> dict[str, Any]:
        """The status file's content (also what the metrics read); ledger is the
        master's qmqpd.limits.Ledger."""
        return {
            "version": FORMAT_VERSION, "pid": os.getpid(), "state": state,
            "started": round(started, 3), "listen": list(listen),
            "maxdaemons": ledger.capacity.maximum, "maxperip": config.maxperip,
            "prefork": config.prefork, "generation": generation, "workers": workers,
            "sessions": ledger.capacity.busy, "waiting": waiting,
            "clients": len(ledger.per_ip),
            "busiest": [{"ip": ip, "sessions": count}
                        for ip, count in ledger.per_ip.busiest(TOP_CLIENTS)],
            **self.counters.as_dict(),
        }

    def warn_busy(self, now: float, waiting: int, ledger: Any) -> None:
        """Clients wait for a worker while every session is busy: one line a minute."""
        if waiting and ledger.full and now >= self.next_busy_warning:
            log.warning("all sessions busy; clients wait for a worker; "
                        "raise MAXDAEMONS if this persists",
                        setting="MAXDAEMONS", maxdaemons=ledger.capacity.maximum,
                        waiting=waiting, busiest=",".join(
                            f"{ip}={n}" for ip, n in ledger.per_ip.busiest(3)))
            self.next_busy_warning = now + BUSY_WARNING_INTERVAL

    def final(self, now: float, data: dict[str, Any], code: int) -> None:
        self.writer.write(now, {**data, "state": "stopped", "exit": code})


# ---- the command ----------------------------------------------------------------------
def assess(data: dict[str, Any], now: float) -> dict[str, Any]:
    """The file's data plus what the reader concludes: running, stale, uptime, age."""
    written = float(data.get("written", 0))
    running = data.get("state") != "stopped" and master_alive(int(data.get("pid", 0)))
    age = max(0.0, now - written)
    return {
        **data,
        "running": running,
        "stale": running and age > STALE_AFTER,
        "age": round(age, 1),
        "uptime": round(max(0.0, (now if running else written) - float(data.get("started", 0))),
                        1),
    }


def duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# Shown only when not zero: they count what should not happen.
_RARE = ("unreported", "other")
_ANSWER_WORDS = {"accepted": "accepted (K)", "tempfailed": "tempfailed (Z)",
                 "rejected": "rejected (D)", "no_answer": "without an answer",
                 "worker_died": "lost with a dying worker", "unreported": "unreported"}
_ACTION_WORDS = {action: action for action in (*ACTIONS, "other")}


def _counts(counts: dict[str, int], words: dict[str, str]) -> str:
    return ", ".join(f"{counts.get(key, 0)} {word}" for key, word in words.items()
                     if counts.get(key, 0) or key not in _RARE)


def render_text(status: dict[str, Any]) -> str:
    """The human-readable form of an assessed status."""
    workers = status.get("workers", {})
    answers = status.get("answers", {})
    connections = status.get("connections", {})
    state = status.get("state", "?")
    if not status["running"]:
        head = (f"qmqpd master pid {status.get('pid')} is not running "
                f"(last status {duration(status['age'])} ago, state {state})")
    else:
        head = f"qmqpd master pid {status.get('pid')}, {state}, up {duration(status['uptime'])}"
    lines = [
        head,
        "listening on " + (", ".join(status.get("listen", [])) or "nothing"),
        (f"workers: {workers.get('busy', 0)} busy, {workers.get('idle', 0)} idle, "
         f"{workers.get('starting', 0)} starting, {workers.get('retiring', 0)} retiring; "
         f"{workers.get('total', 0)} in all; MAXDAEMONS {status.get('maxdaemons')}, "
         f"{status.get('sessions', 0)} sessions in service, "
         f"{status.get('waiting', 0)} connections waiting"),
    ]
    busiest = status.get("busiest", [])
    if busiest:
        lines.append(f"busiest clients (of {status.get('clients', len(busiest))} connected, "
                     f"MAXPERIP {status.get('maxperip')}):")
        lines.extend(f"  {item['ip']} {item['sessions']}" for item in busiest)
    else:
        lines.append("no clients connected")
    lines.append("answers since start: " + _counts(answers, _ANSWER_WORDS))
    lines.append(
        f"connections since start: {connections.get('handed', 0)} handed to workers, "
        f"{connections.get('denied', 0)} denied by rules, "
        f"{connections.get('refused_perip', 0)} refused over MAXPERIP, "
        f"{connections.get('dropped', 0)} dropped, "
        f"{connections.get('too_slow', 0)} cut too slow before a worker, "
        f"{connections.get('busy', 0)} answered busy after waiting for a worker, "
        f"{connections.get('gave_way', 0)} too slow while others waited, "
        f"{connections.get('proxy_rejected', 0)} PROXY header rejected")
    lines.append(f"health checks since start: {status.get('health_checks', 0)}")
    for name, counts in status.get("stages", {}).items():
        lines.append(f"stage {name}: " + _counts(counts, _ACTION_WORDS))
    lines.extend(backlog_lines(status.get("backlog", [])))
    if status["stale"]:
        lines.append(f"warning: the status is {duration(status['age'])} old; "
                     "the master may be stuck")
    return "\n".join(lines) + "\n"


def _size(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def backlog_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per queue: its backlog (qmqpd.backlog.report) and free space."""
    lines = []
    for row in rows:
        parts = []
        if row.get("missing"):
            parts.append("not a qmail queue (no mess/)")
        elif "todo" in row:
            parts.append(f"todo {row['todo']} (oldest {duration(row['oldest_todo_age'])}), "
                         f"{row['messages']} messages (oldest "
                         f"{duration(row['oldest_message_age'])})")
        else:
            parts.append("backlog unknown")
        if "free_bytes" in row:
            parts.append(f"{_size(row['free_bytes'])} and {row['free_inodes']} inodes free")
        if "scanned_age" in row:
            parts.append(f"scanned {duration(row['scanned_age'])} ago in "
                         f"{row['scan_seconds'] * 1000:.0f} ms")
        lines.append(f"queue {row['queue']}: " + "; ".join(parts))
    return lines


def run(config: Config, as_json: bool = False, now: float | None = None) -> int:
    """`qmqpd status [--json]`: print the master's status; the exit status says whether it
    runs (EXIT_RUNNING), not (EXIT_NOT_RUNNING) or is unknown (EXIT_NO_STATUS)."""
    if not config.status_file:
        print("qmqpd: STATUS_FILE is empty: the master keeps no status", file=sys.stderr)
        return EXIT_NO_STATUS
    try:
        data = read_status(config.status_file)
        status = assess(data, time.time() if now is None else now)
        from qmqpd import backlog  # the queues' backlog: this command may scan, the master not

        status["backlog"] = backlog.report(config)
    except (TypeError, ValueError):
        print(f"qmqpd: status file {config.status_file} has bad fields", file=sys.stderr)
        return EXIT_NO_STATUS
    except StatusError as error:
        print(f"qmqpd: {error}", file=sys.stderr)
        return EXIT_NO_STATUS
    if as_json:
        sys.stdout.write(json.dumps(status, indent=1, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render_text(status))
    return EXIT_RUNNING if status["running"] and not status["stale"] else EXIT_NOT_RUNNING
