"""The independent readers the chaos and fuzz tests judge qmqpd by: they must tell good
from bad themselves, or those tests would prove nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qmqpd.message import Message, MessageData
from qmqpd.queue import Queue, create_queue
from tests import qmqp_oracle as oracle
from tests.queue_oracle import debris_messages, leftover_writer_pid, parse_envelope, scan_queue

GOOD = oracle.build_request(b"Subject: x\n\nhi\n", b"a@example.org", [b"b@example.org"])


@pytest.mark.parametrize(("data", "verdict"), [
    (GOOD, oracle.ACCEPT),
    (GOOD + b"anything after the outer comma", oracle.ACCEPT),
    (b"000" + GOOD, oracle.ACCEPT),  # leading zeros are digits
    (oracle.build_request(b"", b"", [b"r"]), oracle.ACCEPT),  # empty message and sender
    (oracle.build_request(b"m", b"a" * 999, [b"r"]), oracle.ACCEPT),
    (oracle.build_request(b"m", b"a" * 1000, [b"r"]), oracle.BAD_ADDRESS),
    (oracle.build_request(b"m", b"s", [b"r", b"n\0l"]), oracle.BAD_ADDRESS),
    (oracle.build_request(b"m", b"s", []), oracle.NO_RECIPIENTS),
    (GOOD[:-1], oracle.TRUNCATED),
    (GOOD[:10], oracle.TRUNCATED),
    (b"", oracle.TRUNCATED),
    (b"2000000000:", oracle.TRUNCATED),  # nine digits end at 2e8: one more is allowed
    (b"20000000010:", oracle.MALFORMED),  # a digit after a value above 2e8
    (GOOD[:-1] + b";", oracle.MALFORMED),
    (b"%d:" % (int(GOOD.split(b":", 1)[0]) - 1) + GOOD.split(b":", 1)[1], oracle.MALFORMED),
    (b"1a:x,", oracle.MALFORMED),
    (b":,", oracle.MALFORMED),
    (b"0" * 100 + b"1:x,", oracle.MALFORMED),  # more than 100 bytes of outer prefix
    (b"16:5:hello,1:a,2:bc,,", oracle.MALFORMED),  # the last recipient overruns the outer
    (b"15:4:hello,1:a,1:b,,", oracle.MALFORMED),  # an inner length one short
])
def test_request_verdicts(data: bytes, verdict: str) -> None:
    assert oracle.parse_request(data).verdict == verdict


def test_parse_returns_the_parts() -> None:
    parsed = oracle.parse_request(oracle.build_request(b"body,:", b"", [b"x@y", b"z"]))
    assert (parsed.message, parsed.sender, parsed.recipients) == (b"body,:", b"", (b"x@y", b"z"))


def test_received_lines_follow_qmail_qmqpd() -> None:
    lines = oracle.received_lines("127.0.0.9", "mail host_1", 86400 * 31 + 3661.5, 86400 * 31
                                  + 3661.9)
    assert (b"Received: from unknown (127.0.0.9)\n  by mail?host?1 with QMQP; "
            b"1 Feb 1970 01:01:01 -0000\n") in lines
    assert len(lines) == 3  # the second before and after too: clocks are read apart
    assert oracle.split_received(next(iter(lines)) + b"To: x\n\nbody")[1] == b"To: x\n\nbody"
    with pytest.raises(ValueError):
        oracle.split_received(b"To: x\n\nbody")


@pytest.mark.parametrize(("reply", "kind"), [
    (b"10:Kok 1 qp 2,", "K"), (b"3:Zno,", "Z"), (b"2:Dx,", "D"), (b"", "none"),
    (b"10:Kok 1 qp 2", "garbled"), (b"3:Kok 1,", "garbled"), (b"2:Xx,", "garbled"),
])
def test_answer_classes(reply: bytes, kind: str) -> None:
    assert oracle.answer_class(reply) == kind


def test_envelope_rules_of_qmail_send() -> None:
    assert parse_envelope(b"u1\0p2\0Fs\0Ta\0Tb\0") == (1, 2, b"s", (b"a", b"b"))
    assert parse_envelope(b"u1\0p2\0F\0") == (1, 2, b"", ())
    for bad in (b"u1\0p2\0Fs\0Ta\0\0", b"u1\0p2\0Fs\0Ta", b"u1\0p2\0Ta\0Fs\0",
                b"u1\0p2\0Fs\0Fs\0", b"u1\0p2\0Fs\0ea\0", b"p2\0u1\0Fs\0"):
        with pytest.raises(ValueError):
            parse_envelope(bad)


def test_queue_scan_sorts_committed_from_debris(tmp_path: Path) -> None:
    path = str(tmp_path / "queue")
    create_queue(path)
    queue = Queue(path, fsync=False, syncdir=False)
    message = Message(b"s@x", [b"r@y"], MessageData(data=b"To: r@y\n\nhi\n"), b"Received: x\n")
    kept, uncommitted, wrong = (queue.write(message) for _ in range(3))
    os.unlink(queue.todo_name(uncommitted))  # as if killed before the commit
    with open(queue.todo_name(wrong), "ab") as envelope:
        envelope.write(b"\0")  # an empty record: qmail-send would never take it
    # killed between its link to mess/N and the unlink of its pid/ name
    os.link(queue.mess_name(uncommitted), os.path.join(path, "pid", "4242.1.1"))
    scan = scan_queue(path)
    assert [entry.qid for entry in scan.committed] == [kept]
    (entry,) = scan.committed
    assert (entry.sender, entry.recipients, entry.pid) == (b"s@x", (b"r@y",), os.getpid())
    assert entry.stored == b"Received: x\nTo: r@y\n\nhi\n"
    assert len(scan.problems) == 1 and f"todo/{wrong}" in scan.problems[0]
    assert list(scan.intd_leftovers) == [uncommitted]
    assert leftover_writer_pid(scan.intd_leftovers[uncommitted]) == os.getpid()
    assert leftover_writer_pid("4242.1.1") == 4242
    assert list(scan.pid_leftovers) == ["4242.1.1"]
    assert debris_messages(scan) == 1  # three names (pid, mess, intd), one message
