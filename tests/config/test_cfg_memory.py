"""What a snapshot in force holds per service (issue 15, item 4): its model objects only, slotted,
with shared defaults and interned repeated strings; not the parsed YAML trees, which the
documents are read back from on demand. The bytes are tracemalloc's count (deterministic for one
interpreter), not a timing; benchmarks/config_load.py --memory reports the 10,000-service figure.
"""

from __future__ import annotations

import dataclasses
import gc
import tracemalloc
from pathlib import Path

import meshlib
from meshlib.config import model
from meshlib.config.loader import load_text
from meshlib.config.model import Endpoint, Snapshot

#: The issue's target for a policy of many services.
MAX_BYTES_PER_SERVICE = 2048


def services(count: int, first: int = 0) -> str:
    """``count`` services of two endpoints each over 7 namespaces (the benchmark's shape)."""
    return "---\n".join(
        f"apiVersion: meshlib/v1\nkind: Service\n"
        f"metadata: {{name: svc-{n}, namespace: ns-{n % 7}}}\nspec:\n  port: 8080\n  endpoints:\n"
        f"  - address: 'pod-{n}-0.ns-{n % 7}:8080'\n  - address: 'pod-{n}-1.ns-{n % 7}:8080'\n"
        for n in range(first, first + count)
    )


def test_a_snapshot_of_many_services_holds_at_most_2_kb_per_service() -> None:
    text = services(1000)
    load_text(text)  # imports and first-use caches are not the snapshot's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        snap = load_text(text)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(snap.services) == 1000
    assert held / 1000 <= MAX_BYTES_PER_SERVICE, f"{held / 1000:.0f} B per service"


def test_a_mesh_on_a_directory_of_many_services_holds_at_most_2_kb_per_service(
    tmp_path: Path,
) -> None:
    """A mesh loaded from files keeps, beside its snapshot, what a reload of them reuses (the
    ``ReadCache``: each unchanged file's hash and built objects): not the files' parsed YAML
    trees, which held 3.7 KB per service there (4.5 KB per service in all, before)."""
    for i in range(2):
        (tmp_path / f"part-{i}.yaml").write_text(services(500, first=i * 500))

    def mesh() -> meshlib.Mesh:
        return meshlib.Mesh.from_file(tmp_path, service="t", watch=False, metrics=False)

    mesh().close()  # imports and first-use caches are not the mesh's
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held_mesh = mesh()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    with held_mesh:
        assert len(held_mesh.snapshot.services) == 1000
        assert held_mesh.reload() is True  # the kept builds serve a reload
        assert len(held_mesh.snapshot.services) == 1000
    assert held / 1000 <= MAX_BYTES_PER_SERVICE, f"{held / 1000:.0f} B per service"


def test_model_classes_have_no_instance_dict() -> None:
    classes = [
        c
        for c in vars(model).values()
        if isinstance(c, type) and dataclasses.is_dataclass(c) and c.__module__ == model.__name__
    ]
    assert Snapshot in classes and Endpoint in classes
    assert [c.__name__ for c in classes if "__slots__" not in vars(c)] == []


def test_endpoints_share_the_empty_labels_and_services_their_namespace() -> None:
    snap = load_text(services(14))
    a, b = snap.services["svc-0.ns-0"], snap.services["svc-7.ns-0"]
    assert a.namespace is b.namespace
    assert a.endpoints[0].labels is b.endpoints[1].labels
    assert a.endpoints[0].labels == {} and Endpoint("x:1").labels == {}


def test_labels_keep_their_values_interned() -> None:
    text = "---\n".join(
        f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: s{n}}}\nspec:\n  endpoints:\n"
        f"  - address: 'h{n}:80'\n    labels: {{zone: europe-west-1}}\n"
        for n in range(2)
    )
    snap = load_text(text)
    [a], [b] = (snap.services[k].endpoints for k in ("s0.default", "s1.default"))
    assert a.labels == b.labels == {"zone": "europe-west-1"}
    assert a.labels["zone"] is b.labels["zone"]


def test_endpoint_host_and_port_are_split_on_first_use() -> None:
    v6 = Endpoint("[::1]:8443")
    assert (v6.host, v6.port) == ("::1", 8443)
    assert (v6.host, v6.port) == ("::1", 8443)  # the second read, from the slots
    assert v6 == Endpoint("[::1]:8443")  # the split halves take no part in equality
    assert "_host" not in repr(v6)


def test_raw_documents_are_read_back_from_the_texts() -> None:
    text = "\ufeff" + services(3)
    snap = load_text(text, source="s.yaml")
    assert snap.texts == (("s.yaml", text),)
    assert [d["metadata"]["name"] for d in snap.raw_documents] == ["svc-0", "svc-1", "svc-2"]
    assert snap.raw_documents[0]["spec"]["endpoints"][1]["address"] == "pod-0-1.ns-0:8080"
    assert dataclasses.replace(snap, version=9).raw_documents == snap.raw_documents
