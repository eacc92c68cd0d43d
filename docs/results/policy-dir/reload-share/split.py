"""Where a reload of one file in ten goes (10,000 services): its whole CPU time, and the share
of it spent in the reference check across the set (``check_references``). Run from the
repository root: .venv/bin/python docs/results/policy-dir/reload-share/split.py"""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, "benchmarks")
from config_load import PARTS, service_policy  # noqa: E402

from meshlib.config import loader  # noqa: E402

SERVICES = 10_000
spent: list[float] = []
real = loader.check_references


def timed(parsed: loader.Parsed) -> None:
    start = time.thread_time()
    try:
        real(parsed)
    finally:
        spent.append(time.thread_time() - start)


loader.check_references = timed  # type: ignore[assignment]
with tempfile.TemporaryDirectory() as tmp:
    directory = Path(tmp)
    size = SERVICES // PARTS
    for i in range(PARTS):
        (directory / f"part-{i:02d}.yaml").write_text(service_policy(i * size, size))
    cache = loader.ReadCache()
    loader.load_paths([directory], cache=cache)
    rows = []
    for round_ in range(5):
        (directory / "part-03.yaml").write_text(
            service_policy(3 * size, size, port=9000 + round_)
        )
        spent.clear()
        start = time.thread_time()
        loader.load_paths([directory], cache=cache)
        total = time.thread_time() - start
        rows.append((total, spent[0]))
    for total, check in rows:
        print(f"reload {total * 1e3:7.1f} ms, check_references {check * 1e3:6.1f} ms "
              f"({check / total:.0%})")
    best = min(rows)
    print(f"best reload {best[0] * 1e3:.1f} ms, its check_references {best[1] * 1e3:.1f} ms")
