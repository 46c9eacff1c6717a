"""The public API is typed: annotated signatures, ``py.typed`` in every wheel, a client that runs.

pyright itself runs in the ``typecheck`` tox environment (``pyright`` over tests/typecheck with
pyrightconfig.json): zero errors on ``client.py``, code written against the public API.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "docs"))
import public_api  # noqa: E402

PACKAGES = {"packages/storch-core": "storch", "packages/storch-estimators-score": "storch_score",
            "packages/storch-estimators-relaxed": "storch_relaxed", "packages/storch-estimators-mvd": "storch_mvd",
            "benchmarks": "storch_bench", "examples/storch-estimators-example": "storch_example"}


def test_public_functions_and_methods_are_annotated() -> None:
    assert public_api.unannotated() == [], "annotate these parameters / return values"


def test_client_runs() -> None:
    # what pyright checks is also what works
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "typecheck" / "client.py")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_every_wheel_ships_py_typed(tmp_path: Path) -> None:
    for folder, module in PACKAGES.items():
        assert (ROOT / folder / "src" / module / "py.typed").is_file(), f"{folder}: no py.typed"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
                    *(str(ROOT / folder) for folder in PACKAGES)], check=True, timeout=900)
    wheels = list(tmp_path.glob("*.whl"))
    assert len(wheels) == len(PACKAGES)
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        assert any(n.endswith("/py.typed") for n in names), f"{wheel.name} does not ship py.typed"
