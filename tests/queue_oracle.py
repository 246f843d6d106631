"""Read a qmail queue the way qmail-send does, independently of qmqpd's own readers.

A message exists once todo/N exists (the todo link is the commit point). For every pure
decimal name N in todo/, qmail-send reads the envelope todo/N (records u, p, F, T, each
ended by NUL) and needs mess/<N mod split>/N, whose inode number is N. Everything else a
writer leaves (pid/ names, intd/N or mess/N without todo/N) is invisible to qmail-send:
debris of a writer that died before its commit. Nothing here imports qmqpd.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

FILE_MODE = 0o644


@dataclass(frozen=True)
class Committed:
    """One message qmail-send would pick up."""

    qid: int
    uid: int
    pid: int
    sender: bytes
    recipients: tuple[bytes, ...]
    stored: bytes  # the mess file: what will be delivered


@dataclass
class QueueScan:
    committed: list[Committed] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # committed but unusable: a failure
    pid_leftovers: dict[str, int] = field(default_factory=dict)  # pid/ name -> its inode
    intd_leftovers: dict[int, bytes] = field(default_factory=dict)  # intd/N, no todo/N
    mess_leftovers: list[int] = field(default_factory=list)  # mess/N, no todo/N nor intd/N
    delivered_side: list[str] = field(default_factory=list)  # info/local/remote/bounce


def parse_envelope(data: bytes) -> tuple[int, int, bytes, tuple[bytes, ...]]:
    """(uid, pid, sender, recipients) of a committed envelope; ValueError if qmail-send
    would not take it: a record it does not know (an empty one included), no or two F,
    a T before F, or an unterminated last record."""
    if not data.endswith(b"\0"):
        raise ValueError("envelope does not end with NUL")
    records = data[:-1].split(b"\0")
    kinds = [record[:1] for record in records]
    if any(kind not in (b"u", b"p", b"F", b"T") for kind in kinds):
        raise ValueError(f"unknown record type in {kinds}")
    if kinds[:3] != [b"u", b"p", b"F"] or kinds.count(b"F") != 1 or set(kinds[3:]) - {b"T"}:
        raise ValueError(f"records out of order: {kinds}")
    if not records[0][1:].isdigit() or not records[1][1:].isdigit():
        raise ValueError("u or p record is not a number")
    return (int(records[0][1:]), int(records[1][1:]), records[2][1:],
            tuple(record[1:] for record in records[3:]))


def _decimal_names(directory: str) -> list[str]:
    try:
        return [name for name in os.listdir(directory) if name.isascii() and name.isdigit()]
    except FileNotFoundError:
        return []


def _read_regular(path: str) -> tuple[bytes, os.stat_result]:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        chunks = []
        while block := os.read(fd, 1 << 20):
            chunks.append(block)
        return b"".join(chunks), info
    finally:
        os.close(fd)


def scan_queue(path: str, split: int = 23) -> QueueScan:
    """Everything in a flat-todo queue, sorted into committed messages and debris."""
    scan = QueueScan()
    todo = {int(name) for name in _decimal_names(os.path.join(path, "todo"))}
    intd = {int(name) for name in _decimal_names(os.path.join(path, "intd"))}
    mess = {int(name) for n in range(split)
            for name in _decimal_names(os.path.join(path, "mess", str(n)))}
    for qid in sorted(todo):
        try:
            scan.committed.append(_committed(path, split, qid))
        except (OSError, ValueError) as error:
            scan.problems.append(f"todo/{qid}: {error}")
    for qid in sorted(intd - todo):
        scan.intd_leftovers[qid] = _read_regular(os.path.join(path, "intd", str(qid)))[0]
    scan.mess_leftovers = sorted(mess - todo - intd)
    pid_dir = os.path.join(path, "pid")
    scan.pid_leftovers = {name: os.stat(os.path.join(pid_dir, name)).st_ino
                          for name in os.listdir(pid_dir)}
    for part in ("info", "local", "remote"):
        scan.delivered_side += [f"{part}/{n}/{name}" for n in range(split)
                                for name in _decimal_names(os.path.join(path, part, str(n)))]
    scan.delivered_side += [f"bounce/{name}" for name in os.listdir(os.path.join(path, "bounce"))]
    return scan


def debris_messages(scan: QueueScan) -> int:
    """How many uncommitted messages the debris stands for: a writer killed between its
    link to mess/N and the unlink of its pid/ name leaves both names of one inode N."""
    return len(set(scan.pid_leftovers.values()) | set(scan.intd_leftovers)
               | set(scan.mess_leftovers))


def _committed(path: str, split: int, qid: int) -> Committed:
    envelope, todo_info = _read_regular(os.path.join(path, "todo", str(qid)))
    stored, mess_info = _read_regular(os.path.join(path, "mess", str(qid % split), str(qid)))
    if mess_info.st_ino != qid:
        raise ValueError(f"mess file inode {mess_info.st_ino} is not the id")
    for name, info in (("todo", todo_info), ("mess", mess_info)):
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            raise ValueError(f"{name} file mode {oct(info.st_mode)} is not 0644")
    uid, pid, sender, recipients = parse_envelope(envelope)
    return Committed(qid, uid, pid, sender, recipients, stored)


def leftover_writer_pid(name_or_envelope: str | bytes) -> int | None:
    """The writer's pid from a pid/ name (<pid>.<time>.<seq>) or an intd envelope's p
    record; None when it cannot tell (an empty intd file)."""
    if isinstance(name_or_envelope, str):
        head = name_or_envelope.split(".", 1)[0]
        return int(head) if head.isdigit() else None
    for record in name_or_envelope.split(b"\0"):
        if record.startswith(b"p") and record[1:].isdigit():
            return int(record[1:])
    return None
