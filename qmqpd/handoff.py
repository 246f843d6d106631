"""The hand-off: connections from the lobby to idle workers, and who gives way.

Owns: the passage of a waiting connection to a worker (whole requests first: a worker is
done with them in moments), and, while a worker serves it, a duplicate of the client's
socket, kept only to read the kernel's count of bytes received (TCP_INFO) and to end the
session when it must give way. When clients have waited GIVE_WAY_AFTER for a worker and
every one is busy, the session receiving slowest (bytes received since its connect over
its age, below GIVE_WAY_RATE, at least MIN_AGE old, its request not yet all received) is
answered Z "server busy, too slow" from here and its socket shut down: its worker reads
the end of the input at once, queues nothing, says done and takes the next client. A
session whose request is all in is never cut: its worker may be committing it.
Called by: the master (`run` when workers or connections became free, `ended` when it
settles a session, `give_way` each turn).
Never touches: a client's data (only the kernel's byte count), counters (the observer
does), rules or limits beyond the lease it is handed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass
from typing import Any

from qmqpd import log
from qmqpd.limits import Lease, Ledger
from qmqpd.lobby import HANDOFF_BYTES, Event, Lobby, bytes_waiting
from qmqpd.message import Reply
from qmqpd.pool import Pool

# The give-way thresholds are constants, not settings: they act only while clients wait
# and every worker is busy, and none follows from MAXDAEMONS, PREFORK or TIMEOUT.
# A client waiting this long while every worker is busy makes the slowest session give
# way. A working session is done in milliseconds, so half a second of waiting means the
# workers wait on their clients; it is below TIMEOUT's floor (1 s), so the give-way can
# come before a waiting client is answered busy, whatever TIMEOUT is.
GIVE_WAY_AFTER = 0.5
# Only a session this old is judged: its average over a shorter time is mostly the
# connect and TCP slow start. RATE_GRACE's longer allowance (a lossy link's backoff) is
# for MIN_RATE, which cuts a session whether or not anyone waits; here clients wait.
MIN_AGE = 1.0
# Slower than this on average since its connect, a session gives way: 64 KiB/s (512
# kbit/s) is below any working relay link and far above MIN_RATE's floor, so a trickle
# gives way and a slow but working link does not.
GIVE_WAY_RATE = 64 * 1024
# One look reads TCP_INFO of every session in service (up to MAXDAEMONS calls), so at
# most one look, and one session giving way, per this long; and never more sessions on
# their way out at once than clients waiting.
GIVE_WAY_INTERVAL = 0.1
GIVE_WAY_REPLY = "Zserver busy, too slow: try again later (#4.3.0)"
# struct tcp_info (linux/tcp.h): tcpi_bytes_received, a u64 at byte 128 (Linux 4.1+).
_BYTES_RECEIVED = struct.Struct("=Q")
_BYTES_RECEIVED_OFFSET = 128
_TCP_INFO_SIZE = _BYTES_RECEIVED_OFFSET + _BYTES_RECEIVED.size


@dataclass(eq=False, slots=True)
class Seat:
    """A session in service: its socket (a duplicate), when its client connected, and
    how many bytes the kernel must receive before its request is all in."""

    sock: socket.socket
    started: float
    needed: int
    ip: str
    evicted: bool = False


def bytes_received(sock: socket.socket) -> int | None:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:  # not TCP (a unix socket)
        return None
    if len(info) < _TCP_INFO_SIZE:
        return None
    return int(_BYTES_RECEIVED.unpack_from(info, _BYTES_RECEIVED_OFFSET)[0])


class Handoff:
    def __init__(self, lobby: Lobby, ledger: Ledger, pool: Pool, observer: Any) -> None:
        self.lobby = lobby
        self.ledger = ledger
        self.pool = pool
        self.observer = observer  # qmqpd.status.Observer
        self.seats: dict[Lease, Seat] = {}
        self.next_give_way = 0.0

    def run(self, now: float) -> list[Event]:
        """Waiting connections go to idle workers, whole requests first, oldest first; the
        lobby's events of those found gone on the way, for the master to count."""
        while (self.lobby.ready and not self.ledger.full and self.pool.has_idle()
               and (conn := self.lobby.take_ready()) is not None):
            assert conn.lease is not None and conn.client is not None
            self.ledger.start(conn.lease)
            # a whole request already in the socket can never give way: no seat, no cost
            seat = (self._seat(conn.sock, conn.started, conn.total)
                    if conn.total > HANDOFF_BYTES else None)
            if self.pool.hand_to_idle(conn.sock.fileno(), conn.client, conn.lease, now):
                self.observer.connection("handed", conn.ip)
                conn.sock.close()
                if seat is not None:
                    seat.ip = conn.ip
                    self.seats[conn.lease] = seat
                continue
            if seat is not None:
                seat.sock.close()
            self.ledger.release(conn.lease)  # Z: the client tries again, or elsewhere
            self.observer.connection("dropped", conn.ip)
            log.event("drop", ip=conn.ip, error="no worker could take the connection")
            self.lobby.refuse(conn.sock, Reply.named("temporary").line, now)
        return self.lobby.take_events() if self.lobby.events else []

    def _seat(self, sock: socket.socket, started: float, total: int) -> Seat | None:
        """What give_way needs of a session about to start; None when it cannot tell
        (not TCP, out of descriptors): such a session never gives way."""
        received = bytes_received(sock)
        if received is None or not total:
            return None
        try:
            waiting = bytes_waiting(sock)
            dup = sock.dup()
        except OSError:
            return None
        # what came before the request (a PROXY header) plus the whole request
        return Seat(dup, started, received - waiting + total, "")

    def ended(self, lease: Lease) -> None:
        seat = self.seats.pop(lease, None)
        if seat is not None:
            seat.sock.close()

    def give_way(self, now: float) -> None:
        """Clients wait and every worker is busy: the slowest session gives way."""
        if (not self.lobby.ready or not self.ledger.full or now < self.next_give_way
                or self.lobby.longest_wait(now) < GIVE_WAY_AFTER):
            return
        if sum(1 for seat in self.seats.values() if seat.evicted) >= self.lobby.ready:
            return  # enough are already on their way out
        self.next_give_way = now + GIVE_WAY_INTERVAL
        slowest: tuple[float, Seat] | None = None
        for seat in self.seats.values():
            age = now - seat.started
            if seat.evicted or age < MIN_AGE:
                continue
            received = bytes_received(seat.sock)
            if received is None or received >= seat.needed:
                continue  # all in: its worker may be committing it
            rate = received / age
            if rate < GIVE_WAY_RATE and (slowest is None or rate < slowest[0]):
                slowest = (rate, seat)
        if slowest is not None:
            self._evict(*slowest, now)

    def _evict(self, rate: float, seat: Seat, now: float) -> None:
        seat.evicted = True
        log.event("give_way", ip=seat.ip, rate=int(rate), seconds=round(now - seat.started, 1),
                  answer=GIVE_WAY_REPLY)
        self.observer.connection("gave_way", seat.ip)
        data = GIVE_WAY_REPLY.encode()
        with contextlib.suppress(OSError):
            seat.sock.send(b"%d:%s," % (len(data), data), socket.MSG_DONTWAIT)
        with contextlib.suppress(OSError):  # the worker reads the end of its input now
            seat.sock.shutdown(socket.SHUT_RDWR)

    def close_fds(self) -> None:
        """In a forked worker: drop the duplicates."""
        for seat in self.seats.values():
            seat.sock.close()

