"""Relaxed-family estimators on composed models (tests/composed_models.py) of the families they accept beyond the
kit's own models: GO on counts (Binomial, Poisson, Geometric, NegativeBinomial, nodes of two elements, an
Independent wrapper), LAX on continuous nodes, and the Bernoulli estimators on the chain inside a data plate and a
chain three nodes deep. Each model has a node whose parameter depends on the previous sample and a cost of the
first node only. z-tests against enumeration / quadrature, seeded by the kit."""

from __future__ import annotations

import pytest

import storch
import storch.testing as kit
from composed_models import model


@pytest.mark.parametrize("family", ["Binomial", "Poisson", "Geometric", "NegativeBinomial", "Binomial[2]",
                                    "Poisson[2]", "Independent[Poisson[2]]"])
def test_go_on_composed_count_models(family):
    report = kit.check_against_enumeration("go", models=[model(s, family) for s in ("chain", "data", "chaindata")],
                                           orders=(0, 1), options={"n_samples": 2}, n_replicates=1000)
    assert len(report.checks) == 6


@pytest.mark.parametrize("family", ["MultivariateNormal", "Independent[Normal]", "Normal[2]", "Laplace", "Exponential"])
def test_lax_on_composed_continuous_models(family):
    report = kit.check_against_enumeration("lax", models=[model(s, family) for s in ("chain", "data")],
                                           orders=(0, 1, 2), n_replicates=1000)
    assert len(report.checks) == 6


def test_lax_on_the_gamma_family_at_order_one_and_refused_at_two():
    models = [model("chain", f) for f in ("Beta", "Gamma", "Dirichlet")]
    report = kit.check_against_enumeration("lax", models=models, orders=(0, 1), n_replicates=1000)
    assert len(report.checks) == 6
    with pytest.raises(storch.OrderError, match="'lax' on plate 'x1' is unbiased only up to order 1"):
        kit.check_against_enumeration("lax", models=models[:1], orders=(2,), n_replicates=10)


@pytest.mark.parametrize("name, orders", [("arm", (0, 1)), ("disarm", (0, 1)), ("relax", (0, 1, 2)),
                                          ("rebar", (0, 1, 2))])
def test_bernoulli_estimators_in_a_data_plate_and_three_deep(name, orders):
    report = kit.check_against_enumeration(name, models=[model(s, "Bernoulli") for s in ("chaindata", "chain3")],
                                           orders=orders, n_replicates=1000)
    assert len(report.checks) == 2 * len(orders)
