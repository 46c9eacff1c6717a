"""Test problems for the relaxed family, with exact values by enumeration / closed form.

Every problem builds its model for R replicates (``storch.testing.replicate``) with a fresh
estimator per stochastic node, and knows its exact expected cost as a differentiable function
of θ, so exact gradients and Hessians come from autograd on the exact function.
"""

from __future__ import annotations

import itertools

import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical, Poisson

import storch
from storch.testing import per_replicate_derivatives, replicate

R = 4000  # independent estimates per z-test (>= 2000)

TOY_THETA = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
CAT_THETA = torch.tensor([0.2, -0.4, 0.9, 0.0, -1.1], dtype=torch.float64)
CAT_VALUES = torch.arange(5, dtype=torch.float64)  # category k has value k
CHAIN_THETA = torch.tensor([0.4, -0.3, -0.2, 0.6], dtype=torch.float64)
NORMAL_THETA = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64)
POISSON_THETA = torch.tensor([0.2, -0.3, 0.7], dtype=torch.float64)


# -- the REBAR toy: E[Σ_j (b_j - t)^2], b_j ~ Bernoulli(σ(θ_j)) independently ---------------------

def toy_exact(theta: torch.Tensor, t: float = 0.45) -> torch.Tensor:
    p = torch.sigmoid(theta)
    return (p * (1 - t) ** 2 + (1 - p) * t ** 2).sum()


def toy_model(est, x, t: float = 0.45) -> None:
    b = est(Bernoulli(logits=x))
    storch.add_cost(((b - t) ** 2).sum())


# -- K = 5 categorical: E[(v_x - 1.7)^2], x ~ Categorical(softmax(θ)), v_k = k --------------------

def cat_exact(theta: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(theta, -1) * (CAT_VALUES - 1.7) ** 2).sum()


def cat_model(est, x, kind: str = "categorical") -> None:
    if kind == "onehot":
        z = est(OneHotCategorical(logits=x))
        v = (z * CAT_VALUES).sum(-1)
    else:
        z = est(Categorical(logits=x))
        # relaxations (rebar with categorical="one_hot") hand out one-hot vectors for Categorical; others an index
        v = (z * CAT_VALUES).sum(-1) if z.dim() == 1 else z.to(torch.float64)
    storch.add_cost((v - 1.7) ** 2)


# -- two-node chain: b1 ~ Bern(σ(θ[:2])), b2 ~ Bern(σ(θ[2:] + 1.5 b1 - 0.5)); two costs -----------

def _chain_cost1(b1):
    return ((b1 - 0.45) ** 2).sum(-1)


def _chain_cost2(b1, b2):
    return ((b2 - 0.3 * b1 - 0.2) ** 2).sum(-1)


def chain_exact(theta: torch.Tensor) -> torch.Tensor:
    total = theta.new_zeros(())
    for v1 in itertools.product([0.0, 1.0], repeat=2):
        b1 = theta.new_tensor(v1)
        p1 = Bernoulli(logits=theta[:2]).log_prob(b1).sum().exp()
        for v2 in itertools.product([0.0, 1.0], repeat=2):
            b2 = theta.new_tensor(v2)
            p2 = Bernoulli(logits=theta[2:] + 1.5 * b1 - 0.5).log_prob(b2).sum().exp()
            total = total + p1 * p2 * (_chain_cost1(b1) + _chain_cost2(b1, b2))
    return total


def chain_model(est1, est2, x) -> None:
    b1 = est1(Bernoulli(logits=x[:2]))
    b2 = est2(Bernoulli(logits=x[2:] + 1.5 * b1 - 0.5))
    storch.add_cost(_chain_cost1(b1), name="first")
    storch.add_cost(_chain_cost2(b1, b2), name="second")


# -- a decoder on the toy: E[Σ (W2 act(W1 b + c1) - y)^2], b ~ Bernoulli(σ(θ)) (3 units, 8 outcomes) ------
# The relaxed estimators differentiate it at σ_λ(z): n times differentiable for tanh / softplus, not for ReLU.

_DEC = torch.Generator().manual_seed(7)
DEC_W1 = torch.randn(4, 3, generator=_DEC, dtype=torch.float64)
DEC_C1 = torch.randn(4, generator=_DEC, dtype=torch.float64) * 0.5
DEC_W2 = torch.randn(2, 4, generator=_DEC, dtype=torch.float64)
DEC_Y = torch.tensor([0.5, -0.3], dtype=torch.float64)


