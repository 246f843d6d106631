"""The native qmail queue: a writer that follows qmail-queue byte for byte, and readers.

Queue states (as qmail-send sees them), one message id N = inode of its mess file:

| state | files present | meaning |
| --- | --- | --- |
| S1 | pid/<pid>.<time>.<seq> | writer started; scratch name only |
| S2 | mess/<N%split>/N (+ pid name) | message being written |
| S3 | mess + intd/N | envelope being written (not yet visible to qmail-send) |
| S4 | mess + intd/N + todo/N | committed: the todo link is the one commit point |
| S5 | mess + info/N + local/remote | qmail-send owns it (todo/intd cleaned) |

Anything before S4 that fails is removed by the writer; nothing half-written reaches todo/.

Order of a write (COMMIT_STEPS): pid file, link to mess/N, unlink the pid name, message
bytes, intd/N and its envelope; then the syncs of both files and of mess/N's directory,
issued together; then the todo/N link (the commit point) and the fsync of todo/. A K is
sent only after that last fsync.

Commit modes (COMMIT_MODE): "each" makes every message durable with its own syncs, as
above. "syncfs" shares them (GROUP_COMMIT_STEPS): once its files are written, a writer
waits for a commit round of qmqpd/commit.py that started after its last write (one
syncfs of the queue's filesystem for every writer waiting), then links todo/N and waits
for a round again. Either way mess/N, intd/N and todo/N with their names are on stable
storage before write() returns, and todo/N is linked only once the files are.
"""

from __future__ import annotations

import collections
import contextlib
import grp
import itertools
import os
import pwd
import stat
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from qmqpd import commit
from qmqpd.commit import ROUND_STEPS, CommitError, GroupCommit, unsupported
from qmqpd.errors import PermanentError, TemporaryError
from qmqpd.fsio import write_all
from qmqpd.message import FrozenRecord, Record

if TYPE_CHECKING:
    from qmqpd.message import Message

# qmail-queue's limit: an address of this many bytes or more gets exit 11.
ADDRESS_LIMIT = 1003
FILE_MODE = 0o644
PID_ATTEMPTS = 20
# Recipients joined at once when the envelope is built.
JOIN_BATCH = 4096

# Exit codes (IndiMail's qmail.h names); the injector turns them into replies.
EXIT_TOO_LONG = 11
EXIT_WRITE = 53
EXIT_READ = 54
EXIT_QUEUE_DIR = 61
EXIT_FSYNC = 64
EXIT_INTD = 65
EXIT_TODO = 66
EXIT_LINK_MESS = 67
EXIT_SYNCDIR = 69
EXIT_PID_FILE = 70
EXIT_ENVELOPE = 91

LAYOUTS = ("flat", "split")
COMMIT_MODES = ("each", "syncfs")

# The steps of Queue.write in order, as passed to on_step: after "todo_linked" the message
# is committed (qmail-send may take it); before it, the writer removes what it made.
COMMIT_STEPS = ("pid_created", "mess_linked", "pid_unlinked", "message_written",
                "intd_created", "envelope_written", "files_syncing", "files_synced",
                "todo_linked", "todo_synced")
# The same with COMMIT_MODE=syncfs: a writer waits for a round twice (files, then todo/N),
# and is either covered by another writer's round or leads one (see qmqpd/commit.py).
GROUP_COMMIT_STEPS = (COMMIT_STEPS[:6] + tuple(f"files_{step}" for step in ROUND_STEPS)
                      + ("todo_linked",) + tuple(f"todo_{step}" for step in ROUND_STEPS))

_sequence = itertools.count(1)


class QueueError(TemporaryError):
    """A failed queue write: the qmail-queue exit code and why."""

    def __init__(self, exit_code: int, reason: str) -> None:
        super().__init__(f"{reason} (exit {exit_code})")
        self.exit_code = exit_code
        self.reason = reason


class QueueSetupError(PermanentError):
    """A queue directory that cannot be created or fixed."""


