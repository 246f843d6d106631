"""Per-queue backlog: how far behind qmail-send is, where new mail goes, and when to say Z.

Owns: the backlog of a native queue (todo/ entries not yet taken by qmail-send, messages
in mess/, the mtime of the oldest of each), its summary file, the least-loaded queue
choice and the flow-control verdict (QUEUE_MAX_* limits, QUEUE_SOFT_TODO delay).
Called by: the injector (choice and verdict, once per session), metrics and status (what
the summaries say), `qmqpd queue stat`, and itself as `python -m qmqpd.backlog` (the
scanner the master starts). Never touches messages: it counts names and reads mtimes.

The cost is bounded: a directory scan of a queue (100,000 entries take a fraction of a
second) runs at most once per QUEUE_SCAN_INTERVAL, by whichever process finds the summary
file `lock/qmqpd-backlog` stale and wins the flock on `lock/qmqpd-backlog.lock` (a
session scans itself only when the last scan was quick, else it starts the scanner and
goes on with the stale summary); everyone else reads that small file, and a long-lived
process reads it at most once a second. Mail queued since a scan is counted by a tally
file every process appends one byte to per message. The master never scans: when its metrics find a
summary stale (no mail came to refresh it) it spawns the scanner and shows the old
summary meanwhile.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from qmqpd import log
from qmqpd.fsio import replace_file

if TYPE_CHECKING:
    from qmqpd.config import Config

SUMMARY_NAME = os.path.join("lock", "qmqpd-backlog")
LOCK_NAME = os.path.join("lock", "qmqpd-backlog.lock")
# One byte appended per message queued: what came in since a scan, counted across all
# processes without a lock (O_APPEND writes of one byte do not interleave).
TALLY_NAME = os.path.join("lock", "qmqpd-backlog.tally")
TALLY_RESET = 1 << 20  # the scanner empties the tally past this size
FORMAT = "qmqpd-backlog 1"
# A long-lived process rereads a summary at most this often (a stat and a small read).
RECHECK_SECONDS = 1.0
# Queues whose todo counts are this close to the smallest count as tied: the counts are
# estimates (a scan plus the mail queued since, minus nothing qmail-send took since), and
# sending every message to the one smallest would swing the load instead of spreading it.
TIE_SLACK = 16
TIE_FRACTION = 0.1
# A scan is not repeated before this many times its own duration has passed, whatever
# QUEUE_SCAN_INTERVAL says: a huge queue costs at most 1/SCAN_DUTY of a core in scans.
SCAN_DUTY = 10
# A session scans a stale queue itself when its last scan took at most this long; a
# longer scan runs in a scanner child, and the session goes on with the stale summary.
INLINE_SCAN_SECONDS = 0.05
FUTURE_SLACK = 0.01  # seconds a summary's scan time may lie ahead of the reader's clock


class Backlog(NamedTuple):
    """One scan of one queue; times are seconds since the epoch (mtimes)."""

    queue: str
    scanned: float
    todo: int
    oldest_todo: float | None  # mtime of the oldest todo/ entry; None = todo/ is empty
    messages: int
    oldest_message: float | None  # mtime of the oldest mess/ file
    seconds: float = 0.0  # how long the scan took
    counted: int = 0  # size of the tally file when the scan began (see Watch)

    def todo_age(self, now: float) -> float:
        return 0.0 if self.oldest_todo is None else max(0.0, now - self.oldest_todo)

    def message_age(self, now: float) -> float:
        return 0.0 if self.oldest_message is None else max(0.0, now - self.oldest_message)


# ---- scanning ---------------------------------------------------------------------------
def _entries(directory: str) -> Iterator[os.DirEntry[str]]:
    """The pure-decimal names of a directory (qmail-send ignores the others)."""
    try:
        found = os.scandir(directory)
    except OSError:  # missing or broken: nothing to count (the writer reports it)
        return
    with found:
        for entry in found:
            if entry.name.isdigit() and entry.name.isascii():
                yield entry


def _count(directories: Iterator[str]) -> tuple[int, float | None]:
    count, oldest = 0, None
    for directory in directories:
        for entry in _entries(directory):
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except OSError:
                continue  # taken (todo) or delivered (mess) while we looked
            count += 1
            if oldest is None or mtime < oldest:
                oldest = mtime
    return count, oldest


def _buckets(path: str, top: str, split: int) -> Iterator[str]:
    return (os.path.join(path, top, str(n)) for n in range(split))


def scan(path: str, split: int = 23, todo_layout: str = "flat") -> Backlog:
    """Count todo/ and mess/ of one queue now: one scandir per directory, one stat per
    entry (for the oldest mtime). todo/ is flat or split like mess/ (TODO_LAYOUT)."""
    started = time.monotonic()
    scanned = time.time()
    counted = tally_size(path)  # before the scan: mail during it may count twice, not never
    todo_dirs = (_buckets(path, "todo", split) if todo_layout == "split"
                 else iter([os.path.join(path, "todo")]))
    todo, oldest_todo = _count(todo_dirs)
    messages, oldest_message = _count(_buckets(path, "mess", split))
    return Backlog(path, scanned, todo, oldest_todo, messages, oldest_message,
                   time.monotonic() - started, counted)


def tally_size(path: str) -> int:
    try:
        return os.stat(os.path.join(path, TALLY_NAME)).st_size
    except OSError:
        return 0


def _reset_tally(path: str) -> None:
    """Empty a large tally (under the scan lock, just before a scan takes its size)."""
    if tally_size(path) > TALLY_RESET:
        with contextlib.suppress(OSError):
            os.truncate(os.path.join(path, TALLY_NAME), 0)


def fresh(backlog: Backlog | None, interval: float, now: float) -> bool:
    """A summary young enough to use as it is (see SCAN_DUTY)."""
    if backlog is None:
        return False
    # A summary stores its scan time to the millisecond (rounded, so up to 0.5 ms ahead of
    # the clock that read it); one from further in the future is suspect: scan again.
    return -FUTURE_SLACK <= now - backlog.scanned < max(interval, SCAN_DUTY * backlog.seconds)


# ---- the summary file -------------------------------------------------------------------
def _number(text: str) -> float | None:
    return None if text == "-" else float(text)


def format_summary(backlog: Backlog) -> str:
    def when(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    return (f"{FORMAT}\nscanned {backlog.scanned:.3f}\nseconds {backlog.seconds:.6f}\n"
            f"todo {backlog.todo}\noldest_todo {when(backlog.oldest_todo)}\n"
            f"messages {backlog.messages}\noldest_message {when(backlog.oldest_message)}\n"
            f"counted {backlog.counted}\n")


def parse_summary(path: str, text: str) -> Backlog | None:
    """The summary of queue path, or None when text is not a whole summary."""
    lines = text.split("\n")
    if not lines or lines[0] != FORMAT:
        return None
    fields = dict(line.split(" ", 1) for line in lines[1:] if " " in line)
    try:
        return Backlog(path, float(fields["scanned"]), int(fields["todo"]),
                       _number(fields["oldest_todo"]), int(fields["messages"]),
                       _number(fields["oldest_message"]), float(fields["seconds"]),
                       int(fields["counted"]))
    except (KeyError, ValueError):
        return None


def read_summary(path: str) -> Backlog | None:
    try:
        with open(os.path.join(path, SUMMARY_NAME), encoding="ascii") as handle:
            return parse_summary(path, handle.read(4096))
    except (OSError, ValueError):
        return None


def write_summary(backlog: Backlog) -> None:
    """tmp + rename: readers see the old summary or the new one, never half of one."""
    replace_file(os.path.join(backlog.queue, SUMMARY_NAME),
                 format_summary(backlog).encode("ascii"), 0o644, exact_mode=False)


_unwritable: set[str] = set()  # queues whose summary this process could not write (logged)


def refresh(path: str, split: int, todo_layout: str, interval: float,
            now: float | None = None) -> Backlog | None:
    """The queue's summary, scanned again first if it is older than interval at `now`
    (time.time()) and no other process is scanning it (then its last summary, maybe None,
    is the answer)."""
    try:
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o644)
    except OSError as error:
        return _scan_unshared(path, split, todo_layout, error)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_summary(path)  # another process scans it right now
        current = read_summary(path)
        if fresh(current, interval, time.time() if now is None else now):
            return current  # refreshed while we waited for the lock
        _reset_tally(path)
        scanned = scan(path, split, todo_layout)
        try:
            write_summary(scanned)
        except OSError as error:
            _note_unwritable(path, error)
        return scanned
    finally:
        os.close(fd)


def _scan_unshared(path: str, split: int, todo_layout: str, error: OSError) -> Backlog:
    _note_unwritable(path, error)
    return scan(path, split, todo_layout)


def _note_unwritable(path: str, error: OSError) -> None:
    if path not in _unwritable:
        _unwritable.add(path)
        log.warning("cannot share the queue backlog summary; this process scans alone",
                    queue=path, file=os.path.join(path, SUMMARY_NAME), error=error.strerror)


class Watch:
    """The backlog of a plan's queues as one process sees it: read from the summary files,
    rescanned (by whoever gets the lock) once they are QUEUE_SCAN_INTERVAL old. Built in
    the master with the plan; each forked worker keeps its own copy of the cache.

    `clock` (monotonic: when to look again) and `wall` (the summaries' age, in epoch
    seconds as other processes write them) are time.monotonic and time.time; a test
    drives them."""

    def __init__(self, paths: Sequence[str], split: int, todo_layout: str, interval: float,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.paths = tuple(paths)
        self.clock = clock
        self.wall = wall
        self.split = split
        self.todo_layout = todo_layout
        self.interval = interval
        self._seen: dict[str, tuple[float, Backlog | None]] = {}
        # The counts judged by include the mail queued since the scan, so a limit is not
        # overrun by a scan interval of inflow and the choices spread: every process
        # appends a byte per message to the queue's tally (fd per queue, opened on first
        # use), and the summary says how long the tally was at its scan. Where the tally
        # cannot be opened, a process counts its own mail only (_added).
        self._tallies: dict[str, int | None] = {}
        self._added: dict[str, int] = {}
        self._children: list[int] = []  # scanners started by this process, not yet reaped

    @classmethod
    def from_config(cls, config: Config, paths: Sequence[str]) -> Watch | None:
        """None when scanning is off (QUEUE_SCAN_INTERVAL 0) or there is no native queue."""
        if not config.queue_scan_interval or not paths:
            return None
        return cls(paths, config.split, config.todo_layout, config.queue_scan_interval)

    def backlog(self, path: str) -> Backlog | None:
        checked, known = self._seen.get(path, (float("-inf"), None))
        moment = self.clock()
        if moment - checked >= min(RECHECK_SECONDS, self.interval):
            self._reap()
            previous = known
            known = read_summary(path)
            now = self.wall()
            if fresh(known, self.interval, now):
                pass
            elif known is not None and known.seconds > INLINE_SCAN_SECONDS:
                self._scan_aside(path)  # a long scan: not in this session's time
            else:
                known = refresh(path, self.split, self.todo_layout, self.interval, now)
            if known is None or previous is None or known.scanned != previous.scanned:
                self._added[path] = 0
            self._seen[path] = (moment, known)
        if known is None:
            return None
        added = self._since(path, known)
        if not added:
            return known
        return known._replace(todo=known.todo + added, messages=known.messages + added)

    def _tally(self, path: str) -> int | None:
        if path not in self._tallies:
            try:
                self._tallies[path] = os.open(
                    os.path.join(path, TALLY_NAME),
                    os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                self._tallies[path] = None
        return self._tallies[path]

    def _since(self, path: str, known: Backlog) -> int:
        """Messages queued (by any process) since the scan of `known`."""
        fd = self._tally(path)
        if fd is None:
            return self._added.get(path, 0)
        try:
            return max(0, os.fstat(fd).st_size - known.counted)
        except OSError:
            return self._added.get(path, 0)

    def _scan_aside(self, path: str) -> None:
        pid = _spawn([path], self.split, self.todo_layout, self.interval)
        if pid is not None:
            self._children.append(pid)

    def _reap(self) -> None:
        """Collect the scanners this process started (a worker has no other reaper)."""
        for pid in list(self._children):
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self._children.remove(pid)

    def queued(self, path: str) -> None:
        """A message was just queued in path (counted until the next scan)."""
        self._added[path] = self._added.get(path, 0) + 1
        fd = self._tally(path)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.write(fd, b".")

    def all(self) -> list[Backlog | None]:
        return [self.backlog(path) for path in self.paths]


# ---- limits, verdict, choice ------------------------------------------------------------
class Limits(NamedTuple):
    """The flow-control settings of one session (a rule may set its own); 0 = off."""

    max_todo: int = 0
    max_todo_age: float = 0
    max_messages: int = 0
    soft_todo: int = 0
    flow_delay: float = 0.0
    stuck_age: float = 0
    choice: str = "least-loaded"

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        return cls(config.queue_max_todo, config.queue_max_todo_age,
                   config.queue_max_messages, config.queue_soft_todo,
                   config.queue_flow_delay, config.queue_stuck_age, config.queue_choice)


class Flow(NamedTuple):
    """What to do with one message for this queue: refusal = why Z ("" = accept), and how
    long to wait before taking it (the soft mark)."""

    refusal: str = ""
    delay: float = 0.0


def verdict(backlog: Backlog | None, limits: Limits, now: float) -> Flow:
    """Flow control for one queue: past a hard limit Z, past the soft mark a delay. An
    unknown backlog (no summary yet, no scan possible) is never a reason to refuse."""
    if backlog is None:
        return Flow()
    if limits.max_todo and backlog.todo > limits.max_todo:
        return Flow(f"todo {backlog.todo} > QUEUE_MAX_TODO {limits.max_todo}")
    age = backlog.todo_age(now)
    if limits.max_todo_age and age > limits.max_todo_age:
        return Flow(f"oldest todo {age:.0f}s > QUEUE_MAX_TODO_AGE {limits.max_todo_age:g}s")
    if limits.max_messages and backlog.messages > limits.max_messages:
        return Flow(f"messages {backlog.messages} > QUEUE_MAX_MESSAGES {limits.max_messages}")
    if limits.soft_todo and backlog.todo > limits.soft_todo:
        return Flow(delay=limits.flow_delay)
    return Flow()


def stuck(backlog: Backlog | None, limits: Limits, now: float) -> bool:
    """qmail-send looks stuck: its oldest todo entry is older than QUEUE_STUCK_AGE."""
    return bool(limits.stuck_age and backlog is not None
                and backlog.todo_age(now) > limits.stuck_age)


def choose(backlogs: Sequence[Backlog | None], limits: Limits, now: float,
           pick: Callable[[list[int]], int]) -> int:
    """The index of the queue a new message goes to. random: any queue under every limit
    (qmail-multi, with the limits). least-loaded: of the queues under every limit those
    whose qmail-send does not look stuck, the smallest todo count (counts within
    TIE_SLACK/TIE_FRACTION of it are ties); `pick` chooses among ties. When every queue
    is over a limit, the least loaded is chosen and its verdict refuses."""
    every = list(range(len(backlogs)))
    room = [i for i in every if not verdict(backlogs[i], limits, now).refusal]
    if limits.choice == "random":
        return pick(room or every)
    healthy = [i for i in room if not stuck(backlogs[i], limits, now)]
    candidates = healthy or room or every
    loads = {i: (backlogs[i].todo if backlogs[i] is not None else 0) for i in candidates}
    least = min(loads.values())
    slack = max(TIE_SLACK, int(least * TIE_FRACTION))
    return pick([i for i in candidates if loads[i] <= least + slack])


# ---- what metrics and status show ------------------------------------------------------
class WatchedQueues(list[str]):
    """The queue paths of the master's settings, with how their backlog is scanned (the
    master hands this to metrics, which never scans: see spawn_scanner)."""

    def __init__(self, paths: Sequence[str], split: int = 23, todo_layout: str = "flat",
                 interval: float = 0.0) -> None:
        super().__init__(paths)
        self.split = split
        self.todo_layout = todo_layout
        self.interval = interval


def watched(config: Config) -> WatchedQueues:
    """The native queues the settings name (none when QMAILQUEUE takes the mail)."""
    paths: list[str] = []
    if config.qmailqueue:
        pass
    elif config.queuedir:
        paths = [config.queuedir]
    elif config.queue_base:
        paths = [os.path.join(config.queue_base, f"queue{n}")
                 for n in range(config.queue_start, config.queue_start + config.queue_count)]
    return WatchedQueues(paths, config.split, config.todo_layout, config.queue_scan_interval)


_spawned: dict[str, float] = {}  # queue -> when (monotonic) the master last started a scan


def spawn_scanner(queues: WatchedQueues, stale: list[str]) -> int | None:
    """Start `python -m qmqpd.backlog` for the stale queues, at most once per interval per
    queue; the caller (the master) does not wait: its reaper collects the child. Returns
    the child's pid, or None when nothing was started."""
    return _spawn(stale, queues.split, queues.todo_layout, queues.interval)


