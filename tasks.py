#!/usr/bin/env python3
"""The quick-start commands, runnable with nothing but python3.

    python3 tasks.py demo [ARGS]   # the estimator comparison demo on bundled data (tox -e demo -- ARGS)
    python3 tasks.py test [ARGS]   # every test environment (tox -p auto ARGS: ARGS go to tox, e.g. -e core)
    python3 tasks.py docs [ARGS]   # the documentation site, built offline into site/ (tox -e docs -- ARGS)

ARGS after demo go to storch-compare, after docs to the docs environment's pytest, after test to
tox itself. ARGS after docs replace that pytest's default paths (tests/docs and the tutorial
examples/tutorials/writing_an_estimator.py), so name the paths with an option: `docs tests/docs -k
comparison` (`docs -k comparison` alone collects every test of the repository). Creates ./.venv with
tox on first use; tox builds one environment per install set.
"""

import os
import subprocess
import sys
import time
import venv
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VERBS = ("demo", "test", "docs")
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
    if not argv or argv[0] not in VERBS:
        if argv:
            print(f"tasks.py: unknown command {argv[0]!r}; choose from {', '.join(VERBS)}", file=sys.stderr)
        print(__doc__)
        return 2
    if sys.version_info < (3, 10):  # (the packages take 3.9; the pinned test and demo torch does not)
        print(f"tasks.py: the test and demo environments pin torch 2.13.0, which has no wheel for Python "
              f"{sys.version_info[0]}.{sys.version_info[1]}; run this file with Python 3.10 or newer (storch "
              "itself installs on 3.9 with torch 2.7+: pip install ./packages/storch-core)", file=sys.stderr)
        return 2
    py = ensure_tox()
    if argv[0] == "demo":
        return subprocess.call([str(py), "-m", "tox", "-e", "demo", "--", *argv[1:]], cwd=ROOT)
    if argv[0] == "docs":
        # the docs env runs tests/docs (code blocks, tutorials) and then the strict build
        code = subprocess.call([str(py), "-m", "tox", "-e", "docs", "--", *argv[1:]], cwd=ROOT)
        if code == 0:
            print(f"site built: {ROOT / 'site' / 'index.html'}")
        return code
    started = time.time()
    cmd = [str(py), "-m", "tox", "-p", "auto", "--parallel-live", *argv[1:]]
    code = subprocess.call(cmd, cwd=ROOT)
    print(summary(started))
    return code


def summary(since: float) -> str:
    """Totals over the JUnit reports the tox environments wrote during this run."""
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for report in (ROOT / ".tox").glob("*/tmp/junit.xml"):
        if report.stat().st_mtime < since:
            continue  # an environment that did not run this time
        for suite in ET.parse(report).getroot().iter("testsuite"):
            for key in totals:
                totals[key] += int(suite.get(key, 0))
    failed = totals["failures"] + totals["errors"]
    passed = totals["tests"] - failed - totals["skipped"]
    return f"{passed} passed, {failed} failed, {totals['skipped']} skipped"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
