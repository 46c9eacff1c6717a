"""storch.distributed.frozen_parameters, the description of a rank's frozen parameters that the ranks' check compares:
the same set gives the same text whatever the order of ``named_parameters()`` (NVIL's heads are in the order each rank
first met their costs; before, the same frozen heads listed in another order refused ranks that agree)."""

from __future__ import annotations

import torch

import storch.distributed


def _named(frozen: set, order: list) -> list:
    return [(n, torch.zeros(2, requires_grad=n not in frozen)) for n in order]


def test_the_description_is_of_the_set():
    names = ["heads.cost_b.0.weight", "heads.cost_a.0.weight", "heads.cost_a.0.bias"]
    frozen = {"heads.cost_b.0.weight", "heads.cost_a.0.weight"}
    first = storch.distributed.frozen_parameters(_named(frozen, names))
    assert first == "heads.cost_a.0.weight, heads.cost_b.0.weight"
    assert storch.distributed.frozen_parameters(_named(frozen, names[::-1])) == first
    assert storch.distributed.frozen_parameters(_named(set(), names)) == "none"
    assert storch.distributed.frozen_parameters(_named(set(names), names)) == "all 3 parameters"
    assert storch.distributed.frozen_parameters(_named({"heads.cost_a.0.bias"}, names)) == "heads.cost_a.0.bias"
