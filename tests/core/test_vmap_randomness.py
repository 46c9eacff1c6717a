"""Which ``torch.func.vmap`` randomness runs a whole storch step (``vmap(grad(step), randomness=...)``).

docs/plates.md and storch's refusals presented ``vmap(grad(step), randomness="different")`` as the way to transform a
whole step; it fails for a reparameterized Normal: torch's ``Normal.rsample`` fills a new tensor in place
(``normal_``), which vmap can only do with one draw for every member (review of round 12). What runs depends on
how torch's sampler draws: samplers that take the distribution's parameters (``sample()`` of Bernoulli, Categorical,
Normal: a score-function estimator's draws) run with ``"different"`` (each member its own draws) and with ``"same"``
only where the members' parameters are equal; ``Normal.rsample`` runs with ``"same"`` only (the members share the
noise). This file checks that table, each refusal's advice, and that what runs is unbiased (z-tests against the exact
gradient per member).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch
from storch.testing import assert_unbiased

D = torch.float64
TARGET = 0.3


class _Score(storch.Estimator):
    """The base class's components (the score function, no baseline): the core test env has no storch_score."""

    name = "test_core_vmap_randomness_score"


def _estimator(kind):
    if kind == "reparameterization":
        return storch.estimator("reparameterization", plate="z", n_samples=4)
    return _Score("z", n_samples=4)


DISTRIBUTIONS = {
    "Bernoulli": lambda t: Bernoulli(logits=t),
    "Categorical": lambda t: Categorical(logits=torch.stack((torch.zeros_like(t), t), -1)),
    "Normal": lambda t: Normal(t, torch.ones_like(t)),
}


def _step(kind, family):
    est = _estimator(kind)

    def step(theta):
        with storch.Graph():
            z = est(DISTRIBUTIONS[family](theta))
            storch.add_cost(((z.to(D) - TARGET) ** 2).sum(), name="c")
            return storch.surrogate_loss()

    return step


def _exact(family, theta):
    """d/dθ E[(z - 0.3)²] per entry: Bernoulli and Categorical (z = 1 with probability σ(θ)): 0.4 σ'(θ);
    Normal(θ, 1): 2 (θ - 0.3)."""
    if family == "Normal":
        return 2 * (theta - TARGET)
    p = torch.sigmoid(theta)
    return ((1 - TARGET) ** 2 - TARGET ** 2) * p * (1 - p)


THETA = torch.tensor([0.4, -0.7], dtype=D)
RUNS = [("score", "Bernoulli", "different"), ("score", "Categorical", "different"), ("score", "Normal", "different"),
        ("reparameterization", "Normal", "same")]


@pytest.mark.parametrize("kind,family,randomness", RUNS, ids=["-".join(r) for r in RUNS])
def test_the_randomness_that_runs_a_step_gives_unbiased_per_member_gradients(kind, family, randomness):
    torch.manual_seed(0)
    grad = torch.func.vmap(torch.func.grad(_step(kind, family)), randomness=randomness)
    # members with different parameters (their parameters are batched): each member's gradient at its own θ
    members = torch.stack((THETA, THETA.flip(0)))
    calls = torch.stack([grad(members) for _ in range(300)])  # (call, member, entry): the calls are independent
    for m in range(2):
        assert_unbiased(calls[:, m], _exact(family, members[m]), f"{kind} {family} {randomness}: member {m}")
    # member m's gradient per entry is the mean of 2(θ_m + ε - 0.3) over its samples: the differences between the
    # members are 2(θ_0 - θ_1) exactly where they share the noise ε ("same"), not where each draws its own
    shared = torch.allclose(calls[:, 0] - calls[:, 1], (2 * (members[0] - members[1])).expand(300, 2))
    if family == "Normal":
        assert shared == (randomness == "same")


@pytest.mark.parametrize("family", sorted(DISTRIBUTIONS))
def test_a_score_function_draw_under_same_randomness_runs_only_for_equal_parameters(family):
    step = _step("score", family)
    with pytest.raises(storch.StorchError, match=rf"cannot draw from {family} inside torch\.func\.vmap\(randomness="
                                                 r"'same'\) with parameters that differ.*Use randomness='different'"):
        torch.func.vmap(torch.func.grad(step), randomness="same")(torch.stack((THETA, THETA + 1)))
    # parameters the members share (vmapped over a cost weight only): one draw for all, so equal gradients
    torch.manual_seed(1)
    g = torch.func.vmap(lambda w: torch.func.grad(lambda t: step(t) * w)(THETA), randomness="same")(
        torch.ones(3, dtype=D))
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


@pytest.mark.parametrize("batched", [True, False])
def test_a_reparameterized_normal_under_different_randomness_says_to_use_same(batched):
    step = _step("reparameterization", "Normal")
    run = (lambda: torch.func.vmap(torch.func.grad(step), randomness="different")(torch.stack((THETA, THETA)))) \
        if batched else (lambda: torch.func.vmap(lambda w: torch.func.grad(lambda t: step(t) * w)(THETA),
                                                 randomness="different")(torch.ones(2, dtype=D)))
    with pytest.raises(storch.StorchError, match=r"cannot draw from Normal inside torch\.func\.vmap\(randomness="
                                                 r"'different'\): torch's sampler for it fills a new tensor.*"
                                                 r"Use randomness='same'"):
        run()


@pytest.mark.parametrize("kind,family", [("score", "Bernoulli"), ("reparameterization", "Normal")])
def test_the_default_randomness_error_says_which_randomness_each_draw_takes(kind, family):
    with pytest.raises(storch.StorchError, match=r"(?s)default randomness='error'.*randomness='different'.*"
                                                 r"Bernoulli, Categorical.*Normal's rsample.*randomness='same'") as info:
        torch.func.vmap(torch.func.grad(_step(kind, family)))(torch.stack((THETA, THETA)))
    assert "gives unbiased per-example gradients" not in str(info.value)
