"""The per-endpoint pools' bookkeeping without sockets: built once per endpoint, bounded by the
cap (least recently used quiet pools go first), busy or leased pools never closed, all drained
on close."""

from __future__ import annotations

import httpx
import pytest

from meshlib.outbound import transport as transport_module
from meshlib.outbound.pools import EndpointPools, PoolKey, quiet


class FakeTransport:
    """Stands for an endpoint's inner transport; ``busy`` is a connection still in use."""

    def __init__(self, key: PoolKey) -> None:
        self.key = key
        self.busy = False


def make(cap: int) -> tuple[EndpointPools[FakeTransport], list[PoolKey]]:
    built: list[PoolKey] = []

    def build(key: PoolKey) -> FakeTransport:
        built.append(key)
        return FakeTransport(key)

    return EndpointPools(build, cap, lambda t: not t.busy), built


def key(port: int, tls: bool = False) -> PoolKey:
    return (tls, f"127.0.0.1:{port}")


def call(pools: EndpointPools[FakeTransport], k: PoolKey) -> list[PoolKey]:
    """One request to ``k``: lease, release; the keys of the pools it evicted."""
    pool, evicted = pools.lease(k)
    assert pool.transport.key == k
    pools.release(pool)
    return [t.key for t in evicted]


def test_one_pool_per_endpoint_and_tls_ness_built_once() -> None:
    pools, built = make(cap=8)
    for k in [key(1), key(2), key(1), key(1, tls=True), key(2)]:
        assert call(pools, k) == []
    assert built == [key(1), key(2), key(1, tls=True)]
    assert [k for k, _ in pools.items()] == [key(1), key(1, tls=True), key(2)]  # LRU first


def test_past_the_cap_the_least_recently_used_pool_is_evicted() -> None:
    pools, _ = make(cap=2)
    call(pools, key(1))
    call(pools, key(2))
    call(pools, key(1))  # 2 is now the least recently used
    assert call(pools, key(3)) == [key(2)]
    assert [k for k, _ in pools.items()] == [key(1), key(3)]
    for port in range(4, 100):
        assert len(call(pools, key(port))) == 1
        assert len(pools) == 2


def test_busy_and_leased_pools_are_kept_past_the_cap_until_quiet() -> None:
    pools, _ = make(cap=2)
    held, _ = pools.lease(key(1))  # a request being handed to endpoint 1
    call(pools, key(2))
    call(pools, key(2))
    pools.items()[1][1].busy = True  # endpoint 2: a response still being read
    assert call(pools, key(3)) == []  # nothing quiet to close: 3 pools for 2 requests in flight
    assert len(pools) == 3
    pools.release(held)
    assert call(pools, key(4)) == [key(1), key(3)]  # back to the cap, busy 2 kept
    assert [k for k, _ in pools.items()] == [key(2), key(4)]


def test_the_new_pool_is_never_the_one_evicted() -> None:
    pools, _ = make(cap=1)
    pools.items()  # empty
    call(pools, key(1))
    pools.items()[0][1].busy = True
    pool, evicted = pools.lease(key(2))
    assert evicted == [] and pool.transport.key == key(2)
    assert len(pools) == 2


def test_drain_hands_back_every_pool() -> None:
    pools, _ = make(cap=4)
    for port in (1, 2, 3):
        call(pools, key(port))
    assert sorted(t.key for t in pools.drain()) == [key(1), key(2), key(3)]
    assert len(pools) == 0


def test_a_cap_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="cap must be at least 1, got 0"):
        EndpointPools(FakeTransport, 0)


def test_httpx_still_keeps_the_pool_quiet_reads() -> None:
    """``quiet`` reads httpx's private ``_pool``: this fails the day httpx moves it."""
    for transport in (httpx.HTTPTransport(), httpx.AsyncHTTPTransport()):
        assert quiet(transport)  # a real httpcore pool, no connection yet


def test_an_httpx_transport_without_its_pool_is_never_taken_for_quiet() -> None:
    """Taken for quiet, an endpoint's pool could be closed under a response still being read."""
    transport = httpx.HTTPTransport()
    del transport._pool
    with pytest.raises(RuntimeError, match="no longer keep their pool in _pool"):
        quiet(transport)
    assert quiet(object())  # not httpx's: no connection meshlib can see


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://10.0.0.1:8080/x", "10.0.0.1:8080"),
        ("http://10.0.0.1:80/x", "10.0.0.1:80"),  # httpx drops a default port
        ("https://10.0.0.1:443/x", "10.0.0.1:443"),
    ],
)
def test_a_mirrored_copy_leases_the_pool_its_endpoint_address_names(url: str, address: str) -> None:
    """A mirror's pool key is read off its URL: on a default port it must still be the
    endpoint's ``host:port`` (the key of the attempts' pool), never ``host:None``."""
    assert transport_module._address(httpx.Request("GET", url)) == address


def test_every_way_out_of_a_lease_gives_the_lock_back() -> None:
    """lease() takes the lock with acquire/release (cheaper than a with-block): a pool found,
    a pool built, a pool built past the cap, and a build or a quiet check that raises all
    release it (a lock left held would hang the next call to any endpoint)."""
    pools, _ = make(cap=1)
    lock = pools._lock  # the only way to see it: nothing public holds it
    call(pools, key(1))  # built
    assert not lock.locked()
    call(pools, key(1))  # found
    assert not lock.locked()
    assert call(pools, key(2)) == [key(1)]  # built past the cap, one evicted
    assert not lock.locked()

    def refuse(k: PoolKey) -> FakeTransport:
        raise OSError(f"cannot build {k[1]}")

    failing = EndpointPools(refuse, 1, lambda t: True)
    with pytest.raises(OSError, match=r"cannot build 127\.0\.0\.1:3"):
        failing.lease(key(3))
    assert not failing._lock.locked()

    def broken(transport: FakeTransport) -> bool:
        raise RuntimeError("no pool to look at")

    checking = EndpointPools(FakeTransport, 1, broken)
    call(checking, key(4))
    with pytest.raises(RuntimeError, match="no pool to look at"):
        checking.lease(key(5))  # evicting asks whether 4 is quiet
    assert not checking._lock.locked()
