"""The local policy files a registry mesh adds to each registry version (``policy_file``,
``MESHLIB_POLICY``) may name a directory, listed again with each version (issue 15, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshlib.control.agent import policy_sources
from meshlib.errors import ConfigError

SERVICE = "apiVersion: meshlib/v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n"


def test_a_local_directory_is_its_policy_files_read_again_each_version(tmp_path: Path) -> None:
    directory = tmp_path / "local.d"
    directory.mkdir()
    (directory / "b.yaml").write_text(SERVICE.format(name="b"))
    (directory / "a.yml").write_text(SERVICE.format(name="a"))
    (directory / "notes.txt").write_text("not policy")
    names = [name for name, _ in policy_sources("", 0, [str(directory)])]
    assert names == [str(directory / "a.yml"), str(directory / "b.yaml")]
    (directory / "c.yaml").write_text(SERVICE.format(name="c"))
    names = [name for name, _ in policy_sources("", 0, [str(directory)])]
    assert names[-1] == str(directory / "c.yaml")
    for child in directory.iterdir():
        child.unlink()
    with pytest.raises(ConfigError, match="holds no"):
        policy_sources("", 0, [str(directory)])
