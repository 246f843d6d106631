"""The native queue writer against the on-disk format qmail-send reads."""

from __future__ import annotations

import os
import resource
import signal
import stat
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmqpd import commit
from qmqpd.message import Message, MessageData
from qmqpd.queue import (
    GROUP_COMMIT_STEPS,
    Queue,
    QueueError,
    QueueOwners,
    QueueSetupError,
    commit_unsupported,
    create_queue,
    envelope_bytes,
    free_bytes,
    list_messages,
    parse_envelope,
    stat_queue,
)

RECEIVED = b"Received: from unknown (127.0.0.1)\n  by test with QMQP; 1 Jan 2025 00:00:00 -0000\n"
BODY = b"Subject: hello\n\nbody line\n"


def make_message(body: bytes = BODY, sender: bytes = b"a@example.org",
                 recipients: list[bytes] | None = None) -> Message:
    message = Message(sender, recipients if recipients is not None else [b"b@example.net"],
                      MessageData(data=body), received=RECEIVED)
    return message


def files_under(root: Path, *tops: str) -> list[str]:
    found = []
    for top in tops:
        for dirpath, _dirs, names in os.walk(root / top):
            found += [os.path.join(dirpath, name) for name in names]
    return sorted(found)


@pytest.fixture
def queue_dir(tmp_path: Path) -> Path:
    path = tmp_path / "queue"
    create_queue(str(path))
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- create_queue ----------------------------------------------------------------------

def test_create_queue_has_every_dir_with_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "q"
    create_queue(str(path), split=23)
    expected = {"": 0o750, "pid": 0o700, "mess": 0o750, "intd": 0o700, "todo": 0o750,
                "info": 0o700, "local": 0o700, "remote": 0o700, "bounce": 0o700, "lock": 0o750}
    for name, wanted in expected.items():
        assert (path / name).is_dir(), name
        assert mode(path / name) == wanted, name
    for top in ("mess", "info", "local", "remote"):
        assert sorted(os.listdir(path / top), key=int) == [str(n) for n in range(23)]
        assert mode(path / top / "22") == expected[top]
    assert os.listdir(path / "todo") == [] and os.listdir(path / "intd") == []
    assert stat.S_ISFIFO(os.lstat(path / "lock/trigger").st_mode)
    assert mode(path / "lock/trigger") == 0o622
    assert mode(path / "lock/sendmutex") == 0o600
    assert mode(path / "lock/tcpto") == 0o644
    assert (path / "lock/tcpto").stat().st_size == 1024


def test_create_queue_split_todo_layout(tmp_path: Path) -> None:
    path = tmp_path / "q"
    create_queue(str(path), split=5, todo_layout="split")
    for top in ("todo", "intd", "mess"):
        assert sorted(os.listdir(path / top)) == ["0", "1", "2", "3", "4"]
    assert mode(path / "intd/3") == 0o700
    assert mode(path / "todo/3") == 0o750


def test_create_queue_fixes_an_existing_queue(tmp_path: Path) -> None:
    path = tmp_path / "q"
    create_queue(str(path))
    os.chmod(path / "pid", 0o777)
    os.chmod(path / "lock/trigger", 0o600)
    os.rmdir(path / "mess/7")
    create_queue(str(path))
    assert mode(path / "pid") == 0o700
    assert mode(path / "lock/trigger") == 0o622
    assert (path / "mess/7").is_dir()


def test_create_queue_owners_reported(tmp_path: Path) -> None:
    owners = create_queue(str(tmp_path / "q"))
    assert owners.source  # says whose files these are
    info = os.stat(tmp_path / "q" / "pid")
    assert (info.st_uid, info.st_gid) == (owners.qmailq, owners.gid)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_create_queue_chowns_to_given_owners(tmp_path: Path) -> None:
    owners = QueueOwners(qmailq=1001, qmails=1002, qmailr=1003, gid=1004)
    path = tmp_path / "q"
    create_queue(str(path), owners=owners)
    assert (os.stat(path / "mess/3").st_uid, os.stat(path / "mess/3").st_gid) == (1001, 1004)
    assert os.stat(path / "info/3").st_uid == 1002
    assert os.stat(path / "lock/tcpto").st_uid == 1003
    assert os.stat(path / "lock/trigger").st_uid == 1002
    # The writer, as root, gives its files the queue's owners.
    qid = Queue(str(path)).write(make_message())
    mess = os.stat(Queue(str(path)).mess_name(qid))
    assert (mess.st_uid, mess.st_gid) == (1001, 1004)


