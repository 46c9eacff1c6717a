"""MVD on composed models (tests/composed_models.py) of the families it accepts beyond the kit's own models: counts,
Exponential, Laplace (scale), Gamma (rate), nodes of two elements. Each model has a node whose parameter depends
on the previous sample and a cost of the first node only; one has a data plate of three points. z-tests against
enumeration / quadrature at orders 0 and 1 (mvd's max_order), seeded by the kit."""

from __future__ import annotations

import pytest

import storch.testing as kit
from composed_models import model


@pytest.mark.parametrize("family", ["Binomial", "Poisson", "Geometric", "NegativeBinomial", "Exponential", "Laplace",
                                    "Binomial[2]", "Poisson[2]", "Exponential[2]", "Gamma(rate)[2]", "Laplace[2]",
                                    "Normal[2]"])
@pytest.mark.parametrize("coupled", [True, False])
def test_mvd_on_composed_models(family, coupled):
    report = kit.check_against_enumeration("mvd", models=[model(s, family) for s in ("chain", "data", "chaindata")],
                                           orders=(0, 1), options={"n_samples": 2, "coupled": coupled},
                                           n_replicates=1000)
    assert len(report.checks) == 6
