"""Exact accounting by construction: the real master (in this process, its loop turned by
the test) with real sockets and real forked workers, driven through random sequences of
connects, sessions ending, workers dying mid-session, clients going away and reloads.
After every turn each slot the ledger counts is held by a lease that a connection in the
lobby or a busy worker owns; at the end every counter is back at zero. A slip (a lease
released twice, an exception in the loop) costs a log line or an orderly exit 111, never
a traceback with orphaned workers. The same harness shows that a reload changing PORT
leaves the title and status naming the port bound."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmqpd import config, ipc
from qmqpd import master as master_module
from qmqpd.config import Config
from qmqpd.master import Master
from qmqpd.pool import State

REQUEST = b"3:abc,"
CLIENT_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


def session_worker(channel: socket.socket, _plans: Any) -> None:
    """A worker that reads the request, then does what its client says: e = answer K and
    report done, x = die mid-session; a client that goes away ends the session unanswered.
    It first closes what it inherited from the test process (the clients' own sockets)."""
    keep = channel.fileno()
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)
    ipc.send_ready(channel)
    while True:
        record = ipc.receive(channel)
        if record is None or record.kind is ipc.Kind.RETIRE or record.fd is None:
            return
        with socket.socket(fileno=record.fd) as conn:
            conn.settimeout(30)
            try:
                got = b""
                while len(got) < len(REQUEST):
                    more = conn.recv(len(REQUEST) - len(got))
                    if not more:
                        break
                    got += more
                command = conn.recv(1) if got == REQUEST else b""
            except OSError:
                command = b""
            if command == b"x":
                os._exit(3)
            ipc.send_done(channel, outcome=ipc.Outcome("K" if command == b"e" else ""))
            with contextlib.suppress(OSError):
                conn.sendall(b"1:K,")


class Plans:
    def __init__(self, cfg: Config) -> None:
        self.config = cfg

    def settings(self, env: Mapping[str, str | None]) -> Config:
        return self.config.overlay(dict(env), "rule env")


def make_config(tmp: Path, **extra: str) -> Config:
    env = {"LOCALIP": "127.0.0.1", "PORT": "0", "PREFORK": "2", "MAXDAEMONS": "3",
           "MAXPERIP": "2", "STATUS_FILE": str(tmp / "status.json"), "TIMEOUT": "30",
           "SHUTDOWN_TIMEOUT": "10", **extra}
    return config.load(None, environ=env)