def decoder_cost(b, act):
    h = act((DEC_W1 * b.unsqueeze(-2)).sum(-1) + DEC_C1)
    return (((DEC_W2 * h.unsqueeze(-2)).sum(-1) - DEC_Y) ** 2).sum(-1)


def decoder_exact(theta: torch.Tensor, act) -> torch.Tensor:
    total = theta.new_zeros(())
    for v in itertools.product([0.0, 1.0], repeat=3):
        b = theta.new_tensor(v)
        total = total + Bernoulli(logits=theta).log_prob(b).sum().exp() * decoder_cost(b, act)
    return total


def decoder_model(est, x, act) -> None:
    storch.add_cost(decoder_cost(est(Bernoulli(logits=x)), act), name="rec")


# -- continuous problems for LAX ---------------------------------------------------------------

def normal_exact(theta: torch.Tensor) -> torch.Tensor:
    return ((theta - 0.45) ** 2 + 1.0).sum()


def normal_model(est, x) -> None:
    y = est(Normal(x, 1.0))
    storch.add_cost(((y - 0.45) ** 2).sum())


# LAX's textbook toy (Grathwohl et al. 2018): E[(x - 0.5)^2 / 2], x ~ Normal(θ0, exp θ1) = ((θ0 - 0.5)^2 + e^{2θ1}) / 2
SCALE_THETA = torch.tensor([0.3, -0.5], dtype=torch.float64)


def normal_scale_exact(theta: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((theta[0] - 0.5) ** 2 + (2 * theta[1]).exp())


def normal_scale_model(est, x) -> None:
    y = est(Normal(x[0], x[1].exp()))
    storch.add_cost(0.5 * (y - 0.5) ** 2)


def normal_chain_exact(theta: torch.Tensor) -> torch.Tensor:
    m1, m2 = theta[:2], theta[2:]
    first = ((m1 - 0.45) ** 2 + 1.0).sum()
    second = ((m2 + 0.5 * m1 - 0.2) ** 2 + 1.25).sum()  # Var(x2) = 1 + 0.25 Var(x1)
    return first + second


def normal_chain_model(est1, est2, x) -> None:
    y1 = est1(Normal(x[:2], 1.0))
    y2 = est2(Normal(x[2:] + 0.5 * y1, 1.0))
    storch.add_cost(((y1 - 0.45) ** 2).sum())
    storch.add_cost(((y2 - 0.2) ** 2).sum())


# -- Poisson for GO: E[Σ (k - 1.7)^2], k ~ Poisson(exp θ) = Σ λ + (λ - 1.7)^2 ------------------------

def poisson_exact(theta: torch.Tensor) -> torch.Tensor:
    lam = theta.exp()
    return (lam + (lam - 1.7) ** 2).sum()


def poisson_model(est, x) -> None:
    k = est(Poisson(x.exp()))
    storch.add_cost(((k - 1.7) ** 2).sum())


# -- running them -------------------------------------------------------------------------------

def exact_derivatives(fn, theta: torch.Tensor, order: int) -> list[torch.Tensor]:
    """Exact gradient (and Hessian) of ``fn`` at θ by autograd on the exact expectation."""
    g = torch.autograd.functional.jacobian(fn, theta)
    out = [g]
    if order >= 2:
        out.append(torch.autograd.functional.hessian(fn, theta))
    return out


def estimates(model, theta: torch.Tensor, order: int, n: int = R) -> list[torch.Tensor]:
    """Per-replicate derivative estimates (orders 1..order) of ``model(x)`` built on n replicates."""
    with storch.Graph():
        leaf, x = replicate(theta, n)
        model(x)
        loss = storch.surrogate_loss(order=order)
        return per_replicate_derivatives(loss, leaf, order)


def score_at_1(theta: torch.Tensor, t: float, n: int = R) -> torch.Tensor:
    """Plain score@1 on the toy, written by hand: f(b) ∇_θ log p(b) = f(b) (b - σ(θ))."""
    p = torch.sigmoid(theta).expand(n, -1)
    b = torch.bernoulli(p)
    f = ((b - t) ** 2).sum(-1, keepdim=True)
    return f * (b - p)
