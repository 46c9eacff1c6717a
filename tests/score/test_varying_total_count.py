"""A ``Binomial`` whose ``total_count`` differs between entries (``total_count=[1, 3]``), which torch's
``enumerate_support`` refuses (found by p-fuzz).

``expect`` enumerates the counts 0..max(total_count) and weighs a count above an entry's own total 0:
before, its distribution validated its arguments and ``log_prob`` of those counts raised an
``_OutsideSupportError`` that blamed evaluation-only entries (a Bernoulli's mean, a relaxed sample);
only ``validate_args=False`` gave the answer. Its value and derivatives of orders 1 and 2 are compared
with the hand enumeration over each entry's own counts (exact: expect is deterministic).

``unordered_set`` and ``sum_and_sample`` sample torch's ``enumerate_support`` without replacement:
they raised torch's raw ``NotImplementedError`` deep in the proposal, and the registry listed them
as supporting such a Binomial. They refuse it at the call now, saying why and what to use instead.
"""

import itertools

import pytest
import torch
from torch.distributions import Binomial, Independent

import storch
from storch.errors import UnsupportedDistributionError
from storch.registry import supporting_estimators
from storch_score.sum_and_sample_sequences import SumAndSampleSequences

N = torch.tensor([1.0, 3.0], dtype=torch.float64)


def _cost(z: torch.Tensor) -> torch.Tensor:
    # log(N - z + 1) is NaN above an entry's own total: the cost must never see such a count
    return (z[..., 0] - 0.5 * z[..., 1]) ** 2 + torch.log(N - z + 1).sum(-1)


def _exact(theta: torch.Tensor, form: str) -> torch.Tensor:
    """E[cost] by enumeration over each entry's own counts 0..N_i."""
    d = Binomial(N, logits=theta) if form == "logits" else Binomial(N, probs=torch.sigmoid(theta))
    total = theta.new_zeros(())
    for a, b in itertools.product(range(2), range(4)):
        z = torch.tensor([a, b], dtype=torch.float64)
        total = total + d.log_prob(z).sum().exp() * _cost(z)
    return total


@pytest.mark.parametrize("form", ["logits", "probs"])
def test_expect_on_a_total_count_per_entry_is_exact_at_orders_1_and_2(form):
    torch.manual_seed(0)
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        d = Binomial(N, logits=theta) if form == "logits" else Binomial(N, probs=torch.sigmoid(theta))
        assert d._validate_args  # torch's default: the counts above an entry's total raised before
        z = storch.estimator("expect", plate="z")(d)
        assert bool((z.tensor <= N).all())  # the cost never sees a count above the entry's own total
        storch.add_cost(_cost(z), name="c")
        loss = storch.surrogate_loss(order=2)
        g, = torch.autograd.grad(loss, theta, create_graph=True)
        h = torch.stack([torch.autograd.grad(g[i], theta, retain_graph=True)[0] for i in range(2)])
    exact = _exact(theta.detach(), form)
    g_exact = torch.autograd.functional.jacobian(lambda t: _exact(t, form), theta.detach())
    h_exact = torch.autograd.functional.hessian(lambda t: _exact(t, form), theta.detach())
    assert torch.isfinite(g).all() and torch.isfinite(h).all()
    assert torch.allclose(loss.detach(), exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g.detach(), g_exact, rtol=1e-10, atol=1e-12)
    assert torch.allclose(h, h_exact, rtol=1e-10, atol=1e-12)


def test_expect_matches_the_fuzz_report():
    """p-fuzz's repro: loss 0.44026, gradient [-0.0857, 0.0934] (the hand enumeration), now without
    validate_args=False."""
    theta = torch.tensor([0.3, -0.2], requires_grad=True)
    n = N.float()
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(Binomial(total_count=n, logits=theta))
        storch.add_cost((z[..., 0] - 0.5 * z[..., 1]) ** 2, name="c")
        loss = storch.surrogate_loss()
        g, = torch.autograd.grad(loss, theta)
    assert abs(float(loss.detach()) - 0.440257728) < 1e-6
    assert torch.allclose(g, torch.tensor([-0.0857, 0.0934]), atol=1e-4)


@pytest.mark.parametrize("name", ["unordered_set", "sum_and_sample"])
@pytest.mark.parametrize("wrap", [False, True])
def test_sampling_without_replacement_refuses_a_total_count_per_entry(name, wrap):
    theta = torch.zeros(2, requires_grad=True)
    d = Binomial(total_count=torch.tensor([1.0, 3.0]), logits=theta)
    d = Independent(d, 1) if wrap else d
    with storch.Graph():
        with pytest.raises(UnsupportedDistributionError) as info:
            storch.estimator(name, plate="z", n_samples=2)(d)
    msg = str(info.value)
    assert f"estimator {name!r} (plate 'z') does not support Binomial" in msg
    assert "total_count that differs between entries (1, 3)" in msg
    assert "'expect'" in msg and "'score'" in msg and "one Binomial node per distinct total_count" in msg
    # supports() agrees, on the class and on an instance, so the registry's lists do too
    est = storch.estimator(name, plate="z", n_samples=2)
    assert not type(est).supports(d) and not est.supports(d)


def test_registry_lists_agree():
    theta = torch.zeros(2, requires_grad=True)
    varying = Binomial(total_count=torch.tensor([1.0, 3.0]), logits=theta)
    shared = Binomial(total_count=torch.tensor([3.0, 3.0]), logits=theta)
    names = supporting_estimators(varying)
    assert "expect" in names and "score" in names
    assert "unordered_set" not in names and "sum_and_sample" not in names
    assert not SumAndSampleSequences.supports(varying)
    # one total_count shared by every entry: torch enumerates it, and these estimators take it
    assert {"unordered_set", "sum_and_sample"} <= set(supporting_estimators(shared))
    assert SumAndSampleSequences.supports(shared)
    # another estimator's refusal does not send the user to them
    with storch.Graph():
        with pytest.raises(UnsupportedDistributionError) as info:
            storch.estimator("reparameterization", plate="z")(varying)
    hint = str(info.value).split("Estimators that support it:")[1]
    assert "expect" in hint and "unordered_set" not in hint and "sum_and_sample" not in hint


def test_a_total_count_per_data_point_is_refused_too():
    """total_count on a data plate (a count per data point): the raw distribution's batch holds it."""
    n = torch.tensor([1.0, 3.0, 5.0])
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        nn, tt = storch.denote_independent([n, theta], 0, "data")
        with pytest.raises(UnsupportedDistributionError, match="total_count that differs between entries"):
            storch.estimator("unordered_set", plate="z", n_samples=2)(Binomial(total_count=nn, logits=tt))
