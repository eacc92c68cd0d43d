"""Loads policy files into a validated :class:`Snapshot`, or raises one ConfigError listing
every problem; nothing partial is ever returned.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from meshlib.config.checker import document_findings, suggest, type_name
from meshlib.config.documents import DEFAULT_NAMESPACE, DocContext, as_str, at
from meshlib.config.model import MeshSettings, Snapshot
from meshlib.config.references import Parsed, check_references
from meshlib.config.schema import DOCUMENT_SCHEMAS
from meshlib.config.values import parse_duration, shown
from meshlib.config.yamlsafe import YamlDocument, YMap, line_column, read_documents
from meshlib.errors import ConfigError, Problem

__all__ = [
    "GC_PAUSE",
    "MAX_FILE_BYTES",
    "NO_DOCUMENTS",
    "POLICY_SUFFIXES",
    "GcPause",
    "ReadCache",
    "decode_policy",
    "directory_policy_files",
    "load_file",
    "load_files",
    "load_paths",
    "load_text",
    "load_texts",
    "parse_duration",
    "policy_files",
    "read_policy_file",
    "read_policy_files",
    "source_documents",
]

log = logging.getLogger("meshlib.config")
log.addHandler(logging.NullHandler())  # a library: the application decides where logs go

#: Files above this size are rejected before being read (CFG-7).
MAX_FILE_BYTES = 8 * 1024 * 1024
#: Starts the message of a problem that only the last-resort guard in :func:`_load` reports.
INTERNAL_ERROR = "internal error while checking this document"
#: An empty file is far more often a truncated write than a wish for no policy at all, and
#: applying it on reload would make every declared service unknown: it is refused.
NO_DOCUMENTS = (
    "the file holds no policy documents (it is empty, or only comments and '---'); "
    "write a Mesh document (apiVersion: meshlib/v1, kind: Mesh) for an empty policy"
)

#: The files a policy directory contributes (:func:`directory_policy_files`).
POLICY_SUFFIXES = (".yaml", ".yml")


class GcPause:
    """Pauses Python's cyclic garbage collector while the loader parses and builds a policy.

    A load makes hundreds of thousands of small objects and no reference cycle; each of them
    counts towards a collection, and each full collection walks the whole heap (a snapshot of
    10,000 services included), which was about half of a load's time. The pause is bounded to
    the loader's own work (never around I/O or the application's code) and correct when
    threads load at once: the first to enter disables collection, the last to leave enables it
    again, and only if it was enabled when the first entered. Reentrant."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holders = 0
        self._resume = False

    def __enter__(self) -> None:
        with self._lock:
            if self._holders == 0:
                self._resume = gc.isenabled()
                gc.disable()
            self._holders += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._holders -= 1
            if self._holders == 0 and self._resume:
                gc.enable()


#: The loader's one pause: every load in the process shares its count.
GC_PAUSE = GcPause()


#: Each kind's builder, as the module and function that hold it, and the list of
#: :class:`Parsed` its model object goes to. A kind's module is imported when a document of
#: that kind is first built (:func:`_builder`): a policy of Services never loads the HTTPRoute,
#: SMI or authorization code (start-up, issue 15; tests/config/test_cfg_lazy_kinds.py).
_BUILDERS: dict[str, tuple[str, str, str]] = {
    "Mesh": ("meshlib.config.meshkinds", "build_mesh", "meshes"),
    "Service": ("meshlib.config.meshkinds", "build_service", "services"),
    "HTTPRouteGroup": ("meshlib.config.smi", "build_route_group", "route_groups"),
    "TCPRoute": ("meshlib.config.smi", "build_tcp_route", "tcp_routes"),
    "UDPRoute": ("meshlib.config.smi", "build_udp_route", "udp_routes"),
    "TrafficSplit": ("meshlib.config.smi", "build_split", "splits"),
    "TrafficTarget": ("meshlib.config.smi", "build_traffic_target", "targets"),
    "TrafficPolicy": ("meshlib.config.meshkinds", "build_traffic_policy", "policies"),
    "FaultInjection": ("meshlib.config.meshkinds", "build_fault", "faults"),
    "TrafficMirror": ("meshlib.config.meshkinds", "build_mirror", "mirrors"),
    "AuthorizationPolicy": (
        "meshlib.config.authzkind",
        "build_authorization_policy",
        "authz_policies",
    ),
    "RequestAuthentication": (
        "meshlib.config.authnkind",
        "build_request_authentication",
        "request_authentications",
    ),
    "HTTPRoute": ("meshlib.config.httproute", "build_http_route", "http_routes"),
}