def envelope_records(sender: bytes, recipients: list[bytes]) -> bytes:
    """`F<sender>\\0` and `T<rcpt>\\0` per recipient: the envelope as qmail-queue reads it
    on fd 1 (then one more NUL) and as its todo file holds it (after u and p).

    Built with joins over batches of recipients (no objects per recipient; bytes.join
    holds a buffer descriptor per item, so batches bound that too): linear in the
    envelope's size with a small constant.
    """
    parts = [b"F%s\0" % sender]
    for start in range(0, len(recipients), JOIN_BATCH):
        parts.append(b"T" + b"\0T".join(recipients[start : start + JOIN_BATCH]) + b"\0")
    return b"".join(parts)


def envelope_bytes(sender: bytes, recipients: list[bytes], uid: int, pid: int) -> bytes:
    """The intd/todo file: u, p, F and one T record per recipient, each NUL-terminated."""
    longest = max(len(sender), max(map(len, recipients), default=0))
    if longest >= ADDRESS_LIMIT:
        raise QueueError(EXIT_TOO_LONG, "envelope address too long")
    records = envelope_records(sender, recipients)
    # One NUL ends each record; any other came from an address.
    if records.count(b"\0") != len(recipients) + 1:
        raise QueueError(EXIT_ENVELOPE, "envelope address contains NUL")
    return b"u%d\0p%d\0" % (uid, pid) + records


def commit_unsupported(mode: str) -> str | None:
    """Why this system cannot commit in this COMMIT_MODE, or None when it can."""
    return unsupported() if mode == "syncfs" else None


def _check_layout(todo_layout: str, split: int) -> None:
    if todo_layout not in LAYOUTS:
        raise ValueError(f"todo_layout must be one of {LAYOUTS}, not {todo_layout!r}")
    if split < 1:
        raise ValueError("split must be >= 1")