def _spawn(stale: Sequence[str], split: int, todo_layout: str, interval: float) -> int | None:
    moment = time.monotonic()
    due = [path for path in stale
           if moment - _spawned.get(path, float("-inf")) >= max(interval, 1.0)]
    if not due:
        return None
    argv = [sys.executable, "-m", "qmqpd.backlog", "--split", str(split),
            "--todo-layout", todo_layout, "--interval", str(interval), *due]
    try:
        pid = os.posix_spawn(sys.executable, argv, os.environ)
    except OSError as error:
        log.warning("cannot start the backlog scanner", error=error.strerror)
        return None
    for path in due:
        _spawned[path] = moment
    return pid


def free_space(path: str) -> tuple[int, int] | None:
    """Bytes and inodes free to unprivileged users on the queue's filesystem."""
    try:
        info = os.statvfs(path)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize, info.f_favail


Gauge = tuple[str, str, list[tuple[str, float]]]  # name, help, (queue, value) samples


def gauges(queues: WatchedQueues, now: float | None = None) -> list[Gauge]:
    """The backlog gauges of each queue, from the summaries as they are (no scan here);
    stale summaries get a scanner started. Empty when scanning is off."""
    if not queues.interval:
        return []
    now = time.time() if now is None else now
    found = [(path, read_summary(path)) for path in queues]
    stale = [path for path, known in found if not fresh(known, queues.interval, now)]
    if stale:
        spawn_scanner(queues, stale)
    known = [(path, backlog) for path, backlog in found if backlog is not None]
    return [
        ("qmqpd_queue_todo_messages", "Messages in todo/ not yet taken by qmail-send "
         "(at the last scan)", [(p, b.todo) for p, b in known]),
        ("qmqpd_queue_oldest_todo_age_seconds", "Age of the oldest todo/ entry (0 when "
         "todo/ is empty)", [(p, b.todo_age(now)) for p, b in known]),
        ("qmqpd_queue_messages", "Messages in the queue (mess/) at the last scan",
         [(p, b.messages) for p, b in known]),
        ("qmqpd_queue_oldest_message_age_seconds", "Age of the oldest message in mess/ "
         "(0 when the queue is empty)", [(p, b.message_age(now)) for p, b in known]),
        ("qmqpd_queue_scan_timestamp_seconds", "When the backlog of the queue was last "
         "scanned, seconds since the epoch", [(p, b.scanned) for p, b in known]),
        ("qmqpd_queue_scan_duration_seconds", "How long the last backlog scan of the "
         "queue took", [(p, b.seconds) for p, b in known]),
        ("qmqpd_queue_free_inodes", "Free inodes on each queue's filesystem",
         [(p, space[1]) for p in queues if (space := free_space(p)) is not None]),
    ]


