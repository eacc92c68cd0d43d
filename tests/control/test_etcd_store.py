"""The etcd store against real etcd processes, past the store contract: endpoint rotation, a
leader killed under compare-and-set writes, quorum loss, server-side compaction under a live
watch, and a lease that etcd itself expires."""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
from collections.abc import Callable
from contextlib import aclosing

import httpx
import pytest
from etcd_cluster import EtcdCluster
from harness import ChaosProxy
from policy.fakes import FakeClock

from meshlib.control import (
    Compacted,
    Conflict,
    EtcdStore,
    EventKind,
    LeaseNotFound,
    StoreUnavailable,
)

pytestmark = [pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def dead_url() -> str:
    """A loopback URL nothing listens on (the port was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.mark.timeout(20)
async def test_a_dead_first_endpoint_rotates_to_a_live_one(etcd: EtcdCluster) -> None:
    dead = dead_url()
    store = EtcdStore(f"{dead},{etcd.endpoints[0]}", timeout=2.0)
    try:
        assert await store.put("k", b"v") == 1
        assert store.endpoint == etcd.endpoints[0]
        assert [i.value for i in (await store.range("k"))[1]] == [b"v"]
    finally:
        await store.close()


def test_endpoints_are_checked() -> None:
    with pytest.raises(ValueError, match=re.escape("'127.0.0.1:2379' is not an http")):
        EtcdStore("127.0.0.1:2379")
    with pytest.raises(ValueError, match="at least one endpoint"):
        EtcdStore(" , ")


@pytest.mark.timeout(60)
async def test_cas_writes_survive_a_sigkilled_leader_none_lost_or_doubled(
    etcd3: EtcdCluster,
) -> None:
    """Each write is a compare-and-set on the previous one; the caller repeats a write that
    ended in StoreUnavailable. The store talks to the leader first (writes and a live watch),
    so killing it breaks both: the writes resume on a survivor and the watch moves there,
    and the key's history (and the live watch) hold every value exactly once."""
    leader = etcd3.leader()
    others = [url for url in etcd3.endpoints if url != leader.client_url]
    store = EtcdStore([leader.client_url, *others], timeout=2.0)
    writes, kill_at = 60, 20
    longest_gap = 0.0
    try:
        revision = await store.put("counter", b"0", if_mod_rev=0)
        first = revision

        async def follow() -> list[int]:
            seen: list[int] = []
            async with aclosing(store.watch("counter", first - 1)) as events:
                while len(seen) < writes + 1:
                    event = await events.__anext__()
                    assert event.kind is EventKind.PUT
                    seen.append(int(event.value))
            return seen

        live = asyncio.ensure_future(follow())
        last_ok = time.monotonic()
        for n in range(1, writes + 1):
            if n == kill_at:
                leader.kill()
            while True:
                try:
                    revision = await store.put("counter", str(n).encode(), if_mod_rev=revision)
                    break
                except StoreUnavailable:
                    # Unknown outcome: repeat the very same write.
                    assert time.monotonic() - last_ok < 15, "writes did not resume"
            now = time.monotonic()
            longest_gap = max(longest_gap, now - last_ok)
            last_ok = now

        expected = list(range(writes + 1))
        assert await asyncio.wait_for(live, 10) == expected, "the live watch missed or repeated"
        values = []
        async with aclosing(store.watch("counter", first - 1)) as events:
            while len(values) < writes + 1:
                event = await asyncio.wait_for(events.__anext__(), 10)
                values.append(int(event.value))
        assert values == expected, "a write was lost or applied twice"
        assert (await store.range("counter"))[0] == revision
        # Writes resume within a few seconds of the leader's death (the bound).
        assert longest_gap < 10, longest_gap
    finally:
        await store.close()


@pytest.mark.timeout(40)
async def test_no_quorum_is_store_unavailable_naming_operation_and_reason(
    etcd3: EtcdCluster,
) -> None:
    store = EtcdStore(etcd3.endpoints, timeout=1.0)
    try:
        assert await store.status() == 0
        etcd3.nodes[0].kill()
        etcd3.nodes[1].kill()
        with pytest.raises(StoreUnavailable) as info:
            await store.put("k", b"v")
        assert info.value.operation == "put 'k'"
        assert "put 'k'" in str(info.value) and info.value.reason in str(info.value)
        assert "127.0.0.1" in info.value.reason
        with pytest.raises(StoreUnavailable) as info:
            await store.status()
        assert info.value.operation == "status"
    finally:
        await store.close()


@pytest.mark.timeout(20)
async def test_a_live_watch_compacted_by_the_server_raises_and_relisting_resumes(
    etcd: EtcdCluster,
) -> None:
    """The watch's stream is reopened after its wall-clock bound from the last revision it
    delivered; the server compacted past it meanwhile, so it cancels the new stream."""
    store = EtcdStore(etcd.endpoints, watch_bound=0.3)
    try:
        at = await store.put("w/a", b"1")
        async with aclosing(store.watch("w/", 0)) as events:
            first = await asyncio.wait_for(events.__anext__(), 5)
            assert (first.key, first.mod_revision) == ("w/a", at)
            for n in range(5):
                latest = await store.put("other/x", str(n).encode())
            async with httpx.AsyncClient() as client:
                # Store revision r is etcd revision r + 1.
                answer = await client.post(
                    etcd.endpoints[0] + "/v3/kv/compaction", json={"revision": str(latest + 1)}
                )
                assert answer.status_code == 200, answer.text
            with pytest.raises(Compacted) as info:
                await asyncio.wait_for(events.__anext__(), 10)
            assert info.value.revision == latest - 1

        revision, items = await store.range("w/")
        assert [(i.key, i.value) for i in items] == [("w/a", b"1")]
        async with aclosing(store.watch("w/", revision)) as events:
            written = await store.put("w/b", b"2")
            event = await asyncio.wait_for(events.__anext__(), 5)
            assert (event.key, event.value, event.mod_revision) == ("w/b", b"2", written)
    finally:
        await store.close()


@pytest.mark.timeout(20)
async def test_a_lease_never_kept_alive_is_expired_by_etcd_and_watched(etcd: EtcdCluster) -> None:
    """The granting store's clock never moves, so only etcd's own expiry can remove the key."""
    granter = EtcdStore(etcd.endpoints, clock=FakeClock())
    observer = EtcdStore(etcd.endpoints)
    try:
        lease = await granter.grant(1)
        at = await granter.put("inst/a", b"x", lease=lease)
        async with aclosing(observer.watch("inst/", at)) as events:
            event = await asyncio.wait_for(events.__anext__(), 10)
        assert (event.kind, event.key, event.mod_revision) == (EventKind.DELETE, "inst/a", at + 1)
        assert (await observer.range("inst/"))[1] == []
        with pytest.raises(LeaseNotFound):
            await granter.keepalive(lease)
    finally:
        await granter.close()
        await observer.close()


@pytest.mark.timeout(20)
async def test_a_compare_and_set_whose_answer_is_lost_is_safe_to_repeat(
    etcd: EtcdCluster, chaos_factory: Callable[..., ChaosProxy]
) -> None:
    """The proxy lets the request reach etcd and resets the connection instead of the answer:
    the write happened, the store cannot know. Retried, it finds its own value and returns
    that revision instead of a Conflict."""
    proxy = chaos_factory(etcd.endpoints[0])
    store = EtcdStore([proxy.url, etcd.endpoints[0]], timeout=2.0)
    lone = EtcdStore(proxy.url, timeout=0.5)
    try:
        first = await store.put("k", b"v0", if_mod_rev=0)
        proxy.set_mode("reset_after", n=0)
        # Within one call: retried on the next endpoint.
        second = await store.put("k", b"v1", if_mod_rev=first)
        assert second == first + 1
        assert [(i.value, i.mod_revision) for i in (await store.range("k"))[1]] == [(b"v1", second)]
        # Across calls: the write ends in StoreUnavailable, the caller repeats it.
        with pytest.raises(StoreUnavailable):
            await lone.put("k", b"v2", if_mod_rev=second)
        proxy.set_mode("pass")
        assert await lone.put("k", b"v2", if_mod_rev=second) == second + 1
        # Another write with the same stale token still loses.
        with pytest.raises(Conflict) as info:
            await store.put("k", b"v3", if_mod_rev=second)
        assert info.value.actual == second + 1
    finally:
        await store.close()
        await lone.close()


@pytest.mark.timeout(20)
async def test_a_watch_with_no_endpoint_left_raises_store_unavailable(etcd: EtcdCluster) -> None:
    """A registry replica marks itself non-authoritative while its mirror's watch is broken:
    the watch must say so, not wait forever."""
    store = EtcdStore(etcd.endpoints, timeout=0.5)
    try:
        at = await store.put("w/a", b"1")
        async with aclosing(store.watch("w/", at - 1)) as events:
            assert (await asyncio.wait_for(events.__anext__(), 5)).key == "w/a"
            etcd.nodes[0].kill()
            with pytest.raises(StoreUnavailable) as info:
                await asyncio.wait_for(events.__anext__(), 10)
        assert info.value.operation == "watch 'w/'"
        assert etcd.endpoints[0] in info.value.reason
    finally:
        await store.close()


@pytest.mark.timeout(20)
async def test_a_quiet_watch_resumed_after_its_bound_is_not_cut_off_by_compaction(
    etcd: EtcdCluster,
) -> None:
    """Other prefixes write and the server compacts past the quiet watch's last event; its
    stream is reopened after the wall-clock bound from the last progress notification, so its
    next event arrives instead of Compacted."""
    store = EtcdStore(etcd.endpoints, watch_bound=1.5)
    try:
        at = await store.put("quiet/a", b"1")
        async with aclosing(store.watch("quiet/", at - 1)) as events:
            assert (await asyncio.wait_for(events.__anext__(), 5)).key == "quiet/a"
            pending = asyncio.ensure_future(events.__anext__())
            for n in range(5):
                latest = await store.put("busy/x", str(n).encode())
            async with httpx.AsyncClient() as client:
                answer = await client.post(
                    etcd.endpoints[0] + "/v3/kv/compaction", json={"revision": str(latest + 1)}
                )
                assert answer.status_code == 200, answer.text
            # Real time is the property here: the stream is reopened after 1.5 s (the fixture's
            # etcd sends progress notifications every 500 ms, the first ~1 s after an event).
            await asyncio.sleep(2.5)
            assert not pending.done()
            written = await store.put("quiet/b", b"2")
            event = await asyncio.wait_for(pending, 5)
            assert (event.key, event.mod_revision) == ("quiet/b", written)
    finally:
        await store.close()


@pytest.mark.timeout(20)
async def test_a_range_larger_than_a_page_is_one_consistent_snapshot(etcd: EtcdCluster) -> None:
    """2,500 keys (written straight through the gateway, 125 per txn) come back in several
    pages, all read at the revision of the first."""
    keys = [f"many/{n:05d}" for n in range(2500)]
    async with httpx.AsyncClient(base_url=etcd.endpoints[0]) as client:
        for start in range(0, len(keys), 125):
            puts = [
                {"request_put": {"key": b64(key.encode()), "value": b64(key.encode())}}
                for key in keys[start : start + 125]
            ]
            answer = await client.post("/v3/kv/txn", json={"success": puts})
            assert answer.status_code == 200, answer.text
    store = EtcdStore(etcd.endpoints)
    try:
        revision, items = await store.range("many/")
        assert revision == 20  # 20 txns
        assert [i.key for i in items] == keys
        assert all(i.value == i.key.encode() and i.mod_revision >= 1 for i in items)
        await store.delete("many/00000")
        assert (await store.range("many/"))[1][0].key == "many/00001"
    finally:
        await store.close()
