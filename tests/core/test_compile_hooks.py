"""Gradient hooks and storch.compile: a hook registered inside a compiled step (``register_hook``,
``register_post_accumulate_grad_hook``, on a plate tensor, a plain tensor, a parameter or an argument) and a call of
a module with a backward hook are refused at the trace with a StorchError that says what to do; forward hooks and
hooks registered outside the step give the eager step's gradients from the same samples."""

from typing import Any

import pytest
import torch
from torch.distributions import Normal

import storch
from storch.errors import StorchError

BACKENDS = [None, "inductor"]


def _step(W, est, where="plate"):
    """A reparameterized step: z ~ N(theta, 1) on plate 'z', h = W(z) (a plate tensor) or W(theta) (plain)."""
    def step(theta):
        with storch.Graph():
            z = est(Normal(theta, 1.0))
            if where == "plate":
                h = W(z)
                storch.add_cost(((h - 1) ** 2).sum(-1), name="c")
            else:
                x = W(theta.unsqueeze(0)).sum()
                storch.add_cost(((z - x) ** 2).sum(-1), name="c")
            return storch.surrogate_loss()
    return step


def _grads(fn, theta, W, seed):
    torch.manual_seed(seed)
    fn(theta).backward()
    out = [theta.grad.clone(), W.weight.grad.clone()]
    theta.grad = None
    W.zero_grad()
    return out


def _setup():
    torch.manual_seed(0)
    return (torch.randn(3, requires_grad=True), torch.nn.Linear(3, 2),
            storch.estimator("reparameterization", plate="z", n_samples=4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", ["plate", "raw", "loss", "parameter", "argument", "post_accumulate"])
def test_tensor_hook_in_step_refused(backend, target):
    theta, W, est = _setup()

    def step(theta):
        with storch.Graph():
            z = est(Normal(theta, 1.0))
            h = W(z)
            if target == "plate":
                h.register_hook(lambda g: -g)
            elif target == "raw":
                h.tensor.register_hook(lambda g: -g)
            elif target == "parameter":
                W.weight.register_hook(lambda g: -g)
            elif target == "argument":
                theta.register_hook(lambda g: -g)
            elif target == "post_accumulate":
                W.weight.register_post_accumulate_grad_hook(lambda p: None)
            storch.add_cost(((h - 1) ** 2).sum(-1), name="c")
            loss = storch.surrogate_loss()
            if target == "loss":
                loss.register_hook(lambda g: -g)
            return loss

    compiled = storch.compile(step, backend=backend)
    method = "register_post_accumulate_grad_hook" if target == "post_accumulate" else "register_hook"
    with pytest.raises(StorchError, match="storch.compile cannot trace") as info:
        compiled(theta)
    message = str(info.value)
    assert f"`{method}`" in message and "outside the step" in message and "eagerly" in message
    assert ("plate tensor the step computes" in message) == (target == "plate")
    # nothing was left registered on the parameter or the argument by the refused trace
    assert not W.weight._backward_hooks and not theta._backward_hooks
    assert not getattr(W.weight, "_post_accumulate_grad_hooks", None)
    # eagerly the plate tensor's hook works (docs/plates.md): the refusal is compile's
    if target == "plate":
        torch.manual_seed(1)
        step(theta).backward()
        assert theta.grad is not None and torch.isfinite(theta.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["full", "full_pre", "old"])
@pytest.mark.parametrize("where", ["plate", "plain"])
def test_module_backward_hook_refused(backend, kind, where):
    """Such a hook was silently skipped by the replay on plain tensors (the deprecated register_backward_hook on
    plate tensors too): the compiled gradient differed from the eager one from the same samples."""
    theta, W, est = _setup()

    def negate_inputs(module, grad_in, grad_out) -> Any:
        return tuple(None if g is None else -g for g in grad_in)

    if kind == "full":
        W.register_full_backward_hook(negate_inputs)
    elif kind == "full_pre":
        W.register_full_backward_pre_hook(lambda module, grad_out: tuple(-g for g in grad_out))
    else:
        W.register_backward_hook(negate_inputs)
    step = _step(W, est, where)
    name = {"full": "register_full_backward_hook", "full_pre": "register_full_backward_pre_hook",
            "old": "register_backward_hook"}[kind]
    with pytest.raises(StorchError, match="storch.compile cannot trace") as info:
        storch.compile(step, backend=backend)(theta)
    message = str(info.value)
    assert name in message and "Linear" in message and "eagerly" in message and "p.register_hook" in message
    assert theta.grad is None and W.weight.grad is None


def test_global_module_backward_hook_refused():
    theta, W, est = _setup()
    handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(StorchError, match="register_module_full_backward_hook"):
            storch.compile(_step(W, est, "plain"), backend=None)(theta)
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_outside_the_step_and_forward_hooks(backend):
    """What the refusals advise gives the eager step's gradients from the same samples, at every call: hooks on the
    argument and on a parameter registered once, outside the step, and a module's forward hook (traced)."""
    theta, W, est = _setup()
    theta.register_hook(lambda g: -2 * g)
    W.weight.register_hook(lambda g: g.flip(0))
    seen = []
    W.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.clone()))
    def triple(module, inputs, output) -> Any:
        return 3 * output

    W.register_forward_hook(triple)
    step = _step(W, est, "plate")
    compiled = storch.compile(step, backend=backend)
    unhooked_theta, unhooked_W, _ = _setup()
    plain = _step(unhooked_W, est, "plate")
    for seed in (11, 12, 13):
        eager = _grads(step, theta, W, seed)
        replay = _grads(compiled, theta, W, seed)
        torch.testing.assert_close(replay[0], eager[0])
        torch.testing.assert_close(replay[1], eager[1])
        torch.testing.assert_close(seen[-1], replay[1])
        # the hooks did change the gradient: without them the gradient differs
        reference = _grads(plain, unhooked_theta, unhooked_W, seed)
        assert not torch.allclose(reference[0], eager[0])
        assert not torch.allclose(reference[1], eager[1])
    assert compiled.traces == 1