class Queue:
    """Writes messages into one qmail queue directory."""

    def __init__(self, path: str, split: int = 23, todo_layout: str = "flat",
                 fsync: bool = True, syncdir: bool = True,
                 on_step: Callable[[str], None] | None = None,
                 commit_mode: str = "each") -> None:
        _check_layout(todo_layout, split)
        if commit_mode not in COMMIT_MODES:
            raise ValueError(f"commit_mode must be one of {COMMIT_MODES}, not {commit_mode!r}")
        self.path = path
        self.split = split
        self.todo_layout = todo_layout
        self.fsync = fsync
        self.syncdir = syncdir
        self.commit_mode = commit_mode
        # Called with the name of each commit step once it is done (the crash test stops
        # the writer there); see COMMIT_STEPS and GROUP_COMMIT_STEPS.
        self.on_step = on_step
        self._owner: tuple[int, int] | None = None
        # syncfs mode: the shared rounds, when there is anything to sync at all
        self._group = (GroupCommit(path, on_step) if commit_mode == "syncfs"
                       and (fsync or syncdir) else None)
        # Directories fsynced per message, opened once (a worker serves many messages).
        self._dir_fds: dict[str, int] = {}
        self._euid, self._euid_pid = -1, 0

    # -- names ------------------------------------------------------------------------
    def mess_name(self, qid: int) -> str:
        return os.path.join(self.path, "mess", str(qid % self.split), str(qid))

    def intd_name(self, qid: int) -> str:
        return self._todo_style("intd", qid)

    def todo_name(self, qid: int) -> str:
        return self._todo_style("todo", qid)

    def _todo_style(self, top: str, qid: int) -> str:
        if self.todo_layout == "split":
            return os.path.join(self.path, top, str(qid % self.split), str(qid))
        return os.path.join(self.path, top, str(qid))

    # -- writing ----------------------------------------------------------------------
    def write(self, message: Message, uid: int | None = None) -> int:
        """Queue one message; returns its id N. Raises QueueError, leaving nothing behind."""
        envelope = envelope_bytes(message.sender, message.recipients,
                                  os.getuid() if uid is None else uid, commit.pid)
        made: list[str] = []
        try:
            qid = self._write_files(message, envelope, made)
            self._commit(qid, made)
        except BaseException:
            # Also on KeyboardInterrupt or a worker's shutdown signal: no debris.
            _remove_all(made)
            raise
        self.trigger()
        return qid

    def _write_files(self, message: Message, envelope: bytes, made: list[str]) -> int:
        """mess/N and intd/N written and on stable storage (states S2, S3); returns N.

        Every name and byte is written first and synced after, all syncs at once: the
        kernel then serves them with one journal commit instead of one each.
        """
        mess_fd, pid_name = self._create_pid_file()
        intd_fd = -1
        try:
            made.append(pid_name)
            info = os.fstat(mess_fd)
            qid = info.st_ino
            self._fix_file(mess_fd, info)
            self._reached("pid_created")
            mess = self.mess_name(qid)
            _step(EXIT_LINK_MESS, "link pid file to mess", os.link, pid_name, mess)
            made.append(mess)
            self._reached("mess_linked")
            # pid/ names are scratch (qmail-clean removes stale ones): never synced.
            _step(EXIT_PID_FILE, "unlink pid file", os.unlink, pid_name)
            made.remove(pid_name)
            self._reached("pid_unlinked")
            _step(EXIT_WRITE, "write message", message.write_final, mess_fd)
            self._reached("message_written")
            intd_fd = self._create_intd(qid, made)
            self._reached("intd_created")
            _step(EXIT_WRITE, "write envelope", write_all, intd_fd, envelope)
            self._reached("envelope_written")
            if self._group is not None:
                if self.fsync:
                    # Each writer writes its own pages, all at once: the round that
                    # covers them then has only names and inodes left to write.
                    _start_writeback(mess_fd, SYNC_FILE_RANGE_WRITE_AND_WAIT)
                    _start_writeback(intd_fd, SYNC_FILE_RANGE_WRITE_AND_WAIT)
                self._round(EXIT_FSYNC, "files")
            else:
                self._sync_files(mess_fd, intd_fd, os.path.dirname(mess))
                self._reached("files_synced")
        finally:
            os.close(mess_fd)
            if intd_fd >= 0:
                os.close(intd_fd)
        return qid

    def _create_pid_file(self) -> tuple[int, str]:
        pid_dir = os.path.join(self.path, "pid")
        for _ in range(PID_ATTEMPTS):
            name = os.path.join(pid_dir, f"{commit.pid}.{int(time.time())}.{next(_sequence)}")
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             FILE_MODE)
            except FileExistsError:
                continue
            except OSError as exc:
                code = EXIT_QUEUE_DIR if not os.path.isdir(self.path) else EXIT_PID_FILE
                raise QueueError(code, f"create pid file {name}: {exc.strerror}") from None
            return fd, name
        raise QueueError(EXIT_PID_FILE, f"no free pid file name in {pid_dir}")

    def _create_intd(self, qid: int, made: list[str]) -> int:
        intd = self.intd_name(qid)
        try:
            fd = os.open(intd, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            raise QueueError(EXIT_INTD, f"create {intd}: {exc.strerror}") from None
        made.append(intd)
        try:
            self._fix_file(fd, os.fstat(fd))
        except OSError as exc:
            os.close(fd)
            raise QueueError(EXIT_INTD, f"fix {intd}: {exc.strerror}") from None
        return fd

    def _sync_files(self, mess_fd: int, intd_fd: int, mess_dir: str) -> None:
        """fdatasync of both files and fsync of mess/N's directory, issued together.

        Write-back of both files is started first, so that their blocks are allocated in
        the same journal transaction as the names; the syncs then wait on one commit.
        No directory sync for intd/N: the commit is the todo/N name of the same inode.
        """
        jobs: list[_SyncJob] = []
        if self.fsync:
            _start_writeback(mess_fd)
            _start_writeback(intd_fd)
            # fdatasync writes the data and the size (all a reader needs), not the
            # timestamps, as IndiMail's USE_FDATASYNC does.
            jobs += [(EXIT_FSYNC, "fdatasync message", os.fdatasync, mess_fd),
                     (EXIT_FSYNC, "fdatasync envelope", os.fdatasync, intd_fd)]
        if self.syncdir:
            jobs.append((EXIT_SYNCDIR, f"fsync directory {mess_dir}", os.fsync,
                         self._dir_fd(mess_dir)))
        _run_together(jobs, lambda: self._reached("files_syncing"))

    def _dir_fd(self, directory: str) -> int:
        """A descriptor of a queue directory, opened on first use and kept."""
        fd = self._dir_fds.get(directory)
        if fd is None:
            try:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as exc:
                raise QueueError(EXIT_SYNCDIR, f"open directory {directory}: "
                                 f"{exc.strerror}") from None
            self._dir_fds[directory] = fd
        return fd

    def _round(self, code: int, phase: str) -> None:
        """Wait for a shared commit round that covers every write made so far."""
        assert self._group is not None
        since = time.monotonic_ns()
        try:
            self._group.durable(since, phase)
        except OSError as exc:
            raise QueueError(code, f"commit round ({phase}): {exc.strerror or exc}") from None
        except CommitError as exc:
            raise QueueError(code, f"commit round ({phase}): {exc}") from None

    def _commit(self, qid: int, made: list[str]) -> None:
        todo = self.todo_name(qid)
        _step(EXIT_TODO, "link intd to todo", os.link, self.intd_name(qid), todo)
        written = list(made)
        made.clear()  # committed: from here on nothing may be removed behind todo/N
        self._reached("todo_linked")
        if not self.syncdir and self._group is None:
            return
        try:
            if self._group is not None:
                self._round(EXIT_SYNCDIR, "todo")
            else:
                directory = os.path.dirname(todo)
                _step(EXIT_SYNCDIR, f"fsync directory {directory}", os.fsync,
                      self._dir_fd(directory))
                self._reached("todo_synced")
        except QueueError:
            # The link is visible but not durable: take it back so the client retries.
            try:
                os.unlink(todo)
            except FileNotFoundError:
                return  # qmail-send already took the message over; it is queued
            made.extend(written)
            raise

    def trigger(self) -> None:
        """Wake qmail-send; with no reader the open fails, which is fine."""
        try:
            fd = os.open(os.path.join(self.path, "lock", "trigger"),
                         os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, b"\0")
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- helpers ----------------------------------------------------------------------
    def _fix_file(self, fd: int, info: os.stat_result) -> None:
        """0644 whatever the umask; owned like the queue when running as root."""
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
        if self._euid_pid != commit.pid:  # once per process: a worker's user is set before
            self._euid, self._euid_pid = os.geteuid(), commit.pid
        if self._euid == 0:
            uid, gid = self._queue_owner()
            if (info.st_uid, info.st_gid) != (uid, gid):
                os.fchown(fd, uid, gid)

    def _queue_owner(self) -> tuple[int, int]:
        if self._owner is None:
            info = os.stat(self.path)
            self._owner = (info.st_uid, info.st_gid)
        return self._owner

    def _reached(self, step: str) -> None:
        if self.on_step is not None:
            self.on_step(step)


def _step(code: int, what: str, func: Callable[..., object], *args: object) -> None:
    try:
        func(*args)
    except OSError as exc:
        detail = exc.strerror or str(exc)
        raise QueueError(code, f"{what}: {detail}") from None


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    import ctypes  # on the first sync only: most of a millisecond of a session's start

    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None  # not Linux: the fdatasync alone does the work
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range: Callable[[int, int, int, int], int] | None = None
_sync_file_range_loaded = False
SYNC_FILE_RANGE_WRITE = 2
# wait for earlier write-back, write, wait for this one: the pages are written (no flush)
SYNC_FILE_RANGE_WRITE_AND_WAIT = 7


def _start_writeback(fd: int, flags: int = SYNC_FILE_RANGE_WRITE) -> None:
    """Start writing the file's pages now (no wait, or with flags = WRITE_AND_WAIT until
    they are written); errors surface at its fdatasync, or at the round's syncfs."""
    global _sync_file_range, _sync_file_range_loaded
    if not _sync_file_range_loaded:
        _sync_file_range = _load_sync_file_range()
        _sync_file_range_loaded = True
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, flags)


