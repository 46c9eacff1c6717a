"""A distribution built from plate tensors is sampled with all of its constructor arguments.

storch samples such a distribution from a raw copy rebuilt from its ``arg_constraints`` parameters;
the copy of ``Multinomial(total_count=n, logits=<plate tensor>)`` used to take ``total_count=1`` (its
default), so the samples were one-hot, the loss and the gradient silently wrong (z = 354 against
exact enumeration). Here: z-tests of the score estimator with leave-one-out against exact
enumeration, for logits on a data plate and on an upstream sample's plate, n = 3, 4, 5.
"""

import itertools

import pytest
import torch
from torch.distributions import Bernoulli, Multinomial

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

D = torch.float64
R = 1500
X = torch.tensor([[0.5, -1.0], [1.5, 0.3]], dtype=D)  # two data points, two features
W = torch.tensor([[0.4, -0.3, 0.2], [0.1, 0.5, -0.6]], dtype=D)  # logits = x @ W, three categories


def _cost(c):
    return (c[..., 0] - 2.0) ** 2 + c[..., 1]


def _counts(n):
    return torch.tensor([c for c in itertools.product(range(n + 1), repeat=3) if sum(c) == n], dtype=D)


def _exact_data(w, n):
    """E over the two data points (mean) of E_{c ~ Multinomial(n, x_b W)} cost(c), in plain torch."""
    c = _counts(n)
    return torch.stack([(Multinomial(n, logits=x @ w).log_prob(c).exp() * _cost(c)).sum() for x in X]).mean()


@pytest.mark.parametrize("n", [3, 4, 5])
def test_multinomial_with_logits_on_a_data_plate_is_unbiased(n):
    torch.manual_seed(n)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")
    with storch.Graph():
        leaf, w = replicate(W, R)
        x = storch.denote_independent(X, 0, "data")
        z = est(Multinomial(total_count=n, logits=x @ w))
        assert (z.tensor.sum(-1) == n).all()  # every draw has n trials (it had 1)
        storch.add_cost(_cost(z))
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    exact = torch.autograd.functional.jacobian(lambda v: _exact_data(v.view(2, 3), n), W.reshape(-1))
    assert_unbiased(g, exact, f"gradient, Multinomial({n}) on a data plate")


A = torch.tensor([0.3, -0.2, 0.6], dtype=D)  # z1 ~ Bernoulli(sigmoid(theta[0])); logits = theta[1:] * (1 + z1)


def _exact_chain(theta, n):
    c = _counts(n)
    total = 0
    for z1 in (0.0, 1.0):
        p1 = torch.sigmoid(theta[0]) if z1 else 1 - torch.sigmoid(theta[0])
        logits = torch.cat([theta[1:] * (1 + z1), torch.zeros(1, dtype=D)])
        total = total + p1 * (Multinomial(n, logits=logits).log_prob(c).exp() * (_cost(c) + z1)).sum()
    return total


@pytest.mark.parametrize("n", [3, 5])
def test_multinomial_with_logits_on_an_upstream_sample_plate_is_unbiased(n):
    torch.manual_seed(10 + n)
    first = storch.estimator("score", plate="z1", n_samples=3, baseline="leave_one_out")
    second = storch.estimator("score", plate="z2", n_samples=4, baseline="leave_one_out")
    with storch.Graph():
        leaf, th = replicate(A, R)
        z1 = first(Bernoulli(logits=th[..., 0]))
        logits = torch.cat([th[..., 1:] * (1 + z1.unsqueeze(-1)), torch.zeros(1, dtype=D)], -1)
        z2 = second(Multinomial(total_count=n, logits=logits))
        assert (z2.tensor.sum(-1) == n).all()
        storch.add_cost(_cost(z2) + z1)
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    exact = torch.autograd.functional.jacobian(lambda v: _exact_chain(v, n), A.clone())
    assert_unbiased(g, exact, f"gradient, Multinomial({n}) on a sample plate")
