"""``est.requires_grad_(False)`` before a cost's first node freezes NVIL's head for that cost (``baseline="learned"``),
which is built at that node: there was none to freeze then, and storch trained it (4 parameters with
requires_grad=True after one step, moved by the next). The request is kept for the heads, as torch's lazy modules keep
it, also for those a state_dict builds; ``requires_grad_(True)`` makes them trainable again.

A ``baseline=`` module frozen at construction is never trained (``has_update`` is decided there); unfrozen afterwards
it stayed untrained with no word (b 0.0 and update_steps 0 after three steps): its step now raises, saying what to do.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli

import storch


def _step(est, cost: str = "c") -> None:
    theta = torch.tensor([0.3, -0.5, 0.2], requires_grad=True)
    with storch.Graph():
        z = est(Bernoulli(logits=theta))
        storch.add_cost(((z - 0.4) ** 2).sum(), name=cost)
        storch.backward()


def _values(est) -> dict:
    return {n: p.detach().clone() for n, p in est.named_parameters()}


def test_heads_built_after_requires_grad_false_are_frozen():
    torch.manual_seed(0)
    est = storch.estimator("score", plate="x", baseline="learned")
    assert est.requires_grad_(False) is est
    _step(est)
    _step(est)  # the output layer starts at zero: a trained head moves at the second step
    assert len(list(est.parameters())) == 4
    before = _values(est)
    _step(est)
    _step(est, cost="other")  # a head for another cost, built later
    assert len(list(est.parameters())) == 8
    assert [n for n, p in est.named_parameters() if p.requires_grad] == []
    assert all(torch.equal(before[n], p) for n, p in est.named_parameters() if n in before)


def test_the_request_reaches_heads_a_state_dict_builds_and_can_be_undone():
    torch.manual_seed(0)
    trained = storch.estimator("score", plate="x", baseline="learned")
    _step(trained)
    fresh = storch.estimator("score", plate="x", baseline="learned").requires_grad_(False)
    fresh.load_state_dict(trained.state_dict())
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == []
    fresh.requires_grad_(True)
    _step(fresh)
    before = _values(fresh)
    _step(fresh)
    assert all(p.requires_grad for p in fresh.parameters())
    assert any(not torch.equal(before[n], p) for n, p in fresh.named_parameters())


class _Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, node, cost):
        return self.b


def test_a_baseline_module_frozen_at_construction_and_unfrozen_later_raises():
    baseline = _Scalar().requires_grad_(False)
    est = storch.estimator("score", plate="x", n_samples=2, baseline=baseline)
    _step(est)  # frozen: never trained, no error
    assert est.update_steps == 0 and not est.has_update
    baseline.requires_grad_(True)
    with pytest.raises(storch.OptionError, match="frozen .* when the estimator was built.*update=False"):
        _step(est)
    # built after unfreezing (or with update=False, trained by the user): no error
    _step(storch.estimator("score", plate="x", n_samples=2, baseline=baseline, lr=0.1))
    _step(storch.estimator("score", plate="x", n_samples=2, baseline=baseline, update=False))
