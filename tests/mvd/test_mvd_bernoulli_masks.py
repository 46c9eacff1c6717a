"""mvd on Bernoulli entries whose probability is exactly 0 or 1 (action masking), per entry.

p⁺ = δ₁ at θ = 0 (and p⁻ = δ₀ at θ = 1) handed the impossible value to the cost: a cost that is +inf there
(a log-policy that forbids it, an environment that fails) raised NonFiniteCostError, and a finite penalty
was evaluated for nothing. The slot is now inactive (weight 0, holding the possible value) with c = 0."""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import assert_unbiased

from _helpers import estimates, exact_grad

# per entry: 0 free, -1 impossible 1 (logit −∞ / probs 0), +1 certain (logit +∞ / probs 1); rows differ
MASK = torch.tensor([[0, -1, 0, 1], [1, 0, -1, 0], [0, 0, 0, -1]])
W = torch.tensor([1.0, 2.0, -1.5, 0.5])


def _cost(x):
    """Not additive over a row's bits; +inf at every value of probability 0; summed over the rows."""
    w = W.to(x.dtype)
    base = ((x * w).sum(-1) - 0.7) ** 2 + 0.3 * x[..., 0] * x[..., 2]
    mask = MASK.to(x.device)
    bad = ((x > 0.5) & (mask == -1)) | ((x < 0.5) & (mask == 1))
    return torch.where(bad.any(-1), torch.full_like(base, math.inf), base).sum(-1)


def _probs(t):
    """The probabilities as a float64 function of the free parameters (exact side)."""
    return torch.where(MASK == 1, 1.0, torch.where(MASK == -1, 0.0, torch.sigmoid(t)))


def _exact(t):
    p = _probs(t)
    total = 0.0
    for r in range(MASK.shape[0]):
        for bits in itertools.product([0.0, 1.0], repeat=MASK.shape[1]):
            x = torch.tensor(bits, dtype=t.dtype)
            prob = torch.prod(torch.where(x > 0.5, p[r], 1 - p[r]))
            if float(prob.detach()) > 0:
                base = ((x * W.to(t.dtype)).sum() - 0.7) ** 2 + 0.3 * x[0] * x[2]
                total = total + prob * base
    return total


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("param", ["logits", "probs"])
def test_bernoulli_with_impossible_and_certain_values_against_enumeration(param, dtype):
    """Masks per entry (logits ±∞, or probs · mask with probs exactly 0 and 1): the cost never sees an
    impossible value although it is +inf there, every estimate is finite, the masked entries' derivatives
    are exactly 0, and gradient and forward value match exact enumeration (z-test)."""
    torch.manual_seed(71)
    theta = torch.tensor([[0.3, -0.8, 1.1, 0.2], [-0.4, 0.6, 0.1, -1.2], [0.9, -0.3, 0.5, 0.7]], dtype=dtype)
    est = storch.estimator("mvd", plate="b")
    seen = []
    mask = MASK

    def dist(t):
        if param == "logits":
            inf = torch.tensor(math.inf, dtype=dtype)
            return Bernoulli(logits=t + torch.where(mask == 1, inf, torch.where(mask == -1, -inf, 0.0 * inf.new_ones(()))))
        keep = (mask == 0).to(dtype)
        return Bernoulli(probs=torch.sigmoid(t) * keep + (mask == 1).to(dtype))

    def model(t):
        x = est(dist(t))
        seen.append(x.tensor.detach())
        return _cost(x)

    g, v = estimates(theta, model, 3000)
    x = seen[0]
    assert not (((x > 0.5) & (mask == -1)) | ((x < 0.5) & (mask == 1))).any(), "the cost saw an impossible value"
    assert torch.isfinite(g).all() and torch.isfinite(v).all()
    masked = (mask != 0).reshape(-1)
    assert (g[:, masked] == 0).all()
    value, grad = exact_grad(_exact, theta.double())
    name = f"mvd Bernoulli({param}) masked, {dtype}"
    print(assert_unbiased(g[:, ~masked].double(), grad[~masked], f"{name} grad").table())
    print(assert_unbiased(v.double(), value, f"{name} forward value").table())


def test_bernoulli_probs_on_the_boundary_are_not_differentiated():
    """probs = θ exactly 0 or 1, a parameter on its boundary: the one-sided derivative f(1) − f(0) would need
    the cost at the impossible value; it is not estimated (exactly 0, documented), and the cost is never
    evaluated there. The free entry beside them is unbiased."""
    torch.manual_seed(72)
    theta = torch.tensor([0.0, 0.35, 1.0], dtype=torch.float64)
    est = storch.estimator("mvd", plate="b")
    seen = []

    def model(t):
        x = est(Bernoulli(probs=t))
        seen.append(x.tensor.detach())
        bad = (x[..., 0] > 0.5) | (x[..., 2] < 0.5)
        return torch.where(bad, math.inf, (x[..., 0] + 2 * x[..., 1] * x[..., 2] - 0.4) ** 2)

    g, v = estimates(theta, model, 2000)
    assert (seen[0][..., 0] == 0).all() and (seen[0][..., 2] == 1).all()
    assert (g[:, 0] == 0).all() and (g[:, 2] == 0).all()
    value, grad = exact_grad(lambda t: t[1] * (2 - 0.4) ** 2 + (1 - t[1]) * 0.4 ** 2, theta)
    print(assert_unbiased(g[:, 1], grad[1], "mvd Bernoulli probs beside the boundary").table())
    print(assert_unbiased(v, value, "mvd Bernoulli probs on the boundary, forward value").table())
