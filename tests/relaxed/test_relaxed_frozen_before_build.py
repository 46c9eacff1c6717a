"""``est.requires_grad_(False)`` before the estimator's first node freezes the default control-variate network too,
whose layers are built at that node (LAX, RELAX): there were none to freeze then, and storch trained the layers it
built (LAX: 4 parameters with requires_grad=True and update_steps 1 after one step; RELAX froze η and λ but trained
the network). The request is kept for the layers, as torch's lazy modules keep it, also for those a state_dict
builds; ``requires_grad_(True)`` makes them trainable again."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch

CASES = {"lax": ("lax", Normal), "relax": ("relax", Bernoulli)}


def _step(est, dist) -> None:
    theta = torch.tensor([0.3, -0.5, 0.2], requires_grad=True)
    with storch.Graph():
        z = est(Normal(theta, 1.0) if dist is Normal else Bernoulli(logits=theta))
        storch.add_cost(((z - 0.4) ** 2).sum(), name="c")
        storch.backward()


def _values(est) -> dict:
    return {n: p.detach().clone() for n, p in est.named_parameters()}


@pytest.mark.parametrize("case", CASES)
def test_frozen_before_the_first_node_stays_frozen(case):
    name, dist = CASES[case]
    torch.manual_seed(0)
    est = storch.estimator(name, plate="x")
    assert est.requires_grad_(False) is est
    _step(est, dist)
    names = [n for n, _ in est.named_parameters()]
    assert any(n.startswith("network.") for n in names)  # built at the first node
    assert [n for n, p in est.named_parameters() if p.requires_grad] == []
    before = _values(est)
    _step(est, dist)
    assert est.update_steps == 0
    assert all(torch.equal(before[n], p) for n, p in est.named_parameters())


@pytest.mark.parametrize("case", CASES)
def test_the_request_reaches_layers_a_state_dict_builds_and_can_be_undone(case):
    name, dist = CASES[case]
    torch.manual_seed(0)
    trained = storch.estimator(name, plate="x")
    _step(trained, dist)
    fresh = storch.estimator(name, plate="x").requires_grad_(False)
    fresh.load_state_dict(trained.state_dict())
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == []
    fresh.requires_grad_(True)
    steps = fresh.update_steps  # the trained one's, loaded
    _step(fresh, dist)
    assert fresh.update_steps == steps + 1
    again = storch.estimator(name, plate="x").requires_grad_(False).requires_grad_(True)
    _step(again, dist)
    assert again.update_steps == 1 and all(p.requires_grad for p in again.parameters())