# (exit code, what, function, argument) of one sync
_SyncJob = tuple[int, str, Callable[[Any], None], Any]


class _SyncThreads:
    """Threads that run syncs beside the caller.

    Built on threading alone, not concurrent.futures (which imports logging: about 3 ms of
    every `qmqpd session` start-up) nor the queue module: a prefork worker makes this after
    the privilege drop, where it should import nothing its master has not (threading the
    master has).
    """

    def __init__(self, count: int) -> None:
        import threading

        self._event_type = threading.Event
        self._ready = threading.Condition()
        self._jobs: collections.deque[tuple[_SyncJob, _Pending]] = collections.deque()
        for number in range(count):
            threading.Thread(target=self._serve, name=f"qmqpd-sync-{number}",
                             daemon=True).start()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while not self._jobs:
                    self._ready.wait()
                job, pending = self._jobs.popleft()
            try:
                _step(*job)
            except BaseException as error:  # handed to the caller, which raises it
                pending.error = error
            pending.done.set()

    def start(self, job: _SyncJob) -> _Pending:
        pending = _Pending(self._event_type())
        with self._ready:
            self._jobs.append((job, pending))
            self._ready.notify()
        return pending


class _Pending:
    """One sync handed to a thread: ``wait()`` returns its error, or None."""

    __slots__ = ("done", "error")

    def __init__(self, done: Any) -> None:
        self.done = done
        self.error: BaseException | None = None

    def wait(self) -> BaseException | None:
        self.done.wait()
        return self.error


