"""Unbiasedness z-tests against exact enumeration (plain torch), 4000 seeded estimates each.

Every estimator of the family at orders 1 and 2 (the unordered set estimator with its baseline at
order 1, its max_order; without it at orders 1 and 2), score with leave-one-out also at order 3,
on three problems: one categorical node (K = 5); a two-node chain whose second distribution depends
on the first sample and whose cost depends on θ directly; a data plate with a Bernoulli node of
batch shape (2,) and two costs, one of which does not depend on the sample.
"""

import pytest
import torch
from score_problems import PROBLEMS, Maker, derivative_estimates, estimates, exact, exact_derivatives
from storch.testing import assert_unbiased
from torch.distributions import Beta, Binomial, Exponential, Normal, Poisson

import storch
from storch.extending import raw_of

# unordered set: k = 3 of 5 (categorical), 2 of 3 (chain), 3 of 4 joint values (plate)
K_SET = {"categorical": 3, "chain": 2, "plate": 3}


def _tempered(p):
    # a proposal q ≠ p that covers p's support (detached: q is only sampled from)
    return type(p)(logits=p.logits.detach() * 0.5)


def _constant_baseline(node, cost):
    return torch.tensor(1.5)


CONFIGS = {
    "score@1": ("score", dict(n_samples=1), 1),
    "score@4-leave_one_out": ("score", dict(n_samples=4, baseline="leave_one_out"), 1),
    "score@3-batch_average": ("score", dict(n_samples=3, baseline="batch_average"), 1),
    "score@2-moving_average": ("score", dict(n_samples=2, baseline="moving_average", decay=0.5), 3),
    "score@2-callable": ("score", dict(n_samples=2, baseline=_constant_baseline), 1),
    "reinforce@2": ("reinforce", dict(n_samples=2), 1),
    "importance@2": ("importance", dict(n_samples=2, proposal=_tempered), 1),
    "sum_and_sample@2+2": ("sum_and_sample", dict(n_enumerate=2, n_samples=2), 1),
    "mapo@1+3-leave_one_out": ("mapo", dict(n_enumerate=1, n_samples=3, baseline="leave_one_out"), 1),
    "unordered_set-no-baseline": ("unordered_set", dict(per_plate_n_samples=None, baseline=False), 1),
}


def _maker(name, options, problem):
    opts = dict(options)
    if "per_plate_n_samples" in opts:
        del opts["per_plate_n_samples"]
        opts["n_samples"] = K_SET[problem]
    return Maker(name, **opts)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_orders_1_and_2(problem, config):
    torch.manual_seed(1)
    name, options, steps = CONFIGS[config]
    got = estimates(problem, _maker(name, options, problem), 2, steps=steps)
    want = exact(problem, 2)
    for order, (g, w) in enumerate(zip(got, want), 1):
        assert_unbiased(g, w, f"{config} on {problem}, order {order}")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_unordered_set_with_baseline_order_1(problem):
    torch.manual_seed(2)
    got = estimates(problem, Maker("unordered_set", n_samples=K_SET[problem]), 1)
    assert_unbiased(got[0], exact(problem, 1)[0], f"unordered_set (baseline) on {problem}, order 1")


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_score_leave_one_out_order_3(problem):
    torch.manual_seed(3)
    got = estimates(problem, Maker("score", n_samples=3, baseline="leave_one_out"), 3, replicates=3000)
    for order, (g, w) in enumerate(zip(got, exact(problem, 3)), 1):
        assert_unbiased(g, w, f"score@3 leave-one-out on {problem}, order {order}")


# -- importance with a proposal wider than p's support --------------------------------------------

_WIDE_X = torch.tensor([-0.5, 0.0, 0.7])  # a data plate


def _binomial_moment(th):
    p = torch.sigmoid(th[0])
    return 3 * p * (1 - p) + (3 * p) ** 2  # E[z²], z ~ Binomial(3, p)


