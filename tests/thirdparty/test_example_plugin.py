"""A third-party estimator package (examples/storch-estimators-example) plugs into storch.

Installed next to storch-core only (tox -e thirdparty), its estimator is found by name, listed
with its distribution, passes the conformance kit and takes part in the comparison demo.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli

import storch
import storch.testing as kit

PACKAGE = "storch-estimators-example"


def test_found_by_name():
    from storch_example import GumbelRao

    assert storch.get_estimator_class("gumbel_rao") is GumbelRao
    est = storch.estimator("gumbel_rao", plate="z", temperature=0.5, n_gumbels=4)
    assert isinstance(est, GumbelRao) and est.temperature == 0.5 and est.n_gumbels == 4
    with storch.Graph():
        theta = torch.zeros(3, requires_grad=True)
        b = est(Bernoulli(logits=theta))
        storch.add_cost(((b - 0.45) ** 2).sum())
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert g.shape == (3,) and torch.isfinite(g).all()


def test_listed_with_its_package_and_metadata():
    info = storch.available_estimators()["gumbel_rao"]
    print(f"\n{info}")
    assert info.package == PACKAGE
    assert info.family == "example"  # the entry point's name
    assert info.biased is True and info.max_order == 1
    assert info.description.startswith("Gumbel-Rao")
    assert storch.get_estimator_class("gumbel_rao").options() == ["n_samples", "temperature", "n_gumbels"]


def test_first_party_families_are_not_needed():
    from importlib.metadata import PackageNotFoundError, distribution

    installed = []
    for dist in ("storch-estimators-score", "storch-estimators-relaxed", "storch-estimators-mvd"):
        try:
            distribution(dist)
            installed.append(dist)
        except PackageNotFoundError:
            pass
    packages = {info.package for info in storch.available_estimators().values()}
    print(f"\nfirst-party families installed here: {installed or 'none'}; estimator packages: {sorted(packages)}")
    assert {"storch-core", PACKAGE} <= packages
    assert packages <= {"storch-core", PACKAGE, *installed}


def test_errors_name_the_plugin():
    with pytest.raises(storch.UnknownEstimatorError, match="gumbel_rao"):
        storch.estimator("gumbel_rau", plate="z")  # a typo: the error suggests the close match
    with pytest.raises(storch.OptionError, match="n_gumbel"):
        storch.estimator("gumbel_rao", plate="z", n_gumbel=3)


def test_passes_the_conformance_kit():
    report = kit.check_against_enumeration("gumbel_rao")
    print("\n" + report.table())
    assert report.ok and report.orders == (0,) and len(report.checks) == 7  # onehot[2x2], global_latent[Bernoulli], elbo[Bernoulli] too
    assert "independent[Bernoulli], order 0" in {c.name for c in report.checks}


@pytest.mark.parametrize("kind", ["Bernoulli", "OneHotCategorical"])
def test_an_independent_wrapper_is_the_distribution_under_it(kind):
    """supports() accepts Independent(Bernoulli / OneHotCategorical) (`distributions` are matched
    against the wrapped distribution), but output() read `node.distribution.logits` and raised
    AttributeError on the wrapper. It reads them from base_distribution now; the reinterpreted dims
    are elementwise, so the node gives the same values and gradients as the unwrapped distribution
    with the same random numbers."""
    from torch.distributions import Independent, OneHotCategorical

    results = []
    for wrap in (False, True):
        logits = torch.tensor([[0.3, -0.5, 1.0], [0.0, 0.7, -1.2]], requires_grad=True)
        d = Bernoulli(logits=logits) if kind == "Bernoulli" else OneHotCategorical(logits=logits)
        est = storch.estimator("gumbel_rao", plate="z", n_samples=3, n_gumbels=4)
        assert est.supports(Independent(d, 1))
        torch.manual_seed(0)
        with storch.Graph():
            z = est(Independent(d, 1) if wrap else d)
            storch.add_cost(((z - 0.4) ** 2 * torch.tensor([1.0, -2.0, 0.5])).sum())
            (g,) = torch.autograd.grad(storch.surrogate_loss(), logits)
        results.append((z.tensor.detach(), g))
    assert torch.equal(results[0][0], results[1][0]) and torch.allclose(results[0][1], results[1][1])
    assert results[0][1].abs().sum() > 0


def _storch_compare() -> list[str]:
    script = Path(sys.executable).parent / "storch-compare"
    found = str(script) if script.exists() else shutil.which("storch-compare")
    assert found, "the console script storch-compare (package storch-benchmarks) is not installed"
    return [found]


def test_takes_part_in_the_comparison_demo(tmp_path):
    from storch_bench.roster import parse_specs

    assert "gumbel_rao@1" in [s.label for s in parse_specs("auto")]  # the default roster includes it
    cmd = _storch_compare() + [
        "vae", "--estimators", "gumbel_rao@1", "--epochs", "1", "--max-train", "64", "--variance-reps", "2",
        "--checkpoints", "1", "--no-progress", "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(run.stdout[-2000:], run.stderr[-2000:])
    assert run.returncode == 0
    rows = (tmp_path / "vae.csv").read_text().splitlines()
    ours = [r for r in rows if "gumbel_rao@1" in r]
    assert [r.split(",")[0] for r in ours] == ["bernoulli", "categorical"]
    assert "Did not take part" not in (tmp_path / "vae.md").read_text()
