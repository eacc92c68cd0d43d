"""Weighted splits: the choice of a backend service for one call (SMI TrafficSplit)."""

from __future__ import annotations

import random
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from meshlib.config.smimodel import Split


@lru_cache(maxsize=1024)
def _table(split: Split) -> tuple[tuple[tuple[str, int], ...], int]:
    weights = tuple((b.service, b.weight) for b in split.backends if b.weight > 0)
    return weights, sum(w for _, w in weights)


def pick_backend(split: Split, rng: random.Random) -> str:
    """One backend service key, chosen with probability weight / sum(weights); a zero
    weight is never chosen. Relative weights: 30/30 is 50/50."""
    weights, total = _table(split)
    if total <= 0:
        return split.root  # validation rejects this; route to the root rather than fail
    x = rng.random() * total
    for service, weight in weights:
        x -= weight
        if x < 0:
            return service
    return weights[-1][0]
