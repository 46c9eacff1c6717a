"""A temperature schedule is evaluated at each call: one that reads a value the user changes gives the next call
its new τ, eagerly and compiled, and current_temperature() reports what that call uses."""

import pytest
import torch
from torch.distributions import OneHotCategorical

import storch


def _setup(temperature):
    est = storch.estimator("gumbel_softmax", plate="z", temperature=temperature)
    theta = torch.tensor([[0.3, -0.4, 0.8], [0.1, 0.5, -0.2]], requires_grad=True)

    def step(theta):
        with storch.Graph():
            z = est(OneHotCategorical(logits=storch.denote_independent(theta, 0, "data")))
            storch.add_cost((z * torch.tensor([1.0, -2.0, 3.0])).sum(-1) ** 2, name="f")
            return storch.surrogate_loss()
    return est, theta, step


def _grad(f, theta, seed):
    torch.manual_seed(seed)
    loss = f(theta)
    g, = torch.autograd.grad(loss, theta)
    loss.detach()
    return g


@pytest.mark.parametrize("compiled", [False, True])
def test_a_schedule_reading_a_changed_value_gives_the_next_call_its_tau(compiled):
    # found by porting: the schedule was evaluated at the previous update, so the call after scale[0] = 0.25 still
    # used τ = 1 (gradient difference 0.09), while current_temperature() reported 0.25
    scale = [1.0]
    est, theta, step = _setup(lambda t: scale[0])
    f = storch.compile(step, backend=None) if compiled else step
    for seed in range(2):
        torch.manual_seed(seed)
        f(theta).backward()  # two updates of the schedule's step
    scale[0] = 0.25
    assert est.current_temperature() == 0.25
    got = _grad(f, theta, 5)
    _, theta25, step25 = _setup(0.25)
    _, theta1, step1 = _setup(1.0)
    torch.testing.assert_close(got, _grad(step25, theta25, 5))
    assert not torch.allclose(got, _grad(step1, theta1, 5))