@contextlib.contextmanager
def in_process_master(tmp: Path, entry: Callable[[socket.socket, Any], None] = session_worker,
                      **extra: str) -> Iterator[Master]:
    """A started master whose loop the test turns; its signal handlers, title and
    workers are undone afterwards."""
    saved = {sig: signal.getsignal(sig) for sig in
             (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
    cfg = make_config(tmp, **extra)
    master = Master(cfg, entry, lambda: make_config(tmp, **extra), Plans)
    master.observer.set_title = lambda _title: None
    try:
        master.start()
        yield master
    finally:
        signal.set_wakeup_fd(-1)
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        if master.pool is not None:
            for pid in list(master.pool.workers):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
        master.listeners.close_fds()
        master.lobby.close_fds()
        master.selector.close()
        if master.pool is not None:
            master.pool.selector.close()
        for fd in (master.wakeup_r, master.wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        gc.unfreeze()


def turn_until(master: Master, done: Callable[[], bool], seconds: float = 10.0) -> None:
    stop = time.monotonic() + seconds
    while not done():
        assert time.monotonic() < stop, "the master did not get there in time"
        master.turn()
        check_books(master)


def turns(master: Master, count: int = 5) -> None:
    for _ in range(count):
        master.turn()
        check_books(master)


def check_books(master: Master) -> None:
    """Every slot the ledger counts belongs to a lease someone holds, and no more."""
    assert master.pool is not None
    leases = [conn.lease for conn in master.lobby.conns if conn.lease is not None]
    leases += [w.session for w in master.pool.workers.values() if w.session is not None]
    assert not any(lease.released for lease in leases)
    held = Counter(lease.ip for lease in leases)
    ledger = master.ledger
    assert {ip: ledger.per_ip.count(ip) for ip in held} == dict(held)
    assert len(ledger.per_ip) == len(held)
    assert ledger.capacity.busy == sum(1 for lease in leases if lease.in_service)
    assert ledger.double_releases == 0


def connect(master: Master, ip: str, send: bytes = REQUEST) -> socket.socket:
    sock = socket.socket()
    sock.bind((ip, 0))
    sock.connect(master.listeners.sockets[0].getsockname())
    if send:
        sock.sendall(send)
    return sock


def busy_clients(master: Master, clients: list[socket.socket]) -> list[socket.socket]:
    """Clients that may be in a session: not (or no longer) in the lobby."""
    in_lobby = {conn.client.remote_port for conn in master.lobby.conns if conn.client}
    return [c for c in clients if str(c.getsockname()[1]) not in in_lobby]


OPS = st.lists(st.one_of(
    st.tuples(st.just("connect"), st.sampled_from(CLIENT_IPS)),
    st.tuples(st.just("idle"), st.sampled_from(CLIENT_IPS)),
    st.tuples(st.just("end"), st.integers(0, 5)),
    st.tuples(st.just("die"), st.integers(0, 5)),
    st.tuples(st.just("gone"), st.integers(0, 5)),
    st.tuples(st.just("hup"), st.just(0)),
), min_size=1, max_size=14)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_sessions_leave_every_counter_at_zero(
        ops: list[tuple[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(master_module, "TICK", 0.02)
    clients: list[socket.socket] = []
    with in_process_master(tmp_path) as master:
        assert master.pool is not None
        turn_until(master, lambda: master.pool.idle >= 2)
        try:
            for op, arg in ops:
                if op in ("connect", "idle"):
                    clients.append(connect(master, arg, REQUEST if op == "connect" else b""))
                elif op in ("end", "die") and clients:
                    busy = busy_clients(master, clients)
                    if busy:
                        with contextlib.suppress(OSError):
                            busy[arg % len(busy)].sendall(b"e" if op == "end" else b"x")
                elif op == "gone" and clients:
                    clients.pop(arg % len(clients)).close()
                elif op == "hup":
                    master.signals.append("SIGHUP")
                turns(master)
        finally:
            for client in clients:
                client.close()
        # every client gone: sessions end unanswered, waiting and idle ones are dropped
        turn_until(master, lambda: master.ledger.capacity.busy == 0 and not master.lobby.conns
                   and not master.pool.in_state(State.BUSY), seconds=20)
        master.signals.append("SIGTERM")
        turn_until(master, lambda: not master.pool.workers, seconds=20)
        assert master.ledger.idle() and master.ledger.double_releases == 0
        assert master.lobby.held() == 0 and not master.lobby.ready
        counts = master.observer.counters.as_dict()
        assert counts["connections"]["handed"] == sum(counts["answers"].values())


def test_a_double_release_and_a_crash_mid_handoff_leave_the_master_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(master_module, "TICK", 0.02)
    with in_process_master(tmp_path) as master:
        assert master.pool is not None
        turn_until(master, lambda: master.pool.idle >= 2)
        # a session whose worker dies right after the hand-off, before it said anything
        first = connect(master, CLIENT_IPS[0])
        turn_until(master, lambda: master.ledger.capacity.busy == 1)
        (busy,) = master.pool.in_state(State.BUSY)
        lease = busy.session
        assert lease is not None
        os.kill(busy.pid, signal.SIGKILL)
        turn_until(master, lambda: busy.pid not in master.pool.workers)
        assert lease.released and master.ledger.idle()
        assert master.observer.counters.answers["worker_died"] == 1
        # a slip: the same lease given back again; logged and ignored
        assert not master.ledger.release(lease)
        assert master.ledger.double_releases == 1
        master.ledger.double_releases = 0  # counted; the books below must stay exact
        first.close()
        # the master still serves, and counts the next client exactly once
        second = connect(master, CLIENT_IPS[0])
        turn_until(master, lambda: master.ledger.capacity.busy == 1)
        second.sendall(b"e")
        second.settimeout(10)
        assert second.recv(16) == b"1:K,"
        turn_until(master, lambda: master.ledger.idle())
        second.close()
        assert master.observer.counters.answers["accepted"] == 1


def test_whatever_escapes_the_loop_stops_the_workers_and_exits_111(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(master_module, "TICK", 0.02)
    with in_process_master(tmp_path) as master:
        assert master.pool is not None
        turn_until(master, lambda: master.pool.idle >= 2)
        workers = list(master.pool.workers)
        calls = {"n": 0}
        real_expire = master.lobby.expire

        def broken_expire(now: float) -> list[Any]:
            calls["n"] += 1
            if calls["n"] > 3:
                raise RuntimeError("a bug in the lobby")
            return real_expire(now)

        monkeypatch.setattr(master.lobby, "expire", broken_expire)
        assert master.run() == 111
        assert not master.pool.workers
        for pid in workers:  # reaped: no orphan left behind
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        final = json.loads((tmp_path / "status.json").read_text())
        assert final["state"] == "stopped" and final["exit"] == 111


def test_a_reload_that_changes_port_keeps_showing_the_port_bound(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PORT takes effect only after a restart: after a HUP that changes it, the title and
    the status still name the address the master listens on."""
    monkeypatch.setattr(master_module, "TICK", 0.02)
    with in_process_master(tmp_path) as master:
        bound = list(master.listeners.names)
        new_port = master.listeners.sockets[0].getsockname()[1] % 60000 + 1024
        master.config_loader = lambda: make_config(tmp_path, PORT=str(new_port))
        titles: list[str] = []
        master.observer.set_title = titles.append
        master.signals.append("SIGHUP")
        master.turn()
        assert master.config.port == new_port  # the reload took
        master.observer.title_shows = ()  # the next turn shows the title again
        master.turn()
        assert titles and titles[-1].startswith(f"qmqpd: master {','.join(bound)} ")
        assert f":{new_port}" not in titles[-1]
        assert master._status()["listen"] == bound
