"""unordered_set and sum_and_sample on a OneHotCategorical work through the category index: its support, the
rows of eye(K), is never built (p-struct: at K = 5000, B = 2, 278 ms and +115 MB a step against 11 ms and
+17 MB on the Categorical; the K x K support was listed by enumerate_support(expand=False) on the enumerated
path and on the i.i.d. / beam path beyond the budget). The one-hot vectors handed out are the same values,
with the same gradients, as a Categorical's indices under the same seed, and the estimates are unbiased
against enumeration on both paths."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

import storch
from path_probes import Allocations
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate
from storch_score._support import support_table

D = torch.float64

# (estimator, options): the enumerated path (K <= budget) and the path beyond the budget (K > budget)
CASES = {
    "unordered_set enumerated": ("unordered_set", dict(n_samples=3)),
    "unordered_set beyond budget": ("unordered_set", dict(n_samples=3, budget=4)),
    "sum_and_sample enumerated": ("sum_and_sample", dict(n_enumerate=2, n_samples=2)),
    "sum_and_sample beyond budget": ("sum_and_sample", dict(n_enumerate=2, n_samples=2, budget=4)),
}


def _step(name, opts, cls, theta, cost):
    """The loss and its gradient of one step with a node of ``cls`` over data entries ``theta`` (B, K)."""
    with storch.Graph():
        t, c = storch.denote_independent((theta, cost), 0, "data")
        z = storch.estimator(name, plate="z", **opts)(cls(logits=t))
        if cls is OneHotCategorical:
            storch.add_cost((z * c).sum(-1) ** 2)
        else:
            storch.add_cost(c.gather(-1, z.unsqueeze(-1)).squeeze(-1) ** 2)
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
        return z.tensor.detach(), loss.detach(), g


@pytest.mark.parametrize("case", list(CASES))
def test_one_hot_never_builds_the_k_by_k_support(case):
    """The largest tensor of the step (sampling, costs, surrogate and backward) is O(k · B · K); the
    old path built eye(K), K^2 = 90000 elements here."""
    name, opts = CASES[case]
    k_cat = 300
    opts = {**opts, "budget": 100} if "budget" in opts else opts
    torch.manual_seed(0)
    theta = torch.randn(2, k_cat, dtype=D, requires_grad=True)
    cost = torch.randn(2, k_cat, dtype=D)
    with Allocations() as spy:
        z, _, g = _step(name, opts, OneHotCategorical, theta, cost)
    assert z.shape[-1] == k_cat and bool((z.sum(-1) == 1).all()) and torch.isfinite(g).all()
    assert "eye" not in spy.names
    assert spy.largest <= 16 * 2 * k_cat < k_cat * k_cat, spy.largest


@pytest.mark.parametrize("case", list(CASES))
def test_one_hot_equals_categorical_under_the_same_seed(case):
    """Same seed: the one-hot samples are the one-hot vectors of the Categorical's indices, and the loss and
    gradient are the same (the one-hot support table gave the same, through eye(K))."""
    name, opts = CASES[case]
    torch.manual_seed(1)
    theta = torch.randn(2, 6, dtype=D, requires_grad=True)
    cost = torch.randn(2, 6, dtype=D)
    torch.manual_seed(2)
    zi, loss_i, g_i = _step(name, opts, Categorical, theta, cost)
    torch.manual_seed(2)
    zo, loss_o, g_o = _step(name, opts, OneHotCategorical, theta, cost)
    assert zo.dtype == theta.dtype and torch.equal(zo, F.one_hot(zi, 6).to(D))
    assert torch.allclose(loss_o, loss_i, rtol=1e-12, atol=1e-12)
    assert torch.allclose(g_o, g_i, rtol=1e-12, atol=1e-12)


def test_the_one_hot_table_indexes_as_eye():
    """support_table of a OneHotCategorical gives, for any index, the rows torch's enumerate_support lists."""
    d = OneHotCategorical(logits=torch.zeros(3, 5, dtype=torch.float32))
    idx = torch.tensor([[4, 0, 2], [1, 1, 3]])
    table = support_table(d)
    assert table.shape == (5, 5)
    want = d.enumerate_support(expand=False).reshape(5, 5)[idx]
    assert torch.equal(table[idx], want) and table[idx].dtype == want.dtype


@pytest.mark.parametrize("case", list(CASES))
def test_one_hot_gradient_is_unbiased_against_enumeration(case):
    """z-test of the gradient of E[(z · c)^2] over R = 2000 replicates, on both paths."""
    name, opts = CASES[case]
    torch.manual_seed(3)
    theta0 = torch.randn(6, dtype=D)
    cost = torch.randn(6, dtype=D)
    exact, = torch.autograd.grad((theta0.requires_grad_(True).softmax(-1) * cost ** 2).sum(), theta0)
    with storch.Graph():
        leaf, th = replicate(theta0.detach(), 2000)
        z = storch.estimator(name, plate="z", **opts)(OneHotCategorical(logits=th))
        storch.add_cost((z * cost).sum(-1) ** 2)
        g, = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert_unbiased(g, exact, f"{case}: gradient")
    assert g.std(0).max() > 0  # a sampled estimate (not the exact sum)
