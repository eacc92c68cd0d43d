"""The registry's etcd store: the :class:`~meshlib.control.store.Store` protocol over etcd v3's
JSON gateway (``/v3/kv/*``, ``/v3/lease/*``, ``/v3/watch``) with one ``httpx.AsyncClient``.

How the protocol maps onto etcd (3.4, Debian's ``etcd-server``):

* **Revisions**: store revision = etcd revision − 1. An empty etcd is at revision 1, the
  protocol's empty store at 0, so every revision this store returns, and every ``mod_revision``
  it reads or compares, is shifted by one (``if_mod_rev=0``, "absent", stays etcd's 0: a
  missing key compares as ``mod_revision`` 0).
* **Keys** are stored as ``prefix + key`` so several registries (or tests) share a cluster; the
  prefix never appears in what the store returns.
* **Compare-and-set** is one ``/v3/kv/txn``: compare the key's ``mod_revision``, put (or
  delete) on success, read the key on failure, so :class:`~meshlib.control.store.Conflict`
  carries the actual revision from the same atomic step. ``put_all`` is one txn too: every
  ``if_mod_rev`` compared, every key put on success, every key read on failure.
* **Leases** are etcd leases with the requested TTL: etcd expires them itself (the backstop,
  on real time). In addition the store keeps a deadline, on its injected ``clock``, for every
  lease it granted or kept alive, and revokes the due ones before each operation and in
  :meth:`EtcdStore.expire`, exactly as the Memory store does, so the contract suite runs on a
  fake clock. A lease granted by another process is only known to etcd.
* **Watch** is etcd's watch stream with ``progress_notify``. The gateway's quirks: keys and
  values are base64, int64 fields arrive as strings and zero values are omitted (a PUT event
  has no ``type``, a failed txn no ``succeeded``); a watch cancelled because its start was
  compacted keeps the HTTP stream open, so the store closes it; progress notifications keep a
  stream busy, so a read timeout never fires — each stream is bounded by ``watch_bound``
  seconds of wall-clock time and then reopened after the last revision it delivered (or the
  last settled progress notification: run etcd with
  ``--experimental-watch-progress-notify-interval`` below ``watch_bound`` so a quiet watch
  resumes from a recent revision). A cancel with ``compact_revision`` raises
  :class:`~meshlib.control.store.Compacted`.
* **History**: ``history=None`` leaves compaction to the server (run etcd with
  ``--auto-compaction-mode revision --auto-compaction-retention 1000``). ``history=N`` makes the
  store keep the Memory store's rules itself: after each write, events more than N revisions
  old count as compacted (a watch asking for them, or a consumer that falls behind them, gets
  ``Compacted``), and etcd is compacted physically N revisions behind that point, which leaves
  a watch stream that is still being opened room to start.
* **Endpoints**: a request that fails (connect error, timeout, 5xx such as "no leader" or
  "leader changed") moves to the next endpoint; once every endpoint has been tried and
  ``timeout`` seconds have passed, :class:`~meshlib.control.store.StoreUnavailable`.

What is safe to repeat, and why (after a leader dies the first write's outcome is unknown, so
the store retries it on another endpoint):

* a plain put writes the same value again (at most one extra revision, same final state);
* a delete of a key already gone changes nothing;
* a compare-and-set retried after an unknown outcome that finds its own value (and lease)
  already in place returns that revision instead of raising ``Conflict``: the first attempt
  won; a compare-and-set delete retried that finds the key gone returns the current revision;
  a ``put_all`` retried that finds every one of its values in place (no lease), all written in
  one revision, returns that revision.
  "Retried" covers the store's own retry on the next endpoint and the caller repeating the very
  same write (key, value, lease, ``if_mod_rev``) after it raised ``StoreUnavailable``; a
  write whose attempts were all answered is never taken for a lost one, so two writers racing
  with the same token and the same bytes still see exactly one win;
* a lease grant carries an ID chosen by the store, so a repeated grant answers "lease already
  exists" for the lease it created, which is success; revoke and keepalive are idempotent.

A write that fails with ``StoreUnavailable`` may still happen later (etcd may commit a
proposal it accepted before losing quorum): the caller retries it the same way or reports 503.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from meshlib.control.store import (
    Compacted,
    Conflict,
    Event,
    EventKind,
    Item,
    LeaseNotFound,
    Put,
    StoreClosed,
    StoreError,
    StoreUnavailable,
    check_puts,
)

__all__ = ["EtcdStore"]

#: gRPC status codes the gateway reports in ``{"code": N}``.
_NOT_FOUND = 5
_ALREADY_EXISTS = 9
_OUT_OF_RANGE = 11  # compaction of an already compacted revision

#: How old a progress notification must be before a resumed watch starts after it.
_PROGRESS_SETTLE = 0.25

#: How many keys one range request asks for (a larger range takes several, at one revision).
_PAGE = 1000

#: How many events a watch buffers before it stops reading its stream (etcd then holds the
#: rest and, if compaction passes the watcher, cancels it: the consumer re-lists).
_WATCH_BUFFER = 1000


@dataclass
class _Reply:
    """One gateway answer: ``data`` (the decoded JSON), whether it is an error, and whether an
    earlier attempt of the same request may have been applied (``uncertain``)."""

    status: int
    data: dict[str, Any]
    uncertain: bool

    @property
    def ok(self) -> bool:
        return self.status == 200 and "error" not in self.data

    @property
    def code(self) -> int:
        return int(self.data.get("code", 0))

    @property
    def message(self) -> str:
        return str(self.data.get("message") or self.data.get("error") or self.data)


#: A write as the caller asked for it: (value or None for a delete, lease, if_mod_rev).
_Write = tuple[bytes | None, int | None, int | None]


@dataclass
class _Sent:
    """Whether some attempt of a request went out and got no answer (it may have been applied)."""

    uncertain: bool = False


class _StreamFailed(Exception):
    """A watch stream ended or answered with an error; the watch retries on another endpoint."""


@dataclass(eq=False)  # each watch is itself (the store keeps a set of them)
class _Watch:
    queue: asyncio.Queue[Event | StoreError]
    task: asyncio.Task[None] | None = None
    #: The etcd revision to start from when the stream is (re)opened.
    start: int = 0
    failing_since: float | None = field(default=None)
    #: The last progress notification not yet trusted: (etcd revision, wall-clock arrival).
    progress: tuple[int, float] | None = None

    def note_progress(self, revision: int) -> None:
        self.settle()
        self.progress = (revision, time.monotonic())

    def settle(self) -> None:
        """Trust a progress notification once it is :data:`_PROGRESS_SETTLE` seconds old: a
        resumed stream then starts after its revision, not after the last event (etcd 3.4 can
        send a notification a moment before the event of that revision, so a fresh one is not
        yet proof that everything up to it arrived)."""
        if self.progress is not None and time.monotonic() - self.progress[1] >= _PROGRESS_SETTLE:
            self.start = max(self.start, self.progress[0] + 1)
            self.progress = None

    def resume_point(self) -> int:
        self.settle()
        return self.start


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _range_end(key: bytes) -> bytes:
    """etcd's end of the range of keys starting with ``key`` (b"\\0" for every key)."""
    end = bytearray(key)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def _compare(wire: str, if_mod_rev: int) -> dict[str, str]:
    """A txn compare: ``wire``'s mod_revision is store revision ``if_mod_rev``."""
    etcd_rev = if_mod_rev + 1 if if_mod_rev else 0  # 0: absent, in both
    return {"key": wire, "target": "MOD", "result": "EQUAL", "mod_revision": str(etcd_rev)}