def test_create_queue_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_bytes(b"x")
    with pytest.raises(QueueSetupError, match="not a directory"):
        create_queue(str(target))


def test_create_queue_refuses_a_file_where_a_dir_belongs(tmp_path: Path) -> None:
    path = tmp_path / "q"
    path.mkdir()
    (path / "todo").write_bytes(b"")
    with pytest.raises(QueueSetupError, match="todo"):
        create_queue(str(path))


# -- the writer ------------------------------------------------------------------------

def test_write_is_byte_exact(queue_dir: Path) -> None:
    message = make_message(recipients=[b"b@example.net", b"c@example.com"])
    message.prepend_header(b"X-Filter: one")
    queue = Queue(str(queue_dir))
    qid = queue.write(message, uid=995)
    mess = queue_dir / "mess" / str(qid % 23) / str(qid)
    assert mess.read_bytes() == b"X-Filter: one\n" + RECEIVED + BODY
    assert os.stat(mess).st_ino == qid
    todo = queue_dir / "todo" / str(qid)
    intd = queue_dir / "intd" / str(qid)
    expected = b"u995\0p%d\0Fa@example.org\0Tb@example.net\0Tc@example.com\0" % os.getpid()
    assert todo.read_bytes() == expected
    assert os.stat(todo).st_ino == os.stat(intd).st_ino
    assert os.stat(todo).st_nlink == 2
    assert mode(mess) == 0o644 and mode(todo) == 0o644
    assert os.listdir(queue_dir / "pid") == []


def test_write_default_uid_and_empty_sender(queue_dir: Path) -> None:
    queue = Queue(str(queue_dir))
    qid = queue.write(make_message(sender=b"", recipients=[]))
    assert (queue_dir / "todo" / str(qid)).read_bytes() == b"u%d\0p%d\0F\0" % (
        os.getuid(), os.getpid())


def test_modes_do_not_depend_on_umask(queue_dir: Path) -> None:
    old = os.umask(0o077)
    try:
        qid = Queue(str(queue_dir)).write(make_message())
    finally:
        os.umask(old)
    assert mode(queue_dir / "mess" / str(qid % 23) / str(qid)) == 0o644
    assert mode(queue_dir / "todo" / str(qid)) == 0o644


@pytest.mark.parametrize("fsync", [True, False])
@pytest.mark.parametrize("syncdir", [True, False])
def test_sync_switches_write_the_same_queue(queue_dir: Path, fsync: bool, syncdir: bool) -> None:
    queue = Queue(str(queue_dir), fsync=fsync, syncdir=syncdir)
    qid = queue.write(make_message())
    assert Path(queue.mess_name(qid)).read_bytes() == RECEIVED + BODY
    assert Path(queue.todo_name(qid)).exists()


@pytest.mark.parametrize("split", [23, 7])
def test_split_todo_layout(tmp_path: Path, split: int) -> None:
    path = tmp_path / "q"
    create_queue(str(path), split=split, todo_layout="split")
    queue = Queue(str(path), split=split, todo_layout="split")
    ids = [queue.write(make_message()) for _ in range(5)]
    for qid in ids:
        bucket = str(qid % split)
        assert (path / "mess" / bucket / str(qid)).read_bytes() == RECEIVED + BODY
        assert (path / "todo" / bucket / str(qid)).exists()
        assert (path / "intd" / bucket / str(qid)).exists()
        assert not (path / "todo" / str(qid)).exists()
    assert len(set(ids)) == 5


def test_flat_layout_with_other_split(tmp_path: Path) -> None:
    path = tmp_path / "q"
    create_queue(str(path), split=3)
    queue = Queue(str(path), split=3)
    qid = queue.write(make_message())
    assert (path / "mess" / str(qid % 3) / str(qid)).exists()
    assert (path / "todo" / str(qid)).exists()


