"""What an installed package needs is in its wheel: every file the code reads from the package (the shipped data,
experiment files and report template) is matched by pyproject's package-data, and the licenses of leakaudit and
of the shipped data are license-files (copied into the dist-info). Checked against pyproject.toml, not a built
wheel: building one needs the build backend from an index."""

from __future__ import annotations

from pathlib import Path

import pytest

from leakaudit import resources
from leakaudit.config import load_experiment
from leakaudit.errors import InputError

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "leakaudit"


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _matched(root: Path, patterns: list[str]) -> set[Path]:
    return {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}


def _data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))


def test_package_data_holds_every_file_the_code_reads_from_the_package():
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["leakaudit"]
    shipped = _matched(PACKAGE, patterns)
    # resources.path() reads under resources/; the report's jinja2 PackageLoader reads report/templates/
    needed = _data_files(resources.ROOT) + _data_files(PACKAGE / "report" / "templates")
    assert needed
    missing = [str(p.relative_to(REPO)) for p in needed if p not in shipped]
    assert not missing, f"not in pyproject's package-data, so not in the wheel: {missing}"
    assert resources.ROOT / "experiments" / "demo.yaml" in shipped  # `leakaudit demo` reads it


def test_licenses_of_leakaudit_and_the_shipped_data_go_into_the_dist_info():
    project = _pyproject()["project"]
    assert isinstance(project["license"], str)  # an SPDX expression; the table form is deprecated by setuptools
    files = _matched(REPO, project["license-files"])
    assert REPO / "LICENSE" in files
    assert resources.ROOT / "README.md" in files  # provenance, and the Dolly text's CC BY-SA attribution
    sources = sorted(resources.ROOT.glob("*/LICENSE.source.txt"))
    assert sources and not [str(p) for p in sources if p not in files]


def test_a_shipped_experiment_missing_from_the_working_dir_is_named_in_the_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an installed package: no experiments/ beside the user
    with pytest.raises(InputError, match="experiment file not found") as err:
        load_experiment("experiments/user-inference.yaml")
    assert str(resources.ROOT / "experiments" / "user-inference.yaml") in err.value.format()
    with pytest.raises(InputError) as err:
        load_experiment("experiments/mine.yaml")
    assert err.value.format() == "experiments/mine.yaml: experiment file not found"
