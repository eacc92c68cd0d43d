"""Fault decisions: percentages, exact header match, independent delay and abort rolls."""

from __future__ import annotations

import random
from collections.abc import Mapping

import httpx
import pytest

from meshlib.config.model import AbortFault, DelayFault, FaultRule, PolicyTarget
from meshlib.policy.fault import NO_FAULT, FaultDecision, decide_faults
from policy.fakes import binomial_bounds

ROLLS = 2000
TARGET = PolicyTarget(namespace="default", service="ratings.default")


def rule(
    name: str = "f",
    *,
    delay: tuple[float, float] | None = None,
    abort: tuple[int, float] | None = None,
    headers: Mapping[str, str] | None = None,
    refuse: float = 0.0,
) -> FaultRule:
    return FaultRule(
        name=name,
        namespace="default",
        target=TARGET,
        delay=DelayFault(*delay) if delay else None,
        abort=AbortFault(*abort) if abort else None,
        headers=dict(headers or {}),
        refuse_percent=refuse,
    )


def roll(rules: list[FaultRule], headers: Mapping[str, str], seed: int = 1) -> list[FaultDecision]:
    rng = random.Random(seed)
    return [decide_faults(rules, headers, rng) for _ in range(ROLLS)]


@pytest.mark.parametrize("percent", [1.0, 10.0, 33.3, 50.0, 90.0])
def test_abort_percentage(percent: float) -> None:
    decisions = roll([rule(abort=(503, percent))], {})
    aborted = sum(d.abort == 503 for d in decisions)
    low, high = binomial_bounds(ROLLS, percent / 100.0)
    assert low <= aborted <= high
    assert all(d.abort in (None, 503) and d.delay is None for d in decisions)


@pytest.mark.parametrize("percent", [5.0, 50.0, 75.0])
def test_delay_percentage(percent: float) -> None:
    decisions = roll([rule(delay=(0.2, percent))], {}, seed=2)
    delayed = sum(d.delay == 0.2 for d in decisions)
    low, high = binomial_bounds(ROLLS, percent / 100.0)
    assert low <= delayed <= high


@pytest.mark.parametrize(("percent", "expected"), [(0.0, 0), (100.0, ROLLS)])
def test_zero_and_hundred_percent_are_exact(percent: float, expected: int) -> None:
    decisions = roll([rule(abort=(500, percent), delay=(1.0, percent))], {})
    assert sum(d.abort == 500 for d in decisions) == expected
    assert sum(d.delay == 1.0 for d in decisions) == expected


def test_abort_and_delay_roll_independently() -> None:
    decisions = roll([rule(delay=(0.1, 50.0), abort=(503, 50.0))], {}, seed=3)
    both = sum(d.delay is not None and d.abort is not None for d in decisions)
    only_delay = sum(d.delay is not None and d.abort is None for d in decisions)
    only_abort = sum(d.delay is None and d.abort is not None for d in decisions)
    neither = sum(d is NO_FAULT for d in decisions)
    low, high = binomial_bounds(ROLLS, 0.25)
    for count in (both, only_delay, only_abort, neither):
        assert low <= count <= high


def test_header_match_is_exact() -> None:
    rules = [rule(abort=(503, 100.0), headers={"end-user": "jason"})]
    rng = random.Random(1)
    assert decide_faults(rules, {"end-user": "jason"}, rng).abort == 503
    for headers in ({}, {"end-user": "Jason"}, {"end-user": "jason2"}, {"end-user": " jason"}):
        assert decide_faults(rules, headers, rng) is NO_FAULT, headers


def test_header_names_are_case_insensitive_on_httpx_headers() -> None:
    rules = [rule(abort=(503, 100.0), headers={"end-user": "jason"})]
    headers = httpx.Headers({"End-User": "jason"})
    assert decide_faults(rules, headers, random.Random(1)).abort == 503


def test_every_header_must_match() -> None:
    rules = [rule(abort=(503, 100.0), headers={"end-user": "jason", "x-canary": "1"})]
    rng = random.Random(1)
    assert decide_faults(rules, {"end-user": "jason"}, rng) is NO_FAULT
    assert decide_faults(rules, {"end-user": "jason", "x-canary": "1"}, rng).abort == 503


def test_first_matching_rule_wins_per_kind() -> None:
    rules = [
        rule("jason-only", abort=(418, 100.0), headers={"end-user": "jason"}),
        rule("first", abort=(503, 100.0), delay=(0.5, 100.0)),
        rule("second", abort=(500, 100.0), delay=(2.0, 100.0)),
    ]
    got = decide_faults(rules, {}, random.Random(1))
    assert (got.abort, got.delay, got.rule) == (503, 0.5, "first")
    got = decide_faults(rules, {"end-user": "jason"}, random.Random(1))
    assert (got.abort, got.delay, got.rule) == (418, 0.5, "jason-only")


def test_refuse_percentage() -> None:
    decisions = roll([rule(refuse=30.0)], {}, seed=4)
    refused = sum(d.refuse for d in decisions)
    low, high = binomial_bounds(ROLLS, 0.3)
    assert low <= refused <= high


def test_no_rules_no_fault() -> None:
    assert decide_faults([], {"end-user": "jason"}, random.Random(1)) is NO_FAULT


def test_seeded_rolls_are_reproducible() -> None:
    rules = [rule(delay=(0.1, 50.0), abort=(503, 50.0))]
    assert roll(rules, {}, seed=9) == roll(rules, {}, seed=9)
