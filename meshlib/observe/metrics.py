"""Prometheus golden metrics for calls (DESIGN.md §6).

The per-call families (``mesh_requests_total``, ``mesh_request_duration_seconds``,
``mesh_attempts_total``) are served by one custom collector: a call updates one row under one
lock (a bisect for the bucket) instead of three prometheus-client children with a lock each,
which halves the hot-path cost. The rest are ordinary prometheus-client metrics, off the hot path.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from meshlib.decision import AttemptRecord

_LABELS = ("direction", "source", "destination", "route", "code", "reason")

#: Buckets in seconds, from loopback-fast to the longest sane timeout.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: Bound on distinct label sets per family: route labels are names from config, but a guard
#: keeps a bug or hostile input from growing memory without limit; extra sets collapse to one.
MAX_SERIES = 10_000
_OVERFLOW = "__overflow__"


class _CallStats(Collector):
    """Counts and latency histogram per call label set, plus attempts per endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # call labels -> [count, sum, bucket counts (not cumulative; +Inf last)]
        self._calls: dict[tuple[str, ...], _Row] = {}
        self._attempts: dict[tuple[str, ...], int] = {}

    def observe_call(
        self, labels: tuple[str, ...], seconds: float, attempts: Sequence[AttemptRecord] = ()
    ) -> None:
        """One call (``labels``: :data:`_LABELS`) and its attempts, each counted under the
        call's direction, source and destination, its endpoint and its own code."""
        index = bisect.bisect_left(_BUCKETS, seconds)
        # One lock for the call and its attempts; acquire/release, not ``with``: a with-block
        # builds and calls a bound ``__exit__``, ≈ 600 instructions per call on the hot path.
        self._lock.acquire()
        try:
            row = self._calls.get(labels)
            if row is None:
                key = labels
                if len(self._calls) >= MAX_SERIES:
                    key = tuple(_OVERFLOW for _ in labels)
                row = self._calls.setdefault(key, _Row())
            row.count += 1
            row.total += seconds
            row.buckets[index] += 1
            if not attempts:
                return
            direction, source, destination = labels[0], labels[1], labels[2]
            counts = self._attempts
            for a in attempts:
                status = a.status
                code = a.outcome if status is None else str(status)
                attempt: tuple[str, ...] = (direction, source, destination, a.endpoint, code)
                if attempt not in counts and len(counts) >= MAX_SERIES:
                    attempt = (_OVERFLOW,) * len(_ATTEMPT_LABELS)
                counts[attempt] = counts.get(attempt, 0) + 1
        finally:
            self._lock.release()

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            calls = [(k, v.count, v.total, list(v.buckets)) for k, v in self._calls.items()]
            attempts = list(self._attempts.items())
        requests = CounterMetricFamily(
            "mesh_requests", "Calls (not attempts) by outcome.", labels=_LABELS
        )
        duration = HistogramMetricFamily(
            "mesh_request_duration_seconds",
            "Call latency including every attempt and backoff.",
            labels=_LABELS,
        )
        for labels, count, total, buckets in calls:
            requests.add_metric(list(labels), count)
            cumulative: list[tuple[str, float]] = []
            running = 0
            for bound, n in zip((*_BUCKETS, float("inf")), buckets, strict=True):
                running += n
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            duration.add_metric(list(labels), cumulative, total)
        yield requests
        yield duration
        family = CounterMetricFamily(
            "mesh_attempts", "Attempts (tries on one endpoint).", labels=_ATTEMPT_LABELS
        )
        for labels, n in attempts:
            family.add_metric(list(labels), n)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("mesh_requests", "Calls", labels=_LABELS)
        yield HistogramMetricFamily("mesh_request_duration_seconds", "Latency", labels=_LABELS)
        yield CounterMetricFamily("mesh_attempts", "Attempts", labels=_ATTEMPT_LABELS)


