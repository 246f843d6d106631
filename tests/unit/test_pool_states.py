"""The pool's worker states: one table of allowed changes, one function that applies it,
and no other place that assigns a state."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest

from qmqpd import pool
from qmqpd.pool import ALLOWED_FROM, Pool, State, StateError, Worker


def worker_in(state: State) -> Worker:
    a, b = socket.socketpair()
    b.close()
    worker = Worker(pid=1, channel=a, generation=0, started=0.0, max_requests=0)
    worker.state = state  # a fixture: the state under test, set directly
    a.close()
    return worker


@pytest.mark.parametrize("old", list(State))
@pytest.mark.parametrize("new", list(State))
def test_change_state_follows_the_table(old: State, new: State) -> None:
    worker = worker_in(old)
    if old in ALLOWED_FROM[new]:
        Pool._change_state(worker, new)
        assert worker.state is new
    else:
        with pytest.raises(StateError, match=f"{old.value} -> {new.value}"):
            Pool._change_state(worker, new)
        assert worker.state is old


def test_a_session_ends_only_from_busy_and_nothing_leaves_retiring() -> None:
    assert ALLOWED_FROM[State.BUSY] == {State.IDLE}
    assert all(State.RETIRING not in before for before in ALLOWED_FROM.values())
    assert ALLOWED_FROM[State.STARTING] == frozenset()


def test_no_state_assigned_outside_change_state() -> None:
    tree = ast.parse(Path(pool.__file__).read_text())
    where = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        for node in ast.walk(func):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, ast.AnnAssign | ast.AugAssign) else [])
            for target in targets:
                if isinstance(target, ast.Attribute) and target.attr == "state":
                    where.append(func.name)
    assert where == ["_change_state"]
