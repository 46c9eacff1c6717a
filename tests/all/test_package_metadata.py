"""What a user's `pip install` reads from each package's pyproject.toml: dependencies, versions, license, readme.

Checked from the sources (no build): every third-party module a package's source imports is one of its declared
dependencies (an import walk; an undeclared one installs fine next to the editable checkouts the other suites use
and fails for a user of the wheel alone), the first-party packages depend on the storch-core release they are
built against, the license is an SPDX expression (setuptools deprecated the ``{ text = ... }`` table and
stops building it on 2027-02-18) whose text ships
in each package's folder (the wheel's dist-info takes it). tests/all/test_wheels.py builds and installs the wheels.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

import pytest
from importlib_metadata import packages_distributions

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+; the pinned test environments have it)

ROOT = Path(__file__).resolve().parents[2]
# folder -> the top-level module it installs
PACKAGES = {"packages/storch-core": "storch", "packages/storch-estimators-score": "storch_score",
            "packages/storch-estimators-relaxed": "storch_relaxed", "packages/storch-estimators-mvd": "storch_mvd",
            "examples/storch-estimators-example": "storch_example", "benchmarks": "storch_bench"}
FIRST_PARTY = ("packages/storch-estimators-score", "packages/storch-estimators-relaxed",
               "packages/storch-estimators-mvd", "benchmarks")


@functools.lru_cache(maxsize=None)
def _distributions() -> dict:
    return packages_distributions()


def _project(folder: str) -> dict:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imported_top_levels(folder: str) -> dict[str, str]:
    """top-level module -> the first place (file:line) that imports it, over the package's source."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / folder / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@pytest.mark.skipif(not hasattr(sys, "stdlib_module_names"), reason="needs Python 3.10+ (sys.stdlib_module_names)")
@pytest.mark.parametrize("folder", list(PACKAGES))
def test_every_third_party_import_is_a_declared_dependency(folder):
    declared = {_name(r) for r in _project(folder)["project"]["dependencies"]}
    own = {module: _project(f)["project"]["name"] for f, module in PACKAGES.items()}
    distributions = _distributions()
    undeclared = []
    for module, where in sorted(_imported_top_levels(folder).items()):
        if module in sys.stdlib_module_names or module == "__future__" or module == PACKAGES[folder]:
            continue
        if module in own:  # another storch package (storch-core: the import contracts say which may be imported)
            dist = own[module]
        else:
            dists = distributions.get(module)
            assert dists, f"{where}: imports {module!r}, which no installed distribution provides"
            dist = dists[0]
        if _name(dist) not in declared:
            undeclared.append(f"{where}: {module} (distribution {dist})")
    assert undeclared == [], f"{folder}/pyproject.toml: add to dependencies: {undeclared}"


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_license_readme_and_version_are_declared(folder):
    project = _project(folder)["project"]
    assert project["license"] == "MIT", "an SPDX expression: license = \"MIT\" (PEP 639)"
    assert (ROOT / folder / project["readme"]).is_file()
    # the MIT notice must ship with the software: setuptools puts the folder's LICENSE in the wheel's dist-info
    assert (ROOT / folder / "LICENSE").read_text() == (ROOT / "LICENSE").read_text(), f"copy LICENSE into {folder}"
    assert project["version"] == _project("packages/storch-core")["project"]["version"]  # released together
    assert _project(folder)["build-system"]["requires"] == ["setuptools>=77"]  # the first to take the SPDX form


# a Markdown link or image target, inline ([text](target), ![alt](target)) or a reference definition ([id]: target)
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_readme_links_work_on_pypi(folder):
    """The readme is the package's long description on PyPI, where a relative link (``../storch-core``,
    ``../../README.md``: the family readmes had them) points nowhere: link targets are absolute URLs (or
    in-page anchors)."""
    text = (ROOT / folder / _project(folder)["project"]["readme"]).read_text()
    targets = [a or b for a, b in _LINK.findall(text)]
    relative = [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]
    assert relative == [], f"{folder}'s readme links to {relative}: use an absolute URL (https://pypi.org/project/...)"


@pytest.mark.parametrize("folder", FIRST_PARTY)
def test_first_party_packages_depend_on_the_core_release_they_are_built_against(folder):
    """An unbounded `storch-core` let a family of this release install next to a later core whose
    storch.extending it was never run against; it takes the core's versions up to the next minor (0.x)."""
    major, minor, _ = _project("packages/storch-core")["project"]["version"].split(".")
    core = [r for r in _project(folder)["project"]["dependencies"] if _name(r) == "storch-core"]
    assert core == [f"storch-core>={major}.{minor}.0,<{major}.{int(minor) + 1}"], core
