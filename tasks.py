#!/usr/bin/env python3
"""The two quick-start commands, runnable with nothing but python3.

    python3 tasks.py demo   # the estimator comparison demo on bundled data (tox -e demo)
    python3 tasks.py test   # every test environment (tox)

Creates ./.venv with tox on first use; tox builds one environment per install set.
"""

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"


def _python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_tox() -> Path:
    py = _python()
    if not py.exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    probe = subprocess.run([str(py), "-c", "import tox"], capture_output=True)
    if probe.returncode != 0:
        subprocess.check_call([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "tox>=4"])
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    py = ensure_tox()
    if argv[0] == "demo":
        cmd = [str(py), "-m", "tox", "-e", "demo", "--", *argv[1:]]
    else:
        cmd = [str(py), "-m", "tox", "-p", "auto", "--parallel-no-spinner", *argv[1:]]
    return subprocess.call(cmd, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
