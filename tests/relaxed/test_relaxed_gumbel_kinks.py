"""gumbel_softmax is pathwise for its relaxed objective: a kink on the path from the relaxed sample is refused
from order 2, a jump at order 1, and a smooth cost's derivatives are those of the relaxed objective.

The exact relaxed objective of a binary Concrete node z = σ((θ + L)/τ), L ~ Logistic(0, 1), is
E_L[f(σ((θ + L)/τ))] = ∫ f(σ((θ + l)/τ)) σ(l)σ(-l) dl, computed by Gauss-Legendre quadrature in float64 on
pieces split at l = -θ (z = 1/2, where the costs below have their kink or jump): each piece's integrand is
smooth, and autograd through the θ-dependent limits gives the boundary terms, so its derivatives of every order
are exact (they match central finite differences of the value to 1e-8).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

TAU = 0.7
THETA = 0.3
R = 20000

_X, _W = (torch.as_tensor(a, dtype=torch.float64) for a in np.polynomial.legendre.leggauss(400))


def _gauss_legendre(g, a, b):
    x = (b - a) / 2 * _X + (a + b) / 2
    return ((b - a) / 2 * _W * g(x)).sum()


def relaxed_objective(theta: torch.Tensor, f) -> torch.Tensor:
    """E_L[f(σ((θ + L)/τ))], differentiable in θ (0-dim) at every order."""
    def g(l):
        return f(torch.sigmoid((theta + l) / TAU)) * torch.sigmoid(l) * torch.sigmoid(-l)
    c = -theta
    pieces = [(c - 60, c - 10), (c - 10, c), (c, c + 10), (c + 10, c + 60)]
    return torch.stack([_gauss_legendre(g, a, b) for a, b in pieces]).sum()


def exact_derivatives(f, order: int) -> list[float]:
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    out, d = [], relaxed_objective(theta, f)
    for k in range(order):
        (d,) = torch.autograd.grad(d, theta, create_graph=k + 1 < order)
        out.append(float(d.detach()))
    return out


def storch_derivatives(f, order: int, surrogate_order: int = 0) -> list[torch.Tensor]:
    """Per-replicate derivatives (R, 1), (R, 1, 1) of storch's estimate with a binary Concrete node."""
    est = storch.estimator("gumbel_softmax", plate="b", temperature=TAU)
    with storch.Graph():
        leaf, x = replicate(torch.tensor([THETA], dtype=torch.float64), R)
        z = est(Bernoulli(logits=x))
        storch.add_cost(f(z).sum())
        loss = storch.surrogate_loss(order=surrogate_order or order)
        return per_replicate_derivatives(loss, leaf, order)


def _where(z):
    return torch.where(z > 0.5, z - 0.5, torch.zeros_like(z))


KINKS = {
    "relu": lambda z: F.relu(z - 0.5),
    "abs": lambda z: (z - 0.5).abs(),
    "clamp": lambda z: z.clamp(min=0.5),
    "where mask": _where,
    "mask product": lambda z: (z - 0.5) * (z > 0.5),
}


@pytest.mark.parametrize("kind", sorted(KINKS))
def test_kinked_cost_refused_at_order_2(kind):
    """A kink on the path from the relaxed sample: the order-2 surrogate's Hessian misses the delta of the second
    derivative at z = 1/2, so it is refused. Before the fix (the smoothness walk and the comparison watch ran for
    ``requires_rsample`` estimators only), it was accepted and silently wrong for the relaxed objective:
    θ = 0.3, τ = 0.7, R = 20000 replicates, exact Hessian by the quadrature above:

        relu(z - 0.5):                    exact 0.02164, storch -0.06595 (stderr 0.00053), z = -165
        |z - 0.5|:                        exact 0.05897, storch -0.11592 (stderr 0.00046), z = -383
        z.clamp(min=0.5):                 exact 0.02164, storch -0.06538 (stderr 0.00053), z = -165
        torch.where(z > 0.5, z - 0.5, 0): exact 0.02164, storch -0.06609 (stderr 0.00053), z = -165
        (z - 0.5) * (z > 0.5):            exact 0.02164, storch -0.06545 (stderr 0.00053), z = -164

    (the gradients were right: |z| < 1.2; the smooth costs' Hessians too, |z| < 2). The order-1 gradient stays
    accepted (:func:`test_kink_at_order_1_is_unbiased`)."""
    torch.manual_seed(1)
    with pytest.raises(storch.OrderError, match="gumbel_softmax"):
        storch_derivatives(KINKS[kind], 2)


