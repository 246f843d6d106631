"""Pure counters for the master: sessions per client IP, and sessions in all.

No I/O and no clock: the master owns the policy, these only count, so "released exactly
once" can be checked in one place.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress

# A pure function the master calls several times per connection with the same few
# addresses: remembered, so ipaddress parses each one once, not on every call.
FOLD_CACHE = 4096


@functools.lru_cache(maxsize=FOLD_CACHE)
def fold_ip(ip: str) -> str:
    """One spelling per client: v4-mapped IPv6 becomes dotted IPv4, IPv6 compact form."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


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

    @property
    def total(self) -> int:
        return sum(self._counts.values())

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

    @property
    def free(self) -> int:
        return max(0, self.maximum - self.busy)

    def acquire(self) -> bool:
        if self.full:
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


# Descriptors the master keeps for itself beyond clients and worker channels: listeners,
# the wakeup pipe, the epoll fds, the rules cdb, the status file, a socketpair being made.
FD_RESERVE = 64
# The master never plans for fewer client sockets than this, however low the limit.
FD_CLIENTS_FLOOR = 8


class DescriptorBudget:
    """Client sockets the master may hold at once (connections waiting for their first
    bytes or for a worker, refused ones lingering), from RLIMIT_NOFILE: the limit less a
    reserve and two channels per worker slot (after a reload old and new workers overlap)."""

    def __init__(self, nofile: int, workers: int) -> None:
        self.nofile = nofile
        self.clients = max(FD_CLIENTS_FLOOR, nofile - FD_RESERVE - 2 * workers)

    @property
    def lingering(self) -> int:
        """Refused sockets kept to linger: at most half the client budget."""
        return max(1, self.clients // 2)

    def over(self, held: int) -> bool:
        return held >= self.clients
