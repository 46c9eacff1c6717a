"""Custom torch.autograd.Functions on plate tensors (found by porting a VAE into a training loop).

``MyFn.apply(x)`` does not go through ``__torch_function__``: torch ran the forward on the plate tensors with
autograd off and recorded the backward on the wrappers, which storch does not follow, so the result came
back with no gradient and training went on silently without it (reentrant checkpointing is such a Function:
a decoder wrapped in ``checkpoint(..., use_reentrant=True)`` got no gradient; a module's full backward hook
failed with torch's "Error while setting up backward hooks"). storch now refuses such a call with a message
that says what to use instead; the same code on tensors that need no grad, ``torch.no_grad()`` and
``checkpoint(..., use_reentrant=False)`` work, the last with the exact gradient.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import storch


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


def _data(w):
    return storch.denote_independent(w, 0, "data")


class _Plain(storch.Estimator):
    """The base class's components (the score function): the core test env has no storch_score."""

    name = "plain_score_for_custom_function_tests"


class _PlainSequence(_Plain):
    name = "plain_sequence_for_custom_function_tests"
    supports_partitions = True


def test_custom_function_on_plate_tensors_that_need_grad_is_refused():
    w = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"custom torch.autograd.Function.*use_reentrant=False"):
            Square.apply(_data(w))


def test_custom_function_on_plate_tensors_without_grad_works():
    w = torch.randn(4, 3)
    with storch.Graph():
        y = Square.apply(_data(w))
        assert torch.equal(y.tensor, w * w)


def test_reentrant_checkpoint_is_refused_and_non_reentrant_is_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    w = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"use_reentrant=False"):
            checkpoint(lin, _data(w), use_reentrant=True)
    grads = []
    for wrap in (False, True):
        lin.zero_grad()
        with storch.Graph():
            x = _data(w)
            y = checkpoint(lin, x, use_reentrant=False) if wrap else lin(x)
            storch.add_cost((y ** 2).sum(-1))
            storch.backward()
        grads.append(lin.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_full_backward_hook_is_refused_with_advice_and_no_grad_passes_work():
    lin = torch.nn.Linear(3, 2)
    handle = lin.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    w = torch.randn(4, 3, requires_grad=True)
    try:
        with storch.Graph():
            with pytest.raises(storch.PlateError, match=r"full backward hook.*register_hook"):
                lin(_data(w))
    finally:
        handle.remove()
    with storch.Graph(), torch.no_grad():  # autograd off by the user: no Function, nothing refused
        assert lin(_data(w)).shape == (2,)


@pytest.mark.parametrize("pre,full,words", [
    (True, False, "a module with a full backward pre-hook (register_full_backward_pre_hook,"),
    (True, True, "a module with a full backward hook and a full backward pre-hook (register_full_backward_hook and "
                 "register_full_backward_pre_hook,"),
    (False, True, "a module with a full backward hook (register_full_backward_hook,"),
])
def test_the_full_backward_hook_refusal_names_the_registration_used(pre, full, words):
    """The refusal named register_full_backward_hook also for a module with only a backward pre-hook (found by
    porting)."""
    lin = torch.nn.Linear(3, 2)
    handles = []
    if pre:
        handles.append(lin.register_full_backward_pre_hook(lambda module, grad_out: None))
    if full:
        handles.append(lin.register_full_backward_hook(lambda module, grad_in, grad_out: None))
    w = torch.randn(4, 3, requires_grad=True)
    try:
        with storch.Graph():
            with pytest.raises(storch.PlateError) as info:
                lin(_data(w))
    finally:
        for h in handles:
            h.remove()
    assert str(info.value).startswith(words)


def test_an_estimator_that_reads_values_under_vmap_says_so():
    """torch.func.vmap over an ensemble of storch models: an estimator that decides its computation from
    values (expect asks whether every value is possible) failed with torch's generic "vmap: ... .item() ...
    data-dependent control flow" error; it now names the estimator and what to do (found by porting a
    training loop). The control: a pathwise estimator runs under vmap and equals the loop over members."""
    from torch.distributions import Bernoulli, Normal
    from torch.func import grad, vmap

    x = torch.tensor([[0.5, -1.0, 1.5], [1.0, 0.3, -0.7]])
    phis = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))

    def loss_of(est, dist):
        def loss(phi):
            with storch.Graph():
                xd = storch.denote_independent(x, 0, "data")
                z = est(dist(phi[:3] * xd + phi[3]))
                storch.add_cost(((z.sum() - 0.7 * xd.sum()) ** 2), name="c")
                return storch.surrogate_loss()
        return loss

    loss = loss_of(storch.estimator("expect", plate="z"), lambda t: Bernoulli(logits=t))
    with pytest.raises(storch.StorchError, match=r"'expect'.*cannot run inside torch.func.vmap.*Python loop"):
        vmap(grad(loss), randomness="different")(phis)
    loss = loss_of(storch.estimator("reparameterization", plate="z"), lambda t: Normal(t, 1.0))
    torch.manual_seed(0)
    g = vmap(grad(loss), randomness="same")(phis)
    looped = []
    for p in phis:  # randomness="same": every member sees the noise one call draws
        torch.manual_seed(0)
        looped.append(grad(loss)(p))
    torch.testing.assert_close(g, torch.stack(looped))


