"""The torch machinery users put around a model, on plate tensors (task p-func).

A user who trains with the usual PyTorch tooling adds storch: activation checkpointing, ``functional_call`` and
parametrizations, module and tensor hooks, gradient clipping, schedules, an averaged model, gradient
accumulation, torch.func transforms and ``torch.autograd.functional`` of a step, evaluation passes, and saving
and resuming. Each works per sample (equal to a Python loop over the plate entries) and, where an estimator is
involved, gives unbiased derivatives (z-tested against exact enumeration), or is refused with advice
(``tests/core/test_custom_functions.py`` holds the refusals of custom Functions; docs/reliability.md,
"Training-loop tools", and docs/plates.md, Pitfalls, say what is supported).
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, Categorical, Normal
from torch.func import functional_call
from torch.nn.utils import parametrizations, parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint

import storch
from storch.testing import per_replicate_derivatives, replicate, z_test

D = torch.float64
C = torch.tensor([1.0, -2.0, 0.5], dtype=D)
THETA = torch.tensor([0.3, -0.5, 0.8, 0.7], dtype=D)  # the categorical's logits (3) and φ, read by the block


def _block(onehot, phi):
    """The cost block a sample flows into (checkpointed in some tests): depends on the sample and on φ."""
    return (onehot @ C + phi) ** 2 * torch.sin(phi)


def _exact(th):
    p = torch.softmax(th[:3], -1)
    eye = torch.eye(3, dtype=D)
    return sum(p[i] * _block(eye[i], th[3]) for i in range(3))


def _exact_derivatives():
    t = THETA.clone().requires_grad_(True)
    g = torch.autograd.grad(_exact(t), t, create_graph=True)[0]
    h = torch.stack([torch.autograd.grad(g[i], t, retain_graph=True)[0] for i in range(len(t))])
    return g.detach(), h


def _assert_z(estimates, exact, what):
    report = z_test(estimates, exact, what)
    assert report.ok, report.table()


# -- 1. activation checkpointing around a block that takes a sample ---------------------------------------------

@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_checkpoint_around_a_block_that_takes_a_sample_is_unbiased_at_orders_1_and_2(baseline):
    """``checkpoint(block, z, φ, use_reentrant=False)`` recomputes the block during backward, also in the
    second-order pass: the derivatives equal the unwrapped block's (same draws) and are unbiased at orders 1
    and 2. The reentrant form is refused with the advice to use ``use_reentrant=False``."""
    g_exact, h_exact = _exact_derivatives()
    est = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
    runs = []
    for wrap in (False, True):
        torch.manual_seed(0)
        with storch.Graph():
            leaf, th = replicate(THETA, 3000)
            z = est(Categorical(logits=th[:3]))
            onehot = F.one_hot(z, 3).to(D)
            cost = checkpoint(_block, onehot, th[3], use_reentrant=False) if wrap else _block(onehot, th[3])
            storch.add_cost(cost, name="c")
            runs.append(per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2))
    for plain, wrapped in zip(*runs):
        torch.testing.assert_close(wrapped, plain)
    _assert_z(runs[1][0], g_exact, "gradient through checkpoint")
    _assert_z(runs[1][1], h_exact, "Hessian through checkpoint")
    with storch.Graph():
        _, th = replicate(THETA, 2)
        onehot = F.one_hot(est(Categorical(logits=th[:3])), 3).to(D)
        with pytest.raises(storch.PlateError, match="use_reentrant=False"):
            checkpoint(_block, onehot, th[3], use_reentrant=True)


# -- 2. functional_call and parametrizations of a module fed samples ---------------------------------------------

class _Symmetric(nn.Module):
    def forward(self, w):
        return w.triu() + w.triu(1).transpose(-1, -2)


def _functional():
    """(the function to call, the module that holds its parameters)"""
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    params = dict(module.named_parameters())
    return (lambda h: functional_call(module, params, (h,))), module


def _registered():
    lin = nn.Linear(4, 4).double()
    parametrize.register_parametrization(lin, "weight", _Symmetric())
    return lin, lin


def _wrapped(make):
    module = make()
    return module, module


MODULES = {
    "functional_call": _functional,
    "weight_norm": lambda: _wrapped(lambda: parametrizations.weight_norm(nn.Linear(4, 2).double())),
    "orthogonal": lambda: _wrapped(lambda: parametrizations.orthogonal(nn.Linear(4, 4).double())),
    "register_parametrization": _registered,
}


@pytest.mark.parametrize("kind", list(MODULES))
def test_functional_call_and_parametrizations_act_per_sample_with_exact_gradients(kind):
    """A module called through ``functional_call``, or whose weight is parametrized, on a pathwise sample: each
    plate entry's output is the module applied to that entry alone, and the parameters' gradients are those of
    plain torch on the raw samples (the surrogate's mean over the data and sample entries)."""
    torch.manual_seed(0)
    module, owner = MODULES[kind]()
    params = list(owner.parameters())
    loc = torch.randn(3, 4, dtype=D, requires_grad=True)
    with storch.Graph():
        x = storch.denote_independent(loc, 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=5)(Normal(x, 1.0))
        y = module(z)
        raw = z.tensor.detach()  # (z, data, 4): plates in z.plates' order
        assert [p.name for p in y.plates] == ["z", "data"]
        loop = torch.stack([torch.stack([module(raw[i, j]) for j in range(3)]) for i in range(5)])
        torch.testing.assert_close(y.tensor, loop)
        storch.add_cost((y ** 2).sum(), name="c")
        storch.backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (module(raw) ** 2).sum(-1).mean().backward()  # plain torch on the same draws
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad)


