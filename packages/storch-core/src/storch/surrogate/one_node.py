"""The order-1 surrogate of the commonest step: one node, the costs downstream of it, and costs of the data alone.

The same terms of Eq. 2 as the general path (:mod:`.loss`) builds for such a step, in the same order (the same
loss and autograd graph), without its per-cost and per-node loops: taken only where the general path's checks
are known to do nothing, and ``None`` otherwise (the general path then decides). Hot code: every call here is
one a training step pays (issue 19).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..graph.cost_frame import magic_box
from ..graph import Graph
from ..graph.node import Node
from ..plates.tensor import PlateTensor, align
from ..conditions.score import KINK_FREE
from .reaches import _REACH_KEY
from .terms import _ensure_weights, _one_node_surrogate


def _one_node_loss(graph: Graph) -> Optional[torch.Tensor]:
    """The order-1 surrogate of the commonest step, one node and one cost downstream of it (and any costs of the
    data alone: a VAE's KL), where the general path's checks are known to do nothing (no refusal, warning or
    hook): the same terms in the same order (:func:`_one_node_surrogate`, the data costs' means: the same loss
    and autograd graph) without the per-cost and per-node loops around them. ``None`` where one of them might
    act; the general path then decides (and raises, warns or hooks as it does for every graph)."""
    node = graph.nodes[0]
    if graph.no_credit or node.no_grad_cut or node.thresholded is not None:
        return None  # (credit=False, a node sampled under no_grad, a jump refused by _check_reaches)
    for raw, version in node.handed:
        if raw._version != version:
            return None  # its samples changed in place: the general path decides whether that is refused
    est = node.estimator
    # what the general path's checks of the node would find, read inline (a call each cost ~0.5 us in a step):
    # _check_order passes and _guard_low_order hooks nothing (unbiased above order 1, a log p known smooth:
    # KINK_FREE); _check_smooth and _check_reaches do nothing (not pathwise, and an earlier surrogate found its
    # gradient flows through no sample it hands out: _REACH_KEY is None)
    if not (est.max_order > 1 and node.max_order > 1 and type(node.distribution) in KINK_FREE
            and not est.requires_rsample and not est.pathwise and est.__dict__.get(_REACH_KEY, ()) is None):
        return None
    costs = graph.costs
    if node.step_log is not None:
        return _last_step_loss(graph, node, est)
    if len(costs) == 1:  # (the toy's step: no list of terms)
        name, cost = costs[0]
        if type(cost) is not PlateTensor or node.plate not in cost._plates:
            return None  # a cost of the data alone: the general path warns that no cost is downstream of the node
        uniform = est.uniform_weights  # (read once: _ensure_weights and _one_node_surrogate would read it again)
        if not uniform:
            _ensure_weights(node)
        raw, plates = cost._raw, cost._plates
        if raw.dtype is torch.float64:
            _widen_to_float64(graph.nodes)
        # MagicBox(l) at the cost's plates, as _one_node_surrogate builds it, without its three calls: the node is
        # no partition (its gradient_values are its l), and a cost of exactly its plates needs no alignment
        l, own = node._gradient_values, (node.plate,) + node.parents
        box = magic_box(l if plates == own else align(l, own, plates))
        loss = _one_node_surrogate(raw, plates, node, name, box=box, uniform=uniform)
        return loss if loss.dim() == 0 else loss.reshape(())
    terms = _costs_at(costs, node.plate.name)
    if terms is None:
        return None
    terms, reached = terms
    if any(raw.dtype is torch.float64 for _, raw, _ in terms):
        _widen_to_float64(graph.nodes)
    if reached > 1:
        return _many_costs_loss(node, terms)
    loss = None
    for name, raw, plates in terms:
        if plates is None:  # a cost of the data alone: the mean over the data points (_cost_surrogate)
            s = raw.mean() if raw.dim() else raw
        else:
            _ensure_weights(node)
            s = _one_node_surrogate(raw, plates, node, name)
        loss = s if loss is None else loss + s
    return loss if loss.dim() == 0 else loss.reshape(())  # type: ignore[union-attr]


def _last_step_loss(graph: Graph, node: Node, est) -> Optional[torch.Tensor]:
    """:func:`_one_node_loss` for a partition (one estimator called at every step of a sequence) with one cost, at
    its last step and of exactly that step's plates (a decoder's reconstruction of the whole sequence, a terminal
    reward), uniform weights: what the general path builds for it, without the per-cost and per-node loops around
    it (~70 us of Python per step in the GRU decoder's). There the cost reaches the last step (no unreached-step
    warning), a lone cost is no stack of steps, and its term is :func:`_one_node_surrogate` of the node's view of
    that step (``node.at``: its L_T, sample and distribution, where a baseline reads them), MagicBox(L_T) · C
    (+ the baseline) and the mean: the same loss and autograd graph. ``None`` otherwise (costs per step, a
    sampled weighting, a cost of other plates: the general path)."""
    costs = graph.costs
    if len(costs) != 1 or not est.uniform_weights or node.integer_parameter is not None:
        return None
    name, cost = costs[0]
    if type(cost) is not PlateTensor:
        return None
    raw, plates = cost._raw, cost._plates
    if plates[0] is not node.plate or plates[1:] != node.parents:
        return None  # (the cost of another step, or with other plates: _at_cost's re-indexing)
    if raw.dtype is torch.float64:
        _widen_to_float64(graph.nodes)  # (before L_T is summed, as the general path does)
    view = node.at(node.step)
    l, own = view.gradient_values, view.plates
    box = magic_box(l if plates == own else align(l, own, plates))
    loss = _one_node_surrogate(raw, plates, view, name, box=box, uniform=True)
    return loss if loss.dim() == 0 else loss.reshape(())


def _widen_to_float64(nodes: list[Node]) -> None:
    """Give the nodes upstream of a float64 cost their l (and weights) in float64 (:meth:`Node.widen_to_float64`;
    a partition's per-step l_t too, which its cumulative L_t reads, found by p-docs6)."""
    for node in nodes:
        node.widen_to_float64()


def _many_costs_loss(node: Node, terms: list) -> torch.Tensor:
    """:func:`_one_node_loss` for several costs downstream of its node (a loss in several terms, a reward per
    time step without a partition, a KL per latent dim): the costs of the same plates (and dtype) share one
    MagicBox(l) and one weighting. Without a control variate their surrogate is one term, MagicBox(l) · Σ_i C_i
    reduced once (as by hand: the costs summed before the score term; the same function, its value summed in
    another order); with one (a baseline per cost, kept under the cost's name) each cost keeps its term and
    frame, built on the shared MagicBox(l) (the same values as the general path's)."""
    _ensure_weights(node)
    boxes: dict = {}  # plates -> MagicBox(l) at them
    if node.estimator.has_control_variate():
        loss = None
        for name, raw, plates in terms:
            if plates is None:  # a cost of the data alone: the mean over the data points (_cost_surrogate)
                s = raw.mean() if raw.dim() else raw
            else:
                box = boxes.get(plates)
                if box is None:
                    box = boxes[plates] = magic_box(align(node.gradient_values, node.plates, plates))
                s = _one_node_surrogate(raw, plates, node, name, box=box)
            loss = s if loss is None else loss + s
        return loss if loss.dim() == 0 else loss.reshape(())  # type: ignore[union-attr]
    sums: dict = {}  # (plates, dtype) -> [the sum of its costs, their first name]
    loss = None
    box_dtype = node.gradient_values.dtype
    for name, raw, plates in terms:
        if plates is None:
            s = raw.mean() if raw.dim() else raw
            loss = s if loss is None else loss + s
            continue
        # summed in the dtype the general path's MagicBox(l) · C computes in (a bf16 / fp16 cost is promoted
        # before it is added: summed in bf16, 300 + 0.5 is 300, and a small cost's term was lost; review r-ten)
        dtype = torch.promote_types(raw.dtype, box_dtype)
        if raw.dtype != dtype:
            raw = raw.to(dtype)
        key = (plates, dtype)
        group = sums.get(key)
        if group is None:
            sums[key] = [raw, name]
        else:
            group[0] = group[0] + raw
    for (plates, _), (raw, name) in sums.items():
        s = _one_node_surrogate(raw, plates, node, name)
        loss = s if loss is None else loss + s
    return loss if loss.dim() == 0 else loss.reshape(())  # type: ignore[union-attr]


def _costs_at(costs: list, own: str) -> Optional[tuple[list, int]]:
    """For :func:`_one_node_loss`: ``(name, raw, plates)`` of each cost, ``plates`` ``None`` for a cost of the
    data alone (it does not carry the node's plate ``own``), and how many carry it; ``None`` where none does (the
    general path warns that no cost is downstream of the node) or two of those have one name (the general path
    may keep their estimator state under per-plate names, :func:`_state_names`, or warns that they share it)."""
    out = []
    names: Optional[set] = None
    first = None
    reached = 0
    for name, cost in costs:
        if type(cost) is not PlateTensor:
            out.append((name, cost, None))
            continue
        plates = cost._plates
        for p in plates:
            if p.name == own:
                if reached == 1:
                    names = {first}
                if names is not None:
                    if name in names:
                        return None
                    names.add(name)
                first = name
                reached += 1
                break
        else:
            plates = None
        out.append((name, cost._raw, plates))
    return (out, reached) if reached else None
