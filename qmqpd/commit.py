"""Group commit of one queue: concurrent writers share their syncs (COMMIT_MODE=syncfs).

Owns the shared commit rounds of one queue directory. Called by qmqpd/queue.py's writer,
twice per message: once its files are written (mess/N, intd/N and their names), and once
todo/N is linked. Never touches a message's files or names itself.

A round is `syncfs` of the queue's filesystem followed by `fsync` of the queue directory.
syncfs writes back every dirty page and inode of the filesystem and (ext4 and XFS with a
journal) commits the journal; the fsync after it issues one more cache flush where
syncfs does not end with one (ext4 without a journal writes its last metadata blocks
after its flush), and costs nothing where the journal commit already flushed. Every write
that returned before the round started is then on stable storage.

One writer at a time leads a round. A writer that wants its writes durable notes the time
(CLOCK_MONOTONIC, one clock for every process of the machine) after its last write and
reads the record in lock/qmqpd-commit (a file of the queue's own lock/ directory, which
qmail-send ignores) under an flock held only for that: if the last good round started
after that time, its writes are covered and it goes on; if a round is running, it waits
for its end and looks again; otherwise it leads the next round. The leader of round k
holds lock/qmqpd-round<k % 2> for the whole round, and its waiters wait on a shared lock
of that file: they all wake at its end, while the next round runs on the other file. The
writers that finish while a round runs are all covered by the next one: the flushes per
message fall as concurrency rises.

What a crash can do: a writer killed anywhere leaves the locks free (an flock dies with
its descriptor); a leader killed before it records its round leaves the record of the
round before, and a round marked running whose lock is free counts as abandoned, so
whoever waited leads again. The record carries the boot id, so a round of an earlier boot
never covers a write of this one, and the start of the last failed round: a writer whose
writes a failed round covered fails too (syncfs reports write-back errors of the whole
filesystem from Linux 5.8 on).

Conditions: every writer of the queue runs on one kernel (one boot id, one monotonic
clock: not a queue shared over a network filesystem, which qmail does not support either)
and in one time namespace; the round syncs the whole filesystem, so it costs little only
where the queue's filesystem holds little else that is written at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from qmqpd.errors import TemporaryError

# The record of the rounds (and its lock), and the two locks a round's leader holds: round
# k holds lock k % 2, so the waiters of one round wake while the next one runs.
RECORD_NAME = os.path.join("lock", "qmqpd-commit")
ROUND_NAMES = (os.path.join("lock", "qmqpd-round0"), os.path.join("lock", "qmqpd-round1"))
# boot id (16 bytes); start of the last good round, start of the last failed round, end of
# the last round, the average length of a round (ns); the number of the last round started,
# the number of the round running (0: none); the pid that led the last one
_RECORD = struct.Struct("=16sQQQQQQI")
# Longest a leader waits for other writers to join its round (see _gather).
GATHER_LIMIT_NS = 2_000_000
# The steps of one wait, as passed to on_step: a writer waits; it is then either covered
# by a round that started after its writes, or it leads one (syncs, then records it).
ROUND_STEPS = ("waiting", "covered", "leading", "synced", "recorded")


def unsupported() -> str | None:
    """Why this system cannot keep syncfs mode's promise, or None when it can."""
    import platform

    if platform.system() != "Linux":
        return "syncfs commits need Linux"
    release = platform.release().split("-")[0].split(".")
    try:
        version = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        return f"cannot read the kernel version {platform.release()!r}"
    if version < (5, 8):
        return (f"Linux {platform.release()}: syncfs reports write-back errors from 5.8 on; "
                "use COMMIT_MODE=each")
    return None


# This process's pid, kept current over fork (descriptors are reopened in a child); the
# queue writer reads it too: no getpid call per message.
pid = os.getpid()


def _forked() -> None:
    global pid
    pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


class _Round(NamedTuple):
    """The record in lock/qmqpd-commit: what the last rounds were."""

    boot: bytes
    good: int  # start of the last round that succeeded
    failed: int  # start of the last round that failed
    ended: int  # end of the last round
    average: int  # average length of a round
    number: int  # number of the last round started
    running: int  # number of the round running, 0 when none is
    leader: int  # pid that led the last round


class CommitError(TemporaryError):
    """A round that failed, or one that covered this writer and failed: nothing is durable."""


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            text = handle.read().strip()
        return bytes.fromhex(text.replace(b"-", b"").decode())
    except (OSError, ValueError):
        return b"\0" * 16


def _load_syncfs() -> Callable[[int], None]:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    function = libc.syncfs
    function.argtypes = (ctypes.c_int,)
    function.restype = ctypes.c_int

    def syncfs(fd: int) -> None:
        if function(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))
    return syncfs