_pool: _SyncThreads | None = None
_pool_pid = 0


def _sync_pool() -> _SyncThreads:
    """Two threads per process, made on first use (a forked worker makes its own)."""
    global _pool, _pool_pid
    if _pool is None or _pool_pid != commit.pid:
        _pool = _SyncThreads(2)
        _pool_pid = commit.pid
    return _pool


def _run_together(jobs: list[_SyncJob], started: Callable[[], None]) -> None:
    """Run the syncs at the same time: all but the last in threads, the last here.

    Waits for every one, even when one fails, so no file is closed under a running sync;
    raises the first failure as a QueueError.
    """
    if not jobs:
        started()
        return
    *others, last = jobs
    running = [_sync_pool().start(job) for job in others]
    errors: list[QueueError] = []
    try:
        started()
        _step(*last)
    except QueueError as error:
        errors.append(error)
    finally:
        outcomes = [pending.wait() for pending in running]
    errors += [error for error in outcomes if isinstance(error, QueueError)]
    for error in outcomes:
        if error is not None and not isinstance(error, QueueError):
            raise error  # anything that is not a QueueError is a bug: let it out
    if errors:
        raise errors[0]


def _remove_all(names: list[str]) -> None:
    for name in reversed(names):
        with contextlib.suppress(OSError):
            os.unlink(name)
    names.clear()


# -- creating a queue (queue-fix) -------------------------------------------------------

class QueueOwners(FrozenRecord):
    """The uids of qmailq, qmails, qmailr and the gid of group qmail."""

    __slots__ = ("gid", "qmailq", "qmailr", "qmails", "source")
    qmailq: int
    qmails: int
    qmailr: int
    gid: int
    source: str

    def __init__(self, qmailq: int, qmails: int, qmailr: int, gid: int,
                 source: str = "given") -> None:
        self._set(qmailq=qmailq, qmails=qmails, qmailr=qmailr, gid=gid, source=source)

    @classmethod
    def current(cls, why: str) -> QueueOwners:
        uid, gid = os.getuid(), os.getgid()
        return cls(uid, uid, uid, gid, f"current user ({why})")

    @classmethod
    def detect(cls) -> QueueOwners:
        """qmail's users when running as root and they exist, else the current user."""
        if os.geteuid() != 0:
            return cls.current("not running as root")
        try:
            return cls(pwd.getpwnam("qmailq").pw_uid, pwd.getpwnam("qmails").pw_uid,
                       pwd.getpwnam("qmailr").pw_uid, grp.getgrnam("qmail").gr_gid,
                       "qmail users")
        except KeyError:
            return cls.current("users qmailq/qmails/qmailr or group qmail not found")


class _Entry(FrozenRecord):
    __slots__ = ("kind", "mode", "name", "owner", "size")
    name: str
    owner: str  # attribute of QueueOwners
    mode: int
    kind: str  # dir, split (dir with <n> subdirs), file, fifo
    size: int

    def __init__(self, name: str, owner: str, mode: int, kind: str = "dir",
                 size: int = 0) -> None:
        self._set(name=name, owner=owner, mode=mode, kind=kind, size=size)


