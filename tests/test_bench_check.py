"""The regression gate's comparison (``benchmarks/bench_check.py``), without valgrind: given
baseline and measured instructions per call, the verdicts, the +3 % boundary, the anchor's drift
taken off, the noise floor, a missing variant, version mismatches and what the report says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_check

BASE = {
    "outbound:raw": 1_500_000.0,
    "outbound:mesh": 1_600_000.0,
    "outbound:sdk-unsampled": 1_700_000.0,
    "inbound:bare": 12_000.0,
    "inbound:mesh": 52_000.0,
}


def verdicts(now: dict[str, float | None], **kwargs: float) -> dict[str, str]:
    return {row.variant: row.verdict for row in bench_check.compare(BASE, now, **kwargs)}


def test_the_same_counts_pass_and_anchors_are_not_gated() -> None:
    assert verdicts(dict(BASE)) == {
        "outbound:raw": "anchor",
        "inbound:bare": "anchor",
        "outbound:mesh": "ok",
        "outbound:sdk-unsampled": "ok",
        "inbound:mesh": "ok",
    }


def test_three_percent_of_the_variant_is_the_boundary() -> None:
    at_limit = {**BASE, "outbound:mesh": 1_600_000.0 * 1.03}  # +48,000: allowed
    past_limit = {**BASE, "outbound:mesh": 1_600_000.0 * 1.03 + 1}
    assert verdicts(at_limit)["outbound:mesh"] == "ok"
    assert verdicts(past_limit)["outbound:mesh"] == "FAIL"
    assert verdicts(past_limit)["outbound:sdk-unsampled"] == "ok"


def test_a_cheaper_path_passes() -> None:
    assert verdicts({**BASE, "outbound:mesh": 1_400_000.0})["outbound:mesh"] == "ok"


def test_the_anchors_drift_is_taken_off() -> None:
    # A new httpx makes every call 100,000 instructions dearer: meshlib's share is unchanged.
    newer_httpx = {k: v + 100_000 if k.startswith("outbound") else v for k, v in BASE.items()}
    assert set(verdicts(newer_httpx).values()) == {"anchor", "ok"}
    # The anchor got cheaper but the variant did not: meshlib's share grew by 100,000.
    cheaper_raw = {**BASE, "outbound:raw": 1_400_000.0}
    assert verdicts(cheaper_raw)["outbound:mesh"] == "FAIL"


def test_the_noise_floor_guards_the_small_inbound_count() -> None:
    # 3 % of 52,000 is 1,560 instructions, less than two runs of the same code differ by.
    noisy = {**BASE, "inbound:mesh": 52_000.0 + 3_000}
    assert verdicts(noisy)["inbound:mesh"] == "ok"
    assert verdicts({**BASE, "inbound:mesh": 52_000.0 + 5_001})["inbound:mesh"] == "FAIL"
    assert verdicts(noisy, noise_floor=0)["inbound:mesh"] == "FAIL"


@pytest.mark.parametrize("gone", ["outbound:sdk-unsampled", "outbound:raw"])
def test_a_missing_variant_or_anchor_fails(gone: str) -> None:
    now: dict[str, float | None] = {**BASE, gone: None}
    found = verdicts(now)
    assert found["outbound:sdk-unsampled"] == "MISSING"
    assert found["inbound:mesh"] == "ok"
    text = bench_check.report(bench_check.compare(BASE, now), [])
    assert "bench-check FAILED: " in text and "outbound:sdk-unsampled" in text
    assert "make bench-baseline" in text


def test_missing_from_the_baseline_fails() -> None:
    baseline = {k: v for k, v in BASE.items() if k != "inbound:mesh"}
    rows = bench_check.compare(baseline, dict(BASE))
    assert {r.variant: r.verdict for r in rows}["inbound:mesh"] == "MISSING"


def test_version_mismatches_are_named() -> None:
    recorded = {"python": "3.11.7", "httpx": "0.27.0", "h11": "0.14.0"}
    current = {"python": "3.12.1", "httpx": "0.27.0", "h11": "0.14.0"}
    assert bench_check.version_warnings(recorded, current) == [
        "python: baseline taken with 3.11.7, now 3.12.1"
    ]
    assert bench_check.version_warnings(recorded, dict(recorded)) == []
    text = bench_check.report(bench_check.compare(BASE, dict(BASE)), ["python: x"])
    assert "WARNING: version differs from the baseline's: python: x" in text
    assert text.endswith("bench-check passed.")


def test_the_report_is_a_table_with_a_verdict_per_line() -> None:
    now = {**BASE, "outbound:mesh": 1_700_000.0}
    text = bench_check.report(bench_check.compare(BASE, now), [])
    assert "| outbound:mesh | 1,600,000 | 1,700,000 | +6.25% | +3.00% | FAIL |" in text
    assert "| inbound:mesh | 52,000 | 52,000 | +0.00% | +9.62% | ok |" in text
    assert "bench-check FAILED: outbound:mesh." in text


def test_the_committed_baseline_has_every_gated_variant_and_its_provenance() -> None:
    document = json.loads(Path(bench_check.BASELINE).read_text())
    for variant, anchor in bench_check.GATED.items():
        assert document["instructions_per_call"][variant] > 0
        assert document["instructions_per_call"][anchor] > 0
    assert document["commit"] and document["command"]
    assert {"python", "httpx"} <= set(document["versions"])