def test_functional_call_with_sampled_weights_gives_each_entry_its_own_network():
    """A Bayesian network's weights as pathwise samples, each on its own plate, passed to ``functional_call``:
    the output's entry (w1, w2, w3, w4) is the network with those weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    mu = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    x = torch.randn(6, 4, dtype=D)
    with storch.Graph():
        xs = storch.denote_independent(x, 0, "data")
        w = {k: storch.estimator("reparameterization", plate="w" + k.replace(".", "_"), n_samples=2)(Normal(m, 0.1))
             for k, m in mu.items()}
        y = functional_call(net, w, (xs,))
        assert [p.name for p in y.plates] == ["data", "w0_weight", "w0_bias", "w2_weight", "w2_bias"]
        raw = {k: v.tensor.detach() for k, v in w.items()}
        for a, b, c, d in [(0, 0, 0, 0), (1, 0, 1, 0), (0, 1, 1, 1)]:
            picked = dict(zip(raw, (raw["0.weight"][a], raw["0.bias"][b], raw["2.weight"][c], raw["2.bias"][d])))
            torch.testing.assert_close(y.tensor[:, a, b, c, d], functional_call(net, picked, (x,)))
        storch.add_cost((y ** 2).sum(), name="c")
        storch.backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in mu.values())


# -- 3. module hooks and tensor hooks --------------------------------------------------------------------------

def test_module_hooks_see_plate_tensors_and_tensor_hooks_change_the_pathwise_gradient():
    """Forward pre-hooks and forward hooks receive the plate tensors (per-sample shape, the plates), and what
    they return replaces the input / output per entry. ``z.register_hook`` receives z's gradient as a plate
    tensor; doubling it doubles the pathwise gradient to the distribution's parameters (as in torch)."""
    torch.manual_seed(0)
    lin = nn.Linear(4, 2).double()
    seen = {}

    def pre(module, args):
        seen["pre"] = (type(args[0]), args[0].shape)
        return (2 * args[0],)

    def post(module, args, out):
        seen["post"] = (type(out), out.shape)
        return out + 1

    handles = [lin.register_forward_pre_hook(pre), lin.register_forward_hook(post)]
    loc = torch.randn(3, 4, dtype=D, requires_grad=True)
    grads, hook_saw = [], []
    for factor in (None, 2.0):
        loc.grad = None
        torch.manual_seed(1)
        with storch.Graph():
            x = storch.denote_independent(loc, 0, "data")
            z = storch.estimator("reparameterization", plate="z", n_samples=5)(Normal(x, 1.0))
            y = lin(z)
            torch.testing.assert_close(y.tensor, F.linear(2 * z.tensor, lin.weight, lin.bias) + 1)

            def hook(g, factor=factor):
                hook_saw.append((type(g), g.shape, tuple(p.name for p in g.plates)))
                return None if factor is None else factor * g

            z.register_hook(hook)
            storch.add_cost((y ** 2).sum(), name="c")
            storch.backward()
        grads.append(loc.grad.clone())
    for h in handles:
        h.remove()
    assert seen == {"pre": (storch.PlateTensor, torch.Size([4])), "post": (storch.PlateTensor, torch.Size([2]))}
    assert hook_saw == [(storch.PlateTensor, torch.Size([4]), ("z", "data"))] * 2
    torch.testing.assert_close(grads[1], 2 * grads[0])