def queue_table(todo_layout: str = "flat") -> list[_Entry]:
    """The directories and files of a qmail queue (qmail-queue.md section 3)."""
    todo_kind = "split" if todo_layout == "split" else "dir"
    return [
        _Entry("", "qmailq", 0o750),
        _Entry("pid", "qmailq", 0o700),
        _Entry("mess", "qmailq", 0o750, "split"),
        _Entry("intd", "qmailq", 0o700, todo_kind),
        _Entry("todo", "qmailq", 0o750, todo_kind),
        _Entry("info", "qmails", 0o700, "split"),
        _Entry("local", "qmails", 0o700, "split"),
        _Entry("remote", "qmails", 0o700, "split"),
        _Entry("bounce", "qmails", 0o700),
        _Entry("lock", "qmailq", 0o750),
        _Entry("lock/sendmutex", "qmails", 0o600, "file"),
        _Entry("lock/tcpto", "qmailr", 0o644, "file", 1024),
        _Entry("lock/trigger", "qmails", 0o622, "fifo"),
    ]


def create_queue(path: str, split: int = 23, todo_layout: str = "flat",
                 owners: QueueOwners | None = None) -> QueueOwners:
    """Create or fix a queue like queue-fix; returns the owners used (with their source)."""
    _check_layout(todo_layout, split)
    owners = owners or QueueOwners.detect()
    if os.path.lexists(path) and not os.path.isdir(path):
        raise QueueSetupError(f"{path}: exists and is not a directory")
    for entry in queue_table(todo_layout):
        target = os.path.join(path, entry.name) if entry.name else path
        uid = getattr(owners, entry.owner)
        try:
            _make_entry(target, entry, uid, owners.gid)
            if entry.kind == "split":
                for n in range(split):
                    _make_entry(os.path.join(target, str(n)), _Entry("", entry.owner, entry.mode),
                                uid, owners.gid)
        except OSError as exc:
            raise QueueSetupError(f"{target}: {exc.strerror or exc}") from None
    return owners


def _make_entry(target: str, entry: _Entry, uid: int, gid: int) -> None:
    if entry.kind in ("dir", "split"):
        if not os.path.lexists(target):
            os.makedirs(target, mode=entry.mode)
        elif not os.path.isdir(target) or os.path.islink(target):
            raise QueueSetupError(f"{target}: exists and is not a directory")
    elif entry.kind == "fifo":
        if os.path.lexists(target) and not stat.S_ISFIFO(os.lstat(target).st_mode):
            raise QueueSetupError(f"{target}: exists and is not a FIFO")
        if not os.path.lexists(target):
            os.mkfifo(target, entry.mode)
    elif not os.path.lexists(target):
        with open(target, "xb") as handle:
            handle.write(b"\0" * entry.size)
    elif not os.path.isfile(target) or os.path.islink(target):
        raise QueueSetupError(f"{target}: exists and is not a regular file")
    info = os.lstat(target)
    if stat.S_IMODE(info.st_mode) != entry.mode:
        os.chmod(target, entry.mode)
    if (info.st_uid, info.st_gid) != (uid, gid):
        os.chown(target, uid, gid)


# -- readers for operators ------------------------------------------------------------

class QueuedMessage(Record):
    """One message as qmail-send would see it."""

    __slots__ = ("age", "broken", "done", "id", "recipients", "sender", "size", "state")

    def __init__(self, id: int, state: str, sender: bytes | None = None,
                 recipients: list[bytes] | None = None, done: list[bytes] | None = None,
                 size: int | None = None, age: float = 0.0, broken: str = "") -> None:
        self.id = id
        self.state = state  # "todo" (not yet preprocessed) or "queued" (info/ present)
        self.sender = sender
        # still to be delivered; delivered (marked D)
        self.recipients: list[bytes] = [] if recipients is None else recipients
        self.done: list[bytes] = [] if done is None else done
        self.size = size  # bytes of the mess file; None when it is missing
        self.age = age  # seconds since the message file was written
        self.broken = broken  # why qmail-send cannot process it, if it cannot


class QueueStats(Record):
    __slots__ = (
        "broken",
        "intd_leftovers",
        "oldest_age",
        "pid_leftovers",
        "queued",
        "todo",
        "total_bytes",
    )

    def __init__(self, todo: int = 0, queued: int = 0, broken: int = 0,
                 oldest_age: float | None = None, total_bytes: int = 0,
                 pid_leftovers: int = 0, intd_leftovers: int = 0) -> None:
        self.todo = todo
        self.queued = queued
        self.broken = broken
        self.oldest_age = oldest_age
        self.total_bytes = total_bytes
        self.pid_leftovers = pid_leftovers
        self.intd_leftovers = intd_leftovers


