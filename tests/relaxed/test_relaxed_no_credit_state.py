"""A step whose only cost reading a node is added with ``credit=False`` (a discrete GAN's discriminator step) leaves
the trained control variate of LAX, RELAX and REBAR alone: φ, its Adam moments and step count, and update_steps are
unchanged, exactly, eagerly and in a compiled step (docs/partitions.md: such a loss stays out of estimator state, as
the moving average's and NVIL's do). Found by porting: ∂φ Σ ĝ² of such a step is exactly zero, yet Adam stepped φ
along its old moments and counted a step (η 1.010 -> 1.026 and update_steps 1 -> 4 over three discriminator steps),
so that k discriminator steps per generator step gave φ k stale steps per real one. A credited step still trains."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal

import storch

CASES = {
    "relax": ("relax", Bernoulli, {}),
    "relax_network": ("relax", Bernoulli, {"control_variate": "network"}),
    "rebar": ("rebar", Bernoulli, {}),
    "lax": ("lax", Normal, {}),
}


def _setup(case):
    name, dist, options = CASES[case]
    torch.manual_seed(0)
    est = storch.estimator(name, plate="x", n_samples=2, **options)
    theta = torch.tensor([[0.3, -0.5, 0.2], [0.1, 0.4, -0.7]], requires_grad=True)
    w = torch.tensor([0.8, -0.4, 0.6])

    def draw(theta):
        t = storch.denote_independent(theta, 0, "data")
        return est(Bernoulli(logits=t) if dist is Bernoulli else Normal(t, 1.0))

    def build(theta, credit: bool):
        x = draw(theta)
        score = (x * w).sum(-1)
        if credit:  # the generator's step: its loss credited to the samples
            storch.add_cost(-F.logsigmoid(score), name="g")
        else:  # the discriminator's: reads the samples (not detached) and θ, credit=False
            storch.add_cost(-F.logsigmoid(-score) + (theta ** 2).sum(), name="d", credit=False)

    return est, theta, build


def _state(est) -> tuple:
    opt = est._optimizer
    return ({k: v.detach().clone() for k, v in est.named_parameters()},
            None if opt is None else copy.deepcopy(opt.state_dict()),
            est.update_steps, est.skipped_updates)


def _assert_same(a, b):
    params_a, opt_a, *counts_a = a
    params_b, opt_b, *counts_b = b
    assert counts_a == counts_b
    assert params_a.keys() == params_b.keys()
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k
    assert opt_a is not None and opt_b is not None
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for i, s in opt_a["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b["state"][i][key])), (i, key)


def _eager(build, theta):
    def step(credit: bool):
        with storch.Graph():
            build(theta, credit)
            storch.backward()
    return step


def _compiled(build, theta):
    def run(theta, credit: bool):
        with storch.Graph():
            build(theta, credit)
            return storch.surrogate_loss()
    steps = {c: storch.compile(lambda t, c=c: run(t, c), backend=None) for c in (True, False)}

    def step(credit: bool):
        steps[credit](theta).backward()
    return step


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_credit_false_step_leaves_the_control_variate_alone(case, compiled):
    est, theta, build = _setup(case)
    _eager(build, theta)(True)  # a generator step, eager (a compiled step cannot build the network on first use)
    step = (_compiled if compiled else _eager)(build, theta)
    step(True)  # and one more: Adam has moments, φ has moved
    assert est.update_steps == 2
    before = _state(est)
    for _ in range(3):  # discriminator steps
        theta.grad = None
        step(False)
        assert theta.grad is not None  # (its loss was differentiated: θ's own term)
    _assert_same(_state(est), before)
    step(True)  # a credited step trains φ again
    assert est.update_steps == 3
    after = _state(est)[0]
    assert any(not torch.equal(after[k], v) for k, v in before[0].items())