def test_spooled_message_copied_exactly(queue_dir: Path) -> None:
    payload = os.urandom(1 << 20) * 5 + b"tail\n"
    with tempfile.TemporaryFile() as spool:
        spool.write(payload)
        message = Message(b"a@b", [b"c@d"], MessageData(spool=spool), received=RECEIVED)
        queue = Queue(str(queue_dir))
        qid = queue.write(message)
    assert Path(queue.mess_name(qid)).read_bytes() == RECEIVED + payload


def test_address_limit(queue_dir: Path) -> None:
    queue = Queue(str(queue_dir))
    queue.write(make_message(recipients=[b"x" * 1002]))
    with pytest.raises(QueueError) as caught:
        queue.write(make_message(recipients=[b"x" * 1003]))
    assert caught.value.exit_code == 11
    with pytest.raises(QueueError) as caught:
        queue.write(make_message(sender=b"y" * 5000))
    assert caught.value.exit_code == 11
    assert len(files_under(queue_dir, "todo")) == 1
    assert len(files_under(queue_dir, "mess")) == 1


def assert_nothing_written(queue_dir: Path) -> None:
    assert files_under(queue_dir, "pid", "mess", "intd") == []
    todo = queue_dir / "todo"
    assert not todo.is_dir() or files_under(queue_dir, "todo") == []


def test_todo_failure_leaves_nothing(queue_dir: Path) -> None:
    os.rmdir(queue_dir / "todo")
    (queue_dir / "todo").write_bytes(b"")  # a file where the directory must be
    with pytest.raises(QueueError) as caught:
        Queue(str(queue_dir)).write(make_message())
    assert caught.value.exit_code == 66
    assert (queue_dir / "todo").read_bytes() == b""
    assert_nothing_written(queue_dir)


def test_intd_failure_leaves_nothing(queue_dir: Path) -> None:
    os.rmdir(queue_dir / "intd")
    with pytest.raises(QueueError) as caught:
        Queue(str(queue_dir)).write(make_message())
    assert caught.value.exit_code == 65
    assert_nothing_written(queue_dir)


def test_mess_failure_leaves_nothing(queue_dir: Path) -> None:
    for n in range(23):
        os.rmdir(queue_dir / "mess" / str(n))
    with pytest.raises(QueueError) as caught:
        Queue(str(queue_dir)).write(make_message())
    assert caught.value.exit_code == 67
    assert_nothing_written(queue_dir)


def test_missing_queue(tmp_path: Path) -> None:
    with pytest.raises(QueueError) as caught:
        Queue(str(tmp_path / "absent")).write(make_message())
    assert caught.value.exit_code == 61


def test_write_error_mid_message_leaves_nothing(queue_dir: Path) -> None:
    """A real short write (file size limit) half way through the body: 53, no debris."""
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
            Queue(str(queue_dir)).write(make_message(body=b"x" * 300_000))
        except QueueError as exc:
            code = exc.exit_code
        finally:
            os._exit(code)
    _pid, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 53
    assert_nothing_written(queue_dir)


def test_trigger_reaches_a_reader(queue_dir: Path) -> None:
    reader = os.open(queue_dir / "lock/trigger", os.O_RDONLY | os.O_NONBLOCK)
    try:
        Queue(str(queue_dir)).write(make_message())
        assert os.read(reader, 16) == b"\0"
    finally:
        os.close(reader)


def test_trigger_without_reader_is_harmless(queue_dir: Path) -> None:
    qid = Queue(str(queue_dir)).write(make_message())
    assert (queue_dir / "todo" / str(qid)).exists()


# -- readers ---------------------------------------------------------------------------

