"""Test problems for the score family, with exact values computed by enumeration in plain torch.

Each problem has a parameter vector θ (float64), ``model(th, make)`` that builds the stochastic
graph for one replicate (``make(plate, problem)`` returns the estimator of a node), and ``exact(θ)``,
the expected total cost written with plain torch (no storch), so that its derivatives are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch
from storch.testing import per_replicate_derivatives, replicate

torch.set_default_dtype(torch.float64)

# -- one categorical node, K = 5 -------------------------------------------------------------------

CAT_C = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])
CAT_THETA = torch.tensor([0.3, -0.5, 0.8, 0.1, -1.2])


def cat_model(th, make):
    z = make("z", Categorical(logits=th))
    storch.add_cost(F.one_hot(z, 5).to(th.dtype) @ CAT_C, name="c")


def cat_exact(theta):
    return torch.softmax(theta, -1) @ CAT_C


# -- a two-node chain: z2's distribution depends on z1, the cost depends on θ directly ----------

CH_W = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0], [-1.5, 0.5, 1.0]])
CH_V = torch.tensor([1.0, 2.0, -1.0])
CH_U = torch.tensor([0.5, -1.0, 2.0])
CH_THETA = torch.tensor([0.2, -0.4, 0.5, 0.7, 0.3])  # logits of z1 (3), scale of z2's logits, φ


def _chain_cost(z1_onehot, z2_onehot, phi):
    v = z2_onehot @ CH_V
    return (v + phi * (z1_onehot @ CH_U)) ** 2 + torch.sin(phi) * v


def chain_model(th, make):
    z1 = make("z1", OneHotCategorical(logits=th[:3]))
    z2 = make("z2", Categorical(logits=th[3] * (z1 @ CH_W)))
    storch.add_cost(_chain_cost(z1, F.one_hot(z2, 3).to(th.dtype), th[4]), name="chain")


def chain_exact(theta):
    p1 = torch.softmax(theta[:3], -1)
    eye = torch.eye(3)
    total = 0.0
    for i in range(3):
        p2 = torch.softmax(theta[3] * (eye[i] @ CH_W), -1)
        for j in range(3):
            total = total + p1[i] * p2[j] * _chain_cost(eye[i], eye[j], theta[4])
    return total


# -- a data plate, a Bernoulli node with batch shape (2,), two costs (one without the sample) ------

PL_X = torch.tensor([-1.0, 0.5, 2.0])
PL_SIGN = torch.tensor([1.0, -1.0])
PL_THETA = torch.tensor([0.4, -0.6])


def plate_model(th, make):
    x = storch.denote_independent(PL_X, 0, "data")
    b = make("b", Bernoulli(logits=th[0] + th[1] * x * PL_SIGN))
    storch.add_cost(((b - torch.sigmoid(x) * PL_SIGN.abs()) ** 2).sum() + b[0] * b[1] * x, name="fit")
    storch.add_cost((th[0] * x - 1.0) ** 2 + th[1] ** 2, name="prior")  # no sample in this cost


def plate_exact(theta):
    total = 0.0
    for x in PL_X:
        p = torch.sigmoid(theta[0] + theta[1] * x * PL_SIGN)
        target = torch.sigmoid(x)
        e = 0.0
        for b0 in (0.0, 1.0):
            for b1 in (0.0, 1.0):
                prob = (p[0] if b0 else 1 - p[0]) * (p[1] if b1 else 1 - p[1])
                e = e + prob * ((b0 - target) ** 2 + (b1 - target) ** 2 + b0 * b1 * x)
        total = total + e + (theta[0] * x - 1.0) ** 2 + theta[1] ** 2
    return total / len(PL_X)


PROBLEMS = {
    "categorical": (cat_model, cat_exact, CAT_THETA),
    "chain": (chain_model, chain_exact, CH_THETA),
    "plate": (plate_model, plate_exact, PL_THETA),
}


# -- exact derivatives and storch estimates --------------------------------------------------------

def exact_derivatives(fn, theta, order):
    """[∇f, ∇²f, ∇(∇²f·1)] at θ, as per_replicate_derivatives returns them (one replicate)."""
    t = theta.clone().requires_grad_(True)
    g = torch.autograd.grad(fn(t), t, create_graph=True)[0]
    out = [g.detach()]
    if order >= 2:
        h = torch.stack([torch.autograd.grad(g[i], t, create_graph=True)[0] for i in range(len(t))])
        out.append(h.detach())
        if order >= 3:
            hv = h.sum(-1)
            out.append(torch.stack([torch.autograd.grad(hv[i], t, retain_graph=True)[0] for i in range(len(t))]))
    return out


class Maker:
    """``make(plate, distribution)``: the estimator ``name`` with ``options`` for each plate, created
    once and reused across steps (as a user does)."""

    def __init__(self, name, **options):
        self.name, self.options, self.estimators = name, options, {}

    def __call__(self, plate, distribution):
        if plate not in self.estimators:
            self.estimators[plate] = storch.estimator(self.name, plate=plate, **self.options)
        return self.estimators[plate](distribution)


def estimates(problem, make, order, replicates=4000, steps=1):
    """Per-replicate derivative estimates of orders 1..order (``steps`` - 1 warm-up steps first).

    A warm-up step is a training step (``storch.backward()``, which updates moving averages and
    learned baselines); the measured step is an evaluation (``surrogate_loss``, which changes nothing).
    """
    model, _, theta = PROBLEMS[problem]
    return derivative_estimates(model, theta, make, order, replicates, steps)


def derivative_estimates(model, theta, make, order, replicates, steps=1):
    """:func:`estimates` for a model ``model(th, make)`` of parameters ``theta`` (any problem table)."""
    for _ in range(steps - 1):
        with storch.Graph():
            _, th = replicate(theta, replicates)
            model(th, make)
            storch.backward()
    with storch.Graph():
        leaf, th = replicate(theta, replicates)
        model(th, make)
        return per_replicate_derivatives(storch.surrogate_loss(order=order), leaf, order)


def exact(problem, order):
    _, fn, theta = PROBLEMS[problem]
    return exact_derivatives(fn, theta, order)


def gradient_variance(estimates_: torch.Tensor) -> float:
    """Total variance (trace of the covariance) of per-replicate gradient estimates."""
    return float(estimates_.var(0).sum())


__all__ = ["PROBLEMS", "Maker", "derivative_estimates", "estimates", "exact", "exact_derivatives", "gradient_variance"]
