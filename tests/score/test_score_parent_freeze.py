"""``model.requires_grad_(False)`` on a parent module that holds ``score(baseline="learned")`` (NVIL): the heads are
built at their cost's first node, and torch's ``Module.requires_grad_`` reaches only the parameters that exist when
it is called, so the two ways that freeze them (docs/reliability.md) are freezing the estimator itself (its request
is kept for heads built later, ``test_score_frozen_baselines.py``) and freezing the parent after the first step."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli

import storch


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(1, 3)  # trained apart (fine-tuning)
        self.nvil = storch.estimator("score", plate="y", baseline="learned")

    def step(self) -> None:
        theta = self.encoder(torch.ones(1)).detach().requires_grad_()
        with storch.Graph():
            y = self.nvil(Bernoulli(logits=theta))
            storch.add_cost(((y - 0.4) ** 2).sum(), name="d")
            storch.backward()


def _values(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("how", ["estimator", "parent_after_first_step"])
def test_the_documented_ways_freeze_the_heads_built_at_the_first_step(how):
    torch.manual_seed(0)
    model = _Model()
    if how == "estimator":
        model.requires_grad_(False)
        model.nvil.requires_grad_(False)  # reaches the heads not built yet
    model.step()
    if how == "parent_after_first_step":
        model.requires_grad_(False)  # the head exists now
    assert any(n.startswith("nvil.baseline_fn.heads.") for n, _ in model.named_parameters())
    model.step()  # the output layer starts at zero: a trained head would move at the second step
    before = _values(model)
    model.step()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_without_either_way_the_head_would_train():
    """The control: the same steps on an unfrozen model move the head (the test above could fail)."""
    torch.manual_seed(0)
    model = _Model()
    model.step()
    model.step()
    before = _values(model)
    model.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n.startswith("nvil."))
