"""Running the tutorials (examples/tutorials/*.py) for the site and for tests/docs.

Each tutorial is a script that runs with small defaults in under a minute on one CPU thread,
prints what the page shows, and with ``--out DIR`` saves its figure as ``DIR/<script name>.png``.
:func:`run` runs one and keeps its output in build/docs/tutorials/<name>/; :func:`result` reuses
that output when it is newer than every Python file of the repository, else runs the script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "docs" / "tutorials"
SOURCES = ["examples", "packages", "benchmarks/src"]


@dataclasses.dataclass
class Result:
    output: str
    seconds: float
    figure: Optional[Path]


def figure_uri(rel: str) -> str:
    """Where the site keeps a tutorial's figure."""
    return f"tutorials/img/{Path(rel).stem}.png"


def _newest_source() -> float:
    newest = 0.0
    for top in SOURCES:
        for path in (ROOT / top).rglob("*.py"):
            if ".tox" not in path.parts and ".venv" not in path.parts:
                newest = max(newest, path.stat().st_mtime)
    return newest


def run(rel: str, *args: str, timeout: float = 600) -> Result:
    """Run ``python <rel> --out build/docs/tutorials/<name> *args``; fail with its stderr."""
    out = OUT / Path(rel).stem
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        old.unlink()
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONHASHSEED="0")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / rel), "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{rel} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    (out / "output.txt").write_text(proc.stdout, encoding="utf-8")
    (out / "run.json").write_text(json.dumps({"seconds": seconds, "args": list(args)}), encoding="utf-8")
    return _load(rel)


def _load(rel: str) -> Result:
    out = OUT / Path(rel).stem
    figure = out / f"{Path(rel).stem}.png"
    meta = json.loads((out / "run.json").read_text(encoding="utf-8"))
    return Result((out / "output.txt").read_text(encoding="utf-8"), meta["seconds"],
                  figure if figure.exists() else None)


def result(rel: str) -> Result:
    """The tutorial's output: from the last run if nothing changed since, else from a new run."""
    meta = OUT / Path(rel).stem / "run.json"
    if meta.exists() and json.loads(meta.read_text())["args"] == [] and meta.stat().st_mtime > _newest_source():
        return _load(rel)
    return run(rel)
