"""The pre-images a TransformedDistribution's caching transforms keep for the sample storch hands out
(``t.inv(z)`` of a transform with ``cache_size=1`` returns the cached u of z = t(u), log_prob(z) reads it):
a cost of them is walked for kinks and jumps as a cost of z is; and a transform of the user's that keeps its
log|det J| on itself in ``_call`` (pyro's Planar) gives log_prob(z) of the plate tensors, not of the raw draw."""

import pytest
import torch
from torch.distributions import Independent, Normal, TransformedDistribution
from torch.distributions.transforms import AffineTransform, TanhTransform

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

D = torch.float64
R = 2000


# -- a cost of the cached pre-image: the same smoothness refusals as a cost of the sample ----------------------


def _pre_image_cost(t, cost, order):
    mu = torch.tensor(0.3, dtype=D, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(TransformedDistribution(Normal(mu, 1.0), [t]))
        x = t.inv(z)  # the cached pre-image (no inversion: storch keyed the cache to z)
        storch.add_cost(cost(x), name="c")
        return storch.surrogate_loss(order=order)


_TRANSFORMS = [lambda: AffineTransform(0.5, 1.0, cache_size=1), lambda: TanhTransform(cache_size=1)]


@pytest.mark.parametrize("make", _TRANSFORMS, ids=["affine", "tanh"])
def test_a_jump_of_the_cached_pre_image_is_refused_at_order_1(make):
    """round(t.inv(z)) + t.inv(z): its pathwise gradient was 1 where d/dmu E = 2 (accepted: the walk of the
    cost's graph started only from z, which the cached u is upstream of)."""
    with pytest.raises(storch.OrderError, match=r"pre-image u of z = t\(u\).*RoundBackward0"):
        _pre_image_cost(make(), lambda x: torch.round(x) + x, 1)


@pytest.mark.parametrize("make", _TRANSFORMS, ids=["affine", "tanh"])
@pytest.mark.parametrize("cost", [torch.relu, lambda x: torch.where(x > 0, x, 0.0)], ids=["relu", "where"])
def test_a_kink_of_the_cached_pre_image_is_refused_at_order_2(make, cost):
    """relu(t.inv(z)) had a Hessian of exactly 0 where the exact one is phi(0.3) = 0.381; the mask of
    torch.where(u > 0, u, 0) (a comparison of u, which the watch of comparisons did not count) too."""
    with pytest.raises(storch.OrderError):
        _pre_image_cost(make(), cost, 2)


def test_a_kink_of_the_cached_pre_image_at_order_1_refuses_a_second_derivative():
    """Order 1 of relu(t.inv(z)) is unbiased; its cost is hooked against a second derivative, as relu(z) is."""
    mu = torch.tensor(0.3, dtype=D, requires_grad=True)
    t = AffineTransform(0.5, 1.0, cache_size=1)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(TransformedDistribution(Normal(mu, 1.0), [t]))
        storch.add_cost(torch.relu(t.inv(z)), name="c")
        loss = storch.surrogate_loss()
        with pytest.raises(storch.OrderError, match="has a kink on the path .*ReluBackward0"):
            torch.autograd.grad(loss, mu, create_graph=True)


def test_a_smooth_cost_of_the_cached_pre_image_stays_accepted_and_unbiased():
    """E[u^3 + u^2 + 0.5 z] for u ~ N(mu, 1), z = 0.5 + u: gradient 3 mu^2 + 3 + 2 mu + 0.5, Hessian 6 mu + 2
    (z-tests over R replicates at order 2)."""
    torch.manual_seed(0)
    mu0 = torch.tensor([0.3], dtype=D)
    t = AffineTransform(0.5, 1.0, cache_size=1)
    with storch.Graph():
        leaf, mu = replicate(mu0, R)
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(
            TransformedDistribution(Normal(mu[0], 1.0), [t]))
        u = t.inv(z)
        storch.add_cost(u ** 3 + u ** 2 + 0.5 * z, name="c")
        g, h = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)
    m = mu0.item()
    assert_unbiased(g, torch.tensor([3 * m * m + 3 + 2 * m + 0.5], dtype=D), "gradient")
    assert_unbiased(h, torch.tensor([[6 * m + 2]], dtype=D), "Hessian")