@pytest.mark.parametrize("kind", ["relu", "where mask"])
def test_kinked_cost_of_a_relaxed_category_refused_at_order_2(kind):
    """The same for a relaxed OneHotCategorical (a point of the simplex), whose node also watches torch's reads
    of its sample as indices: a kink in the graph and a mask in user code are both refused."""
    torch.manual_seed(2)
    est = storch.estimator("gumbel_softmax", plate="z", n_samples=4, temperature=TAU)
    logits = torch.tensor([0.2, -0.4, 0.9], requires_grad=True)
    with storch.Graph():
        z = est(OneHotCategorical(logits=logits))
        storch.add_cost(KINKS[kind](z[..., 0]))
        with pytest.raises(storch.OrderError, match="gumbel_softmax"):
            storch.surrogate_loss(order=2)


def test_jump_refused_at_order_1():
    """A jump on the path (round): the pathwise gradient misses the jump's delta, so the order-1 gradient of the
    relaxed objective is biased. Before the fix it was accepted: for f(z) = round(z) z, θ = 0.3, τ = 0.7, storch's
    gradient 0.1040 (stderr 0.0009, R = 20000) against the exact 0.2273: z = -135."""
    torch.manual_seed(3)
    with pytest.raises(storch.OrderError, match="gumbel_softmax"):
        storch_derivatives(lambda z: torch.round(z) * z, 1)


def test_kink_at_order_1_is_unbiased():
    """A kink is continuous: the order-1 gradient of the relaxed objective is unbiased and accepted; the order-1
    surrogate differentiated twice through it is refused."""
    torch.manual_seed(4)
    f = KINKS["relu"]
    (g,) = storch_derivatives(f, 1)
    assert_unbiased(g, exact_derivatives(f, 1)[0], "relaxed gradient, relu(z - 0.5)")
    with pytest.raises(storch.OrderError):
        storch_derivatives(f, 2, surrogate_order=1)


SMOOTH = {
    "quadratic": lambda z: (z - 0.45) ** 2,
    "softplus": lambda z: 0.1 * F.softplus((z - 0.5) / 0.1),
}


@pytest.mark.parametrize("kind", sorted(SMOOTH))
def test_smooth_cost_relaxed_hessian_unbiased(kind):
    """A smooth cost is accepted at order 2, and the gradient and Hessian are those of the relaxed objective
    (z-tests against the quadrature)."""
    torch.manual_seed(5)
    f = SMOOTH[kind]
    g, h = storch_derivatives(f, 2)
    exact_g, exact_h = exact_derivatives(f, 2)
    assert math.isfinite(exact_h) and abs(exact_h) > 1e-3  # (a Hessian that is not 0: the test can fail)
    assert_unbiased(g, exact_g, f"relaxed gradient, {kind}")
    assert_unbiased(h.reshape(R, 1), exact_h, f"relaxed Hessian, {kind}")


def test_quadrature_matches_finite_differences():
    """The exact values the tests compare with: autograd through the split quadrature agrees with central
    finite differences of its value (the kink's and the jump's boundary terms included)."""
    for f in (KINKS["relu"], KINKS["abs"], lambda z: torch.round(z) * z, SMOOTH["quadratic"]):
        g, h = exact_derivatives(f, 2)
        e = 1e-3
        v = [float(relaxed_objective(torch.tensor(THETA + k * e, dtype=torch.float64), f)) for k in (-1, 0, 1)]
        assert abs((v[2] - v[0]) / (2 * e) - g) < 1e-6
        assert abs((v[2] - 2 * v[1] + v[0]) / e ** 2 - h) < 1e-5
