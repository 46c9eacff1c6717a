"""sum_and_sample (MAPO): memory sets, exhaustive memories, components."""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

torch.set_default_dtype(torch.float64)

C = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5])
THETA = torch.tensor([0.3, -0.5, 0.8, 0.1, -1.2])


def _exact(order):
    t = THETA.clone().requires_grad_(True)
    g = torch.autograd.grad(torch.softmax(t, -1) @ C, t, create_graph=True)[0]
    h = torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(5)])
    return [g.detach(), h][:order]


def _run(est, r=4000, order=2, one_hot=False):
    with storch.Graph() as graph:
        leaf, th = replicate(THETA, r)
        if one_hot:
            z = est(OneHotCategorical(logits=th))
            storch.add_cost(z @ C)
        else:
            z = est(Categorical(logits=th))
            storch.add_cost(F.one_hot(z, 5).to(th.dtype) @ C)
        out = per_replicate_derivatives(storch.surrogate_loss(order), leaf, order)
        return out, graph.nodes[0], z


@pytest.mark.parametrize("memory", [
    torch.tensor([3, 1]),  # values (k',) of a Categorical
    lambda d: d.logits.argsort(-1, descending=True)[..., :2].movedim(-1, 0),  # a callable, per parent entry
    torch.tensor([3, 3, 0]),  # a repeated value counts once
])
def test_memory_set_is_unbiased(memory):
    torch.manual_seed(0)
    est = storch.estimator("mapo", plate="z", memory=memory, n_samples=2, baseline="leave_one_out")
    (g, h), node, z = _run(est)
    assert_unbiased(g, _exact(1)[0], "memory grad")
    assert_unbiased(h, _exact(2)[1], "memory Hessian")


def test_components_on_the_memory_and_the_remainder():
    torch.manual_seed(1)
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=2, n_samples=3)
    with storch.Graph() as graph:
        th = THETA.clone().requires_grad_(True)
        z = est(Categorical(logits=th))
        node = graph.nodes[0]
    p = torch.softmax(THETA, -1)
    top = p.argsort(descending=True)[:2]
    assert torch.equal(z.tensor[:2], top)  # the two most probable values first
    assert not torch.isin(z.tensor[2:], top).any()  # the rest sampled outside the memory
    rest = 1 - p[top].sum()
    assert torch.allclose(node.weight_values[:2], p[top])
    assert torch.allclose(node.weight_values[2:], rest / 3 * torch.ones(3))
    assert node.weight_values.requires_grad  # gradient-carrying weights (appendix D.2.3)
    assert torch.allclose(node.gradient_values[2:], p[z.tensor[2:]].log() - rest.log())
    assert torch.equal(node.gradient_values[:2], torch.zeros(2))


@pytest.mark.parametrize("options", [dict(n_enumerate=5), dict(n_enumerate=9), dict(memory=torch.eye(5), n_samples=2)])
def test_everything_in_memory_is_exact(options):
    torch.manual_seed(2)
    (g, h), node, _ = _run(storch.estimator("sum_and_sample", plate="z", **options), r=20, one_hot=True)
    want = _exact(2)
    assert torch.isfinite(node.gradient_values).all() and torch.isfinite(node.weight_values).all()
    assert torch.allclose(g, want[0].expand_as(g), atol=1e-10)
    assert torch.allclose(h, want[1].expand_as(h), atol=1e-10)


def test_one_hot_memory_values():
    torch.manual_seed(3)
    est = storch.estimator("sum_and_sample", plate="z", memory=torch.eye(5)[[0, 4]], n_samples=3)
    (g, h), _, _ = _run(est, one_hot=True)
    assert_unbiased(g, _exact(1)[0], "one-hot memory grad")
    assert_unbiased(h, _exact(2)[1], "one-hot memory Hessian")
