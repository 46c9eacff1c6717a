"""`mvd` on one node and `score` (score family) on another, in one graph: unbiased gradients."""

import numpy as np
import torch
from torch.distributions import Bernoulli, Normal

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

R = 3000
GH_NODES, GH_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)  # ∫ g φ ≈ Σ w g / √(2π)
GH_NODES = torch.tensor(GH_NODES, dtype=torch.float64)
GH_WEIGHTS = torch.tensor(GH_WEIGHTS / np.sqrt(2 * np.pi), dtype=torch.float64)


def _gradients(theta, model):
    with storch.Graph():
        leaf, t = replicate(theta, R)
        storch.add_cost(model(t))
        g, = per_replicate_derivatives(storch.surrogate_loss(order=1), leaf, 1)
    return g


def _exact(fn, theta):
    th = theta.clone().requires_grad_(True)
    g, = torch.autograd.grad(fn(th), th)
    return g


def test_mvd_then_score():
    """x ~ Normal(μ, σ) by mvd, b ~ Bernoulli(logits=φx) by score@4 (leave-one-out)."""
    torch.manual_seed(60)
    theta = torch.tensor([0.4, -0.7, 0.9], dtype=torch.float64)  # μ, φ, σ
    mvd = storch.estimator("mvd", plate="x")
    score = storch.estimator("score", plate="b", n_samples=4, baseline="leave_one_out")

    def model(t):
        x = mvd(Normal(t[0], t[2]))
        b = score(Bernoulli(logits=t[1] * x))
        return (b - 0.3) * x + x ** 2 / 2

    def exact(t):
        x = t[0] + t[2] * GH_NODES
        return (GH_WEIGHTS * ((torch.sigmoid(t[1] * x) - 0.3) * x + x ** 2 / 2)).sum()

    print(assert_unbiased(_gradients(theta, model), _exact(exact, theta), "mvd -> score grad (μ, φ, σ)").table())


def test_score_then_mvd():
    """b ~ Bernoulli(logits=φ) by score@1, x ~ Normal(μ + b, σ) by mvd, cost x² + b sin x."""
    torch.manual_seed(61)
    theta = torch.tensor([0.4, 0.3, 0.8], dtype=torch.float64)  # φ, μ, σ
    score = storch.estimator("score", plate="b")
    mvd = storch.estimator("mvd", plate="x")

    def model(t):
        b = score(Bernoulli(logits=t[0]))
        x = mvd(Normal(t[1] + b, t[2]))
        return x ** 2 + b * torch.sin(x)

    def exact(t):
        p1 = torch.sigmoid(t[0])
        e = lambda b: (t[1] + b) ** 2 + t[2] ** 2 + b * torch.sin(t[1] + b) * torch.exp(-t[2] ** 2 / 2)
        return p1 * e(1.0) + (1 - p1) * e(0.0)

    print(assert_unbiased(_gradients(theta, model), _exact(exact, theta), "score -> mvd grad (φ, μ, σ)").table())
