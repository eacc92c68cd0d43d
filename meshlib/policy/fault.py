"""Fault injection decisions: which delay and abort apply to one call, before it leaves."""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshlib.config.model import FaultRule


@dataclass(frozen=True, slots=True)
class FaultDecision:
    delay: float | None = None  # seconds to wait before the call proceeds
    abort: int | None = None  # status to answer instead of calling
    refuse: bool = False  # fail every attempt as if the connection were refused
    rule: str | None = None  # name of the rule that fired (first one)


NO_FAULT = FaultDecision()


def _matches(rule: FaultRule, headers: Mapping[str, str]) -> bool:
    for name, value in rule.headers.items():
        if headers.get(name) != value:
            return False
    return True


def _roll(rng: random.Random, percent: float) -> bool:
    if percent >= 100.0:
        return True
    if percent <= 0.0:
        return False
    return rng.random() * 100.0 < percent


def decide_faults(
    rules: Iterable[FaultRule], headers: Mapping[str, str], rng: random.Random
) -> FaultDecision:
    """The first matching rule's delay and the first matching rule's abort each roll their
    percentage independently (Istio semantics: a call may be both delayed and aborted)."""
    delay: float | None = None
    abort: int | None = None
    refuse = False
    fired: str | None = None
    for rule in rules:
        if not _matches(rule, headers):
            continue
        if delay is None and rule.delay is not None and _roll(rng, rule.delay.percent):
            delay = rule.delay.fixed
            fired = fired or rule.name
        if abort is None and rule.abort is not None and _roll(rng, rule.abort.percent):
            abort = rule.abort.status
            fired = fired or rule.name
        if not refuse and rule.refuse_percent and _roll(rng, rule.refuse_percent):
            refuse = True
            fired = fired or rule.name
    if delay is None and abort is None and not refuse:
        return NO_FAULT
    return FaultDecision(delay, abort, refuse, fired)