def _numeric_entries(directory: str) -> Iterator[tuple[int, str]]:
    """Ids and paths of the pure-decimal names in a directory (others are ignored)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.isascii() and name.isdigit():
            yield int(name), os.path.join(directory, name)


def _scan(path: str, top: str, split: int, is_split: bool) -> dict[int, str]:
    base = os.path.join(path, top)
    if not is_split:
        return dict(_numeric_entries(base))
    found: dict[int, str] = {}
    for n in range(split):
        found.update(_numeric_entries(os.path.join(base, str(n))))
    return found


TODO_RECORDS = "upFT"
DELIVERY_RECORDS = "TD"


def parse_envelope(data: bytes, allowed: str = TODO_RECORDS) -> tuple[dict[str, list[bytes]], str]:
    """Records of a todo (or local/remote) file by qmail-send's rules.

    Returns records by type and a reason when a record type is unknown (an empty record,
    as from an extra trailing NUL, counts as unknown). An unterminated tail is ignored.
    """
    records: dict[str, list[bytes]] = {}
    *complete, _tail = data.split(b"\0")
    for record in complete:
        kind = chr(record[0]) if record else ""
        if not kind or kind not in allowed:
            return records, f"unknown record type {kind!r}"
        records.setdefault(kind, []).append(record[1:])
    return records, ""


def _read(name: str) -> bytes | None:
    try:
        with open(name, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def _describe(path: str, split: int, qid: int, state: str, envelope: str,
              now: float) -> QueuedMessage:
    mess = os.path.join(path, "mess", str(qid % split), str(qid))
    record = QueuedMessage(id=qid, state=state)
    try:
        info = os.stat(mess)
        record.size = info.st_size
        record.age = max(0.0, now - info.st_mtime)
    except FileNotFoundError:
        record.broken = "mess file missing"
    records, reason = parse_envelope(_read(envelope) or b"",
                                     TODO_RECORDS if state == "todo" else "F")
    record.broken = record.broken or reason
    senders = records.get("F", [])
    record.sender = senders[0] if senders else None
    if state == "todo":
        record.recipients = records.get("T", [])
        return record
    for part in ("local", "remote"):
        name = os.path.join(path, part, str(qid % split), str(qid))
        parts, bad = parse_envelope(_read(name) or b"", DELIVERY_RECORDS)
        record.broken = record.broken or bad
        record.recipients += parts.get("T", [])
        record.done += parts.get("D", [])
    return record


class NotAQueue(PermanentError):
    """`qmqpd queue list/stat` on a path that is no qmail queue (exit 100)."""


class QueueUnreadable(TemporaryError):
    """A queue the reader may not look into (exit 111: fix the rights, try again)."""


def reader_layout(path: str) -> Layout:
    """The layout of a queue about to be listed or counted, read from the queue itself;
    NotAQueue or QueueUnreadable with one line saying why."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise NotAQueue(f"{path}: no such directory") from None
    except OSError as error:
        raise QueueUnreadable(f"{path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise NotAQueue(f"{path}: not a directory")
    for name in ("mess", "todo", "info"):
        try:
            os.listdir(os.path.join(path, name))
        except (FileNotFoundError, NotADirectoryError):
            raise NotAQueue(f"{path}: not a qmail queue (no {name}/)") from None
        except OSError as error:
            raise QueueUnreadable(f"{os.path.join(path, name)}: {error.strerror}") from None
    try:
        return detect_layout(path)
    except QueueSetupError as error:
        raise NotAQueue(str(error)) from None


def list_messages(path: str, split: int = 23, todo_layout: str = "flat") -> Iterator[QueuedMessage]:
    """Every message in todo/ (state "todo") or info/ (state "queued"), by id."""
    _check_layout(todo_layout, split)
    now = time.time()
    todo = _scan(path, "todo", split, todo_layout == "split")
    info = _scan(path, "info", split, True)
    for qid in sorted(set(todo) | set(info)):
        if qid in todo:
            # qmail-send redoes a todo entry even if stale info exists; todo wins.
            yield _describe(path, split, qid, "todo", todo[qid], now)
        else:
            yield _describe(path, split, qid, "queued", info[qid], now)


def stat_queue(path: str, split: int = 23, todo_layout: str = "flat") -> QueueStats:
    """Counts for operators, including leftovers of interrupted writers."""
    stats = QueueStats()
    for record in list_messages(path, split, todo_layout):
        if record.state == "todo":
            stats.todo += 1
        else:
            stats.queued += 1
        stats.broken += bool(record.broken)
        stats.total_bytes += record.size or 0
        if record.size is not None and (stats.oldest_age is None or record.age > stats.oldest_age):
            stats.oldest_age = record.age
    with contextlib.suppress(FileNotFoundError):
        stats.pid_leftovers = len(os.listdir(os.path.join(path, "pid")))
    todo = _scan(path, "todo", split, todo_layout == "split")
    intd = _scan(path, "intd", split, todo_layout == "split")
    stats.intd_leftovers = len(set(intd) - set(todo))
    return stats


def free_bytes(path: str) -> int:
    """Space available to unprivileged users on the filesystem holding path."""
    info = os.statvfs(path)
    return info.f_bavail * info.f_frsize



# -- checking a queue before serving (start, HUP, `qmqpd check`) ---------------------------

class Layout(NamedTuple):
    """What a queue directory on disk is laid out with: conf-split and the todo layout."""

    split: int
    todo_layout: str


def _numbered_dirs(directory: str) -> set[int]:
    try:
        names = os.listdir(directory)
    except OSError:
        return set()
    return {int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))}