# -- found by porting (p-torch): a reentrant checkpoint on data that needs no grad, messages, sampling inside a
# non-reentrant checkpoint


def test_reentrant_checkpoint_on_data_without_grad_is_refused():
    """``checkpoint(enc, x, use_reentrant=True)`` on a data plate that needs no grad: only the encoder's parameters
    need grad, so the old check (a plate operand that needs grad) let it pass, and the encoder got no gradient
    (None; torch's "None of the inputs have requires_grad=True" warning only). Refused now, with what to do;
    also with the sampling inside the checkpointed function."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(4, 3)
    data = torch.bernoulli(torch.rand(2, 4))
    est = _Plain(plate="z", n_samples=4)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"^torch.utils.checkpoint.checkpoint\(\.\.\., use_reentrant=True\) "
                           r"was called on plate tensors.*use_reentrant=False"):
            checkpoint(enc, _data(data), use_reentrant=True)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"use_reentrant=False"):
            checkpoint(lambda t: est(torch.distributions.Bernoulli(logits=enc(t))), _data(data), use_reentrant=True)


@pytest.mark.parametrize("sequential", [False, True])
def test_checkpoint_without_use_reentrant_says_that_torch_defaults_to_the_reentrant_form(sequential):
    """A checkpoint called without ``use_reentrant`` (torch warns that it should be passed) is torch's reentrant
    form: the refusal said "use_reentrant=True was called" to a user who had not written it (found by p-func)."""
    enc = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    with storch.Graph():
        x = _data(torch.randn(2, 4, requires_grad=True))
        with pytest.warns(UserWarning, match="use_reentrant"):
            with pytest.raises(storch.PlateError, match=r"torch's default where use_reentrant is not passed.*"
                               r"use_reentrant=False\), which gives exact gradients"):
                torch.utils.checkpoint.checkpoint_sequential(enc, 2, x) if sequential else checkpoint(enc, x)


def test_custom_function_reaching_a_parameter_is_refused_also_under_no_grad_and_frozen_passes():
    """A user's Function whose forward reads a parameter that needs grad (the plate operand needs none) is
    refused; also under an outer torch.no_grad(), where nothing is lost but which the forward cannot tell from
    the autograd the Function turns off, so the message says to call the function directly there (found by
    review: the message did not say it, and this test's name promised a no_grad case it did not have); the
    direct call under no_grad gives torch's values. The same Function with a frozen parameter, and a reentrant
    checkpoint of a frozen module, run (nothing needs grad: nothing is lost) and give torch's values."""
    w = torch.randn(3, requires_grad=True)

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * w

        @staticmethod
        def backward(ctx, g):
            return g * w

    data = torch.randn(4, 3)
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"custom torch.autograd.Function.*operands that need grad"):
            Scale.apply(_data(data))
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad(), storch.Graph():
        x = _data(data)
        with pytest.raises(storch.PlateError, match=r"custom torch.autograd.Function.*Under torch.no_grad\(\), "
                           r"where nothing is lost, call the function directly"):
            Scale.apply(x)
        assert torch.equal((x * w).tensor, data * w)  # the direct call
        with pytest.raises(storch.PlateError, match=r"use_reentrant=True.*Under torch.no_grad\(\).*call the "
                           r"function without checkpoint"):
            checkpoint(lin, x, use_reentrant=True)
        torch.testing.assert_close(lin(x).tensor, lin(data))
    with torch.no_grad():
        frozen = w.clone()
    w = frozen
    lin = torch.nn.Linear(3, 2).requires_grad_(False)
    with storch.Graph():
        assert torch.equal(Scale.apply(_data(data)).tensor, data * frozen)
    with storch.Graph():
        assert torch.allclose(checkpoint(lin, _data(data), use_reentrant=True).tensor, lin(data))


