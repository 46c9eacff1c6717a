"""Which ``torch.func.vmap`` randomness runs a whole storch step (``vmap(grad(step), randomness=...)``).

docs/plates.md and storch's refusals presented ``vmap(grad(step), randomness="different")`` as the way to transform a
whole step; it fails for a reparameterized Normal: torch's ``Normal.rsample`` fills a new tensor in place
(``normal_``), which vmap can only do with one draw for every member (review of round 12). What runs depends on
how torch's sampler draws, one of four kinds (the table of docs/plates.md, one row a kind):

- a sampler that takes the distribution's parameters (``sample()`` of Bernoulli, Categorical, Normal, LogNormal;
  ``sample()`` and ``rsample()`` of Gamma): ``"different"`` runs (each member its own draws), ``"same"`` only where
  the members' parameters are equal;
- a sampler that fills a new tensor in place (``rsample()`` of Normal and LogNormal; ``sample()`` and ``rsample()``
  of Laplace, Cauchy, Exponential, MultivariateNormal, whose ``sample()`` is their ``rsample()`` without grad):
  ``"same"`` only (the members share the noise);
- a sampler that draws a new tensor (``torch.rand``: ``sample()`` and ``rsample()`` of Uniform and Gumbel): both
  (``"different"`` independent, ``"same"`` shared);
- Beta and Dirichlet, whose sampler is an ``autograd.Function`` torch.func cannot run: refused under every
  randomness and under ``torch.func.grad`` itself.

This file checks that table, each refusal's advice, and that what runs is unbiased (z-tests against the exact
gradient per member).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import (Bernoulli, Beta, Categorical, Cauchy, Dirichlet, Exponential, Gamma, Gumbel, Laplace,
                                 LogNormal, MultivariateNormal, Normal, Uniform)

import storch
from storch.testing import assert_unbiased

D = torch.float64
TARGET = 0.3
EULER = 0.5772156649015329


class _Score(storch.Estimator):
    """The base class's components (the score function, no baseline): the core test env has no storch_score."""

    name = "test_core_vmap_randomness_score"


def _estimator(kind):
    if kind == "reparameterization":
        return storch.estimator("reparameterization", plate="z", n_samples=4)
    return _Score("z", n_samples=4)


def _square(z):
    return ((z - TARGET) ** 2).sum()


def _binary(t):
    """d/dθ E[(z - 0.3)²], z = 1 with probability σ(θ): 0.4 σ'(θ)."""
    p = torch.sigmoid(t)
    return ((1 - TARGET) ** 2 - TARGET ** 2) * p * (1 - p)


def _gamma(t):
    """Gamma(α = e^θ, 1): E[(z - 0.3)²] = α + (α - 0.3)², so d/dθ = α (1 + 2 (α - 0.3))."""
    a = t.exp()
    return a * (1 + 2 * (a - TARGET))


# family: (the distribution of θ, the cost of a sample, the exact d/dθ of the expected cost per entry of θ)
DISTRIBUTIONS = {
    "Bernoulli": (lambda t: Bernoulli(logits=t), _square, _binary),
    "Categorical": (lambda t: Categorical(logits=torch.stack((torch.zeros_like(t), t), -1)), _square, _binary),
    "Normal": (lambda t: Normal(t, torch.ones_like(t)), _square, lambda t: 2 * (t - TARGET)),
    # E z = e^(θ + 1/2)
    "LogNormal": (lambda t: LogNormal(t, torch.ones_like(t)), lambda z: z.sum(), lambda t: (t + 0.5).exp()),
    "Gamma": (lambda t: Gamma(t.exp(), torch.ones_like(t)), _square, _gamma),
    # variance 2: d/dθ = 2 (θ - 0.3)
    "Laplace": (lambda t: Laplace(t, torch.ones_like(t)), _square, lambda t: 2 * (t - TARGET)),
    # no mean: E cos z = Re φ(1) = e^(-1) cos θ
    "Cauchy": (lambda t: Cauchy(t, torch.ones_like(t)), lambda z: torch.cos(z).sum(), lambda t: -math.exp(-1) * t.sin()),
    # rate λ = e^θ: E[(z - 0.3)²] = 2/λ² - 0.6/λ + 0.09
    "Exponential": (lambda t: Exponential(t.exp()), _square, lambda t: -4 * (-2 * t).exp() + 0.6 * (-t).exp()),
    "MultivariateNormal": (lambda t: MultivariateNormal(t, torch.eye(2, dtype=D)), _square, lambda t: 2 * (t - TARGET)),
    # mean θ + 1/2 (reparameterization only: the support depends on θ, which the score function refuses)
    "Uniform": (lambda t: Uniform(t, t + 1), _square, lambda t: 2 * (t + 0.5 - TARGET)),
    # mean θ + γ
    "Gumbel": (lambda t: Gumbel(t, torch.ones_like(t)), _square, lambda t: 2 * (t + EULER - TARGET)),
    "Beta": (lambda t: Beta(t.exp(), torch.ones_like(t)), lambda z: z.sum(), None),
    "Dirichlet": (lambda t: Dirichlet(t.exp()), lambda z: z[..., 0].sum(), None),
}


def _step(kind, family):
    est = _estimator(kind)
    make, cost, _ = DISTRIBUTIONS[family]

    def step(theta):
        with storch.Graph():
            z = est(make(theta))
            storch.add_cost(cost(z.to(D)), name="c")
            return storch.surrogate_loss()

    return step


