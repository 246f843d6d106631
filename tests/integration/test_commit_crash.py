"""The queue commit under kill -9: a writer process killed at any step of Queue.write leaves
either nothing committed or one complete message, never a half-written one that qmail-send
would pick up; and the syscalls run in the order the contract needs. The same for the
shared path of COMMIT_MODE=syncfs: a writer killed while it waits for a commit round, and
the writer leading a round killed at each of its steps while others wait on it; the others
go on, and every one that finished (a K) has its whole message in the queue.

The writer runs in its own process. It is stopped at each step either by its on_step
callback (it tells the test, then waits to be killed with SIGKILL or told to go on) or by
strace, which delivers SIGKILL on entry to the n-th call of a sync or link system call.
The queue is then read by the rules qmail-send follows (written here from the queue
format, not with qmqpd's own readers).
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
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmqpd.queue import COMMIT_STEPS, GROUP_COMMIT_STEPS, create_queue

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
    mode, go, sender = sys.argv[5], int(sys.argv[6]), sys.argv[7].encode()

    def on_step(step):
        if step in stop_at.split(","):
            os.write(report, step.encode() + b"\\n")
            if go < 0:
                time.sleep(600)  # the test kills this process here
            os.read(go, 1)  # ... or tells it to go on
        elif go >= 0:
            os.write(report, step.encode() + b"\\n")

    message = Message(sender, %r, MessageData(data=body))
    Queue(queue, on_step=on_step, commit_mode=mode).write(message)
    os.write(report, b"done\\n")
""") % (RECIPIENTS,)


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
    assert_committed(queue, [SENDER] if expect_committed else [])


def assert_committed(queue: Path, senders: list[bytes]) -> None:
    """Exactly these writers' messages are committed, each one whole."""
    committed = read_like_qmail_send(queue)
    assert sorted(message.sender for message in committed) == sorted(senders)
    for message in committed:
        assert message.recipients == RECIPIENTS
        assert message.message == BODY, "committed message is not complete"


# -- running a writer and killing it ----------------------------------------------------------
def _writer_command(queue: Path, stop_at: str, report: int, body: Path, mode: str = "each",
                    go: int = -1, sender: bytes = SENDER) -> list[str]:
    return [sys.executable, "-c", WRITER, str(queue), stop_at, str(report), str(body), mode,
            str(go), sender.decode()]


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


# A lone writer leads every round itself: it never reaches "covered".
STEPS = ([("each", step) for step in COMMIT_STEPS]
         + [("syncfs", step) for step in GROUP_COMMIT_STEPS if not step.endswith("_covered")])


@pytest.mark.parametrize(("mode", "step"), STEPS)
def test_kill_at_each_step_leaves_nothing_or_a_complete_message(queue: Path, mode: str,
                                                                 step: str) -> None:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        _writer_command(queue, step, write_end, queue.parent / "body", mode),
        pass_fds=(write_end,))
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
    steps = COMMIT_STEPS if mode == "each" else GROUP_COMMIT_STEPS
    committed = steps.index(step) >= steps.index("todo_linked")
    assert_nothing_or_complete(queue, committed)


@pytest.mark.parametrize("mode", ["each", "syncfs"])
def test_a_writer_that_finishes_commits_one_message(queue: Path, mode: str) -> None:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        _writer_command(queue, "none", write_end, queue.parent / "body", mode),
        pass_fds=(write_end,))
    os.close(write_end)
    try:
        assert _read_line(read_end, STOP_TIMEOUT) == b"done\n"
        assert process.wait(STOP_TIMEOUT) == 0
    finally:
        os.close(read_end)
    assert_nothing_or_complete(queue, expect_committed=True)
    assert os.listdir(queue / "pid") == []


# -- the shared path: writers waiting on a round, and the leader of a round -------------------
class Writer:
    """A syncfs-mode writer in its own process that reports every step on a pipe and stops
    at one step until told to go on (or killed)."""

    def __init__(self, queue: Path, name: str, stop_at: str = "none") -> None:
        self.sender = f"{name}@example.org".encode()
        self.steps: list[str] = []
        self.report, report_w = os.pipe()
        go_r, self._go = os.pipe()
        self.process = subprocess.Popen(
            _writer_command(queue, stop_at, report_w, queue.parent / "body", "syncfs", go_r,
                            self.sender), pass_fds=(report_w, go_r))
        os.close(report_w)
        os.close(go_r)
        self._pending = b""

    def wait_for(self, step: str) -> None:
        """Until the writer said it reached step (or finished: step "done")."""
        while step not in self.steps:
            ready, _, _ = select.select([self.report], [], [], STOP_TIMEOUT)
            assert ready, f"{self.sender!r} said nothing in {STOP_TIMEOUT:.0f}s: {self.steps}"
            assert self.read_steps(), f"{self.sender!r} ended before {step}: {self.steps}"

    def read_steps(self) -> bool:
        """Take in what the writer said (it must have said something); False at its end."""
        chunk = os.read(self.report, 4096)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        self.steps += [line.decode() for line in lines]
        return bool(chunk)

    def go_on(self) -> None:
        os.write(self._go, b"g")

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        assert self.process.wait(STOP_TIMEOUT) == -signal.SIGKILL

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.report)
        os.close(self._go)


@pytest.fixture
def writers() -> list[Writer]:
    started: list[Writer] = []
    yield started
    for writer in started:
        writer.close()


LEADER_STEPS = [step for step in GROUP_COMMIT_STEPS
                if step.split("_", 1)[1] in ("leading", "synced", "recorded")]


@pytest.mark.parametrize("step", LEADER_STEPS)
def test_a_leader_killed_at_each_step_leaves_the_waiting_writers_whole(
        queue: Path, writers: list[Writer], step: str) -> None:
    """The leader holds the round's lock at each of these steps: two writers finish their
    files meanwhile and wait on it. Killed, it frees the lock; one of them leads, both
    finish with their whole message, and the leader's message is there only if it had
    linked todo/N (whole then too)."""
    leader = Writer(queue, "leader", stop_at=step)
    writers.append(leader)
    leader.wait_for(step)
    others = [Writer(queue, f"waiter{n}") for n in range(2)]
    writers.extend(others)
    for other in others:
        other.wait_for("files_waiting")
    leader.kill()
    for other in others:
        other.wait_for("done")
        assert other.process.wait(STOP_TIMEOUT) == 0
    # one of the waiters led the next round; the other was covered by it or led its own
    assert any("files_leading" in other.steps for other in others)
    expected = [other.sender for other in others]
    if step.startswith("todo_"):
        expected.append(leader.sender)
    assert_committed(queue, expected)


def _stopped_at(writers: list[Writer], phase: str) -> tuple[Writer, Writer]:
    """The one of two writers that stopped leading a round of this phase (holding its
    lock) and the other, once that one waits on it (its writes then predate the round)."""
    first, second = writers
    while True:
        for leader, other in ((first, second), (second, first)):
            if f"{phase}_leading" in leader.steps and f"{phase}_waiting" in other.steps:
                return leader, other
        ready, _, _ = select.select([first.report, second.report], [], [], STOP_TIMEOUT)
        assert ready, f"no round led: {first.steps} {second.steps}"
        for writer in (first, second):
            if writer.report in ready:
                writer.read_steps()


@pytest.mark.parametrize("step", [f"{phase}_{at}" for phase in ("files", "todo")
                                  for at in ("waiting", "covered")])
def test_a_writer_killed_on_a_round_leaves_the_others_whole(
        queue: Path, writers: list[Writer], step: str) -> None:
    """Two writers: one leads a round (files, or todo after both linked todo/N) and stops
    there holding the lock; the other is killed while it waits on that round, or once the
    round covered it. The leader goes on and finishes whole; the killed one's message is
    there (whole) only if it had linked todo/N."""
    phase = step.split("_")[0]
    stops = f"{phase}_leading,{phase}_covered"
    if phase == "todo":
        stops += ",todo_linked"  # both out of their files rounds before a todo round
    pair = [Writer(queue, f"writer{n}", stop_at=stops) for n in range(2)]
    writers.extend(pair)
    if phase == "todo":
        for writer in pair:
            writer.wait_for("todo_linked")
        for writer in pair:
            writer.go_on()
    leader, victim = _stopped_at(pair, phase)
    if step.endswith("_waiting"):
        victim.kill()
        leader.go_on()
    else:
        leader.go_on()  # its round starts now, after the victim's writes: it covers them
        victim.wait_for(step)
        victim.kill()
    leader.wait_for("done")
    assert leader.process.wait(STOP_TIMEOUT) == 0
    expected = [leader.sender] + ([victim.sender] if phase == "todo" else [])
    assert_committed(queue, expected)


# -- the same at the system call, without the callback ----------------------------------------
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")


@needs_strace
@pytest.mark.parametrize(("mode", "syscall", "nth", "committed"), [
    ("each", "link", 1, False),             # pid name → mess/N
    ("each", "sync_file_range", 1, False),  # both files written, no sync yet
    ("each", "fdatasync", 1, False),        # the file syncs, running in their threads
    ("each", "link", 2, False),             # everything synced, todo/N not yet linked
    ("each", "fsync", 2, True),             # todo/N linked, todo/ not yet synced
    ("syncfs", "sync_file_range", 1, False),  # the message's pages being written back
    ("syncfs", "syncfs", 1, False),         # the files round
    ("syncfs", "fsync", 1, False),          # the files round's flush
    ("syncfs", "link", 2, False),           # files durable, todo/N not yet linked
    ("syncfs", "syncfs", 2, True),          # todo/N linked, its round not yet run
    ("syncfs", "fsync", 2, True),           # the todo round's flush
])
def test_sigkill_at_a_system_call(queue: Path, mode: str, syscall: str, nth: int,
                                  committed: bool) -> None:
    """strace delivers SIGKILL on entry to the nth call (per thread), before it runs."""
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        ["strace", "-f", "-qq", "-o", os.devnull,
         "-e", f"inject={syscall}:signal=SIGKILL:when={nth}",
         *_writer_command(queue, "none", write_end, queue.parent / "body", mode)],
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


