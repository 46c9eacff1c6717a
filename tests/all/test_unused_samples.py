"""A node whose estimator's gradient function carries gradient and that no cost is downstream of warns
(storch.UnusedSampleWarning): its parameters silently got no gradient from it. Found by porting an
IWAE-style bound, `storch.add_cost(f.tensor.min(0).values.sum())`: the cost left the sample plate, so the
score term was never built and the encoder's gradient was wrong without a word."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch


def _bound_outside_the_plates(name: str, theta: torch.Tensor, **options) -> None:
    d = Normal(theta, 1.0) if name == "reparameterization" else Bernoulli(logits=theta)
    z = storch.estimator(name, plate="z", n_samples=4, **options)(d)
    f = ((z - 0.3) ** 2).sum(-1)
    storch.add_cost(f.tensor.logsumexp(0) + theta.sum())  # reduced over the sample plate by hand


@pytest.mark.parametrize("name,options", [("score", {}), ("score", {"baseline": "leave_one_out"}), ("expect", {}),
                                          ("unordered_set", {}), ("spsa", {})])
def test_a_node_upstream_of_no_cost_warns(name, options):
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        if name == "expect":
            z = storch.estimator("expect", plate="z")(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.3) ** 2).sum(-1).tensor.sum() + theta.sum())
        else:
            _bound_outside_the_plates(name, theta, **options)
        with pytest.warns(storch.UnusedSampleWarning, match=r"node 'z' .* is upstream of no cost.*z\.tensor"):
            storch.surrogate_loss()


def test_a_set_level_loss_is_told_to_draw_from_detached_parameters():
    """Minimum risk training (docs/partitions.md) with the set drawn from live logits: the loss of the whole set,
    added with credit=False, carries no plate, so the node warns. The advice names both cases: a per-sample cost
    computed from the plate tensor, and for a set-level loss the detached draw (the advice was only the former,
    which pushed an MRT port toward a wrong per-entry cost). Drawn from detached logits, nothing warns."""
    from torch.distributions import Categorical

    logits = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)

    def mrt(draw_from):
        x = storch.estimator("unordered_set", plate="seq", n_samples=2)(Categorical(logits=draw_from))
        lp = Categorical(logits=logits).log_prob(x)
        i = [p.name for p in lp.plates].index("seq")
        q = torch.softmax(lp.tensor.movedim(i, -1), -1)
        storch.add_cost((q * (x != 1).float().tensor.movedim(i, -1)).sum(-1), name="mrt", credit=False)
        return storch.surrogate_loss()

    with storch.Graph(), pytest.warns(storch.UnusedSampleWarning, match="upstream of no cost") as seen:
        mrt(logits)
    text = str(seen[0].message)
    assert "For a cost per sample" in text and "compute it from the plate tensor itself" in text, text
    assert "For a loss of the whole set" in text and "credit=False" in text, text
    assert "est(Categorical(logits=logits.detach()))" in text, text
    with warnings.catch_warnings():
        warnings.simplefilter("error", storch.UnusedSampleWarning)
        with storch.Graph():
            assert mrt(logits.detach()).requires_grad


def test_a_second_node_upstream_of_no_cost_warns_when_the_first_has_two_costs():
    theta = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        a = storch.estimator("score", plate="a", n_samples=2)(Bernoulli(logits=theta))
        storch.add_cost(a.sum(), name="c1")
        storch.add_cost((a ** 2).sum(), name="c2")
        b = storch.estimator("score", plate="b", n_samples=2)(Bernoulli(logits=theta))
        storch.add_cost(b.tensor.sum() + theta.sum(), name="escaped")
        with pytest.warns(storch.UnusedSampleWarning, match=r"node 'b'"):
            storch.surrogate_loss()


def test_no_warning_where_nothing_is_lost():
    """A pathwise node (its gradient flows through z.tensor), a node drawn under no_grad, and a node whose
    cost carries its plate do not warn."""
    theta = torch.zeros(3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", storch.UnusedSampleWarning)
        with storch.Graph():
            _bound_outside_the_plates("reparameterization", theta)
            assert storch.surrogate_loss().requires_grad
        with storch.Graph():
            with torch.no_grad():
                storch.estimator("score", plate="z", n_samples=4)(Bernoulli(logits=theta))
            storch.add_cost(theta.sum())
            storch.surrogate_loss()
        with storch.Graph():
            z = storch.estimator("score", plate="z", n_samples=4)(Bernoulli(logits=theta))
            storch.add_cost(((z - 0.3) ** 2).sum(-1))
            storch.backward()
