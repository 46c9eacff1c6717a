"""The packages as a user installs them: wheels (not the editable checkouts every other suite runs on).

Builds the wheels of storch-core, the three families and storch-benchmarks from copies of their folders (core's
from its sdist, so the sdist holds what a build needs), installs them with pip into a fresh virtual environment
that sees torch and the other dependencies of this one but none of its storch installs, and checks what a user
meets: every module and ``py.typed`` installed, the entry points registered, one gradient per family against the
exact value, and after uninstalling families their names unknown with the package to install, the console script
``storch-compare`` included. Offline: built without build isolation, so skipped where setuptools>=77 (the build
requirement) is not installed here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest
from importlib_metadata import PackageNotFoundError, version

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"packages/storch-core": "storch", "packages/storch-estimators-score": "storch_score",
            "packages/storch-estimators-relaxed": "storch_relaxed", "packages/storch-estimators-mvd": "storch_mvd",
            "benchmarks": "storch_bench"}


def _setuptools_for_offline_builds() -> bool:
    try:
        return int(version("setuptools").split(".")[0]) >= 77
    except PackageNotFoundError:
        return False


pytestmark = pytest.mark.skipif(not _setuptools_for_offline_builds(),
                                reason="building offline needs setuptools>=77 installed (no build isolation)")

# runs inside the fresh environment: what is installed and what the registry finds; one estimate per family
PROBE = r'''
import json, sys, torch, storch
from importlib_metadata import entry_points
from torch.distributions import Bernoulli

out = {"storch": storch.__file__, "entry_points": sorted(ep.name for ep in entry_points(group="storch.estimators")),
       "available": sorted(storch.available_estimators()), "z": {}, "errors": {}}
p = torch.tensor([0.3, 0.6], requires_grad=True)  # d/dp E[z1 + z2] = (1, 1)
for name in sys.argv[1].split(",") if sys.argv[1] else []:
    torch.manual_seed(0)
    grads = []
    for _ in range(40):
        with storch.Graph():
            z = storch.estimator(name, plate="z", n_samples=16)(Bernoulli(probs=p))
            storch.add_cost(z.sum(), name="c")
            grads.append(torch.autograd.grad(storch.surrogate_loss(), p)[0])
    g = torch.stack(grads)
    # (mvd is exact here: no spread, so float rounding alone over a floor of 1e-6)
    out["z"][name] = ((g.mean(0) - 1).abs() / (g.std(0) / len(grads) ** 0.5).clamp_min(1e-6)).max().item()
for name in sys.argv[2].split(","):
    try:
        storch.estimator(name, plate="z")
    except storch.UnknownEstimatorError as e:
        out["errors"][name] = str(e)
print(json.dumps(out))
'''


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _without_storch(tmp_path: Path) -> Path:
    """A folder of links to everything this environment's site-packages hold except storch's own installs (its
    packages, dist-infos, editable finders and .pth files): the fresh environment's dependencies."""
    shadow = tmp_path / "deps"
    shadow.mkdir()
    import torch

    sites = {Path(sysconfig.get_paths()["purelib"]), Path(torch.__file__).parents[1]}
    for site in sites:
        for entry in site.iterdir():
            name = entry.name.lower()
            if name.startswith(("storch", "__editable__", "_storch")) or name.endswith((".pth", ".egg-link")):
                continue
            if not (shadow / entry.name).exists():
                (shadow / entry.name).symlink_to(entry)
    return shadow


def test_wheels_install_and_work_alone_and_in_subsets(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": "", "MPLBACKEND": "Agg"}
    copies = tmp_path / "src"
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, copies / Path(folder).name,
                        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests", "scripts"))
    wheels = tmp_path / "wheels"
    # storch-core through its sdist: what the sdist holds must be enough to build the wheel
    core = copies / "storch-core"
    sdist = _run([sys.executable, "-c", "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))",
                  tmp_path / "sdist"], cwd=core, env=env).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "sdist" / sdist) as tar:
        tar.extractall(tmp_path / "sdist")
    built = [tmp_path / "sdist" / sdist[:-len(".tar.gz")]] + [copies / Path(f).name for f in PACKAGES if f != "packages/storch-core"]
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, *built],
         env=env)
    assert len(list(wheels.glob("*.whl"))) == len(PACKAGES)

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "_deps.pth").write_text(str(_without_storch(tmp_path)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", python]
    # no --no-deps: the declared dependencies resolve against what the environment sees (offline)
    _run([*pip, "install", "-q", "--no-index", "--find-links", wheels, "storch-core", "storch-estimators-score",
          "storch-estimators-relaxed", "storch-estimators-mvd", "storch-benchmarks"], env=env)

    for folder, module in PACKAGES.items():  # every module and py.typed, from the wheel (no editable path)
        src = ROOT / folder / "src" / module
        expected = {p.relative_to(src).as_posix() for p in src.rglob("*") if p.suffix in (".py", ".typed")}
        got = {p.relative_to(site / module).as_posix() for p in (site / module).rglob("*")
               if p.suffix in (".py", ".typed")}
        assert got == expected, f"{module}: missing {sorted(expected - got)}, extra {sorted(got - expected)}"

    def probe(estimates: str, unknown: str) -> dict:
        return json.loads(_run([python, "-c", PROBE, estimates, unknown], env=env, cwd=tmp_path).stdout)

    everything = probe("score,arm,mvd", "gumbel_rao")
    assert everything["storch"].startswith(str(site)), everything["storch"]
    assert everything["entry_points"] == ["core", "mvd", "relaxed", "score"]
    assert {"expect", "score", "unordered_set", "relax", "arm", "spsa", "mvd"} <= set(everything["available"])
    assert max(everything["z"].values()) < 4, everything["z"]  # unbiased: |mean - exact| < 4 standard errors

    _run([*pip, "uninstall", "-q", "-y", "storch-estimators-relaxed", "storch-estimators-mvd"], env=env)
    score_only = probe("score", "gumbel_softmax,mvd")
    assert score_only["entry_points"] == ["core", "score"] and score_only["z"]["score"] < 4
    assert "pip install storch-estimators-relaxed" in score_only["errors"]["gumbel_softmax"]
    assert "pip install storch-estimators-mvd" in score_only["errors"]["mvd"]

    _run([*pip, "uninstall", "-q", "-y", "storch-estimators-score"], env=env)
    core_alone = probe("", "score,leave_one_out")
    assert core_alone["available"] == ["expect", "reparameterization"]
    assert "pip install storch-estimators-score" in core_alone["errors"]["score"]
    assert "a baseline of the 'score' estimator" in core_alone["errors"]["leave_one_out"]
    assert "pip install storch-estimators-score" in core_alone["errors"]["leave_one_out"]
    script = target / ("Scripts/storch-compare.exe" if os.name == "nt" else "bin/storch-compare")
    compare = subprocess.run([script, "sequences", "--no-progress", "--out", tmp_path / "results"], env=env,
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert compare.returncode == 2 and "pip install storch-estimators-score" in compare.stderr, compare.stderr
