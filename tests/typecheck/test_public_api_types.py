"""The public API is typed: annotated signatures, ``py.typed`` in every wheel, a client that runs.

pyright itself runs in the ``typecheck`` tox environment (``pyright`` over tests/typecheck with
pyrightconfig.json): zero errors on ``client.py``, code written against the public API, and on
``kit_client.py`` (strict), storch.testing called with every form of estimator it accepts.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "docs"))
import public_api  # noqa: E402

PACKAGES = {"packages/storch-core": "storch", "packages/storch-estimators-score": "storch_score",
            "packages/storch-estimators-relaxed": "storch_relaxed", "packages/storch-estimators-mvd": "storch_mvd",
            "benchmarks": "storch_bench", "examples/storch-estimators-example": "storch_example"}


def test_public_functions_and_methods_are_annotated() -> None:
    assert public_api.unannotated() == [], "annotate these parameters / return values"


# what a family (or the benchmarks, or the example plugin) may import from the core (docs/architecture.md)
PUBLIC_CORE_MODULES = ("storch", "storch.distributed", "storch.extending", "storch.testing")


def _private_core_uses(path: Path) -> list[str]:
    """Imports of private core modules or names, and ``storch.<module>._name`` reads, in one source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "storch":
            names = [a.name for a in node.names]
            if node.module not in PUBLIC_CORE_MODULES or any(n.startswith("_") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] == "storch" and a.name not in PUBLIC_CORE_MODULES]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id == "storch":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: storch.{'.'.join(reversed(chain))}")
    return found


def test_families_use_only_public_core_names() -> None:
    """Families import only public names (DESIGN.md): a private one they need is a missing public helper
    (storch_relaxed read storch.distributed._group_of for the world size: now storch.distributed.world_size)."""
    found = []
    for folder, module in PACKAGES.items():
        if module != "storch":
            for path in sorted((ROOT / folder / "src").rglob("*.py")):
                found += _private_core_uses(path)
    assert found == [], "use public names (storch, storch.extending, storch.distributed, storch.testing):\n" + "\n".join(found)


def test_client_runs() -> None:
    # what pyright checks is also what works
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "typecheck" / "client.py")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_every_wheel_ships_py_typed(tmp_path: Path) -> None:
    for folder, module in PACKAGES.items():
        assert (ROOT / folder / "src" / module / "py.typed").is_file(), f"{folder}: no py.typed"
    # build from copies: a build writes build/ and *.egg-info next to the sources, which other tox
    # environments are installing in editable mode at the same time
    copies = []
    for folder in PACKAGES:
        copy = tmp_path / "src" / Path(folder).name
        shutil.copytree(ROOT / folder, copy, ignore=shutil.ignore_patterns(
            "build", "*.egg-info", "__pycache__", "tests", ".tox"))
        copies.append(str(copy))
    wheelhouse = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheelhouse), *copies],
                   check=True, timeout=900)
    wheels = list(wheelhouse.glob("*.whl"))
    assert len(wheels) == len(PACKAGES)
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        assert any(n.endswith("/py.typed") for n in names), f"{wheel.name} does not ship py.typed"


def test_kit_client_runs() -> None:
    # every form of estimator that kit_client.py type-checks also works
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "typecheck" / "kit_client.py")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_kit_client_type_checks() -> None:
    """pyright (strict, as the file says) infers a factory's ``plate: str`` and the report types.

    The tox ``typecheck`` environment runs pyright over the same file (pyrightconfig.json); here it
    runs where pyright is installed next to this interpreter or on PATH."""
    found = Path(sys.executable).with_name("pyright")
    pyright = str(found) if found.is_file() else shutil.which("pyright")
    if pyright is None:
        pytest.skip("pyright is not installed (the typecheck tox environment has it)")
    proc = subprocess.run([pyright, "--pythonpath", sys.executable, str(ROOT / "tests" / "typecheck" / "kit_client.py")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0 and "0 errors" in proc.stdout, proc.stdout[-6000:]