#: The builders imported so far, by kind (a dict lookup per document once imported; two
#: threads may both import a kind's module at first, which the import system makes safe).
_BUILDER_FUNCTIONS: dict[str, Callable[[DocContext], Any]] = {}


def _builder(kind: str) -> Callable[[DocContext], Any]:
    """The function that builds a document of ``kind``, its module imported on first use."""
    build = _BUILDER_FUNCTIONS.get(kind)
    if build is None:
        module, name, _ = _BUILDERS[kind]
        build = _BUILDER_FUNCTIONS[kind] = getattr(importlib.import_module(module), name)
    return build


#: What building one document gave, kept for a reload of its unchanged file: its kind,
#: apiVersion, name and namespace (its context's), the model object (None: refused), and the
#: problems and warnings the build itself reported (the checks across documents run again).
_Built = tuple[str, str, str, str, Any, tuple[Problem, ...], tuple[Problem, ...]]


def _build(ctx: DocContext, parsed: Parsed) -> _Built:
    """Build ``ctx``'s document into ``parsed``; what the build gave, for :class:`ReadCache`."""
    # the dict lookup first: a call per document is 2-3 ms of a 10,000-service load
    obj = (_BUILDER_FUNCTIONS.get(ctx.kind) or _builder(ctx.kind))(ctx)
    _add(parsed, ctx, obj)
    return (
        ctx.kind,
        ctx.api,
        ctx.name,
        ctx.namespace,
        obj,
        tuple(ctx.problems),
        tuple(ctx.warnings),
    )


#: The kinds whose document trees the reference check walks on every load, not only to report
#: a problem (route names of HTTPRouteGroups, the backend items of TrafficSplits, HTTPRoutes'
#: parents and backends, TrafficTargets' rules): the cache keeps their trees, so that a reload
#: does not parse their unchanged files again. Any other kind's tree is read again from its
#: file's text if a check asks for it, which only reporting a problem does.
_WALKED_BY_REFERENCES = frozenset({"HTTPRouteGroup", "TrafficSplit", "HTTPRoute", "TrafficTarget"})

#: What a reload keeps of one document of an unchanged file: its number and line, its tree
#: (positions dropped) only for a kind in :data:`_WALKED_BY_REFERENCES` (else None), and what
#: building it gave.
_Kept = tuple[int, int, Any, _Built]


def _kept(doc: YamlDocument, built: _Built) -> _Kept:
    """The record :class:`ReadCache` keeps of ``doc`` and its build. The strings it keeps
    besides the model object's are interned: they were the tree's own, one per document."""
    kind, api, name, namespace, obj, problems, warnings = built
    compact = (
        sys.intern(kind),
        sys.intern(api),
        name,
        sys.intern(namespace),
        obj,
        problems,
        warnings,
    )
    tree = doc.value if kind in _WALKED_BY_REFERENCES else None
    return (doc.index, doc.line, tree, compact)


class _Reread:
    """The documents of an unchanged file, read again from its text on first need in a load:
    for a check that asks for the tree of a document the cache did not keep, or for the
    columns of a problem or warning in that file."""

    __slots__ = ("_docs", "_name", "_text")

    def __init__(self, name: str, text: str) -> None:
        self._name = name
        self._text = text
        self._docs: dict[int, YamlDocument] | None = None

    def documents(self) -> dict[int, YamlDocument]:
        if self._docs is None:
            # The text read without a problem when it was kept; it is the same text (same hash).
            found = source_documents(self._name, self._text, [], NO_DOCUMENTS)
            self._docs = {d.index: d for d in found[1]} if found is not None else {}
        return self._docs


