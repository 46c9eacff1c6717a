"""Each tutorial (examples/tutorials/*.py) runs with its small defaults and draws its figure.

The output is kept in build/docs/tutorials/, where the docs build (tools/docs/hooks.py) takes it
for the tutorial pages instead of running the scripts again.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "docs"))
import tutorials  # noqa: E402

SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples" / "tutorials").glob("*.py"))


def test_every_tutorial_has_a_page() -> None:
    pages = "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs" / "tutorials").glob("*.md"))
    for script in SCRIPTS:
        assert f"<!-- tutorial: {script} -->" in pages, f"{script} is not rendered on any page of docs/tutorials"


@pytest.mark.parametrize("script", SCRIPTS)
def test_tutorial_runs(script: str) -> None:
    result = tutorials.run(script)
    print(f"\n{script}: {result.seconds:.1f} s, figure {result.figure}")
    assert result.figure is not None and result.figure.stat().st_size > 10_000, f"{script} drew no figure"
    assert "nan" not in result.output.lower(), f"{script} printed a NaN:\n{result.output}"
    out = result.output
    if script.endswith("policy_gradients.py"):
        z = float(re.search(r"largest \|z\| of the difference of the means: ([\d.]+)", out).group(1))
        assert z < 4, "causal credit changed the expected gradient"
        ratio = float(re.search(r"variance ratio, return / causal: ([\d.]+)", out).group(1))
        assert ratio > 1, "causal credit did not lower the variance (the page says it does)"
    if script.endswith("discrete_vae.py"):
        assert "replayed training follows the eager one: yes" in out, "the replayed step trained differently"
    if script.endswith("writing_an_estimator.py"):
        assert "check_leakage('my_leave_one_out'): PASS" in out
        assert "check_leakage('my_own_sample_mean'): FAIL" in out, "the kit missed the biased baseline"
        assert "package='my-estimators'" in out, "the estimator was not found through its entry point"