class GroupCommit:
    """The commit rounds of one queue, as seen from one process.

    Descriptors are opened on first use in each process (an flock is held by an open file
    description: descriptors inherited over fork would not exclude each other)."""

    def __init__(self, queue_path: str,
                 on_step: Callable[[str], None] | None = None) -> None:
        self.queue_path = queue_path
        self.on_step = on_step
        self._record_fd = self._dir_fd = -1
        self._round_fds: tuple[int, ...] = ()
        self._pid = 0
        self._boot = b""
        self._syncfs: Callable[[int], None] | None = None

    def _open(self) -> None:
        if self._pid == pid:
            return
        self._pid = 0
        opened: list[int] = []
        try:
            opened.append(os.open(self.queue_path,
                                  os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            for name in (RECORD_NAME, *ROUND_NAMES):
                opened.append(os.open(os.path.join(self.queue_path, name),
                                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            if self._syncfs is None:
                reason = unsupported()
                if reason is not None:
                    raise CommitError(reason)
                self._syncfs = _load_syncfs()
                self._boot = _boot_id()
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        self._dir_fd, self._record_fd, *rounds = opened
        self._round_fds = tuple(rounds)
        self._pid = pid

    def close(self) -> None:
        if self._pid == pid:
            for fd in (self._record_fd, *self._round_fds, self._dir_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._record_fd = self._dir_fd = -1
        self._round_fds = ()
        self._pid = 0

    def durable(self, since: int, phase: str = "") -> None:
        """Return once every write that returned before monotonic_ns() == since is on
        stable storage; raise OSError or CommitError when that cannot be said."""
        self._open()
        prefix = f"{phase}_" if phase else ""
        self._reached(prefix + "waiting")
        waited_for = 0
        while True:
            fcntl.flock(self._record_fd, fcntl.LOCK_EX)
            try:
                last = self._read()
                if last.failed > since:
                    raise CommitError("a commit round covering this message failed")
                if last.good > since:
                    wait_on = -1
                elif last.running and (last.running != waited_for or
                                       not self._abandoned(last)):
                    # (still running after a wait on it: its leader may be gone)
                    wait_on = self._round_fds[last.running % 2]
                    waited_for = last.running
                else:
                    number = last.number + 1
                    wait_on = self._round_fds[number % 2]
                    # held by no leader (the round before ran on the other lock), at most
                    # by a waiter of the round before that, for a moment
                    fcntl.flock(wait_on, fcntl.LOCK_EX)
                    last = last._replace(number=number, running=number)
                    self._write(last)
                    break
            finally:
                fcntl.flock(self._record_fd, fcntl.LOCK_UN)
            if wait_on < 0:
                self._reached(prefix + "covered")
                return
            # a round is running: wait for its end (a killed leader's lock ends with it)
            fcntl.flock(wait_on, fcntl.LOCK_SH)
            fcntl.flock(wait_on, fcntl.LOCK_UN)
        try:
            self._lead(last, prefix)
        finally:
            fcntl.flock(wait_on, fcntl.LOCK_UN)

    def _abandoned(self, last: _Round) -> bool:
        """Whether the round the record calls running lost its leader (killed): its lock
        is free. Called holding the record lock, which a leader holds to start a round."""
        lock = self._round_fds[last.running % 2]
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its leader holds it (or a waiter, for a moment: looked at again)
        fcntl.flock(lock, fcntl.LOCK_UN)
        return True

    def _lead(self, last: _Round, prefix: str) -> None:
        """One round, holding its round lock: every write that returned before it started
        (the writers waiting on it, and this one) is durable when it is recorded."""
        self._reached(prefix + "leading")
        self._gather(last)
        started = time.monotonic_ns()
        try:
            assert self._syncfs is not None
            self._syncfs(self._dir_fd)
            os.fsync(self._dir_fd)
        except OSError:
            self._update(failed=started, running=0)
            raise
        self._reached(prefix + "synced")
        ended = time.monotonic_ns()
        length = ended - started
        average = (last.average * 7 + length) // 8 if last.average else length
        self._update(good=started, ended=ended, average=average, leader=pid, running=0)
        self._reached(prefix + "recorded")

    def _gather(self, last: _Round) -> None:
        """When another process led the last round, other writers are at work: wait, up
        to one average round (at most GATHER_LIMIT_NS) after the last one ended, so that
        those about to finish join this round instead of paying for the next (jbd2 waits
        the same way before a commit). A lone writer never waits."""
        if last.leader in (0, pid):
            return
        pause = min(last.average, GATHER_LIMIT_NS) - (time.monotonic_ns() - last.ended)
        if pause > 0:
            time.sleep(pause / 1e9)

    def _update(self, **changes: int) -> None:
        fcntl.flock(self._record_fd, fcntl.LOCK_EX)
        try:
            self._write(self._read()._replace(**changes))
        finally:
            fcntl.flock(self._record_fd, fcntl.LOCK_UN)

    def _read(self) -> _Round:
        data = os.pread(self._record_fd, _RECORD.size, 0)
        if len(data) == _RECORD.size:
            last = _Round(*_RECORD.unpack(data))
            if last.boot == self._boot:
                return last
        # none yet, or one from an earlier boot (its clock readings mean nothing now)
        return _Round(self._boot, 0, 0, 0, 0, 0, 0, 0)

    def _write(self, record: _Round) -> None:
        os.pwrite(self._record_fd, _RECORD.pack(*record), 0)

    def _reached(self, step: str) -> None:
        if self.on_step is not None:
            self.on_step(step)
