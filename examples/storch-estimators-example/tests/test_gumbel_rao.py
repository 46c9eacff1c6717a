"""Tests of the Gumbel-Rao estimator, written with storch.testing.

What Gumbel-Rao claims, and how each claim is checked against an exact value:
- its forward value is an unbiased estimate of E[f(x)] (the kit, order 0, against enumeration);
- its gradient has the expectation of the straight-through Gumbel-softmax gradient (z-test
  against that expectation computed by quadrature for Bernoulli; a two-sample z-test against
  plain straight-through Gumbel-softmax for OneHotCategorical);
- its variance does not exceed straight-through's and falls as n_gumbels grows (measured);
- the conditional noise is right: argmax(log p + G) is the sample, and G is Gumbel(0, 1).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch
import storch.testing as kit
from storch_example import GumbelRao
from storch_example.gumbel_rao import conditional_gumbels

F64 = torch.float64
THETA = torch.tensor([0.3, -0.8, 1.2], dtype=F64)
T = 0.45


def test_passes_the_conformance_kit():
    for options in ({"n_samples": 2}, {"n_samples": 1, "temperature": 0.3, "n_gumbels": 3}):
        report = kit.check_against_enumeration("gumbel_rao", options=options)
        print("\n" + report.table())
        assert report.orders == (0,)  # biased: only the forward value is claimed unbiased
        assert {c.name for c in report.checks} == {
            "bernoulli[3], order 0", "onehot[K=5], order 0", "chain[Bernoulli], order 0",
            "independent[Bernoulli], order 0",  # (the kit's Independent model: the wrapper is read through)
            "onehot[2x2], order 0",  # (two one-hot elements: each with its own probabilities)
            "global_latent[Bernoulli], order 0",  # (a global latent outside the costs' data plate)
            "elbo[Bernoulli], order 0"}  # (two costs of one frame on one node: log q and -log p)


def test_its_names_are_its_own():
    # a name or alias claimed by two installed packages (a first-party one included) is unusable for both:
    # run with the first-party families installed too (docs/writing-an-estimator.md, section 4)
    for name in (GumbelRao.name, *GumbelRao.aliases):
        assert storch.get_estimator_class(name) is GumbelRao


def test_forward_value_satisfies_condition_1():
    report = kit.check_conditions("gumbel_rao", lambda th: Bernoulli(logits=th), THETA,
                                  lambda x: ((x - T) ** 2).sum())
    print("\n" + report.table())
    assert report.orders == (0,) and report.ok


# -- the conditional noise --------------------------------------------------------------------


def test_conditional_gumbels_give_the_sample_and_are_gumbel_distributed():
    torch.manual_seed(0)
    logp = torch.log_softmax(torch.tensor([1.5, -0.3, 0.2, -2.0, 0.0], dtype=F64), -1)
    hard = OneHotCategorical(logits=logp).sample((20000,))
    g = conditional_gumbels(logp, hard, 1)[0]
    assert torch.equal((logp + g).argmax(-1), hard.argmax(-1))
    # x ~ p and then G | x is the same as G ~ Gumbel(0, 1): mean γ, variance π²/6
    euler = 0.5772156649015329
    kit.assert_unbiased(g, euler, "E[G]")
    kit.assert_unbiased((g - euler) ** 2, math.pi ** 2 / 6, "Var[G]")


def test_extreme_logits_stay_finite():
    logits = torch.tensor([[300.0, -300.0, 0.0], [-1e4, 1e4, 5.0]])
    est = GumbelRao("z", n_gumbels=4)
    with storch.Graph():
        theta = logits.clone().requires_grad_(True)
        z = est(OneHotCategorical(logits=theta))
        storch.add_cost((z * torch.tensor([1.0, 2.0, 3.0])).sum())
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert torch.isfinite(g).all()


# -- the gradient's expectation: the straight-through Gumbel-softmax gradient ------------------


def _st_expected_gradient(theta: torch.Tensor, tau: float, points: int = 400) -> torch.Tensor:
    """E[∂/∂θ_i Σ_j (b_j - t)²] for straight-through Gumbel-softmax on independent Bernoullis.

    With logistic noise L = logit(u), u ~ U(0, 1): b = 1[θ + L > 0], y = σ((θ + L)/τ), and the
    straight-through gradient is 2(b - t) · y(1 - y)/τ. Integrate over u with Gauss-Legendre on
    each side of the jump at u0 = σ(-θ).
    """
    x, w = np.polynomial.legendre.leggauss(points)
    out = []
    for th in theta.tolist():
        u0 = 1.0 / (1.0 + math.exp(th))
        total = 0.0
        for lo, hi, b in ((0.0, u0, 0.0), (u0, 1.0, 1.0)):
            u = (hi - lo) / 2 * x + (hi + lo) / 2
            y = 1.0 / (1.0 + np.exp(-(th + np.log(u) - np.log1p(-u)) / tau))
            total += (hi - lo) / 2 * np.sum(w * 2 * (b - T) * y * (1 - y) / tau)
        out.append(total)
    return torch.tensor(out, dtype=F64)


def _gradients(est, n: int = 4000, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    with storch.Graph():
        leaf, th = kit.replicate(THETA, n)
        b = est(Bernoulli(logits=th))
        storch.add_cost(((b - T) ** 2).sum())
        (g,) = kit.per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    return g


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_gradient_has_the_straight_through_expectation_and_less_variance(tau):
    exact = _st_expected_gradient(THETA, tau)
    assert torch.allclose(exact, _st_expected_gradient(THETA, tau, 800), rtol=1e-9)  # quadrature converged
    variances = {}
    for m in (1, 10):
        g = _gradients(GumbelRao("z", temperature=tau, n_gumbels=m))
        report = kit.assert_unbiased(g, exact, f"gumbel_rao tau={tau} n_gumbels={m}")
        variances[m] = report.variance
        print(f"\n{report.table()}")
    exact_loss_grad = torch.func.grad(lambda t: (torch.sigmoid(t) * (1 - T) ** 2 + torch.sigmoid(-t) * T ** 2).sum())(THETA)
    print(f"tau={tau}: straight-through expectation {exact.tolist()}, true gradient {exact_loss_grad.tolist()}")
    print(f"tau={tau}: variance n_gumbels=1 {variances[1].tolist()}, n_gumbels=10 {variances[10].tolist()}")
    assert (variances[10] < variances[1]).all()


def _plain_straight_through(logits: torch.Tensor, v: torch.Tensor, tau: float, n: int) -> torch.Tensor:
    """n straight-through Gumbel-softmax gradients of v·x in plain torch (unconditional noise)."""
    theta = logits.expand(n, -1).clone().requires_grad_(True)
    g = -torch.log(-torch.log(torch.rand_like(theta)))
    y = torch.softmax((theta + g) / tau, -1)
    hard = torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(y)
    cost = (((hard + y - y.detach()) * v).sum(-1) - 0.4) ** 2
    return torch.autograd.grad(cost.sum(), theta)[0]


def test_onehot_gradient_matches_plain_straight_through_in_expectation():
    logits = torch.tensor([0.2, -0.4, 0.9, 0.0, -1.1], dtype=F64)
    v = torch.tensor([1.0, -0.5, 2.0, 0.3, -1.2], dtype=F64)
    torch.manual_seed(1)
    plain = _plain_straight_through(logits, v, 0.7, 20000)
    torch.manual_seed(2)
    with storch.Graph():
        leaf, th = kit.replicate(logits, 20000)
        x = GumbelRao("z", temperature=0.7, n_gumbels=8)(OneHotCategorical(logits=th))
        storch.add_cost(((x * v).sum() - 0.4) ** 2)
        (rao,) = kit.per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    z = (rao.mean(0) - plain.mean(0)) / (rao.var(0) / len(rao) + plain.var(0) / len(plain)).sqrt()
    print(f"\ntwo-sample z per logit: {z.tolist()}")
    print(f"variance plain straight-through {plain.var(0).tolist()}\nvariance gumbel_rao@8 {rao.var(0).tolist()}")
    assert (z.abs() < 4).all()
    assert (rao.var(0) <= plain.var(0)).all()


def test_infinite_bernoulli_logits_are_pinned_bits():
    # logit -inf: the bit is always 0, +inf: always 1 (torch's sample); its relaxation is its sample, so its value is
    # the bit and its gradient 0 (as gumbel_softmax's); the free bit's gradient is the one it has alone. Before:
    # log_softmax((0, inf)) is NaN, and the -inf bit's noise inf - inf: the samples were NaN
    theta = torch.tensor([-math.inf, 0.3, math.inf], dtype=F64)
    torch.manual_seed(0)
    with storch.Graph():
        leaf, th = kit.replicate(theta, 4000)
        b = GumbelRao("z", temperature=0.5, n_gumbels=4)(Bernoulli(logits=th))
        assert b.tensor.numel() == 3 * 4000 and (b.tensor[..., 0] == 0).all() and (b.tensor[..., 2] == 1).all()
        storch.add_cost(((b - T) ** 2).sum())
        (g,) = kit.per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert torch.equal(g[:, [0, 2]], torch.zeros(4000, 2, dtype=F64))
    kit.assert_unbiased(g[:, 1:2], _st_expected_gradient(theta[1:2], 0.5), "gumbel_rao, the free bit")


def test_masked_onehot_logits_are_never_drawn_and_get_no_gradient():
    # a -inf logit (masked_fill): never the sample, its perturbed logit stays -inf (no NaN noise), gradient 0; the
    # others' gradient has plain straight-through Gumbel-softmax's expectation (which is 0 at the masked logit too)
    logits = torch.tensor([-math.inf, 0.2, -0.4, 0.9], dtype=F64)
    v = torch.tensor([5.0, -0.5, 2.0, 0.3], dtype=F64)
    torch.manual_seed(1)
    plain = _plain_straight_through(logits, v, 0.7, 20000)
    torch.manual_seed(2)
    with storch.Graph():
        leaf, th = kit.replicate(logits, 20000)
        x = GumbelRao("z", temperature=0.7, n_gumbels=4)(OneHotCategorical(logits=th))
        assert torch.isfinite(x.tensor).all() and (x.tensor[..., 0] == 0).all()
        storch.add_cost(((x * v).sum() - 0.4) ** 2)
        (rao,) = kit.per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)
    assert torch.equal(rao[:, 0], torch.zeros(20000, dtype=F64)) and torch.isfinite(rao).all()
    z = (rao.mean(0) - plain.mean(0))[1:] / (rao.var(0) / len(rao) + plain.var(0) / len(plain))[1:].sqrt()
    print(f"\ntwo-sample z per free logit: {z.tolist()}")
    assert (z.abs() < 4).all()


# -- the forward value, the metadata, the errors -----------------------------------------------


def test_forward_value_is_the_discrete_sample():
    torch.manual_seed(0)
    with storch.Graph():
        theta = torch.randn(4, 6, requires_grad=True)
        z = GumbelRao("z", n_samples=3)(OneHotCategorical(logits=theta))
        b = GumbelRao("b", n_samples=2)(Bernoulli(logits=theta[0]))
        assert ((z.tensor == 0) | (z.tensor == 1)).all() and (z.tensor.sum(-1) == 1).all()
        assert ((b.tensor == 0) | (b.tensor == 1)).all()
        storch.add_cost((z * torch.arange(6.0)).sum() + b.sum())
        (g,) = torch.autograd.grad(storch.surrogate_loss(), theta)
    assert g.abs().sum() > 0


def test_errors():
    est = storch.estimator("gumbel_rao", plate="z")
    with pytest.raises(storch.UnsupportedDistributionError, match="Bernoulli, OneHotCategorical"):
        with storch.Graph():
            est(Categorical(logits=torch.zeros(3)))
    with pytest.raises(storch.OptionError, match="temperature"):
        storch.estimator("gumbel_rao", plate="z", temperature=0.0)
    with pytest.raises(storch.OptionError, match="n_gumbels"):
        storch.estimator("gumbel_rao", plate="z", n_gumbels=0)
    with storch.Graph():
        theta = torch.zeros(2, requires_grad=True)
        storch.add_cost(est(Bernoulli(logits=theta)).sum())
        with pytest.raises(storch.OrderError, match="gumbel_rao"):
            storch.surrogate_loss(order=2)
