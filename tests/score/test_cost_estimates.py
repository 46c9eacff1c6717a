"""storch.cost_estimates(): the weighted estimate of each cost, for logging (issue 20).

Plates can hold entries that are not samples of p (score's greedy entry, sum_and_sample's memory
and rejected samples, unordered_set's weight-0 padding); averaging a cost's samples by hand counts
them. cost_estimates() reduces each cost as the surrogate does.
"""

import contextlib
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


@pytest.mark.parametrize("options", [dict(n_samples=4, baseline="greedy"), dict(n_samples=2, buffer=2, n_enumerate=2)],
                         ids=["greedy", "mapo"])
@pytest.mark.parametrize("no_grad", [False, True])
def test_cost_estimates_before_backward_leave_the_gradient_alone(options, no_grad):
    """cost_estimates() built the partition's views (cumulative L_t) and weights under no_grad and cached them:
    the next storch.backward() then had a loss without grad ("element 0 of tensors does not require grad").
    Found by porting a TSP policy, which logs its greedy and MAPO costs with it as the docs say."""
    name = "score" if "baseline" in options else "sum_and_sample"
    d = torch.tensor([[0.0, 1.0, 2.0, 1.5], [1.0, 0.0, 1.2, 0.7], [2.0, 1.2, 0.0, 0.9], [1.5, 0.7, 0.9, 0.0]])
    grads = []
    for log in (False, True):
        torch.manual_seed(0)
        theta = torch.zeros(4, requires_grad=True)
        est = storch.estimator(name, plate="tour", **options)
        with storch.Graph():
            a = est(Categorical(logits=theta))
            b = est(Categorical(logits=theta.masked_fill(F.one_hot(a, 4).bool(), -math.inf)))
            storch.add_cost(d[a, b], name="step1")
            c = est(Categorical(logits=theta.masked_fill(F.one_hot(a, 4).bool() | F.one_hot(b, 4).bool(), -math.inf)))
            storch.add_cost(d[b, c], name="step2")
            if log:
                with torch.no_grad() if no_grad else contextlib.nullcontext():
                    assert set(storch.cost_estimates()) == {"step1", "step2"}
            storch.backward()
        grads.append(theta.grad)
    assert torch.equal(grads[0], grads[1])