class _KeptContext(DocContext):
    """The context of a document of an unchanged file, from its kept record: a tree the cache
    did not keep is read again from the file's text when a check first asks for it (to report
    a problem in it: rare), with the very values and lines of the first read."""

    _tree: YMap | None
    _reread: _Reread

    def __init__(self, file: str, record: _Kept, reread: _Reread) -> None:
        index, line, tree, built = record
        kind, api, name, namespace, _, problems, warnings = built
        self._reread = reread
        super().__init__(
            file, index, line, tree, kind, api, name, namespace, list(problems), list(warnings)
        )

    @property
    def doc(self) -> YMap:
        tree = self._tree
        if tree is None:
            tree = self._tree = self._reread.documents()[self.index].value
        return tree

    @doc.setter
    def doc(self, tree: YMap | None) -> None:
        self._tree = tree


def _add(parsed: Parsed, ctx: DocContext, obj: Any) -> None:
    if obj is not None:
        getattr(parsed, _BUILDERS[ctx.kind][2]).append((obj, ctx))


def load_text(text: str | bytes, *, source: str = "<string>", version: int = 0) -> Snapshot:
    """Parse and validate one policy text (multi-document YAML); bytes must be UTF-8."""
    return load_texts([(source, text)], version=version)


def load_texts(sources: Iterable[tuple[str, str | bytes]], *, version: int = 0) -> Snapshot:
    """Validate several named texts (e.g. files and stdin) as one policy, like load_files."""
    texts: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for source, text in sources:
        if isinstance(text, bytes):
            try:
                text = _policy_text(source, text)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
        texts.append((source, text))
    if problems:
        raise ConfigError(problems)
    return _load(texts, version)


def load_file(path: str | os.PathLike[str], *, version: int = 0) -> Snapshot:
    """Read (size-capped, UTF-8) and validate one policy file."""
    name = os.fspath(path)
    return _load([(name, read_policy_file(name))], version)


def load_files(paths: Iterable[str | os.PathLike[str]], *, version: int = 0) -> Snapshot:
    """Validate several files as one policy: references may cross files."""
    return _load(read_policy_files(paths), version)


def load_paths(
    paths: Iterable[str | os.PathLike[str]], *, version: int = 0, cache: ReadCache | None = None
) -> Snapshot:
    """Validate files and directories as one policy (:func:`policy_files` says which files).
    With ``cache`` (kept from one load to the next), files unchanged since the last load are
    not parsed and schema-checked again."""
    return _load(read_policy_files(policy_files(paths)), version, cache)


class ReadCache:
    """What a reload reuses of the policy files last loaded, by file name and content hash, so
    that a reload parses, schema-checks and builds only the files that changed (the references
    across files are still checked whole).

    Only a file read without a YAML or schema problem is kept: its sha256 and, per document,
    its number and line and what building it gave (the model object, shared with the snapshot,
    and the build's own problems). Not its parsed YAML tree (3.7 KB per Service), except for
    the few kinds whose trees the reference check walks on every load: a check that needs
    another document's tree, or a problem's column, reads that file's text again then. Each
    load keeps the files of that load only."""

    def __init__(self) -> None:
        self._files: dict[str, tuple[bytes, list[_Kept]]] = {}

    def kept(self, name: str, sha256: bytes) -> list[_Kept] | None:
        """The records of the file's documents, in their order, if its text is unchanged."""
        found = self._files.get(name)
        return found[1] if found is not None and found[0] == sha256 else None

    def replace(self, files: dict[str, tuple[bytes, list[_Kept]]]) -> None:
        self._files = files


