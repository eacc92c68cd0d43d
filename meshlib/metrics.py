"""Prometheus golden metrics for calls (DESIGN.md §6), with labelled children cached so the hot
path costs two dictionary lookups and two increments per call."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

_LABELS = ("direction", "source", "destination", "route", "code", "reason")

#: Buckets in seconds, from loopback-fast to the longest sane timeout.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MeshMetrics:
    """The metric families of one mesh, registered in ``registry`` (the default one unless
    given). Two meshes sharing a registry share the families."""

    _shared: dict[int, MeshMetrics] = {}

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "mesh_requests_total", "Calls (not attempts) by outcome.", _LABELS, registry=registry
        )
        self.duration = Histogram(
            "mesh_request_duration_seconds",
            "Call latency including every attempt and backoff.",
            _LABELS,
            buckets=_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            "mesh_attempts_total",
            "Attempts (tries on one endpoint).",
            ("direction", "source", "destination", "endpoint"),
            registry=registry,
        )
        self.retries = Counter(
            "mesh_retries_total", "Retries sent.", ("source", "destination"), registry=registry
        )
        self.budget_exhausted = Counter(
            "mesh_retry_budget_exhausted_total",
            "Retries skipped because the retry budget was spent.",
            ("source", "destination"),
            registry=registry,
        )
        self.circuit_state = Gauge(
            "mesh_circuit_state",
            "Circuit breaker state per backend: 0 closed, 1 open, 2 half-open.",
            ("source", "destination"),
            registry=registry,
        )
        self.ejections = Counter(
            "mesh_endpoint_ejections_total",
            "Outlier ejections of endpoints.",
            ("source", "destination", "endpoint"),
            registry=registry,
        )
        self.faults = Counter(
            "mesh_faults_injected_total",
            "Faults injected by policy.",
            ("source", "destination", "kind"),
            registry=registry,
        )
        self.reloads = Counter(
            "mesh_config_reloads_total",
            "Policy reloads by result.",
            ("result",),
            registry=registry,
        )
        self._children: dict[tuple[str, ...], tuple[Counter, Histogram]] = {}

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None) -> MeshMetrics:
        reg = registry if registry is not None else REGISTRY
        found = cls._shared.get(id(reg))
        if found is None:
            found = cls._shared[id(reg)] = cls(reg)
        return found

    def observe_call(
        self,
        source: str,
        destination: str,
        route: str,
        code: str,
        reason: str,
        seconds: float,
    ) -> None:
        key = (source, destination, route, code, reason)
        children = self._children.get(key)
        if children is None:
            labels = ("outbound", *key)
            children = (self.requests.labels(*labels), self.duration.labels(*labels))
            if len(self._children) < 10_000:  # label sets are bounded by config, guard anyway
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
