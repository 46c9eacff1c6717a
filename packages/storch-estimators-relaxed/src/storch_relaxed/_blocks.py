"""The block layout of a plate with evaluation-only entries: n real samples (weight 1/n), then blocks of n
entries with weight 0 (ARM's antithetic samples, REBAR's relaxed inputs, GO's neighbours) whose costs the
control variate reads from the :class:`storch.CostFrame`."""

from __future__ import annotations

import torch

from storch import CostFrame, Node
from storch.extending import base_distribution

__all__ = ["blocks_weights", "pad_blocks", "block"]


def blocks_weights(node: Node, n: int, blocks: int) -> torch.Tensor:
    """w = 1/n on the first block of n real samples, 0 on the evaluation-only blocks."""
    s = node.sample
    dtype = s.dtype if s.is_floating_point() else torch.get_default_dtype()
    for v in vars(base_distribution(node.distribution)).values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            dtype = v.dtype
            break
    w = torch.zeros((n * blocks,), dtype=dtype, device=s.device)
    w[:n] = 1.0 / n
    return w


def pad_blocks(t: torch.Tensor, blocks: int, dim: int = 0) -> torch.Tensor:
    """Append ``blocks - 1`` blocks of zeros along ``dim`` (for evaluation-only entries)."""
    if blocks == 1:
        return t
    shape = list(t.shape)
    shape[dim] = shape[dim] * (blocks - 1)
    return torch.cat([t, t.new_zeros(shape)], dim)


def block(cost_values: torch.Tensor, cost: CostFrame, n: int, k: int) -> torch.Tensor:
    """Block ``k`` (n entries) of the node's plate in a cost-frame tensor."""
    return cost_values.narrow(cost.dim, k * n, n)
