"""Group commit of one queue: concurrent writers share their syncs (COMMIT_MODE=syncfs).

Owns the shared commit round of one queue directory. Called by qmqpd/queue.py's writer,
twice per message: once its files are written (mess/N, intd/N and their names), and once
todo/N is linked. Never touches a message's files or names itself.

A round is `syncfs` of the queue's filesystem followed by `fsync` of the queue directory.
syncfs writes back every dirty page and inode of the filesystem and (ext4 and XFS with a
journal) commits the journal; the fsync after it issues one more cache flush where
syncfs does not end with one (ext4 without a journal writes its last metadata blocks
after its flush), and costs nothing where the journal commit already flushed. Every write
that returned before the round started is then on stable storage.

One writer at a time leads a round, holding an flock on lock/qmqpd-commit (a file of the
queue's own lock/ directory, which qmail-send ignores). A writer that wants its writes
durable notes the time (CLOCK_MONOTONIC, one clock for every process of the machine)
after its last write, then takes the lock: if the last round recorded in the file started
after that time, its writes are covered and it goes on; otherwise it leads a round itself
and records it. While a round runs, the writers that finished in the meantime wait on the
lock, and the next round covers all of them at once: the flushes per message fall as
concurrency rises.

What a crash can do: a writer killed anywhere leaves the lock free (flock dies with its
descriptor) and the record as it was; a leader killed before it records its round leaves
the record of the round before, so whoever waited leads again. The record carries the
boot id, so a round of an earlier boot never covers a write of this one, and the start of
the last failed round: a writer whose writes a failed round covered fails too (syncfs
reports writeback errors of the whole filesystem, Linux 5.8 and later).

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

LOCK_NAME = os.path.join("lock", "qmqpd-commit")
# boot id (16 bytes), start of the last good round, start of the last failed round (ns)
_RECORD = struct.Struct("=16sQQ")
# The steps of one wait, as passed to on_step: a writer waits for the lock; it is then
# either covered by a round that started after its writes, or it leads one (syncs, then
# records it).
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


class CommitError(Exception):
    """A round that failed, or one that covered this writer and failed: nothing is durable."""


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            text = handle.read().strip()
        return bytes.fromhex(text.replace(b"-", b"").decode())
    except (OSError, ValueError):
        return b"\0" * 16  # not Linux: every round is led (nothing is ever covered)


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
        self._lock_fd = -1
        self._dir_fd = -1
        self._pid = 0
        self._boot = b""
        self._syncfs: Callable[[int], None] | None = None

    def _open(self) -> None:
        if self._pid == os.getpid() and self._lock_fd >= 0:
            return
        self._lock_fd = -1
        self._dir_fd = -1
        dir_fd = os.open(self.queue_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lock_fd = os.open(os.path.join(self.queue_path, LOCK_NAME),
                              os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            os.close(dir_fd)
            raise
        if self._syncfs is None:
            reason = unsupported()
            if reason is not None:
                os.close(lock_fd)
                os.close(dir_fd)
                raise CommitError(reason)
            self._syncfs = _load_syncfs()
            self._boot = _boot_id()
        self._dir_fd, self._lock_fd, self._pid = dir_fd, lock_fd, os.getpid()

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in (self._lock_fd, self._dir_fd):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        self._lock_fd = self._dir_fd = -1
        self._pid = 0

    def durable(self, since: int, phase: str = "") -> None:
        """Return once every write that returned before monotonic_ns() == since is on
        stable storage; raise OSError or CommitError when that cannot be said."""
        self._open()
        prefix = f"{phase}_" if phase else ""
        self._reached(prefix + "waiting")
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            boot, good, failed = self._read()
            if boot == self._boot and failed > since:
                raise CommitError("a commit round covering this message failed")
            if boot == self._boot and good > since:
                self._reached(prefix + "covered")
                return
            self._reached(prefix + "leading")
            started = time.monotonic_ns()
            try:
                assert self._syncfs is not None
                self._syncfs(self._dir_fd)
                os.fsync(self._dir_fd)
            except OSError:
                self._write(self._boot, good if boot == self._boot else 0, started)
                raise
            self._reached(prefix + "synced")
            self._write(self._boot, started, failed if boot == self._boot else 0)
            self._reached(prefix + "recorded")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _read(self) -> tuple[bytes, int, int]:
        data = os.pread(self._lock_fd, _RECORD.size, 0)
        if len(data) != _RECORD.size:
            return b"", 0, 0
        boot, good, failed = _RECORD.unpack(data)
        return boot, good, failed

    def _write(self, boot: bytes, good: int, failed: int) -> None:
        os.pwrite(self._lock_fd, _RECORD.pack(boot, good, failed), 0)

    def _reached(self, step: str) -> None:
        if self.on_step is not None:
            self.on_step(step)
