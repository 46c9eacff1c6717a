"""Module hooks added or removed after storch.compile traced a step: a trace records what the forward (pre-)hooks
of the modules it calls compute, so the compiled step checks at each call that these modules' hooks and torch's
global module hooks are the ones it traced with, and traces again when they differ (as torch.compile's guards
recompile). Before, a removed hook went on running in every replay (a warm-up hook that doubled an encoder's
output: the compiled gradients were off by z = 15 over 300 replays, z = 49 in this test) and a hook added later never ran."""

import math
import types
from typing import Any

import pytest
import torch
from torch.distributions import Normal

import storch
from step_checks import distribution_validation_kept  # noqa: F401 (an autouse fixture)
from storch.errors import StorchError

S = torch.tensor([1.0, 2.0])


def _doubled(module, inputs, output) -> Any:
    return 2.0 * output


def _zeroed(module, inputs, output) -> Any:
    return 0 * output


def _setup(holder: bool = False):
    """A reparameterized step: h ~ N(enc(x), 1) on plate 'h', cost sum_j S_j h_j^2; with ``holder`` the encoder is reached
    through a plain object only (not by name: the step's guard sees it as a module the trace called)."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(3, 2)
    est = storch.estimator("reparameterization", plate="h", n_samples=4)
    box = types.SimpleNamespace(enc=enc)

    def step(x):
        with storch.Graph():
            x = storch.denote_independent(x, 0, "data")
            loc = box.enc(x) if holder else enc(x)
            h = est(Normal(loc, 1.0))
            storch.add_cost((h ** 2 * S).sum(-1), name="c")
            return storch.surrogate_loss()

    return enc, est, step, torch.randn(5, 3)


def _grads(fn, enc, x, seed):
    torch.manual_seed(seed)
    enc.zero_grad()
    loss = fn(x)
    loss.backward()
    assert enc.weight.grad is not None
    return loss.detach().clone(), enc.weight.grad.clone()


def _exact(enc, x, scale: float = 1.0):
    """The exact gradient of E[sum_j S_j h_j^2] = sum_j S_j (mu_j^2 + 1) (mean over the data) in enc's weight,
    h_j ~ N(mu_j, 1), mu = scale * enc(x)."""
    enc.zero_grad()
    (((scale * enc(x)) ** 2 + 1) * S).sum(-1).mean().backward()
    assert enc.weight.grad is not None
    exact = enc.weight.grad.clone()
    enc.zero_grad()
    return exact


def _z(fn, enc, x, exact, n=300) -> float:
    g = torch.stack([_grads(fn, enc, x, seed)[1] for seed in range(n)])
    return ((g.mean(0) - exact) / (g.std(0) / math.sqrt(n))).abs().max().item()


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_removed_forward_hook_stops_running(backend):
    """A hook present at the trace and removed after it: the replays estimate the unhooked gradient (z-test against
    the exact one; before, the removed hook went on doubling the encoder's output: max |z| = 49.2 over 300 replays)."""
    enc, est, step, x = _setup()
    compiled = storch.compile(step, backend=backend)
    handle = enc.register_forward_hook(_doubled)  # a warm-up hook
    _grads(compiled, enc, x, 0)
    handle.remove()
    exact = _exact(enc, x)
    z = _z(compiled, enc, x, exact)
    assert z < 4, z
    assert compiled.traces == 2
    # and the traced hook was a real change: the replays with it estimate the doubled output's gradient
    doubled = _exact(enc, x, 2.0)
    enc.register_forward_hook(_doubled)
    assert (doubled - exact).abs().max() > 0.05
    assert _z(compiled, enc, x, doubled) < 4


def _register(target: str, enc, est, calls: list):
    def doubled(module, inputs, output) -> Any:
        calls.append(module)
        return 2.0 * output if isinstance(module, torch.nn.Linear) else None

    if target == "enc":
        return enc.register_forward_hook(doubled)
    if target == "enc_pre":
        return enc.register_forward_pre_hook(lambda m, i: (calls.append(m), (i[0] * 0.5,))[1])
    if target == "est":
        return est.register_forward_hook(lambda m, i, o: (calls.append(m), _zeroed(m, i, o))[1])
    if target == "est_pre":
        return est.register_forward_pre_hook(
            lambda m, i: (calls.append(m), (Normal(i[0].loc + 1.0, 1.0),))[1])
    assert target == "global"
    return torch.nn.modules.module.register_module_forward_hook(doubled)


@pytest.mark.parametrize("holder", [False, True])
@pytest.mark.parametrize("target", ["enc", "enc_pre", "est", "est_pre", "global"])
def test_hook_added_after_the_trace_runs(target, holder):
    """A forward hook or pre-hook added after the first call (on a submodule, on the estimator, globally) changes
    the compiled step's loss and gradients as it changes the eager step's (the same samples), and removing it
    restores them; before, the added hook never ran. With ``holder`` the step reaches the encoder through a plain
    object (not a module it reaches by name)."""
    enc, est, step, x = _setup(holder)
    compiled = storch.compile(step, backend=None)
    before = _grads(compiled, enc, x, 1)
    calls: list = []
    handle = _register(target, enc, est, calls)
    try:
        eager = _grads(step, enc, x, 1)
        assert calls, "the hook did not run eagerly"
        assert not torch.allclose(eager[1], before[1]), "the hook does not change the gradient"
        for seed in (1, 2):
            torch.testing.assert_close(_grads(compiled, enc, x, seed), _grads(step, enc, x, seed))
    finally:
        handle.remove()
    torch.testing.assert_close(_grads(compiled, enc, x, 1), before)
    assert compiled.traces == 3  # before, with the hook, after its removal


def test_unchanged_hooks_keep_the_trace():
    """Hooks registered before the first call and left alone, and a hook added and removed on a module the step does
    not call, trace once: the check compares the hooks of the modules the trace called."""
    enc, est, step, x = _setup()
    enc.register_forward_hook(_doubled)
    other = torch.nn.Linear(3, 2)
    compiled = storch.compile(step, backend=None)
    for seed in range(3):
        torch.testing.assert_close(_grads(compiled, enc, x, seed), _grads(step, enc, x, seed))
    handle = other.register_forward_hook(_zeroed)
    _grads(compiled, enc, x, 4)
    handle.remove()
    assert compiled.traces == 1


def test_train_eval_toggle_after_removing_a_hook():
    """The p-compile2 sequence: a hook at the first call, removed, then eval()/train() toggles: every call gives the
    eager step's loss and gradients (before, train() after eval() selected the first trace, with the hook)."""
    enc, est, step, x = _setup()
    compiled = storch.compile(step, backend=None)
    handle = enc.register_forward_hook(_doubled)
    torch.testing.assert_close(_grads(compiled, enc, x, 1), _grads(step, enc, x, 1))
    handle.remove()
    for module, mode in [(est, "eval"), (est, "train"), (enc, "eval"), (enc, "train")]:
        getattr(module, mode)()
        torch.testing.assert_close(_grads(compiled, enc, x, 1), _grads(step, enc, x, 1))


def test_backward_hook_added_after_the_trace_is_refused():
    """A backward hook added after the first call traces again, which refuses it (the replays would skip it)."""
    enc, est, step, x = _setup()
    compiled = storch.compile(step, backend=None)
    _grads(compiled, enc, x, 1)
    handle = enc.register_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(StorchError, match="backward hook"):
            compiled(x)
    finally:
        handle.remove()
    global_handle = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: None)
    try:
        with pytest.raises(StorchError, match="register_module_full_backward_hook"):
            compiled(x)
    finally:
        global_handle.remove()
    _grads(compiled, enc, x, 1)
