"""Per-IP and capacity counters: limits hold, releases balance, IPv4-mapped folds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmqpd.limits import (
    FD_CLIENTS_FLOOR,
    FD_RESERVE,
    Capacity,
    DescriptorBudget,
    Ledger,
    PerIpCounter,
    fold_ip,
)


def test_fold_ip_maps_v4_mapped_and_compacts_v6() -> None:
    assert fold_ip("::ffff:10.1.2.3") == "10.1.2.3"
    assert fold_ip("::FFFF:10.1.2.3") == "10.1.2.3"
    assert fold_ip("2001:0db8:0000:0000:0000:0000:0000:0001") == "2001:db8::1"
    assert fold_ip("fe80::1%eth0") == "fe80::1"
    assert fold_ip("not an ip") == "not an ip"


def test_acquire_stops_at_limit_and_release_frees() -> None:
    counter = PerIpCounter()
    assert all(counter.acquire("10.0.0.1", 3) for _ in range(3))
    assert not counter.acquire("10.0.0.1", 3)
    assert counter.acquire("10.0.0.2", 3)
    counter.release("10.0.0.1")
    assert counter.acquire("10.0.0.1", 3)
    assert counter.count("10.0.0.1") == 3


def test_mapped_and_plain_share_one_count() -> None:
    counter = PerIpCounter()
    assert counter.acquire("::ffff:192.0.2.7", 2)
    assert counter.acquire("192.0.2.7", 2)
    assert not counter.acquire("::ffff:192.0.2.7", 2)
    counter.release("192.0.2.7")
    counter.release("::ffff:192.0.2.7")
    assert counter.count("192.0.2.7") == 0
    assert len(counter) == 0


def test_limit_zero_means_no_limit() -> None:
    counter = PerIpCounter()
    assert all(counter.acquire("10.0.0.1", 0) for _ in range(1000))
    assert counter.count("10.0.0.1") == 1000


def test_release_without_acquire_is_an_error() -> None:
    counter = PerIpCounter()
    with pytest.raises(ValueError):
        counter.release("10.0.0.1")
    counter.acquire("10.0.0.1", 1)
    counter.release("10.0.0.1")
    with pytest.raises(ValueError):
        counter.release("10.0.0.1")


def test_busiest_orders_by_count() -> None:
    counter = PerIpCounter()
    for ip, n in (("10.0.0.1", 1), ("10.0.0.2", 4), ("10.0.0.3", 2)):
        for _ in range(n):
            counter.acquire(ip, 0)
    assert counter.busiest(2) == [("10.0.0.2", 4), ("10.0.0.3", 2)]


def test_capacity_full_and_resize() -> None:
    capacity = Capacity(2)
    assert capacity.acquire() and capacity.acquire()
    assert capacity.full and not capacity.acquire()
    capacity.resize(1)
    capacity.release()
    assert capacity.full
    capacity.release()
    assert capacity.busy == 0 and not capacity.full
    with pytest.raises(ValueError):
        capacity.release()
    with pytest.raises(ValueError):
        Capacity(0)


ips = st.sampled_from(["10.0.0.1", "::ffff:10.0.0.1", "10.0.0.2", "2001:db8::1"])


@given(st.lists(st.tuples(st.booleans(), ips), max_size=200), st.integers(0, 4))
def test_counts_match_a_model_and_never_exceed_the_limit(
    ops: list[tuple[bool, str]], limit: int
) -> None:
    counter = PerIpCounter()
    model: dict[str, int] = {}
    for take, ip in ops:
        key = fold_ip(ip)
        if take:
            granted = counter.acquire(ip, limit)
            assert granted == (limit == 0 or model.get(key, 0) < limit)
            if granted:
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0):
            counter.release(ip)
            model[key] -= 1
        if limit:
            assert counter.count(ip) <= limit
        assert counter.count(ip) == model.get(key, 0)
    assert sum(count for _ip, count in counter.busiest(len(counter))) == sum(model.values())


def test_descriptor_budget_keeps_a_reserve_and_three_fds_per_worker() -> None:
    budget = DescriptorBudget(1024, 75 + 4)
    assert budget.clients == 1024 - FD_RESERVE - 3 * 79
    assert budget.lingering == budget.clients // 2
    assert not budget.over(budget.clients - 1) and budget.over(budget.clients)


def test_descriptor_budget_never_below_its_floor() -> None:
    budget = DescriptorBudget(64, 75)
    assert budget.clients == FD_CLIENTS_FLOOR and budget.lingering >= 1


def test_a_lease_holds_both_slots_until_its_one_release() -> None:
    ledger = Ledger(1)
    lease = ledger.admit("::ffff:10.0.0.1", 1)
    assert lease is not None and lease.ip == "10.0.0.1"
    assert ledger.admit("10.0.0.1", 1) is None  # MAXPERIP 1 holds
    assert ledger.start(lease) and ledger.full
    assert not ledger.start(lease)  # already a worker's
    assert ledger.release(lease) and ledger.idle()


def test_a_second_release_is_refused_and_counted_not_raised() -> None:
    ledger = Ledger(2)
    lease = ledger.admit("10.0.0.1", 0)
    other = ledger.admit("10.0.0.1", 0)
    assert lease is not None and other is not None
    assert ledger.release(lease)
    assert not ledger.release(lease)  # logged, ignored: the other client's slot stays
    assert ledger.double_releases == 1
    assert ledger.per_ip.count("10.0.0.1") == 1
    assert ledger.release(other) and ledger.idle()
