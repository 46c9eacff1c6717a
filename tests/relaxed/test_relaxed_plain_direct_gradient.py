"""rebar / relax with plain_direct_gradient=True: the control variate's derivatives in the cost's own parameters
(read by the cost directly, not through the sample: a decoder, log q) are exactly 0, so they get the plain ∇f(b);
the form stays unbiased (z-tests against enumeration at orders 1 and 2, θ and φ together)."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import per_replicate_derivatives, replicate

from relaxed_problems import (CAT_THETA, CHAIN_THETA, cat_exact, cat_model, chain_exact, chain_model, estimates,
                              exact_derivatives)
from test_relaxed_unbiased import _elbo_exact, _PRIOR, check

# θ: 3 logits, φ: 3 parameters the cost reads directly
THETA_PHI = torch.tensor([0.3, -0.5, 1.0, 0.2, -0.4, 0.7], dtype=torch.float64)


def _direct_cost(b, phi):
    # smooth in b (order 2) and in φ, with cross terms φ_j b_j
    return (phi.exp() * (b - 0.45) ** 2).sum(-1) + torch.tanh((phi * b).sum(-1))


def _direct_exact(x):
    theta, phi = x[:3], x[3:]
    total = x.new_zeros(())
    for v in itertools.product([0.0, 1.0], repeat=3):
        b = x.new_tensor(v)
        total = total + Bernoulli(logits=theta).log_prob(b).sum().exp() * _direct_cost(b, phi)
    return total


def _direct_model(est, x):
    storch.add_cost(_direct_cost(est(Bernoulli(logits=x[:3])), x[3:]))


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_unbiased_in_theta_and_phi_at_orders_1_and_2(name):
    torch.manual_seed(40)
    est = storch.estimator(name, plate="b", plain_direct_gradient=True)
    check(f"{name} plain direct", lambda x: _direct_model(est, x), _direct_exact, THETA_PHI, 2)


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_unbiased_with_a_cost_that_reads_theta_directly(name):
    """A sampled ELBO (log q(b) in the cost): θ is read through the sample and directly; orders 1 and 2."""
    torch.manual_seed(41)
    est = storch.estimator(name, plate="b", plain_direct_gradient=True)

    def model(x):
        b = est(Bernoulli(logits=x))
        q, prior = Bernoulli(logits=x, validate_args=False), Bernoulli(logits=_PRIOR, validate_args=False)
        storch.add_cost((q.log_prob(b) - prior.log_prob(b) + (b - 0.45) ** 2).sum(), name="elbo")

    check(f"{name} plain direct ELBO", model, _elbo_exact, THETA_PHI[:3], 2)


def test_unbiased_on_one_hot_categories_and_in_a_chain():
    """OneHotCategorical; and a chain whose second cost reads b1 through the node b2 sampled from b1's entries (that
    cost keeps the 3-block form), both nodes with the option; orders 1 and 2."""
    torch.manual_seed(42)
    est = storch.estimator("rebar", plate="x", plain_direct_gradient=True)
    check("rebar plain direct K=5", lambda x: cat_model(est, x, "onehot"), cat_exact, CAT_THETA, 2)
    e1, e2 = (storch.estimator("relax", plate=p, plain_direct_gradient=True) for p in ("b1", "b2"))
    check("relax plain direct chain", lambda x: chain_model(e1, e2, x), chain_exact, CHAIN_THETA, 2)


W_AT = torch.tensor([0.4, 1.0], dtype=torch.float64)  # (logit α, cost weight w): the reproducer of the SBN port


def _w_gradients(name, n=20000, **options):
    """Per-replicate ∂/∂(α, w) of E[w (b - 0.3)^2], b ~ Bernoulli(σ(α)) (w: a parameter the cost reads directly)."""
    torch.manual_seed(43)
    est = storch.estimator(name, plate="b", **options)
    with storch.Graph():
        leaf, x = replicate(W_AT, n)
        b = est(Bernoulli(logits=x[0]))
        assert b.tensor.shape[0] == (5 if options else 3 if name in ("rebar", "relax") else 1)  # the blocks
        storch.add_cost(x[1] * (b - 0.3) ** 2)
        return per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_the_cost_parameter_gets_the_plain_gradient_with_its_variance(name):
    """Each estimate of ∂/∂w is (b - 0.3)^2 exactly, 0.49 or 0.09 (the cancellation path: no control-variate part),
    so its variance is score's, p (1 - p) 0.4^2 = 0.0385, where the 3-block form measured 0.065; ∂/∂α is the
    3-block form's, estimate for estimate (the same draws). (Score's own estimates of ∂/∂w are (b - 0.3)^2 as
    gumbel_straight_through's, whose forward is the hard sample: this family's environment has no 'score'.)"""
    new, old, score = (_w_gradients(name, plain_direct_gradient=True), _w_gradients(name),
                       _w_gradients("gumbel_straight_through"))
    dw = new[:, 1]
    assert bool(((dw - 0.49).abs() < 1e-12).logical_or((dw - 0.09).abs() < 1e-12).all())
    torch.testing.assert_close(new[:, 0], old[:, 0], rtol=0, atol=1e-12)
    p = float(torch.sigmoid(W_AT[0]))
    exact_var = p * (1 - p) * 0.16
    # the variance of n Bernoulli-valued estimates: standard error sqrt((μ4 - σ^4) / n) with μ4 = σ^2 (1 - 3 p (1 - p)) 0.4^2
    se = (exact_var * (1 - 3 * p * (1 - p)) * 0.16 - exact_var ** 2) ** 0.5 / len(dw) ** 0.5
    assert abs(float(dw.var()) - exact_var) < 4 * se
    assert float(dw.var()) < float(score[:, 1].var()) + 8 * se  # score's (its estimates are (b - 0.3)^2 too)
    assert float(old[:, 1].var()) > exact_var + 20 * se  # what the option removes (0.065 measured)


def test_a_kinked_cost_at_order_2_is_still_refused():
    """max_order: the form differentiates the cost at σ_λ(z) as the 3-block one: a ReLU there is refused at order 2."""
    est = storch.estimator("rebar", plate="b", plain_direct_gradient=True)
    with storch.Graph():
        x = THETA_PHI[:3].clone().requires_grad_()
        storch.add_cost(torch.relu(est(Bernoulli(logits=x)) - 0.3).sum())
        with pytest.raises(storch.OrderError, match="ReluBackward0"):
            storch.surrogate_loss(order=2)


def test_the_option_is_checked_and_fixed():
    with pytest.raises(storch.OptionError, match="plain_direct_gradient"):
        storch.estimator("relax", plate="b", plain_direct_gradient="yes")
    est = storch.estimator("rebar", plate="b")
    with pytest.raises(storch.OptionError, match="plain_direct_gradient"):
        est.plain_direct_gradient = True


def test_relax_network_form_is_unchanged():
    """control_variate='network' has no cost term: the option changes nothing there (n entries, unbiased)."""
    torch.manual_seed(44)
    est = storch.estimator("relax", plate="x", control_variate="network", plain_direct_gradient=True)
    got = estimates(lambda x: cat_model(est, x, "categorical"), CAT_THETA, 1)
    assert est.blocks == 1
    storch.testing.assert_unbiased(got[0], exact_derivatives(cat_exact, CAT_THETA, 1)[0], "relax network")


CHAIN_PHI = torch.tensor([0.4, -0.3, -0.2, 0.6, 1.0, 1.0], dtype=torch.float64)  # CHAIN_THETA, then φ1, φ2


def _chain_phi_model(e1, e2, x) -> None:
    b1 = e1(Bernoulli(logits=x[:2]))
    b2 = e2(Bernoulli(logits=x[2:4] + 1.5 * b1 - 0.5))
    storch.add_cost(x[4] * ((b1 - 0.45) ** 2).sum(-1), name="first")
    storch.add_cost(x[5] * ((b2 - 0.3 * b1 - 0.2) ** 2).sum(-1), name="second")


def _chain_phi_exact(x):
    total = x.new_zeros(())
    for v1 in itertools.product([0.0, 1.0], repeat=2):
        b1 = x.new_tensor(v1)
        p1 = Bernoulli(logits=x[:2]).log_prob(b1).sum().exp()
        for v2 in itertools.product([0.0, 1.0], repeat=2):
            b2 = x.new_tensor(v2)
            p2 = Bernoulli(logits=x[2:4] + 1.5 * b1 - 0.5).log_prob(b2).sum().exp()
            total = total + p1 * p2 * (x[4] * ((b1 - 0.45) ** 2).sum() + x[5] * ((b2 - 0.3 * b1 - 0.2) ** 2).sum())
    return total


def _chain_phi_gradients(option: bool, second: str = "arm") -> torch.Tensor:
    # (any estimator for b2 but expect: the relaxed family's environment has no 'score')
    torch.manual_seed(45)
    e1 = storch.estimator("rebar", plate="b1", plain_direct_gradient=option)
    e2 = storch.estimator(second, plate="b2")
    with storch.Graph():
        leaf, x = replicate(CHAIN_PHI, 4000)
        _chain_phi_model(e1, e2, x)
        return per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)[0]


def test_a_cost_read_through_a_node_sampled_from_the_entries_keeps_the_3_block_form():
    """The cost 'second' reads b1 through b2, drawn anew for the ⊥ blocks: its f(⊥σ_λ(z)) is not f(σ_λ(z)) with
    the sample paths cut, and subtracting it added noise (∂φ2 variance 0.35 against 0.22 for the 3-block form,
    20000 estimates). That cost keeps the 3-block control variate, estimate for estimate (the same draws of b2 on
    the first blocks), while 'first' gets the plain gradient (each ∂φ1 is Σ (b1 - 0.45)^2: 0.405, 0.505 or 0.605)."""
    new, old = _chain_phi_gradients(True), _chain_phi_gradients(False)
    torch.testing.assert_close(new[:, 5], old[:, 5], rtol=0, atol=1e-12)
    plain = torch.tensor([0.405, 0.505, 0.605], dtype=torch.float64)
    assert bool(((new[:, 4, None] - plain).abs() < 1e-12).any(-1).all())
    assert not bool(((old[:, 4, None] - plain).abs() < 1e-12).any(-1).all())


DATA = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)  # a data plate of 3 points
TWO_COSTS_AT = torch.tensor([0.3, -0.6, 0.8, -0.4], dtype=torch.float64)  # θ0, θ1 (logit θ0 + θ1 x), φ0, φ1


def _two_costs(b, x, data):
    """'c1' reads θ directly (φ1 log q(b)) and through b; 'c2' reads b, θ0 and φ through a smooth function."""
    logits = x[..., 0:1] + x[..., 1:2] * data
    q = Bernoulli(logits=logits, validate_args=False)
    c1 = x[..., 2:3].exp() * (b - 0.4) ** 2 * data + x[..., 3:4] * q.log_prob(b)
    c2 = torch.tanh(x[..., 3:4] * b + x[..., 0:1] + 0.3 * torch.sigmoid(x[..., 2:3] * data))
    return logits, c1, c2


def _two_costs_exact(x):
    total = x.new_zeros(())
    for i in range(len(DATA)):
        for v in (0.0, 1.0):
            b = x.new_tensor([v])
            logits, c1, c2 = _two_costs(b, x, DATA[i:i + 1])
            total = total + (Bernoulli(logits=logits).log_prob(b).exp() * (c1 + c2)).sum()
    return total / len(DATA)  # the mean over the data plate


def test_unbiased_with_two_costs_on_a_data_plate():
    """Two costs on a data plate, one reading θ directly and through b: orders 1 and 2 (rebar; relax shares the
    control variate's code)."""
    torch.manual_seed(46)
    est = storch.estimator("rebar", plate="b", plain_direct_gradient=True)

    def model(x):
        data = storch.denote_independent(DATA, 0, "data")
        logits = x[0] + x[1] * data
        b = est(Bernoulli(logits=logits))
        q = Bernoulli(logits=logits, validate_args=False)
        storch.add_cost(x[2].exp() * (b - 0.4) ** 2 * data + x[3] * q.log_prob(b), name="c1")
        storch.add_cost(torch.tanh(x[3] * b + x[0] + 0.3 * torch.sigmoid(x[2] * data)), name="c2")

    check("rebar plain direct, two costs on a data plate", model, _two_costs_exact, TWO_COSTS_AT, 2)


def _second_given_b1() -> torch.Tensor:
    """E[∂φ2 'second' | b1] = Σ_j E[(b2_j - 0.3 b1_j - 0.2)^2 | b1_j], for each of the 4 values of b1."""
    out = []
    for v1 in itertools.product([0.0, 1.0], repeat=2):
        b1 = torch.tensor(v1, dtype=torch.float64)
        p = torch.sigmoid(CHAIN_PHI[2:4] + 1.5 * b1 - 0.5)
        out.append((p * (0.8 - 0.3 * b1) ** 2 + (1 - p) * (0.3 * b1 + 0.2) ** 2).sum())
    return torch.stack(out)


def test_a_cost_read_through_an_expect_node_gets_the_plain_gradient():
    """'second' reads b1 through b2 enumerated by expect, which draws nothing (``deterministic_proposal``): its
    values at a ⊥ entry are those at the entry they copy, so the cost is a deterministic function of b1 and gets the
    5-block cancellation. Each ∂φ2 is E[(b2 - 0.3 b1 - 0.2)^2 | b1] exactly (one of 4 values), as each ∂φ1 is
    Σ (b1 - 0.45)^2; before, that cost kept the 3-block form, whose ∂φ2 carries the control variate's noise."""
    new, old = _chain_phi_gradients(True, "expect"), _chain_phi_gradients(False, "expect")
    plain = _second_given_b1()
    assert bool(((new[:, 5, None] - plain).abs() < 1e-12).any(-1).all())
    assert not bool(((old[:, 5, None] - plain).abs() < 1e-12).any(-1).all())
    assert float(new[:, 5].var()) < float(old[:, 5].var())
    first = torch.tensor([0.405, 0.505, 0.605], dtype=torch.float64)
    assert bool(((new[:, 4, None] - first).abs() < 1e-12).any(-1).all())


@pytest.mark.parametrize("name", ["rebar", "relax"])
def test_unbiased_with_a_cost_read_through_an_expect_node(name):
    """The same chain (θ and φ, orders 1 and 2) with b2 enumerated: the cost 'second' now has the 5-block form."""
    torch.manual_seed(47)
    e1 = storch.estimator(name, plate="b1", plain_direct_gradient=True)
    e2 = storch.estimator("expect", plate="b2")
    check(f"{name} plain direct through expect", lambda x: _chain_phi_model(e1, e2, x), _chain_phi_exact, CHAIN_PHI, 2)