def policy_files(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """The policy files ``paths`` name, in order: a directory stands for its policy files
    (:func:`directory_policy_files`), anything else for itself (read later, so a missing file
    is reported by the read, as for one file). A file named twice is read once: its documents
    would otherwise clash with themselves. One ConfigError lists every directory that could
    not be listed or holds no policy file."""
    files: list[str] = []
    seen: set[str] = set()
    problems: list[Problem] = []
    for path in paths:
        name = os.fspath(path)
        try:
            found = directory_policy_files(name) if os.path.isdir(name) else [name]
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if not found:
            # Like an empty file: far more often a mount gone wrong than a wish for no policy.
            problems.append(Problem(name, 0, 0, "", "the directory holds no *.yaml or *.yml file"))
        for file in found:
            if file not in seen:
                seen.add(file)
                files.append(file)
    if problems:
        raise ConfigError(problems)
    return files


def directory_policy_files(directory: str) -> list[str]:
    """The ``*.yaml`` and ``*.yml`` files directly in ``directory``, sorted by name (not
    recursive, as ``kubectl apply -f DIR``); unreadable → ConfigError naming the directory.

    Hidden names are skipped: editors leave swap and lock files there (``.x.yaml.swp``,
    ``.#x.yaml``) and a Kubernetes ConfigMap volume its ``..data`` links; a ConfigMap's own
    files are symbolic links to regular files, and are read."""
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        problem = Problem(directory, 0, 0, "", f"cannot read directory: {exc.strerror}")
        raise ConfigError([problem]) from None
    return [
        os.path.join(directory, entry)
        for entry in entries
        if entry.endswith(POLICY_SUFFIXES)
        and not entry.startswith(".")
        and os.path.isfile(os.path.join(directory, entry))
    ]


def read_policy_files(paths: Iterable[str | os.PathLike[str]]) -> list[tuple[str, str]]:
    """Each file's name and text (:func:`read_policy_file`); one ConfigError listing the
    problems of every file that could not be read."""
    sources: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for path in paths:
        name = os.fspath(path)
        try:
            sources.append((name, read_policy_file(name)))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return sources


def read_policy_file(path: str) -> str:
    """The file's text; too big, unreadable or not UTF-8 → ConfigError (size checked first)."""
    try:
        size = os.stat(path).st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError([_too_big(path, size)])
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)  # the file may have grown since stat
    except OSError as exc:
        raise ConfigError([Problem(path, 0, 0, "", f"cannot read file: {exc.strerror}")]) from None
    return _policy_text(path, data)


def _policy_text(source: str, data: bytes) -> str:
    """Policy bytes as text: over the size cap, or not UTF-8 → ConfigError."""
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([_too_big(source, len(data))])
    return decode_policy(source, data)


