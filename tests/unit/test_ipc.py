"""Master/worker records over a real SOCK_SEQPACKET socketpair, with real fds."""

from __future__ import annotations

import os
import socket

import pytest

from qmqpd import ipc
from qmqpd.message import Client


def test_handoff_carries_fd_facts_and_rule_env(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    client = Client(remote_ip="10.1.2.3", remote_port="4321", local_ip="10.0.0.1",
                    local_port="628", local_host="mx.example", proto="TCP",
                    rule_env={"DATABYTES": "1000", "QMAILQUEUE": None, "X": "a=b,c"})
    read_fd, write_fd = os.pipe()
    try:
        ipc.send_handoff(master_end, read_fd, client)
        record = ipc.receive(worker_end)
    finally:
        os.close(read_fd)
    assert record is not None and record.kind is ipc.Kind.HANDOFF
    assert record.client == client
    assert record.fd is not None and record.fd != read_fd
    os.write(write_fd, b"through the passed fd")
    os.close(write_fd)
    assert os.read(record.fd, 100) == b"through the passed fd"
    os.close(record.fd)


def test_ready_done_retire_and_eof(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    ipc.send_ready(worker_end)
    ipc.send_done(worker_end)
    ipc.send_done(worker_end, exiting=True)
    ipc.send_retire(master_end)
    kinds = [ipc.receive(master_end) for _ in range(3)]
    assert [(r.kind, r.exiting) for r in kinds if r] == [
        (ipc.Kind.READY, False), (ipc.Kind.DONE, False), (ipc.Kind.DONE, True)]
    retire = ipc.receive(worker_end)
    assert retire is not None and retire.kind is ipc.Kind.RETIRE
    worker_end.close()
    assert ipc.receive(master_end) is None


@pytest.mark.parametrize("packet", [b"\x09", b"\x01\x00", b"\x01\x00\x05ab", b"\x01"])
def test_malformed_records_are_rejected(pair: tuple[socket.socket, socket.socket],
                                        packet: bytes) -> None:
    master_end, worker_end = pair
    master_end.send(packet)
    with pytest.raises(ipc.ChannelError):
        ipc.receive(worker_end)


def test_oversized_record_is_rejected(pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    master_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    master_end.send(b"\x02" + b"\x00" * ipc.MAX_RECORD)
    with pytest.raises(ipc.ChannelError):
        ipc.receive(worker_end)
    big = Client(rule_env={"X": "v" * 70000})
    with pytest.raises(ipc.ChannelError):
        ipc.send_handoff(master_end, 0, big)


def test_fd_on_a_record_that_takes_none_is_closed(
        pair: tuple[socket.socket, socket.socket]) -> None:
    master_end, worker_end = pair
    read_fd, write_fd = os.pipe()
    socket.send_fds(master_end, [bytes([ipc.Kind.READY])], [read_fd])
    os.close(read_fd)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ipc.ChannelError):
        ipc.receive(worker_end)
    assert set(os.listdir("/proc/self/fd")) == before
    # the only reader is gone, so writing must fail: the passed copy was closed
    with pytest.raises(BrokenPipeError):
        os.write(write_fd, b"x")
    os.close(write_fd)