def test_list_and_stat_a_written_queue(queue_dir: Path) -> None:
    queue = Queue(str(queue_dir))
    first = queue.write(make_message(recipients=[b"one@x", b"two@x"]))
    second = queue.write(make_message(body=b"y" * 1000, sender=b"s2@x"))
    records = {r.id: r for r in list_messages(str(queue_dir))}
    assert set(records) == {first, second}
    assert records[first].state == "todo"
    assert records[first].sender == b"a@example.org"
    assert records[first].recipients == [b"one@x", b"two@x"]
    assert records[first].size == len(RECEIVED + BODY)
    assert records[second].size == len(RECEIVED) + 1000
    assert records[second].sender == b"s2@x"
    assert not records[first].broken and 0 <= records[first].age < 60
    stats = stat_queue(str(queue_dir))
    assert (stats.todo, stats.queued, stats.broken) == (2, 0, 0)
    assert stats.total_bytes == 2 * len(RECEIVED) + len(BODY) + 1000
    assert stats.oldest_age is not None
    assert (stats.pid_leftovers, stats.intd_leftovers) == (0, 0)


def preprocess_like_qmail_send(queue_dir: Path, qid: int) -> None:
    """What qmail-send and qmail-clean do with todo/N: info + local, then clean todo/intd."""
    bucket = str(qid % 23)
    records, _ = parse_envelope((queue_dir / "todo" / str(qid)).read_bytes())
    (queue_dir / "info" / bucket / str(qid)).write_bytes(b"F" + records["F"][0] + b"\0")
    local = b"".join(b"T" + r + b"\0" for r in records["T"])
    (queue_dir / "local" / bucket / str(qid)).write_bytes(b"D" + local[1:])
    os.unlink(queue_dir / "todo" / str(qid))
    os.unlink(queue_dir / "intd" / str(qid))


def test_queued_state_and_leftovers(queue_dir: Path) -> None:
    queue = Queue(str(queue_dir))
    qid = queue.write(make_message(recipients=[b"one@x", b"two@x"]))
    preprocess_like_qmail_send(queue_dir, qid)
    (queue_dir / "pid" / "123.456.1").write_bytes(b"")
    (queue_dir / "intd" / "999999").write_bytes(b"u0\0p1\0Fx\0")
    (queue_dir / "todo" / "notanumber").write_bytes(b"garbage")
    [record] = list(list_messages(str(queue_dir)))
    assert record.state == "queued"
    assert record.sender == b"a@example.org"
    assert record.done == [b"one@x"] and record.recipients == [b"two@x"]
    stats = stat_queue(str(queue_dir))
    assert (stats.todo, stats.queued) == (0, 1)
    assert (stats.pid_leftovers, stats.intd_leftovers) == (1, 1)


def test_broken_envelopes_are_flagged(queue_dir: Path) -> None:
    queue = Queue(str(queue_dir))
    qid = queue.write(make_message())
    todo = queue_dir / "todo" / str(qid)
    os.unlink(todo)
    todo.write_bytes((queue_dir / "intd" / str(qid)).read_bytes() + b"\0")  # extra NUL
    other = queue.write(make_message())
    other_todo = queue_dir / "todo" / str(other)
    os.unlink(other_todo)
    other_todo.write_bytes(b"u0\0p1\0Fa@b\0eextra\0Tc@d\0")  # IndiMail's e record
    records = {r.id: r for r in list_messages(str(queue_dir))}
    assert "unknown record type" in records[qid].broken
    assert "unknown record type 'e'" in records[other].broken
    assert stat_queue(str(queue_dir)).broken == 2


def test_todo_without_mess_is_flagged(queue_dir: Path) -> None:
    qid = Queue(str(queue_dir)).write(make_message())
    os.unlink(queue_dir / "mess" / str(qid % 23) / str(qid))
    [record] = list(list_messages(str(queue_dir)))
    assert record.broken == "mess file missing" and record.size is None


def test_readers_on_split_layout(tmp_path: Path) -> None:
    path = tmp_path / "q"
    create_queue(str(path), split=7, todo_layout="split")
    qid = Queue(str(path), split=7, todo_layout="split").write(make_message())
    [record] = list(list_messages(str(path), split=7, todo_layout="split"))
    assert record.id == qid and record.recipients == [b"b@example.net"]
    assert stat_queue(str(path), split=7, todo_layout="split").todo == 1


def test_free_bytes(tmp_path: Path) -> None:
    info = os.statvfs(tmp_path)
    assert free_bytes(str(tmp_path)) == info.f_bavail * info.f_frsize
    assert free_bytes(str(tmp_path)) > 0


addresses = st.binary(min_size=0, max_size=60).filter(lambda b: b"\0" not in b)


