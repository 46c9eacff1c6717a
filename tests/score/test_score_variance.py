"""Measured variance claims (run with ``pytest -s`` to see the table).

On the REBAR toy problem E_{b~Bern(σ(θ))}[Σ_i (b_i - 0.45)^2] (three Bernoullis, θ = (-1, 0, 1))\nand on a K = 10 categorical (c_k = (k/9 - 0.45)^2, θ = linspace(-1, 1, 10)), as in storch-compare toy:
leave-one-out@8 has lower gradient variance than score@8 without baseline, and on the categorical
unordered_set@8 has lower variance than leave-one-out@8. Every estimate is also z-tested against
the exact gradient, so a variance gain cannot come from a bias.
"""

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical

import storch
from score_problems import derivative_estimates
from storch.testing import assert_unbiased

torch.set_default_dtype(torch.float64)

R = 4000
# the same problems as storch-compare toy (benchmarks/src/storch_bench/toy.py)
TOY_THETA = torch.tensor([-1.0, 0.0, 1.0])  # three Bernoullis, one node with batch shape (3,)
CAT_THETA = torch.linspace(-1.0, 1.0, 10)
CAT_C = (torch.arange(10.0) / 9 - 0.45) ** 2


def _toy_model(th, est):
    b = est(Bernoulli(logits=th))
    storch.add_cost(((b - 0.45) ** 2).sum())


def _cat_model(th, est):
    z = est(Categorical(logits=th))
    storch.add_cost(F.one_hot(z, 10).to(th.dtype) @ CAT_C)


def _toy_exact():
    t = TOY_THETA.clone().requires_grad_(True)
    p = torch.sigmoid(t)
    return torch.autograd.grad((p * 0.55 ** 2 + (1 - p) * 0.45 ** 2).sum(), t)[0]


def _cat_exact():
    t = CAT_THETA.clone().requires_grad_(True)
    return torch.autograd.grad(torch.softmax(t, -1) @ CAT_C, t)[0]


PROBLEMS = {"rebar_toy": (_toy_model, TOY_THETA, _toy_exact), "categorical_K10": (_cat_model, CAT_THETA, _cat_exact)}

ESTIMATORS = {
    "score@1": ("score", dict(n_samples=1)),
    "score@8": ("score", dict(n_samples=8)),
    "score@8 moving_average": ("score", dict(n_samples=8, baseline="moving_average")),
    "score@8 leave_one_out": ("score", dict(n_samples=8, baseline="leave_one_out")),
    "importance@8 (q: logits/2)": ("importance", dict(n_samples=8, proposal=lambda p: type(p)(logits=p.logits.detach() / 2))),
    "sum_and_sample 1+7": ("sum_and_sample", dict(n_enumerate=1, n_samples=7)),
    "sum_and_sample 1+7 leave_one_out": ("sum_and_sample", dict(n_enumerate=1, n_samples=7, baseline="leave_one_out")),
    "unordered_set@8 no baseline": ("unordered_set", dict(n_samples=8, baseline=False)),
    "unordered_set@8": ("unordered_set", dict(n_samples=8)),
}


def gradient_variance(problem: str, name: str, options: dict, seed: int = 0) -> float:
    """Total variance of the gradient estimate (after 20 warm-up steps for a moving average)."""
    model, theta, exact = PROBLEMS[problem]
    torch.manual_seed(seed)
    est = storch.estimator(name, plate="x", **options)
    steps = 20 if options.get("baseline") == "moving_average" else 1  # training steps update the average
    g, = derivative_estimates(model, theta, est, 1, R, steps)
    assert_unbiased(g, exact(), f"{name} {options} on {problem}")
    return float(g.var(0).sum())


def variance_table() -> dict:
    return {(p, e): gradient_variance(p, *ESTIMATORS[e]) for p in PROBLEMS for e in ESTIMATORS}


def test_variance_claims():
    table = variance_table()
    print(f"\ngradient variance (trace of the covariance), {R} estimates each")
    print(f"{'estimator':<36}" + "".join(f"{p:>18}" for p in PROBLEMS))
    for e in ESTIMATORS:
        print(f"{e:<36}" + "".join(f"{table[p, e]:>18.4g}" for p in PROBLEMS))
    for p in PROBLEMS:
        assert table[p, "score@8 leave_one_out"] < table[p, "score@8"], p
    assert table["categorical_K10", "unordered_set@8"] < table["categorical_K10", "score@8 leave_one_out"]
