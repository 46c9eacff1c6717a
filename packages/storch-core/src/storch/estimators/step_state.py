"""The baseline of a step as it was before the step's update: every surrogate of a step reads the same baselines.

An estimator with state (``has_update``: a moving average, a learned baseline) updates it on the step's first
backward pass (``surrogate_loss().backward()``), and a surrogate built after that pass in the same step
(``storch.surrogate_loss()`` again for a second epoch on the batch, ``storch.backward()`` after
``surrogate_loss().backward(retain_graph=True)``) would read the updated state: a baseline that depends on this
step's samples, a biased gradient (the moving average: the second surrogate's gradient of a single-sample
step was 0). So :func:`mark_updated`, run before the update, keeps the baselines of the node's cost frames as
they are then (detached copies), and :func:`step_baseline` hands them to the surrogates built after it. Nothing
is kept, and nothing is added to the surrogate, in a step that ends with ``storch.backward()`` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from ..errors import StorchError

if TYPE_CHECKING:
    from ..graph.cost_frame import CostFrame
    from ..graph.node import Node


def step_baseline(est, node: Node, frame: CostFrame) -> Optional[torch.Tensor]:
    """``est.baseline(node, frame)``; after the update of the step of ``node`` (:func:`mark_updated`), the value
    the baseline had before it, kept then (per cost frame: the cost's name, state key, plates and layout). A frame
    the step's surrogates did not have before the update (a node or cost added after it: the update did not see
    its samples) has no baseline kept: one is refused (a StorchError), since its state may be shared with the
    frames the update trained on (a learned baseline, a trainable baseline module; review r-24), and a frame whose
    baseline is ``None`` has nothing to read."""
    if not est.has_update:  # (the common path: one attribute read)
        return est.baseline(node, frame)
    owner = node._owner
    root = node if owner is None else (owner() or node)  # a partition's view at step t: the partition's record
    if root.updated_in_step:  # (before the update, the common path: two attribute reads more)
        memo = root.step_baselines
        b = None if memo is None else memo.get(_key(frame), _MISSING)
        if b is not _MISSING:
            return b
        b = est.baseline(node, frame)
        if b is not None:
            raise StorchError(_late_frame_message(est, node, frame))
        return b
    return est.baseline(node, frame)


def _late_frame_message(est, node: Node, frame: CostFrame) -> str:
    step = "" if node.step_log is None and node._owner is None else f" at step {node.step}"
    return (f"cost {frame.name!r} of estimator {(est.name or type(est).__qualname__)!r} (plate {node.plate.name!r})"
            f"{step} reached a surrogate built after this step's update (surrogate_loss().backward() ran it): the "
            "cost, or the partition's step, was added after that backward pass, and its baseline would read state "
            "the update has just trained on this step's samples (a learned baseline or a trainable baseline module "
            "is shared by the costs and steps: a biased gradient, found by review r-24). Add every cost and every "
            "step before the step's first backward pass (one surrogate_loss() of all of them, or storch.backward()), "
            "or start a new step (a new `with storch.Graph():` block) for what comes after the update")


_MISSING = object()


def _key(frame: CostFrame) -> tuple:
    return frame.name, frame.key, frame.plates, frame.tensor.shape


def mark_updated(nodes: list) -> None:
    """Before the update of the estimator of ``nodes`` (the roots of its nodes in the step) that a surrogate's
    ``.backward()`` runs: keep the baseline of each of their cost frames (those of the step's last surrogate),
    copies of the values as they are before the update, for the step's later surrogates (:func:`step_baseline`).
    Once per step and estimator, on that path only: ``storch.backward()`` resets the step after its update, and a
    step without an update keeps nothing."""
    for node in nodes:
        est = node.estimator
        memo = {}
        for frame in node.frames.values():
            at = frame.node  # the node (a partition's view at the cost's step) the surrogate called it with
            if at is None:  # (a view made for one surrogate, gone: its frame is not read again)
                continue
            b = est.baseline(at, frame)
            # a copy: a baseline may be a view of the state that the update changes in place (a trainable
            # callable's parameter, expanded; a buffer)
            memo[_key(frame)] = b.detach().clone() if isinstance(b, torch.Tensor) else b
        node.step_baselines = memo
        node.updated_in_step = True
