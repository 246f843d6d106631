"""Connections without a worker: the lobby.

Owns: every accepted client socket the master holds that no worker has — its phase, its
deadline, its lease while it is here — refused sockets lingering after their Z, and the
descriptor budget they are held within (room for one more, shedding when short).
A connection goes through the phases of ALLOWED_FROM, each with a deadline:
  HEADER   its PROXY header, read and consumed here (PROXY_TIMEOUT; no lease yet)
  FIRST    its first bytes (FIRST_BYTE_TIMEOUT)
  REQUEST  the rest of its request, or HANDOFF_BYTES of it (the worker's MIN_RATE rule)
  WAITING  it has what a worker needs and waits for an idle one (TIMEOUT: then Z busy)
  LINGER   refused: after the Z, what it still sends is read and dropped (bounded)
  GONE     out of the lobby: closed, handed to a worker, or given back for admission
Readiness is one peek at the QMQP length prefix, parsed by the worker's own
`netstring.read_length` with the worker's limits; the request itself is only peeked, so the
worker reads it whole from the socket.
Called by: the master (has_room and make_room before an accept, enter, readable, expire,
shed_load, close_all) and the hand-off (take_ready, refuse).
Never touches: counters (it returns `Event`s and the master counts), rules or workers.
A connection whose PROXY header says the balancer speaks for itself (LOCAL) and that
sends nothing is a health check (HEALTH), not a dropped connection.
Releases the lease of every connection it closes; `take_ready` passes the lease on.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import select
import selectors
import socket
import struct
import termios
from collections import deque
from dataclasses import dataclass

from qmqpd import log, proxy
from qmqpd.errors import QmqpdError
from qmqpd.limits import DescriptorBudget, Lease, Ledger
from qmqpd.message import Client, Reply
from qmqpd.netstring import OUTER_PREFIX_MAX, NetstringError, read_length

# A connection goes to a worker once its whole request, or this much of it, is in the
# socket: a worker then reads at memory speed instead of waiting on the client. Far below
# the kernel's receive buffer (128 KiB by default), so the window never closes first.
HANDOFF_BYTES = 64 * 1024
# Bytes peeked to read the length prefix: as many digits as the worker's parser takes
# (leading zeros included), the colon and one more; a copy of ~100 bytes, cheap.
PREFIX_PEEK = OUTER_PREFIX_MAX + 2
# As a plain int: OR-ing the IntFlag members costs an enum construction per peek.
_PEEK_FLAGS = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# Refused clients: after the Z, read and drop what they still send (bounded) so the
# answer is not destroyed by a reset, then close.
LINGER_SECONDS = 5.0
LINGER_BYTES = 64 * 1024
LINGER_MAX = 1024
# The answer to a client that waited TIMEOUT for a worker: try another server.
BUSY_REPLY = "Zserver busy: no worker free, try again later (#4.3.0)"
# A waiting client whose FIN comes this long after its last data has given up (it timed
# out and closed); one that half-closes right after its request (FIN with the data) waits on.
GONE_AFTER_SILENCE_MS = 1000
# struct tcp_info (linux/tcp.h): tcpi_last_data_recv, ms since data last arrived.
_TCPI_LAST_DATA_RECV = struct.Struct("=I")
_TCPI_LAST_DATA_RECV_OFFSET = 52
_HANGUP_MASK = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# Event results that are not connection counters.
HEADER_READ = "header"
SHORT = "short"
HEALTH = "health"
SHED_WARNING_INTERVAL = 10.0
# Stale timer entries are dropped once the heap is this much larger than the lobby.
TIMER_SLACK = 64


class Phase:
    """The phases, as plain strings: a change is checked on every step of every
    connection, and a string hashes from its cache where an Enum member calls Python."""

    NEW = "new"
    HEADER = "header"
    FIRST = "first"
    REQUEST = "request"
    WAITING = "waiting"
    LINGER = "linger"
    GONE = "gone"


# The one table of phase changes: a phase and the phases it may be entered from.
ALLOWED_FROM: dict[str, frozenset[str]] = {
    Phase.NEW: frozenset(),
    Phase.HEADER: frozenset({Phase.NEW}),
    Phase.FIRST: frozenset({Phase.NEW}),
    Phase.REQUEST: frozenset({Phase.FIRST}),
    Phase.WAITING: frozenset({Phase.FIRST, Phase.REQUEST}),
    Phase.LINGER: frozenset({Phase.NEW, Phase.REQUEST, Phase.WAITING}),
    Phase.GONE: frozenset({Phase.NEW, Phase.HEADER, Phase.FIRST, Phase.REQUEST, Phase.WAITING,
                           Phase.LINGER}),
}


class PhaseError(QmqpdError, AssertionError):
    """A phase change the table does not allow: a bug in the lobby."""


@dataclass(eq=False, slots=True)
class Conn:
    sock: socket.socket
    peer: tuple[str, int]
    started: float  # accepted (or its PROXY header read): the MIN_RATE clock starts here
    phase: str = Phase.NEW
    deadline: float = 0.0  # of the current phase
    armed: float | None = None  # its earliest entry in the timer heap
    lease: Lease | None = None
    client: Client | None = None
    header: proxy.HeaderReader | None = None
    min_rate: int = 0
    grace: float = 0.0
    lowat: int = 1  # the socket's SO_RCVLOWAT: select() wakes the master only at this
    watched: bool = False  # registered in the master's selector
    hup_watched: bool = False  # WAITING, watched for its client going away
    total: int = 0  # the request's announced size (0: unknown or refused)
    ready_at: float = 0.0  # when it started WAITING
    linger_left: int = LINGER_BYTES
    own: bool = False  # PROXY LOCAL: the balancer itself (its health check), no client

    @property
    def ip(self) -> str:
        return self.lease.ip if self.lease is not None else self.peer[0]


@dataclass(frozen=True, slots=True)
class Event:
    """What became of a connection, for the master's counters: result is a
    status.CONNECTIONS name, or HEADER_READ (the master then decides on the client the
    header names: `conn`, `header`, `local`), SHORT (out of descriptors or memory), or
    HEALTH (a PROXY LOCAL connection closed without a request)."""

    result: str
    ip: str
    conn: Conn | None = None
    header: proxy.ProxyHeader | None = None
    local: tuple | None = None


def request_total(head: bytes) -> int | None:
    """The whole request's size (length prefix, body, comma) from its first bytes; None =
    the length prefix is not complete yet; 0 = a prefix the worker's parser refuses."""
    try:
        length = read_length(iter(head).__next__, OUTER_PREFIX_MAX)
    except StopIteration:  # the prefix is not all here yet
        return None
    except NetstringError:
        return 0
    return head.index(b":") + 1 + length + 1


