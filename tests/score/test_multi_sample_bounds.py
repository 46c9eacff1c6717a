"""A multi-sample bound (IWAE, Burda et al. 2016) written as storch can differentiate it: the K draws of the
bound are ONE sample of the joint distribution q(z)^K (``Independent(q.expand((K, ...)), ...)``), and the
bound, a function of all K, is that sample's cost. The cost may depend on θ directly (log w = log p - log q).
Reduced by hand over a sample plate instead (``f.tensor.logsumexp(0)``), the bound leaves storch's plates and
the score-function term is lost (tests/all/test_unused_samples.py: storch warns).

z-tests against exact enumeration of the 2^(K·D) joint values, at orders 1 and 2 (score's max_order is
unbounded), with one joint sample, with leave-one-out over 4 joint samples, and with ``expect`` (exact).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from torch.distributions import Bernoulli, Independent

import storch

K, D = 3, 2
THETA = torch.tensor([0.3, -0.5], dtype=torch.float64)
PRIOR = torch.tensor([0.1, 0.4], dtype=torch.float64)
LIKELIHOOD = torch.tensor([1.0, -2.0], dtype=torch.float64)  # log p(x | z) = z · LIKELIHOOD


def joint(theta: torch.Tensor) -> Bernoulli:
    """K independent draws of q(z) = Bernoulli(σ(θ))^D: one sample of per-sample shape (K, D)."""
    return Bernoulli(logits=theta.expand(K, D))


def negative_bound(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """-log (1/K Σ_k w_k), w_k = p(x, z_k) / q(z_k); z (..., K, D) -> (...)."""
    log_w = (Bernoulli(logits=PRIOR).log_prob(z).sum(-1) + (z * LIKELIHOOD).sum(-1)
             - Bernoulli(logits=theta.unsqueeze(-2)).log_prob(z).sum(-1))
    return -(torch.logsumexp(log_w, -1) - math.log(K))


def exact(order: int) -> list[torch.Tensor]:
    theta = THETA.clone().requires_grad_(True)
    values = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K * D)), dtype=torch.float64).view(-1, K, D)
    f = (Independent(joint(theta), 2).log_prob(values).exp() * negative_bound(values, theta)).sum()
    (g,) = torch.autograd.grad(f, theta, create_graph=True)
    out = [g.detach()]
    if order >= 2:
        out.append(torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(D)]))
    return out


@pytest.mark.parametrize("name,options,replicates", [
    ("score", dict(n_samples=1), 6000),
    ("score", dict(n_samples=4, baseline="leave_one_out"), 3000),
    ("expect", {}, 50),
])
def test_the_bound_as_one_joint_sample_is_unbiased_at_orders_1_and_2(name, options, replicates):
    torch.manual_seed(0)
    with storch.Graph():
        leaf, theta = replicate(THETA, replicates)
        z = storch.estimator(name, plate="z", **options)(joint(theta))
        assert z.shape == (K, D)  # one sample: all K draws of the bound
        storch.add_cost(negative_bound(z, theta), name="negative_bound")
        got = per_replicate_derivatives(storch.surrogate_loss(), leaf, 2)
    want = exact(2)
    assert_unbiased(got[0], want[0], f"{name} {options}: gradient of the IWAE bound")
    assert_unbiased(got[1].reshape(replicates, -1), want[1].reshape(-1), f"{name} {options}: hessian of the bound")
    if name == "expect":  # exact: no spread at all
        torch.testing.assert_close(got[0][0], want[0])
