"""The node's distribution as the relaxed estimators read it: its parameter tensors."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, OneHotCategorical

from storch.extending import base_distribution

__all__ = ["param_tensors"]


def param_tensors(d: Distribution) -> list[torch.Tensor]:
    """The tensors ``d`` was built from (its arg_constraints present as attributes) that need grad."""
    d = base_distribution(d)
    if isinstance(d, OneHotCategorical):
        d = d._categorical
    out = []
    for name in d.arg_constraints:
        v = d.__dict__.get(name)
        if isinstance(v, torch.Tensor) and v.requires_grad:
            out.append(v)
    return out
