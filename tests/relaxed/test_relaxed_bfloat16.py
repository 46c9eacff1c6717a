"""The relaxed family draws its noise in float32 at least (``storch_relaxed._precision``).

It drew U(0, 1) in the model's dtype, clamped to [eps, 1 - eps]: in bfloat16 (``model.bfloat16()``, or
logits under ``torch.autocast``) eps = 2^-7, so the logistic noise was bounded by ±4.84 and came in coarse
steps, and the Gumbel noise was truncated: b = H(z) was not a sample of p (Bernoulli at logit 5:
P(b = 1) = 1 instead of 0.9933; a category of probability 0.0036 drawn 0.00085 of the time), and the
RELAX / REBAR gradient at logit 5 was 60 times too small.

Exact values are computed in float64 from the bfloat16-rounded logits, the distribution the model
defines (the tolerance for the rounding of p itself: the model's p is σ of its bfloat16 logit, not of
the float64 number it was written as); the costs' constants are exact in bfloat16 (0.75, not 0.8), so
f(b) is exact too. What is left, the estimators' own bfloat16 arithmetic (the relaxed cost, the sums of
the backward pass), rounds at 2^-8 relative, unbiased in sign, an order of magnitude below the standard
errors of these tests: a 4-standard-error z-test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

DRAWS = 20000
BF16 = torch.bfloat16

ALPHA = [5.0, -4.0, 6.5]  # exact in bfloat16; the logistic noise reached at most ±4.84
LOGITS = [0.0, -3.5, 2.0]  # p = (0.119, 0.0036, 0.878): the rare category's Gumbel noise was truncated

# the real samples come first (rebar, relax: then σ_λ(z), σ_λ(z̃); arm, disarm: then the antithetic x̃)
BERNOULLI = ["relax", "rebar", "gumbel_straight_through", "straight_through", "gumbel_softmax", "arm", "disarm"]
CATEGORICAL = ["relax", "rebar", "gumbel_straight_through", "straight_through", "gumbel_softmax"]


def _logits(values, mode: str) -> torch.Tensor:
    """bfloat16 logits: a bfloat16 parameter, or a float32 one through a matmul under CPU autocast."""
    if mode == "bfloat16":
        return torch.tensor(values, dtype=BF16)
    x = torch.tensor(values, dtype=torch.float32)
    with torch.autocast("cpu", dtype=BF16):
        out = x.unsqueeze(0) @ torch.eye(len(values))
    assert out.dtype == BF16
    return out.squeeze(0)


def _check_frequencies(freq: torch.Tensor, p: torch.Tensor, what: str) -> None:
    z = (freq - p) / (p * (1 - p) / DRAWS).sqrt()
    assert (z.abs() < 4).all(), f"{what}: frequencies {freq.tolist()} vs p {p.tolist()}, z = {z.tolist()}"


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
@pytest.mark.parametrize("name", BERNOULLI)
def test_bernoulli_sample_frequencies_in_bfloat16(name, mode):
    """P(b = 1) against σ(α) (z-test per entry): it was 1.00000 at α = 5 (z = 11.6 over 20 000 draws)."""
    torch.manual_seed(0)
    alpha = _logits(ALPHA, mode)
    est = storch.estimator(name, plate="z", n_samples=DRAWS)
    with storch.Graph():
        b = est(Bernoulli(logits=alpha))
        real = b.tensor.detach()[:DRAWS].double()
    assert b.tensor.dtype == BF16  # the model reads its own dtype
    hard = (real > 0.5).double() if name == "gumbel_softmax" else real
    if name != "gumbel_softmax":
        assert set(real.unique().tolist()) <= {0.0, 1.0}
    _check_frequencies(hard.mean(0), torch.sigmoid(alpha.double()), f"{name} ({mode})")


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
@pytest.mark.parametrize("name", CATEGORICAL)
def test_categorical_sample_frequencies_in_bfloat16(name, mode):
    """Category frequencies against softmax(logits): the rare category was drawn 0.00085 of the time
    instead of 0.0036 (z = -6.5)."""
    torch.manual_seed(1)
    logits = _logits(LOGITS, mode)
    est = storch.estimator(name, plate="z", n_samples=DRAWS)
    with storch.Graph():
        z = est(OneHotCategorical(logits=logits))
        real = z.tensor.detach()[:DRAWS].double()
    assert z.tensor.dtype == BF16
    onehot = torch.nn.functional.one_hot(real.argmax(-1), len(LOGITS)).double()
    _check_frequencies(onehot.mean(0), torch.softmax(logits.double(), -1), f"{name} ({mode})")


# -- the gradient of E[f(b)] -----------------------------------------------------------------------

REPLICATES = 4096  # a power of 2: the surrogate's mean over replicates, 1/R, is exact in bfloat16
X_B = torch.tensor([5.0, -1.3, 2.7], dtype=torch.float64)  # -1.3 and 2.7 are rounded by bfloat16
X_C = torch.tensor([0.3, -3.1, 1.9], dtype=torch.float64)
VALUES = torch.tensor([0.25, 5.0, 1.5], dtype=torch.float64)  # exact in bfloat16


def _bernoulli_exact(x: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(x)
    return (p * (1 - 0.75) ** 2 * 4 + (1 - p) * 0.75 ** 2 * 4).sum()  # E[4 (b - 0.75)^2]


def _categorical_exact(x: torch.Tensor) -> torch.Tensor:
    return (torch.softmax(x, -1) * VALUES).sum()


@pytest.mark.parametrize("kind", ["bernoulli", "onehot"])
@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_gradient_in_bfloat16_is_unbiased(name, kind):
    """REBAR's and RELAX's gradient with bfloat16 parameters against the exact gradient of the model the
    bfloat16 logits define (computed in float64). The Bernoulli's at α = 5 was -0.00027 instead of
    -0.016 (z = 149): the bounded noise, and the conditional noise z̃ | b, computed from a bfloat16
    p = σ(5) (1 - p = 0.0078, not 0.0067); l's derivative b - σ(α) is computed in float32 too."""
    torch.manual_seed(2)
    theta, exact = (X_B, _bernoulli_exact) if kind == "bernoulli" else (X_C, _categorical_exact)
    theta = theta.to(BF16)
    est = storch.estimator(name, plate="z")
    with storch.Graph():
        leaf, x = replicate(theta, REPLICATES)
        if kind == "bernoulli":
            b = est(Bernoulli(logits=x))
            storch.add_cost((((b - 0.75) ** 2) * 4).sum(-1))
        else:
            b = est(OneHotCategorical(logits=x))
            storch.add_cost((b * VALUES.to(BF16)).sum(-1))
        assert b.tensor.dtype == BF16
        (got,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert got.dtype == BF16
    x0 = theta.double().requires_grad_(True)  # the bfloat16-rounded logits, in float64
    (want,) = torch.autograd.grad(exact(x0), x0)
    assert math.isfinite(float(got.double().abs().max()))
    assert_unbiased(got.double(), want, f"{name} {kind} gradient in bfloat16")
