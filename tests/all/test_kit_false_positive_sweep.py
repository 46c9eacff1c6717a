"""False-positive sweep: every first-party estimator passes the kit over 10 seeds.

The kit is only useful if correct estimators pass it: for each installed first-party estimator
(and score's learned and greedy baselines), 10 seeds of the batched check (orders 0 and 1, or the
plan's orders, see test_first_party_conformance; the first of the kit's models the estimator
supports, 500 estimates) and of the separate-graphs leakage check (the same model, 100 graphs:
with 25, the mean of a skewed cost was not normal enough for a z-test and lax failed at seed 6).
Learned parts are warmed up first (2 steps). Fewer estimates per seed than the conformance test,
to keep the runtime modest; the thresholds are the kit's (4 standard errors).
"""

from __future__ import annotations

import time

import pytest

import storch
import storch.testing as kit
from test_first_party_conformance import FIRST_PARTY, PLANS

SEEDS = range(10)
EXTRA = {"score[learned]": ("score", {"n_samples": 2, "baseline": "learned"}),
         "score[greedy]": ("score", {"n_samples": 2, "baseline": "greedy"})}
CASES = sorted(n for n in FIRST_PARTY if n in storch.available_estimators()) + sorted(EXTRA)


def _models(probe, k: int):
    models, _ = kit.standard_models(probe)
    return models[:k]


@pytest.mark.parametrize("case", CASES)
def test_no_false_positives_over_10_seeds(case):
    name, options = EXTRA.get(case, (case, None))
    plan = PLANS.get(name) if case not in EXTRA else None
    if plan is not None and not plan.run:
        pytest.skip(plan.reason)
    if plan is not None and plan.options:
        options = plan.options
    probe = storch.estimator(name, plate="p", **(options or ({"n_samples": 2} if "n_samples" in
                                                              storch.get_estimator_class(name).options() else {})))
    orders = plan.orders if plan is not None and plan.orders else tuple(
        o for o in (0, 1) if o <= (0 if probe.biased else min(probe.max_order, 1)))
    warmup = 2 if probe.has_update else 0
    start, worst = time.perf_counter(), 0.0
    for seed in SEEDS:
        batched = kit.check_against_enumeration(name, options=options, orders=orders, n_replicates=500,
                                                models=_models(probe, 1), seed=100 * seed, warmup=warmup,
                                                raise_on_failure=False)
        separate = kit.check_leakage(name, options=options, orders=orders, models=_models(probe, 1),
                                     n_graphs=100, seed=100 * seed, warmup=warmup, raise_on_failure=False)
        for report in (batched, separate):
            assert report.ok, f"seed {seed}:\n{report.table()}"
            worst = max([worst] + [c.max_abs_z for c in report.checks])
    print(f"\n{case}: 10 seeds passed, max |z| {worst:.2f} ({time.perf_counter() - start:.1f}s)")
