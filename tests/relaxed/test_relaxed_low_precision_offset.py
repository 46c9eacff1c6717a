"""Relaxed-family estimators with float16 / bfloat16 logits (a model under ``torch.autocast``, or ``.half()``) and
a float32 cost of 300 + 0.1 · signal (an RL-like reward). The terms of the gradient that carry f ≈ 300 each
(MagicBox(l) · f(b), and REBAR's / RELAX's -MagicBox(l) c(z̃)) had their gradients rounded to l's dtype before
they were added, and the small difference was lost (found by a tester): arm's in the core's surrogate (fixed in
fa4f9eb: l widened to float32), REBAR's and RELAX's because ``_params.sample_log_prob`` cast l back to bfloat16
for the control variate (mean 0.015 for an exact 0.021, z ~ -40). z-tests over independent estimates against the
exact gradient of the logits the model computes (the float32 logits rounded to its dtype)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from step_checks import low_precision_logits

_A = (0.3, -0.5)  # exact in bfloat16 and float16
_SLOPE = torch.tensor([1.0, 2.0])
_OFFSET = 300.0


def _exact(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d/da E[300 + 0.1 h · [1, 2]], h ~ Bernoulli(logits=a in dtype): 0.1 [1, 2] σ(a)(1 - σ(a))."""
    p = torch.sigmoid(a.detach().to(dtype).double())
    return 0.1 * _SLOPE.double() * p * (1 - p)


def _grad(est, a: torch.Tensor, dtype: torch.dtype, autocast: bool) -> torch.Tensor:
    with storch.Graph():
        logits = low_precision_logits(a, dtype, autocast, 32)
        h = est(Bernoulli(logits=logits))
        storch.add_cost(_OFFSET + 0.1 * (h.float() * _SLOPE).sum(-1), name="c")  # a float32 cost
        return torch.autograd.grad(storch.surrogate_loss(), a)[0].double()


@pytest.mark.parametrize("name, dtype, autocast", [
    ("rebar", torch.bfloat16, True),
    ("relax", torch.bfloat16, True),
    ("arm", torch.bfloat16, True),
    ("rebar", torch.float16, False),
], ids=["rebar-bf16-autocast", "relax-bf16-autocast", "arm-bf16-autocast", "rebar-float16"])
def test_low_precision_logits_under_a_cost_offset_are_unbiased(name, dtype, autocast):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    R = 200
    a = torch.tensor(_A, dtype=torch.float32, requires_grad=True)
    est = storch.estimator(name, plate="h")
    g = torch.stack([_grad(est, a, dtype, autocast) for _ in range(R)])
    exact = _exact(a, dtype)
    assert g.abs().sum() > 0
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(R))
    assert z.abs().max() < 4, (g.mean(0), exact, z)