def test_refusals_say_what_the_user_did():
    """The reentrant-checkpoint and full-backward-hook refusals began "Tensor.requires_grad was called on plate
    tensors" (torch's own check inside its Function), which the user never called."""
    lin = torch.nn.Linear(3, 2)
    w = torch.randn(4, 3, requires_grad=True)
    with storch.Graph():
        with pytest.raises(storch.PlateError) as info:
            checkpoint(lin, _data(w), use_reentrant=True)
    assert str(info.value).startswith("torch.utils.checkpoint.checkpoint(..., use_reentrant=True) was called")
    handle = lin.register_full_backward_hook(lambda module, grad_in, grad_out: None)
    try:
        with storch.Graph():
            with pytest.raises(storch.PlateError) as info:
                lin(_data(w))
    finally:
        handle.remove()
    assert str(info.value).startswith("a module with a full backward hook (register_full_backward_hook")
    assert "Tensor.requires_grad" not in str(info.value)


def test_sampling_inside_a_non_reentrant_checkpoint_is_refused_during_backward():
    """An estimator called inside ``checkpoint(..., use_reentrant=False)`` is called again by the recomputation
    during backward: storch saw a new partition step, or a graph "discarded after an error in its step
    (_StopRecomputationError)", or "estimator 'relax' was already used in this graph". Refused now, for a single
    node and for a partition (one estimator at two steps); checkpointing only the network is exact."""
    from torch.distributions import Bernoulli, Categorical

    torch.manual_seed(0)
    enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
    data = torch.bernoulli(torch.rand(2, 4))
    for est in (_Plain(plate="z", n_samples=2),):  # (relax: tests/relaxed/test_relaxed_errors.py)

        def inner(t):
            return est(Bernoulli(logits=enc(t)))

        x = _data(data)
        z = checkpoint(inner, x, use_reentrant=False)
        storch.add_cost(-Bernoulli(logits=dec(z)).log_prob(x).sum(), name="rec")
        with pytest.raises(storch.StorchError, match=r"(?i)during a backward pass.*checkpoint the networks, not the "
                           r"sampling"):
            storch.backward()
        storch.reset()
    pol = torch.nn.Linear(3, 3)
    est = _PlainSequence(plate="a", n_samples=4)

    def step(s):
        return est(Categorical(logits=pol(s)))

    s = _data(torch.eye(3)[:2])
    a1 = checkpoint(step, s, use_reentrant=False)
    a2 = checkpoint(step, torch.nn.functional.one_hot(a1, 3).float(), use_reentrant=False)
    storch.add_cost(-torch.randn(3, 3)[a1, a2], name="r")
    with pytest.raises(storch.StorchError, match=r"(?i)checkpoint the networks, not the sampling"):
        storch.backward()
    storch.reset()
    grads = []
    for wrap in (False, True):
        enc.zero_grad()
        torch.manual_seed(3)
        est = _Plain(plate="z", n_samples=4)
        x = _data(data)
        logits = checkpoint(enc, x, use_reentrant=False) if wrap else enc(x)
        z = est(Bernoulli(logits=logits))
        storch.add_cost(-Bernoulli(logits=dec(z)).log_prob(x).sum(), name="rec")
        storch.backward()
        grads.append(enc.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_torch_recompute_stop_does_not_discard_the_step():
    """torch's _StopRecomputationError ends a non-reentrant checkpoint's recomputation early (control flow); passing
    through a storch call (storch.add_cost inside the checkpointed function) it discarded the default graph's step,
    whose tensors then failed as stale. Any other error still discards the step."""
    import torch.utils.checkpoint as torch_checkpoint

    stop = getattr(torch_checkpoint, "_StopRecomputationError", None)
    if stop is None:
        pytest.skip("this torch has no _StopRecomputationError")
    from storch.graph import current_graph

    x = _data(torch.randn(2, 3, requires_grad=True))  # (a cost that needs no grad is refused as a constant)
    graph = current_graph()
    graph.discard(stop())
    storch.add_cost((x ** 2).sum(), name="c")  # not stale
    graph.discard(RuntimeError("a user error"))
    with pytest.raises(storch.StorchError, match=r"discarded after an error in its step \(RuntimeError\)"):
        storch.add_cost((x ** 2).sum(), name="c")
    storch.reset()


# -- found by review (r-five): storch.add_cost inside a non-reentrant checkpoint, a custom Function under no_grad


def test_add_cost_during_a_backward_pass_is_refused_and_a_returned_cost_is_exact():
    """``storch.add_cost`` inside ``checkpoint(..., use_reentrant=False)`` ran again when a backward pass went
    through the checkpoint before storch.backward() (a gradient penalty with ``torch.autograd.grad(...,
    retain_graph=True)``): the costs were ['rec', 'rec'] and the encoder's gradient counted the cost twice, silently.
    Refused now during any backward pass (storch.backward()'s own included), with what to do: return the cost from
    the checkpointed function and add it outside, which gives the gradient of the uncheckpointed step, with or
    without the pass in the middle."""
    from torch.distributions import Normal
    from torch.utils.checkpoint import set_checkpoint_early_stop

    from storch.graph import current_graph

    data = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))

    def run(how, mid, early=True):
        torch.manual_seed(0)
        enc, dec = torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)
        x = _data(data)
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(enc(x), 1.0))

        def body(z):
            h = torch.tanh(dec(z))
            if how == "inside":
                storch.add_cost(((h - x) ** 2).sum(), name="rec")
                return (h ** 2).sum().tensor.sum()
            return ((h - x) ** 2).sum(), (h ** 2).sum().tensor.sum()

        with set_checkpoint_early_stop(early):
            out = checkpoint(body, z, use_reentrant=False) if how != "plain" else body(z)
        if how != "inside":
            storch.add_cost(out[0], name="rec")
            out = out[1]
        if mid:
            torch.autograd.grad(out, dec.weight, retain_graph=True)
        assert [n for n, _ in current_graph().costs] == ["rec"]
        storch.backward()
        assert enc.weight.grad is not None
        return enc.weight.grad

    for early in (True, False):
        with pytest.raises(storch.CostError, match=r"^storch.add_cost was called during a backward pass \(cost "
                           r"'rec'\).*twice.*Return the cost from the checkpointed function and add it outside"):
            run("inside", mid=True, early=early)
        storch.reset()
    with pytest.raises(storch.CostError, match=r"during a backward pass"):
        run("inside", mid=False)
    storch.reset()
    exact = run("plain", mid=False)
    assert exact.abs().sum() > 0
    for mid in (False, True):
        torch.testing.assert_close(run("returned", mid=mid), exact)