def _parse_endpoints(endpoints: str | Sequence[str]) -> tuple[str, ...]:
    raw = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    urls = tuple(url.strip().rstrip("/") for url in raw if url.strip())
    if not urls:
        raise ValueError(f"EtcdStore needs at least one endpoint URL, got {endpoints!r}")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"etcd endpoint {url!r} is not an http:// or https:// URL")
    return urls


class EtcdStore:
    """The :class:`~meshlib.control.store.Store` protocol on an etcd v3 cluster; mapping, quirks
    and what is safe to repeat in the module docstring."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        prefix: str = "",
        clock: Callable[[], float] = time.monotonic,
        history: int | None = None,
        timeout: float = 2.0,
        watch_bound: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if history is not None and history < 1:
            raise ValueError(f"history must keep at least 1 revision, got {history}")
        if timeout <= 0 or watch_bound <= 0:
            raise ValueError(f"timeout and watch_bound must be > 0, got {timeout}, {watch_bound}")
        self.endpoints = _parse_endpoints(endpoints)
        self._current = 0
        self._prefix = prefix.encode()
        self._clock = clock
        self._history = history
        self._timeout = timeout
        self._watch_bound = watch_bound
        self._rng = rng or random.Random()
        self._client = httpx.AsyncClient(timeout=timeout)
        #: lease id -> (ttl, deadline on ``clock``) for the leases this store granted or kept alive.
        self._leases: dict[int, tuple[int, float]] = {}
        self._expiring = asyncio.Lock()
        #: The store revision events up to which count as compacted (``history`` set only),
        #: and the store revision etcd was last compacted physically to.
        self._compacted = 0
        self._physical = 0
        self._watches: set[_Watch] = set()
        #: Per key, the last write that ended in StoreUnavailable (its outcome is unknown).
        self._unsure: dict[str, _Write | tuple[Put, ...]] = {}
        self._closed = False

    @property
    def endpoint(self) -> str:
        """The endpoint the next request goes to."""
        return self.endpoints[self._current]

    # -- the protocol -------------------------------------------------------------------

    async def range(self, prefix: str) -> tuple[int, list[Item]]:
        await self._touch()
        operation = f"range {prefix!r}"
        key, end = self._span(prefix)
        request: dict[str, Any] = {"key": key, "range_end": end, "limit": str(_PAGE)}
        items: list[Item] = []
        revision: int | None = None
        while True:
            # Pages of _PAGE keys, every page after the first read at the first one's
            # revision: one consistent snapshot without one huge gateway answer.
            reply = await self._call(operation, "/v3/kv/range", request)
            self._refuse(reply, operation)
            kvs = reply.data.get("kvs", [])
            items.extend(self._item(kv) for kv in kvs)
            if revision is None:
                revision = self._revision(reply.data)
                request["revision"] = str(revision + 1)
            if not reply.data.get("more") or not kvs:
                return revision, items
            request["key"] = _b64(base64.b64decode(kvs[-1]["key"]) + b"\0")

    async def put(
        self, key: str, value: bytes, *, lease: int | None = None, if_mod_rev: int | None = None
    ) -> int:
        await self._touch()
        if not key:
            raise ValueError("a store key must not be empty")
        operation = f"put {key!r}"
        wire = self._key(key)
        request: dict[str, Any] = {"key": wire, "value": _b64(bytes(value))}
        if lease is not None:
            request["lease"] = str(lease)
        body = self._txn(wire, if_mod_rev, {"request_put": request})
        reply = await self._write(operation, key, body, (bytes(value), lease, if_mod_rev))
        if not reply.ok and lease is not None and reply.code == _NOT_FOUND:
            self._leases.pop(lease, None)
            raise LeaseNotFound(lease)
        self._refuse(reply, operation)
        revision = self._revision(reply.data)
        if reply.data.get("succeeded"):
            await self._compact(revision)
            return revision
        assert if_mod_rev is not None  # a txn without a compare always succeeds
        current = self._current_kv(reply.data)
        if (
            reply.uncertain
            and current is not None
            and base64.b64decode(current.get("value", "")) == bytes(value)
            and int(current.get("lease", 0)) == (lease or 0)
        ):
            # An earlier attempt whose answer was lost did write: this is our own value.
            return int(current["mod_revision"]) - 1
        raise Conflict(key, if_mod_rev, self._mod_revision(current))

    async def put_all(self, puts: Sequence[Put]) -> int:
        await self._touch()
        check_puts(puts)
        operation = "put " + ", ".join(repr(key) for key, _, _ in puts)
        wires = [self._key(key) for key, _, _ in puts]
        body: dict[str, Any] = {
            "success": [
                {"request_put": {"key": wire, "value": _b64(bytes(value))}}
                for wire, (_, value, _) in zip(wires, puts, strict=True)
            ]
        }
        compares = [
            _compare(wire, if_mod_rev)
            for wire, (_, _, if_mod_rev) in zip(wires, puts, strict=True)
            if if_mod_rev is not None
        ]
        if compares:
            body["compare"] = compares
            body["failure"] = [{"request_range": {"key": wire}} for wire in wires]
        written = tuple((key, bytes(value), if_mod_rev) for key, value, if_mod_rev in puts)
        reply = await self._write(operation, "\0".join(wires), body, written)
        self._refuse(reply, operation)
        revision = self._revision(reply.data)
        if reply.data.get("succeeded"):
            await self._compact(revision)
            return revision
        currents = self._current_kvs(reply.data)
        mine = [
            kv is not None
            and base64.b64decode(kv.get("value", "")) == value
            and not int(kv.get("lease", 0))
            for kv, (_, value, _) in zip(currents, written, strict=True)
        ]
        revisions = {int(kv["mod_revision"]) for kv in currents if kv is not None}
        if reply.uncertain and all(mine) and len(revisions) == 1:
            # An earlier attempt whose answer was lost wrote every key, in one revision.
            return revisions.pop() - 1
        for kv, (key, _, if_mod_rev) in zip(currents, written, strict=True):
            if if_mod_rev is not None and self._mod_revision(kv) != if_mod_rev:
                raise Conflict(key, if_mod_rev, self._mod_revision(kv))
        raise StoreError(f"etcd refused {operation}: a compare failed, yet every key matches")

    async def delete(self, key: str, *, if_mod_rev: int | None = None) -> int:
        await self._touch()
        operation = f"delete {key!r}"
        wire = self._key(key)
        body = self._txn(wire, if_mod_rev, {"request_delete_range": {"key": wire}})
        reply = await self._write(operation, key, body, (None, None, if_mod_rev))
        self._refuse(reply, operation)
        revision = self._revision(reply.data)
        if reply.data.get("succeeded"):
            await self._compact(revision)
            return revision
        assert if_mod_rev is not None
        current = self._current_kv(reply.data)
        if reply.uncertain and current is None:
            return revision  # an earlier attempt whose answer was lost deleted it
        raise Conflict(key, if_mod_rev, self._mod_revision(current))

    async def grant(self, ttl: int) -> int:
        await self._touch()
        if not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"a lease TTL is a whole number of seconds >= 1, got {ttl!r}")
        for _ in range(5):
            # The store picks the ID, so a grant retried after a lost answer is recognised.
            lease = self._rng.randrange(1, 2**62)
            body = {"TTL": str(ttl), "ID": str(lease)}
            reply = await self._call(f"grant {ttl}s", "/v3/lease/grant", body)
            if reply.ok or (reply.uncertain and reply.code == _ALREADY_EXISTS):
                self._leases[lease] = (ttl, self._clock() + ttl)
                return lease
            if reply.code != _ALREADY_EXISTS:
                self._refuse(reply, f"grant {ttl}s")
        raise StoreError("etcd refused five random lease IDs as already existing")

    async def keepalive(self, lease: int) -> None:
        await self._touch()
        reply = await self._call(f"keepalive {lease}", "/v3/lease/keepalive", {"ID": str(lease)})
        self._refuse(reply, f"keepalive {lease}")
        # The gateway streams {"result": ...}; an unknown lease answers with no TTL (zero).
        ttl = int(reply.data.get("result", {}).get("TTL", 0))
        if ttl <= 0:
            self._leases.pop(lease, None)
            raise LeaseNotFound(lease)
        self._leases[lease] = (ttl, self._clock() + ttl)

    async def revoke(self, lease: int) -> int:
        await self._touch()
        known = self._leases.pop(lease, None) is not None
        reply = await self._call(f"revoke {lease}", "/v3/lease/revoke", {"ID": str(lease)})
        if not reply.ok and reply.code == _NOT_FOUND:
            if not (reply.uncertain and known):
                raise LeaseNotFound(lease)
            return await self._head("revoke")  # a lost answer: our first attempt revoked it
        self._refuse(reply, f"revoke {lease}")
        revision = self._revision(reply.data)
        await self._compact(revision)
        return revision

    async def expire(self) -> int:
        await self._touch()
        return await self._head("expire")

    async def status(self) -> int:
        """A linearizable read of the cluster (it needs a leader and a quorum); returns the
        store's revision, or raises :class:`StoreUnavailable`."""
        self._check_open()
        return await self._head("status")

    def watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        return self._watch(prefix, after_rev)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches):
            if watch.task is not None:
                watch.task.cancel()
            while not watch.queue.empty():
                watch.queue.get_nowait()
            watch.queue.put_nowait(StoreClosed())
        # Closed from another event loop than the one that used it (a test's teardown), the
        # client's sockets went with that loop: nothing is left to close.
        with contextlib.suppress(RuntimeError):
            await self._client.aclose()

    # -- requests -----------------------------------------------------------------------

    async def _call(
        self, operation: str, path: str, body: dict[str, Any], sent: _Sent | None = None
    ) -> _Reply:
        """POST ``body`` to ``path``, moving across endpoints until one answers or ``timeout``
        seconds pass (then :class:`StoreUnavailable`); ``sent`` learns whether an attempt
        without an answer may have been applied."""
        self._check_open()
        deadline = time.monotonic() + self._timeout
        sent = sent or _Sent()
        tried = 0
        while True:
            url = self.endpoints[self._current]
            # One endpoint gets its share of the budget, not all of it: a follower that cut
            # off from a dead leader holds a request until etcd's own timeout, while another
            # endpoint may already answer.
            share = max(self._timeout / len(self.endpoints), 0.25)
            attempt = max(min(share, deadline - time.monotonic()), 0.05)
            try:
                response = await self._client.post(url + path, json=body, timeout=attempt)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                reason = f"{url}: cannot connect ({type(exc).__name__} {exc})"
            except httpx.TransportError as exc:
                # Sent, but no answer: the request may have been applied.
                sent.uncertain = True
                reason = f"{url}: {type(exc).__name__} ({exc or 'no answer'})"
            else:
                data = self._json(response)
                if response.status_code < 500 and response.status_code != 429:
                    return _Reply(response.status_code, data, sent.uncertain)
                sent.uncertain = True
                reason = f"{url}: HTTP {response.status_code} {data.get('message', '')}".strip()
            if self._closed:
                raise StoreClosed()
            tried += 1
            self._current = (self._current + 1) % len(self.endpoints)
            remaining = deadline - time.monotonic()
            if remaining <= 0 and tried >= len(self.endpoints):
                raise StoreUnavailable(operation, reason)
            if tried % len(self.endpoints) == 0:
                # Every endpoint failed once: give an election a moment before the next round.
                await asyncio.sleep(min(0.1, max(remaining, 0.0)))

    async def _write(
        self, operation: str, key: str, body: dict[str, Any], write: _Write | tuple[Put, ...]
    ) -> _Reply:
        """A txn on ``key`` that is safe to repeat: when an earlier call of the very same write
        ended in :class:`StoreUnavailable` (outcome unknown), this one is marked uncertain, so
        finding that write already done counts as success rather than a conflict."""
        retrying = self._unsure.get(key) == write
        sent = _Sent()
        try:
            reply = await self._call(operation, "/v3/kv/txn", body, sent)
        except StoreUnavailable:
            if sent.uncertain or retrying:
                self._unsure[key] = write
            raise
        self._unsure.pop(key, None)
        if retrying:
            reply.uncertain = True
        return reply

    async def _head(self, operation: str) -> int:
        """The store's revision from a linearizable read (needs a leader and a quorum)."""
        reply = await self._call(operation, "/v3/kv/range", {"key": _b64(b"\0")})
        self._refuse(reply, operation)
        return self._revision(reply.data)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            return {"error": response.text[:200]}
        return data if isinstance(data, dict) else {"error": str(data)[:200]}

    @staticmethod
    def _refuse(reply: _Reply, operation: str) -> None:
        if not reply.ok:
            raise StoreError(f"etcd refused {operation}: {reply.message} (HTTP {reply.status})")

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed()

    async def _touch(self) -> None:
        """Revoke, oldest deadline first, the leases this store holds whose deadline passed."""
        self._check_open()
        now = self._clock()
        if not self._expiring.locked() and all(d > now for _, d in self._leases.values()):
            return
        async with self._expiring:
            now = self._clock()
            due = sorted((d, lease) for lease, (_, d) in self._leases.items() if d <= now)
            for _, lease in due:
                held = self._leases.pop(lease, None)
                if held is None:
                    continue  # revoked meanwhile by another task
                try:
                    reply = await self._call(
                        f"revoke {lease}", "/v3/lease/revoke", {"ID": str(lease)}
                    )
                except StoreError:
                    self._leases[lease] = held  # due still: the next operation tries again
                    raise
                if not reply.ok and reply.code != _NOT_FOUND:  # gone already: etcd expired it
                    self._refuse(reply, f"revoke {lease}")

    async def _compact(self, revision: int) -> None:
        """With ``history`` set, move the compaction point to ``revision - history`` and compact
        etcd physically ``history`` revisions behind it."""
        if self._history is None:
            return
        self._compacted = max(self._compacted, revision - self._history)
        target = self._compacted - self._history
        if target <= self._physical:
            return
        self._physical = target
        # etcd keeps revision X when compacted to X: store revision r is etcd r + 1, and a
        # watch may still start after ``target``, i.e. at etcd target + 2.
        reply = await self._call("compact", "/v3/kv/compaction", {"revision": str(target + 2)})
        if not reply.ok and reply.code != _OUT_OF_RANGE:
            self._refuse(reply, "compact")

    # -- mapping ------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        return _b64(self._prefix + key.encode())

    def _span(self, prefix: str) -> tuple[str, str]:
        start = self._prefix + prefix.encode()
        return _b64(start or b"\0"), _b64(_range_end(start))

    def _strip(self, wire: str) -> str:
        return base64.b64decode(wire)[len(self._prefix) :].decode()

    @staticmethod
    def _revision(data: dict[str, Any]) -> int:
        return int(data.get("header", {}).get("revision", 1)) - 1

    @staticmethod
    def _txn(wire: str, if_mod_rev: int | None, success: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {"success": [success]}
        if if_mod_rev is not None:
            body["compare"] = [_compare(wire, if_mod_rev)]
            body["failure"] = [{"request_range": {"key": wire}}]
        return body

    @staticmethod
    def _current_kvs(data: dict[str, Any]) -> list[dict[str, Any] | None]:
        """What a failed txn's reads found: each key's kv, None where it is absent."""
        return [
            (r.get("response_range", {}).get("kvs") or [None])[0] for r in data.get("responses", [])
        ]

    @classmethod
    def _current_kv(cls, data: dict[str, Any]) -> dict[str, Any] | None:
        return (cls._current_kvs(data) or [None])[0]

    @staticmethod
    def _mod_revision(kv: dict[str, Any] | None) -> int:
        return 0 if kv is None else int(kv["mod_revision"]) - 1

    def _item(self, kv: dict[str, Any]) -> Item:
        lease = int(kv.get("lease", 0))
        return Item(
            self._strip(kv["key"]),
            base64.b64decode(kv.get("value", "")),
            int(kv["mod_revision"]) - 1,
            lease or None,
        )

    def _event(self, raw: dict[str, Any]) -> Event:
        kv = raw["kv"]
        if raw.get("type") == "DELETE":
            return Event(EventKind.DELETE, self._strip(kv["key"]), b"", int(kv["mod_revision"]) - 1)
        return Event(
            EventKind.PUT,
            self._strip(kv["key"]),
            base64.b64decode(kv.get("value", "")),
            int(kv["mod_revision"]) - 1,
        )

    # -- watch --------------------------------------------------------------------------

    async def _watch(self, prefix: str, after_rev: int) -> AsyncIterator[Event]:
        self._check_open()
        if after_rev < self._compacted:
            raise Compacted(self._compacted, after_rev)
        watch = _Watch(asyncio.Queue(_WATCH_BUFFER), start=after_rev + 2)
        watch.task = asyncio.ensure_future(self._follow(prefix, watch))
        self._watches.add(watch)
        cursor = after_rev
        try:
            while True:
                item = await watch.queue.get()
                if isinstance(item, StoreError):
                    raise item
                if item.mod_revision <= self._compacted:
                    # A consumer more than ``history`` revisions behind, as in the Memory store.
                    raise Compacted(self._compacted, cursor)
                yield item
                cursor = item.mod_revision
        finally:
            self._watches.discard(watch)
            watch.task.cancel()

    async def _follow(self, prefix: str, watch: _Watch) -> None:
        """Feed ``watch``'s queue from etcd, one wall-clock-bounded stream after another."""
        reason = "no stream opened"
        try:
            while True:
                url = self.endpoints[self._current]
                try:
                    await asyncio.wait_for(self._stream(url, prefix, watch), self._watch_bound)
                    reason = f"{url}: the watch stream ended"
                except asyncio.TimeoutError:
                    continue  # the wall-clock bound: reopen after the last revision delivered
                except (httpx.TransportError, _StreamFailed, ValueError, KeyError) as exc:
                    reason = f"{url}: {type(exc).__name__} ({exc})"
                now = time.monotonic()
                if watch.failing_since is None:
                    watch.failing_since = now
                elif now - watch.failing_since > self._timeout:
                    raise StoreUnavailable(f"watch {prefix!r}", reason)
                self._current = (self._current + 1) % len(self.endpoints)
                await asyncio.sleep(0.05)
        except StoreError as exc:
            await watch.queue.put(exc)

    async def _stream(self, url: str, prefix: str, watch: _Watch) -> None:
        key, end = self._span(prefix)
        start = watch.resume_point()
        request = {
            "create_request": {
                "key": key,
                "range_end": end,
                "start_revision": str(start),
                "progress_notify": True,
            }
        }
        # No read timeout: progress notifications would defeat it; the caller bounds the
        # stream by wall-clock time instead.
        timeout = httpx.Timeout(self._timeout, read=None)
        async with self._client.stream(
            "POST", url + "/v3/watch", json=request, timeout=timeout
        ) as response:
            if response.status_code != 200:
                raise _StreamFailed(f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.strip():
                    continue
                message = json.loads(line)
                result = message.get("result")
                if result is None:
                    raise _StreamFailed(str(message.get("error", message))[:200])
                if result.get("canceled"):
                    compacted = int(result.get("compact_revision", 0))
                    if compacted:
                        # The stream stays open after this: leaving the block closes it.
                        raise Compacted(max(compacted - 2, 0), start - 2)
                    raise _StreamFailed(str(result.get("cancel_reason", "watch cancelled")))
                watch.failing_since = None
                events = result.get("events", [])
                for raw in events:
                    event = self._event(raw)
                    await watch.queue.put(event)
                    watch.start = event.mod_revision + 2
                if not events and not result.get("created"):
                    # A progress notification: every event up to its revision was sent (a
                    # quiet watch resumes from there, not from its last event, so compaction
                    # of other prefixes' history does not cut it off).
                    watch.note_progress(int(result["header"]["revision"]))
