"""The instruction-count regression gate: the hot paths measured under callgrind against a baseline.

    python -m benchmarks.bench_check            # `make bench-check`: measure, compare, exit 1 past
    python -m benchmarks.bench_check --update   # `make bench-baseline`: measure, rewrite the file

Three things are gated, each with the anchor measured in the same run beside it:

* ``outbound:mesh``: ``benchmarks/hotpath.py``'s ``mesh`` call (anchor ``outbound:raw``, httpx);
* ``outbound:sdk-unsampled``: hotpath's call with an SDK whose sampler says no (anchor raw);
* ``inbound:mesh``: ``benchmarks/inbound_loop.py``'s middleware request (anchor ``inbound:bare``).

What is compared (docs/performance.md, "Regression gate", says why): the variant's cost *over its
anchor*, so a new httpx, h11 or Python moves the anchor and the variant together and trips
nothing; the limit is 3 % of the variant's whole baseline count per call, but never less than
the baseline's ``noise_floor`` (instructions per call), because two runs of the same code differ
by up to about 3,000 instructions per call and 3 % of the small in-process inbound request is
less than that. A Python, httpx or OpenTelemetry SDK version other than the baseline's is
reported as a warning: the anchors make the comparison still meaningful, and the message says
how to re-baseline deliberately.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

try:  # imported as the ``benchmarks`` package (`python -m benchmarks.bench_check`, tests)
    from benchmarks import hotpath, inbound_loop
except ImportError:  # run as a script: benchmarks/ itself is sys.path[0]
    import hotpath  # type: ignore[no-redef]
    import inbound_loop  # type: ignore[no-redef]

BASELINE = Path(__file__).resolve().parent / "baseline.json"
#: Gated variant -> its anchor (measured in the same run).
GATED = {
    "outbound:mesh": "outbound:raw",
    "outbound:sdk-unsampled": "outbound:raw",
    "inbound:mesh": "inbound:bare",
}
THRESHOLD = 0.03
#: Instructions per call below which a change is not told from run-to-run noise (measured: up to
#: ~3,000 between two runs of the same code, docs/performance.md).
NOISE_FLOOR = 5_000
#: hotpath's N (calls per run: N and 2N) and warm-up; inbound_loop's N. The documented figures'.
OUTBOUND_CALLS, OUTBOUND_WARMUP, INBOUND_CALLS = 200, 50, 2000
#: Versions that move the counts; a mismatch with the baseline is reported.
PACKAGES = ("httpx", "h11", "opentelemetry-sdk")
COMMAND = "make bench-check (python -m benchmarks.bench_check)"


@dataclass(frozen=True)
class Row:
    """One line of the gate's table."""

    variant: str
    baseline: float | None
    now: float | None
    #: The variant's change over its anchor, as a fraction of its baseline count (None: missing).
    change: float | None
    #: The allowed change, as a fraction of its baseline count.
    limit: float
    verdict: str  # "ok", "FAIL", "MISSING" or "anchor"


def compare(
    baseline: Mapping[str, float],
    now: Mapping[str, float | None],
    *,
    threshold: float = THRESHOLD,
    noise_floor: float = NOISE_FLOOR,
) -> list[Row]:
    """The verdict of every gated variant and its anchor. Pure: counts in, rows out.

    The anchor's own drift (``now[anchor] - baseline[anchor]``) is taken off the variant before
    comparing, so only what the variant adds over its anchor is gated."""
    rows: list[Row] = []
    for anchor in dict.fromkeys(GATED.values()):
        base, value = baseline.get(anchor), now.get(anchor)
        change = None if base is None or value is None else (value - base) / base
        rows.append(Row(anchor, base, value, change, 0.0, "anchor"))
    for variant, anchor in GATED.items():
        base, value = baseline.get(variant), now.get(variant)
        base_anchor, now_anchor = baseline.get(anchor), now.get(anchor)
        if base is None or value is None or base_anchor is None or now_anchor is None:
            rows.append(Row(variant, base, value, None, threshold, "MISSING"))
            continue
        limit = max(threshold, noise_floor / base)
        change = ((value - now_anchor) - (base - base_anchor)) / base
        rows.append(Row(variant, base, value, change, limit, "ok" if change <= limit else "FAIL"))
    return rows