@needs_strace
def test_a_round_finishes_before_the_todo_link_and_another_after_it(queue: Path,
                                                                   tmp_path: Path) -> None:
    """strace -f of one syncfs-mode write: syncfs of the queue's filesystem and fsync of
    the queue directory return before link(intd/N, todo/N); a second pair starts after
    the link and returns before the writer says it is done."""
    trace = tmp_path / "trace"
    read_end, write_end = os.pipe()
    subprocess.run(
        ["strace", "-f", "-y", "-qq", "-o", str(trace),
         "-e", "trace=syncfs,fsync,link,write",
         *_writer_command(queue, "none", write_end, queue.parent / "body", "syncfs")],
        pass_fds=(write_end,), check=True, timeout=STOP_TIMEOUT)
    os.close(write_end)
    os.close(read_end)
    [message] = read_like_qmail_send(queue)
    lines = [line.split(None, 1)[1] for line in trace.read_text().splitlines()]
    calls = [(index, line) for index, line in enumerate(lines)
             if line.startswith(("syncfs(", "fsync(")) or f"/todo/{message.qid}" in line
             or (line.startswith("write(") and "done" in line)]
    kinds = [line.split("(")[0] for _index, line in calls]
    assert kinds == ["syncfs", "fsync", "link", "syncfs", "fsync", "write"], calls
    assert all(line.endswith("= 0") for _index, line in calls[:5]), calls
    assert all(f"{queue}>" in line for _index, line in calls[:5] if "sync" in line), calls


# -- many writers, killed at random ----------------------------------------------------------
STRESS = textwrap.dedent("""\
    import os, sys
    from qmqpd.message import Message, MessageData
    from qmqpd.queue import Queue

    queue, report, name = sys.argv[1], int(sys.argv[2]), sys.argv[4]
    body = open(sys.argv[3], "rb").read()
    writer = Queue(queue, commit_mode="syncfs")
    for number in range(10**6):
        sender = f"{name}.{number}@example.org".encode()
        writer.write(Message(sender, %r, MessageData(data=body)))
        os.write(report, sender + b"\\n")  # acknowledged: a K would go out now
""") % (RECIPIENTS,)


def test_writers_killed_at_random_lose_no_acknowledged_message(queue: Path) -> None:
    """Six syncfs writers in a loop; every few milliseconds one that is writing (it has
    acknowledged a message) is killed (SIGKILL) wherever it is, and replaced, for a few
    seconds: every message a writer acknowledged is in the queue whole, nothing committed
    is half-written, and the writers left go on (no round is left held)."""
    import random

    pending: dict[int, bytes] = {}  # report pipe -> unfinished line
    processes: dict[int, subprocess.Popen[bytes]] = {}
    writing: set[int] = set()  # report pipes of writers that acknowledged a message
    acknowledged: list[bytes] = []
    started = killed = 0

    def start() -> None:
        nonlocal started
        read_end, write_end = os.pipe()
        processes[read_end] = subprocess.Popen(
            [sys.executable, "-c", STRESS, str(queue), str(write_end),
             str(queue.parent / "body"), f"w{started}"], pass_fds=(write_end,))
        os.close(write_end)
        pending[read_end] = b""
        started += 1

    def collect(read_end: int) -> bytes:
        chunk = os.read(read_end, 65536)
        *lines, pending[read_end] = (pending[read_end] + chunk).split(b"\n")
        acknowledged.extend(lines)
        if lines:
            writing.add(read_end)
        return chunk

    def stop(read_end: int) -> None:
        processes.pop(read_end).kill()
        while collect(read_end):  # what it said before it died counts
            pass
        os.close(read_end)
        writing.discard(read_end)

    chooser = random.Random(18)
    try:
        for _ in range(6):
            start()
        deadline = time.monotonic() + 6.0
        while time.monotonic() < deadline:
            ready, _, _ = select.select(list(processes), [], [], chooser.uniform(0.005, 0.03))
            for read_end in ready:
                collect(read_end)
            if writing:
                stop(chooser.choice(sorted(writing)))
                killed += 1
                start()
        # the writers left must still get their messages through: no round left held
        before = len(acknowledged)
        progress = time.monotonic() + STOP_TIMEOUT
        while len(acknowledged) < before + 12 and time.monotonic() < progress:
            ready, _, _ = select.select(list(processes), [], [], 1.0)
            for read_end in ready:
                collect(read_end)
        assert len(acknowledged) >= before + 12, "the writers stopped making progress"
    finally:
        for read_end in list(processes):
            stop(read_end)
    assert killed >= 10, f"only {killed} writers were killed while writing"
    committed = {message.sender: message for message in read_like_qmail_send(queue)}
    for message in committed.values():
        assert message.recipients == RECIPIENTS
        assert message.message == BODY, f"{message.sender!r} committed half-written"
    lost = [sender for sender in acknowledged if sender not in committed]
    assert not lost, f"acknowledged but not in the queue: {lost[:5]}"