WIDER = {  # p(θ), its proposal q (wider support), exact E[z²] + θ-free cost, in plain torch
    "exponential-normal": (lambda th: Exponential(th[0].exp()), Normal(0.5, 2.0), lambda th: 2 * (-2 * th[0]).exp()),
    "beta-normal": (lambda th: Beta(th[0].exp(), torch.tensor(1.0)), Normal(0.5, 1.0),
                    lambda th: th[0].exp() / (th[0].exp() + 2)),
    "binomial3-poisson": (lambda th: Binomial(3, logits=th[0]), Poisson(2.0), _binomial_moment),
    "binomial3-binomial6": (lambda th: Binomial(3, logits=th[0]), Binomial(6, probs=torch.tensor(0.5)),
                            _binomial_moment),
    "exponential-normal-data-plate": (
        lambda th: Exponential((th[0] + storch.denote_independent(_WIDE_X, 0, "data")).exp()), Normal(0.5, 2.0),
        lambda th: (2 * (-2 * (th[0] + _WIDE_X)).exp()).mean()),
}


@pytest.mark.parametrize("case", list(WIDER))
def test_importance_with_a_proposal_wider_than_p(case):
    """q covers p (the documented requirement) but also draws where p has no mass: a Normal for an Exponential
    or a Beta, Poisson(2) or Binomial(6) for a Binomial(3). p.log_prob on such a draw tripped torch's argument
    validation (ValueError), and on a data plate gave log p = -inf, whose MagicBox is NaN (a NaN loss and
    gradient; found by porting), or, without validation, Exponential's log λ − λx, a weight e^{λ|x|} where p has
    no mass. Now such a draw has weight 0 (p(x) = 0) and a finite gradient function: orders
    1 and 2 against the closed form."""
    mkp, q, fn = WIDER[case]
    theta = torch.tensor([0.2])

    def model(th, make):
        storch.add_cost(make("z", mkp(th)) ** 2, name="f")

    torch.manual_seed(5)
    got = derivative_estimates(model, theta, Maker("importance", proposal=q, n_samples=4), 2, 4000)
    for order, (g, w) in enumerate(zip(got, exact_derivatives(fn, theta, 2)), 1):
        assert torch.isfinite(g).all()
        report = assert_unbiased(g, w, f"importance, {case}, order {order}")
        print(report.table())
        # and informative: without argument validation (a plate's raw distribution) Exponential.log_prob of
        # a negative draw is log λ − λx, a weight growing as e^{λ|x|} where p(x) = 0: a z-test that passed on
        # a standard error of 10⁷
        assert float(report.stderr.max()) < 0.25 * (1 + float(w.abs().max())), report.table()


def test_importance_wider_proposal_without_plates_keeps_torch_validation_quiet():
    """Without plates the node's distribution is the user's, with torch's argument validation: p.log_prob on a
    Normal proposal's negative draw raised ValueError ("within the support") for an Exponential p. Now those
    draws are weighed 0 (the loss: Σ w z² over the draws inside p's support only) and the gradient is finite."""
    rate = torch.tensor(1.5, requires_grad=True)
    q = Normal(0.0, 2.0)
    torch.manual_seed(7)
    est = storch.estimator("importance", plate="x", proposal=q, n_samples=64)
    with storch.Graph():
        p = Exponential(rate, validate_args=True)
        z = est(p)
        storch.add_cost(z ** 2, name="f")
        loss = storch.surrogate_loss(order=1)
        g, = torch.autograd.grad(loss, rate)
    x = raw_of(z).detach()
    inside = x >= 0
    assert 0 < int(inside.sum()) < 64  # both kinds of draws
    w = torch.where(inside, (rate.log() - rate * x.clamp(min=0)) - q.log_prob(x), torch.tensor(-torch.inf)).exp() / 64
    with torch.no_grad():
        assert torch.allclose(loss, (w * x ** 2).sum())
        assert torch.allclose(g, (w * x ** 2 * (1 / rate - x)).sum())  # score: ∂ log p / ∂λ = 1/λ − x, inside
