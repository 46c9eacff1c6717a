"""Helpers that read score's baseline option from another module (tests/score/test_baseline_option_reads.py), and
the hand-written leave-one-out gradient the tests of such overrides compare with."""

import torch
from torch.distributions import Bernoulli

import storch
import storch_score


def half_of_the_option(est, node, cost):
    b = storch_score.Score.baseline(est, node, cost)
    return None if b is None else 0.5 * b


class OptionMixin:
    """A mixin listed after Score in a subclass's bases: its helper sits after Score in the MRO."""

    def option_baseline(self, node, cost):
        return storch_score.Score.baseline(self, node, cost)


def assert_leave_one_out_gradient(make, factor: float, seed: int, dtype=torch.float32) -> None:
    """The gradient of ``make(plate, n_samples, baseline)`` (a Score subclass, built with baseline="leave_one_out")
    on two coins with cost Σ (z - 0.2)², against the one by hand: Σ_j (c_j - factor·b_j) ∇log p(x_j) / n, b_j the
    leave-one-out mean of the other samples' costs (``factor`` 1: the option's baseline; 0.5: half of it)."""
    theta = torch.tensor([0.3, -0.2], dtype=dtype, requires_grad=True)
    torch.manual_seed(seed)
    with storch.Graph():
        z = make(plate="z", n_samples=4, baseline="leave_one_out")(Bernoulli(logits=theta))
        storch.add_cost(((z - 0.2) ** 2).sum(), name="f")
        (got,) = torch.autograd.grad(storch.surrogate_loss(), theta)
        x = z.tensor.detach()
    c = ((x - 0.2) ** 2).sum(-1)
    b = factor * (c.sum() - c) / 3
    (want,) = torch.autograd.grad(((c - b) * Bernoulli(logits=theta).log_prob(x).sum(-1)).mean(), theta)
    torch.testing.assert_close(got, want)
