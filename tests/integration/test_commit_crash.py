"""The queue commit under kill -9: a writer process killed at any step of Queue.write leaves
either nothing committed or one complete message, never a half-written one that qmail-send
would pick up; and the syscalls run in the order the contract needs.

The writer runs in its own process. It is stopped at each step either by its on_step
callback (it tells the test, then waits to be killed with SIGKILL) or by strace, which
delivers SIGKILL on entry to the n-th call of a sync or link system call. The queue is
then read by the rules qmail-send follows (written here from the queue format, not with
qmqpd's own readers).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmqpd.queue import COMMIT_STEPS, create_queue

SPLIT = 23
SENDER = b"crash@example.org"
RECIPIENTS = [b"one@example.net", b"two@example.net"]
BODY = b"Subject: crash test\n\n" + b"0123456789abcdef\n" * 400  # several pages
STOP_TIMEOUT = 30.0  # generous: only bounds a hung child on a loaded machine

WRITER = textwrap.dedent("""\
    import os, sys, time
    from qmqpd.message import Message, MessageData
    from qmqpd.queue import Queue

    queue, stop_at, report = sys.argv[1], sys.argv[2], int(sys.argv[3])
    body = open(sys.argv[4], "rb").read()

    def on_step(step):
        if step == stop_at:
            os.write(report, step.encode() + b"\\n")
            time.sleep(600)  # the test kills this process here

    message = Message(%r, %r, MessageData(data=body))
    Queue(queue, on_step=on_step).write(message)
    os.write(report, b"done\\n")
""") % (SENDER, RECIPIENTS)


# -- a queue reader by qmail-send's rules --------------------------------------------------
@dataclass
class Committed:
    qid: int
    sender: bytes
    recipients: list[bytes]
    message: bytes


def read_like_qmail_send(queue: Path) -> list[Committed]:
    """Every message qmail-send would take from todo/; fails on one it could not process.

    qmail-send looks only at pure-decimal names in todo/, reads todo/N as NUL-terminated
    records of type u, p, F (exactly one, first of F/T) and T, and needs
    mess/<N mod split>/N. intd/N must be the same inode (qmail-clean removes both names).
    """
    found = []
    for name in sorted(os.listdir(queue / "todo")):
        if not (name.isascii() and name.isdigit()):
            continue
        qid = int(name)
        todo = queue / "todo" / name
        data = todo.read_bytes()
        assert data.endswith(b"\0"), f"todo/{name}: unterminated record in {data!r}"
        records = data[:-1].split(b"\0")
        kinds = [record[:1] for record in records]
        assert all(kind in (b"u", b"p", b"F", b"T") for kind in kinds), \
            f"todo/{name}: unknown record type in {data!r}"
        assert kinds.count(b"F") == 1, f"todo/{name}: wants one F record: {data!r}"
        first_t = kinds.index(b"T") if b"T" in kinds else len(kinds)
        assert kinds.index(b"F") < first_t, f"todo/{name}: T before F"
        mess = queue / "mess" / str(qid % SPLIT) / name
        assert mess.exists(), f"todo/{name} without mess file"
        assert os.stat(mess).st_ino == qid, f"mess/{name} is not inode {qid}"
        intd = queue / "intd" / name
        assert intd.exists() and os.stat(intd).st_ino == os.stat(todo).st_ino, \
            f"todo/{name} and intd/{name} are not one file"
        found.append(Committed(
            qid, records[kinds.index(b"F")][1:],
            [record[1:] for record in records if record[:1] == b"T"], mess.read_bytes()))
    return found


def assert_nothing_or_complete(queue: Path, expect_committed: bool) -> None:
    committed = read_like_qmail_send(queue)
    if not expect_committed:
        assert committed == []
        return
    assert len(committed) == 1
    message = committed[0]
    assert (message.sender, message.recipients) == (SENDER, RECIPIENTS)
    assert message.message == BODY, "committed message is not complete"


# -- running a writer and killing it ----------------------------------------------------------
def _writer_command(queue: Path, stop_at: str, report: int, body: Path) -> list[str]:
    return [sys.executable, "-c", WRITER, str(queue), stop_at, str(report), str(body)]


def _read_line(fd: int, timeout: float) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"writer said nothing in {timeout:.0f}s (so far {data!r})"
        chunk = os.read(fd, 100)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def queue(tmp_path: Path) -> Path:
    path = tmp_path / "queue"
    create_queue(str(path), split=SPLIT)
    (tmp_path / "body").write_bytes(BODY)
    return path


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_kill_at_each_step_leaves_nothing_or_a_complete_message(queue: Path, step: str) -> None:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        _writer_command(queue, step, write_end, queue.parent / "body"), pass_fds=(write_end,))
    os.close(write_end)
    try:
        line = _read_line(read_end, STOP_TIMEOUT)
        assert line == step.encode() + b"\n", line
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(STOP_TIMEOUT) == -signal.SIGKILL
    finally:
        os.close(read_end)
        if process.poll() is None:
            process.kill()
            process.wait()
    # The commit point is the todo/N link: before it nothing, from it a whole message.
    committed = COMMIT_STEPS.index(step) >= COMMIT_STEPS.index("todo_linked")
    assert_nothing_or_complete(queue, committed)


def test_a_writer_that_finishes_commits_one_message(queue: Path) -> None:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        _writer_command(queue, "none", write_end, queue.parent / "body"), pass_fds=(write_end,))
    os.close(write_end)
    try:
        assert _read_line(read_end, STOP_TIMEOUT) == b"done\n"
        assert process.wait(STOP_TIMEOUT) == 0
    finally:
        os.close(read_end)
    assert_nothing_or_complete(queue, expect_committed=True)
    assert os.listdir(queue / "pid") == []


# -- the same at the system call, without the callback ----------------------------------------
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")


@needs_strace
@pytest.mark.parametrize(("syscall", "nth", "committed"), [
    ("link", 1, False),             # pid name → mess/N
    ("sync_file_range", 1, False),  # both files written, no sync yet
    ("fdatasync", 1, False),        # the file syncs, running in their threads
    ("link", 2, False),             # everything synced, todo/N not yet linked
    ("fsync", 2, True),             # todo/N linked, todo/ not yet synced
])
def test_sigkill_at_a_system_call(queue: Path, syscall: str, nth: int, committed: bool) -> None:
    """strace delivers SIGKILL on entry to the nth call (per thread), before it runs."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", os.devnull,
         "-e", f"inject={syscall}:signal=SIGKILL:when={nth}",
         *_writer_command(queue, "none", write_end, queue.parent / "body")],
        pass_fds=(write_end,))
    os.close(write_end)
    try:
        assert process.wait(STOP_TIMEOUT) == -signal.SIGKILL  # strace dies as its tracee did
        assert os.read(read_end, 100) == b"", "the writer finished: the kill missed its step"
    finally:
        os.close(read_end)
        if process.poll() is None:
            process.kill()
            process.wait()
    assert_nothing_or_complete(queue, committed)


