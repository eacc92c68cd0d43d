"""Problems point at ``file:line:col``: the column (1-based) where the offending field's value
starts, taken from the same YAML node marks as the line; a missing field has no column."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

import meshlib
from meshlib.errors import ConfigError

POLICY = """\
apiVersion: meshlib/v1
kind: Service
metadata: {name: reviews}
spec:
  endpoints: [{address: "127.0.0.1:9080"}, {address: "127.0.0.1:99999"}]
---
apiVersion: meshlib/v1
kind: TrafficPolicy
metadata: {name: reviews-policy}
spec:
  target: {service: reviews}
  timeout:   fast
  retries:
    attempts: -1
    perTryTimout: 2s
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: canary}
spec:
  service: reviews
  backends:
  - service: reviews
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(POLICY)
    return path


def test_field_problems_carry_the_column_of_the_value(policy: Path) -> None:
    with pytest.raises(ConfigError) as info:
        meshlib.Mesh.from_file(policy, service="x", watch=False, registry=CollectorRegistry())
    where = {p.field: (p.line, p.column) for p in info.value.problems}
    assert where == {
        "spec.endpoints[1].address": (5, 54),  # inside a flow sequence: the quoted value
        "spec.timeout": (12, 14),  # after extra spaces: where the value starts, not the key
        "spec.retries.attempts": (14, 15),
        "spec.retries.perTryTimout": (15, 19),
        "spec.backends[0].weight": (23, 0),  # missing: the item's line, no column to point at
    }
    text = str(info.value)
    assert f"{policy}:14:15 (document 2): spec.retries.attempts: must be at least 0" in text
    assert f"{policy}:23 (document 3): spec.backends[0].weight: missing required" in text


@pytest.mark.timeout(60)
def test_meshctl_validate_prints_file_line_col(policy: Path) -> None:
    script = Path(sys.executable).parent / "meshctl"
    if not script.exists():
        pytest.skip("meshctl console script not installed (pip install -e .)")
    done = subprocess.run(
        [str(script), "validate", str(policy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert f"{policy}:12:14 (document 2): spec.timeout: invalid duration 'fast'" in done.stderr
    assert f"{policy}:15:19 (document 2): spec.retries.perTryTimout: unknown field" in done.stderr
