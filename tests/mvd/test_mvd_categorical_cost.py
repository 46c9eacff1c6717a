"""mvd on a Categorical of many categories: O(K log K) per element and replicate, no (K, *batch, K)
tensor (p⁻_k = p(· | x ≠ k) was drawn from a masked (K, *batch, K) probability tensor and ratio_sum masked a
(2nK, *batch, K) one-hot: at K 2000, B 8, n 4 a step took 3 s and 2.5 GB), the draws' law, and z-tests
against exact enumeration at many categories, masked ones included."""

import math

import pytest
import torch
from torch.distributions import Categorical, OneHotCategorical

import storch
from path_probes import Allocations
from storch.testing import assert_unbiased

from _helpers import estimates, exact_grad


def test_many_categories_make_no_k_by_k_tensor():
    """3 elements of 400 categories, 2 replicates: the largest tensor of the whole step (sampling, surrogate,
    backward) is the evaluation points themselves, (n · 2K · 3, 3) = 14400 elements; the old decomposition made
    a (n, K, 2, 3, K) one-hot of 1.9M (and a (K, 3, K) masked probability tensor). The draws of p(· | x ≠ k)
    are a binary search (torch.searchsorted)."""
    torch.manual_seed(20)
    k, n, e = 400, 2, 3
    logits = torch.randn(e, k, requires_grad=True)
    est = storch.estimator("mvd", plate="z", n_samples=n)
    with Allocations() as spy:
        with storch.Graph():
            z = est(Categorical(logits=logits))
            storch.add_cost((z.double() - 7.0).pow(2).sum())
            g, = torch.autograd.grad(storch.surrogate_loss(), logits)
    assert torch.isfinite(g).all()
    assert "searchsorted" in spy.names
    assert spy.largest_storage <= n * 2 * k * e * e < k * k, spy.largest_storage


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_draws_without_k_have_the_law_of_p_given_not_k(dtype):
    """Each entry [..., k] of _draw_without is a draw of p(m | x ≠ k) = p_m / (1 − p_k): z-tested per (row, k,
    m) with zero-probability categories (exactly never drawn), never k itself; and entries k = 0 and k = 1 are
    independent (their joint frequencies z-tested against the product: a common x₀ ~ p with y_k = x₀ unless
    x₀ = k couples them)."""
    from storch_mvd.decompositions.categorical import _draw_without

    torch.manual_seed(21)
    p = torch.tensor([[0.1, 0.0, 0.45, 0.05, 0.3, 0.1], [0.02, 0.5, 0.0, 0.0, 0.18, 0.3]], dtype=dtype)
    k, r = p.shape[-1], 40000
    y = _draw_without(p, r)  # (r, 2, K)
    assert y.shape == (r, 2, k)
    freq = torch.nn.functional.one_hot(y, k).double()  # (r, 2, K drawn-without, K category)
    cond = p.double().unsqueeze(-2).expand(2, k, k).clone()
    cond.diagonal(dim1=-2, dim2=-1).zero_()
    cond = cond / cond.sum(-1, keepdim=True)
    print(assert_unbiased(freq.reshape(r, -1), cond.reshape(-1), f"p(. | x != k), {dtype}").table())
    joint = (freq[:, :, 0, :, None] * freq[:, :, 1, None, :]).reshape(r, -1)  # P(y_0 = a, y_1 = b) per row
    print(assert_unbiased(joint, (cond[:, 0, :, None] * cond[:, 1, None, :]).reshape(-1), "y_0, y_1 independent").table())


def f_many(z):  # categories of 2 elements, non-separable
    return torch.sin(0.21 * z[0] * z[1] + 0.2) + 0.01 * (z[0] - 9.0) ** 2


@pytest.mark.parametrize("onehot", [False, True])
def test_many_categories_against_enumeration(onehot):
    """2 elements of 24 categories, a few masked (−∞ logits), float32: gradient and forward value of mvd
    (order 1, its max_order) z-tested against enumeration of the 24² outcomes."""
    torch.manual_seed(22)
    k = 24
    theta = torch.randn(2, k) * 1.2
    allowed = torch.ones(2, k, dtype=torch.bool)
    allowed[0, [3, 10, 11]] = False
    allowed[1, [0, 23]] = False
    est = storch.estimator("mvd", plate="z", n_samples=2)
    idx = torch.arange(k, dtype=torch.float32)

    def model(t):
        d = (OneHotCategorical if onehot else Categorical)(logits=t.masked_fill(~allowed, -math.inf))
        z = est(d)
        return f_many((z * idx).sum(-1) if onehot else z.float())

    def exact(t):
        p = torch.softmax(t.masked_fill(~allowed, -math.inf), -1)
        i, j = torch.meshgrid(torch.arange(k, dtype=t.dtype), torch.arange(k, dtype=t.dtype), indexing="ij")
        return (p[0, :, None] * p[1, None, :] * f_many(torch.stack([i, j]))).sum()

    g, v = estimates(theta, model, 1500)
    assert (g[:, ~allowed.reshape(-1)] == 0).all()
    value, grad = exact_grad(exact, theta.double())
    keep = allowed.reshape(-1)
    name = f"mvd {'OneHot' if onehot else ''}Categorical, K {k}, masked"
    print(assert_unbiased(g[:, keep].double(), grad[keep], f"{name} grad").table())
    print(assert_unbiased(v.double(), value, f"{name} forward value").table())
