"""Variance claims on the REBAR toy with t = 0.499 (where the gradient signal is tiny)."""

from __future__ import annotations

import torch

import storch

from relaxed_problems import TOY_THETA, estimates, score_at_1, toy_model

T = 0.499
N = 20000


def variance(g: torch.Tensor) -> float:
    """Total variance of the gradient estimate (sum over the components)."""
    return float(g.var(0).sum())


def test_disarm_has_lower_variance_than_arm():
    # same seed, same proposal code: both use the same logistic noise (common random numbers)
    out = {}
    for name in ("arm", "disarm"):
        torch.manual_seed(30)
        est = storch.estimator(name, plate="b")
        out[name] = variance(estimates(lambda x: toy_model(est, x, T), TOY_THETA, 1, n=N)[0])
    print(f"t={T}: variance ARM {out['arm']:.4g}, DisARM {out['disarm']:.4g} "
          f"(ratio {out['disarm'] / out['arm']:.3f})")
    assert out["disarm"] < out["arm"]


def test_relax_after_500_updates_beats_plain_score():
    torch.manual_seed(31)
    est = storch.estimator("relax", plate="b", lr=0.03)
    before = variance(estimates(lambda x: toy_model(est, x, T), TOY_THETA, 1, n=N)[0])
    for _ in range(500):
        with storch.Graph():
            _, x = storch.testing.replicate(TOY_THETA, 16)
            toy_model(est, x, T)
            storch.backward()  # runs Relax.update_parameters: one variance-minimising step
    after = variance(estimates(lambda x: toy_model(est, x, T), TOY_THETA, 1, n=N)[0])
    score = variance(score_at_1(TOY_THETA, T, N))
    print(f"t={T}: variance score@1 {score:.4g}; RELAX untrained {before:.4g}, "
          f"after {est.update_steps} control-variate steps {after:.4g}")
    assert est.update_steps == 500
    assert after < score
    assert after < before