def version_warnings(recorded: Mapping[str, str], current: Mapping[str, str]) -> list[str]:
    """One line per version (Python, httpx, ...) that differs from the baseline's."""
    return [
        f"{name}: baseline taken with {recorded.get(name, '?')}, now {current.get(name, '?')}"
        for name in sorted(set(recorded) | set(current))
        if recorded.get(name) != current.get(name)
    ]


def report(rows: Sequence[Row], warnings: Sequence[str]) -> str:
    """The table, the version warnings and, on a failure, what to do."""
    lines = [
        "| variant | baseline | now | change over anchor | limit | verdict |",
        "|---|--:|--:|--:|--:|---|",
    ]
    for row in rows:
        base = "-" if row.baseline is None else f"{row.baseline:,.0f}"
        now = "-" if row.now is None else f"{row.now:,.0f}"
        change = "-" if row.change is None else f"{row.change:+.2%}"
        limit = "" if row.verdict == "anchor" else f"+{row.limit:.2%}"
        if row.verdict == "anchor" and row.change is not None:
            change += " (anchor itself)"
        lines.append(f"| {row.variant} | {base} | {now} | {change} | {limit} | {row.verdict} |")
    lines.append("")
    lines.append("Instructions per call, client process only (callgrind: (I(2N) - I(N)) / N).")
    for warning in warnings:
        lines.append(f"WARNING: version differs from the baseline's: {warning}")
    if warnings:
        lines.append("  (anchors absorb the change; re-baseline once the new version is intended)")
    failed = [row.variant for row in rows if row.verdict in ("FAIL", "MISSING")]
    if failed:
        lines += [
            "",
            f"bench-check FAILED: {', '.join(failed)}.",
            "A regression: find it (benchmarks/hotpath.py, benchmarks/inbound_loop.py --callgrind"
            " --profile) and fix it.",
            "A deliberate cost (a feature worth it): `make bench-baseline` rewrites"
            " benchmarks/baseline.json; commit it",
            "with a message saying why the hot path got dearer, with the table above.",
        ]
    else:
        lines.append("bench-check passed.")
    return "\n".join(lines)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def measure() -> dict[str, float | None]:
    """Every gated variant and anchor, outbound and inbound side by side (one core each)."""
    with ThreadPoolExecutor(2) as pool:
        outbound = pool.submit(
            hotpath.measure, ["raw", "mesh", "sdk-unsampled"], OUTBOUND_CALLS, OUTBOUND_WARMUP, 1
        )
        inbound = pool.submit(inbound_loop.callgrind, INBOUND_CALLS, ("bare", "mesh"))
        found: dict[str, float | None] = {
            f"outbound:{k}": None if v is None else v["Ir"] for k, v in outbound.result().items()
        }
        found.update({f"inbound:{k}": v for k, v in inbound.result().items()})
    return found


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline file")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench-check: valgrind not found (apt-get install valgrind)", file=sys.stderr)
        return 2
    now = measure()
    if args.update:
        document = {
            "note": "Re-baseline only deliberately (make bench-baseline); say why in the commit.",
            "command": COMMAND,
            "commit": _commit(),
            "date": datetime.date.today().isoformat(),
            "versions": versions(),
            "threshold": THRESHOLD,
            "noise_floor": NOISE_FLOOR,
            "instructions_per_call": {k: round(v) for k, v in now.items() if v is not None},
        }
        args.baseline.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.baseline}:\n{json.dumps(document['instructions_per_call'], indent=2)}")
        return 0
    try:
        document = json.loads(args.baseline.read_text())
        baseline = document["instructions_per_call"]
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench-check: cannot read the baseline {args.baseline}: {exc!r}", file=sys.stderr)
        return 1
    rows = compare(
        baseline,
        now,
        threshold=document.get("threshold", THRESHOLD),
        noise_floor=document.get("noise_floor", NOISE_FLOOR),
    )
    warnings = version_warnings(document.get("versions", {}), versions())
    print(f"Baseline: {args.baseline.name} from {document.get('commit')} ({document.get('date')})")
    print(report(rows, warnings))
    return 1 if any(row.verdict in ("FAIL", "MISSING") for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
