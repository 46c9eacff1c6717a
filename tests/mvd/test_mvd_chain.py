"""mvd chained with core's `expect` in one graph, in both orders."""

import numpy as np
import torch
from torch.distributions import Bernoulli, Normal

import storch
from storch.testing import assert_unbiased

from _helpers import estimates, exact_grad


def test_expect_then_mvd():
    """b ~ Bernoulli(logits=φ) (expect), x ~ Normal(μ + b, σ) (mvd), cost x² + b sin x."""
    torch.manual_seed(20)
    theta = torch.tensor([0.4, 0.3, 0.8], dtype=torch.float64)  # φ, μ, σ
    enum, mvd = storch.estimator("expect", plate="b"), storch.estimator("mvd", plate="x")

    def model(t):
        b = enum(Bernoulli(logits=t[0]))
        x = mvd(Normal(t[1] + b, t[2]))
        return x ** 2 + b * torch.sin(x)

    def exact(t):
        p1 = torch.sigmoid(t[0])
        e = lambda b: (t[1] + b) ** 2 + t[2] ** 2 + b * torch.sin(t[1] + b) * torch.exp(-t[2] ** 2 / 2)
        return p1 * e(1.0) + (1 - p1) * e(0.0)

    g, v = estimates(theta, model, 3000)
    value, grad = exact_grad(exact, theta)
    print(assert_unbiased(g, grad, "expect -> mvd grad (φ, μ, σ)").table())
    print(assert_unbiased(v, value, "expect -> mvd forward value").table())


def test_mvd_then_expect():
    """x ~ Normal(μ, σ) (mvd), b ~ Bernoulli(logits=φ x) (expect), cost (b − 0.3) x + x²/2."""
    torch.manual_seed(21)
    theta = torch.tensor([0.4, -0.2, 0.9], dtype=torch.float64)  # μ, φ, σ
    mvd, enum = storch.estimator("mvd", plate="x"), storch.estimator("expect", plate="b")

    def model(t):
        x = mvd(Normal(t[0], t[2]))
        b = enum(Bernoulli(logits=t[1] * x))
        return (b - 0.3) * x + x ** 2 / 2

    nodes, weights = np.polynomial.hermite_e.hermegauss(80)  # ∫ g(t) φ(t) dt ≈ Σ w g / √(2π)
    nodes = torch.tensor(nodes, dtype=torch.float64)
    weights = torch.tensor(weights / np.sqrt(2 * np.pi), dtype=torch.float64)

    def exact(t):
        x = t[0] + t[2] * nodes
        return (weights * ((torch.sigmoid(t[1] * x) - 0.3) * x + x ** 2 / 2)).sum()

    g, v = estimates(theta, model, 3000)
    value, grad = exact_grad(exact, theta)
    print(assert_unbiased(g, grad, "mvd -> expect grad (μ, φ, σ)").table())
    print(assert_unbiased(v, value, "mvd -> expect forward value").table())
