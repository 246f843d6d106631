"""The backlog on its own: counts of a queue of known content (flat and split todo/), the
shared summary and its lock, the verdict of each limit, the least-loaded choice, and the
scanner the master starts (a real child process)."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import pytest

from qmqpd import backlog
from qmqpd.config import load
from qmqpd.queue import create_queue
from tests.serve_process import children
from tests.support import wait_until

SPLIT = 7


def fill(queue: Path, layout: str, ids: range, todo: bool = True, age: float = 0.0) -> None:
    """Empty files with the names qmail-queue gives them (mess/N%split/N, todo/N)."""
    stamp = time.time() - age
    for qid in ids:
        names = [queue / "mess" / str(qid % SPLIT) / str(qid)]
        if todo:
            names.append(queue / "todo" / (f"{qid % SPLIT}/{qid}" if layout == "split"
                                           else str(qid)))
        for name in names:
            name.touch()
            os.utime(name, (stamp, stamp))


class Clocks:
    """A monotonic clock the test moves, and a wall clock that runs that much ahead of the
    real one (the summaries' scan times are real, and a wall clock behind them would make
    every summary look as if it came from the future)."""

    def __init__(self) -> None:
        self.moment, self.ahead = 100.0, 0.0

    def advance(self, seconds: float) -> None:
        self.moment += seconds
        self.ahead += seconds

    def watch(self, queue: Path, interval: float) -> backlog.Watch:
        return backlog.Watch([str(queue)], SPLIT, "flat", interval,
                             clock=lambda: self.moment, wall=lambda: time.time() + self.ahead)


def make_queue(tmp_path: Path, layout: str = "flat", name: str = "queue") -> Path:
    queue = tmp_path / name
    create_queue(str(queue), split=SPLIT, todo_layout=layout)
    return queue


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_scan_counts_a_queue_of_known_content(tmp_path: Path, layout: str) -> None:
    queue = make_queue(tmp_path, layout)
    fill(queue, layout, range(100, 130), todo=False, age=600)  # taken by qmail-send
    fill(queue, layout, range(200, 205), age=90)
    fill(queue, layout, range(300, 310))
    (queue / "todo" / ("0" if layout == "split" else "") / "not-a-number").touch()
    found = backlog.scan(str(queue), SPLIT, layout)
    assert (found.todo, found.messages) == (15, 45)
    now = time.time()
    assert 89 <= found.todo_age(now) <= 95
    assert 599 <= found.message_age(now) <= 605
    empty = backlog.scan(str(make_queue(tmp_path, layout, "empty")), SPLIT, layout)
    assert (empty.todo, empty.messages, empty.todo_age(now), empty.message_age(now)) == (
        0, 0, 0.0, 0.0)


def test_the_summary_round_trips_and_a_torn_one_is_none(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    fill(queue, "flat", range(10, 13))
    scanned = backlog.scan(str(queue), SPLIT)
    backlog.write_summary(scanned)
    assert backlog.read_summary(str(queue)) == scanned._replace(
        scanned=round(scanned.scanned, 3), oldest_todo=round(scanned.oldest_todo or 0, 3),
        oldest_message=round(scanned.oldest_message or 0, 3),
        seconds=round(scanned.seconds, 6))
    text = backlog.format_summary(scanned)
    assert backlog.parse_summary(str(queue), text[: len(text) // 2]) is None
    assert backlog.parse_summary(str(queue), "something else\n") is None


def test_one_process_scans_while_the_others_read(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    fill(queue, "flat", range(10, 14))
    first = backlog.refresh(str(queue), SPLIT, "flat", 60)
    assert first is not None and first.todo == 4
    fill(queue, "flat", range(20, 30))
    # fresh: the summary is the answer, nothing rescanned
    assert backlog.refresh(str(queue), SPLIT, "flat", 60) == backlog.read_summary(str(queue))
    # stale, but another process holds the lock: its last summary is the answer
    holder = os.open(queue / backlog.LOCK_NAME, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert backlog.refresh(str(queue), SPLIT, "flat", 0.001).todo == 4  # type: ignore[union-attr]
    finally:
        os.close(holder)
    past_duty = first.scanned + backlog.SCAN_DUTY * first.seconds + 0.01
    assert backlog.refresh(str(queue), SPLIT, "flat", 0.001,  # type: ignore[union-attr]
                           past_duty).todo == 14


def test_a_slow_scan_is_not_repeated_sooner_than_its_duty_cycle() -> None:
    now = 1000.0
    quick = backlog.Backlog("/q", now - 6, 0, None, 0, None, seconds=0.01)
    slow = backlog.Backlog("/q", now - 6, 0, None, 0, None, seconds=1.0)
    assert not backlog.fresh(quick, 5, now)
    assert backlog.fresh(slow, 5, now)  # 1 s scans: at most one per 10 s
    assert not backlog.fresh(None, 5, now)


def test_the_watch_rereads_at_most_once_a_second(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    clocks = Clocks()
    watch = clocks.watch(queue, 2)
    assert watch.all()[0].todo == 0  # type: ignore[union-attr]
    fill(queue, "flat", range(10, 13))
    clocks.advance(0.3)
    assert watch.all()[0].todo == 0  # type: ignore[union-attr]  # read 0.3 s ago: cached
    clocks.advance(backlog.RECHECK_SECONDS)
    assert watch.all()[0].todo == 0  # type: ignore[union-attr]  # reread, still fresh
    clocks.advance(1.0)
    assert watch.all()[0].todo == 3  # type: ignore[union-attr]  # 2 s old: rescanned
    off = load(environ={"QUEUEDIR": str(queue), "QUEUE_SCAN_INTERVAL": "0"})
    assert backlog.Watch.from_config(off, [str(queue)]) is None


def test_the_watch_counts_its_own_mail_until_the_next_scan(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    clocks = Clocks()
    watch = clocks.watch(queue, 60)
    assert watch.backlog(str(queue)).todo == 0  # type: ignore[union-attr]
    for _ in range(3):
        watch.queued(str(queue))
    assert watch.backlog(str(queue)).todo == 3  # type: ignore[union-attr]
    fill(queue, "flat", range(10, 15))
    backlog.write_summary(backlog.scan(str(queue), SPLIT))  # another process rescanned
    clocks.advance(backlog.RECHECK_SECONDS)
    assert watch.backlog(str(queue)).todo == 5  # type: ignore[union-attr]


def test_a_long_scan_runs_aside_and_the_session_goes_on(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    fill(queue, "flat", range(10, 16))
    # the last scan took 2 s and was 30 s ago: stale, and too long to run in a session
    backlog.write_summary(backlog.Backlog(str(queue), time.time() - 30, 1, None, 1, None,
                                          seconds=2.0))
    watch = backlog.Watch([str(queue)], SPLIT, "flat", 5)
    started = time.monotonic()
    assert watch.backlog(str(queue)).todo == 1  # type: ignore[union-attr]  # the stale one
    assert time.monotonic() - started < 0.05
    assert len(watch._children) == 1
    wait_until(lambda: getattr(backlog.read_summary(str(queue)), "todo", None) == 6, 30,
               "the scanner aside to write its summary")

    def reaped() -> bool:
        watch._reap()
        return not watch._children

    wait_until(reaped, 30, "the worker to reap its scanner")


def test_every_process_counts_the_mail_of_all_since_the_scan(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    clocks = Clocks()
    one, other = (clocks.watch(queue, 60) for _ in range(2))
    assert one.backlog(str(queue)).todo == 0  # type: ignore[union-attr]
    for _ in range(3):
        one.queued(str(queue))
    for _ in range(2):
        other.queued(str(queue))
    assert one.backlog(str(queue)).todo == 5  # type: ignore[union-attr]
    assert other.backlog(str(queue)).todo == 5  # type: ignore[union-attr]
    # a scan past TALLY_RESET empties the tally and starts counting from there
    with open(queue / backlog.TALLY_NAME, "ab") as tally:
        tally.write(b"." * backlog.TALLY_RESET)
    fill(queue, "flat", range(10, 17))
    last = backlog.read_summary(str(queue))
    assert last is not None
    past_duty = last.scanned + backlog.SCAN_DUTY * last.seconds + 0.01
    scanned = backlog.refresh(str(queue), SPLIT, "flat", 0.000001, past_duty)
    assert scanned is not None and (scanned.todo, scanned.counted) == (7, 0)
    clocks.advance(backlog.RECHECK_SECONDS)
    one.queued(str(queue))
    assert one.backlog(str(queue)).todo == 8  # type: ignore[union-attr]


LIMITS = backlog.Limits(max_todo=100, max_todo_age=600, max_messages=1000, soft_todo=50,
                        flow_delay=0.5, stuck_age=60)
NOW = 10_000.0


def queue_state(todo: int, todo_age: float = 0.0, messages: int = 0) -> backlog.Backlog:
    return backlog.Backlog("/q", NOW, todo, NOW - todo_age if todo else None, messages,
                           None)


def test_each_limit_gives_its_verdict() -> None:
    assert backlog.verdict(queue_state(10), LIMITS, NOW) == backlog.Flow()
    assert backlog.verdict(queue_state(60), LIMITS, NOW) == backlog.Flow(delay=0.5)
    assert "QUEUE_MAX_TODO 100" in backlog.verdict(queue_state(101), LIMITS, NOW).refusal
    assert "QUEUE_MAX_TODO_AGE" in backlog.verdict(queue_state(1, 700), LIMITS, NOW).refusal
    assert "QUEUE_MAX_MESSAGES" in backlog.verdict(queue_state(0, 0, 1001), LIMITS,
                                                   NOW).refusal
    assert backlog.verdict(None, LIMITS, NOW) == backlog.Flow()  # unknown: never a Z
    assert backlog.verdict(queue_state(10**6, 10**6, 10**7), backlog.Limits(), NOW) == (
        backlog.Flow())


def first(indexes: list[int]) -> int:
    return indexes[0]


def test_least_loaded_avoids_full_and_stuck_queues() -> None:
    def choose(*states: backlog.Backlog | None, limits: backlog.Limits = LIMITS) -> list[int]:
        chosen: list[list[int]] = []
        backlog.choose(states, limits, NOW, lambda ids: chosen.append(ids) or ids[0])
        return chosen[0]

    assert choose(queue_state(40), queue_state(0), queue_state(90)) == [1]
    assert choose(queue_state(0), queue_state(10), None) == [0, 1, 2]  # near-equal: ties
    # stuck (oldest todo 120 s > 60 s) is avoided even with the smallest count
    assert choose(queue_state(3, 120), queue_state(40)) == [1]
    # over a limit is avoided; a stuck queue with room beats a full one
    assert choose(queue_state(500), queue_state(3, 120)) == [1]
    # every queue full: the least loaded (its verdict then refuses)
    assert choose(queue_state(500), queue_state(300)) == [1]
    # random: any queue with room, whatever the counts or ages (qmail-multi)
    assert choose(queue_state(40, 120), queue_state(0), queue_state(500),
                  limits=LIMITS._replace(choice="random")) == [0, 1]


def test_the_master_starts_a_scanner_for_stale_summaries(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    fill(queue, "flat", range(10, 17))
    config = load(environ={"QUEUEDIR": str(queue), "SPLIT": str(SPLIT),
                           "QUEUE_SCAN_INTERVAL": "30"})
    queues = backlog.watched(config)
    assert list(queues) == [str(queue)]
    before = set(children(os.getpid()))  # a suite's other children (clamd ...) stay
    started = time.monotonic()
    assert backlog.gauges(queues)[0][2] == []  # nothing known yet; a scanner was started
    assert time.monotonic() - started < 0.5  # and not waited for
    assert str(queue) in backlog._spawned
    scanners = set(children(os.getpid())) - before
    assert scanners, "no scanner child was started"
    wait_until(lambda: backlog.read_summary(str(queue)) is not None, 30,
               "the scanner to write its summary")
    for pid in scanners:  # reap the scanner(s), and only them
        os.waitpid(pid, 0)
    rows = {name: values for name, _text, values in backlog.gauges(queues)}
    assert rows["qmqpd_queue_todo_messages"] == [(str(queue), 7)]
    assert rows["qmqpd_queue_messages"] == [(str(queue), 7)]
    assert rows["qmqpd_queue_free_inodes"][0][1] > 0
    off = backlog.watched(load(environ={"QUEUEDIR": str(queue), "QUEUE_SCAN_INTERVAL": "0"}))
    assert backlog.gauges(off) == []


def test_report_scans_when_asked(tmp_path: Path) -> None:
    queue = make_queue(tmp_path)
    fill(queue, "flat", range(10, 12), age=30)
    config = load(environ={"QUEUEDIR": str(queue), "SPLIT": str(SPLIT)})
    (row,) = backlog.report(config)
    assert row["queue"] == str(queue)
    assert (row["todo"], row["messages"]) == (2, 2)
    assert 29 <= float(row["oldest_todo_age"]) <= 35  # type: ignore[arg-type]
    assert int(row["free_bytes"]) > 0 and int(row["free_inodes"]) > 0  # type: ignore[call-overload]


def test_status_shows_each_queue_and_a_missing_one(tmp_path: Path) -> None:
    from qmqpd.status import backlog_lines

    queue = make_queue(tmp_path)
    fill(queue, "flat", range(10, 14), age=90)
    config = load(environ={"QUEUE_BASE": str(tmp_path), "QUEUE_START": "0",
                           "QUEUE_COUNT": "2", "SPLIT": str(SPLIT)})
    os.rename(queue, tmp_path / "queue0")
    lines = backlog_lines(backlog.report(config))
    assert lines[0].startswith(f"queue {tmp_path / 'queue0'}: todo 4 (oldest 1m3"), lines
    assert "4 messages (oldest 1m3" in lines[0]
    assert " inodes free; scanned 0s ago in " in lines[0]
    assert lines[1] == f"queue {tmp_path / 'queue1'}: not a qmail queue (no mess/)"
