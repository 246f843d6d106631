"""Counters of the master and the `Lease` that ties a client to them.

Owns: sessions per client IP (MAXPERIP), sessions in service (MAXDAEMONS), the descriptor
budget, and the `Ledger` that issues a `Lease` per admitted client: its per-IP slot at
admission, its capacity slot at the hand-off, both given back by one `release()`. A lease
has one owner at a time (the lobby, then a worker record in the pool); a second release
is a bug that is logged and ignored, never raised, so it cannot end the master.
Called by: admission (admit), the hand-off (start: the lease passes to a worker), the
lobby, the hand-off and the master (release: the master when it settles a worker's
record), the master (resize) and the observer (counts for the status).
Never touches sockets, clocks or processes.
"""

from __future__ import annotations

import functools
import heapq
from dataclasses import dataclass

from qmqpd import log
from qmqpd.address import parse_ip

# A pure function the master calls several times per connection with the same few
# addresses: remembered, so ipaddress parses each one once, not on every call.
FOLD_CACHE = 4096


@functools.lru_cache(maxsize=FOLD_CACHE)
def fold_ip(ip: str) -> str:
    """One spelling per client: v4-mapped IPv6 becomes dotted IPv4, IPv6 compact form."""
    address = parse_ip(ip)
    return ip if address is None else str(address)


class PerIpCounter:
    """Live sessions per client IP (tcpserver -C / MAXPERIP)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def count(self, ip: str) -> int:
        return self._counts.get(fold_ip(ip), 0)

    def acquire(self, ip: str, limit: int) -> bool:
        """Take one slot for ip unless it already has `limit` sessions; 0 = no limit."""
        key = fold_ip(ip)
        held = self._counts.get(key, 0)
        if limit > 0 and held >= limit:
            return False
        self._counts[key] = held + 1
        return True

    def release(self, ip: str) -> None:
        """Give back one slot; releasing a slot that is not held is a bug in the caller."""
        key = fold_ip(ip)
        held = self._counts.get(key, 0)
        if held <= 0:
            raise ValueError(f"release of {key} without a held slot")
        if held == 1:
            del self._counts[key]
        else:
            self._counts[key] = held - 1

    def __len__(self) -> int:
        return len(self._counts)

    def busiest(self, n: int) -> list[tuple[str, int]]:
        """The n IPs with the most sessions, most first (for status lines)."""
        return heapq.nlargest(n, self._counts.items(), key=lambda item: (item[1], item[0]))


class Capacity:
    """Sessions in service against a maximum (tcpserver -c / MAXDAEMONS)."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("capacity must be at least 1")
        self.maximum = maximum
        self.busy = 0

    @property
    def full(self) -> bool:
        return self.busy >= self.maximum

    def acquire(self) -> bool:
        if self.busy >= self.maximum:  # self.full, without a property call per hand-off
            return False
        self.busy += 1
        return True

    def release(self) -> None:
        if self.busy <= 0:
            raise ValueError("capacity released more often than acquired")
        self.busy -= 1

    def resize(self, maximum: int) -> None:
        """A new maximum (reload); sessions above it finish, no new ones start until below."""
        if maximum < 1:
            raise ValueError("capacity must be at least 1")
        self.maximum = maximum


# Who holds a lease: the lobby (no worker yet), then a worker; "released" at the end.
LOBBY = "lobby"
WORKER = "worker"
RELEASED = "released"


@dataclass(eq=False, slots=True)
class Lease:
    """One admitted client's slots: its per-IP slot from admission on, the capacity slot
    from the hand-off on. Only its `Ledger` changes it."""

    ip: str
    owner: str = LOBBY
    in_service: bool = False  # holds a capacity slot

    @property
    def released(self) -> bool:
        return self.owner == RELEASED


class Ledger:
    """The one place slots are taken and given back: per-IP and capacity, by lease."""

    def __init__(self, maxdaemons: int) -> None:
        self.per_ip = PerIpCounter()
        self.capacity = Capacity(maxdaemons)
        self.double_releases = 0

    def admit(self, ip: str, limit: int) -> Lease | None:
        """A lease with ip's per-IP slot, or None when ip already has `limit` (0: none)."""
        if not self.per_ip.acquire(ip, limit):
            return None
        return Lease(fold_ip(ip))

    @property
    def full(self) -> bool:
        capacity = self.capacity  # capacity.full, read here: the master asks every turn
        return capacity.busy >= capacity.maximum

    def start(self, lease: Lease) -> bool:
        """The lease passes to a worker and takes a capacity slot; False when all are busy."""
        if lease.owner != LOBBY or not self.capacity.acquire():
            return False
        lease.owner, lease.in_service = WORKER, True
        return True

    def release(self, lease: Lease) -> bool:
        """Give back every slot the lease holds, once; a second release is logged, not
        raised (False), so a bookkeeping slip costs a log line, never the master."""
        if lease.owner == RELEASED:  # lease.released, without a property call
            self.double_releases += 1
            log.error("lease released twice; ignored", ip=lease.ip)
            return False
        held_service, lease.owner = lease.in_service, RELEASED
        lease.in_service = False
        self.per_ip.release(lease.ip)
        if held_service:
            self.capacity.release()
        return True

    def idle(self) -> bool:
        """Nothing held: every lease given back."""
        return self.capacity.busy == 0 and len(self.per_ip) == 0


# Descriptors the master keeps for itself beyond clients and worker channels: listeners,
# the wakeup pipe, the epoll fds, the rules cdb, the status file, a socketpair being made.
FD_RESERVE = 64
# The master never plans for fewer client sockets than this, however low the limit.
FD_CLIENTS_FLOOR = 8


class DescriptorBudget:
    """Client sockets the master may hold at once (connections waiting for their first
    bytes or for a worker, refused ones lingering), from RLIMIT_NOFILE: the limit less a
    reserve and three descriptors per worker slot: two channels (after a reload old and
    new workers overlap) and the duplicate of the client's socket while it is served."""

    def __init__(self, nofile: int, workers: int) -> None:
        self.nofile = nofile
        self.clients = max(FD_CLIENTS_FLOOR, nofile - FD_RESERVE - 3 * workers)

    @property
    def lingering(self) -> int:
        """Refused sockets kept to linger: at most half the client budget."""
        return max(1, self.clients // 2)

    def over(self, held: int) -> bool:
        return held >= self.clients