def test_denote_independent_during_a_backward_pass_is_refused_and_declaring_it_outside_is_exact():
    """``storch.denote_independent`` inside ``checkpoint(..., use_reentrant=False)`` ran again in the recomputation
    during backward and was told "plate name 'data' is already used in this graph ... pass them in ONE call", which
    is not the mistake. Refused now with the checkpoint's reason and the fix (declare the plate before the
    checkpoint and pass the plate tensor in), which gives the uncheckpointed step's gradient."""
    from torch.distributions import Normal

    data = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))

    def run(how):
        torch.manual_seed(0)
        enc, dec = torch.nn.Linear(4, 2), torch.nn.Linear(2, 4)

        def declared_inside(x):
            return enc(_data(x))

        if how == "inside":
            h = checkpoint(declared_inside, data, use_reentrant=False)
        else:
            x = _data(data)
            h = checkpoint(enc, x, use_reentrant=False) if how == "outside" else enc(x)
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(h, 1.0))
        storch.add_cost(((dec(z) - 1.0) ** 2).sum(), name="rec")
        storch.backward()
        return enc.weight.grad

    with pytest.raises(storch.PlateError, match=r"^storch.denote_independent was called during a backward pass "
                       r"\(plate 'data'\).*Declare the data plate before the checkpoint"):
        run("inside")
    storch.reset()
    exact = run("plain")
    assert exact.abs().sum() > 0
    torch.testing.assert_close(run("outside"), exact)
