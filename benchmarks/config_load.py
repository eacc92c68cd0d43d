"""How long the policy loader takes on the inputs its tests only check for behaviour.

    python benchmarks/config_load.py [--quick] [--rounds 5] [--json out.json] [--many] [--memory]
                                     [--policies N] [--readers]

Four figures, each the best of ``--rounds`` runs of this thread's CPU time (the machine may be
shared; the best run is the one least disturbed):

- ``regex``: one ``match`` of ``"a" * 40 + "!"`` against each catastrophic pattern of
  tests/config/test_cfg_smi.py, compiled by the loader (RE2). Python's ``re`` takes seconds on
  the first of them; RE2 stays in microseconds because it never backtracks.
- ``billion laughs``: loading the nine-level alias bomb of tests/config/test_cfg_yaml.py; it is
  rejected at its first alias, before anything is expanded.
- ``huge file``: rejecting a sparse 50 MiB file from its size alone (never opened).
- ``large file``: loading a legitimate ~5 MiB policy (``--quick``: ~0.5 MiB) of services with
  100 endpoints each.
- ``many services`` (issue 15, item 4): 10,000 services (``--quick``: 1,000) of two endpoints
  each, loaded from one file and from a directory of 10 files, and a ``Mesh.reload()`` of that
  directory after one file changed (one service's endpoint port flips between two values, so
  every reload applies a new snapshot). One file of 10,000 services is over the per-file cap of
  1,000 documents: for this measurement only, the cap is lifted while it loads. ``--many``
  measures these alone (for interleaved runs of two commits), with two anchors that no loader
  change moves (an RE2 match, ``json.loads`` of 10,000 small objects).
- ``memory`` (issue 15, item 4; ``--memory`` measures it alone): the bytes per service that
  tracemalloc counts for the directory's loaded ``Snapshot`` alone, and for a ``Mesh`` built
  on it by ``Mesh.from_file`` (the snapshot, what the mesh keeps for the next reload, and its
  applied routing state); the allocations that hold most of them, by line; and the CPU time of
  ``Mesh.apply`` of that snapshot (best of ``--rounds``), the work a reload does in the
  watcher thread after loading. ``--policies N`` measures alone what the first calls after a
  reload cost in merged policies when each of N services has a TrafficPolicy of its own.

No sockets. Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshlib.config import yamlsafe
from meshlib.config.loader import load_file, load_files, load_text
from meshlib.config.model import Snapshot
from meshlib.errors import ConfigError
from meshlib.mesh import Mesh

REGEX_BOMBS = ("^(a+)+$", "(a|aa)+$", "(x+x+)+y")
#: Nine levels of nine aliases each: 9**9 strings if expanded.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{name}: &{name} [{','.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)

ROUTES = """\
apiVersion: meshlib/v1
kind: Service
metadata: {{name: reviews}}
spec: {{}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {{name: bomb}}
spec:
  matches:
  - name: bomb
    pathRegex: "{pattern}"
"""


def large_policy(target_bytes: int) -> str:
    """Services of 100 endpoints each, with labels, until the text is ``target_bytes`` long."""
    parts: list[str] = []
    size = n = 0
    while size < target_bytes:
        endpoints = "".join(
            f"  - address: pod-{n}-{i}.svc-{n}.ns-{n % 7}.svc.cluster.local:8080\n"
            f"    weight: {1 + i % 5}\n"
            f"    labels: {{topology.kubernetes.io/zone: europe-west-{i % 3}, "
            f"app.kubernetes.io/version: v{i % 2}.{n}.0}}\n"
            for i in range(100)
        )
        part = (
            f"apiVersion: meshlib/v1\nkind: Service\nmetadata:\n  name: svc-{n}\n"
            f"  namespace: ns-{n % 7}\nspec:\n  serviceAccount: sa-{n}\n  port: 8080\n"
            f"  endpoints:\n{endpoints}---\n"
        )
        parts.append(part)
        size += len(part)
        n += 1
    return "".join(parts)


#: Files the ``many services`` directory is split into.
PARTS = 10


def service_policy(first: int, count: int, port: int = 8080) -> str:
    """``count`` services numbered from ``first``, two endpoints each, over 7 namespaces; the
    first service's endpoints listen on ``port`` (what a one-service change flips)."""
    parts = []
    for n in range(first, first + count):
        p = port if n == first else 8080
        parts.append(
            f"apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: svc-{n}, "
            f"namespace: ns-{n % 7}}}\nspec:\n  port: 8080\n  endpoints:\n"
            f"  - address: 'pod-{n}-0.ns-{n % 7}:{p}'\n  - address: 'pod-{n}-1.ns-{n % 7}:{p}'\n"
        )
    return "---\n".join(parts)


def directory_mesh(directory: Path) -> tuple[Mesh, Callable[[], Snapshot], str]:
    """A mesh on the directory's files and what one reload of them does: ``Mesh.reload()``
    where ``Mesh.from_file`` takes a directory; before it did (issue 15), the same work by
    hand (read and validate the files, then ``apply``)."""
    try:
        mesh = Mesh.from_file(directory, service="bench", watch=False, metrics=False)
    except ConfigError:  # before issue 15: one file only
        files = sorted(directory.glob("*.yaml"))
        mesh = Mesh(load_files(files), service="bench", metrics=False)

        def by_hand() -> Snapshot:
            mesh.apply(load_files(files))
            return mesh.snapshot

        return mesh, by_hand, "load_files + apply (by hand)"

    def reload() -> Snapshot:
        assert mesh.reload()
        return mesh.snapshot

    return mesh, reload, "Mesh.reload()"


def load_directory(directory: Path) -> Snapshot:
    """The directory's policy: ``load_paths`` (issue 15), or before it its files by hand."""
    try:
        from meshlib.config.loader import load_paths
    except ImportError:
        return load_files(sorted(directory.glob("*.yaml")))
    return load_paths([directory])


def many_services(tmp: Path, services: int, rounds: int) -> dict[str, Any]:
    """Load ``services`` from one file and from ``PARTS`` files, and reload one changed file."""
    one = tmp / "one.yaml"
    one.write_text(service_policy(0, services))
    cap = yamlsafe.MAX_DOCUMENTS
    yamlsafe.MAX_DOCUMENTS = max(cap, services)  # the cap is per file: see the module doc
    try:
        assert len(load_file(one).services) == services
        one_s = best(lambda: load_file(one), rounds)
    finally:
        yamlsafe.MAX_DOCUMENTS = cap
    directory = tmp / "policy.d"
    directory.mkdir()
    size = services // PARTS
    for i in range(PARTS):
        (directory / f"part-{i:02d}.yaml").write_text(service_policy(i * size, size))
    mesh, reload, how = directory_mesh(directory)
    try:
        assert len(mesh.snapshot.services) == services
        dir_s = best(lambda: load_directory(directory), rounds)
        changed = directory / f"part-{PARTS // 2:02d}.yaml"
        texts = [service_policy(PARTS // 2 * size, size, port) for port in (8081, 8080)]
        flips = iter(range(10**9))
        before = mesh.snapshot.version

        def flip() -> Snapshot:
            changed.write_text(texts[next(flips) % 2])
            return reload()

        reload_s = best(flip, rounds)
        assert mesh.snapshot.version > before
    finally:
        mesh.close()
    return {
        "services": services,
        "parts": PARTS,
        "one_file_s": one_s,
        "directory_s": dir_s,
        "reload_one_file_s": reload_s,
        "reload": how,
    }


def held_bytes(make: Callable[[], Any], top: int = 0) -> tuple[int, Any, list[str]]:
    """The bytes tracemalloc counts as still allocated after ``make()`` (what its result
    holds, once collected garbage is gone), the result, and the ``top`` allocation sites
    holding most of them (innermost meshlib line, bytes and blocks)."""
    gc.collect()
    tracemalloc.start(12)
    try:
        before = tracemalloc.take_snapshot()
        made = make()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    diff = after.compare_to(before, "traceback")
    sites: dict[str, list[int]] = {}
    for stat in diff:
        ours = [f for f in stat.traceback if "/meshlib/" in f.filename]
        frame = ours[-1] if ours else stat.traceback[-1]
        where = f"{frame.filename.rsplit('/meshlib/', 1)[-1]}:{frame.lineno}"
        site = sites.setdefault(where, [0, 0])
        site[0] += stat.size_diff
        site[1] += stat.count_diff
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return (
        sum(s.size_diff for s in diff),
        made,
        [f"{where} {size:,} B in {count:,} blocks" for where, (size, count) in ranked],
    )


def memory(tmp: Path, services: int, rounds: int) -> dict[str, Any]:
    """Bytes per service of the ``many services`` directory's snapshot and of a mesh on it,
    and the CPU time of ``Mesh.apply`` of that snapshot."""
    directory = tmp / "memory.d"
    directory.mkdir()
    size = services // PARTS
    for i in range(PARTS):
        (directory / f"part-{i:02d}.yaml").write_text(service_policy(i * size, size))
    load_directory(directory)  # imports and first-use caches are not the snapshot's
    snapshot_b, snap, snapshot_top = held_bytes(lambda: load_directory(directory), top=12)
    assert len(snap.services) == services
    del snap

    def mesh() -> Mesh:
        m, _, _ = directory_mesh(directory)
        return m

    merge_n = services // 5
    merge_s = best(first_policies(load_directory(directory), merge_n), rounds)
    mesh_b, built, mesh_top = held_bytes(mesh, top=12)
    try:
        apply_s = best(lambda: built.apply(built.snapshot), rounds)
    finally:
        built.close()
    return {
        "services": services,
        "snapshot_bytes": snapshot_b,
        "snapshot_bytes_per_service": snapshot_b / services,
        "snapshot_top": snapshot_top,
        "mesh_bytes": mesh_b,
        "mesh_bytes_per_service": mesh_b / services,
        "mesh_top": mesh_top,
        "apply_s": apply_s,
        "first_policies_services": merge_n,
        "first_policies_s": merge_s,
    }


def first_policies(snapshot: Snapshot, count: int) -> Callable[[], None]:
    """What the first calls after a reload cost in merged policies: the snapshot's first
    ``count`` services each get a TrafficPolicy of their own (built here, not parsed), and
    the returned run asks a fresh router for each one's policy once."""
    from meshlib.config.model import PolicyTarget, TrafficPolicyDoc
    from meshlib.policy.routing import Router

    keys = list(snapshot.services)[:count]
    docs = tuple(
        TrafficPolicyDoc(
            f"p-{i}", key.partition(".")[2], PolicyTarget(service=key), {"timeout": 2.0}
        )
        for i, key in enumerate(keys)
    )
    with_policies = dataclasses.replace(snapshot, traffic_policies=docs)

    def run() -> None:
        router = Router(with_policies)
        for key in keys:
            assert router.policy(key, None).timeout == 2.0

    return run


def first_policies_run(tmp: Path, services: int, rounds: int) -> float:
    """Best CPU seconds of :func:`first_policies` over ``services`` services of ``PARTS`` files."""
    directory = tmp / "policies.d"
    directory.mkdir()
    size = services // PARTS
    for i in range(PARTS):
        (directory / f"part-{i:02d}.yaml").write_text(service_policy(i * size, size))
    return best(first_policies(load_directory(directory), services), rounds)


def memory_report(m: dict[str, Any]) -> str:
    n = f"{m['services']:,} services x 2 endpoints"
    lines = [
        f"| {n}, loaded Snapshot, tracemalloc | {m['snapshot_bytes']:,} B "
        f"= {m['snapshot_bytes_per_service']:,.0f} B per service |",
        f"| {n}, Mesh.from_file of the directory, tracemalloc | {m['mesh_bytes']:,} B "
        f"= {m['mesh_bytes_per_service']:,.0f} B per service |",
        f"| {n}, Mesh.apply of that snapshot, CPU | {m['apply_s'] * 1e3:.3f} ms |",
        f"| {m['first_policies_services']:,} of them with a TrafficPolicy each, every one's "
        f"first merged policy on a new Router, CPU | {m['first_policies_s'] * 1e3:.1f} ms |",
        "",
        "Snapshot, held by (innermost meshlib line):",
        *(f"  {line}" for line in m["snapshot_top"]),
        "Mesh, held by:",
        *(f"  {line}" for line in m["mesh_top"]),
    ]
    return "\n".join(lines)


def best(run: Callable[[], Any], rounds: int, repeat: int = 1) -> float:
    """Best CPU seconds per call of ``run`` over ``rounds`` rounds of ``repeat`` calls."""
    times = []
    for _ in range(rounds):
        start = time.thread_time()
        for _ in range(repeat):
            run()
        times.append((time.thread_time() - start) / repeat)
    return min(times)


def _rejected(load: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        try:
            load()
        except ConfigError:
            return
        raise AssertionError("expected a ConfigError")

    return run


def measure(quick: bool, rounds: int) -> dict[str, Any]:
    result: dict[str, Any] = {"quick": quick, "rounds": rounds, "regex_us": {}}
    subject = "a" * 40 + "!"
    for pattern in REGEX_BOMBS:
        snap = load_text(ROUTES.format(pattern=pattern))
        compiled = snap.route_groups["bomb.default"].matches[0].path_regex
        assert compiled is not None and compiled.match(subject) is None
        seconds = best(lambda c=compiled: c.match(subject), rounds, repeat=1000)
        result["regex_us"][pattern] = seconds * 1e6
    result["billion_laughs_ms"] = best(_rejected(lambda: load_text(BILLION_LAUGHS)), rounds) * 1e3
    with tempfile.TemporaryDirectory() as tmp:
        huge = Path(tmp) / "huge.yaml"
        with open(huge, "wb") as f:
            f.truncate(50 * 1024 * 1024)  # sparse: costs no disk
        result["huge_file_ms"] = best(_rejected(lambda: load_file(huge)), rounds) * 1e3
        large = Path(tmp) / "large.yaml"
        large.write_text(large_policy((512 if quick else 5 * 1024) * 1024))
        result["large_file_bytes"] = os.path.getsize(large)
        snap = load_file(large)
        result["large_file_services"] = len(snap.services)
        result["large_file_s"] = best(lambda: load_file(large), 1 if quick else min(rounds, 3))
        result["many"] = many_services(Path(tmp), 1_000 if quick else 10_000, min(rounds, 3))
    return result


def report(r: dict[str, Any]) -> str:
    lines = [
        f"policy loader, best of {r['rounds']} rounds, this thread's CPU time"
        + (" (--quick)" if r["quick"] else ""),
        "",
        "| input | cost |",
        "|---|--:|",
    ]
    for pattern, us in r["regex_us"].items():
        shown = pattern.replace("|", "\\|")  # a table cell
        lines.append(f"| regex `{shown}` on 'a'*40+'!' (one match) | {us:.2f} µs |")
    lines.append(f"| billion laughs, rejected | {r['billion_laughs_ms']:.3f} ms |")
    lines.append(f"| 50 MiB file, rejected from its size | {r['huge_file_ms']:.3f} ms |")
    mib = r["large_file_bytes"] / 2**20
    lines.append(
        f"| {mib:.1f} MiB policy, {r['large_file_services']} services x 100 endpoints, "
        f"loaded | {r['large_file_s']:.2f} s |"
    )
    return "\n".join([*lines, many_report(r["many"])])


def anchors(rounds: int) -> dict[str, float]:
    """Two figures that no loader change moves, measured in the same run as the loader's so
    that runs on a shared machine can be compared: one RE2 match of the first regex bomb, and
    ``json.loads`` of 10,000 small objects (allocation-heavy work, as a load is)."""
    subject = "a" * 40 + "!"
    snap = load_text(ROUTES.format(pattern=REGEX_BOMBS[0]))
    compiled = snap.route_groups["bomb.default"].matches[0].path_regex
    assert compiled is not None
    text = json.dumps(
        [
            {"name": f"svc-{n}", "port": 8080, "endpoints": [f"pod-{n}-0:8080"]}
            for n in range(10_000)
        ]
    )
    return {
        "regex_us": best(lambda: compiled.match(subject), rounds, repeat=1000) * 1e6,
        "json_10k_ms": best(lambda: json.loads(text), rounds) * 1e3,
    }


def many_report(m: dict[str, Any]) -> str:
    lines: list[str] = []
    if "anchors" in m:
        a = m["anchors"]
        lines.append(f"| anchor: regex `{REGEX_BOMBS[0]}`, one match | {a['regex_us']:.2f} µs |")
        lines.append(f"| anchor: json.loads of 10,000 small objects | {a['json_10k_ms']:.1f} ms |")
    n = f"{m['services']:,} services x 2 endpoints"
    lines.append(f"| {n}, one file, loaded | {m['one_file_s']:.2f} s |")
    lines.append(f"| {n}, a directory of {m['parts']} files, loaded | {m['directory_s']:.2f} s |")
    lines.append(
        f"| {n}, a directory of {m['parts']} files, {m['reload']} after one file changed "
        f"| {m['reload_one_file_s']:.2f} s |"
    )
    return "\n".join(lines)


#: Plain scalars that YAML 1.1 (PyYAML's safe loader, meshlib's reading) and YAML 1.2 resolve
#: differently, and the other shapes a reader must treat alike (a merge key, a tag, a quoted
#: word): what ``--readers`` compares each reader on.
CORNERS = """\
word_yes: yes
word_on: on
word_No: No
octal: 0777
underscore: 1_000
sexagesimal: 1:20
float: 1e3
dot_float: .5
date: 2001-12-14
tilde: ~
quoted: 'yes'
tag: !!str 12
base: &b {x: 1}
merged: {<<: *b, y: 2}
"""


def readers(rounds: int) -> dict[str, Any]:
    """Seconds (best of ``rounds``, this thread's CPU, collection paused) to turn the text of
    10,000 services into Python values, by meshlib's stages and by other readers."""
    import yaml

    from meshlib.config.checker import Finding, check, passes
    from meshlib.config.schema import DOCUMENT_SCHEMAS

    text = service_policy(0, 10_000)
    reference = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    as_json = json.dumps(reference)
    schema = DOCUMENT_SCHEMAS["Service"]["meshlib/v1"]
    cap = yamlsafe.MAX_DOCUMENTS
    yamlsafe.MAX_DOCUMENTS = 10_000
    enabled = gc.isenabled()
    gc.disable()
    try:
        docs, problems = yamlsafe.read_documents(text)
        assert not problems and [d.value for d in docs] == reference

        def full_check() -> None:
            for d in docs:
                found: list[Finding] = []
                check(d.value, schema, "", d.line, found)
                assert not found

        stages = {
            "anchor: json.loads of the same values": lambda: json.loads(as_json),
            "PyYAML CSafeLoader, compose_all (nodes only)": lambda: list(
                yaml.compose_all(text, Loader=yaml.CSafeLoader)
            ),
            "PyYAML CSafeLoader, load_all (values, no lines)": lambda: list(
                yaml.load_all(text, Loader=yaml.CSafeLoader)
            ),
            "meshlib read_documents (values and lines)": lambda: yamlsafe.read_documents(text),
            "meshlib schema check, full (check)": full_check,
            "meshlib schema check, fast answer (passes)": lambda: all(
                passes(d.value, schema) for d in docs
            ),
        }
        corners: dict[str, list[str]] = {}
        safe = yaml.safe_load(CORNERS)
        try:
            import ryaml

            assert ryaml.loads_all(text) == reference
            stages["ryaml 0.5 (serde_yaml), loads_all (values, no lines)"] = lambda: (
                ryaml.loads_all(text)
            )
            try:
                got = ryaml.loads(CORNERS)
            except Exception as exc:  # a merge key or a tag it refuses
                corners["ryaml"] = [f"refuses the document: {type(exc).__name__}: {exc}"]
                got = ryaml.loads(CORNERS.split("base:")[0])
            corners.setdefault("ryaml", []).extend(
                f"{k}: {got.get(k)!r} (PyYAML: {v!r})"
                for k, v in safe.items()
                if k in got and (type(got[k]), got[k]) != (type(v), v)
            )
        except ImportError:
            pass
        try:
            import ryml

            encoded = text.encode()
            stages["rapidyaml 0.15, parse_in_arena (its tree only)"] = lambda: ryml.parse_in_arena(
                encoded
            )
            stages["rapidyaml 0.15, tree to Python values (a walk in Python)"] = lambda: (
                _ryml_values(ryml, encoded)
            )
            assert _ryml_values(ryml, encoded) == [
                json.loads(json.dumps(v), parse_int=str) for v in reference
            ]
        except ImportError:
            pass
        seconds = {name: best(run, rounds) for name, run in stages.items()}
    finally:
        yamlsafe.MAX_DOCUMENTS = cap
        if enabled:
            gc.enable()
    yamlsafe.MAX_DOCUMENTS = 10_000
    try:
        seconds["meshlib load_text, the whole first load"] = best(lambda: load_text(text), rounds)
    finally:
        yamlsafe.MAX_DOCUMENTS = cap
    return {"seconds": seconds, "corners": corners}


def _ryml_values(ryml: Any, encoded: bytes) -> list[Any]:
    """rapidyaml's tree as dicts, lists and strings (it resolves no scalar: every one is its
    text), walked through its Python binding one node at a time."""
    tree = ryml.parse_in_arena(encoded)

    def value(node: int) -> Any:
        if tree.is_map(node):
            return {bytes(tree.key(c)).decode(): value(c) for c in ryml.children(tree, node)}
        if tree.is_seq(node):
            return [value(c) for c in ryml.children(tree, node)]
        return bytes(tree.val(node)).decode()

    return [value(doc) for doc in ryml.children(tree, tree.root_id())]


def readers_report(r: dict[str, Any]) -> str:
    lines = ["| 10,000 services x 2 endpoints, one text (1.8 MiB) | CPU, best |", "|---|--:|"]
    lines += [f"| {name} | {s * 1e3:.0f} ms |" for name, s in r["seconds"].items()]
    for reader, differences in r["corners"].items():
        lines.append(f"\n{reader}, YAML 1.1 corner cases read otherwise than PyYAML's safe loader:")
        lines += [f"- {d}" for d in differences]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~0.5 MiB large file, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--many", action="store_true", help="only the many-services figures")
    parser.add_argument(
        "--memory", action="store_true", help="only the bytes per service and Mesh.apply's time"
    )
    parser.add_argument(
        "--policies",
        type=int,
        metavar="N",
        help="only: N services with a TrafficPolicy each, each one's first merged policy",
    )
    parser.add_argument(
        "--readers",
        action="store_true",
        help="only: a first load's stages and other YAML readers on the same 10,000 services",
    )
    args = parser.parse_args(argv)
    rounds = 2 if args.quick else args.rounds
    if args.readers:
        result = {"readers": readers(rounds)}
        print(readers_report(result["readers"]))
    elif args.policies:
        with tempfile.TemporaryDirectory() as tmp:
            result = {"policies": first_policies_run(Path(tmp), args.policies, min(rounds, 3))}
        print(
            f"| {args.policies:,} services with a TrafficPolicy each, every one's first merged "
            f"policy on a new Router, CPU | {result['policies'] * 1e3:.1f} ms |"
        )
    elif args.memory:
        with tempfile.TemporaryDirectory() as tmp:
            services = 1_000 if args.quick else 10_000
            result = {"memory": memory(Path(tmp), services, min(rounds, 3))}
        print(memory_report(result["memory"]))
    elif args.many:
        with tempfile.TemporaryDirectory() as tmp:
            first = anchors(rounds)  # before the large heap the loads leave behind
            result = {"many": many_services(Path(tmp), 1_000 if args.quick else 10_000, rounds)}
            result["many"]["anchors"] = first
        print(many_report(result["many"]))
    else:
        result = measure(args.quick, rounds)
        print(report(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