def decode_policy(source: str, data: bytes) -> str:
    """UTF-8 policy bytes as text; anything else → ConfigError naming the line of the bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, col = line_column(data, exc.start)
        raise ConfigError(
            [Problem(source, line, 0, "", f"file is not valid UTF-8 (byte {exc.start})", col)]
        ) from None


def _not_unicode(source: str, text: str, index: int) -> Problem:
    line, column = line_column(text, index)
    message = f"text is not valid Unicode (a lone surrogate, U+{ord(text[index]):04X})"
    return Problem(source, line, 0, "", message, column)


def _too_big(path: str, size: int) -> Problem:
    return Problem(
        path, 0, 0, "", f"file is {size} bytes, larger than the {MAX_FILE_BYTES}-byte limit"
    )


def source_documents(
    name: str, text: str, problems: list[Problem], empty: str
) -> tuple[bytes, list[YamlDocument]] | None:
    """The UTF-8 bytes and the YAML documents of the source ``name``; its problems are appended
    to ``problems`` (``empty`` when it holds no document). None when the text itself is refused:
    a lone surrogate (str can hold it, UTF-8 cannot) or over the size cap."""
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        problems.append(_not_unicode(name, text, exc.start))
        return None
    if len(encoded) > MAX_FILE_BYTES:
        problems.append(_too_big(name, len(encoded)))
        return None
    docs, yaml_problems = read_documents(text.removeprefix("\ufeff"))
    problems.extend(
        Problem(name, p.line, p.document, p.field, p.message, p.column) for p in yaml_problems
    )
    if not docs and not yaml_problems:
        problems.append(Problem(name, 1, 0, "", empty))
    return encoded, docs


def _load(sources: list[tuple[str, str]], version: int, cache: ReadCache | None = None) -> Snapshot:
    parsed = Parsed()
    problems: list[Problem] = []
    read: dict[tuple[str, int], YamlDocument] = {}  # (file, document) → where its fields are
    kept: dict[str, tuple[bytes, list[_Kept]]] = {}  # the cache's next
    rereads: dict[str, _Reread] = {}  # the files whose documents came from the cache
    digest = hashlib.sha256()
    failed: list[tuple[str, int, Exception]] = []  # logged once collection runs again
    # Parsing and building make many small objects and no cycles: the cyclic collector is
    # paused for this part only (no I/O, no user code; see GcPause), which halves a load.
    with GC_PAUSE:
        for i, (name, text) in enumerate(sources):
            if i:
                digest.update(b"\0")
            before = len(problems)
            records, key = _cached(cache, name, text)
            if records is not None and key is not None:  # unchanged: its documents' builds again
                digest.update(key[1])
                reread = rereads[name] = _Reread(name, text)
                for record in records:
                    ctx: DocContext = _KeptContext(name, record, reread)
                    _add(parsed, ctx, record[3][4])
                    parsed.contexts.append(ctx)
                kept[name] = (key[0], records)
                continue
            found = source_documents(name, text, problems, NO_DOCUMENTS)
            if found is None:
                continue
            encoded, docs = found
            digest.update(encoded)
            records = []
            for doc in docs:
                read[name, doc.index] = doc
                try:
                    found_ctx = _document(name, doc, problems)
                    if found_ctx is None:
                        continue
                    parsed.contexts.append(found_ctx)
                    records.append(_kept(doc, _build(found_ctx, parsed)))
                except Exception as exc:  # defence in depth: see _internal_error
                    problems.append(_internal_error(name, doc.line, doc.index, exc, failed))
            # With a cache, ``key`` is None only for a text UTF-8 cannot hold, refused above.
            if key is not None and len(problems) == before:
                kept[name] = (key[0], records)
        if cache is not None:
            cache.replace(kept)
        try:
            check_references(parsed)
        except Exception as exc:  # defence in depth: see _internal_error
            first = parsed.contexts[0] if parsed.contexts else None
            file = first.file if first else sources[0][0] if sources else "<policy>"
            problems.append(_internal_error(file, first.line if first else 1, 0, exc, failed))
    for where, document, error in failed:
        log.error(
            "policy check failed unexpectedly in %s document %d", where, document, exc_info=error
        )
    warnings: list[Problem] = []
    for ctx in parsed.contexts:
        problems.extend(ctx.problems)
        warnings.extend(ctx.warnings)
    order = {name: i for i, (name, _) in enumerate(sources)}
    if rereads and (problems or warnings):  # the columns of a reused file: read it again
        for name in rereads.keys() & {p.file for p in (*problems, *warnings)}:
            read.update(((name, index), d) for index, d in rereads[name].documents().items())
    problems = [_with_column(p, read) for p in problems]
    warnings = [_with_column(w, read) for w in warnings]
    if problems:
        problems.sort(key=lambda p: (order.get(p.file, -1), p.document, p.line))
        raise ConfigError(problems)
    for w in warnings:
        log.warning("policy: %s", w)
    return _assemble(parsed, sources, digest.hexdigest(), version, warnings)


def _cached(
    cache: ReadCache | None, name: str, text: str
) -> tuple[list[_Kept] | None, tuple[bytes, bytes] | None]:
    """What ``cache`` keeps of this text of the file ``name`` (None if nothing), and the
    text's sha256 and UTF-8 bytes (None without a cache or for a text UTF-8 cannot hold,
    which the full read then reports)."""
    if cache is None:
        return None, None
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        return None, None
    sha = hashlib.sha256(encoded).digest()
    return cache.kept(name, sha), (sha, encoded)


def _with_column(problem: Problem, read: Mapping[tuple[str, int], YamlDocument]) -> Problem:
    """The problem with the column of its field's value, when the field is in the file on the
    problem's line (checks report lines; the column comes from the same YAML node marks)."""
    doc = read.get((problem.file, problem.document))
    if doc is None or problem.column or not problem.field:
        return problem
    column = doc.column_of(problem.field, problem.line)
    return dataclasses.replace(problem, column=column) if column else problem


