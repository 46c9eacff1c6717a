"""Checks for estimator authors: statistical comparison of estimates against exact values.

- :func:`check_against_enumeration`: z-tests an estimator's estimates of orders 0..n on small
  models whose expectations are known exactly (one line in a pytest test).
- :func:`check_leakage`: the same comparison with every replicate in its own graph (with a small
  data plate), which catches baselines that leak across the entries of a cost frame.
- :func:`check_conditions`: z-tests Theorem 1's local conditions 1-3 for one distribution and
  test function, per order.
- Building blocks: :func:`replicate` (a parameter copied R times along an independent plate, so
  that ONE surrogate loss holds R independent estimates; the plate is reduced by the mean, so the
  gradient w.r.t. copy r is ĝ_r / R), :func:`per_replicate_derivatives`, :func:`assert_unbiased`
  and :func:`z_test`.
"""

from ._conditions import ConditionsReport, check_conditions, exact_expectation
from ._enumeration import ConformanceReport, check_against_enumeration, direction, exact_derivatives
from ._leakage import check_leakage
from ._models import EstimatorFactory, Model, standard_models
from ._resolve import EstimatorLike
from ._stats import UnbiasednessReport, assert_unbiased, per_replicate_derivatives, replicate, z_test

__all__ = [
    "replicate", "per_replicate_derivatives", "assert_unbiased", "z_test", "UnbiasednessReport",
    "check_against_enumeration", "check_leakage", "ConformanceReport", "exact_derivatives", "direction", "Model", "standard_models",
    "EstimatorFactory", "EstimatorLike", "check_conditions", "ConditionsReport", "exact_expectation",
]
