"""The registry's pure core: which instances are registered and live, each service's index, whether
the registry is warming or preserving, and the append-only policy versions — values in, decisions
out, the time passed in as ``now``.

No I/O, no asyncio, no store: the ASGI app and the stores are its drivers (CONTROL-PLANE.md §2).
A driver loads a :class:`Registry` from its store's contents, calls one method per request or
timer tick, persists what the returned value says changed and answers with it. ``now`` is any
clock consistent with the times already in the records; the driver uses the same one throughout
(docs/control-plane.md, "Core"). Bad input raises :class:`ValueError` naming the field.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

#: An instance's labels, sorted by key: a tuple so an :class:`Instance` is immutable throughout.
Labels = tuple[tuple[str, str], ...]
#: ``(namespace, service)``: the unit a blocking query watches and an index counts changes of.
ServiceKey = tuple[str, str]

#: The index of a service nobody registered yet; a first query (index 0) answers at once.
FIRST_INDEX = 1


def instance_id(namespace: str, service: str, address: str, port: int) -> str:
    """The deterministic id of the instance at ``address:port`` of ``namespace/service``.

    The first 16 hex digits (64 bits) of SHA-256 over the four fields joined by newlines (which no
    field may contain), the address lower-cased (host names and IPv6 hex are case-insensitive).
    A client computes the id it registers under, so a retried or repeated register lands on the
    same record: register is idempotent (Consul's service ID, Eureka's instance ID).
    """
    key = "\n".join((namespace, service, address.lower(), str(port)))
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def policy_digest(text: str) -> str:
    """The digest a policy version carries (and an ETag can quote): ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class RegistrySettings:
    """The core's knobs; the defaults are DESIGN.md §8 and docs/control-plane.md says why."""

    #: TTL of an instance that registers without one (heartbeats every ~3 s renew it).
    default_ttl: float = 10.0
    #: How long after start the registry is not authoritative and expires nothing: one TTL, so
    #: every live instance has had the chance to heartbeat (and re-register on a 404).
    warming: float = 10.0
    #: An instance silent for more than this fraction of its TTL has missed a heartbeat: it
    #: counts toward a mass loss before it expires, so the wave is seen before its first removal.
    lapse_fraction: float = 0.5
    #: Self-preservation engages when more than this fraction of live instances lapse at once
    #: (Eureka's 85 % renewal threshold; RELIABILITY.md FAULT-9 cuts 30 %)...
    preservation_threshold: float = 0.15
    #: ...and at least this many: one silent instance is a dead instance, not a partition.
    preservation_min_instances: int = 2
    #: The bound on self-preservation (10 TTLs, CONTROL-PLANE.md §5): then expiry resumes.
    preservation_limit: float = 100.0

    def __post_init__(self) -> None:
        for name in ("default_ttl", "preservation_limit"):
            _check_positive(f"RegistrySettings.{name}", getattr(self, name))
        if not (math.isfinite(self.warming) and self.warming >= 0):
            raise ValueError(f"RegistrySettings.warming must be >= 0 seconds, got {self.warming!r}")
        for name in ("lapse_fraction", "preservation_threshold"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"RegistrySettings.{name} must be in (0, 1), got {value!r}")
        if self.preservation_min_instances < 1:
            raise ValueError(
                "RegistrySettings.preservation_min_instances must be >= 1, "
                f"got {self.preservation_min_instances!r}"
            )


@dataclass(frozen=True)
class Instance:
    """One registered instance: what it registered, when it last renewed, and which policy
    version it reported applying or rejecting (``meshctl get instances``)."""

    id: str
    namespace: str
    service: str
    address: str
    port: int
    labels: Labels
    metrics_port: int | None
    #: The SPIFFE ID that registered it (the driver checks it may).
    identity: str
    ttl: float
    registered_at: float
    last_heartbeat: float
    applied_version: int | None = None
    rejected_version: int | None = None
    #: The client's error for ``rejected_version`` (file:line, as its loader said it): a NACK
    #: without detail is useless to an operator.
    rejection: str | None = None

    @property
    def deadline(self) -> float:
        """When the instance expires unless it heartbeats (or the registry holds expiry)."""
        return self.last_heartbeat + self.ttl

    @property
    def key(self) -> ServiceKey:
        return (self.namespace, self.service)

    @property
    def registration(self) -> tuple[object, ...]:
        """What a watcher of the service sees change; heartbeats and policy reports are not."""
        return (self.address, self.port, self.labels, self.metrics_port, self.identity, self.ttl)