def _internal_error(
    file: str, line: int, document: int, exc: Exception, failed: list[tuple[str, int, Exception]]
) -> Problem:
    """Defence in depth only: every input is meant to end in a Problem made by the checks.

    A bug in a check must still reject the file with its name and document, keeping the last
    good snapshot, rather than escape as another exception type through a reload. The failure
    goes to ``failed`` for the caller to log (logging runs the application's handlers, which
    the loader does not call while the collector is paused).
    """
    failed.append((file, document, exc))
    return Problem(
        file,
        line,
        document,
        "",
        f"{INTERNAL_ERROR} ({type(exc).__name__}); this is a meshlib bug, please report it",
    )


def _document(file: str, doc: YamlDocument, problems: list[Problem]) -> DocContext | None:
    """Identify a document's kind and version and check its structure; None if unusable."""

    def fail(path: str, line: int, message: str) -> None:
        problems.append(Problem(file, line, doc.index, path, message))

    value = doc.value
    if not isinstance(value, YMap):
        fail("", doc.line, "a document must be a mapping with apiVersion, kind and metadata")
        return None
    kind, kind_line = at(value, "kind")
    api, api_line = at(value, "apiVersion")
    if not isinstance(kind, str):
        fail("kind", kind_line, "missing kind" if kind is None else "kind must be a string")
        return None
    versions = DOCUMENT_SCHEMAS.get(kind)
    if versions is None:
        known = sorted(DOCUMENT_SCHEMAS)
        hint = suggest(kind, known) or f"; known kinds: {', '.join(known)}"
        fail("kind", kind_line, f"unknown kind {shown(kind)}{hint}")
        return None
    if not isinstance(api, str) or api not in versions:
        accepted = ", ".join(versions)
        if api is None:
            got = "missing apiVersion"
        elif not isinstance(api, str):
            got = f"apiVersion must be a string, got {type_name(api)}"
        else:
            got = f"apiVersion {shown(api)} is not known"
        fail("apiVersion", api_line, f"{got} for {kind}; use one of: {accepted}")
        return None
    return checked_context(file, doc, versions[api], problems)


def checked_context(
    file: str, doc: YamlDocument, schema: Mapping[str, Any], problems: list[Problem]
) -> DocContext:
    """The context of a document whose kind and apiVersion are known good, after checking its
    structure against the version's schema (what does not fit goes to ``problems``)."""
    findings = document_findings(doc.value, schema, doc.line)
    problems.extend(Problem(file, f.line, doc.index, f.field, f.message) for f in findings)
    return _context(file, doc)


def _context(file: str, doc: YamlDocument) -> DocContext:
    """The context of a document whose kind, apiVersion and structure are known good."""
    value = doc.value
    # at(value, "metadata.name") without the lines: only the values are kept here
    metadata = value.get("metadata")
    if not isinstance(metadata, YMap):
        metadata = {}
    name = as_str(metadata.get("name")) or ""
    namespace = as_str(metadata.get("namespace")) or DEFAULT_NAMESPACE
    return DocContext(
        file, doc.index, doc.line, value, value["kind"], value["apiVersion"], name, namespace
    )


def _assemble(
    p: Parsed,
    sources: list[tuple[str, str]],
    digest: str,
    version: int,
    warnings: list[Problem],
) -> Snapshot:
    return Snapshot(
        version=version,
        digest=digest,
        files=tuple(name for name, _ in sources),
        mesh=p.meshes[0][0] if p.meshes else MeshSettings(),
        services={s.key: s for s, _ in p.services},
        route_groups={f"{g.name}.{g.namespace}": g for g, _ in p.route_groups},
        splits={s.root: s for s, _ in p.splits},
        traffic_policies=tuple(t for t, _ in p.policies),
        faults=tuple(f for f, _ in p.faults),
        mirrors=tuple(m for m, _ in p.mirrors),
        traffic_targets=tuple(t for t, _ in p.targets),
        authorization_policies=tuple(a for a, _ in p.authz_policies),
        request_authentications=tuple(r for r, _ in p.request_authentications),
        tcp_routes={f"{t.name}.{t.namespace}": t for t, _ in p.tcp_routes},
        udp_routes={f"{u.name}.{u.namespace}": u for u, _ in p.udp_routes},
        http_routes=tuple(r for r, _ in p.http_routes),
        texts=tuple(sources),
        warnings=tuple(warnings),
    )
