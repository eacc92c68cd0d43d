"""Self-registration: keep this process's instances registered with the registry — register,
heartbeat with the policy report, register again at once on a 404, back off while the registry
is away, and drain (DELETE) on close.

The schedule is pure (:func:`plan`: an outcome in, the next step and how long to wait out), so
it is tested without sockets or sleeps; :class:`Registrar` is its driver, one task per instance
on a :class:`~meshlib.control.loop.LoopThread` that it may share with the discovery driver. It
talks to the registry through :class:`RegistrationAPI`, three calls of the HTTP API
(docs/control-plane.md, "Self-registration"), so the HTTP client is one implementation of it
and the tests' in-memory core another.

Rules, and why:

* the instance's id is :func:`~meshlib.control.registry.instance_id`, computed here: a retried
  or repeated register lands on the same record (register is idempotent);
* heartbeats every ``heartbeat_interval`` of the register answer (3 s for the default 10 s TTL)
  ± 10 %, so instances started together do not heartbeat together;
* a heartbeat's 404 (:class:`InstanceNotFound`: the registry expired the instance, or restarted
  empty) registers again at once, without waiting: a registry that restarted empty is warming
  for one TTL, and every instance must be back before it becomes authoritative (Eureka);
* a registry that is away (:class:`RegistrationUnavailable`, or any other failure) is retried
  forever with jittered exponential back-off capped at the heartbeat interval: retries never
  load the registry more than the heartbeats they replace, and a registry that returns sees
  every instance within one interval, well inside its warming;
* each heartbeat carries the owner's :class:`PolicyReport`: the version applied, or the version
  rejected with the loader's file:line error (an xDS NACK with its detail);
* nothing blocks the caller: :meth:`Registrar.add` returns at once, and a drain is bounded by
  ``drain_timeout`` so a registry that is down never hangs a shutdown (the TTL removes the
  instance then).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import random
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from meshlib.control.loop import LoopThread
from meshlib.control.registry import instance_id
from meshlib.identity.renewal import backoff_delay

__all__ = [
    "Accepted",
    "Failed",
    "InstanceNotFound",
    "Missing",
    "PolicyReport",
    "RegisterAnswer",
    "Registrar",
    "RegistrarSettings",
    "RegistrationAPI",
    "RegistrationError",
    "RegistrationHandle",
    "RegistrationStatus",
    "RegistrationUnavailable",
    "Renewed",
    "Schedule",
    "heartbeat_delay",
    "plan",
    "retry_delay",
]

log = logging.getLogger("meshlib.control.registrar")

#: The heartbeat interval assumed until a register answer names one (DESIGN.md §8: 3 s).
DEFAULT_HEARTBEAT_INTERVAL = 3.0


class RegistrationError(Exception):
    """A registration call failed (the base of what a :class:`RegistrationAPI` raises)."""


class InstanceNotFound(RegistrationError):
    """The registry does not know the instance (HTTP 404): register again now."""


class RegistrationUnavailable(RegistrationError):
    """The registry cannot be reached or cannot answer now (connect error, timeout, 5xx, 429);
    ``retry_after`` is its ``Retry-After`` in seconds when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class PolicyReport:
    """What a heartbeat says about the policy: the version applied (an ACK) and/or the version
    rejected with the loader's error (a NACK, ``file:line: message``)."""

    applied_version: int | None = None
    rejected_version: int | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.rejected_version is None) != (self.error is None):
            raise ValueError("PolicyReport: a rejected_version needs its error, and only it")


class RegisterAnswer(Protocol):
    """What a register returns (the ``PUT /v1/instances/...`` body): the TTL granted and the
    heartbeat interval the registry asks for."""

    @property
    def ttl(self) -> float: ...

    @property
    def heartbeat_interval(self) -> float: ...


class RegistrationAPI(Protocol):
    """The three registry calls a registrar makes (the HTTP client implements them)."""

    async def register(
        self,
        namespace: str,
        service: str,
        instance_id: str,
        address: str,
        port: int,
        labels: Mapping[str, str],
        metrics_port: int | None,
        ttl: float | None,
    ) -> RegisterAnswer:
        """Create or refresh the instance; :class:`RegistrationUnavailable` when it cannot."""
        ...

    async def heartbeat(
        self, namespace: str, service: str, instance_id: str, report: PolicyReport
    ) -> None:
        """Renew the TTL and report the policy; :class:`InstanceNotFound` on a 404."""
        ...

    async def deregister(self, namespace: str, service: str, instance_id: str) -> None:
        """Remove the instance now; :class:`InstanceNotFound` when it is already gone."""
        ...