@needs_strace
def test_every_sync_finishes_before_the_todo_link(queue: Path, tmp_path: Path) -> None:
    """strace -f of one write: fdatasync of mess/N and intd/N and fsync of mess/N's
    directory all return before link(intd/N, todo/N); the fsync of todo/ comes after it."""
    trace = tmp_path / "trace"
    read_end, write_end = os.pipe()
    subprocess.run(
        ["strace", "-f", "-y", "-qq", "-o", str(trace),
         "-e", "trace=fsync,fdatasync,sync_file_range,link",
         *_writer_command(queue, "none", write_end, queue.parent / "body")],
        pass_fds=(write_end,), check=True, timeout=STOP_TIMEOUT)
    os.close(write_end)
    os.close(read_end)
    [message] = read_like_qmail_send(queue)
    qid = str(message.qid)
    mess = f"mess/{message.qid % SPLIT}/{qid}"
    lines = trace.read_text().splitlines()

    def returned(call: str, target: str) -> int:
        """Index of the line where call on target returned 0 (`-y` names the fd's file)."""
        pid_of_call = None
        for index, line in enumerate(lines):
            pid, rest = line.split(None, 1)  # strace pads short pids with spaces
            if rest.startswith(f"{call}(") and target in rest:
                if re.search(r"= 0$", rest):
                    return index
                pid_of_call = pid
            elif pid == pid_of_call and rest.startswith(f"<... {call} resumed>"):
                assert rest.endswith("= 0"), rest
                return index
        raise AssertionError(f"no {call} of {target} in:\n" + "\n".join(lines))

    todo_link = returned("link", f"/todo/{qid}\"")
    # the message's fd was opened under its pid name; -y shows that name, now deleted
    [pid_name] = [found for line in lines
                  for found in re.findall(rf'link\("([^"]+)", "[^"]+/{mess}"', line)]
    assert returned("fdatasync", f"{pid_name}>") < todo_link
    assert returned("fdatasync", f"/intd/{qid}>") < todo_link
    assert returned("fsync", f"/mess/{message.qid % SPLIT}>") < todo_link
    assert returned("link", f"/{mess}\"") < returned("sync_file_range", f"/intd/{qid}>")
    assert returned("fsync", "/todo>") > todo_link
