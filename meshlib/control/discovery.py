"""The client's discovery: long-poll watches of the registry (one per service, one for the
policy) under CONTROL-PLANE.md §3's rules, with the static-stability guard that keeps a
warming registry from emptying a service.

Two layers, like the call sequence: :class:`WatchRules` and :func:`accept` /
:func:`accept_policy` decide (pure: clock and randomness are passed in) and :class:`Discovery`
drives them on asyncio tasks in a thread of its own, over a narrow :class:`DiscoverySource`
(the registry client, or an in-memory source in tests) into narrow sinks (the mesh).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshlib.config.model import Endpoint
from meshlib.control.wire import EndpointsAnswer, PolicyAnswer

log = logging.getLogger("meshlib.control")


@dataclass(frozen=True)
class Pacing:
    """How fast a watch loop may go (CONTROL-PLANE.md §3); tests shrink the delays.

    ``burst``/``interval``: the loop's token bucket (Consul's "rate-limit the blocking loop"):
    two requests at once, then one per 15 s. A long-poll that blocked refills the bucket while
    it waited, so only a loop whose answers return at once (a misbehaving server or proxy, a
    service changing faster than that) is slowed down; a full snapshot carries every change
    the wait skipped. ``backoff_base``/``backoff_cap``: reconnects after failures wait a full
    jitter over an exponential 0.5 s → 30 s (AWS's "full jitter": a restart storm spreads
    instead of reconnecting in waves, istio/istio#58100). ``first_jitter``: the first request
    of a loop waits a random 0–1 s, so clients started together spread out."""

    burst: int = 2
    interval: float = 15.0
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    first_jitter: float = 1.0


#: How long one blocking query may hold (the server adds up to wait/16 of jitter).
DEFAULT_WAIT = 30.0


class SourceUnavailable(Exception):
    """The registry could not answer (connection, timeout, 5xx, 429); ``retry_after`` is its
    ``Retry-After`` in seconds, when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DiscoverySource(Protocol):
    """Blocking queries of the registry (``GET /v1/services/…/endpoints``, ``GET /v1/policy``).
    ``index`` 0 asks for an answer at once; otherwise the source may hold up to ``wait``
    seconds for a change — unless ``epoch`` (the one the index came from; "" for none) is not
    the registry's, which answers at once. Raises :class:`SourceUnavailable` when the
    registry cannot answer."""

    async def endpoints(
        self, namespace: str, service: str, *, index: int, wait: float, epoch: str = ""
    ) -> EndpointsAnswer: ...

    async def policy(self, *, index: int, wait: float, epoch: str = "") -> PolicyAnswer: ...


class EndpointSink(Protocol):
    """Where discovered endpoints go (the mesh's :meth:`~meshlib.Mesh.set_endpoints`)."""

    def set_endpoints(
        self, service_key: str, endpoints: tuple[Endpoint, ...], *, authoritative: bool
    ) -> None: ...


class PolicySink(Protocol):
    """Where a new policy version goes: returns the loader's error when it is rejected, None
    when applied (the error is reported back to the registry as a NACK)."""

    def apply_policy(self, answer: PolicyAnswer) -> str | None: ...


# --- the watch loop's rules (pure) ------------------------------------------------------------


class WatchRules:
    """One watch loop's index, token bucket and back-off (CONTROL-PLANE.md §3).

    The driver asks :meth:`first_delay` once, then per cycle :meth:`take_token` (seconds to
    wait before the request), sends :attr:`index`, and reports :meth:`answered` or
    :meth:`failed` (which returns the back-off)."""

    def __init__(
        self,
        clock: Callable[[], float],
        rng: random.Random,
        *,
        index: int = 0,
        epoch: str = "",
        pacing: Pacing | None = None,
    ) -> None:
        self.pacing = pacing = pacing or Pacing()
        self._clock = clock
        self._rng = rng
        self.index = index if index > 0 else 0
        self.epoch = epoch
        self.failures = 0
        self._tokens = float(pacing.burst)
        self._stamp = clock()

    def first_delay(self) -> float:
        return self._rng.uniform(0.0, self.pacing.first_jitter)

    def take_token(self) -> float:
        """Take the next request's token: 0 when one is there, else how long until one is
        (the token is spent either way, so the caller waits that long and sends)."""
        now = self._clock()
        elapsed = now - self._stamp
        self._stamp = now
        if elapsed > 0:
            refill = elapsed / self.pacing.interval
            self._tokens = min(float(self.pacing.burst), self._tokens + refill)
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens * self.pacing.interval

    def answered(self, index: int, epoch: str) -> bool:
        """Adopt an answer's index and epoch; True when it is a change (a return alone does not
        prove one). An index that went backwards or a new epoch resets to 0: the registry's
        history is not the one this index came from, so the next query asks for a fresh
        snapshot at once instead of waiting on a meaningless index."""
        self.failures = 0
        changed = index != self.index or epoch != self.epoch
        if changed:
            # A change is what the loop is for: its request is refunded, so a burst of changes
            # (a rollout) is followed at once. Only answers that return at once WITHOUT a change
            # (a misbehaving server, an index that never settles) drain the bucket.
            self._tokens = min(float(self.pacing.burst), self._tokens + 1.0)
        if (self.epoch and epoch != self.epoch) or index < self.index or index <= 0:
            self.index = 0  # never wait on an index <= 0: the next query answers at once
        else:
            self.index = index
        self.epoch = epoch
        return changed

    def failed(self, retry_after: float | None = None) -> float:
        """The back-off before the next attempt: full jitter over ``0.5 s × 2^n`` capped at
        30 s, and never less than the server's ``Retry-After``. The failed request's token is
        refunded: the back-off, not the bucket, paces a loop that cannot reach the registry."""
        self.failures += 1
        pacing = self.pacing
        # The back-off paces failures; were they charged to the bucket too, a few seconds'
        # outage would leave the loop 15 s in debt per request once the registry is back.
        self._tokens = min(float(pacing.burst), self._tokens + 1.0)
        ceiling = min(pacing.backoff_cap, pacing.backoff_base * 2.0 ** min(self.failures - 1, 16))
        delay = self._rng.uniform(0.0, ceiling)
        if retry_after is not None and retry_after > delay:
            delay = retry_after
        return delay


# --- static stability (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceView:
    """What a client uses for one service, and the guard's reference: ``baseline`` is the size
    of the last set an authoritative registry gave (or the largest accepted since)."""

    endpoints: tuple[Endpoint, ...]
    baseline: int


@dataclass(frozen=True)
class Acceptance:
    """The guard's verdict on one answer: the view to use, and why an answer was refused."""

    view: ServiceView
    applied: bool
    reason: str | None = None


def accept(previous: ServiceView | None, answer: EndpointsAnswer) -> Acceptance:
    """Static stability (CONTROL-PLANE.md §5, FAULT-8): an authoritative answer is taken as is
    (an authoritative empty service is empty). A non-authoritative one — a registry that
    restarted and is still warming, or that lost its store — may neither empty a service nor
    shrink it by more than 50 %: the previous set is kept and the reason returned.

    A new epoch changes nothing here: its answers are judged against the same baseline, which
    only an authoritative answer lowers. Comparing with the last *accepted* set instead would
    let a warming registry ratchet a service down in steps of 49 %."""
    endpoints = tuple(e.endpoint() for e in answer.endpoints)
    count = len(endpoints)
    if previous is None or answer.authoritative:
        return Acceptance(ServiceView(endpoints, count), True)
    baseline = previous.baseline
    if count == 0 and previous.endpoints:
        why = "would empty it"
    elif count * 2 < baseline:
        why = f"would shrink it from {baseline} to {count} endpoints (more than 50 %)"
    else:
        return Acceptance(ServiceView(endpoints, max(baseline, count)), True)
    reason = (
        f"kept {len(previous.endpoints)} endpoint(s) of {answer.key}: an answer from a "
        f"non-authoritative registry (epoch {answer.epoch}, index {answer.index}) {why}"
    )
    return Acceptance(previous, False, reason)


def accept_policy(applied: int, answer: PolicyAnswer) -> str | None:
    """Whether to hand ``answer`` to the policy sink, given the version in force (0: none):
    None to apply it, else why not. Version 0 is a registry with no policy (one that
    restarted empty): it never replaces a policy. A non-authoritative registry may not move
    the policy back to an older version (a restored backup still warming); once
    authoritative, its version is the policy, older or not."""
    if answer.version <= 0:
        return "the registry has no policy yet"
    if answer.version == applied:
        return "already applied"
    if not answer.authoritative and answer.version < applied:
        return (
            f"a non-authoritative registry (epoch {answer.epoch}) offers version "
            f"{answer.version}, older than {applied} in force"
        )
    return None


# --- the driver ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceState:
    """One watched service's last accepted snapshot (what the cache file keeps)."""

    index: int
    epoch: str
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True)
class DiscoveryState:
    """Everything discovery has applied, as the cache file stores it."""

    epoch: str
    policy_version: int
    policy_text: str
    services: Mapping[str, ServiceState] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicyStatus:
    """The policy versions applied and rejected (the heartbeat's ACK/NACK)."""

    applied_version: int | None = None
    rejected_version: int | None = None
    error: str | None = None