class Change(enum.Enum):
    """What a register did to the registry."""

    CREATED = "created"  # a new instance: the service's index moves
    UPDATED = "updated"  # same id, other labels/metrics port/identity/TTL: the index moves
    REFRESHED = "refreshed"  # identical data: a renewal only, the index stays


@dataclass(frozen=True)
class Registration:
    instance: Instance
    change: Change
    #: The service's index after the register.
    index: int


@dataclass(frozen=True)
class Renewed:
    instance: Instance


@dataclass(frozen=True)
class Drained:
    instance: Instance
    index: int


@dataclass(frozen=True)
class NotFound:
    """No such instance (a heartbeat's 404: the client re-registers now) or policy version."""

    key: str


@dataclass(frozen=True)
class Endpoints:
    """One answer to a blocking query: a full snapshot of one service, never a delta."""

    namespace: str
    service: str
    index: int
    epoch: str
    authoritative: bool
    instances: tuple[Instance, ...]


class RegistryState(enum.Enum):
    WARMING = "warming"  # just started: not authoritative, expires nothing
    SERVING = "serving"  # authoritative, expires instances whose TTL passed
    PRESERVING = "preserving"  # a mass heartbeat loss: expiry held, for a bounded time


@dataclass(frozen=True)
class RegistryStatus:
    epoch: str
    state: RegistryState
    authoritative: bool
    instances: int
    #: When self-preservation engaged (None when not preserving) and why, for /v1/status.
    preserving_since: float | None
    reason: str | None


@dataclass(frozen=True)
class PolicyVersion:
    """One version of the registry's policy: append-only, never edited."""

    version: int
    #: The policy text, already validated by the driver with the loader clients use.
    text: str
    digest: str
    #: The SPIFFE ID that applied it.
    author: str
    created_at: float
    #: The version whose text a rollback copied, else None.
    rollback_of: int | None = None


@dataclass(frozen=True)
class VersionConflict:
    """``If-Match`` named a version that is no longer the current one (HTTP 409)."""

    current: int


