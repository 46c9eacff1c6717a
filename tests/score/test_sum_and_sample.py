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


def _oracle_gradient(theta, costs, x):
    """The sum_and_sample(n_enumerate=1, baseline="leave_one_out") gradient on the drawn plate ``x`` (memory
    value first, then the m samples), in float64: Σ_M ∇p(a) f(a) + ∇p(x ∉ M) mean_j f_j
    + p(x ∉ M)/m Σ_j (f_j - b_j) ∇log p(x_j | x ∉ M). ``theta`` (*own, K), ``x`` (1 + m, *own)."""
    t = theta.double().requires_grad_(True)
    lp_var = torch.log_softmax(t, -1)  # (*own, K)
    own = t.shape[:-1]
    cols = torch.arange(own.numel()).reshape(own) if own else None
    lp = lp_var[cols, x].reshape(x.shape[0], -1).sum(-1) if own else lp_var[x]  # joint log p of the plate
    f = (costs.double()[cols, x].reshape(x.shape[0], -1).sum(-1) if own else costs.double()[x])
    log_rest = torch.log(-torch.expm1(lp[0]))  # one memory value: p(x ∉ M) = 1 - p(a)
    m = x.shape[0] - 1
    fs = f[1:]
    b = (fs.sum() - fs) / (m - 1)
    rest = log_rest.exp()
    surrogate = lp[0].exp() * f[0] + rest * fs.mean() + (rest.detach() / m * (fs - b) * (lp[1:] - log_rest)).sum()
    return torch.autograd.grad(surrogate, t)[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("own", [(), (2,)], ids=["enumerated", "beam"])
def test_reduced_precision_many_samples_gradient_is_finite_and_matches_float64(dtype, own):
    """sum_and_sample(n_samples=256, baseline="leave_one_out") on a float16 Categorical of 300 values with costs of
    ~400 gave a NaN gradient: the weight p(x ∉ M)/m is broadcast to the 256 samples and its backward summed their
    gradients, ~f each, to ~1e5 = inf in float16, which LogsumexpBackward (log p(x ∉ M)) turned into NaN (inf x 0 at
    the masked entries); the beam path (2 x 300 values > budget) the same through log(1 - p(a)). The components now
    compute in float32 and cast back. The gradient is compared, on the same samples, with the estimator's formula in
    float64 at the same (rounded) logits and costs. What is left is the model's own rounding: torch's Categorical
    normalises the logits in the model dtype, so each log p(x) is off by ~|log p| eps, each probability by that
    fraction, and the gradient of logit i, a difference of terms of size ~p_i f, by ~eps |log p|max p_i max f (plus the
    gradient's own rounding, eps |g_i|). The measured error is below half of that bound (float16 and bfloat16, both
    paths; the old code gave NaN); the test allows twice the bound.
    """
    torch.manual_seed(0)
    k, n = 300, 256
    theta = torch.randn(own + (k,), dtype=torch.float32).to(dtype)
    costs = (400 + 50 * torch.randn(own + (k,), dtype=torch.float32)).to(dtype)
    leaf = theta.clone().requires_grad_(True)
    with storch.Graph():
        z = storch.estimator("sum_and_sample", plate="z", n_samples=n, baseline="leave_one_out")(
            Categorical(logits=leaf))
        cost = (F.one_hot(z, k).to(dtype) * costs).sum(-1)
        storch.add_cost(cost.sum(-1) if own else cost)
        loss = storch.surrogate_loss()
        assert loss.dtype == torch.float32  # a reduced-precision node's l enters the surrogate widened to float32
        g, = torch.autograd.grad(loss, leaf)
    assert g.dtype == dtype
    assert torch.isfinite(g).all()
    want = _oracle_gradient(theta, costs, z.tensor)
    eps = torch.finfo(dtype).eps
    p = torch.softmax(theta.double(), -1)  # p_i of each variable's values
    lp_max = float(-torch.log_softmax(theta.double(), -1).amin(-1).sum())  # the largest |log p(x)| of a joint value
    f_max = float(costs.double().amax(-1).sum())  # the largest cost of a joint value
    bound = eps * (lp_max * p * f_max + want.abs())
    assert ((g.double() - want).abs() <= 2 * bound).all(), float(((g.double() - want).abs() / bound).max())
