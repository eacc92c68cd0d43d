"""RetryBudget: retries ≤ ratio × calls (sliding window) + min_per_second (a rate)."""

from __future__ import annotations

import math

import pytest

from meshlib.config.model import BudgetPolicy
from meshlib.policy.budget import RetryBudget


def withdraw_all(budget: RetryBudget, now: float, limit: int = 100_000) -> int:
    n = 0
    while n < limit and budget.try_withdraw(now):
        n += 1
    return n


def test_default_policy_bounds_retries_in_a_full_outage() -> None:
    budget = RetryBudget(BudgetPolicy())  # 20% + 10/s over 10 s
    rate, seconds, retries_per_call = 100, 30, 3
    calls = retries = refused = 0
    for i in range(rate * seconds):
        now = i / rate
        budget.deposit(now)
        calls += 1
        for k in range(retries_per_call):  # every attempt fails: each call wants 3 retries
            if budget.try_withdraw(now + 0.001 * (k + 1)):
                retries += 1
            else:
                refused += 1
                break
    assert calls == 3000
    assert retries <= 0.2 * calls + 10 * seconds + 10  # small slack for window edges
    assert retries < 0.5 * calls  # far below the unbudgeted 3 retries per call
    assert retries >= 0.2 * calls  # but the budget does allow retrying
    assert refused > 0


def test_min_per_second_lets_low_traffic_retry() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.2, min_per_second=10.0, ttl=10.0))
    assert withdraw_all(budget, 0.0) == 10  # one second's worth of the floor, no calls at all
    assert not budget.try_withdraw(0.05)
    assert withdraw_all(budget, 0.55) == 5  # refilled at 10/s
    assert withdraw_all(budget, 100.0) == 10  # never more than one second's worth at once


def test_floor_is_a_rate_not_a_window_reserve() -> None:
    # Over T seconds of outage the floor grants at most min_per_second × T + one burst.
    budget = RetryBudget(BudgetPolicy(ratio=0.0, min_per_second=10.0, ttl=10.0))
    granted = sum(withdraw_all(budget, t / 100) for t in range(3000))  # 30 s, every 10 ms
    assert 300 <= granted <= 10 * 30 + 10


def test_ratio_adds_to_the_floor() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.5, min_per_second=0.0, ttl=10.0))
    for _ in range(40):
        budget.deposit(1.0)
    assert budget.balance(1.0) == pytest.approx(20.0)
    assert withdraw_all(budget, 1.0) == 20
    assert not budget.try_withdraw(1.0)


def test_old_deposits_expire() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_per_second=0.0, ttl=10.0))
    for _ in range(100):
        budget.deposit(0.0)
    for _ in range(30):
        budget.deposit(5.0)
    assert budget.balance(5.0) == pytest.approx(130.0)
    assert budget.balance(10.5) == pytest.approx(30.0)  # the t=0 calls left the window
    assert budget.balance(15.5) == pytest.approx(0.0)
    assert not budget.try_withdraw(15.5)


def test_spent_retries_expire_too() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_per_second=0.0, ttl=10.0))
    for _ in range(10):
        budget.deposit(0.0)
    assert withdraw_all(budget, 0.0) == 10
    assert withdraw_all(budget, 5.0) == 0
    for _ in range(10):
        budget.deposit(10.5)
    # The t=0 deposits and the withdrawals paid from them left the window together.
    assert withdraw_all(budget, 10.5) == 10


def test_long_idle_gap_resets_the_window() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_per_second=0.0, ttl=10.0))
    for t in range(10):
        budget.deposit(float(t))
    assert budget.balance(9.0) == pytest.approx(10.0)
    assert budget.balance(1000.0) == pytest.approx(0.0)


@pytest.mark.parametrize("ratio", [-0.1, math.nan, math.inf])
def test_invalid_ratio_disables_retries(ratio: float) -> None:
    budget = RetryBudget(BudgetPolicy(ratio=ratio, min_per_second=10.0, ttl=10.0))
    for _ in range(100):
        budget.deposit(0.0)
    assert not budget.try_withdraw(0.0)


def test_zero_budget_allows_nothing() -> None:
    budget = RetryBudget(BudgetPolicy(ratio=0.0, min_per_second=0.0, ttl=10.0))
    for _ in range(1000):
        budget.deposit(0.0)
    assert not budget.try_withdraw(0.0)


def test_out_of_order_times_do_not_wipe_the_current_bucket() -> None:
    # Callers read the clock before taking the destination lock, so a slightly older time
    # can arrive after a newer one at a bucket boundary.
    budget = RetryBudget(BudgetPolicy(ratio=1.0, min_per_second=0.0, ttl=10.0))
    for _ in range(10):
        budget.deposit(5.001)
    budget.deposit(4.999)
    budget.deposit(5.002)
    assert budget.balance(5.003) == pytest.approx(12.0)
    assert withdraw_all(budget, 5.004) == 12
    budget.try_withdraw(4.999)
    assert not budget.try_withdraw(5.005)  # spent retries are not forgotten either
