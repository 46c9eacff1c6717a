"""The costs of a partition's steps stacked into one term (a long episode adds a cost per step).

``_step_group`` keys the costs that may be stacked (one causal-credit partition with uniform weights, a control
variate that allows it); ``_steps_surrogate`` computes Σ_t mean MagicBox(L_t) C_t (+ a_t) as one stacked
computation, with L_t of a partition whose steps stayed in place one cumulative sum (``_stacked_cumulative``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..graph.cost_frame import CostFrame
from ..graph.node import Node
from ..plates.tensor import Plate, align, plates_of, raw_of
from .control_variates import _BASE_CONTROL_VARIATE, _baseline_term, _has_control_variate, _with_control_variate


_STEPS = "(steps)"


def _step_group(cost, nodes: list[Node], stackable: Optional[dict] = None):
    """A key shared by the costs of different steps of one partition that can be stacked, or None.

    A long episode adds a cost per step; their surrogates differ only in the step (L_t), so costs
    whose only sampling plate is one causal-credit partition with uniform weights, and whose
    control variate allows it, are stacked along an extra dim and reduced in one pass.
    ``stackable`` caches the node's part of the answer by ``id(node)`` (one surrogate's costs).
    """
    if len(nodes) != 1:
        return None
    node = nodes[0]
    ok = None if stackable is None else stackable.get(id(node))
    if ok is None:
        est = node.estimator
        ok = (node.history is not None and est.causal_credit and est.control_variate_stacks()
              and est.uniform_weights)
        if stackable is not None:
            stackable[id(node)] = ok
    if not ok:
        return None
    plates = plates_of(cost)
    if len(plates) == 1:  # the partition's plate alone (no data plates): no tuple per cost
        return id(node), raw_of(cost).dtype
    name = node.plate.name
    return id(node), tuple(p.name if p.name == name else p for p in plates), raw_of(cost).dtype


def _steps_surrogate(node: Node, members: list, order: int = 1) -> torch.Tensor:
    """Σ over the costs of several steps of the single-node surrogate, as one stacked computation:
    Σ_t mean_data mean_x [MagicBox(L_t) C_t + a_t] (Eq. 2 with causal credit, w = 1/N)."""
    name = node.plate.name
    first = plates_of(members[0][1])
    k = next(i for i, q in enumerate(first) if q.name == name)
    others = first[:k] + first[k + 1:]
    steps = Plate(_STEPS, len(members), True)
    stacked_plates = (node.plate, steps) + others
    if node.steps_in_place:
        # every step has the plates of step 0: L_t of all steps is one cumulative sum over the
        # stacked l_t (DiCE's objective by hand), and the costs' plates differ only in the step
        # (every member's plates are those of the first but for the step: the group's key)
        total = _stacked_cumulative(node, [cost._plates[k].step for _, cost, _ in members])
        total = align(total, (node.plate, steps) + node.parents, stacked_plates)
        raws = [raw_of(cost) for _, cost, _ in members]
        if k:  # the partition's plate first, as in `total`
            raws = [align(r, first, (node.plate,) + others) for r in raws]
    else:
        raws, ls = [], []
        for _, cost, _ in members:
            plates = plates_of(cost)
            p = next(q for q in plates if q.name == name)
            target = (p,) + others
            raws.append(align(raw_of(cost), plates, target))
            # L_t and its plates (what node.at(t) holds, without building a view per step)
            lp, l = node.history[p.step] if p.step != node.step else (node.plates, node.gradient_values)
            ls.append(align(l, lp, target))
        shape = torch.broadcast_shapes(*(l.shape for l in ls))
        total = torch.stack([l if l.shape == shape else l.expand(shape) for l in ls], 1)  # L_t of each cost's step
    shape = raws[0].shape
    if any(r.shape != shape for r in raws):  # (torch.broadcast_shapes costs ~3 us per cost)
        shape = torch.broadcast_shapes(*(r.shape for r in raws))
        # (an expand to the shape a tensor has is still one op and one autograd node per step: skipped)
        raws = [r if r.shape == shape else r.expand(shape) for r in raws]
    raw = torch.stack(raws, 1)  # (N, steps, *others)
    raws = None
    # MagicBox(L) = exp(L - ⊥L), the exp in place: its input is needed by nothing else (one
    # (N, steps) buffer less at the peak, as the DiCE objective written by hand holds)
    box = torch.sub(total, total.detach()).exp_()
    est = node.estimator
    stacked = None
    if _has_control_variate(est):
        stacked = Node.__new__(Node)
        stacked.__dict__.update(node.__dict__)
        stacked.step_log = stacked._history = None
        stacked.parents, stacked.gradient_values = (steps,) + others, total
    total = None  # not held while the rest is built (the peak memory of the surrogate)
    inner = box * raw  # line 7 of Algorithm 1, per step
    if stacked is not None:
        frame = CostFrame(inner.detach(), stacked_plates, stacked, inner, members[0][0], order=order)
        if type(est).control_variate is _BASE_CONTROL_VARIATE:
            inner = _baseline_term(inner, est, stacked, frame, box, None)
        else:
            inner = _with_control_variate(inner, est, stacked, frame, order, node)
    # line 14 with w = 1/N (a mean over the node's plate), the costs summed over the steps and
    # averaged over the data points: the means over the plate and the data are one reduction
    return inner.sum(1).mean()


def _stacked_cumulative(node: Node, steps: list[int]) -> torch.Tensor:
    """L_t of a partition whose steps stayed in place, for each of ``steps``, stacked along dim 1:
    one stack of the logged l_t and one cumulative sum (the DiCE objective's ``cumsum``), shape
    ``(N, len(steps), *parents)``."""
    log = node.step_log
    last = max(steps)
    total = torch.stack([l for _, l in log[:last + 1]], 1).cumsum(1)
    if steps != list(range(last + 1)):  # not every step has a cost (or several have)
        first = steps[0]
        if steps == list(range(first, last + 1)):
            total = total.narrow(1, first, last + 1 - first)
        else:
            total = total.index_select(1, torch.tensor(steps, device=total.device))
    return total
