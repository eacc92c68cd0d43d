"""The registry service as a plain ASGI app: the HTTP API of docs/control-plane.md ("The API")
driving the pure :class:`~meshlib.control.registry.Registry` core and persisting it in a
:class:`~meshlib.control.store.Store`.

Store key layout (values are UTF-8 JSON unless said)::

    /registry/epoch                       the epoch, plain text
    /registry/instances/<ns>/<svc>/<id>   one instance (its times as wall-clock seconds)
    /registry/indexes/<ns>/<svc>          a service's index (an integer), kept after it empties
    /registry/policy/<N, 10 digits>       policy version N (append-only; written with
                                          if_mod_rev=0, so a version is never overwritten)
    /registry/tokens/<id>                 a join token's record (meshlib/control/tokens.py;
                                          not loaded into the core)

Rules the driver keeps:

* **Write, then answer.** Every accepted write is in the store before its answer is sent: a
  crash after an answer never loses what it acknowledged.
* **Plan, persist, commit.** A write asks the core what it would do (``plan_*``), writes that to
  the store, and only then commits it to the core, one write at a time: a store failure (503 +
  ``Retry-After``) leaves memory as it was, and no reader ever sees, and builds on, an index the
  store then refused. A registration writes its index and record in one store write; a drain
  or an expiry writes the index key before the delete it counts, so a half-done write leaves
  the store at most one spurious index ahead, never behind.
* **Restart.** Startup loads the core from the store: a stored epoch is kept (clients keep their
  index), an empty store gets a fresh random one (clients reset). The core warms either way.
  Times are stored as wall-clock seconds and mapped onto the monotonic ``clock`` on load.
* **Heartbeats are cheap.** A beat writes the store only when the instance's persisted beat is
  older than a third of its TTL, or its policy report changed: after a restart an instance's
  TTL resumes from a beat at most ``ttl/3`` old (RELIABILITY.md FAULT-7). An instance beating
  at the interval its registration answers (``ttl/3``, ± jitter) therefore writes about every
  second beat: 1,000 instances beating every 3 s with a 10 s TTL write about 170 times a
  second, not 333 (``benchmarks/registry_app.py`` counts 0.4–0.5 writes per beat; on SQLite a
  write is ~0.1 ms, under a tenth of a beat's whole cost, docs/performance.md "Registry").
* **One wake-up per service.** Each watched service (and the policy) has its own
  :class:`asyncio.Event`; a change sets only that one. ``wakeups`` counts the held queries a
  change woke (LOAD-6: a change to one service wakes only its watchers). The end of warming is
  a change to every answer (``authoritative`` turns true): the pass that sees it wakes all.
* **Replicas** (``replicas=True``: several processes over one etcd). The store is mirrored
  into the core (:mod:`meshlib.control.mirror`, which also holds the key layout above); index
  writes, expiry deletes and persisted beats are compare-and-sets against the mirror's
  revisions, a lost index CAS waits for the mirror and plans again; wake-ups may be debounced;
  a store that fails its health check, or a broken mirror, makes answers non-authoritative and
  writes 503 (docs/control-plane.md, "Replicas"). Persisted beats are group-committed there:
  the beats that must be persisted within ``beat_batch_wait`` s (at most ``beat_batch_size``)
  are written as one ``put_all``, each record still a compare-and-set, each beat answered once
  the batch is in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import random
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshlib.config.loader import MAX_FILE_BYTES, load_text
from meshlib.config.model import Snapshot
from meshlib.config.values import parse_seconds_or_duration
from meshlib.control import tokens as stored_tokens
from meshlib.control.etcd import EtcdStore
from meshlib.control.memory import MemoryStore
from meshlib.control.mirror import (
    EPOCH_KEY,
    INDEXES,
    INSTANCES,
    POLICY,
    PREFIX,
    Debouncer,
    Mirror,
    index_key,
    instance_from_record,
    instance_key,
)
from meshlib.control.registry import (
    Change,
    Instance,
    NotFound,
    PolicyVersion,
    Registry,
    RegistrySettings,
    Renewed,
    ServiceKey,
    VersionConflict,
    instance_id,
)
from meshlib.control.sqlite import DB_FILE, SQLiteStore
from meshlib.control.store import Compacted, Conflict, Store, StoreClosed, StoreError
from meshlib.control.tokens import (
    DEFAULT_TOKEN_TTL,
    TokenRequestError,
    issue_token,
    list_tokens,
    revoke_token,
    state_of,
)
from meshlib.control.trust import write_update
from meshlib.control.wire import (
    AUTHORITATIVE_HEADER,
    EPOCH_HEADER,
    INDEX_HEADER,
    SOURCE_HEADER,
    BundleAnswer,
    EndpointsAnswer,
    InstanceInfo,
    PolicyAnswer,
    RegisteredEndpoint,
    RegistryStatusInfo,
    ReplicaHealth,
    ServiceInfo,
    TokenInfo,
    TokenIssued,
    admin_id,
)
from meshlib.errors import ConfigError
from meshlib.identity.ca import (
    CA_CERT_FILE,
    DEFAULT_SVID_TTL,
    SVID_BUNDLE_FILE,
    LeafPublicKey,
    new_serial,
)
from meshlib.identity.cadir import CADirectory
from meshlib.identity.crl import CRL_FILE, crls_pem, load_crls
from meshlib.identity.csr import CSRRefused, check_csr
from meshlib.identity.peers import peer_certificate, verified_identity
from meshlib.identity.spiffe import IdentityError, SpiffeID, SpiffeIDError
from meshlib.identity.svid import SVIDError, verify_svid

__all__ = [
    "DEFAULT_MAX_WATCHERS",
    "JoinTokens",
    "RegistryApp",
    "RegistryMetricsSink",
    "TokenGrant",
    "registry_app",
]

log = logging.getLogger("meshlib.registry")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Identify = Callable[[Scope], "str | None"]
_T = TypeVar("_T")
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class RegistryMetricsSink(Protocol):
    """What the app reports to its metrics (``meshlib.observe.metrics.RegistryMetrics`` fits;
    the composition root passes one, since the control plane may not import observe)."""

    def set_instances(self, count: int) -> None: ...

    def woke(self, watchers: int = 1) -> None: ...

    def refused(self, verb: str) -> None: ...

    def set_preserving(self, preserving: bool) -> None: ...

    def set_watchers(self, count: int) -> None: ...


class TokenGrant(Protocol):
    """What a join token grants (``meshlib.control.tokens.TokenRecord`` fits): its identity."""

    @property
    def spiffe_id(self) -> str: ...


class JoinTokens(Protocol):
    """The join tokens ``POST /v1/ca/sign`` takes (the module ``meshlib.control.tokens`` fits):
    look a token up without using it, use it once, and the refusal both raise (``.reason``)."""

    @property
    def TokenRefused(self) -> type[Exception]: ...  # the module's class, by its name

    async def verify_token(self, store: Store, token_text: object, now: float) -> TokenGrant: ...

    async def consume(
        self, store: Store, token_text: object, now: float, *, serial: str | None = None
    ) -> TokenGrant: ...


#: Blocking queries held at once before new ones get 429 + ``Retry-After: 1``.
DEFAULT_MAX_WATCHERS = 10_000
#: A request body above this is refused 413; a policy may be as large as the loader allows.
MAX_BODY = 1024 * 1024
DEFAULT_WAIT = 60.0
MAX_WAIT = 300.0
#: Seconds between expiry passes.
TICK = 1.0
MIN_TTL, MAX_TTL = 1.0, 300.0

#: Replica mode: how long a store health check may take before the store counts as down...
HEALTH_TIMEOUT = 1.0
#: ...how often a write that lost an index compare-and-set to another replica plans again...
REPLANS = 8
#: ...how long it waits for the mirror to show the winner's write before each new plan...
CATCH_UP = 2.0
#: ...the bound of the mirror's back-off after a failed list or watch...
MIRROR_BACKOFF = (0.05, 2.0)
#: ...and the group commit of persisted beats: a batch is written (one ``put_all``) once it
#: holds this many records, or this many seconds after its first, whichever comes first. At
#: 10,000 instances a persisted beat as its own etcd write cost each replica ~1 ms of CPU in the
#: HTTP client alone, plus one mirror event batch per write (docs/performance.md).
BEAT_BATCH_SIZE = 64
BEAT_BATCH_WAIT = 0.05

#: The watch key of ``GET /v1/ca/bundle``'s held queries: a service key no service can have
#: (namespaces are never empty), so the bundle shares ``_hold``/``_notify`` with the services.
BUNDLE_WATCH: ServiceKey = ("", "ca-bundle")
#: The CA dir files whose stat the tick compares (the bundle falls back to ca.pem without one).
CA_FILES = (SVID_BUNDLE_FILE, CRL_FILE, CA_CERT_FILE)


class _HTTPError(Exception):
    """An answer other than 2xx: ``status`` and the JSON body ``{"error": message, **extra}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: Iterable[tuple[str, str]] = (),
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": message, **extra}
        self.headers = tuple(headers)


@dataclass
class _Watch:
    """The held queries of one service (or of the policy): set ``event`` to wake them all.

    ``answers`` holds the encoded answer the woken queries send, by the state it shows (index,
    epoch, authoritative): one change wakes up to thousands of queries of one service, and they
    all send the same bytes, so the first to answer encodes them and the others reuse them. It
    lives as long as the wake-up (the watch is dropped once its queries are done), so it holds
    nothing for quiet services and never serves a state but the one it was built from.
    """

    event: asyncio.Event
    waiters: int = 0
    answers: dict[tuple[int, str, bool], bytes] = field(default_factory=dict)