THETA = torch.tensor([0.4, -0.7], dtype=D)
# the samplers of each kind (docs/plates.md's table)
PARAMETER_SAMPLERS = [("score", f) for f in ("Bernoulli", "Categorical", "Normal", "LogNormal", "Gamma")] + [
    ("reparameterization", "Gamma")]
INPLACE_SAMPLERS = [(k, f) for f in ("Laplace", "Cauchy", "Exponential", "MultivariateNormal")
                    for k in ("score", "reparameterization")] + [("reparameterization", f) for f in ("Normal", "LogNormal")]
FACTORY_SAMPLERS = [(k, f) for f in ("Gumbel",) for k in ("score", "reparameterization")] + [
    ("reparameterization", "Uniform")]
RUNS = ([(k, f, "different") for k, f in PARAMETER_SAMPLERS + FACTORY_SAMPLERS]
        + [(k, f, "same") for k, f in INPLACE_SAMPLERS + FACTORY_SAMPLERS])


@pytest.mark.parametrize("kind,family,randomness", RUNS, ids=["-".join(r) for r in RUNS])
def test_the_randomness_that_runs_a_step_gives_unbiased_per_member_gradients(kind, family, randomness):
    torch.manual_seed(0)
    grad = torch.func.vmap(torch.func.grad(_step(kind, family)), randomness=randomness)
    # members with different parameters (their parameters are batched): each member's gradient at its own θ
    members = torch.stack((THETA, THETA.flip(0)))
    calls = torch.stack([grad(members) for _ in range(300)])  # (call, member, entry): the calls are independent
    for m in range(2):
        assert_unbiased(calls[:, m], DISTRIBUTIONS[family][2](members[m]), f"{kind} {family} {randomness}: member {m}")
    # members with equal parameters: "same" shares the draws (equal gradients), "different" draws per member
    g = grad(torch.stack((THETA, THETA)))
    assert torch.equal(g[0], g[1]) == (randomness == "same")


@pytest.mark.parametrize("kind,family", PARAMETER_SAMPLERS, ids=["-".join(r) for r in PARAMETER_SAMPLERS])
def test_a_parameter_sampler_under_same_randomness_runs_only_for_equal_parameters(kind, family):
    step = _step(kind, family)
    with pytest.raises(storch.StorchError, match=rf"cannot draw from {family} inside torch\.func\.vmap\(randomness="
                                                 r"'same'\) with parameters that differ.*Use randomness='different'"):
        torch.func.vmap(torch.func.grad(step), randomness="same")(torch.stack((THETA, THETA + 1)))
    # parameters the members share (vmapped over a cost weight only): one draw for all, so equal gradients
    torch.manual_seed(1)
    g = torch.func.vmap(lambda w: torch.func.grad(lambda t: step(t) * w)(THETA), randomness="same")(
        torch.ones(3, dtype=D))
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


@pytest.mark.parametrize("kind,family,batched", [(k, f, True) for k, f in INPLACE_SAMPLERS]
                         + [("reparameterization", "Normal", False)])
def test_an_inplace_sampler_under_different_randomness_says_to_use_same(kind, family, batched):
    step = _step(kind, family)
    run = (lambda: torch.func.vmap(torch.func.grad(step), randomness="different")(torch.stack((THETA, THETA)))) \
        if batched else (lambda: torch.func.vmap(lambda w: torch.func.grad(lambda t: step(t) * w)(THETA),
                                                 randomness="different")(torch.ones(2, dtype=D)))
    with pytest.raises(storch.StorchError, match=rf"cannot draw from {family} inside torch\.func\.vmap\(randomness="
                                                 r"'different'\): torch's sampler for it fills a new tensor.*"
                                                 r"Use randomness='same'"):
        run()


@pytest.mark.parametrize("family", ["Beta", "Dirichlet"])
@pytest.mark.parametrize("kind", ["score", "reparameterization"])
def test_beta_and_dirichlet_are_refused_under_every_torch_func_transform(kind, family):
    """torch draws them through an autograd.Function without setup_context, which torch.func cannot run; torch's own
    error told the user to override a method of torch's class."""
    step = _step(kind, family)
    runs = [lambda: torch.func.grad(step)(THETA)] + [
        (lambda r=r: torch.func.vmap(torch.func.grad(step), randomness=r)(torch.stack((THETA, THETA))))
        for r in ("different", "same")]
    for run in runs:
        with pytest.raises(storch.StorchError, match=rf"(?s)cannot draw from {family} inside a torch\.func transform.*"
                                                     r"autograd\.Function.*under any randomness.*torch\.autograd\.grad"
                                                     r".*denote_independent"):
            run()
    # outside torch.func the same step runs
    theta = THETA.clone().requires_grad_(True)
    assert torch.isfinite(torch.autograd.grad(step(theta), theta)[0]).all()


@pytest.mark.parametrize("kind,family", [("score", "Bernoulli"), ("reparameterization", "Normal")])
def test_the_default_randomness_error_says_which_randomness_each_draw_takes(kind, family):
    with pytest.raises(storch.StorchError, match=r"(?s)default randomness='error'.*randomness='different'.*"
                                                 r"Bernoulli, Categorical.*Normal.*randomness='same'.*Laplace.*"
                                                 r"Uniform.*Gumbel.*Beta.*Dirichlet") as info:
        torch.func.vmap(torch.func.grad(_step(kind, family)))(torch.stack((THETA, THETA)))
    assert "gives unbiased per-example gradients" not in str(info.value)