def bytes_waiting(sock: socket.socket) -> int:
    """Bytes in the socket's receive queue (FIONREAD): counted, not copied."""
    (count,) = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, bytes(4)))
    return int(count)


class Lobby:
    def __init__(self, selector: selectors.BaseSelector, ledger: Ledger,
                 budget: DescriptorBudget) -> None:
        self.selector = selector
        self.ledger = ledger
        self.budget = budget
        self.first_byte_timeout = 10.0
        self.wait_timeout = 60.0
        # both in arrival order: the oldest goes first when descriptors run short
        self.conns: dict[Conn, None] = {}
        self.lingering: dict[Conn, None] = {}
        # WAITING, oldest first: whole requests (a worker is done with them in moments)
        # go before those that sent only HANDOFF_BYTES of a longer one
        self.whole: deque[Conn] = deque()
        self.part: deque[Conn] = deque()
        self.ready = 0  # connections waiting for a worker: len(whole) + len(part)
        # (deadline, order, conn); an entry whose conn moved on is stale (lazy deletion,
        # the heap rebuilt when stale entries outnumber the lobby: memory follows what is open)
        self.timers: list[tuple[float, int, Conn]] = []
        self.order = itertools.count()
        self.events: list[Event] = []
        self.next_shed_warning = 0.0
        # WAITING connections still there at the end of a turn are watched for their
        # client going away (one handed in the turn it became ready never is)
        self.hangup = select.epoll()
        self.hup_conns: dict[int, Conn] = {}
        self.to_watch: list[Conn] = []

    def configure(self, first_byte_timeout: float, wait_timeout: float,
                  budget: DescriptorBudget) -> None:
        """FIRST_BYTE_TIMEOUT, the wait for a worker (TIMEOUT), the descriptor budget."""
        self.first_byte_timeout, self.wait_timeout = first_byte_timeout, wait_timeout
        self.budget = budget

    # ---- counts -------------------------------------------------------------------------

    def longest_wait(self, now: float) -> float:
        oldest = [q[0].ready_at for q in (self.whole, self.part) if q]
        return now - min(oldest) if oldest else 0.0

    def _queue(self, conn: Conn) -> deque[Conn]:
        return self.whole if conn.total and conn.total <= HANDOFF_BYTES else self.part

    def held(self) -> int:
        """Client sockets held (they count against the master's descriptor budget)."""
        return len(self.conns) + len(self.lingering)

    def has_room(self) -> bool:
        """One more client socket fits the descriptor budget, or an older one can be given
        up for it (a lingerer, or one not yet waiting for a worker)."""
        return (not self.budget.over(self.held()) or bool(self.lingering)
                or len(self.conns) > self.ready)

    def make_room(self) -> list[Event]:
        """For the socket about to be accepted: at the budget, the first `shed` victim goes."""
        return self.shed(1)[1] if self.budget.over(self.held()) else []

    def next_deadline(self) -> float | None:
        return self.timers[0][0] if self.timers else None

    # ---- entering -----------------------------------------------------------------------
    def await_header(self, sock: socket.socket, peer: tuple[str, int],
                     reader: proxy.HeaderReader, timeout: float, now: float) -> list[Event]:
        conn = Conn(sock, peer, now, header=reader)
        self._enter(conn, Phase.HEADER, now + timeout)
        self._watch(conn)
        return self._take_events()

    def enter(self, sock: socket.socket, peer: tuple[str, int], lease: Lease, client: Client,
              min_rate: int, grace: float, now: float, own: bool = False) -> list[Event]:
        """An admitted client: wait for its request (often there already); own = its
        PROXY header was LOCAL."""
        conn = Conn(sock, (lease.ip, int(peer[1])), now, lease=lease, client=client,
                    min_rate=min_rate, grace=grace, own=own)
        self._enter(conn, Phase.FIRST, now + self.first_byte_timeout)
        self._look(conn, now, woken=False)
        if conn.phase in (Phase.FIRST, Phase.REQUEST):
            self._watch(conn)
        return self._take_events()

    def refuse(self, sock: socket.socket, reply: str, now: float) -> None:
        """Answer Z so a qmqpc-style client tries its next server, then linger briefly."""
        conn = Conn(sock, ("", 0), now)
        self._linger(conn, reply, now)

    def _enter(self, conn: Conn, phase: str, deadline: float) -> None:
        self.conns[conn] = None
        self._change(conn, phase)
        self._arm(conn, deadline)

    @staticmethod
    def _change(conn: Conn, new: str) -> None:
        """Every phase change goes through here and must be one the table allows."""
        if conn.phase not in ALLOWED_FROM[new]:
            raise PhaseError(f"{conn.peer[0]}: {conn.phase} -> {new}")
        conn.phase = new

    def _arm(self, conn: Conn, deadline: float) -> None:
        """A later deadline only moves conn.deadline (the entry due first re-arms it when
        it pops): one heap push per connection in the usual case."""
        conn.deadline = deadline
        if conn.armed is not None and conn.armed <= deadline:
            return
        conn.armed = deadline
        heapq.heappush(self.timers, (deadline, next(self.order), conn))
        if len(self.timers) > 2 * (len(self.conns) + len(self.lingering)) + TIMER_SLACK:
            self.timers = [entry for entry in self.timers
                           if entry[2].phase is not Phase.GONE and entry[2].armed == entry[0]]
            heapq.heapify(self.timers)

    def _watch(self, conn: Conn) -> None:
        try:
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        except OSError:
            self._close(conn, "dropped", "cannot watch the connection")
            self.events.append(Event(SHORT, conn.ip))  # the master sheds
            return
        conn.watched = True

    def _unwatch(self, conn: Conn) -> None:
        """Out of the selector, if in it: a request already there when accepted was never
        watched (asking the selector instead costs a formatted KeyError per connection)."""
        if conn.watched:
            conn.watched = False
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)

    def _take_events(self) -> list[Event]:
        events, self.events = self.events, []
        return events

    # ---- reading ------------------------------------------------------------------------
    def readable(self, conn: Conn, now: float) -> list[Event]:
        if conn.phase is Phase.HEADER:
            self._read_header(conn, now)
        elif conn.phase in (Phase.FIRST, Phase.REQUEST):
            self._look(conn, now, woken=True)
        elif conn.phase is Phase.LINGER:
            self._linger_read(conn)
        return self._take_events()

    def _read_header(self, conn: Conn, now: float) -> None:
        assert conn.header is not None
        try:
            header = conn.header.read(conn.sock)
        except proxy.ProxyError as error:
            self._close(conn, "proxy_rejected", str(error))
            return
        except OSError as error:
            self._close(conn, "proxy_rejected", error.strerror or str(error))
            return
        if header is None:
            return  # a part of it: the rest within PROXY_TIMEOUT
        try:
            local = (header.destination if header.source is not None
                     else conn.sock.getsockname())
            if isinstance(local, str):  # LOCAL on PROXY_SOCKET: this host
                local = ("127.0.0.1", 0)
        except OSError as error:
            self._close(conn, "dropped", error.strerror or str(error))
            return
        self._leave(conn)
        self.events.append(Event(HEADER_READ, conn.peer[0], conn, header, local))

    def _look(self, conn: Conn, now: float, woken: bool) -> None:
        """Peek at the request's first bytes and count the rest: ready once the whole
        request or HANDOFF_BYTES of it are in the socket, or its length prefix is one the
        worker refuses; else let select() wake the master only when enough has come
        (SO_RCVLOWAT), so a large request is not peeked again for every segment."""
        try:
            head = conn.sock.recv(PREFIX_PEEK, _PEEK_FLAGS)
            available = bytes_waiting(conn.sock) if head else 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset, or anything else: the connection is of no further use
            head = b""
        if not head:
            if conn.own and conn.phase is Phase.FIRST:
                self._close(conn, HEALTH, "")  # HAProxy's plain TCP check
                return
            self._close(conn, "dropped", "closed before sending" if conn.phase is Phase.FIRST
                        else "closed before its request was complete")
            return
        total = request_total(head)
        conn.total = total or 0
        size = total if not total else min(total, HANDOFF_BYTES)
        if size == 0 or (size is not None and available >= size):
            self._to_waiting(conn, now)
            return
        if woken and available < conn.lowat:
            # Woken below the mark: the client closed its side, or the kernel's buffer is
            # under pressure. Nothing more will come by waiting; the worker takes over.
            self._to_waiting(conn, now)
            return
        wanted = size if size is not None else len(head) + 1
        if wanted != conn.lowat and not self._set_lowat(conn, wanted):
            return
        if conn.phase is Phase.FIRST:
            self._change(conn, Phase.REQUEST)
            self._arm(conn, self._rate_deadline(conn, available))

    def _set_lowat(self, conn: Conn, lowat: int) -> bool:
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
        except OSError as error:
            self._close(conn, "dropped", error.strerror or str(error))
            return False
        conn.lowat = lowat
        return True

    @staticmethod
    def _rate_deadline(conn: Conn, available: int) -> float:
        """The worker's MIN_RATE rule: RATE_GRACE from the connect, then 1/MIN_RATE seconds
        for each byte sent; with MIN_RATE 0, the hand-off after RATE_GRACE."""
        if conn.min_rate <= 0:
            return conn.started + conn.grace
        return conn.started + conn.grace + available / conn.min_rate

    def _to_waiting(self, conn: Conn, now: float) -> None:
        """The connection has what a worker needs: queue it (oldest first)."""
        if conn.lowat != 1 and not self._set_lowat(conn, 1):  # the worker reads as usual
            return
        self._unwatch(conn)
        self._change(conn, Phase.WAITING)
        self._arm(conn, now + self.wait_timeout)
        conn.ready_at = now
        self._queue(conn).append(conn)
        self.ready += 1
        self.to_watch.append(conn)

    def watch_waiting(self) -> None:
        """End of a turn: connections still waiting for a worker are watched for their
        client's FIN or reset (EPOLLRDHUP), in an epoll of their own: their request makes
        them always readable, so the main selector cannot watch them."""
        for conn in self.to_watch:
            if conn.phase is Phase.WAITING and not conn.hup_watched:
                with contextlib.suppress(OSError):
                    self.hangup.register(conn.sock.fileno(), _HANGUP_MASK)
                    self.hup_conns[conn.sock.fileno()] = conn
                    conn.hup_watched = True
        self.to_watch.clear()

    def hangups(self) -> list[Event]:
        """Waiting connections whose client has gone: dropped with their lease, nothing
        queued behind their back. Polled when the epoll says so and before each hand-off."""
        if not self.hup_conns:
            return []
        for fd, mask in self.hangup.poll(0):
            conn = self.hup_conns.get(fd)
            if conn is None:
                continue
            if mask & (select.EPOLLHUP | select.EPOLLERR) or self._silent(conn):
                self._close(conn, "dropped", "client gone while waiting for a worker")
            else:  # half-closed right after its request: it still reads the answer
                self._unwatch_hangup(conn)
        return self._take_events()

    @staticmethod
    def _silent(conn: Conn) -> bool:
        try:
            info = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        except OSError:  # not TCP (a unix socket): a FIN alone is a half-close
            return False
        (silent_ms,) = _TCPI_LAST_DATA_RECV.unpack_from(info, _TCPI_LAST_DATA_RECV_OFFSET)
        return bool(silent_ms >= GONE_AFTER_SILENCE_MS)

    def _unwatch_hangup(self, conn: Conn) -> None:
        if conn.hup_watched:
            conn.hup_watched = False
            self.hup_conns.pop(conn.sock.fileno(), None)
            with contextlib.suppress(OSError):
                self.hangup.unregister(conn.sock.fileno())

    def take_ready(self) -> Conn | None:
        """The oldest connection waiting for a worker whose client is still there, out of
        the lobby with its lease (the caller now owns both), or None. Those found gone
        wait in `events` for the caller."""
        self.events += self.hangups()
        if not self.ready:
            return None
        conn = (self.whole or self.part).popleft()
        self.ready -= 1
        self._leave(conn)
        return conn

    # ---- deadlines ----------------------------------------------------------------------
    def expire(self, now: float) -> list[Event]:
        """Connections past their phase's deadline: no PROXY header or nothing sent in
        time: closed; a request arriving slower than MIN_RATE: answered Z, as its worker
        would; no worker within TIMEOUT: answered Z (busy); lingerers: closed."""
        while self.timers and self.timers[0][0] <= now:
            armed, _order, conn = heapq.heappop(self.timers)
            if conn.phase is Phase.GONE or conn.armed != armed:
                continue  # stale: the connection moved on, or has an earlier entry
            conn.armed = None
            if conn.deadline > now:  # its phase's deadline moved later
                self._arm(conn, conn.deadline)
                continue
            if conn.phase is Phase.HEADER:
                self._close(conn, "proxy_rejected",
                            "no complete PROXY header within PROXY_TIMEOUT")
            elif conn.phase is Phase.FIRST:
                self._close(conn, HEALTH if conn.own else "dropped",
                            "nothing sent within FIRST_BYTE_TIMEOUT")
            elif conn.phase is Phase.REQUEST:
                self._check_rate(conn, now)
            elif conn.phase is Phase.WAITING:
                self._queue(conn).remove(conn)
                self.ready -= 1
                log.event("busy", ip=conn.ip, waited=round(now - conn.started, 1),
                          answer=BUSY_REPLY)
                self._refuse_held(conn, "busy", BUSY_REPLY, now)
            elif conn.phase is Phase.LINGER:
                self._close(conn, "", "")
        return self._take_events()

    def _check_rate(self, conn: Conn, now: float) -> None:
        try:
            available = bytes_waiting(conn.sock)
        except OSError:
            self._close(conn, "dropped", "connection lost")
            return
        if conn.min_rate <= 0:  # no rate rule: the worker's TIMEOUT takes over
            self._to_waiting(conn, now)
            return
        deadline = self._rate_deadline(conn, available)
        if deadline > now:
            self._arm(conn, deadline)
            return
        with contextlib.suppress(OSError):  # the linger reads whatever comes
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        elapsed = now - conn.started
        error = (f"too slow: {available} bytes in {elapsed:.0f}s, below {conn.min_rate} "
                 f"bytes/s after {conn.grace:g}s")
        reply = Reply.named("too_slow", rate=conn.min_rate).line
        log.event("too_slow", ip=conn.ip, error=error, answer=reply)
        with contextlib.suppress(OSError):  # its unread bytes would turn the close into a reset
            conn.sock.recv(max(1, available), socket.MSG_DONTWAIT)
        self._refuse_held(conn, "too_slow", reply, now)

    # ---- refusals and their linger ------------------------------------------------------
    def _refuse_held(self, conn: Conn, result: str, reply: str, now: float) -> None:
        self._unwatch(conn)
        self._unwatch_hangup(conn)
        self._release(conn)
        self.events.append(Event(result, conn.ip))
        del self.conns[conn]
        self._linger(conn, reply, now)

    def _linger(self, conn: Conn, reply: str, now: float) -> None:
        try:
            conn.sock.setblocking(False)
            conn.sock.send(b"%d:%s," % (len(reply), reply.encode("utf-8")))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._change(conn, Phase.GONE)
            conn.sock.close()
            return
        if len(self.lingering) >= min(LINGER_MAX, self.budget.lingering):
            self._change(conn, Phase.GONE)
            conn.sock.close()
            return
        self._change(conn, Phase.LINGER)
        self.lingering[conn] = None
        self._arm(conn, now + LINGER_SECONDS)
        try:
            self.selector.register(conn.sock, selectors.EVENT_READ, conn)
        except OSError:
            self._close(conn, "", "")
            return
        conn.watched = True

    def _linger_read(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(min(conn.linger_left, 16384))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        conn.linger_left -= len(data)
        if not data or conn.linger_left <= 0:
            self._close(conn, "", "")

    # ---- leaving ------------------------------------------------------------------------
    def _leave(self, conn: Conn) -> None:
        """Out of the lobby's books; the socket stays open and the lease with the caller."""
        self._unwatch(conn)
        self._unwatch_hangup(conn)
        if conn.phase is Phase.LINGER:
            del self.lingering[conn]
        else:
            self.conns.pop(conn, None)
        self._change(conn, Phase.GONE)

    def _release(self, conn: Conn) -> None:
        """Give back the lease the lobby holds for conn; it holds none afterwards (a
        refused connection lingers without one)."""
        if conn.lease is not None:
            lease, conn.lease = conn.lease, None
            self.ledger.release(lease)

    def _close(self, conn: Conn, result: str, reason: str) -> None:
        """Close a connection the lobby holds; result '' = a lingerer (counted already)."""
        if conn.phase is Phase.GONE:
            return
        if conn.phase is Phase.WAITING:
            self._queue(conn).remove(conn)
            self.ready -= 1
        self._leave(conn)
        self._release(conn)
        if result == HEALTH:
            self.events.append(Event(result, conn.ip))
            log.event("health", ip=conn.ip, answer="none", reason=reason or None)
        elif result:
            self.events.append(Event(result, conn.ip))
            log.event("proxy_reject" if result == "proxy_rejected" else "drop",
                      ip=conn.ip, reason=reason)
        conn.sock.close()  # after the log line: a client that sees the close finds it

    def shed(self, want: int) -> tuple[int, list[Event]]:
        """Give up to `want` held sockets: lingerers (they have their answer) first, then
        the oldest that sent nothing, then the oldest still sending. Never one waiting for
        a worker (it has its whole request). Returns how many went."""
        freed = 0
        while freed < want and self.lingering:
            self._close(next(iter(self.lingering)), "", "")
            freed += 1
        for phases in ((Phase.HEADER, Phase.FIRST), (Phase.REQUEST,)):
            if freed >= want:
                break
            victims = [c for c in self.conns if c.phase in phases][:want - freed]
            for conn in victims:
                self._close(conn, "dropped", "descriptor budget full; oldest idle closed")
            freed += len(victims)
        return freed, self._take_events()

    def shed_load(self, now: float, reason: str) -> list[Event]:
        """Out of descriptors or memory: an eighth of what is held (at least 16) goes,
        with one warning per SHED_WARNING_INTERVAL."""
        freed, events = self.shed(max(16, self.held() // 8))
        if now >= self.next_shed_warning:
            log.warning("short of descriptors or memory; shedding load", reason=reason,
                        closed=freed, held=self.held(), client_fds=self.budget.clients)
            self.next_shed_warning = now + SHED_WARNING_INTERVAL
        return events

    def close_all(self, reason: str) -> list[Event]:
        """Not yet handed to a worker: no session in progress, the client retries elsewhere."""
        for conn in list(self.conns):
            self._close(conn, "dropped", reason)
        for conn in list(self.lingering):
            self._close(conn, "", "")
        return self._take_events()

    def take_events(self) -> list[Event]:
        return self._take_events()

    def close_fds(self) -> None:
        """In a forked worker: drop every inherited socket, touching no selector."""
        self.hangup.close()
        for conn in itertools.chain(self.conns, self.lingering):
            conn.sock.close()
