"""score's nodes on the plain-node path (issue 19, ``storch.estimators.first_steps._plain_node``): taken from the second
step with no baseline, leave-one-out, a moving average and a learned baseline (whose update counter, set every
step, keeps the decision), with the general path's gradients and moving averages bitwise; not taken with the greedy baseline
(its extra evaluation entry has weight 0: the weights are not uniform)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from path_probes import calls


def _train_step(est, theta, x, seed, force_general):
    if force_general:  # the general path for this call: the decision says "not plain" for the type
        est.__dict__["_storch_plain"] = {Bernoulli: False}
    torch.manual_seed(seed)
    theta.grad = None
    with storch.Graph():
        data = storch.denote_independent(x, 0, "data")
        z, seen = calls(lambda: est(Bernoulli(logits=data * theta), inputs=data))
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")
        storch.backward()
    return "_plain_node" in seen, theta.grad.clone()


@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average", "learned"])
def test_score_nodes_are_plain_with_the_general_paths_gradients(baseline):
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    theta_a = torch.randn(3, requires_grad=True)
    theta_b = theta_a.detach().clone().requires_grad_(True)
    torch.manual_seed(1)
    plain = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
    torch.manual_seed(1)
    general = storch.estimator("score", plate="z", n_samples=4, baseline=baseline)
    paths = []
    for step in range(4):
        took, g_a = _train_step(plain, theta_a, x, step, False)
        took_b, g_b = _train_step(general, theta_b, x, step, True)
        paths.append(took)
        assert not took_b
        assert torch.equal(g_a, g_b)
        assert plain.moving_averages.keys() == general.moving_averages.keys()
        for k in plain.moving_averages:
            assert torch.equal(plain.moving_averages[k], general.moving_averages[k])
    assert paths == [False, True, True, True]
    if baseline == "moving_average":
        assert plain.moving_averages
    if baseline == "learned":  # update_steps set at every step: the decision is kept
        assert plain.update_steps == general.update_steps == 4
        for p, q in zip(plain.parameters(), general.parameters()):
            assert torch.equal(p, q)


def test_greedy_baseline_is_not_plain():
    torch.manual_seed(0)
    x = torch.randn(5, 3)
    theta = torch.randn(3, requires_grad=True)
    est = storch.estimator("score", plate="z", n_samples=4, baseline="greedy")
    assert [_train_step(est, theta, x, s, False)[0] for s in range(3)] == [False] * 3
    assert est.__dict__["_storch_plain"] == {Bernoulli: False}


def _episode(est, theta, seed, force_general, steps=6):
    """A policy's episode (one score call per step, the next logits read from the last action, a cost per step):
    the paths of its steps (``storch.estimators.partition_steps._plain_step`` or not) and the gradient."""
    if force_general:
        est.__dict__["_storch_plain"] = {Bernoulli: False}
    torch.manual_seed(seed)
    theta.grad = None
    plain = []
    with storch.Graph():
        s = theta[0]
        for t in range(steps):
            a, seen = calls(lambda: est(Bernoulli(logits=s)))
            plain.append("_plain_step" in seen)
            s = theta[1] + theta[2] * a
            storch.add_cost((0.9 ** t) * (a - 0.3) ** 2, name=f"r{t}")
        storch.backward()
    return plain, theta.grad.clone()


@pytest.mark.parametrize("baseline", ["none", "leave_one_out", "moving_average"])
def test_score_partition_steps_are_plain_with_the_general_paths_gradients(baseline):
    # the ipd benchmark's shape (issue 19): from step 2 of an episode the steps take the plain step, with the
    # gradients (and moving averages) of the general path bitwise
    torch.manual_seed(0)
    theta_a = torch.randn(3, requires_grad=True)
    theta_b = theta_a.detach().clone().requires_grad_(True)
    plain = storch.estimator("score", plate="episode", n_samples=5, baseline=baseline)
    general = storch.estimator("score", plate="episode", n_samples=5, baseline=baseline)
    for seed in range(3):
        took, g_a = _episode(plain, theta_a, seed, False)
        took_b, g_b = _episode(general, theta_b, seed, True)
        assert took == [False, False] + [True] * 4 and not any(took_b)
        assert torch.equal(g_a, g_b)
        assert plain.moving_averages.keys() == general.moving_averages.keys()
        for k in plain.moving_averages:
            assert torch.equal(plain.moving_averages[k], general.moving_averages[k])
