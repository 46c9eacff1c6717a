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
