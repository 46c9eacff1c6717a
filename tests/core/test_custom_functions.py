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
