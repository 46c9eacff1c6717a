"""A sample changed in place after the estimator handed it out is refused with a clear StorchError at the
surrogate (found by porting: score failed only in the backward pass with torch's version-counter error,
expect with "more than one element ... refers to a single memory location"). A pathwise node
(reparameterization) may be changed in place: autograd follows it, and the gradient stays exact."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate


@pytest.mark.parametrize("name", ["score", "arm", "go", "mvd", "rebar", "unordered_set"])
def test_a_sample_changed_in_place_is_refused(name):
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    with storch.Graph():
        b = storch.estimator(name, plate="b", n_samples=2)(Bernoulli(logits=theta))
        b.mul_(2).add_(0.5)
        storch.add_cost(((b - 1.2) ** 2).sum())
        with pytest.raises(storch.StorchError, match=r"samples of node 'b' .* changed in place.*z = z \* 2"):
            storch.surrogate_loss()


def test_expect_says_its_values_are_a_broadcast_view():
    """With a data plate, expect's enumerated values are one view for every data point: torch refuses the
    write, and the message says why; without one, the surrogate refuses the changed samples."""
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(torch.zeros(3, 2), 0, "data")
        b = storch.estimator("expect", plate="b")(Bernoulli(logits=theta + x))
        with pytest.raises(storch.PlateError, match=r"broadcast view.*compute a new tensor"):
            b.mul_(2)
    with storch.Graph():
        b = storch.estimator("expect", plate="b")(Bernoulli(logits=theta))
        b.mul_(2)
        storch.add_cost(b.sum())
        with pytest.raises(storch.StorchError, match=r"samples of node 'b' .* changed in place"):
            storch.surrogate_loss()


def test_a_pathwise_sample_changed_in_place_keeps_its_exact_gradient():
    """x ~ N(μ, 1), x.mul_(2), cost x²: E = 4(μ² + 1), d/dμ = 8μ (z-test over replicates)."""
    torch.manual_seed(0)
    mu = torch.tensor([0.5], dtype=torch.float64)
    with storch.Graph():
        leaf, m = replicate(mu, 2000)
        x = storch.estimator("reparameterization", plate="x", n_samples=2)(Normal(m, 1.0))
        x.mul_(2)
        storch.add_cost((x ** 2).sum())
        (g,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(g, torch.tensor([8 * 0.5], dtype=torch.float64), "reparameterization, in-place x.mul_(2)")
