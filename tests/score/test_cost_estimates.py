"""storch.cost_estimates(): the weighted estimate of each cost, for logging (issue 20).

Plates can hold entries that are not samples of p (score's greedy entry, sum_and_sample's memory
and rejected samples, unordered_set's weight-0 padding); averaging a cost's samples by hand counts
them. cost_estimates() reduces each cost as the surrogate does.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical

import storch

torch.set_default_dtype(torch.float64)
COST = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


def test_greedy_entry_is_not_averaged():
    torch.manual_seed(0)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="greedy")
    theta = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        c = ((z - 0.45) ** 2).sum()
        storch.add_cost(c, name="f")
        assert c.plates[0].size == 5  # 4 samples + the evaluation-only greedy entry
        est_f = storch.cost_estimates()["f"]
        torch.testing.assert_close(est_f, c.tensor[:4].mean())  # the 4 samples only
        assert float(storch.surrogate_loss().detach()) == pytest.approx(float(est_f))


def test_unordered_set_and_sum_and_sample_give_the_weighted_estimate():
    theta = torch.tensor([0.2, 0.0, -0.5, 0.0, 1.0], requires_grad=True)
    forbid = torch.tensor([False, True, False, True, False])
    p = torch.softmax(theta.masked_fill(forbid, -math.inf), -1)
    for name, options in [("unordered_set", dict(n_samples=4)), ("sum_and_sample", dict(n_enumerate=4))]:
        est = storch.estimator(name, plate="z", **options)
        with storch.Graph():
            z = est(Categorical(logits=theta.masked_fill(forbid, -math.inf)))
            storch.add_cost(F.one_hot(z, 5).double() @ COST, name="c")
            storch.add_cost(F.one_hot(z, 5).double() @ COST * 0.0 + 1.0, name="one")
            got = storch.cost_estimates()
            # the whole (3-value) support: exact
            torch.testing.assert_close(got["c"], (p * COST).sum().detach())
            torch.testing.assert_close(got["one"], torch.tensor(1.0))
            assert float(storch.surrogate_loss().detach()) == pytest.approx(float(got["c"] + got["one"]))


def test_two_costs_of_one_name_are_summed():
    est = storch.estimator("score", plate="z", n_samples=3)
    with storch.Graph():
        z = est(Bernoulli(logits=torch.zeros(2)))
        storch.add_cost(z.sum(), name="c")
        storch.add_cost(2.0 * z.sum(), name="c")
        torch.testing.assert_close(storch.cost_estimates()["c"], 3.0 * z.tensor.sum(-1).mean())
