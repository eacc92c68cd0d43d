"""Run a Python module with every thread under cProfile, for a server whose work happens off
the main thread (``meshctl registry serve`` serves on a ``meshlib-serve-*`` thread, which
``python -m cProfile`` does not see).

    python benchmarks/profiled.py OUT -m meshlib.cli registry serve ...

    python benchmarks/profiled.py --summary OUT.<thread> [REQUESTS]

Each thread's stats go to ``OUT.<thread name>`` when the thread ends (the main thread's to
``OUT.main``); read them with ``pstats``. ``benchmarks/registry.py --profile OUT`` uses it.
``--summary`` splits one thread's busy time (the event loop's wait in ``epoll`` left out) by
part: a function's own time goes to the part its file belongs to, a built-in's (``_ssl``,
``sqlite3``, ``json``'s C encoder ...) to the part of the function that called it. With
REQUESTS, each part also per request. cProfile inflates Python-heavy parts more than C ones:
read the shares, not the absolute times.
"""

from __future__ import annotations

import cProfile
import re
import runpy
import sys
import threading
from typing import Any

#: (part, substrings of the file name), first match wins.
PARTS = (
    ("TLS (ssl, asyncio's sslproto)", ("asyncio/sslproto.py", "/ssl.py")),
    ("h11 parsing / serialising", ("/h11/",)),
    ("uvicorn's h11 protocol", ("uvicorn/protocols/",)),
    ("meshlib serving (protocol wrapper)", ("meshlib/inbound/serving.py",)),
    ("registry app (routing, auth, answers)", ("meshlib/control/app.py",)),
    ("core (plan / commit)", ("meshlib/control/registry.py",)),
    ("store write", ("meshlib/control/memory.py", "meshlib/control/sqlite.py", "sqlite3")),
    ("JSON", ("/json/", "meshlib/control/wire.py")),
    ("metrics", ("meshlib/observe/", "prometheus_client")),
    ("logging", ("/logging/",)),
    ("event loop, tasks", ("/asyncio/", "selectors.py")),
)


def _part(filename: str) -> str:
    for name, needles in PARTS:
        if any(n in filename for n in needles):
            return name
    return "other"


def summary(path: str, requests: int | None) -> str:
    import pstats

    stats: Any = pstats.Stats(path).stats  # {func: (cc, nc, tt, ct, callers)}
    parts: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, tt, _ct, callers) in stats.items():
        if name == "<method 'poll' of 'select.epoll' objects>":
            continue  # the loop waiting: idle, not work
        if filename == "~" and callers:  # a built-in: its callers' parts, by their share
            for (cfile, _cl, _cn), caller in callers.items():
                own = caller[2] if isinstance(caller, tuple) else 0.0
                parts[_part(cfile)] = parts.get(_part(cfile), 0.0) + own
            continue
        parts[_part(filename)] = parts.get(_part(filename), 0.0) + tt
    busy = sum(parts.values())
    lines = [f"{path}: busy {busy:.3f} s (cProfile's time)"]
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        per = f"  {seconds / requests * 1e3:7.3f} ms/request" if requests else ""
        lines.append(f"  {name:40s} {seconds:7.3f} s  {seconds / busy * 100:5.1f} %{per}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"] and len(argv) in (2, 3):
        print(summary(argv[1], int(argv[2]) if len(argv) == 3 else None))
        return 0
    if len(argv) < 3 or argv[1] != "-m":
        print(__doc__, file=sys.stderr)
        return 2
    out, module, rest = argv[0], argv[2], argv[3:]
    run = threading.Thread.run

    def profiled_run(self: threading.Thread, *args: Any, **kwargs: Any) -> None:
        profile = cProfile.Profile()
        profile.enable()
        try:
            run(self, *args, **kwargs)
        finally:
            profile.disable()
            profile.dump_stats(f"{out}.{re.sub(r'[^A-Za-z0-9_.-]', '_', self.name)}")

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    sys.argv = [module, *rest]
    profile = cProfile.Profile()
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    finally:
        profile.disable()
        profile.dump_stats(f"{out}.main")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