@dataclass
class _Beat:
    """A heartbeat waiting in the batch of beats to persist (replica mode): its report and
    the answers of the requests that carried it (a retried beat of the same instance joins the
    pending one, its report the newer)."""

    id: str
    key: ServiceKey
    applied: int | None
    rejected: int | None
    error: str | None
    answers: list[asyncio.Future[float]] = field(default_factory=list)


@dataclass(frozen=True)
class _Request:
    method: str
    parts: tuple[str, ...]
    query: dict[str, str]
    headers: dict[str, str]
    identity: str | None
    scope: Scope
    receive: Receive


class RegistryApp:
    """The registry's ASGI app (lifespan included); build it with :func:`registry_app`."""

    def __init__(
        self,
        store: Store,
        *,
        trust_domain: str,
        identify: Identify | None = None,
        admins: Iterable[str] | None = None,
        settings: RegistrySettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_watchers: int = DEFAULT_MAX_WATCHERS,
        tick: float = TICK,
        metrics: RegistryMetricsSink | None = None,
        exposition: ASGIApp | None = None,
        ca_dir: str | os.PathLike[str] | None = None,
        svid_ttl: dt.timedelta = DEFAULT_SVID_TTL,
        join_tokens: JoinTokens | None = None,
        svid_dir: str | os.PathLike[str] | None = None,
        replicas: bool = False,
        debounce: tuple[float, float] | None = None,
    ) -> None:
        self.store = store
        #: Whether other registry processes share ``store`` (etcd): then the app mirrors the
        #: store into its core and writes indexes, expiries and heartbeats as compare-and-sets
        #: (docs/control-plane.md, "Replicas").
        self.replicas = replicas
        #: ``(quiet, most)``: a service's watchers wake once ``quiet`` s pass without another
        #: change to it, or ``most`` s after the first pending one; None: at once.
        self.debouncer = None if debounce is None else Debouncer(*debounce)
        self.mirror: Mirror | None = None
        #: The last store health check passed (replica mode checks it every tick).
        self.store_ok = True
        #: The mirror's list and watch are running (replica mode).
        self.watch_ok = True
        #: Loop time of the last write the store committed (replica mode): proof it answers.
        self._store_answered = -math.inf
        self._mirror_moved = asyncio.Event()
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.trust_domain = trust_domain
        self.identify: Identify = identify or (lambda scope: verified_identity(scope, trust_domain))
        self.admins = frozenset(admins if admins is not None else (admin_id(trust_domain),))
        self.settings = settings or RegistrySettings()
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.Random()
        self.max_watchers = max_watchers
        self.tick = tick
        self.metrics = metrics
        #: Answers ``GET /metrics`` to callers with an SVID of the trust domain, as every path
        #: (e.g. ``meshlib.observe.exporter.metrics_app()``); None: /metrics is 404.
        self.exposition = exposition
        #: The CA directory ``POST /v1/ca/sign`` signs with (``DIR/ca``, read per request so a
        #: ``meshctl ca rotate`` is picked up) and whose published bundle and CRLs
        #: ``GET /v1/ca/bundle`` serves; None: the registry neither signs nor serves (404).
        self.ca_dir = None if ca_dir is None else Path(ca_dir)
        #: Lifetime of the SVIDs the registry signs.
        self.svid_ttl = svid_ttl
        #: The join tokens the first-contact form of ``POST /v1/ca/sign`` spends: by default
        #: the ones ``POST /v1/tokens`` mints into this app's own store
        #: (:mod:`meshlib.control.tokens`); a test may put a stand-in here.
        self.join_tokens: JoinTokens = stored_tokens if join_tokens is None else join_tokens
        #: Refused requests (401, 403), for /v1/status.
        self.refusals = 0
        #: Held blocking queries a change woke (one per query woken).
        self.wakeups = 0
        #: Blocking queries held right now.
        self.watchers = 0
        self.registry: Registry | None = None
        #: The loop the app runs on (set at startup): a driver outside it, such as a test
        #: forcing an expiry pass, schedules coroutines there.
        self.loop: asyncio.AbstractEventLoop | None = None
        #: Called with the number of held queries whenever it changes (tests wait on it).
        self.on_watchers: Callable[[int], None] | None = None
        self._watches: dict[ServiceKey | None, _Watch] = {}
        self._persisted_beat: dict[str, float] = {}
        #: Replica mode: the beats to persist in the next batch, by instance id; the timer that
        #: writes it ``beat_batch_wait`` s after its first; the batches being written.
        self.beat_batch_size = BEAT_BATCH_SIZE
        self.beat_batch_wait = BEAT_BATCH_WAIT
        self._beats: dict[str, _Beat] = {}
        self._beat_timer: asyncio.TimerHandle | None = None
        self._beat_writes: set[asyncio.Task[None]] = set()
        self._policy_cache: tuple[int, Snapshot | None] = (-1, None)
        self._started_wall = wall()
        self._stopping = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._open = False
        # One write at a time: a write plans its change on the core, persists it, then commits
        # it, and no other write may commit in between (the plan would be stale).
        self._writing = asyncio.Lock()
        #: Whether the end of warming has woken the held queries yet.
        self._warm = False
        self._ca_seen: tuple[tuple[int, int, int] | None, ...] | None = None
        self._bundle: BundleAnswer | None = None
        #: The bundle index is not persisted: held queries name this process's epoch, so an
        #: index from before a restart is answered at once, never waited on.
        self._bundle_epoch = secrets.token_hex(8)
        #: The registry's own SVID dir (``DIR/registry``, served with SVID polling on): each
        #: new bundle/CRLs the CA poll publishes is written there too, under the workloads'
        #: never-roll-back rules, so the registry's own server refuses revoked clients.
        self.svid_dir = None if svid_dir is None else Path(svid_dir)
        self._own_refused: str | None = None

    # -- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        try:
            if self.exposition is not None and scope["path"].rstrip("/") == "/metrics":
                self._may_read_metrics(scope)
                await self.exposition(scope, receive, send)
                return
            status, body, headers = await self._dispatch(scope, receive)
        except _HTTPError as exc:
            status, body, headers = exc.status, exc.body, exc.headers
        except StoreError as exc:
            log.error("registry: the store failed: %s", exc)
            # the write changed nothing (plan, persist, commit): retrying it is safe
            status, body = 503, {"error": f"the registry's store failed: {exc}"}
            headers = (("Retry-After", "1"),)
        except Exception:  # never a traceback on the wire
            log.exception("registry: internal error on %s %s", scope["method"], scope["path"])
            status, body, headers = 500, {"error": "internal error (see the registry's log)"}, ()
        # an answer shared by the queries one change woke comes already encoded (see _Watch)
        payload = body if isinstance(body, bytes) else json.dumps(body).encode()
        raw = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers),
        ]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": payload})

    def _may_read_metrics(self, scope: Scope) -> None:
        if scope["method"] != "GET":
            raise _HTTPError(
                405,
                f"method {scope['method']} is not allowed here (allowed: GET)",
                headers=[("Allow", "GET")],
            )
        if self.identify(scope) is None:
            raise self._refuse(
                f"the caller has no SVID of the trust domain {self.trust_domain}: "
                "reading the registry's metrics needs one",
                "read",
            )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        """Load the core from the store and start the expiry tick."""
        self.registry = await self._load()
        self.poll_ca()
        self._warm = self.registry.authoritative(self.clock())
        self._counted()
        self.loop = loop = asyncio.get_running_loop()
        self._open = True
        self._stopping = asyncio.Event()
        self._mirror_moved = asyncio.Event()
        self._kick = asyncio.Event()
        self._ticker = loop.create_task(self._tick_loop())
        if self.mirror is not None:
            self._tasks.append(loop.create_task(self._mirror_loop(self.mirror.revision)))
        if self.debouncer is not None:
            self._tasks.append(loop.create_task(self._debounce_loop()))

    def release(self, timeout: float = 1.0) -> None:
        """Answer every held blocking query now and hold no new one; callable from any thread,
        it returns once the held queries have answered (at most ``timeout`` s). The server
        calls it when it starts stopping: the lifespan's :meth:`shutdown` comes only after the
        server's grace period, which a query held for up to 300 s outlasts — it was cancelled
        into a 500 and a traceback, or its connection closed unanswered (FAULT-6/7)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        try:
            done = asyncio.run_coroutine_threadsafe(self._released(timeout), loop)
        except RuntimeError:  # the loop closed meanwhile: nothing is held
            return
        with contextlib.suppress(Exception):  # a stop goes on whatever happens here
            done.result(timeout + 1.0)

    async def _released(self, timeout: float) -> None:
        self._release()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        # Each answered query's handler must run to write its answer; yield until they have.
        while self.watchers > 0 and loop.time() < end:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)  # one more turn: the last handler's send reaches the transport

    def _release(self) -> None:
        self._stopping.set()
        for watch in self._watches.values():
            watch.event.set()

    async def shutdown(self) -> None:
        """Stop the tick, answer any query still held (503, as :meth:`release`), close the store."""
        self._release()
        if self._beat_timer is not None:
            self._beat_timer.cancel()
            self._beat_timer = None
        waiting, self._beats = self._beats, {}
        _answer_all(waiting.values(), _HTTPError, 503, "the registry is stopping")
        for task in (self._ticker, *self._tasks, *self._beat_writes):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._tasks.clear()
        if self._open:
            self._open = False
            await self.store.close()

    # -- loading and persisting ------------------------------------------------------------------

    async def _load(self) -> Registry:
        revision, items = await self.store.range(PREFIX)
        now, wall_now = self.clock(), self.wall()
        epoch = ""
        instances: list[Instance] = []
        indexes: dict[ServiceKey, int] = {}
        policy: list[PolicyVersion] = []
        for item in items:
            if item.key == EPOCH_KEY:
                epoch = item.value.decode()
            elif item.key.startswith(INSTANCES):
                instances.append(instance_from_record(json.loads(item.value), now, wall_now))
            elif item.key.startswith(INDEXES):
                ns, svc = item.key[len(INDEXES) :].split("/", 1)
                indexes[(ns, svc)] = int(item.value)
            elif item.key.startswith(POLICY):
                policy.append(PolicyVersion(**json.loads(item.value)))
        if not epoch:
            # from the OS, never the (maybe seeded) rng: two registries must not share one
            epoch = secrets.token_hex(8)
            try:  # a compare-and-set: replicas starting together on an empty store agree
                await self.store.put(EPOCH_KEY, epoch.encode(), if_mod_rev=0)
            except Conflict:
                _, found = await self.store.range(EPOCH_KEY)
                epoch = next(i.value.decode() for i in found if i.key == EPOCH_KEY)
        for instance in instances:
            self._persisted_beat[instance.id] = instance.last_heartbeat
        registry = Registry(
            epoch,
            now,
            self.settings,
            instances=instances,
            indexes=indexes,
            policy=sorted(policy, key=lambda v: v.version),
        )
        if self.replicas:
            self.mirror = Mirror(registry, revision)
            for item in items:
                self.mirror.wrote(item.key, item.mod_revision)
        return registry

    async def _save_instance(self, instance: Instance) -> None:
        key = instance_key(instance)
        await self._write(key, self.store.put(key, self._record(instance)))
        self._persisted_beat[instance.id] = instance.last_heartbeat

    async def _save_registration(
        self, instance: Instance, index: int, expected: int | None
    ) -> None:
        """Write a registration that moves its service's index: the index (a compare-and-set on
        ``expected`` with replicas, see :meth:`_save_index`) and the instance record in one
        store write — one round trip and one revision, so no replica ever sees the index
        without its record."""
        keys = (index_key(instance.key), instance_key(instance))
        puts = [(keys[0], str(index).encode(), expected), (keys[1], self._record(instance), None)]
        await self._write(keys, self.store.put_all(puts))
        self._persisted_beat[instance.id] = instance.last_heartbeat

    def _record(self, instance: Instance) -> bytes:
        """The instance as the store keeps it (wall-clock times: they outlive this process)."""
        now, wall_now = self.clock(), self.wall()
        record = {
            "id": instance.id,
            "namespace": instance.namespace,
            "service": instance.service,
            "address": instance.address,
            "port": instance.port,
            "labels": dict(instance.labels),
            "metrics_port": instance.metrics_port,
            "identity": instance.identity,
            "ttl": instance.ttl,
            "registered_wall": wall_now - (now - instance.registered_at),
            "heartbeat_wall": wall_now - (now - instance.last_heartbeat),
            "applied_version": instance.applied_version,
            "rejected_version": instance.rejected_version,
            "rejection": instance.rejection,
        }
        return json.dumps(record).encode()

    async def _write(
        self, key: str | tuple[str, ...], write: Awaitable[int], *, present: bool = True
    ) -> int:
        """Run a store write of ``key`` (or of several keys, in one revision); with replicas,
        the mirror holds their events until the write's revision is known, then applies those
        newer than it (another replica's)."""
        mirror = self.mirror
        if mirror is None:
            return await write
        keys = (key,) if isinstance(key, str) else key
        for each in keys:
            mirror.writing(each)
        revision: int | None = None
        try:
            revision = await write
            self._store_answered = asyncio.get_running_loop().time()
            return revision
        finally:
            for each in keys:
                for event in mirror.written(each, revision, present=present):
                    self._mirrored(mirror.apply(event, self.clock(), self.wall()))

    async def _save_index(self, key: ServiceKey, index: int, expected: int | None = None) -> None:
        """Write ``key``'s index; with replicas, a compare-and-set on ``expected`` (the index
        key's mod_revision in the mirror when the change was planned)."""
        put = self.store.put(index_key(key), str(index).encode(), if_mod_rev=expected)
        await self._write(index_key(key), put)

    def _index_revision(self, key: ServiceKey) -> int | None:
        """The ``expected`` of :meth:`_save_index` for a change planned now (None: no replicas).
        An index another replica wrote whose record has not arrived yet is applied first: the
        plan must build on it."""
        if self.mirror is None:
            return None
        self._mirrored(self.mirror.settle(key))
        return self.mirror.mod_revision(index_key(key))

    async def _delete_instance(self, instance: Instance, *, cas: bool = False) -> None:
        key = instance_key(instance)
        expected = None if self.mirror is None or not cas else self.mirror.mod_revision(key)
        await self._write(key, self.store.delete(key, if_mod_rev=expected), present=False)
        self._persisted_beat.pop(instance.id, None)

    async def _lost(self, conflict: Conflict, expected: int | None, service: ServiceKey) -> None:
        """After losing an index compare-and-set to another replica: wait (at most ``CATCH_UP``
        s) for the mirror to show the winner's index and its record, so the next plan builds on
        them."""
        mirror = self.mirror
        if mirror is None:  # pragma: no cover - only replicas write compare-and-sets here
            raise conflict
        loop = asyncio.get_running_loop()
        end = loop.time() + CATCH_UP
        while loop.time() < end and (
            mirror.mod_revision(conflict.key) == expected or mirror.pending(service)
        ):
            moved = self._mirror_moved
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(moved.wait(), end - loop.time())

    def _writable(self) -> None:
        """Replica mode: refuse a write while the store or the mirror is down (503): the plan
        would build on a mirror that may be behind, and the store may not take it anyway."""
        if not self._healthy():
            raise _HTTPError(
                503,
                f"the registry cannot write now: {self._unhealthy_reason()}",
                headers=[("Retry-After", "1")],
            )

    def _healthy(self) -> bool:
        return self.store_ok and self.watch_ok

    def _unhealthy_reason(self) -> str:
        if not self.store_ok:
            return "its store does not answer (no quorum?)"
        return "its mirror of the store is not watching (it reconnects)"

    def _authoritative(self, registry: Registry, now: float) -> bool:
        """Whether an answer is authoritative: not warming, and (replicas) the store healthy."""
        return registry.authoritative(now) and self._healthy()

    async def _tick_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.tick)
            if self._stopping.is_set():
                return
            if self.mirror is not None:
                await self.check_store()
                # an index whose record never came (its writer died between the two writes)
                self._mirrored(self.mirror.flush(self.clock(), CATCH_UP))
            try:
                await self.expire()
            except Exception:  # a failing pass must not end the loop: the next one retries
                log.exception("registry: expiry pass failed")
            try:
                self.poll_ca()
            except Exception:  # as above: the next tick polls again
                log.exception("registry: CA dir poll failed")

    async def check_store(self) -> bool:
        """Replica mode, each tick: whether the store answers a quorum read (``status()`` if
        it has one, else a range of the epoch key) within ``HEALTH_TIMEOUT``. A change of
        health changes every answer's ``authoritative``: it wakes every held query."""
        status = getattr(self.store, "status", None)
        probe = status() if status is not None else self.store.range(EPOCH_KEY)
        started = asyncio.get_running_loop().time()
        try:
            await asyncio.wait_for(probe, HEALTH_TIMEOUT)
        except (StoreError, asyncio.TimeoutError, OSError) as exc:
            # A probe that only timed out may have waited in this replica's own queue (a
            # restart storm's handshakes hold the event loop for seconds), not in the store's:
            # a write the store committed meanwhile proves it answers. Refusing every write
            # for a tick on that false alarm was the storm's 503s.
            ok = isinstance(exc, asyncio.TimeoutError) and self._store_answered >= started
            if self.store_ok and not ok:
                reason = str(exc) or f"no answer within {HEALTH_TIMEOUT:g} s"
                log.error("registry: the store is down, answers are not authoritative: %s", reason)
        else:
            ok = True
        self._set_health(store_ok=ok)
        return ok

    def _set_health(self, *, store_ok: bool | None = None, watch_ok: bool | None = None) -> None:
        before = self._healthy()
        if store_ok is not None:
            self.store_ok = store_ok
        if watch_ok is not None:
            self.watch_ok = watch_ok
        if self._healthy() != before:
            if self._healthy() and self.registry is not None:
                # no beat was taken while it was down: expire nothing until they had the time
                # to come back (one warming period), as after a restart
                self.registry.warm_again(self.clock())
                self._warm = self.registry.authoritative(self.clock())
            for watched in list(self._watches):
                self._wake(watched)

    async def expire(self) -> int:
        """One expiry pass (the tick calls it every second); returns how many expired."""
        if self.mirror is not None:
            return await self._expire_replica(self.mirror)
        registry = self._core()
        now = self.clock()
        async with self._writing:
            expired = registry.due(now)
            keys = sorted({i.key for i in expired})
            for key in keys:  # indexes first, as for a drain; a failed pass is retried whole
                await self._save_index(key, registry.index(*key) + 1)
            for instance in expired:
                await self.store.delete(instance_key(instance))
                self._persisted_beat.pop(instance.id, None)
            registry.remove_expired(expired)
            if expired:
                self._counted()
        if self.metrics is not None:
            self.metrics.set_preserving(registry.status(now).preserving_since is not None)
        for key in keys:
            self._notify(key)
        self._warmed(registry, now)
        return len(expired)

    def _warmed(self, registry: Registry, now: float) -> None:
        if not self._warm and registry.authoritative(now):
            # held queries answer authoritative=true at once, not after their wait
            self._warm = True
            for watched in list(self._watches):
                self._wake(watched)

    async def _expire_replica(self, mirror: Mirror) -> int:
        """Every replica runs the core's expiry; each delete is a compare-and-set on the
        record's mod_revision, so a beat another replica persisted meanwhile wins (the record
        comes back through the mirror). A pass while the store is down removes nothing."""
        registry = self._core()
        now = self.clock()
        removed: list[Instance] = []
        if self._healthy():
            async with self._writing:
                # One index move per instance, each followed by its record's delete: the other
                # replicas' mirrors announce a move once the record it counts arrives.
                for instance in registry.due(now):
                    key = instance.key
                    for _ in range(REPLANS):
                        expected = self._index_revision(key)
                        index = registry.index(*key) + 1
                        try:
                            await self._save_index(key, index, expected)
                        except Conflict as exc:
                            await self._lost(exc, expected, key)
                            continue
                        registry.set_index(key, index)
                        break
                    else:
                        continue  # the next pass tries again
                    try:
                        await self._delete_instance(instance, cas=True)
                    except Conflict:
                        continue  # renewed (or drained) through another replica meanwhile
                    registry.remove(instance.id)
                    removed.append(instance)
                if removed:
                    self._counted()
        if self.metrics is not None:
            self.metrics.set_preserving(registry.status(now).preserving_since is not None)
        for key in sorted({i.key for i in removed}):
            self._notify(key)
        self._warmed(registry, now)
        return len(removed)

    # -- replica mode: the mirror and the debouncer ---------------------------------------------

    async def _mirror_loop(self, revision: int) -> None:
        """Watch ``/registry/`` after ``revision`` (startup's list), applying every event to the
        core; list again on ``Compacted``; back off (bounded, jittered) on any other failure,
        while answers say ``authoritative: false``."""
        mirror = self.mirror
        assert mirror is not None
        backoff = MIRROR_BACKOFF[0]
        listed = True
        while not self._stopping.is_set():
            try:
                if not listed:
                    revision, items = await self.store.range(PREFIX)
                    self._mirrored(mirror.relist(revision, items, self.clock(), self.wall()))
                    listed = True
                self._set_health(watch_ok=True)
                events = self.store.watch(PREFIX, revision)
                try:
                    async for event in events:
                        self._mirrored(mirror.apply(event, self.clock(), self.wall()))
                        revision = mirror.revision
                        backoff = MIRROR_BACKOFF[0]
                finally:
                    close = getattr(events, "aclose", None)  # an async generator's
                    if close is not None:
                        await close()
                listed = False  # the watch ended without an error: list and watch again
            except Compacted:
                log.warning("registry: the mirror's watch was compacted: listing again")
                listed = False
            except StoreClosed:
                return
            except Exception as exc:  # the store, or a record that does not decode: list again
                log.error("registry: the mirror's watch failed, retrying: %s", exc)
                self._set_health(watch_ok=False)
                listed = False
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self.rng.uniform(0, backoff))
                backoff = min(backoff * 2, MIRROR_BACKOFF[1])

    def _mirrored(self, touched: set[ServiceKey | None]) -> None:
        moved, self._mirror_moved = self._mirror_moved, asyncio.Event()
        moved.set()
        if touched:
            self._counted()
        for key in sorted(touched, key=lambda k: ("", "") if k is None else k):
            self._notify(key)

    async def _debounce_loop(self) -> None:
        debouncer = self.debouncer
        assert debouncer is not None
        while not self._stopping.is_set():
            deadline = debouncer.next_deadline()
            wait = self.tick if deadline is None else deadline - self.clock()
            self._kick.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), min(max(wait, 0.001), self.tick))
            self.wake_due()

    def wake_due(self) -> int:
        """Wake the services whose debounce window closed (the debounce task calls it; a test
        with a fake clock calls it after moving the clock); how many queries woke."""
        if self.debouncer is None:
            return 0
        before = self.wakeups
        for key in self.debouncer.due(self.clock()):
            self._wake(key)  # type: ignore[arg-type]
        return self.wakeups - before

    # -- wake-ups ------------------------------------------------------------------------------

    def _notify(self, key: ServiceKey | None) -> None:
        """A change to ``key`` (a service, or None: the policy): wake its held queries, at
        once or when its debounce window closes."""
        if self.debouncer is None:
            self._wake(key)
            return
        self.debouncer.change(key, self.clock())
        self._kick.set()

    def _wake(self, key: ServiceKey | None) -> None:
        """Wake the queries held on ``key`` (a service, or None: the policy), and only them."""
        watch = self._watches.pop(key, None)
        if watch is not None:
            self.wakeups += watch.waiters
            if self.metrics is not None and watch.waiters:
                self.metrics.woke(watch.waiters)
            watch.event.set()

    def _counted(self) -> None:
        """Report the instance count (after a commit that may have moved it)."""
        if self.metrics is not None and self.registry is not None:
            self.metrics.set_instances(self.registry.count())

    async def _hold(
        self, key: ServiceKey | None, changed: Callable[[], bool], wait: float
    ) -> _Watch | None:
        """Return when ``changed()`` or after ``wait`` (+ jitter up to wait/16): the watch whose
        wake-up ended the hold (its ``answers`` are shared by the queries it woke), else None."""
        woken: _Watch | None = None
        if changed() or wait <= 0:
            return None
        if self._stopping.is_set():
            raise _HTTPError(
                503, "the registry is stopping: retry in 1 s", headers=[("Retry-After", "1")]
            )
        if self.watchers >= self.max_watchers:
            raise _HTTPError(
                429,
                f"too many blocking queries held ({self.max_watchers}): retry in 1 s",
                headers=[("Retry-After", "1")],
            )
        deadline = wait + self.rng.uniform(0, wait / 16)
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        self._count_watchers(+1)
        try:
            while not changed() and not self._stopping.is_set():
                watch = self._watches.get(key)
                if watch is None:
                    watch = self._watches[key] = _Watch(asyncio.Event())
                watch.waiters += 1
                try:
                    left = end - loop.time()
                    if left <= 0:
                        return None
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(watch.event.wait(), left)
                finally:
                    watch.waiters -= 1
                    if watch.waiters == 0 and self._watches.get(key) is watch:
                        del self._watches[key]
                if not watch.event.is_set():
                    return None  # timed out
                woken = watch
        finally:
            self._count_watchers(-1)
        if self._stopping.is_set() and not changed():
            # Not an answer "unchanged": a client takes that as a quiet long-poll and asks
            # again at once, spending its token bucket on a registry that is going away (it
            # then slept 15 s past the registry's return). A 503 is the truth: its watch
            # backs off and comes back.
            raise _HTTPError(
                503, "the registry is stopping: retry in 1 s", headers=[("Retry-After", "1")]
            )
        return woken

    def _warming(self, registry: Registry) -> Callable[[], bool]:
        """For a held query: whether the answer's ``authoritative`` changed since it was
        taken (warming ended; with replicas, the store went down or came back), so the query
        answers though its index did not move."""
        before = self._authoritative(registry, self.clock())
        if before and not self.replicas:
            return lambda: False  # a single registry never goes back to not authoritative
        return lambda: self._authoritative(registry, self.clock()) != before

    def _count_watchers(self, delta: int) -> None:
        self.watchers += delta
        if self.metrics is not None:
            self.metrics.set_watchers(self.watchers)
        if self.on_watchers is not None:
            self.on_watchers(self.watchers)

    # -- routing -------------------------------------------------------------------------------

    async def _dispatch(self, scope: Scope, receive: Receive) -> tuple[int, Any, Iterable[Any]]:
        path: str = scope["path"]
        parts = tuple(path.strip("/").split("/")) if path.strip("/") else ()
        request = _Request(
            scope["method"],
            parts,
            _query(scope),
            {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
            self.identify(scope),
            scope,
            receive,
        )
        if parts == ("healthz",):
            self._allow(request, "GET")
            return 200, {"ok": True}, ()
        if parts == ("readyz",):
            self._allow(request, "GET")
            if not self._open:
                return 503, {"error": "the registry's store is not open"}, ()
            return 200, {"ok": True}, ()
        if request.identity is None and parts != ("v1", "ca", "sign"):
            # The server lets TLS callers without a client certificate in (a first contact
            # has only a join token): every path but the three above needs an SVID.
            raise self._refuse(
                f"the caller has no SVID of the trust domain {self.trust_domain}: {path} needs "
                "one (without one, only /healthz, /readyz and POST /v1/ca/sign with a join "
                "token are served)",
                "read",
            )
        if not self._open or self.registry is None:
            raise _HTTPError(503, "the registry is not started", headers=[("Retry-After", "1")])
        match parts:
            case ("v1", "instances"):
                return await self._list_instances(request)
            case ("v1", "instances", ns, svc, id):
                if request.method == "PUT":
                    return await self._register(request, ns, svc, id)
                self._allow(request, "PUT", "DELETE")
                return await self._drain(request, ns, svc, id)
            case ("v1", "instances", ns, svc, id, "heartbeat"):
                self._allow(request, "POST")
                return await self._heartbeat(request, ns, svc, id)
            case ("v1", "services"):
                return await self._services(request)
            case ("v1", "services", ns, svc, "endpoints"):
                return await self._endpoints(request, ns, svc)
            case ("v1", "policy"):
                if request.method == "PUT":
                    return await self._apply(request)
                return await self._policy(request)
            case ("v1", "policy", "history"):
                return await self._history(request)
            case ("v1", "policy", "versions", number):
                return await self._version(request, number)
            case ("v1", "policy", "rollback"):
                self._allow(request, "POST")
                return await self._rollback(request)
            case ("v1", "sd", "prometheus"):
                return await self._prometheus(request)
            case ("v1", "status"):
                return await self._status(request)
            case ("v1", "tokens"):
                if request.method == "POST":
                    return await self._create_token(request)
                self._allow(request, "GET", "POST")
                return await self._tokens(request)
            case ("v1", "tokens", id):
                self._allow(request, "DELETE")
                return await self._revoke_token(request, id)
            case ("v1", "ca", "bundle"):
                return await self._ca_bundle(request)
            case ("v1", "ca", "sign"):
                self._allow(request, "POST")
                return await self._sign(request)
        raise _HTTPError(404, f"no such endpoint: {path}")

    def _allow(self, request: _Request, *methods: str) -> None:
        if request.method not in methods:
            raise _HTTPError(
                405,
                f"method {request.method} is not allowed here (allowed: {', '.join(methods)})",
                headers=[("Allow", ", ".join(methods))],
            )

    def _core(self) -> Registry:
        if self.registry is None:
            raise _HTTPError(503, "the registry is not started", headers=[("Retry-After", "1")])
        return self.registry

    # -- authorization -------------------------------------------------------------------------

    def _refuse(self, message: str, verb: str, status: int = 403) -> _HTTPError:
        """A 403 (or ``status``: 401 for no credentials at all), counted (``verb``: read,
        register, heartbeat, drain, apply, rollback, sign)."""
        self.refusals += 1
        if self.metrics is not None:
            self.metrics.refused(verb)
        return _HTTPError(status, message)

    def _reader(self, request: _Request, verb: str = "read") -> str:
        if request.identity is None:
            raise self._refuse(
                f"the caller has no SVID of the trust domain {self.trust_domain}: "
                "reading the registry needs one",
                verb,
            )
        return request.identity

    def _admin(self, request: _Request, verb: str, what: str) -> str:
        caller = self._reader(request, verb)
        if caller not in self.admins:
            raise self._refuse(f"{caller} is not an admin of the registry: it may not {what}", verb)
        return caller

    def _instance_writer(self, request: _Request, ns: str, svc: str, verb: str) -> str:
        caller = self._reader(request, verb)
        if caller in self.admins:
            return caller
        account = self._service_account(ns, svc)
        expected = f"spiffe://{self.trust_domain}/ns/{ns}/sa/{account}"
        if caller != expected:
            raise self._refuse(
                f"{caller} may not write instances of {ns}/{svc}: only {expected} "
                "(the service's account) or an admin may",
                verb,
            )
        return caller

    def _service_account(self, ns: str, svc: str) -> str:
        """``Service.spec.serviceAccount`` of ``svc.ns`` in the current policy, else ``svc``."""
        registry = self._core()
        current = registry.policy.current()
        version = 0 if current is None else current.version
        cached_version, snapshot = self._policy_cache
        if cached_version != version:
            snapshot = None
            if current is not None:
                try:
                    snapshot = load_text(current.text, source="registry", version=version)
                except ConfigError:  # stored versions were validated; an old loader may differ
                    log.exception("registry: policy version %d no longer loads", version)
            self._policy_cache = (version, snapshot)
        service = None if snapshot is None else snapshot.services.get(f"{svc}.{ns}")
        if service is not None and service.service_account:
            return service.service_account
        return svc

    # -- instances -----------------------------------------------------------------------------

    async def _register(self, request: _Request, ns: str, svc: str, id: str) -> Answer:
        identity = self._instance_writer(request, ns, svc, "register")
        body = await _json_body(request, MAX_BODY)
        address = _field(body, "address", str)
        port = _field(body, "port", int)
        labels = _field(body, "labels", dict, optional=True) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise _HTTPError(400, "field 'labels' must be a map of strings to strings")
        metrics_port = _field(body, "metrics_port", int, optional=True)
        ttl = _field(body, "ttl", (int, float), optional=True)
        if ttl is not None and not MIN_TTL <= ttl <= MAX_TTL:
            raise _HTTPError(400, f"field 'ttl' must be {MIN_TTL:g}..{MAX_TTL:g} seconds")
        right_id = instance_id(ns, svc, address, port)
        if id != right_id:
            raise _HTTPError(
                400, f"id must be {right_id} (instance_id of {ns}/{svc} {address}:{port})"
            )
        registry = self._core()
        async with self._writing:
            for _ in range(REPLANS):
                self._writable()
                expected = self._index_revision((ns, svc))  # with the plan: nothing between
                try:
                    done = registry.plan_register(
                        ns,
                        svc,
                        address,
                        port,
                        labels=labels,
                        metrics_port=metrics_port,
                        identity=identity,
                        ttl=ttl,
                        now=self.clock(),
                    )
                except ValueError as exc:
                    raise _HTTPError(400, str(exc)) from None
                moved = done.change is not Change.REFRESHED
                if moved:
                    try:
                        await self._save_registration(done.instance, done.index, expected)
                    except Conflict as exc:  # another replica moved it first: plan again
                        await self._lost(exc, expected, (ns, svc))
                        continue
                else:
                    await self._save_instance(done.instance)
                registry.commit(done)
                self._counted()
                break
            else:
                raise _busy(f"{ns}/{svc}")
        if moved:
            self._notify(done.instance.key)
        ttl_s = done.instance.ttl
        answer = {
            "id": done.instance.id,
            "change": done.change.value,
            "index": done.index,
            "ttl": ttl_s,
            "heartbeat_interval": round(ttl_s / 3, 3),
        }
        return (201 if done.change.value == "created" else 200), answer, ()

    async def _heartbeat(self, request: _Request, ns: str, svc: str, id: str) -> Answer:
        self._instance_writer(request, ns, svc, "heartbeat")
        body = await _json_body(request, MAX_BODY, empty_ok=True)
        applied = _field(body, "applied_version", int, optional=True)
        rejected = _field(body, "rejected_version", int, optional=True)
        error = _field(body, "error", str, optional=True)
        if (rejected is None) != (error is None):
            raise _HTTPError(400, "fields 'rejected_version' and 'error' go together (a NACK)")
        registry = self._core()
        async with self._writing:  # read under the lock: a write awaiting its store may drain it
            self._writable()
            old = registry.get(id)
            if old is None or old.key != (ns, svc):
                raise _not_registered(id)
            done = registry.plan_heartbeat(
                id,
                self.clock(),
                applied_version=applied,
                rejected_version=rejected,
                nack_error=error,
            )
            if isinstance(done, NotFound):  # pragma: no cover - checked above
                raise _not_registered(id)
            new = done.instance
            report_changed = (new.applied_version, new.rejected_version, new.rejection) != (
                old.applied_version,
                old.rejected_version,
                old.rejection,
            )
            persisted = self._persisted_beat.get(id, -math.inf)
            if not report_changed and new.last_heartbeat - persisted < new.ttl / 3:
                registry.commit(done)
                return 200, {"ttl": new.ttl}, ()
            if self.mirror is None:
                await self._save_instance(new)
                registry.commit(done)
                return 200, {"ttl": new.ttl}, ()
            answer = self._join_beats(_Beat(id, (ns, svc), applied, rejected, error))
        # replicas: the beat is written with others in one store write; answered once it is in
        return 200, {"ttl": await answer}, ()

    def _join_beats(self, beat: _Beat) -> asyncio.Future[float]:
        """Add ``beat`` to the batch of beats to persist; the future answers its TTL once the
        batch is in the store, or raises what to answer instead (404, 503)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[float] = loop.create_future()
        pending = self._beats.get(beat.id)
        if pending is not None:  # the same instance twice: one record, the newer report
            pending.applied, pending.rejected, pending.error = (
                beat.applied,
                beat.rejected,
                beat.error,
            )
            pending.answers.append(answer)
            return answer
        beat.answers.append(answer)
        self._beats[beat.id] = beat
        if len(self._beats) >= self.beat_batch_size:
            self._write_beats()
        elif self._beat_timer is None:
            self._beat_timer = loop.call_later(self.beat_batch_wait, self._write_beats)
        return answer

    def _write_beats(self) -> None:
        """Start writing the pending batch (full, or its wait is over)."""
        if self._beat_timer is not None:
            self._beat_timer.cancel()
            self._beat_timer = None
        batch, self._beats = self._beats, {}
        if batch:
            task = asyncio.get_running_loop().create_task(self._persist_beats(list(batch.values())))
            self._beat_writes.add(task)
            task.add_done_callback(self._beat_writes.discard)

    async def _persist_beats(self, batch: list[_Beat]) -> None:
        """Plan, persist, commit a batch of beats: one ``put_all`` of their records, each a
        compare-and-set on its mod_revision in the mirror. A ``Conflict`` (a record moved
        through another replica) writes them one by one instead, so only the moved one answers
        404; a store failure answers every beat of the batch 503."""
        try:
            async with self._writing:
                await self._persist_planned(batch)
        finally:  # a bug or a cancellation (shutdown) never leaves a beat unanswered
            _answer_all(batch, _HTTPError, 503, "the heartbeat was not persisted")

    async def _persist_planned(self, batch: list[_Beat]) -> None:
        registry, mirror = self._core(), self.mirror
        assert mirror is not None  # only replicas batch beats
        try:
            self._writable()
        except _HTTPError as exc:
            _answer_all(batch, _HTTPError, exc.status, str(exc), headers=exc.headers)
            return
        planned: list[tuple[_Beat, Renewed, str, int | None]] = []
        for beat in batch:
            old = registry.get(beat.id)
            done = (
                None
                if old is None or old.key != beat.key
                else registry.plan_heartbeat(
                    beat.id,
                    self.clock(),
                    applied_version=beat.applied,
                    rejected_version=beat.rejected,
                    nack_error=beat.error,
                )
            )
            if not isinstance(done, Renewed):  # drained or expired since it was planned
                _answer_all([beat], _not_registered, beat.id)
                continue
            key = instance_key(done.instance)
            planned.append((beat, done, key, mirror.mod_revision(key)))
        if not planned:
            return
        puts = [(key, self._record(done.instance), rev) for _, done, key, rev in planned]
        try:
            await self._write(tuple(key for _, _, key, _ in planned), self.store.put_all(puts))
        except Conflict:
            await self._persist_one_by_one(planned)
            return
        except StoreError as exc:
            log.error("registry: the store failed: %s", exc)
            _answer_all(batch, _store_failed, exc)
            return
        for beat, done, _, _ in planned:
            self._committed_beat(beat, done)

    async def _persist_one_by_one(
        self, planned: list[tuple[_Beat, Renewed, str, int | None]]
    ) -> None:
        """After a batch lost a compare-and-set: each record alone, on the mod_revision it was
        planned against, so only the record that moved through another replica answers 404
        (register again, as a single beat's lost compare-and-set does)."""
        for n, (beat, done, key, expected) in enumerate(planned):
            put = self.store.put(key, self._record(done.instance), if_mod_rev=expected)
            try:
                await self._write(key, put)
            except Conflict as exc:
                await self._lost(exc, exc.expected, beat.key)
                _answer_all([beat], _moved, beat.id)
                continue
            except StoreError as exc:
                log.error("registry: the store failed: %s", exc)
                _answer_all([each for each, _, _, _ in planned[n:]], _store_failed, exc)
                return
            self._committed_beat(beat, done)

    def _committed_beat(self, beat: _Beat, done: Renewed) -> None:
        self._core().commit(done)
        self._persisted_beat[beat.id] = done.instance.last_heartbeat
        for answer in beat.answers:
            if not answer.done():
                answer.set_result(done.instance.ttl)

    async def _drain(self, request: _Request, ns: str, svc: str, id: str) -> Answer:
        self._instance_writer(request, ns, svc, "drain")
        registry = self._core()
        async with self._writing:  # read under the lock, as a heartbeat does
            for _ in range(REPLANS):
                self._writable()
                old = registry.get(id)
                if old is None or old.key != (ns, svc):
                    raise _HTTPError(404, f"instance {id} is not registered")
                expected = self._index_revision(old.key)
                done = registry.plan_drain(id, self.clock())
                if isinstance(done, NotFound):  # pragma: no cover - checked above
                    raise _HTTPError(404, f"instance {id} is not registered")
                try:
                    await self._save_index(old.key, done.index, expected)
                except Conflict as exc:  # another replica moved it first: plan again
                    await self._lost(exc, expected, old.key)
                    continue
                await self._delete_instance(old)
                registry.commit(done)
                self._counted()
                break
            else:
                raise _busy(f"{ns}/{svc}")
        self._notify(old.key)
        return 200, {"index": done.index}, ()

    async def _list_instances(self, request: _Request) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        now = self.clock()
        return (
            200,
            {
                "instances": [
                    InstanceInfo(
                        i.id,
                        i.namespace,
                        i.service,
                        i.address,
                        i.port,
                        dict(i.labels),
                        i.metrics_port,
                        i.identity,
                        i.ttl,
                        max(0.0, now - i.last_heartbeat),
                        i.applied_version,
                        i.rejected_version,
                        i.rejection,
                    ).to_json()
                    for i in self._core().instances()
                ]
            },
            (),
        )

    # -- discovery -----------------------------------------------------------------------------

    async def _endpoints(self, request: _Request, ns: str, svc: str) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        index, wait, epoch = _blocking(request)
        registry = self._core()
        woken = None
        if index and epoch in (None, registry.epoch):
            warming = self._warming(registry)
            woken = await self._hold(
                (ns, svc), lambda: registry.changed_since(ns, svc, index) or warming(), wait
            )
        now = self.clock()
        state = (registry.index(ns, svc), registry.epoch, self._authoritative(registry, now))
        headers = self._index_headers(state, f'"{state[1]}-{state[0]}"')
        shared = None if woken is None else woken.answers.get(state)
        if shared is not None:
            return 200, shared, headers
        found = registry.endpoints(ns, svc, now)
        answer = EndpointsAnswer(
            ns,
            svc,
            found.index,
            found.epoch,
            state[2],
            tuple(
                RegisteredEndpoint(i.id, i.address, i.port, dict(i.labels), i.metrics_port)
                for i in found.instances
            ),
        )
        payload = json.dumps(answer.to_json()).encode()
        if woken is not None:
            woken.answers[state] = payload
        return 200, payload, headers

    def _index_headers(self, state: tuple[int, str, bool], etag: str) -> list[tuple[str, str]]:
        """The headers of a readable answer; ``state`` is (index, epoch, authoritative)."""
        index, epoch, authoritative = state
        return [
            (INDEX_HEADER, str(index)),
            (EPOCH_HEADER, epoch),
            (AUTHORITATIVE_HEADER, "true" if authoritative else "false"),
            ("ETag", etag),
        ]

    async def _services(self, request: _Request) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        registry = self._core()
        now = self.clock()
        services = []
        for ns, svc in registry.services():
            found = registry.endpoints(ns, svc, now)
            services.append(ServiceInfo(ns, svc, len(found.instances), found.index).to_json())
        return 200, {"services": services}, ()

    async def _prometheus(self, request: _Request) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        groups = []
        for i in self._core().instances():
            if i.metrics_port is None:
                continue
            labels = {
                "__meta_meshlib_namespace": i.namespace,
                "__meta_meshlib_service": i.service,
                "__meta_meshlib_instance": i.id,
            }
            for k, v in i.labels:
                labels[f"__meta_meshlib_label_{_prometheus_name(k)}"] = v
            target = (
                f"[{i.address}]:{i.metrics_port}"
                if ":" in i.address
                else (f"{i.address}:{i.metrics_port}")
            )
            groups.append({"targets": [target], "labels": labels})
        return 200, groups, ()

    # -- policy --------------------------------------------------------------------------------

    def _policy_answer(self, version: PolicyVersion | None) -> PolicyAnswer:
        if version is None:
            return PolicyAnswer(0, "")
        return PolicyAnswer(
            version.version,
            version.text,
            version.digest,
            version.author,
            version.created_at,
            version.rollback_of,
        )

    async def _policy(self, request: _Request) -> Answer:
        self._allow(request, "GET", "PUT")
        self._reader(request)
        index, wait, epoch = _blocking(request)
        registry = self._core()
        log_ = registry.policy
        woken = None
        if index and epoch in (None, registry.epoch):
            warming = self._warming(registry)
            woken = await self._hold(None, lambda: log_.changed_since(index) or warming(), wait)
        current = log_.current()
        version = 0 if current is None else current.version
        state = (version, registry.epoch, self._authoritative(registry, self.clock()))
        headers = self._index_headers(state, f'"{version}"')
        shared = None if woken is None else woken.answers.get(state)
        if shared is None:
            shared = json.dumps(self._policy_answer(current).to_json()).encode()
            if woken is not None:
                woken.answers[state] = shared
        return 200, shared, headers

    async def _history(self, request: _Request) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        versions = []
        for v in self._core().policy.history():
            body = self._policy_answer(v).to_json()
            del body["text"]
            versions.append(body)
        return 200, {"versions": versions}, ()

    async def _version(self, request: _Request, number: str) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        if not number.isdigit():
            raise _HTTPError(400, f"policy version must be a number, got {number!r}")
        found = self._core().policy.get(int(number))
        if found is None:
            raise _HTTPError(404, f"no policy version {number}")
        return 200, self._policy_answer(found).to_json(), [("ETag", f'"{found.version}"')]

    async def _apply(self, request: _Request) -> Answer:
        author = self._admin(request, "apply", "apply a policy (PUT /v1/policy)")
        data = await _body(request, MAX_FILE_BYTES)
        source = request.headers.get(SOURCE_HEADER.lower()) or "registry"
        if_match = _if_match(request)
        try:
            load_text(data, source=source)
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            raise _HTTPError(
                422, f"policy rejected: {problems[0] if problems else exc}", problems=problems
            ) from None
        text = data.decode("utf-8")
        log_ = self._core().policy
        async with self._writing:
            self._writable()
            before = log_.version
            done = log_.plan_propose(text, author=author, if_match=if_match, now=self.wall())
            if isinstance(done, VersionConflict):
                raise _HTTPError(
                    409, f"version conflict: current is {done.current}", current=done.current
                )
            changed = done.version != before
            if changed:
                await self._save_policy(done)
                log_.commit(done)
        if changed:
            self._notify(None)
        return 200, {"version": done.version, "digest": done.digest, "changed": changed}, ()

    async def _rollback(self, request: _Request) -> Answer:
        author = self._admin(request, "rollback", "roll the policy back (POST /v1/policy/rollback)")
        body = await _json_body(request, MAX_BODY)
        to = _field(body, "version", int)
        log_ = self._core().policy
        if_match = _if_match(request)
        async with self._writing:
            self._writable()
            before = log_.version
            done = log_.plan_rollback(to, author=author, if_match=if_match, now=self.wall())
            if isinstance(done, NotFound):
                raise _HTTPError(404, f"no policy version {to}")
            if isinstance(done, VersionConflict):
                raise _HTTPError(
                    409, f"version conflict: current is {done.current}", current=done.current
                )
            changed = done.version != before  # rolling back to the current text makes no version
            if changed:
                await self._save_policy(done)
                log_.commit(done)
        if changed:
            self._notify(None)
        answer = {"version": done.version, "rollback_of": to, "digest": done.digest}
        return 200, {**answer, "changed": changed}, ()

    async def _save_policy(self, version: PolicyVersion) -> None:
        record = {
            "version": version.version,
            "text": version.text,
            "digest": version.digest,
            "author": version.author,
            "created_at": version.created_at,
            "rollback_of": version.rollback_of,
        }
        key = f"{POLICY}{version.version:010d}"
        try:
            await self._write(key, self.store.put(key, json.dumps(record).encode(), if_mod_rev=0))
        except Conflict:
            # another replica wrote this version first: of two applies made against the same
            # version exactly one wins, as If-Match promises within one registry
            raise _HTTPError(
                409,
                f"version conflict: another replica wrote version {version.version} first",
                current=version.version,
            ) from None

    # -- trust bundle and CRLs (GET /v1/ca/bundle) ---------------------------------------------

    def poll_ca(self) -> bool:
        """Publish the CA dir's bundle and CRLs if they changed (the tick calls it every
        second); True when the bundle index moved. A stat of three files when nothing changed;
        a file that does not parse (mid-write by hand, damaged) keeps the last good answer, is
        logged, and is read again once its stat changes."""
        if self.ca_dir is None:
            return False
        seen = _stat_files(self.ca_dir, CA_FILES)
        if seen == self._ca_seen:
            return False
        self._ca_seen = seen
        try:
            bundle = CADirectory(self.ca_dir).bundle()
            crl_path = self.ca_dir / CRL_FILE
            crls = crls_pem(load_crls(crl_path)) if crl_path.exists() else b""
        except (IdentityError, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            kept = "none yet" if self._bundle is None else f"sequence {self._bundle.sequence}"
            log.error(
                "registry: CA dir %s refused, keeping the last bundle (%s): %s",
                self.ca_dir,
                kept,
                reason,
            )
            return False
        current = self._bundle
        text, crls_text = bundle.to_pem().decode(), crls.decode()
        if current is not None and (current.bundle, current.crls) == (text, crls_text):
            return False  # touched, not changed: held queries stay held
        if current is not None and bundle.sequence < current.sequence:
            log.warning(
                "registry: %s went from bundle sequence %d to %d; workloads keep the higher one",
                self.ca_dir,
                current.sequence,
                bundle.sequence,
            )
        index = 1 if current is None else current.index + 1
        self._bundle = BundleAnswer(index, bundle.sequence, text, crls_text)
        log.info(
            "registry: CA bundle index %d (sequence %d, %s)",
            index,
            bundle.sequence,
            "with CRLs" if crls_text else "no CRLs",
        )
        self._wake(BUNDLE_WATCH)
        self._trust_own(self._bundle)
        return True

    def _trust_own(self, answer: BundleAnswer) -> None:
        """Write ``answer`` into the registry's own SVID dir as a workload's bundle watcher
        would (:func:`~meshlib.control.trust.write_update`): the server's rotation watcher
        reloads it, and a client certificate ``meshctl ca revoke`` named fails its next
        handshake with the registry too (a revoked workload could otherwise go on
        registering, beating and renewing its SVID until it expired)."""
        if self.svid_dir is None:
            return
        update, _ = write_update(self.svid_dir, answer)
        if update.refused is not None and update.refused != self._own_refused:
            log.warning("registry: own SVID dir: %s", update.refused)
        self._own_refused = update.refused

    async def _ca_bundle(self, request: _Request) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        if self.ca_dir is None:
            raise _HTTPError(404, "this registry was started without a CA dir: it serves no bundle")
        index, wait, epoch = _blocking(request)
        if index and epoch in (None, self._bundle_epoch):
            # Any other index (one from the future, one from before a restart) answers at once.
            await self._hold(BUNDLE_WATCH, lambda: self._bundle_index() != index, wait)
        answer = self._bundle
        if answer is None:
            raise _HTTPError(
                503,
                f"the CA dir {self.ca_dir} has no readable bundle yet (see the registry's log)",
                headers=[("Retry-After", "1")],
            )
        headers = [
            (INDEX_HEADER, str(answer.index)),
            (EPOCH_HEADER, self._bundle_epoch),
            ("ETag", f'"{self._bundle_epoch}-{answer.index}"'),
        ]
        return 200, answer.to_json(), headers

    def _bundle_index(self) -> int:
        return 0 if self._bundle is None else self._bundle.index

    # -- status --------------------------------------------------------------------------------

    async def _status(self, request: _Request) -> Answer:
        self._allow(request, "GET")
        self._reader(request)
        registry = self._core()
        status = registry.status(self.clock())
        reason = status.reason
        if not self._healthy():
            reason = self._unhealthy_reason() + ("" if reason is None else f"; {reason}")
        answer = RegistryStatusInfo(
            status.epoch,
            status.state.value,
            reason,
            self._authoritative(registry, self.clock()),
            status.instances,
            len(registry.services()),
            registry.policy.version,
            _store_name(self.store),
            max(0.0, self.wall() - self._started_wall),
            self.refusals,
            self.watchers,
            ReplicaHealth(self.store_ok, self.watch_ok) if self.replicas else None,
        )
        return 200, answer.to_json(), ()

    # -- join tokens -------------------------------------------------------------------------
    # Admin only, the secret shown once (meshlib/control/tokens.py). Tokens live in the store
    # only, never in the core: a write is one compare-and-set of its own key and needs no
    # ``_writing`` lock, and startup's load skips their prefix.

    async def _create_token(self, request: _Request) -> Answer:
        author = self._admin(request, "tokens", "create join tokens (POST /v1/tokens)")
        body = await _json_body(request, MAX_BODY)
        spiffe_id = _field(body, "spiffe_id", str)
        ttl = _field(body, "ttl", (int, float), optional=True)
        try:
            token, record = await issue_token(
                self.store,
                spiffe_id,
                ttl=DEFAULT_TOKEN_TTL if ttl is None else ttl,
                now=self.wall(),
                author=author,
                trust_domain=self.trust_domain,
            )
        except TokenRequestError as exc:
            raise _HTTPError(400, str(exc)) from None
        log.info("registry: %s created join token %s for %s", author, record.id, spiffe_id)
        answer = TokenIssued(token, record.id, record.spiffe_id, record.expires_at)
        return 201, answer.to_json(), ()

    async def _tokens(self, request: _Request) -> Answer:
        self._admin(request, "tokens", "list join tokens (GET /v1/tokens)")
        now = self.wall()
        listed = [
            TokenInfo(
                r.id,
                r.spiffe_id,
                state_of(r, now).value,
                r.created_at,
                r.expires_at,
                r.created_by,
                r.used_at,
                r.used_by_serial,
                r.revoked_at,
            ).to_json()
            for r in await list_tokens(self.store)
        ]
        return 200, {"tokens": listed}, ()

    async def _revoke_token(self, request: _Request, id: str) -> Answer:
        author = self._admin(request, "tokens", "revoke join tokens (DELETE /v1/tokens/{id})")
        revoked = await revoke_token(self.store, id, self.wall())
        if revoked is None:
            raise _HTTPError(404, f"no join token {id!r} (meshctl token list shows them)")
        log.info("registry: %s revoked join token %s", author, id)
        return 200, {"id": revoked.id, "revoked_at": revoked.revoked_at}, ()

    # -- signing -------------------------------------------------------------------------------

    async def _sign(self, request: _Request) -> Answer:
        """``POST /v1/ca/sign``: a leaf for the CSR's key, for the identity of the join token
        (first contact) or of the caller's SVID (renewal); never the CSR's own claim."""
        if self.ca_dir is None:
            raise _HTTPError(404, "this registry does not sign (it was started without a CA)")
        try:
            token = _bearer(request)
        except ValueError as exc:
            raise self._refuse(str(exc), "sign", 401) from None
        if token is None and request.identity is None:
            raise self._refuse(
                "present a join token (Authorization: Bearer) or your current SVID", "sign", 401
            )
        body = await _json_body(request, MAX_BODY)
        pem = _field(body, "csr", str).encode("utf-8", "replace")
        serial: int | None = None  # renewal: the CA picks it
        if token is None:
            assert request.identity is not None
            spiffe_id = self._sign_identity(request.identity)
            await self._renewable(request)
            public_key = self._checked_key(pem, spiffe_id)
        else:
            tokens = self.join_tokens
            now = self.wall()
            try:
                grant = await tokens.verify_token(self.store, token, now)
            except tokens.TokenRefused as exc:
                raise self._refuse(f"join token refused: {_reason(exc)}", "sign") from None
            spiffe_id = self._sign_identity(grant.spiffe_id)
            # checked before the token is spent: a refused CSR leaves the token unused
            public_key = self._checked_key(pem, spiffe_id)
            # nor does a CA that cannot be read (a bad file would spend it for nothing)
            await self._ca_call(CADirectory(self.ca_dir).current)
            serial = new_serial()
            try:
                await tokens.consume(self.store, token, now, serial=f"{serial:x}")
            except tokens.TokenRefused as exc:  # another request spent it meanwhile
                raise self._refuse(f"join token refused: {_reason(exc)}", "sign") from None
        ca_dir = CADirectory(self.ca_dir)
        cert, bundle = await self._ca_call(
            lambda: ca_dir.sign(public_key, spiffe_id, ttl=self.svid_ttl, serial=serial)
        )
        answer = {
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            "bundle": bundle.to_pem().decode("ascii"),
            "spiffe_id": str(spiffe_id),
            "expires_at": int(cert.not_valid_after_utc.timestamp()),
        }
        return 200, answer, ()

    async def _ca_call(self, call: Callable[[], _T]) -> _T:
        """``call`` (file reads, a signature) off the loop, which serves the blocking queries;
        a CA that cannot be read is a 503."""
        try:
            return await asyncio.to_thread(call)
        except IdentityError as exc:
            log.error("registry: cannot sign with %s: %s", self.ca_dir, exc.reason)
            raise _HTTPError(
                503, f"the registry's CA cannot sign: {exc.reason}", headers=[("Retry-After", "5")]
            ) from None

    async def _renewable(self, request: _Request) -> None:
        """Refuse (403, counted) to renew a certificate the CA dir's current CRLs revoke, or
        that no root of its current bundle signed. The handshake refuses revoked clients once
        the registry's own SVID dir has the CRLs (:meth:`_trust_own`, within about 3 s); this
        reads ``DIR/ca`` per request, so not even that window lets a revoked SVID mint a
        fresh certificate."""
        assert self.ca_dir is not None
        pem = peer_certificate(request.scope)
        if pem is None:  # an identity without a certificate: only a test's ``identify`` does it
            raise self._refuse("renewal needs the caller's verified certificate", "sign")
        ca_dir = self.ca_dir

        def check() -> str | None:
            leaf = x509.load_pem_x509_certificate(pem.encode("ascii"))
            bundle = CADirectory(ca_dir).bundle()
            crl_path = ca_dir / CRL_FILE
            crls = load_crls(crl_path) if crl_path.exists() else None
            try:
                verify_svid([leaf], bundle.roots, trust_domain=self.trust_domain, crls=crls)
            except SVIDError as exc:
                return exc.reason
            return None

        reason = await self._ca_call(check)
        if reason is not None:
            raise self._refuse(f"your SVID cannot be renewed: {reason}", "sign")

    def _sign_identity(self, text: str) -> SpiffeID:
        """The workload ID a leaf is signed for (a token's or an SVID's: valid, but checked
        again, since only a workload ID of this trust domain may be signed)."""
        try:
            spiffe_id = SpiffeID.parse(text)
        except SpiffeIDError as exc:
            raise self._refuse(f"{text!r} is not a SPIFFE ID: {exc.reason}", "sign") from None
        if spiffe_id.trust_domain != self.trust_domain or spiffe_id.is_trust_domain:
            raise self._refuse(
                f"{spiffe_id} is not a workload ID of the trust domain {self.trust_domain}", "sign"
            )
        return spiffe_id

    def _checked_key(self, pem: bytes, spiffe_id: SpiffeID) -> LeafPublicKey:
        """The CSR's public key, if :func:`~meshlib.identity.csr.check_csr` accepts it."""
        try:
            key = check_csr(pem, spiffe_id).public_key()
        except CSRRefused as exc:
            raise self._refuse(f"CSR refused: {exc.reason}", "sign") from None
        assert isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))  # check_csr's rule
        return key


Answer = tuple[int, Any, Iterable[tuple[str, str]]]


def registry_app(
    store: Store,
    *,
    trust_domain: str,
    identify: Identify | None = None,
    admins: Iterable[str] | None = None,
    settings: RegistrySettings | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    rng: random.Random | None = None,
    max_watchers: int = DEFAULT_MAX_WATCHERS,
    ca_dir: str | os.PathLike[str] | None = None,
    replicas: bool = False,
    debounce: tuple[float, float] | None = None,
) -> RegistryApp:
    """The registry's ASGI app over ``store`` (see :class:`RegistryApp`).

    ``identify`` reads the caller's SPIFFE ID from a request scope (default: the verified client
    certificate of ``trust_domain``); ``admins`` may apply policy and write any instance
    (default: meshctl's ID, ``spiffe://TD/ns/meshlib-system/sa/meshctl``).
    """
    return RegistryApp(
        store,
        trust_domain=trust_domain,
        identify=identify,
        admins=admins,
        settings=settings,
        clock=clock,
        wall=wall,
        rng=rng,
        max_watchers=max_watchers,
        ca_dir=ca_dir,
        replicas=replicas,
        debounce=debounce,
    )


def _answer_all(
    beats: Iterable[_Beat], error: Callable[..., Exception], *args: Any, **kwargs: Any
) -> None:
    """Answer every still-waiting request of ``beats`` with a new ``error(*args)``."""
    for beat in beats:
        for answer in beat.answers:
            if not answer.done():
                answer.set_exception(error(*args, **kwargs))


def _not_registered(id: str) -> _HTTPError:
    return _HTTPError(404, f"instance {id} is not registered: register again")


def _moved(id: str) -> _HTTPError:
    return _HTTPError(404, f"instance {id} changed through another replica: register again")


def _store_failed(exc: StoreError) -> _HTTPError:
    """The answer of a batched beat its store write failed (as a single write's StoreError)."""
    return _HTTPError(503, f"the registry's store failed: {exc}", headers=[("Retry-After", "1")])


def _busy(service: str) -> _HTTPError:
    return _HTTPError(
        503,
        f"{service}: other replicas kept moving its index first ({REPLANS} plans lost): retry",
        headers=[("Retry-After", "1")],
    )


# -- request parsing ---------------------------------------------------------------------------


def _query(scope: Scope) -> dict[str, str]:
    from urllib.parse import parse_qsl

    raw: bytes = scope.get("query_string", b"")
    return dict(parse_qsl(raw.decode("latin-1"), keep_blank_values=True))


def _blocking(request: _Request) -> tuple[int, float, str | None]:
    """``?index=N&wait=30s&epoch=E`` as (index, seconds, epoch or None). The epoch is the one
    the client's index came from: a query from another epoch is answered at once, because an
    index of another life of the registry means nothing here, even when it is equal (an
    empty restart numbers its services from 1 again)."""
    text = request.query.get("index", "0") or "0"
    if not text.isdigit():
        raise _HTTPError(400, f"query parameter 'index' must be a whole number, got {text!r}")
    epoch = request.query.get("epoch") or None
    wait_text = request.query.get("wait")
    if wait_text is None:
        return int(text), DEFAULT_WAIT, epoch
    try:
        wait = parse_seconds_or_duration(wait_text)
    except ValueError:
        raise _HTTPError(
            400,
            f"query parameter 'wait' must be seconds or a duration like 30s or 5m, got "
            f"{wait_text!r}",
        ) from None
    return int(text), min(wait, MAX_WAIT), epoch


def _bearer(request: _Request) -> str | None:
    """The token of ``Authorization: Bearer <token>``; None without the header."""
    raw = request.headers.get("authorization")
    if raw is None:
        return None
    scheme, _, token = raw.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ValueError("header Authorization must be 'Bearer <join token>'")
    return token.strip()


def _reason(exc: Exception) -> str:
    """A refusal's reason (``.reason``, as the join tokens' refusal carries)."""
    return str(getattr(exc, "reason", exc))


def _if_match(request: _Request) -> int | None:
    raw = request.headers.get("if-match")
    if raw is None:
        return None
    text = raw.strip().removeprefix("W/").strip('"')
    if not text.isdigit():
        raise _HTTPError(400, f'header If-Match must be a policy version ("N"), got {raw!r}')
    return int(text)


async def _body(request: _Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _HTTPError(413, f"request body is {length} bytes, over the {limit}-byte limit")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise _HTTPError(400, "the client went away before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _HTTPError(413, f"request body is over the {limit}-byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _json_body(request: _Request, limit: int, *, empty_ok: bool = False) -> dict[str, Any]:
    data = await _body(request, limit)
    if not data.strip() and empty_ok:
        return {}
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _HTTPError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _HTTPError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(
    body: dict[str, Any], name: str, kind: type | tuple[type, ...], *, optional: bool = False
) -> Any:
    value = body.get(name)
    if value is None:
        if optional:
            return None
        raise _HTTPError(400, f"field {name!r} is missing")
    if isinstance(value, bool) or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise _HTTPError(
            400, f"field {name!r} must be {want}, got {type(value).__name__} ({value!r})"
        )
    return value


# -- store records -----------------------------------------------------------------------------


def _store_name(store: Store) -> str:
    if isinstance(store, SQLiteStore):
        return f"sqlite:{store.data_dir / DB_FILE}"
    if isinstance(store, MemoryStore):
        return "memory"
    if isinstance(store, EtcdStore):
        return f"etcd:{','.join(store.endpoints)}"
    return type(store).__name__


def _stat_files(directory: Path, names: Iterable[str]) -> tuple[tuple[int, int, int] | None, ...]:
    """(mtime, size, inode) of each file, None for a missing one: a change of any is a change."""
    out: list[tuple[int, int, int] | None] = []
    for name in names:
        try:
            st = os.stat(directory / name)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def _prometheus_name(key: str) -> str:
    """A label key as a Prometheus label name (anything else becomes ``_``)."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)
