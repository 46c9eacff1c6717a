"""The baseline of a step as it was before the step's update: every surrogate of a step reads the same baselines.

An estimator with state (``has_update``: a moving average, a learned baseline) updates it on the step's first
backward pass (``surrogate_loss().backward()``), and a surrogate built after that pass in the same step
(``storch.surrogate_loss()`` again for a second epoch on the batch, ``storch.backward()`` after
``surrogate_loss().backward(retain_graph=True)``) would read the updated state: a baseline that depends on this
step's samples, a biased gradient (the moving average: the second surrogate's gradient of a single-sample
step was 0). So :func:`step_baseline` keeps, per node and cost frame, the baseline that a surrogate of the step
read before the update (a detached tensor), and hands it to the surrogates built after it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from ..cost import CostFrame
    from ..node import Node


def step_baseline(est, node: Node, frame: CostFrame) -> Optional[torch.Tensor]:
    """``est.baseline(node, frame)``, for an estimator with state (``has_update``) as it was before the step's
    update: the value a surrogate of the step read before the update ran (a copy; per node and frame: the cost's name,
    state key, plates and layout); before the update, and for a cost or node the step's earlier surrogates did
    not have (added after the update: its baseline reads the state, which holds nothing of that node's samples),
    computed. Without state, a plain call."""
    if not est.has_update:  # (the common path: one attribute read)
        return est.baseline(node, frame)
    owner = node._owner
    root = node if owner is None else (owner() or node)  # a partition's view at step t: the partition's record
    key = (frame.name, frame.key, frame.plates, frame.tensor.shape)
    memo = root.step_baselines
    if root.updated_in_step:
        if memo is not None and key in memo:
            return memo[key]
        return est.baseline(node, frame)
    b = est.baseline(node, frame)
    if memo is None:
        memo = root.step_baselines = {}
    memo[key] = b.detach() if isinstance(b, torch.Tensor) else b
    return b


def mark_updated(nodes: list) -> None:
    """Record that the estimator of ``nodes`` updated its state in their step (before its update runs): the
    step's later surrogates read the baselines :func:`step_baseline` kept."""
    for node in nodes:
        node.updated_in_step = True
        memo = node.step_baselines
        if memo:
            # copies: a baseline may be a view of the state the update changes in place (a trainable callable's
            # parameter, expanded; a buffer). Only here, once per update of a surrogate's .backward() (storch.
            # backward() resets the step after its update: nothing to keep)
            node.step_baselines = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in memo.items()}