# -- 4 and 7. a training loop: accumulation, clipping, a schedule, an averaged model; saving and resuming ---------

def test_accumulated_backward_calls_sum_unbiased_estimates_and_update_the_average_once_each():
    """K ``storch.backward(scale=1/K)`` calls before one optimizer step accumulate the mean of K unbiased
    estimates, and the moving average takes one update per call (the first sets it, then
    decay·old + (1 - decay)·mean cost); it is used by the next call, which stays unbiased (it depends on
    earlier steps only)."""
    g_exact, _ = _exact_derivatives()
    decay, k, r = 0.5, 3, 3000
    torch.manual_seed(2)
    est = storch.estimator("score", plate="z", n_samples=3, baseline="moving_average", decay=decay)
    leaf = THETA.expand(r, 4).clone().requires_grad_(True)
    average = None
    for _ in range(k):
        with storch.Graph():
            th = storch.denote_independent(leaf, 0, "replicate")
            z = est(Categorical(logits=th[:3]))
            storch.add_cost(_block(F.one_hot(z, 3).to(D), th[3]), name="c")
            mean_cost = storch.backward(scale=1.0 / k).detach()  # uniform weights: the cost's mean
        average = mean_cost if average is None else decay * average + (1 - decay) * mean_cost
        torch.testing.assert_close(est.moving_averages["c"], average)
    _assert_z(leaf.grad * r, g_exact, "accumulated gradient / K")


class _Model(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.enc = nn.Linear(4, 3).double()
        self.dec = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.2)).double()
        self.est = storch.estimator("score", plate="z", n_samples=3, **options)

    def forward(self, x):
        xs = storch.denote_independent(x, 0, "data")
        z = self.est(Bernoulli(logits=self.enc(xs)))
        storch.add_cost(((self.dec(z) - xs) ** 2).sum(), name="rec")


DATA = torch.randn(8, 4, dtype=D, generator=torch.Generator().manual_seed(3))


def _build(options):
    torch.manual_seed(0)
    model = _Model(**options)
    opt = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("est.")], lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    ema = AveragedModel(model.dec, multi_avg_fn=get_ema_multi_avg_fn(0.9))  # the model's own modules only
    return model, opt, sched, ema


def _train(model, opt, sched, ema, steps, first, accumulate=2):
    norms = []
    for step in range(first, first + steps):
        torch.manual_seed(100 + step)
        for part in range(accumulate):
            with storch.Graph():
                model(DATA[4 * part:4 * (part + 1)])
                storch.backward(scale=1.0 / accumulate)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)))
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update_parameters(model.dec)
    return norms


@pytest.mark.parametrize("baseline", ["moving_average", "learned"])
def test_a_training_loop_saved_mid_training_resumes_bitwise(baseline):
    """clip_grad_norm_, StepLR, an EMA of the decoder and accumulation over two ``storch.backward()`` calls in a
    storch loop; ``torch.save`` of model, optimizer, schedule and EMA after 3 steps, ``torch.load`` (torch's
    default ``weights_only``) into fresh objects, 2 more steps: the same norms, parameters, estimator state and
    EMA as the run that was not interrupted."""
    model, opt, sched, ema = _build({"baseline": baseline})
    _train(model, opt, sched, ema, 3, 0)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "ema": ema.state_dict()}, buffer)
    norms = _train(model, opt, sched, ema, 2, 3)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, _, _, _ = _build({"baseline": baseline})
    model2.load_state_dict(saved["model"])  # then the optimizer, over the loaded model (docs/reliability.md)
    opt2 = torch.optim.Adam([p for n, p in model2.named_parameters() if not n.startswith("est.")], lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    sched2.load_state_dict(saved["sched"])
    ema2 = AveragedModel(model2.dec, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema2.load_state_dict(saved["ema"])
    assert _train(model2, opt2, sched2, ema2, 2, 3) == norms
    assert sched2.get_last_lr() == sched.get_last_lr()
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    assert str(model.est.get_extra_state()["moving_averages"]) == str(model2.est.get_extra_state()["moving_averages"])
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), ema2.parameters()))


