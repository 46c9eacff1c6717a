"""One estimator per node, across families: a chain x1 -> x2 (x2's parameter depends on x1's sample) whose nodes
are of different distribution types and get different estimators (a pathwise node feeding a discrete one and the
reverse), with a cost of x1 only (tests/composed_models.py, ``mixed``). z-tests against quadrature / enumeration
at every order both estimators claim (at most 2), seeded by the kit."""

from __future__ import annotations

import pytest

import storch
import storch.testing as kit
from composed_models import families, mixed, per_node

CASES = [  # (x1's estimator, x1's family, x2's estimator, x2's family)
    *[("reparameterization", "Normal[2]", name, "Bernoulli")
      for name in ("score", "arm", "disarm", "relax", "rebar", "go", "mvd", "sum_and_sample", "unordered_set")],
    *[(name, "Bernoulli", "reparameterization", "Exponential") for name in ("score", "arm", "go", "mvd", "expect")],
    ("go", "Poisson", "mvd", "Laplace"),
    ("mvd", "Exponential", "go", "Poisson"),
    ("lax", "MultivariateNormal", "score", "Binomial[2]"),
]


def _make(name):
    options = {"n_samples": 2} if "n_samples" in storch.get_estimator_class(name).options() else {}
    return lambda plate: storch.estimator(name, plate=plate, **options)


@pytest.mark.parametrize("first, fa, second, fb", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_one_estimator_per_node(first, fa, second, fb):
    fam = families()
    top = min(2, *(storch.available_estimators()[n].max_order for n in (first, second)))
    orders = tuple(range(int(top) + 1))
    report = kit.check_against_enumeration(per_node(x1=_make(first), x2=_make(second)),
                                           models=[mixed(fam[fa], fam[fb])], orders=orders, n_replicates=1000)
    assert f"{first} at x1" in report.estimator and f"{second} at x2" in report.estimator
    assert len(report.checks) == len(orders)
