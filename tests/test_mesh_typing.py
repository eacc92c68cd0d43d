"""``mesh.client()`` and ``mesh.async_client()`` are typed with httpx's own keyword arguments:
mypy (as a user's CI runs it, ``--strict``) accepts the right ones and rejects a misspelt name
or a wrong type, and the list of names follows httpx's ``Client``."""

from __future__ import annotations

import fnmatch
import inspect
from pathlib import Path

import httpx
import pytest
from mypy import api as mypy_api

from meshlib.mesh import ClientOptions

#: Set by the mesh itself, so not options of a mesh client.
SET_BY_THE_MESH = {"self", "transport", "mounts"}
#: Options of a mesh client that httpx.Client does not have.
MESH_ONLY = {"local_responses", "retries"}

USER_CODE = """\
import httpx
import meshlib


async def use(mesh: meshlib.Mesh) -> None:
    with mesh.client(
        timeout=httpx.Timeout(2.0), headers={"a": "b"}, base_url="http://reviews",
        verify=False, limits=httpx.Limits(max_connections=5), local_responses=True,
    ) as c:
        reveal_type(c)
    async with mesh.async_client(follow_redirects=True, http2=False, retries=1) as a:
        reveal_type(a)
    mesh.client(timeot=2.0)
    mesh.client(timeout="2s")
    mesh.async_client(follow_redirects="yes")
    mesh.client(transport=httpx.HTTPTransport())
"""


@pytest.mark.parametrize("client_class", [httpx.Client, httpx.AsyncClient])
def test_every_httpx_client_argument_is_an_option(client_class: type) -> None:
    httpx_names = set(inspect.signature(client_class.__init__).parameters) - SET_BY_THE_MESH
    assert set(ClientOptions.__annotations__) == httpx_names | MESH_ONLY
    assert ClientOptions.__total__ is False  # every one optional, httpx's default when omitted


@pytest.mark.timeout(120)
def test_mypy_checks_the_names_and_types_of_client_options(tmp_path: Path) -> None:
    source = tmp_path / "user_code.py"
    source.write_text(USER_CODE)
    out, err, status = mypy_api.run(
        [
            "--strict",
            "--python-version",
            "3.10",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(source),
        ]
    )
    lines = [
        line.removeprefix(f"{source}:")
        for line in out.splitlines()
        if '" defined in "' not in line  # mypy's pointer to the signature, after each error
    ]
    assert status == 1, (out, err)
    expected = [
        '10: note: Revealed type is "meshlib.outbound.transport.MeshClient"',
        '12: note: Revealed type is "meshlib.outbound.transport.AsyncMeshClient"',
        '13: error: Unexpected keyword argument "timeot" for "client" of "Mesh"; '
        'did you mean "timeout"?*',
        '14: error: Argument "timeout" to "client" of "Mesh" has incompatible type "str"*',
        '15: error: Argument "follow_redirects" to "async_client" of "Mesh" has incompatible*',
        '16: error: Unexpected keyword argument "transport" for "client" of "Mesh"*',
    ]
    assert len(lines) == len(expected), "\n".join(lines)
    for line, pattern in zip(lines, expected, strict=True):
        assert fnmatch.fnmatchcase(line, pattern), f"{line!r} does not match {pattern!r}"
