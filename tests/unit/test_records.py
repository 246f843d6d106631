"""The plain record classes behave as the dataclasses they replace did."""

from __future__ import annotations

import copy
import pickle

import pytest

from qmqpd.filters.base import Verdict
from qmqpd.message import Client, Message, MessageData, Reply
from qmqpd.queue import QueueOwners, QueueStats


def test_frozen_records_compare_hash_and_refuse_assignment() -> None:
    assert Reply("K", "ok") == Reply("K", "ok") and Reply("K", "ok") != Reply("Z", "ok")
    assert hash(Reply("K", "ok")) == hash(Reply("K", "ok"))
    assert Reply("K", "ok") != ("K", "ok")
    with pytest.raises(AttributeError):
        Reply("K", "ok").text = "changed"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del Client().proto  # type: ignore[misc]
    with pytest.raises(ValueError, match="reply status must be K, Z or D"):
        Reply("X", "no")
    assert repr(Reply("D", "no")) == "Reply(status='D', text='no')"


def test_defaults_are_fresh_per_instance() -> None:
    first, second = Client(), Client()
    assert first.rule_env == {} and first.rule_env is not second.rule_env
    assert Verdict("accept").facts is not Verdict("accept").facts
    message = Message(b"a@example.org", [b"b@example.org"], MessageData(b"x"))
    assert message.headers == [] and message.received == b""
    message.prepend_header(b"X-Test: 1")
    assert Message(b"", [], MessageData(b"x")).headers == []


def test_mutable_records_are_unhashable_and_settable() -> None:
    stats = QueueStats()
    stats.todo += 1
    assert stats == QueueStats(todo=1)
    with pytest.raises(TypeError):
        hash(stats)
    with pytest.raises(AttributeError):
        stats.unknown = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("record", [Reply("Z", "later"), QueueOwners(1, 2, 3, 4),
                                    Client(remote_ip="127.0.0.1"), QueueStats(broken=2)])
def test_copy_and_pickle_keep_the_fields(record: object) -> None:
    assert copy.copy(record) == record
    assert copy.deepcopy(record) == record
    assert pickle.loads(pickle.dumps(record)) == record