def split_key(service_key: str) -> tuple[str, str]:
    """``name.namespace`` → ``(namespace, name)``; raises ValueError naming the key."""
    name, dot, namespace = service_key.partition(".")
    if not dot or not name or not namespace:
        raise ValueError(f"service key {service_key!r} is not 'name.namespace'")
    return namespace, name


class Discovery:
    """Watches the registry from a thread of its own: one asyncio task per watched service and
    one for the policy (when a ``policies`` sink is given), each under its own
    :class:`WatchRules`. Answers go through :func:`accept` into ``endpoints``; every applied
    snapshot is handed to ``persist`` (the cache file). ``initial`` (from the cache file)
    seeds the views, so the guard protects cached endpoints and watches resume from their
    index when the epoch is the same."""

    def __init__(
        self,
        source: DiscoverySource,
        endpoints: EndpointSink,
        policies: PolicySink | None = None,
        *,
        services: tuple[str, ...] = (),
        initial: DiscoveryState | None = None,
        persist: Callable[[DiscoveryState], None] | None = None,
        wait: float = DEFAULT_WAIT,
        pacing: Pacing | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._source = source
        self._sink = endpoints
        self._policies = policies
        self._persist = persist
        self._wait = wait
        self._pacing = pacing or Pacing()
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()  # guards the state below (read by metrics threads)
        self._views: dict[str, ServiceView] = {}
        self._states: dict[str, ServiceState] = {}
        self._epoch = ""
        self._policy_version = 0
        self._policy_text = ""
        self.policy_status = PolicyStatus()
        if initial is not None:
            self._epoch = initial.epoch
            self._policy_version = initial.policy_version
            self._policy_text = initial.policy_text
            for key, state in initial.services.items():
                self._states[key] = state
                self._views[key] = ServiceView(state.endpoints, len(state.endpoints))
        self._keys: list[str] = []
        self._failing: set[str] = set()
        self._answered = False
        self._last_answer: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        #: Set (and replaced) when a loop answers while others back off: it wakes them.
        self._back: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        for key in services:
            self.watch(key)

    # -- state for metrics --------------------------------------------------------------------

    @property
    def up(self) -> bool:
        """Whether the registry answers: an answer came and no loop's last request failed."""
        with self._lock:
            return self._answered and not self._failing

    def stale_for(self) -> float | None:
        """Seconds the state may lag the registry: 0 while :attr:`up`, else the time since the
        last answer; None before any answer."""
        with self._lock:
            if self._last_answer is None:
                return None
            if not self._failing:
                return 0.0
            return max(0.0, self._clock() - self._last_answer)

    def state(self) -> DiscoveryState:
        with self._lock:
            return DiscoveryState(
                self._epoch, self._policy_version, self._policy_text, dict(self._states)
            )

    @property
    def running(self) -> bool:
        """Whether the discovery thread is alive (stop() ends it)."""
        return self._thread is not None and self._thread.is_alive()

    def watched(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._keys)

    # -- lifetime -------------------------------------------------------------------------------

    def watch(self, service_key: str) -> None:
        """Watch one more service (``name.namespace``), now or once started; idempotent."""
        split_key(service_key)
        with self._lock:
            if service_key in self._keys:
                return
            self._keys.append(service_key)
            loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # stopped: the loop is closed, nothing to run
                loop.call_soon_threadsafe(self._spawn_endpoints, service_key)

    def start(self) -> Discovery:
        if self._thread is not None:
            raise RuntimeError("discovery is already started")
        with self._lock:
            cached = [(k, v.endpoints) for k, v in self._views.items()]
        # The cache file's state stands until the registry answers.
        for key, endpoints in cached:
            self._sink.set_endpoints(key, endpoints, authoritative=False)
        if self._policies is not None and self._policy_version > 0:
            cached_policy = PolicyAnswer(
                self._policy_version, self._policy_text, epoch=self._epoch, authoritative=False
            )
            error = self._policies.apply_policy(cached_policy)
            if error is None:
                self.policy_status = PolicyStatus(self._policy_version)
            else:  # the registry's copy of that version will be offered again
                log.error("discovery: cached policy %d rejected: %s", cached_policy.version, error)
                with self._lock:
                    self._policy_version, self._policy_text = 0, ""
        self._thread = threading.Thread(target=self._run, name="meshlib-discovery", daemon=True)
        self._thread.start()
        self._ready.wait(5.0)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every loop at once (sleeping ones and queries in flight) and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._cancel_all)
        if thread is not None:
            thread.join(timeout)

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop) -> None:
        self._stopping = asyncio.Event()
        self._back = asyncio.Event()
        with self._lock:
            self._loop = loop
            keys = list(self._keys)
        for key in keys:
            self._spawn_endpoints(key)
        if self._policies is not None:
            self._spawn(self._watch_policy(), "policy")
        self._ready.set()
        await self._stopping.wait()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _cancel_all(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()

    def _spawn_endpoints(self, key: str) -> None:
        if self._stopping is None or self._stopping.is_set():
            return
        self._spawn(self._watch_endpoints(key), key)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"discovery-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _back_off(self, seconds: float, exc: Exception) -> bool:
        """A failed loop's back-off: like :meth:`_sleep`, but cut short when another loop of
        this client hears from the registry again — after the registry's ``Retry-After``, which
        stands whatever the other loops hear."""
        floor = exc.retry_after if isinstance(exc, SourceUnavailable) else None
        if floor is not None and floor > 0:
            if not await self._sleep(min(floor, seconds)):
                return False
            seconds -= floor
        assert self._stopping is not None and self._back is not None
        waits = [
            asyncio.ensure_future(self._stopping.wait()),
            asyncio.ensure_future(self._back.wait()),
        ]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return not self._stopping.is_set()

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; False once stopping (stop wakes every sleeper at once)."""
        assert self._stopping is not None
        if seconds > 0:
            with contextlib.suppress(asyncio.TimeoutError):  # TimeoutError from 3.11 on
                await asyncio.wait_for(self._stopping.wait(), seconds)
        return not self._stopping.is_set()

    # -- the loops ------------------------------------------------------------------------------

    def _rules(self, index: int = 0, epoch: str = "") -> WatchRules:
        rng = random.Random(self._rng.random())  # one stream per loop, all from the seed
        return WatchRules(self._clock, rng, index=index, epoch=epoch, pacing=self._pacing)

    async def _watch_endpoints(self, key: str) -> None:
        namespace, name = split_key(key)
        with self._lock:
            cached = self._states.get(key)
        rules = self._rules() if cached is None else self._rules(cached.index, cached.epoch)
        if not await self._sleep(rules.first_delay()):
            return
        while await self._sleep(rules.take_token()):
            try:
                answer = await self._source.endpoints(
                    namespace, name, index=rules.index, wait=self._hold(rules), epoch=rules.epoch
                )
            except Exception as exc:
                if not await self._back_off(self._failed(key, rules, exc), exc):
                    return
                continue
            self._answer(key)
            changed = rules.answered(answer.index, answer.epoch)
            with self._lock:
                seen = key in self._states and self._states[key].epoch == answer.epoch
            if changed or not seen:
                try:
                    self._take(key, answer)
                except Exception:  # a sink's bug must not end this service's watch
                    log.exception("discovery %s: the answer could not be applied", key)

    async def _watch_policy(self) -> None:
        assert self._policies is not None
        rules = self._rules()
        if not await self._sleep(rules.first_delay()):
            return
        while await self._sleep(rules.take_token()):
            try:
                answer = await self._source.policy(
                    index=rules.index, wait=self._hold(rules), epoch=rules.epoch
                )
            except Exception as exc:
                if not await self._back_off(self._failed("policy", rules, exc), exc):
                    return
                continue
            self._answer("policy")
            rules.answered(answer.version, answer.epoch)
            try:
                self._take_policy(answer)
            except Exception:  # a sink's bug must not end the policy's watch
                log.exception("discovery: policy version %d could not be applied", answer.version)

    def _hold(self, rules: WatchRules) -> float:
        """How long the next query may be held: not at all after a failure. A registry back
        from an outage would hold the loop's unchanged index for a whole wait, and until that
        answer the client cannot tell it is back (``up`` 0, staleness growing): the first
        query answers at once, the next ones block again."""
        return 0.0 if rules.failures else self._wait

    def _failed(self, loop: str, rules: WatchRules, exc: Exception) -> float:
        retry_after = exc.retry_after if isinstance(exc, SourceUnavailable) else None
        delay = rules.failed(retry_after)
        with self._lock:
            self._failing.add(loop)
        if not isinstance(exc, SourceUnavailable):  # a bug or a malformed answer: say so
            log.error("discovery %s: %s: %s", loop, type(exc).__name__, exc)
        else:
            log.warning(
                "discovery %s: registry unavailable (%s); retry in %.1f s", loop, exc, delay
            )
        return delay

    def _answer(self, loop: str) -> None:
        with self._lock:
            self._failing.discard(loop)
            others_failing = bool(self._failing)
            self._answered = True
            self._last_answer = self._clock()
        if others_failing and self._back is not None:
            # One answer proves the registry is back: the loops still backing off ask now
            # instead of sleeping out a back-off that may be 30 s (FAULT-6: a client whose
            # policy loop had resynced still showed stale endpoints 25 s after the return).
            # They are this client's own loops, so clients stay spread by their own jitter.
            self._back.set()
            self._back = asyncio.Event()

    def _take(self, key: str, answer: EndpointsAnswer) -> None:
        with self._lock:
            verdict = accept(self._views.get(key), answer)
            previous = self._views.get(key)
            self._views[key] = verdict.view
            self._epoch = answer.epoch
            if verdict.applied:
                self._states[key] = ServiceState(answer.index, answer.epoch, verdict.view.endpoints)
        if not verdict.applied:
            log.warning("discovery: %s", verdict.reason)
            return
        if previous is None or previous.endpoints != verdict.view.endpoints:
            self._sink.set_endpoints(
                key, verdict.view.endpoints, authoritative=answer.authoritative
            )
        self._save()

    def _take_policy(self, answer: PolicyAnswer) -> None:
        assert self._policies is not None
        status = self.policy_status
        if answer.version == status.rejected_version:
            return  # rejected once already: the NACK stands until a new version comes
        why = accept_policy(self._policy_version, answer)
        if why is not None:
            if answer.version != self._policy_version and answer.version > 0:
                log.warning("discovery: policy version %d not applied: %s", answer.version, why)
            return
        error = self._policies.apply_policy(answer)
        if error is not None:
            log.error("discovery: policy version %d rejected: %s", answer.version, error)
            self.policy_status = PolicyStatus(status.applied_version, answer.version, error)
            return
        with self._lock:
            self._policy_version = answer.version
            self._policy_text = answer.text
            self._epoch = answer.epoch or self._epoch
        self.policy_status = PolicyStatus(answer.version)
        self._save()

    def _save(self) -> None:
        if self._persist is None:
            return
        try:
            self._persist(self.state())
        except Exception as exc:  # a full disk must not stop discovery: the cache is a floor
            log.error("discovery: cache not written: %s", exc)