class _Row:
    __slots__ = ("buckets", "count", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = 0.0
        self.buckets = [0] * (len(_BUCKETS) + 1)


#: ``code`` is the attempt's own status, or its outcome when it got none (``connect_failure``,
#: ``timeout``, ``reset``, ``cancelled`` for a hedge that lost the race, ``error``): the
#: "actual" success rate, before retries, is read from these.
_ATTEMPT_LABELS = ("direction", "source", "destination", "endpoint", "code")


class Labelled:
    """A prometheus-client metric with its labelled children cached.

    ``Counter.labels()`` validates and locks on every call (about 1.5 µs); a call that
    retries or injects a fault would pay it on the hot path. Here a known label set costs one
    dict lookup. Beyond ``MAX_SERIES`` label sets the extra ones share an overflow child.
    """

    __slots__ = ("_children", "metric")

    def __init__(self, metric: Counter | Gauge) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        """The child for ``values`` (a ``Counter`` or ``Gauge`` child: ``inc()``/``set()``)."""
        child = self._children.get(values)
        if child is None:  # a race only builds the same child twice: labels() is idempotent
            if len(self._children) >= MAX_SERIES:
                values = tuple(_OVERFLOW for _ in values)
                child = self._children.get(values)
            if child is None:
                child = self._children[values] = self.metric.labels(*values)
        return child


class MeshMetrics:
    """The metric families of one mesh, registered in ``registry`` (the default one unless
    given). Two meshes sharing a registry share the families."""

    #: Keyed weakly: a registry that is dropped takes its families with it (an id() key could
    #: be reused by a new registry and hand it the old one's families).
    _shared: weakref.WeakKeyDictionary[CollectorRegistry, MeshMetrics] = weakref.WeakKeyDictionary()

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = _CallStats()
        registry.register(self.calls)
        self.retries = Labelled(
            Counter(
                "mesh_retries_total", "Retries sent.", ("source", "destination"), registry=registry
            )
        )
        self.budget_exhausted = Labelled(
            Counter(
                "mesh_retry_budget_exhausted_total",
                "Retries skipped because the retry budget was spent.",
                ("source", "destination"),
                registry=registry,
            )
        )
        self.circuit_state = Labelled(
            Gauge(
                "mesh_circuit_state",
                "Circuit breaker state per backend: 0 closed, 1 open, 2 half-open.",
                ("source", "destination"),
                registry=registry,
            )
        )
        self.ejections = Labelled(
            Counter(
                "mesh_endpoint_ejections_total",
                "Outlier ejections of endpoints.",
                ("source", "destination", "endpoint"),
                registry=registry,
            )
        )
        self.faults = Labelled(
            Counter(
                "mesh_faults_injected_total",
                "Faults injected by policy.",
                ("source", "destination", "kind"),
                registry=registry,
            )
        )
        self.authz_decisions = Labelled(
            Counter(
                "mesh_authz_decisions_total",
                "Inbound authorization decisions; verdict is the policy's answer (an audit-mode "
                "deny is counted as deny although the request proceeds).",
                ("source", "destination", "verdict", "mode"),
                registry=registry,
            )
        )
        self.reloads = Labelled(
            Counter(
                "mesh_config_reloads_total",
                "Policy reloads by result.",
                ("result",),
                registry=registry,
            )
        )
        self.cert_expiry = Labelled(
            Gauge(
                "mesh_cert_expiry_timestamp_seconds",
                "Expiry (not-after, Unix seconds) of the SVID this workload presents.",
                ("identity",),
                registry=registry,
            )
        )
        self.renewal_failures = Counter(
            "mesh_cert_renewal_failures_total",
            "Failed SVID renewal attempts (the issuer or CA was unavailable or refused).",
            ("identity",),
            registry=registry,
        )
        self.renewal_overdue = Gauge(
            "mesh_cert_renewal_overdue",
            "1 once 80% of the SVID's lifetime has passed without a renewal, else 0.",
            ("identity",),
            registry=registry,
        )

        self.registry_up = Labelled(
            Gauge(
                "mesh_registry_up",
                "1 while this workload's last request to the registry succeeded, else 0.",
                ("registry",),
                registry=registry,
            )
        )
        self.registry_staleness = Labelled(
            Gauge(
                "mesh_registry_staleness_seconds",
                "Seconds since this workload last heard from the registry (0 while a watch is "
                "answered; grows while the registry is away and the last known state is used).",
                ("registry",),
                registry=registry,
            )
        )
        self.policy_version = Labelled(
            Gauge(
                "mesh_policy_version",
                "The registry policy version this workload applied, and the last it rejected "
                "(0: none).",
                ("state",),
                registry=registry,
            )
        )

        self.gateway_info = Labelled(
            Gauge(
                "mesh_gateway_info",
                "1 for each Gateway this process serves as an ingress gateway, with the mesh "
                "Service it runs as (meshctl graph draws it as the entry node).",
                ("service", "gateway"),
                registry=registry,
            )
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> MeshMetrics:
        reg = registry if registry is not None else REGISTRY
        found = cls._shared.get(reg)
        if found is None:
            found = cls._shared[reg] = cls(reg)
        return found

    def observe_call(
        self,
        source: str,
        destination: str,
        route: str,
        code: str,
        reason: str,
        seconds: float,
        attempts: Sequence[AttemptRecord] = (),
    ) -> None:
        """One call: counted, timed, and each of its attempts counted per endpoint."""
        self.calls.observe_call(
            ("outbound", source, destination, route, code, reason), seconds, attempts
        )

    def observe_inbound(
        self, source: str, destination: str, route: str, code: str, reason: str, seconds: float
    ) -> None:
        """One inbound request handled (or refused) by the middleware."""
        self.calls.observe_call(("inbound", source, destination, route, code, reason), seconds)

    def observe_authz(self, source: str, destination: str, verdict: str, mode: str) -> None:
        """One inbound authorization decision (``verdict``: allow or deny; ``mode``: the
        mesh's accessControl)."""
        self.authz_decisions.labels(source, destination, verdict, mode).inc()

    def set_circuit_state(self, source: str, destination: str, state: str) -> None:
        self.circuit_state.labels(source, destination).set(_CIRCUIT_VALUES[state])

    def set_gateway(self, service: str, gateway: str) -> None:
        """This process serves ``gateway`` (``namespace/name``) as ``service`` (``name.ns``)."""
        self.gateway_info.labels(service, gateway).set(1)

    def set_cert_expiry(self, identity: str, timestamp: float) -> None:
        """The not-after of the SVID presented as ``identity`` (set at load and each reload)."""
        self.cert_expiry.labels(identity).set(timestamp)

    def renewal_failed(self, identity: str) -> None:
        self.renewal_failures.labels(identity).inc()

    def set_renewal_overdue(self, identity: str, overdue: bool) -> None:
        self.renewal_overdue.labels(identity).set(1.0 if overdue else 0.0)

    def track_registry(
        self, registry: str, up: Callable[[], bool], staleness: Callable[[], float]
    ) -> None:
        """Read ``up()`` and ``staleness()`` (seconds) at every scrape: staleness grows while
        the registry is away and the last known state is in use."""
        self.registry_up.labels(registry).set_function(lambda: 1.0 if up() else 0.0)
        self.registry_staleness.labels(registry).set_function(staleness)

    def set_policy_version(self, state: str, version: int) -> None:
        """``state``: ``applied`` or ``rejected``."""
        self.policy_version.labels(state).set(float(version))


_CIRCUIT_VALUES = {"closed": 0.0, "open": 1.0, "half_open": 2.0}


class RegistryMetrics:
    """The registry process's own families (DESIGN.md §8), served on its ``/metrics``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        reg = registry if registry is not None else REGISTRY
        self.instances = Gauge(
            "mesh_registry_instances", "Live registered instances.", registry=reg
        )
        self.wakeups = Counter(
            "mesh_registry_watch_wakeups_total",
            "Blocking queries answered because their service (or the policy) changed: a change "
            "to one service wakes only that service's watchers.",
            registry=reg,
        )
        self.refusals = Counter(
            "mesh_registry_refusals_total",
            "Requests refused by the registry's authorization (403), by verb.",
            ("verb",),
            registry=reg,
        )
        self.preserving = Gauge(
            "mesh_registry_self_preservation",
            "1 while expiry is held because many instances went silent at once.",
            registry=reg,
        )
        self.watchers = Gauge(
            "mesh_registry_blocking_queries", "Blocking queries held open now.", registry=reg
        )

    def set_instances(self, count: int) -> None:
        self.instances.set(float(count))

    def woke(self, watchers: int = 1) -> None:
        self.wakeups.inc(watchers)

    def refused(self, verb: str) -> None:
        self.refusals.labels(verb).inc()

    def set_preserving(self, preserving: bool) -> None:
        self.preserving.set(1.0 if preserving else 0.0)

    def set_watchers(self, count: int) -> None:
        self.watchers.set(float(count))
