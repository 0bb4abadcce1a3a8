"""Packaging hygiene (issue 9.16, 9.17): SPDX license metadata, no auto-loaded pytest plugin, no tracked
files that .gitignore ignores."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11+, the package on 3.9+
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def pyproject() -> dict[str, Any]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)  # type: ignore[no-any-return]


def test_license_is_an_spdx_expression_with_its_file(pyproject: dict[str, Any]) -> None:
    project = pyproject["project"]
    assert project["license"] == "BSD-3-Clause"
    assert project["license-files"] == ["LICENSE"]
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    # setuptools understands the SPDX string and license-files from version 77 on
    assert "setuptools>=77" in pyproject["build-system"]["requires"]


def test_package_data_ships_typing_marker_and_sql(pyproject: dict[str, Any]) -> None:
    data = pyproject["tool"]["setuptools"]["package-data"]["dtmcli"]
    assert "py.typed" in data and "sql/*.sql" in data
    assert (ROOT / "dtmcli" / "py.typed").exists() and list((ROOT / "dtmcli" / "sql").glob("*.sql"))


def test_pytest_plugin_is_not_auto_loaded(pyproject: dict[str, Any]) -> None:
    assert "pytest11" not in pyproject["project"].get("entry-points", {})


def test_no_tracked_file_is_ignored() -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run([git, "ls-files", "--cached", "--ignored", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == []
