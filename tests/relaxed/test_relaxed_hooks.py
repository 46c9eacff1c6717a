"""A user's gradient hook (register_hook) downstream of a REBAR / RELAX sample: it changes the gradient of the
entries handed out (the hard samples b) only; the relaxed entries σ_λ(z), σ_λ(z̃), where the control variate
evaluates the cost, pass through unchanged, so the control variate stays zero-mean. z-tests against exact
enumeration (R seeded estimates, 4 standard errors)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import assert_unbiased

R = 300
X = torch.tensor([0.5, -1.0])
Y = torch.tensor([0.3, -0.2, 0.1])


def _modules():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 3), torch.nn.Linear(3, 3)


def _exact(enc, dec):
    """E_{z ~ Bernoulli(sigmoid(enc(x)))} ||dec(z) - y||², by enumeration of the 8 values of z."""
    p = torch.sigmoid(enc(X))
    total = torch.zeros(())
    for bits in itertools.product([0.0, 1.0], repeat=3):
        z = torch.tensor(bits)
        total = total + (p ** z * (1 - p) ** (1 - z)).prod() * ((dec(z) - Y) ** 2).sum()
    return total


def _flat(params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in params])


def _estimates(name: str, hook, seed: int):
    """R gradients of the encoder and of the decoder, each from one storch.backward() with ``hook`` on dec(z)."""
    enc, dec = _modules()
    est = storch.estimator(name, plate="z")
    torch.manual_seed(seed)
    g_enc, g_dec = [], []
    for _ in range(R):
        enc.zero_grad(set_to_none=True)
        dec.zero_grad(set_to_none=True)
        with storch.Graph():
            z = est(Bernoulli(logits=enc(X)))
            h = dec(z)
            h.register_hook(hook)
            storch.add_cost(((h - Y) ** 2).sum(), name="c")
            storch.backward()
        g_enc.append(_flat(p.grad for p in enc.parameters()))
        g_dec.append(_flat(p.grad for p in dec.parameters()))
    return torch.stack(g_enc), torch.stack(g_dec), enc, dec


@pytest.mark.parametrize("name", ["relax", "rebar"])
@pytest.mark.parametrize("kind,hook,sign", [("reverse", lambda g: -g, -1.0), ("zero", lambda g: 0 * g, 0.0)])
def test_hook_changes_only_the_hard_entries(name, kind, hook, sign):
    # before the fix the hook rewrote the pathwise part of the control variate (through the relaxed entries) but
    # not its value in the score part: the encoder's gradient was biased (max |z| 19 to 25 at R = 400)
    g_enc, g_dec, enc, dec = _estimates(name, hook, seed={"reverse": 1, "zero": 2}[kind])
    exact = _exact(enc, dec)
    # plain torch's meaning (z is discrete: the score function gives the encoder's gradient): the encoder's
    # expected-cost gradient is unchanged, the decoder's (the pathwise gradient at the drawn sample) is
    # multiplied by -1 (gradient reversal) or 0
    want_enc = _flat(torch.autograd.grad(exact, list(enc.parameters()), retain_graph=True))
    want_dec = sign * _flat(torch.autograd.grad(exact, list(dec.parameters())))
    report = assert_unbiased(g_enc.double(), want_enc.double(), f"{name} {kind} hook: encoder")
    print(f"{report.name}: max |z| = {float(report.z.abs().max()):.2f}")
    report = assert_unbiased(g_dec.double(), want_dec.double(), f"{name} {kind} hook: decoder")
    print(f"{report.name}: max |z| = {float(report.z.abs().max()):.2f}")


@pytest.mark.filterwarnings("ignore:.*update=False, and its default control-variate network")
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_hook_runs_once_per_loss_pass_on_the_users_plate(name, update):
    # the hook runs in the loss's backward pass (gradients disabled inside it) and, with update=True, in the
    # update's pass computing ĝ = ∂loss/∂params (create_graph: enabled; the control variate is trained on the
    # variance of the gradient the parameters get), with the same gradient; not in the update's pass of
    # ∂(Σ ĝ²)/∂φ, which is no gradient of the loss (it ran there before: three calls per storch.backward())
    enc, dec = _modules()
    est = storch.estimator(name, plate="z", n_samples=2, update=update)
    seen = []
    for _ in range(3):
        with storch.Graph():
            z = est(Bernoulli(logits=enc(X)))
            h = dec(z)
            h.register_hook(lambda g: seen.append((torch.is_grad_enabled(), tuple(g.shape), g.plates,
                                                   g.tensor.detach().clone())))
            storch.add_cost(((h - Y) ** 2).sum(), name="c")
            storch.backward()
            assert [s[0] for s in seen] == ([False, True] if update else [False])
            for _, shape, plates, raw in seen:
                # the plate the user's code sees: the 2 hard samples, then the 2 + 2 relaxed entries
                assert shape == (3,) and plates == h.plates and raw.shape == (6, 3)
                assert torch.equal(raw, seen[0][3])
            seen.clear()