class PolicyLog:
    """The append-only list of policy versions; the current version doubles as the policy's
    index for blocking queries (0 before the first)."""

    def __init__(self, versions: Iterable[PolicyVersion] = ()) -> None:
        self._versions = tuple(versions)
        for position, version in enumerate(self._versions, start=1):
            if version.version != position:
                raise ValueError(
                    f"policy versions must be numbered 1, 2, 3...: found version "
                    f"{version.version} at position {position}"
                )

    @property
    def version(self) -> int:
        return len(self._versions)

    def changed_since(self, index: int) -> bool:
        """Whether a blocking policy query holding ``index`` (a version) answers now."""
        return self.version != index

    def current(self) -> PolicyVersion | None:
        return self._versions[-1] if self._versions else None

    def history(self) -> tuple[PolicyVersion, ...]:
        return self._versions

    def get(self, version: int) -> PolicyVersion | None:
        return self._versions[version - 1] if 1 <= version <= len(self._versions) else None

    def propose(
        self, text: str, *, author: str, if_match: int | None, now: float
    ) -> PolicyVersion | VersionConflict:
        """Append ``text`` as the next version if ``if_match`` is the current version (None: no
        precondition). The version is the fencing token: of two proposals made against the same
        version exactly one wins, the other gets :class:`VersionConflict` and re-reads.
        Re-proposing the current text makes no new version (a repeated apply is not a change)."""
        return self._commit_new(self.plan_propose(text, author=author, if_match=if_match, now=now))

    def plan_propose(
        self, text: str, *, author: str, if_match: int | None, now: float
    ) -> PolicyVersion | VersionConflict:
        """What :meth:`propose` would return, appending nothing: a driver persists a new version
        (``version == self.version + 1``), then passes it to :meth:`commit`."""
        return self._next(text, author=author, if_match=if_match, now=now, rollback_of=None)

    def rollback(
        self, to_version: int, *, author: str, if_match: int | None = None, now: float
    ) -> PolicyVersion | VersionConflict | NotFound:
        """A NEW version carrying ``to_version``'s text: history is never rewritten."""
        done = self.plan_rollback(to_version, author=author, if_match=if_match, now=now)
        return done if isinstance(done, NotFound) else self._commit_new(done)

    def plan_rollback(
        self, to_version: int, *, author: str, if_match: int | None = None, now: float
    ) -> PolicyVersion | VersionConflict | NotFound:
        """What :meth:`rollback` would return, appending nothing (see :meth:`plan_propose`)."""
        old = self.get(to_version)
        if old is None:
            return NotFound(f"policy version {to_version}")
        return self._next(
            old.text, author=author, if_match=if_match, now=now, rollback_of=old.version
        )

    def commit(self, version: PolicyVersion) -> None:
        """Append a planned version; it must be the next one."""
        if version.version != self.version + 1:
            raise ValueError(
                f"policy version {version.version} is not the next one ({self.version + 1})"
            )
        self._versions = (*self._versions, version)

    def add(self, version: PolicyVersion) -> bool:
        """Take a version another replica wrote (read from the store): True when it is the next
        one and was appended, False when it is already here. A version past the next one is a
        gap the driver must not paper over (:class:`ValueError`: list the store again)."""
        if version.version <= self.version:
            return False
        self.commit(version)
        return True

    def _commit_new(self, done: PolicyVersion | VersionConflict) -> PolicyVersion | VersionConflict:
        if isinstance(done, PolicyVersion) and done.version == self.version + 1:
            self.commit(done)
        return done

    def _next(
        self, text: str, *, author: str, if_match: int | None, now: float, rollback_of: int | None
    ) -> PolicyVersion | VersionConflict:
        if if_match is not None and if_match != self.version:
            return VersionConflict(self.version)
        digest = policy_digest(text)
        current = self.current()
        if current is not None and current.digest == digest:
            return current
        return PolicyVersion(self.version + 1, text, digest, author, now, rollback_of)


