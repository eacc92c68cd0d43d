"""The per-document context shared by the kind builders: where a document is, and how to report.

Builders read values that the structural check has already vetted, but defensively: a value of
the wrong type was reported once by the checker and is simply skipped here, so every other
problem in the same document is still found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshlib.config.model import Origin
from meshlib.config.values import service_key, shown
from meshlib.config.yamlsafe import YMap, YSeq
from meshlib.errors import Problem

DEFAULT_NAMESPACE = "default"


@dataclass
class DocContext:
    file: str
    index: int  # 1-based document number
    line: int
    doc: YMap
    kind: str
    api: str
    name: str
    namespace: str
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def origin(self) -> Origin:
        return Origin(self.file, self.index, self.line)

    @property
    def version(self) -> int:
        """The SMI alpha number (``v1alpha3`` → 3); 1 for meshlib kinds."""
        tail = self.api.rsplit("alpha", 1)
        return int(tail[1]) if len(tail) == 2 and tail[1].isdigit() else 1

    def error(self, path: str, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, self.index, path, message))

    def warn(self, path: str, line: int, message: str) -> None:
        self.warnings.append(Problem(self.file, line, self.index, path, message))

    def service(self, ref: Any, path: str, line: int, namespace: str | None = None) -> str | None:
        """Resolve a service reference relative to this document's namespace, or report it."""
        if not isinstance(ref, str) or not ref:
            return None
        try:
            return service_key(ref, namespace or self.namespace)
        except ValueError as exc:
            self.error(path, line, str(exc))
            return None

    def local_target(self, spec: Any, kind: str) -> tuple[bool, str | None]:
        """``spec.target.service`` of a kind that must live in its target's namespace:
        ``(True, service key)``, ``(True, None)`` for namespace-wide, ``(False, None)`` after
        reporting a problem."""
        raw, line = at(spec, "target.service")
        if raw is None:
            return True, None
        service = self.service(raw, "spec.target.service", line)
        if service is None:
            return False, None
        if service.split(".", 1)[1] != self.namespace:
            self.error(
                "spec.target.service",
                line,
                f"target {service} is outside the policy's namespace {shown(self.namespace)}; "
                f"put the {kind} in the service's namespace",
            )
            return False, None
        return True, service


def at(node: Any, dotted: str) -> tuple[Any, int]:
    """The value at ``a.b.c`` inside nested YMaps and its line; (None, line) if absent."""
    line = node.line if isinstance(node, YMap) else 0
    for part in dotted.split("."):
        if not isinstance(node, YMap) or part not in node:
            return None, line
        line = node.line_of(part)
        node = node[part]
    return node, line


def maps(value: Any) -> list[tuple[int, YMap, int]]:
    """The mapping items of a YAML list, as (index, item, line); other items are skipped."""
    if not isinstance(value, YSeq):
        return []
    return [(i, item, value.line_of(i)) for i, item in enumerate(value) if isinstance(item, YMap)]


def limited(ctx: DocContext, parent: YMap, key: str, path: str, limit: int) -> Any:
    """``parent[key]`` (None if absent), after reporting a list or mapping with more than
    ``limit`` items or entries (the upstream CRDs' maxItems, maxProperties)."""
    value = parent.get(key)
    if isinstance(value, (YSeq, YMap)) and len(value) > limit:
        what = "items" if isinstance(value, YSeq) else "entries"
        ctx.error(
            path, parent.line_of(key), f"has {len(value)} {what}, at most {limit} are allowed"
        )
    return value


def limited_maps(
    ctx: DocContext, parent: YMap, key: str, path: str, limit: int
) -> list[tuple[int, YMap]]:
    """The mapping items of ``parent[key]`` as (index, item), after reporting a list longer
    than ``limit`` (the upstream CRDs' maxItems); other items were reported by the structural
    check."""
    return [(i, item) for i, item, _ in maps(limited(ctx, parent, key, path, limit))]


def as_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def as_number(value: Any) -> float | None:
    """A finite float, or None: not a number, ``.inf``/``.nan``, or an integer past the float
    range (YAML reads 400 digits as an int; ``float()`` of it overflows). The structural check
    reports each of these; builders then just skip the value."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if isinstance(value, int) and value.bit_length() > 1023:
        return None
    number = float(value)
    return number if math.isfinite(number) else None
