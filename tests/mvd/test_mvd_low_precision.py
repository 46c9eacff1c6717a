"""mvd with float16 / bfloat16 parameters (a model under ``torch.autocast``, or ``.half()``) and a float32 cost of
300 + 0.1 · signal (an RL-like reward). The importance weight w = ⊥(1 / (n E ratio)) and the coefficient
⊥(c E ratio) were each rounded to bfloat16, so w · coef was not c / n (relative 2^-8, times 300: more than the
signal), and the terms +c f(x⁺) ∇θ and -c f(x⁻) ∇θ were summed into θ's bfloat16 gradient, where they cancelled:
the gradient was exactly 0 (found by a tester). mvd now computes its proposal in float32 for such a distribution
(``storch_mvd.mvd._widened``). Against the exact gradient of the parameters the model computes (rounded to its
dtype): a Bernoulli's mvd gradient is exact given the other elements (an additive cost), a Normal's a z-test (it
was unbiased before, with five times the standard deviation in bfloat16)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch

_OFFSET = 300.0


def test_bernoulli_under_bfloat16_autocast_is_exact():
    torch.manual_seed(0)
    a = torch.tensor([0.3, -0.5], requires_grad=True)
    slope = torch.tensor([1.0, 2.0])
    with storch.Graph():
        x = storch.denote_independent(torch.ones(32, 1), 0, "data")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = torch.nn.functional.linear(x, torch.zeros(2, 1), a)
        assert logits.dtype is torch.bfloat16
        h = storch.estimator("mvd", plate="h")(Bernoulli(logits=logits))
        assert h.tensor.dtype is torch.bfloat16  # the model's dtype, as the other estimators hand out
        storch.add_cost(_OFFSET + 0.1 * (h.float() * slope).sum(-1), name="c")  # a float32 cost
        g = torch.autograd.grad(storch.surrogate_loss(), a)[0]
    p = torch.sigmoid(a.detach().bfloat16().double())
    exact = 0.1 * slope.double() * p * (1 - p)
    # was exactly 0; now float32 arithmetic, and one rounding of the logits' gradient to bfloat16 (2^-9 relative)
    torch.testing.assert_close(g.double(), exact, rtol=8e-3, atol=0)


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.float16, False)],
                         ids=["bf16-autocast", "float16"])
def test_normal_in_low_precision_under_a_cost_offset_is_unbiased(dtype, autocast):
    # x ~ N(μ, σ²), cost 300 + 0.1 (x - 1)²: d/dμ E = 0.2 (μ - 1), d/dσ E = 0.2 σ
    torch.set_num_threads(1)
    torch.manual_seed(0)
    R = 200
    theta = torch.tensor([0.25, 0.75], requires_grad=True)  # μ, σ: exact in bfloat16 and float16
    est = storch.estimator("mvd", plate="x", n_samples=2)
    gs = []
    for _ in range(R):
        with storch.Graph():
            if autocast:
                with torch.autocast("cpu", dtype=dtype):
                    params = torch.nn.functional.linear(torch.ones(1, 1), torch.zeros(2, 1), theta)[0]
            else:
                params = theta.to(dtype)  # a float16 / bfloat16 model
            assert params.dtype is dtype
            x = est(Normal(params[0], params[1]))
            assert x.tensor.dtype is dtype
            storch.add_cost(_OFFSET + 0.1 * (x.float() - 1.0) ** 2, name="c")
            gs.append(torch.autograd.grad(storch.surrogate_loss(), theta)[0].double())
    g = torch.stack(gs)
    exact = torch.tensor([0.2 * (0.25 - 1.0), 0.2 * 0.75], dtype=torch.float64)
    assert g.abs().sum() > 0
    z = (g.mean(0) - exact) / (g.std(0) / math.sqrt(R))
    assert z.abs().max() < 4, (g.mean(0), exact, z)
    if dtype is torch.bfloat16:  # bfloat16's rounding of the 300s made the loc's gradient 5 times as noisy (sd 0.26)
        assert g.std(0)[0] < 0.1, g.std(0)


def test_a_float32_distribution_is_not_looked_through(monkeypatch):
    # the float32 path: one scan of the distribution's attributes decides there is nothing to widen, without
    # parameters() (~3.4 us per node and step; review r-twentyone)
    import storch_mvd.mvd as mvd_module

    def refuse(d):
        raise AssertionError("parameters() read for a float32 distribution")

    monkeypatch.setattr(mvd_module, "parameters", refuse)
    theta = torch.tensor([0.3, -0.5], requires_grad=True)
    with storch.Graph():
        h = storch.estimator("mvd", plate="h")(Bernoulli(logits=theta))
        storch.add_cost(h.sum(-1), name="c")
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    p = torch.sigmoid(theta.detach())
    assert torch.allclose(g, p * (1 - p), atol=1e-6)  # mvd's Bernoulli gradient of E[h1 + h2] is exact