@dataclass(frozen=True)
class RegistrarSettings:
    """The registrar's knobs; the module docstring says why the defaults are what they are."""

    #: Each heartbeat waits the interval times a uniform draw in [1 - jitter, 1 + jitter].
    heartbeat_jitter: float = 0.1
    #: The first retry after a failure waits between half this and this (seconds)...
    backoff_base: float = 0.5
    #: ...doubling up to this cap; None: the heartbeat interval in force.
    backoff_cap: float | None = None
    #: A registry's ``Retry-After`` is honoured up to this many seconds (a bad header must not
    #: park an instance past its TTL for long).
    retry_after_cap: float = 30.0
    #: How long a drain (DELETE) may take before :meth:`RegistrationHandle.close` gives up.
    drain_timeout: float = 2.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.heartbeat_jitter < 1.0:
            raise ValueError(
                "RegistrarSettings.heartbeat_jitter must be in [0, 1), "
                f"got {self.heartbeat_jitter!r}"
            )
        for name in ("backoff_base", "backoff_cap", "retry_after_cap", "drain_timeout"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"RegistrarSettings.{name} must be a positive number, got {value!r}"
                )


# -- the schedule (pure) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Where one instance's registration stands: whether the next call is a heartbeat (else a
    register), the interval the registry asked for, and consecutive failures."""

    registered: bool = False
    interval: float = DEFAULT_HEARTBEAT_INTERVAL
    failures: int = 0


@dataclass(frozen=True)
class Accepted:
    """A register succeeded; the registry asks for heartbeats every ``interval`` seconds."""

    interval: float


@dataclass(frozen=True)
class Renewed:
    """A heartbeat succeeded."""


@dataclass(frozen=True)
class Missing:
    """The registry does not know the instance (a heartbeat's 404)."""


@dataclass(frozen=True)
class Failed:
    """A call failed: the registry is away, refused, or answered what the API does not promise."""

    retry_after: float | None = None


Outcome = Accepted | Renewed | Missing | Failed


def heartbeat_delay(interval: float, rng: random.Random, jitter: float = 0.1) -> float:
    """Seconds until the next heartbeat: ``interval`` ± ``jitter`` (a fraction), uniform."""
    return interval * rng.uniform(1.0 - jitter, 1.0 + jitter)


def retry_delay(
    failures: int,
    rng: random.Random,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    retry_after_cap: float = 30.0,
) -> float:
    """Seconds before retrying after ``failures`` consecutive failures: the SVID renewer's
    jittered exponential back-off (:func:`~meshlib.identity.renewal.backoff_delay`), but never
    sooner than the registry's ``Retry-After`` (itself bounded by ``retry_after_cap``)."""
    delay = backoff_delay(failures, rng, base=base, cap=cap)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay


def plan(
    schedule: Schedule, outcome: Outcome, rng: random.Random, settings: RegistrarSettings
) -> tuple[Schedule, float]:
    """The next schedule and the seconds to wait before its call (0: at once)."""
    if isinstance(outcome, Accepted):
        ahead = Schedule(registered=True, interval=outcome.interval)
        return ahead, heartbeat_delay(ahead.interval, rng, settings.heartbeat_jitter)
    if isinstance(outcome, Renewed):
        ahead = replace(schedule, registered=True, failures=0)
        return ahead, heartbeat_delay(ahead.interval, rng, settings.heartbeat_jitter)
    if isinstance(outcome, Missing):
        return replace(schedule, registered=False, failures=0), 0.0
    failures = schedule.failures + 1
    cap = schedule.interval if settings.backoff_cap is None else settings.backoff_cap
    delay = retry_delay(
        failures,
        rng,
        base=min(settings.backoff_base, cap),
        cap=cap,
        retry_after=outcome.retry_after,
        retry_after_cap=settings.retry_after_cap,
    )
    return replace(schedule, failures=failures), delay


# -- the driver --------------------------------------------------------------------------------


@dataclass
class RegistrationStatus:
    """What a handle's registration has done so far (debug pages, tests)."""

    registered: bool = False
    registrations: int = 0
    heartbeats: int = 0
    #: Consecutive failed calls (0 after a success).
    failures: int = 0
    last_error: str | None = None
    #: Set by a drain: True once the registry confirmed the DELETE (or had no such instance).
    drained: bool | None = None


class RegistrationHandle:
    """One instance kept registered by a :class:`Registrar`; :meth:`close` drains it."""

    def __init__(
        self,
        registrar: Registrar,
        namespace: str,
        service: str,
        address: str,
        port: int,
        labels: Mapping[str, str],
        metrics_port: int | None,
        ttl: float | None,
    ) -> None:
        self.namespace = namespace
        self.service = service
        self.address = address
        self.port = port
        self.labels = dict(labels)
        self.metrics_port = metrics_port
        self.ttl = ttl
        self.id = instance_id(namespace, service, address, port)
        self.status = RegistrationStatus()
        self._registrar = registrar
        self._future: concurrent.futures.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._drain: asyncio.Task[bool] | None = None

    def close(self) -> bool:
        """Stop heartbeating and drain: True once the registry removed the instance, False if
        it could not be reached within ``drain_timeout`` (the TTL removes it then). Safe to
        call twice; never from the registrar's own loop (await :meth:`aclose` there)."""
        return self._registrar.from_thread(self.aclose)

    async def aclose(self) -> bool:
        """:meth:`close` for code on the registrar's loop."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._drain_now())
        return await asyncio.shield(self._drain)

    async def _drain_now(self) -> bool:
        self._closing = True
        if self._task is not None:
            # Cancelling wakes its sleep at once; waiting for it means a register still in
            # flight cannot land after the DELETE and leave a record behind until its TTL.
            self._task.cancel()
            await asyncio.wait({self._task})
        elif self._future is not None:
            self._future.cancel()
        drained = await self._registrar.deregister(self)
        self.status.drained = drained
        self.status.registered = False
        return drained

    def __repr__(self) -> str:
        return (
            f"<RegistrationHandle {self.service}.{self.namespace} {self.address}:{self.port} "
            f"id={self.id} registered={self.status.registered}>"
        )


class Registrar:
    """Keeps instances registered through ``api`` (see the module docstring for the rules).

    ``report`` is called before each heartbeat for the policy report (None: report nothing).
    ``loop`` is the :class:`LoopThread` to run on, shared with other client parts; without
    one the registrar starts its own and stops it on :meth:`close`. ``rng`` and ``sleep`` are
    the randomness and the wait (tests pass a seeded one and a fake clock's)."""

    def __init__(
        self,
        api: RegistrationAPI,
        *,
        report: Callable[[], PolicyReport] | None = None,
        loop: LoopThread | None = None,
        settings: RegistrarSettings | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self.settings = settings or RegistrarSettings()
        self._report = report
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._owns_loop = loop is None
        self._loop = (loop or LoopThread("meshlib-registrar")).start()
        self._handles: list[RegistrationHandle] = []
        self._closed = False

    @property
    def handles(self) -> tuple[RegistrationHandle, ...]:
        return tuple(self._handles)

    def add(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        ttl: float | None = None,
    ) -> RegistrationHandle:
        """Start keeping ``address:port`` registered as an instance of ``namespace/service``;
        returns at once (the register happens in the background, and is retried)."""
        if self._closed:
            raise RuntimeError("the registrar is closed")
        _check_instance(namespace, service, address, port, metrics_port, ttl)
        handle = RegistrationHandle(
            self, namespace, service, address, port, labels or {}, metrics_port, ttl
        )
        self._handles.append(handle)
        handle._future = self._loop.submit(self.keep(handle))
        return handle

    async def keep(self, handle: RegistrationHandle) -> None:
        """Register ``handle``'s instance and keep it registered until cancelled."""
        if handle._closing:  # closed before this task first ran
            return
        handle._task = asyncio.current_task()
        schedule = Schedule()
        while True:
            outcome = await self._attempt(handle, schedule)
            schedule, delay = plan(schedule, outcome, self._rng, self.settings)
            if delay > 0:
                await self._sleep(delay)

    async def _attempt(self, handle: RegistrationHandle, schedule: Schedule) -> Outcome:
        status = handle.status
        verb = "heartbeat" if schedule.registered else "register"
        try:
            if schedule.registered:
                await self.api.heartbeat(handle.namespace, handle.service, handle.id, self.report())
                status.heartbeats += 1
                outcome: Outcome = Renewed()
            else:
                answer = await self.api.register(
                    handle.namespace,
                    handle.service,
                    handle.id,
                    handle.address,
                    handle.port,
                    handle.labels,
                    handle.metrics_port,
                    handle.ttl,
                )
                status.registrations += 1
                outcome = Accepted(answer.heartbeat_interval)
        except InstanceNotFound:
            log.info(
                "registry: %r is not registered (expired, or the registry restarted): "
                "registering again",
                handle,
            )
            status.registered = False
            return Missing()
        except Exception as exc:  # the registry away or any other failure: retry, never give up
            retry_after = exc.retry_after if isinstance(exc, RegistrationUnavailable) else None
            if status.failures == 0:
                log.warning("registry: %s of %r failed, retrying: %s", verb, handle, exc)
            status.failures += 1
            status.last_error = f"{type(exc).__name__}: {exc}"
            return Failed(retry_after)
        if status.failures:
            log.info(
                "registry: %s of %r succeeded after %d failures", verb, handle, status.failures
            )
        status.failures = 0
        status.registered = True
        return outcome

    def report(self) -> PolicyReport:
        """The owner's policy report; a report that fails is logged and left out, so a bug in
        it never stops the heartbeats that keep the instance alive."""
        if self._report is None:
            return PolicyReport()
        try:
            return self._report()
        except Exception:
            log.exception("registry: the policy report failed; heartbeating without it")
            return PolicyReport()

    async def deregister(self, handle: RegistrationHandle) -> bool:
        """DELETE ``handle``'s instance, bounded by ``drain_timeout``; True when it is gone."""
        if handle in self._handles:
            self._handles.remove(handle)
        try:
            await asyncio.wait_for(
                self.api.deregister(handle.namespace, handle.service, handle.id),
                self.settings.drain_timeout,
            )
        except InstanceNotFound:
            return True  # already gone (expired, or never registered): a drain is done
        except asyncio.TimeoutError:
            log.warning(
                "registry: drain of %r took more than %gs; its TTL will remove it",
                handle,
                self.settings.drain_timeout,
            )
            return False
        except Exception as exc:
            log.warning("registry: drain of %r failed (%s); its TTL will remove it", handle, exc)
            return False
        return True

    def from_thread(self, drain: Callable[[], Coroutine[Any, Any, bool]]) -> bool:
        """Run a drain on the registrar's loop from another thread, bounded: False when the
        loop is gone or the drain outlives ``drain_timeout`` (plus a margin to unwind)."""
        if _on_loop(self._loop):
            raise RuntimeError("on the registrar's loop: await aclose() instead of close()")
        if not self._loop.running:
            return False
        bound = self.settings.drain_timeout + 1.0
        try:
            return self._loop.submit(drain()).result(bound)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return False

    async def aclose(self) -> bool:
        """Drain every instance at once (concurrently, so the bound is one ``drain_timeout``)."""
        self._closed = True
        results = await asyncio.gather(*(h.aclose() for h in list(self._handles)))
        return all(results)

    def close(self) -> bool:
        """Drain every instance, then stop the loop if the registrar started it."""
        self._closed = True
        try:
            return self.from_thread(self.aclose)
        finally:
            if self._owns_loop:
                self._loop.stop()

    def __enter__(self) -> Registrar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The TTLs the registry accepts (the API answers 400 outside them).
TTL_RANGE = (1.0, 300.0)


def _check_instance(
    namespace: str,
    service: str,
    address: str,
    port: int,
    metrics_port: int | None,
    ttl: float | None,
) -> None:
    """Refuse here what the registry would refuse with a 400: retried in the background, it
    would only fail again and again, far from the line that asked for it."""
    for name, value in (("namespace", namespace), ("service", service), ("address", address)):
        if not value or "\n" in value or "/" in value:
            raise ValueError(
                f"register: {name} must be a non-empty name without '/', got {value!r}"
            )
    for name, number in (("port", port), ("metrics_port", metrics_port)):
        if number is not None and not 1 <= number <= 65535:
            raise ValueError(f"register: {name} must be in 1..65535, got {number!r}")
    low, high = TTL_RANGE
    if ttl is not None and not low <= ttl <= high:
        raise ValueError(f"register: ttl must be {low:g}..{high:g} seconds, got {ttl!r}")


def _on_loop(loop: LoopThread) -> bool:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return loop.running and running is loop.loop