def report(config: Config, paths: Sequence[str] | None = None) -> list[dict[str, object]]:
    """The backlog of each queue for `qmqpd status` and `qmqpd queue stat` (separate
    processes: they may scan, under the same lock, when the summary is stale)."""
    now = time.time()
    interval = config.queue_scan_interval
    rows: list[dict[str, object]] = []
    for path in watched(config) if paths is None else paths:
        if not os.path.isdir(os.path.join(path, "mess")):
            rows.append({"queue": path, "missing": True})
            continue
        if interval:
            backlog = refresh(path, config.split, config.todo_layout, interval)
        else:
            backlog = scan(path, config.split, config.todo_layout)
        space = free_space(path)
        row: dict[str, object] = {"queue": path}
        if backlog is not None:
            row.update(todo=backlog.todo, oldest_todo_age=round(backlog.todo_age(now), 1),
                       messages=backlog.messages,
                       oldest_message_age=round(backlog.message_age(now), 1),
                       scanned_age=round(max(0.0, now - backlog.scanned), 1),
                       scan_seconds=round(backlog.seconds, 4))
        if space is not None:
            row.update(free_bytes=space[0], free_inodes=space[1])
        rows.append(row)
    return rows


# ---- the scanner the master starts ------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """`python -m qmqpd.backlog [--split N] [--todo-layout flat|split] [--interval S]
    QUEUE...`: refresh each queue's summary if it is stale (under its lock)."""
    args = list(sys.argv[1:] if argv is None else argv)
    options = {"--split": "23", "--todo-layout": "flat", "--interval": "0"}
    paths = []
    while args:
        word = args.pop(0)
        if word in options and args:
            options[word] = args.pop(0)
        else:
            paths.append(word)
    split, layout = int(options["--split"]), options["--todo-layout"]
    interval = float(options["--interval"])
    for path in paths:
        refresh(path, split, layout, interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
