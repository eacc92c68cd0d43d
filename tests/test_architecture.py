"""The house (DESIGN.md §9, docs/design.md "The layers"): meshlib's import graph, read with ``ast``.

Every ``import`` in every module of meshlib counts, wherever it is written: at the top, inside a
function (lazy imports) and under ``if TYPE_CHECKING:`` (a type-only edge is still an edge a
reader has to follow). The tests fail, printing what they found, on

* an import between parts that :data:`LAYERS` does not allow (an arrow pointing up or sideways);
* a cycle between parts (independently of :data:`LAYERS`, so widening the table cannot hide one);
* an import of the composition root (``meshlib.mesh``, or the package ``meshlib`` itself, whose
  ``__init__`` imports it) outside :data:`ROOT_USERS`;
* a private name (a leading underscore) imported from, or read off, another module.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "meshlib"

#: The shared vocabulary: the words every part speaks (errors and reasons, the decision record,
#: the inbound deadline). Each is a module of its own at the top of the package.
VOCABULARY = frozenset({"errors", "decision", "context"})

#: Which part may import which (besides itself), bottom to top: the picture in docs/design.md
#: as data. A part is a folder of meshlib, one of the vocabulary modules, the composition root
#: ``mesh``, ``testing`` (the pytest plugin) or ``__init__`` (the public API).
LAYERS: dict[str, frozenset[str]] = {
    # the shared vocabulary: errors names the decision it carries, nothing else below
    "decision": frozenset(),
    "context": frozenset(),
    "errors": frozenset({"decision"}),
    # file -> frozen model; knows nothing of what runs it
    "config": VOCABULARY,
    # SPIFFE IDs, the CA, SVIDs: certificates and keys, no mesh policy
    "identity": VOCABULARY,
    # pure decisions over the model (authorization reads a caller's SpiffeID)
    "policy": VOCABULARY | {"config", "identity"},
    # the two sides of the data plane: independent of each other
    "outbound": VOCABULARY | {"config", "identity", "policy"},
    "inbound": VOCABULARY | {"config", "identity", "policy"},
    # watches both sides (tracing wraps the call sequence and reads the inbound peer)
    "observe": VOCABULARY | {"config", "identity", "policy", "outbound", "inbound"},
    # the control plane (the registry issue creates it): decisions and identities, no data plane
    "control": VOCABULARY | {"config", "identity", "policy"},
    # the composition root builds every part and wires them through narrow protocols
    "mesh": VOCABULARY
    | {"config", "identity", "policy", "outbound", "inbound", "observe", "control"},
    # the ingress gateway: an ASGI app in front of the mesh whose outbound leg is a mesh
    # client; like every part it takes that client through a narrow protocol, not meshlib.mesh
    "gateway": VOCABULARY | {"config", "identity", "policy", "outbound", "inbound", "observe"},
    # the users of the root
    "testing": VOCABULARY | {"config", "mesh"},
    "cli": VOCABULARY
    | {
        "config",
        "identity",
        "policy",
        "outbound",
        "inbound",
        "observe",
        "control",
        "mesh",
        "gateway",
    },
    "__init__": VOCABULARY | {"mesh", "inbound", "outbound", "observe", "control"},
}

#: Who may import the composition root: the package's public API, the CLI and the pytest plugin.
ROOT_USERS = frozenset({"__init__", "cli", "testing"})
ROOT_MODULES = frozenset({"meshlib", "meshlib.mesh"})


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` (resolved), the ``name`` taken from it (None for a plain
    ``import``), and where the import is written."""

    importer: str
    module: str
    name: str | None
    path: Path
    line: int

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(PACKAGE_DIR.parent)}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = all_modules()


def part_of(module: str) -> str:
    """The part a meshlib module belongs to (see :data:`LAYERS`)."""
    parts = module.split(".")
    if parts == ["meshlib"]:
        return "__init__"
    top = parts[1]
    if top in LAYERS:
        return top
    raise AssertionError(f"{module} belongs to no part: add it to LAYERS (and docs/design.md)")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every meshlib import in ``path``, at any depth of the tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "meshlib":
                    yield Import(module, alias.name, None, path, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, is_package, node)
            if source.split(".")[0] != "meshlib":
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in MODULES:  # ``from meshlib.outbound import call``: a module
                    yield Import(module, submodule, None, path, node.lineno)
                else:
                    yield Import(module, source, alias.name, path, node.lineno)


