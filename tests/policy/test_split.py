"""pick_backend: weighted choice of a split's backend service."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshlib.config.model import Split, SplitBackend
from meshlib.policy.split import pick_backend
from policy.fakes import binomial_bounds

N = 4000


def split(*weights: int) -> Split:
    backends = tuple(SplitBackend(f"v{i + 1}.default", w) for i, w in enumerate(weights))
    return Split(name="s", namespace="default", root="root.default", backends=backends)


def shares(s: Split, seed: int = 1) -> Counter[str]:
    rng = random.Random(seed)
    return Counter(pick_backend(s, rng) for _ in range(N))


@pytest.mark.parametrize(
    "weights", [(50, 25, 25), (80, 10, 10), (1000, 500), (30, 30), (1, 99), (100,)]
)
def test_shares_follow_weights(weights: tuple[int, ...]) -> None:
    s = split(*weights)
    counts = shares(s)
    assert sum(counts.values()) == N
    total = sum(weights)
    for i, w in enumerate(weights):
        low, high = binomial_bounds(N, w / total)
        assert low <= counts[f"v{i + 1}.default"] <= high, (weights, counts)


def test_zero_weight_is_never_picked() -> None:
    counts = shares(split(50, 0, 50))
    assert counts["v2.default"] == 0
    assert set(counts) == {"v1.default", "v3.default"}


def test_relative_weights_equal_their_ratio() -> None:
    assert shares(split(1000, 500), seed=5) == shares(split(2, 1), seed=5)


def test_all_zero_weights_go_to_the_root() -> None:
    assert pick_backend(split(0, 0), random.Random(1)) == "root.default"


def test_seeded_picks_are_reproducible() -> None:
    s = split(50, 25, 25)
    assert shares(s, seed=3) == shares(s, seed=3)
    assert shares(s, seed=3) != shares(s, seed=4)
