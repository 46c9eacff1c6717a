"""Core estimators on composed models of the families the kit's own models leave out (tests/composed_models.py):
a second node whose parameter depends on the first sample, a data plate of three points with a cost per point,
a cost of the first node only, three nodes deep. z-tests against enumeration / quadrature, seeded by the kit."""

from __future__ import annotations

import pytest

import storch
import storch.testing as kit
from composed_models import families, mixed, model, per_node

# (the gamma family's rsample has no second derivative in its concentration: reparameterization is refused at
# order 2 there; a Gamma whose rate alone carries θ, x = g / rate, is pathwise at any order)
PATHWISE = ["Laplace", "Exponential", "MultivariateNormal", "Independent[Normal]", "Normal[2]", "Laplace[2]",
            "Gamma(rate)[2]"]
GAMMA_FAMILY = ["Beta", "Gamma", "Dirichlet"]


@pytest.mark.parametrize("family", PATHWISE)
def test_reparameterization_on_composed_models(family):
    shapes = ["chain", "data", "chaindata"] + ([] if family.endswith("[2]") else ["chain3"])
    report = kit.check_against_enumeration("reparameterization", models=[model(s, family) for s in shapes],
                                           orders=(0, 1, 2), n_replicates=1000)
    assert len(report.checks) == 3 * len(shapes)


@pytest.mark.parametrize("family", GAMMA_FAMILY)
def test_reparameterization_of_the_gamma_family_at_order_one_and_refused_at_two(family):
    models = [model("chain", family), model("data", family)]
    report = kit.check_against_enumeration("reparameterization", models=models, orders=(0, 1), n_replicates=1000)
    assert len(report.checks) == 4
    with pytest.raises(storch.OrderError, match="unbiased only up to order 1 for its distribution"):
        kit.check_against_enumeration("reparameterization", models=models[:1], orders=(2,), n_replicates=10)


def test_expect_on_binomial_chains_is_exact_to_order_three():
    models = [model(s, f) for s in ("chain", "chaindata", "chain3") for f in ("Binomial", "Binomial[2]")]
    report = kit.check_against_enumeration("expect", models=models, orders=(0, 1, 2, 3), n_replicates=20)
    assert len(report.checks) == 24 and all(c.stderr.max() < 1e-9 for c in report.checks)  # exact, up to rounding


def test_a_factory_with_one_estimator_per_node_runs_a_model_that_lists_every_nodes_distribution():
    # a model passed with models=[...] was judged by the factory's probe make("probe") alone: listing the
    # Bernoulli of x1 (expect) and the Normal of x2 (reparameterization), it failed with "estimator 'expect' does
    # not support Normal" although every node's estimator supports its own node; the model now runs, and a node
    # that refuses its distribution is still a failure that names the node
    fam = families()
    m = mixed(fam["Bernoulli"], fam["Normal[2]"])
    make = per_node(x1=lambda p: storch.estimator("expect", plate=p),
                    x2=lambda p: storch.estimator("reparameterization", plate=p))
    report = kit.check_against_enumeration(make, models=[m], orders=(0, 1, 2), n_replicates=1000)
    assert report.estimator == "factory (expect at x1; reparameterization at x2)" and len(report.checks) == 3
    leak = kit.check_leakage(make, models=[m], orders=(0, 1), n_graphs=200)
    assert leak.ok and len(leak.checks) == 2
    swapped = per_node(x1=lambda p: storch.estimator("reparameterization", plate=p),
                       x2=lambda p: storch.estimator("expect", plate=p))
    with pytest.raises(AssertionError, match=r"could not run[\s\S]*refused while sampling by reparameterization "
                                             r"at node 'x1'"):
        kit.check_against_enumeration(swapped, models=[m], orders=(0,), n_replicates=10)
