"""Gumbel-softmax and straight-through: measured bias vs temperature, forward values, annealing."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch

from relaxed_problems import TOY_THETA, estimates, exact_derivatives, toy_exact, toy_model

N = 20000


def gradient_bias(name: str, tau: float, theta: torch.Tensor):
    est = storch.estimator(name, plate="b", temperature=tau)
    g = estimates(lambda x: toy_model(est, x), theta, 1, n=N)[0]
    exact = exact_derivatives(toy_exact, theta, 1)[0]
    bias = g.mean(0) - exact
    stderr = g.std(0) / math.sqrt(N)
    return bias, stderr


@pytest.mark.parametrize("name", ["gumbel_softmax", "gumbel_straight_through"])
def test_bias_shrinks_as_temperature_falls(name):
    """At the toy's start θ = 0 (p = 1/2, as in the REBAR toy) the bias shrinks from τ = 2 to 0.5.

    At the asymmetric θ = (0.3, -0.5, 1.0) the gradient bias is NOT monotone in τ: it is larger at
    0.5 than at 2.0 (measured and printed here), and only shrinks once τ is small (0.1).
    """
    torch.manual_seed(20)
    zero = torch.zeros(3, dtype=torch.float64)
    rows = {}
    for label, theta in [("theta=0", zero), ("theta=toy", TOY_THETA)]:
        for tau in (0.1, 0.5, 2.0):
            bias, se = gradient_bias(name, tau, theta)
            rows[label, tau] = (float(bias.norm()), bias, se)
            print(f"{name} {label} tau={tau}: bias={bias.numpy().round(5)} stderr={se.numpy().round(5)} "
                  f"|bias|={bias.norm():.5f}")
    b05, b20 = rows["theta=0", 0.5], rows["theta=0", 2.0]
    assert (b20[1].abs() / b20[2]).max() > 4, "the bias at τ = 2 must be measurable"
    assert b05[0] < b20[0], f"|bias| at τ=0.5 ({b05[0]:.5f}) should be below τ=2.0 ({b20[0]:.5f})"
    b01 = rows["theta=toy", 0.1][0]
    assert b01 < rows["theta=toy", 0.5][0] and b01 < rows["theta=toy", 2.0][0]


def test_value_bias_shrinks_as_temperature_falls():
    """The relaxed objective E[f(z)] approaches E[f(b)] as τ falls (gumbel_softmax)."""
    torch.manual_seed(21)
    exact = float(toy_exact(TOY_THETA))
    gaps = {}
    for tau in (2.0, 0.5, 0.1):
        est = storch.estimator("gumbel_softmax", plate="b", temperature=tau)
        with storch.Graph():
            _, x = storch.testing.replicate(TOY_THETA, N)
            toy_model(est, x)
            gaps[tau] = abs(float(storch.surrogate_loss().detach()) - exact)
    print("gumbel_softmax |E f(z) - E f(b)|:", gaps)
    assert gaps[0.1] < gaps[0.5] < gaps[2.0]


def test_straight_through_forward_values_are_one_hot():
    torch.manual_seed(22)
    est = storch.estimator("gumbel_straight_through", plate="b", n_samples=N, temperature=0.7)
    with storch.Graph():
        b = est(Bernoulli(logits=TOY_THETA))
        raw = b.tensor
    assert set(raw.unique().tolist()) <= {0.0, 1.0}
    p, mean = torch.sigmoid(TOY_THETA), raw.mean(0)
    assert ((mean - p).abs() < 4 * (p * (1 - p) / N).sqrt()).all()  # exact Bernoulli samples
    for d in (Categorical(logits=torch.randn(4, 5)), OneHotCategorical(logits=torch.randn(4, 5))):
        est = storch.estimator("gumbel_straight_through", plate="z", n_samples=50, temperature=2.0,
                               categorical="one_hot")
        with storch.Graph():
            z = est(d)
            assert z.shape == (4, 5)  # Categorical nodes taken with categorical="one_hot" hand out one-hot vectors
            raw = z.tensor
        assert set(raw.unique().tolist()) <= {0.0, 1.0}
        assert (raw.sum(-1) == 1).all()


def test_straight_through_gradient_flows():
    theta = TOY_THETA.clone().requires_grad_(True)
    est = storch.estimator("gumbel_straight_through", plate="b", temperature=0.5)
    with storch.Graph():
        toy_model(est, theta)
        storch.backward()
    assert theta.grad is not None and theta.grad.abs().sum() > 0


def test_gumbel_softmax_categorical_is_relaxed_one_hot():
    torch.manual_seed(23)
    for d in (Categorical(logits=torch.randn(4, 5)), OneHotCategorical(logits=torch.randn(4, 5))):
        est = storch.estimator("gumbel_softmax", plate="z", n_samples=10, temperature=0.5, categorical="one_hot")
        with storch.Graph():
            z = est(d)
            assert z.shape == (4, 5)
            raw = z.tensor
        assert ((raw > 0) & (raw < 1)).all()
        assert torch.allclose(raw.sum(-1), torch.ones(()))


def test_annealing_schedule():
    schedule = lambda step: max(0.25, 2.0 * 0.5 ** step)  # noqa: E731
    est = storch.estimator("gumbel_softmax", plate="b", temperature=schedule)
    seen = []
    for _ in range(5):
        seen.append(est.current_temperature())
        with storch.Graph():
            toy_model(est, TOY_THETA.clone().requires_grad_(True))
            storch.backward()
    assert seen == [2.0, 1.0, 0.5, 0.25, 0.25] and est.step == 5
    bad = storch.estimator("gumbel_softmax", plate="b", temperature=lambda step: -1.0)
    with pytest.raises(storch.OptionError, match="schedule returned -1.0"):
        bad(Bernoulli(logits=TOY_THETA))
    storch.reset()


@pytest.mark.parametrize("pattern", ["sum", "orders"])
def test_annealing_counts_a_step_once_when_one_pass_reaches_two_of_its_surrogates(pattern):
    """``step`` counts training steps: (main + 0 * storch.surrogate_loss()).backward() (or an order-1 plus
    an order-2 surrogate) reached two update probes and advanced the schedule two steps per step."""
    schedule = lambda step: max(0.25, 2.0 * 0.5 ** step)  # noqa: E731
    est = storch.estimator("gumbel_softmax", plate="b", temperature=schedule)
    seen = []
    for _ in range(3):
        seen.append(est.current_temperature())
        with storch.Graph():
            toy_model(est, TOY_THETA.clone().requires_grad_(True))
            if pattern == "sum":
                (storch.surrogate_loss() + 0.0 * storch.surrogate_loss()).backward()
            else:
                (storch.surrogate_loss(order=1) + 0.0 * storch.surrogate_loss(order=2)).backward()
    assert seen == [2.0, 1.0, 0.5] and est.step == 3
