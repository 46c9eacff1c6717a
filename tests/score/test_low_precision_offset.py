"""Score-family estimators with float16 / bfloat16 logits (a model under ``torch.autocast``, or ``.half()``) and a
float32 cost of 300 + 0.1 · signal (an RL-like reward): the surrogate's MagicBox(l) · C and (1 - MagicBox(l)) · ⊥b
were differentiated as separate terms whose gradients autograd rounded to l's dtype before adding them, so the
small difference C - b was lost (exactly 0, or a bias; found by a tester). The core now widens l once to float32
(``storch.graph.cost_frame._widened``). z-tests over independent estimates against the exact gradient of the logits the model
computes (the float32 logits rounded to its dtype)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical

import storch
from step_checks import low_precision_logits

_A = (0.3, -0.5, 1.0, 0.0)  # logits of a 4-way Categorical, exact in bfloat16 and float16
_SLOPE = torch.tensor([0.0, 1.0, 2.0, -1.0])
_OFFSET = 300.0


def _exact(a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """d/da E[300 + 0.1 s[h]], h ~ Categorical(logits=a in dtype): 0.1 p (s - p · s)."""
    p = torch.softmax(a.detach().to(dtype).double(), -1)
    s = _SLOPE.double()
    return 0.1 * p * (s - (p * s).sum())


def _grad(est, a: torch.Tensor, dtype: torch.dtype, autocast: bool) -> torch.Tensor:
    with storch.Graph():
        logits = low_precision_logits(a, dtype, autocast, 16)
        h = est(Categorical(logits=logits))
        storch.add_cost(_OFFSET + 0.1 * _SLOPE[h], name="c")  # a float32 cost
        return torch.autograd.grad(storch.surrogate_loss(), a)[0].double()


@pytest.mark.parametrize("name, options, dtype, autocast", [
    ("score", {"n_samples": 4, "baseline": "leave_one_out"}, torch.bfloat16, True),
    ("score", {"n_samples": 4, "baseline": "leave_one_out"}, torch.float16, False),
    ("unordered_set", {"n_samples": 2}, torch.bfloat16, True),
], ids=["score-leave_one_out-bf16-autocast", "score-leave_one_out-float16", "unordered_set-bf16-autocast"])
def test_low_precision_logits_under_a_cost_offset_are_unbiased(name, options, dtype, autocast):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    R = 200
    a = torch.tensor(_A, dtype=torch.float32, requires_grad=True)
    est = storch.estimator(name, plate="h", **options)
    g = torch.stack([_grad(est, a, dtype, autocast) for _ in range(R)])
    exact = _exact(a, dtype)
    assert g.abs().sum() > 0
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(R))
    assert z.abs().max() < 4, (g.mean(0), exact, z)