class Registry:
    """The instance registry of one epoch, started at ``now`` from a store's contents (or empty).

    ``epoch`` names this registry's life (the driver picks a random one for an empty store and
    keeps the stored one otherwise); clients reset their index when it changes.
    """

    def __init__(
        self,
        epoch: str,
        now: float,
        settings: RegistrySettings | None = None,
        *,
        instances: Iterable[Instance] = (),
        indexes: Mapping[ServiceKey, int] | None = None,
        policy: Iterable[PolicyVersion] = (),
    ) -> None:
        if not epoch:
            raise ValueError("Registry epoch must be a non-empty string")
        self.epoch = epoch
        self.settings = settings or RegistrySettings()
        self.started_at = now
        self.policy = PolicyLog(policy)
        self._instances: dict[str, Instance] = {}
        self._members: dict[ServiceKey, dict[str, Instance]] = {}
        self._indexes: dict[ServiceKey, int] = dict(indexes or {})
        for key, index in self._indexes.items():
            if index < FIRST_INDEX:
                raise ValueError(f"stored index of {key[0]}/{key[1]} must be >= 1, got {index!r}")
        for instance in instances:
            expected = instance_id(
                instance.namespace, instance.service, instance.address, instance.port
            )
            if instance.id != expected:
                raise ValueError(f"stored instance {instance.id!r} should have id {expected!r}")
            self._put(instance)
        self._preserving_since: float | None = None
        self._reason: str | None = None
        # After a preservation ends at its bound, it may engage again only once a pass has seen
        # the loss end: otherwise it would latch again at once (Netflix/eureka#1073).
        self._armed = True

    # -- reads ---------------------------------------------------------------------------------

    def authoritative(self, now: float) -> bool:
        """False while warming: the registry may be missing instances that have not yet
        re-registered, so clients must not apply an empty or halved set from it."""
        return now - self.started_at >= self.settings.warming

    def index(self, namespace: str, service: str) -> int:
        return self._indexes.get((namespace, service), FIRST_INDEX)

    def changed_since(self, namespace: str, service: str, index: int) -> bool:
        """Whether a blocking query holding ``index`` answers now: on any difference, a lower
        index (a change) or a higher one (a client from another epoch, which must reset)."""
        return self.index(namespace, service) != index

    def endpoints(self, namespace: str, service: str, now: float) -> Endpoints:
        members = self._members.get((namespace, service), {})
        return Endpoints(
            namespace,
            service,
            self.index(namespace, service),
            self.epoch,
            self.authoritative(now),
            tuple(members[i] for i in sorted(members)),
        )

    def get(self, id: str) -> Instance | None:
        return self._instances.get(id)

    def count(self) -> int:
        """How many instances are registered (without sorting them, as :meth:`instances` does:
        the driver reports it after every register)."""
        return len(self._instances)

    def instances(self) -> tuple[Instance, ...]:
        """Every registered instance, sorted by service then id (``meshctl get instances``)."""
        return tuple(sorted(self._instances.values(), key=lambda i: (i.key, i.id)))

    def services(self) -> tuple[ServiceKey, ...]:
        return tuple(sorted(self._members))

    def status(self, now: float) -> RegistryStatus:
        if not self.authoritative(now):
            state = RegistryState.WARMING
        elif self._preserving_since is not None:
            state = RegistryState.PRESERVING
        else:
            state = RegistryState.SERVING
        return RegistryStatus(
            self.epoch,
            state,
            self.authoritative(now),
            len(self._instances),
            self._preserving_since,
            self._reason,
        )

    # -- instance verbs ------------------------------------------------------------------------

    def register(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        identity: str,
        ttl: float | None = None,
        now: float,
    ) -> Registration:
        """Create or refresh the instance at ``address:port``; its id is :func:`instance_id`."""
        done = self.plan_register(
            namespace,
            service,
            address,
            port,
            labels=labels,
            metrics_port=metrics_port,
            identity=identity,
            ttl=ttl,
            now=now,
        )
        self.commit(done)
        return done

    def plan_register(
        self,
        namespace: str,
        service: str,
        address: str,
        port: int,
        *,
        labels: Mapping[str, str] | None = None,
        metrics_port: int | None = None,
        identity: str,
        ttl: float | None = None,
        now: float,
    ) -> Registration:
        """What :meth:`register` would do, changing nothing: a driver persists the answer, then
        passes it to :meth:`commit`, so a failed store write leaves the core as it was."""
        ttl = self.settings.default_ttl if ttl is None else ttl
        _check_registration(namespace, service, address, port, labels or {}, metrics_port, ttl)
        if not identity:
            raise ValueError("register: identity must be the registrant's SPIFFE ID")
        id = instance_id(namespace, service, address, port)
        old = self._instances.get(id)
        new = Instance(
            id,
            namespace,
            service,
            address.lower(),
            port,
            tuple(sorted((labels or {}).items())),
            metrics_port,
            identity,
            float(ttl),
            registered_at=now if old is None else old.registered_at,
            last_heartbeat=now,
        )
        if old is None:
            change = Change.CREATED
        else:
            # the policy report survives a re-register: it is about the process, not the record
            new = replace(
                new,
                applied_version=old.applied_version,
                rejected_version=old.rejected_version,
                rejection=old.rejection,
            )
            change = Change.REFRESHED if old.registration == new.registration else Change.UPDATED
        index = self.index(namespace, service) + (0 if change is Change.REFRESHED else 1)
        return Registration(new, change, index)

    def heartbeat(
        self,
        id: str,
        now: float,
        *,
        applied_version: int | None = None,
        rejected_version: int | None = None,
        nack_error: str | None = None,
    ) -> Renewed | NotFound:
        """Renew the instance's TTL and record its policy report (an ACK of ``applied_version``,
        a NACK of ``rejected_version`` with ``nack_error``, as xDS does). :class:`NotFound` when
        it expired or never was: the client re-registers now (Eureka's 404). A heartbeat never
        moves the service's index: watchers wake for membership, not for liveness."""
        done = self.plan_heartbeat(
            id,
            now,
            applied_version=applied_version,
            rejected_version=rejected_version,
            nack_error=nack_error,
        )
        if isinstance(done, Renewed):
            self.commit(done)
        return done

    def plan_heartbeat(
        self,
        id: str,
        now: float,
        *,
        applied_version: int | None = None,
        rejected_version: int | None = None,
        nack_error: str | None = None,
    ) -> Renewed | NotFound:
        """What :meth:`heartbeat` would do, changing nothing (see :meth:`plan_register`)."""
        if (rejected_version is None) != (nack_error is None):
            raise ValueError("heartbeat: a NACK needs both rejected_version and nack_error")
        old = self._instances.get(id)
        if old is None:
            return NotFound(id)
        new = replace(old, last_heartbeat=max(now, old.last_heartbeat))
        if applied_version is not None:
            new = replace(new, applied_version=applied_version)
            if new.rejected_version is not None and new.rejected_version <= applied_version:
                new = replace(new, rejected_version=None, rejection=None)
        if rejected_version is not None:
            new = replace(new, rejected_version=rejected_version, rejection=nack_error)
        return Renewed(new)

    def drain(self, id: str, now: float) -> Drained | NotFound:
        """Remove the instance at once: an explicit delete is never held by self-preservation."""
        done = self.plan_drain(id, now)
        if isinstance(done, Drained):
            self.commit(done)
        return done

    def plan_drain(self, id: str, now: float) -> Drained | NotFound:
        """What :meth:`drain` would do, changing nothing (see :meth:`plan_register`)."""
        old = self._instances.get(id)
        if old is None:
            return NotFound(id)
        return Drained(old, self.index(*old.key) + 1)

    def commit(self, change: Registration | Renewed | Drained) -> None:
        """Apply a planned change: the one the matching ``plan_*`` call returned, with no other
        change committed in between (the driver serialises its writes)."""
        if isinstance(change, Drained):
            self.remove(change.instance.id)  # a replica's mirror may have removed it already
            self.set_index(change.instance.key, change.index)
            return
        self._put(change.instance)
        if isinstance(change, Registration):
            self.set_index(change.instance.key, change.index)

    # -- a store shared with other replicas --------------------------------------------------
    # A replica's driver mirrors the store: what another replica wrote arrives as a record, and
    # these take it as it is (no plan, no index move of their own: the writer moved the index).

    def upsert(self, instance: Instance) -> bool:
        """Take an instance record from the store; True when what a watcher sees changed (a new
        instance or another registration). The later of the two beats is kept: a beat this
        replica took but did not persist yet is not undone by an older record."""
        old = self._instances.get(instance.id)
        if old is not None:
            beat = max(old.last_heartbeat, instance.last_heartbeat)
            instance = replace(instance, last_heartbeat=beat)
            if old.key != instance.key:
                self._remove(old)
        self._put(instance)
        return old is None or old.registration != instance.registration

    def remove(self, id: str) -> Instance | None:
        """Forget the instance ``id`` (its record left the store); the index stays as it is."""
        old = self._instances.get(id)
        if old is not None:
            self._remove(old)
        return old

    def warm_again(self, now: float) -> None:
        """Warm again from ``now`` (one ``warming`` period: not authoritative, nothing expired),
        as after a start: the driver could not take heartbeats for a while (its store was
        down), so the beats it holds are stale through no fault of the instances."""
        self.started_at = now

    def set_index(self, key: ServiceKey, index: int) -> bool:
        """Move ``key``'s index to ``index`` if that is ahead of it; True when it moved. An index
        never goes backwards, so a late echo of an older one changes nothing."""
        if index <= self._indexes.get(key, FIRST_INDEX):
            return False
        self._indexes[key] = index
        return True

    def expire(self, now: float) -> tuple[Instance, ...]:
        """One expiry pass: remove the instances whose TTL passed, and return them.

        Nothing expires while warming. When more than ``preservation_threshold`` of the live
        instances (and at least ``preservation_min_instances``) have lapsed — been silent for
        more than ``lapse_fraction`` of their TTL — the registry presumes its own network is at
        fault and holds expiry (self-preservation) until the loss ends or
        ``preservation_limit`` passes, whichever is first; then expiry resumes.
        """
        expired = self.due(now)
        self.remove_expired(expired)
        return expired

    def due(self, now: float) -> tuple[Instance, ...]:
        """The instances one expiry pass at ``now`` removes, removing none (the driver persists
        their removal, then calls :meth:`remove_expired`). It does move the self-preservation
        state: that is the pass's own decision, never persisted."""
        if not self.authoritative(now):
            return ()
        s = self.settings
        live = len(self._instances)
        lapsed = sum(
            1 for i in self._instances.values() if now - i.last_heartbeat > i.ttl * s.lapse_fraction
        )
        mass = lapsed >= s.preservation_min_instances and lapsed > s.preservation_threshold * live
        if self._preserving_since is not None:
            if mass and now - self._preserving_since < s.preservation_limit:
                return ()
            self._armed = not mass  # ended at its bound: not again until the loss ends
            self._preserving_since = self._reason = None
        elif mass and self._armed:
            self._preserving_since = now
            self._reason = (
                f"{lapsed} of {live} instances missed their heartbeats at once "
                f"(more than {s.preservation_threshold:.0%}): expiry held for at most "
                f"{s.preservation_limit:g} s"
            )
            return ()
        elif not mass:
            self._armed = True
        return tuple(
            i for i in sorted(self._instances.values(), key=lambda i: i.id) if now >= i.deadline
        )

    def remove_expired(self, expired: Iterable[Instance]) -> None:
        """Remove what :meth:`due` returned (once the driver persisted the removal)."""
        expired = tuple(expired)
        for instance in expired:
            self._remove(instance)
        for key in sorted({i.key for i in expired}):  # one bump per service: one wake-up
            self._bump(key)

    # -- bookkeeping ---------------------------------------------------------------------------

    def _put(self, instance: Instance) -> None:
        self._instances[instance.id] = instance
        self._members.setdefault(instance.key, {})[instance.id] = instance

    def _remove(self, instance: Instance) -> None:
        del self._instances[instance.id]
        members = self._members[instance.key]
        del members[instance.id]
        if not members:
            del self._members[instance.key]  # the index stays: it never goes backwards

    def _bump(self, key: ServiceKey) -> int:
        index = self._indexes.get(key, FIRST_INDEX) + 1
        self._indexes[key] = index
        return index


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _check_registration(
    namespace: str,
    service: str,
    address: str,
    port: int,
    labels: Mapping[str, str],
    metrics_port: int | None,
    ttl: float,
) -> None:
    for name, value in (("namespace", namespace), ("service", service), ("address", address)):
        if not value or "\n" in value:
            raise ValueError(f"register: {name} must be a non-empty line, got {value!r}")
    for name, number in (("port", port), ("metrics_port", metrics_port)):
        if number is not None and not 1 <= number <= 65535:
            raise ValueError(f"register: {name} must be in 1..65535, got {number!r}")
    for key, value in labels.items():
        if not key:
            raise ValueError(f"register: label keys must be non-empty (value {value!r})")
    _check_positive("register: ttl", ttl)