def detect_layout(path: str) -> Layout:
    """SPLIT from mess/0..mess/N-1, and whether todo/ is split too (IndiMail bigtodo).

    Raises QueueSetupError when path is not a qmail queue (no mess/ of numbered dirs)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise QueueSetupError(f"{path}: {error.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise QueueSetupError(f"{path}: not a directory")
    buckets = _numbered_dirs(os.path.join(path, "mess"))
    if not buckets:
        missing = [name for name in ("mess", "todo", "intd", "pid")
                   if not os.path.isdir(os.path.join(path, name))]
        absent = ", ".join(missing) or "mess/0"
        raise QueueSetupError(f"{path}: not a qmail queue (missing {absent})")
    split = max(buckets) + 1
    # A flat todo/ holds message files (never one named 0): no need to look at them all.
    todo_layout = "split" if os.path.isdir(os.path.join(path, "todo", "0")) else "flat"
    return Layout(split, todo_layout)


def _permits(info: os.stat_result, uid: int, gids: tuple[int, ...], mask: int) -> bool:
    """Whether uid (with groups gids) has the mask bits (2 write, 1 search) on a file with
    this stat, by its mode bits as the kernel judges them (root always has them)."""
    if uid == 0:
        return True
    if info.st_uid == uid:
        bits = info.st_mode >> 6
    elif info.st_gid in gids:
        bits = info.st_mode >> 3
    else:
        bits = info.st_mode
    return bits & mask == mask


def unwritable(path: str, uid: int, gids: tuple[int, ...], todo_layout: str = "flat") -> str | None:
    """The first directory on the writer's way that uid cannot pass or write, described;
    None when it can write every one (or one is missing: the layout check says so).
    Judged by mode bits, so the answer is the same whoever asks (root or the user)."""
    absolute = os.path.abspath(path)
    above, current = [], absolute
    while (parent := os.path.dirname(current)) != current:
        above.append(parent)
        current = parent
    steps = [(directory, 1) for directory in reversed(above)]  # / first: each must be passable
    steps += [(absolute, 1), ("pid", 3), ("mess", 1), (os.path.join("mess", "0"), 3)]
    for top in ("intd", "todo"):
        if todo_layout == "split":
            steps += [(top, 1), (os.path.join(top, "0"), 3)]
        else:
            steps.append((top, 3))
    for name, mask in steps:
        target = os.path.join(absolute, name)
        try:
            info = os.stat(target)
        except FileNotFoundError:
            return None
        except OSError as error:
            return f"{target}: {error.strerror}"
        if not _permits(info, uid, gids, mask):
            return (f"{target} is owned by uid {info.st_uid} gid {info.st_gid} "
                    f"mode {info.st_mode & 0o7777:o}")
    return None