@given(sender=addresses, recipients=st.lists(addresses, max_size=5),
       uid=st.integers(0, 2**31), pid=st.integers(1, 2**22))
def test_envelope_round_trip(sender: bytes, recipients: list[bytes], uid: int, pid: int) -> None:
    data = envelope_bytes(sender, recipients, uid, pid)
    assert data.endswith(b"\0") and not data.endswith(b"\0\0")  # no extra closing NUL
    records, broken = parse_envelope(data)
    assert broken == ""
    assert records["u"] == [str(uid).encode()] and records["p"] == [str(pid).encode()]
    assert records["F"] == [sender]
    assert records.get("T", []) == recipients


def test_envelope_rejects_nul_in_address() -> None:
    with pytest.raises(QueueError) as caught:
        envelope_bytes(b"a\0b", [], 0, 1)
    assert caught.value.exit_code == 91


# -- COMMIT_MODE=syncfs: the shared rounds ---------------------------------------------

def _steps_of(queue_dir: Path, message: Message | None = None) -> tuple[int, list[str]]:
    steps: list[str] = []
    queue = Queue(str(queue_dir), commit_mode="syncfs", on_step=steps.append)
    return queue.write(message or make_message()), steps


def test_syncfs_mode_writes_the_same_queue(queue_dir: Path) -> None:
    message = make_message(recipients=[b"b@example.net", b"c@example.com"])
    qid, steps = _steps_of(queue_dir, message)
    assert (queue_dir / "mess" / str(qid % 23) / str(qid)).read_bytes() == RECEIVED + BODY
    assert (queue_dir / "todo" / str(qid)).read_bytes() == (
        b"u%d\0p%d\0Fa@example.org\0Tb@example.net\0Tc@example.com\0"
        % (os.getuid(), os.getpid()))
    assert os.listdir(queue_dir / "pid") == []
    # a lone writer leads both of its rounds: files first, todo/N linked only after
    assert steps == [step for step in GROUP_COMMIT_STEPS if not step.endswith("_covered")]
    assert (queue_dir / "lock" / "qmqpd-commit").is_file()


def _record(queue_dir: Path, boot: bytes, good: int, failed: int) -> None:
    (queue_dir / "lock" / "qmqpd-commit").write_bytes(
        commit._RECORD.pack(boot, good, failed, 0, 0, 0, 0, 0))


def test_a_failed_round_fails_every_writer_it_covered(queue_dir: Path) -> None:
    """The record says a round that started after this writer's writes failed: its files
    may be lost, so it fails (Z) and takes them back, whatever rounds come after."""
    _record(queue_dir, commit._boot_id(), good=0, failed=time.monotonic_ns() + 10**15)
    with pytest.raises(QueueError) as caught:
        Queue(str(queue_dir), commit_mode="syncfs").write(make_message())
    assert caught.value.exit_code == 64
    assert "failed" in caught.value.reason
    assert_nothing_written(queue_dir)


def test_a_round_of_an_earlier_boot_covers_nothing(queue_dir: Path) -> None:
    """Clocks start again at boot: a record from another boot, however late its round
    looks, does not cover a write of this one; the writer leads its own rounds."""
    _record(queue_dir, b"\x01" * 16, good=time.monotonic_ns() + 10**15, failed=0)
    _qid, steps = _steps_of(queue_dir)
    assert "files_leading" in steps and "todo_leading" in steps
    assert "files_covered" not in steps


def test_a_round_marked_running_without_its_leader_is_taken_over(queue_dir: Path) -> None:
    """A leader killed mid-round leaves the record saying its round runs; its lock is
    free, so the next writer leads instead of waiting for ever."""
    (queue_dir / "lock" / "qmqpd-commit").write_bytes(
        commit._RECORD.pack(commit._boot_id(), 0, 0, 0, 0, 7, 7, 0))
    _qid, steps = _steps_of(queue_dir)
    assert "files_leading" in steps


def test_commit_mode_is_checked() -> None:
    with pytest.raises(ValueError, match="commit_mode"):
        Queue("/nonexistent", commit_mode="sometimes")
    assert commit_unsupported("each") is None