# -- 5. torch.func transforms and torch.autograd.functional of a function that runs a storch step ----------------

def _step(est, order=1):
    def f(th):
        with storch.Graph():
            z = est(Categorical(logits=th[:3]))
            # one-hot by comparison: F.one_hot of a sample has no batching rule under vmap(grad) in torch itself
            onehot = (z.unsqueeze(-1) == torch.arange(3)).to(th.dtype)
            storch.add_cost(_block(onehot, th[3]), name="c")
            return storch.surrogate_loss(order=order)
    return f


def test_torch_func_and_autograd_functional_of_a_step_are_unbiased():
    """``torch.func.grad``/``jacrev`` of a function that runs a step, their vmapped ensemble
    (``randomness="different"``) and ``torch.autograd.functional.vhp``/``hvp``/``hessian`` of its order-2
    surrogate: z-tested against the exact derivatives."""
    g_exact, h_exact = _exact_derivatives()
    v = torch.tensor([0.5, -1.0, 0.3, 0.8], dtype=D)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out")
    torch.manual_seed(5)
    members = THETA.expand(2000, 4).clone()
    _assert_z(torch.func.vmap(torch.func.grad(_step(est)), randomness="different")(members), g_exact, "vmap(grad)")
    r = 300
    _assert_z(torch.stack([torch.func.jacrev(_step(est))(THETA) for _ in range(r)]), g_exact, "jacrev")
    _assert_z(torch.stack([torch.autograd.functional.vhp(_step(est, 2), THETA, v)[1] for _ in range(r)]),
              v @ h_exact, "vhp")
    _assert_z(torch.stack([torch.autograd.functional.hvp(_step(est, 2), THETA, v)[1] for _ in range(r)]),
              h_exact @ v, "hvp")
    _assert_z(torch.stack([torch.autograd.functional.hessian(_step(est, 2), THETA) for _ in range(r)]),
              h_exact, "hessian")


# -- 6. evaluation passes --------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_evaluation_passes_sample_change_no_state_and_refuse_backward(mode):
    """Under ``torch.no_grad()`` / ``torch.inference_mode()`` a step samples and estimates its costs
    (``storch.cost_estimates()``), leaves the moving average as it was, and ``storch.backward()`` says what to
    do instead; ``model.eval()`` makes dropout the identity and batch norm use its running statistics per entry."""
    torch.manual_seed(0)
    model = _Model(baseline="moving_average")
    with storch.Graph():
        model(DATA)
        storch.backward()
    average = model.est.moving_averages["rec"].clone()
    model.eval()
    with mode():
        with storch.Graph():
            model(DATA)
            estimate = storch.cost_estimates()["rec"]
            with pytest.raises(storch.StorchError, match="cost_estimates"):
                storch.backward()
        bn = nn.BatchNorm1d(4).double().eval()
        bn.running_mean.uniform_(-1, 1)
        with storch.Graph():
            z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(DATA, 1.0))  # per sample (8, 4)
            assert torch.equal(model.dec[1](z).tensor, z.tensor)  # the model's dropout: the identity
            torch.testing.assert_close(bn(z).tensor, torch.stack([bn(z.tensor[i]) for i in range(3)]))
    assert torch.isfinite(estimate) and torch.equal(model.est.moving_averages["rec"], average)


def test_batch_norm_without_running_statistics_normalises_each_sample_over_its_own_batch():
    """Training-mode BatchNorm (``track_running_stats=False``) on a node sampled for the whole batch (per-sample
    shape ``(B, C)``): each sample is normalised over its own B rows, as a run with one sample; not over the n·B
    rows that stacking the samples into the batch would give (docs/plates.md, BatchNorm on plate tensors)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4, track_running_stats=False).double().train()
    loc = torch.randn(6, 4, dtype=D, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(loc, 1.0))
        h = bn(z)
        raw = z.tensor.detach()
        torch.testing.assert_close(h.tensor, torch.stack([bn(raw[i]) for i in range(3)]))
        assert not torch.allclose(h.tensor, bn(raw.reshape(18, 4)).reshape(3, 6, 4))