def all_imports() -> list[Import]:
    return [imp for module, path in MODULES.items() for imp in imports_of(module, path)]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_reads(module: str, path: Path) -> Iterator[Import]:
    """``alias._name`` where ``alias`` is a meshlib module imported into ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    aliases: dict[str, str] = {}
    for imp in imports_of(module, path):
        if imp.name is None and imp.module in MODULES:
            aliases[imp.module.rsplit(".", 1)[-1]] = imp.module
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.asname is not None:
                    target = alias.name if isinstance(node, ast.Import) else None
                    if target is None:
                        source = _resolve(module, path.name == "__init__.py", node)  # type: ignore[arg-type]
                        target = f"{source}.{alias.name}"
                    if target in MODULES:
                        aliases[alias.asname] = target
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _is_private(node.attr)
            and aliases[node.value.id] != module
        ):
            yield Import(module, aliases[node.value.id], node.attr, path, node.lineno)


def part_edges(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    """Imports between different parts, grouped by (importer's part, imported part)."""
    edges: dict[tuple[str, str], list[Import]] = {}
    for imp in imports:
        if imp.module not in MODULES:
            continue  # not a meshlib module (a typo would fail at import time anyway)
        a, b = part_of(imp.importer), part_of(imp.module)
        if a != b:
            edges.setdefault((a, b), []).append(imp)
    return edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def _show(imps: list[Import]) -> str:
    """The first three import statements behind an edge, each once with the names it takes."""
    statements: dict[tuple[str, str], list[str]] = {}
    for i in imps:
        statements.setdefault((i.where, i.module), []).extend([i.name] if i.name else [])
    shown = [
        f"{where} {module}" + (f" import {', '.join(names)}" if names else "")
        for (where, module), names in list(statements.items())[:3]
    ]
    more = len(statements) - len(shown)
    return "; ".join(shown) + (f" (+{more} more)" if more else "")


# --- the checks ---------------------------------------------------------------------------------


def test_every_module_belongs_to_a_part() -> None:
    unknown = []
    for module in MODULES:
        try:
            part_of(module)
        except AssertionError as exc:
            unknown.append(str(exc))
    assert not unknown, "\n".join(unknown)


def test_the_layer_table_itself_has_no_cycle() -> None:
    graph = {part: set(allowed) for part, allowed in LAYERS.items()}
    cycle = find_cycle(graph)
    assert cycle is None, f"LAYERS allows a cycle: {' -> '.join(cycle)}"


def test_no_cycle_between_parts() -> None:
    edges = part_edges(all_imports())
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    cycle = find_cycle(graph)
    if cycle is not None:
        steps = [f"  {a} -> {b}: {_show(edges[a, b])}" for a, b in itertools.pairwise(cycle)]
        pytest.fail("import cycle between parts " + " -> ".join(cycle) + "\n" + "\n".join(steps))


def test_imports_follow_the_layers() -> None:
    edges = part_edges(all_imports())
    bad = [
        f"  {a} -> {b}: {_show(imps)}"
        for (a, b), imps in sorted(edges.items())
        if b not in LAYERS[a]
    ]
    assert not bad, "imports against the layers (tests/test_architecture.py LAYERS):\n" + (
        "\n".join(bad)
    )


def test_only_the_root_users_import_the_composition_root() -> None:
    bad = [
        f"  {imp.where}: {imp.importer} imports {imp.module}"
        + ("" if imp.name is None else f" ({imp.name})")
        for imp in all_imports()
        if imp.module in ROOT_MODULES
        and part_of(imp.importer) not in ROOT_USERS
        and imp.importer != imp.module
    ]
    assert not bad, "the composition root is imported from below it:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_module() -> None:
    bad = []
    for module, path in MODULES.items():
        for imp in [*imports_of(module, path), *private_reads(module, path)]:
            names = [*imp.module.split("."), *([imp.name] if imp.name else [])]
            if imp.module != module and any(_is_private(n) for n in names):
                bad.append(f"  {imp.where}: {module} uses {imp.module}.{imp.name}")
    assert not bad, "private names imported across modules:\n" + "\n".join(sorted(bad))


# --- the checker checks itself -------------------------------------------------------------------


def test_the_cycle_finder_finds_a_cycle_and_its_path() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_lazy_and_type_only_imports_are_seen(tmp_path: Path) -> None:
    source = tmp_path / "probe.py"  # read as if it were meshlib/policy/probe.py
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from meshlib.mesh import Mesh\n"
        "def f():\n"
        "    from meshlib.outbound.call import _endpoint_url\n"
        "    import meshlib.observe.tracing as t\n"
        "    return t._carrier\n",
        encoding="utf-8",
    )
    found = [(i.module, i.name, i.line) for i in imports_of("meshlib.policy.probe", source)]
    assert found == [
        ("meshlib.mesh", "Mesh", 3),
        ("meshlib.outbound.call", "_endpoint_url", 5),
        ("meshlib.observe.tracing", None, 6),
    ]
    reads = [(i.module, i.name) for i in private_reads("meshlib.policy.probe", source)]
    assert reads == [("meshlib.observe.tracing", "_carrier")]
    edges = part_edges(list(imports_of("meshlib.policy.probe", source)))
    assert set(edges) == {("policy", "mesh"), ("policy", "outbound"), ("policy", "observe")}
    assert not any(b in LAYERS["policy"] for _, b in edges)
