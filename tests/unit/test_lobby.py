"""The lobby: one table of phase changes, one function that applies it, and timers whose
memory follows the connections that are open, whatever FIRST_BYTE_TIMEOUT is."""

from __future__ import annotations

import ast
import selectors
import socket
from pathlib import Path

import pytest

from qmqpd import lobby
from qmqpd.limits import DescriptorBudget, Ledger
from qmqpd.lobby import ALLOWED_FROM, TIMER_SLACK, Conn, Lobby, Phase, PhaseError
from qmqpd.message import Client

PHASES = [Phase.NEW, Phase.HEADER, Phase.FIRST, Phase.REQUEST, Phase.WAITING, Phase.LINGER,
          Phase.GONE]


@pytest.mark.parametrize("old", PHASES)
@pytest.mark.parametrize("new", PHASES)
def test_change_follows_the_table(old: str, new: str) -> None:
    a, b = socket.socketpair()
    try:
        conn = Conn(a, ("127.0.0.1", 1), 0.0, phase=old)
        if old in ALLOWED_FROM[new]:
            Lobby._change(conn, new)
            assert conn.phase == new
        else:
            with pytest.raises(PhaseError):
                Lobby._change(conn, new)
            assert conn.phase == old
    finally:
        a.close()
        b.close()


def test_every_phase_has_a_way_out_and_gone_is_final() -> None:
    assert all(phase in ALLOWED_FROM[Phase.GONE] for phase in PHASES if phase != Phase.GONE)
    assert all(Phase.GONE not in before for before in ALLOWED_FROM.values())


def test_no_phase_assigned_outside_change() -> None:
    tree = ast.parse(Path(lobby.__file__).read_text())
    where = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr == "phase":
                        where.append(func.name)
    assert where == ["_change"]


def test_timers_do_not_outlive_their_connections() -> None:
    """3,000 clients that connect and leave at once, FIRST_BYTE_TIMEOUT 900 s: the timer
    heap stays within twice what is open (plus a little), every lease comes back."""
    selector = selectors.DefaultSelector()
    ledger = Ledger(10)
    hall = Lobby(selector, ledger, DescriptorBudget(4096, 10))
    hall.configure(900.0, 60.0, hall.budget)
    listener = socket.create_server(("127.0.0.1", 0))
    kept = []
    try:
        for n in range(3000):
            client = socket.create_connection(listener.getsockname())
            sock, peer = listener.accept()
            lease = ledger.admit(peer[0], 0)
            assert lease is not None
            facts = Client(remote_ip=peer[0], remote_port=str(peer[1]), local_ip="127.0.0.1",
                           local_port="628", local_host="test", proto="TCP", rule_env={})
            hall.enter(sock, peer, lease, facts, 512, 20.0, float(n))
            if n % 100 == 0:
                kept.append(client)  # a few stay open and silent
                continue
            client.close()
            (conn,) = [c for c in hall.conns if c.sock is sock]
            hall.readable(conn, float(n))  # it closed before sending: dropped
            assert len(hall.timers) <= 2 * (hall.held() + 1) + TIMER_SLACK  # at its last push
        assert hall.held() == len(kept) == 30
        assert ledger.per_ip.count("127.0.0.1") == 30
        hall.close_all("test over")
        assert ledger.idle() and hall.held() == 0
    finally:
        for client in kept:
            client.close()
        listener.close()
        selector.close()


def test_a_refused_connection_lingers_without_its_lease() -> None:
    """Too slow, answered Z, lingering, closed: its lease is given back once, not twice."""
    selector = selectors.DefaultSelector()
    ledger = Ledger(10)
    hall = Lobby(selector, ledger, DescriptorBudget(4096, 10))
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        client = socket.create_connection(listener.getsockname())
        client.sendall(b"100000:partial")
        sock, peer = listener.accept()
        lease = ledger.admit(peer[0], 0)
        assert lease is not None
        facts = Client(remote_ip=peer[0], remote_port=str(peer[1]), local_ip="127.0.0.1",
                       local_port="628", local_host="test", proto="TCP", rule_env={})
        hall.enter(sock, peer, lease, facts, 512, 0.0, 0.0)
        events = hall.expire(100.0)  # far past the MIN_RATE deadline: Z, then linger
        assert [event.result for event in events] == ["too_slow"]
        assert ledger.idle() and len(hall.lingering) == 1
        hall.expire(200.0)  # the linger ends
        assert hall.held() == 0 and ledger.double_releases == 0
        client.settimeout(5)
        assert b"Zconnection too slow" in client.recv(200)
        client.close()
    finally:
        listener.close()
        selector.close()
