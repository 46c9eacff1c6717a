"""A cost's term of Eq. 2 in the form of Theorem 2 (the nested sums of the package docstring).

``cost_nodes`` finds the nodes upstream of a cost (by the sampling plates it carries), ``_at_cost`` takes each
as the cost sees it (a partition at the cost's step: causal credit), ``_running_sums`` shares the sums
L_j = l_1 + ... + l_j between the costs of one surrogate, and ``_cost_surrogate`` reduces MagicBox(L_k) · C with
each node's control variate and weights (``_one_node_surrogate``: a single node's DiCE objective as by hand).
The running sums are :mod:`.running_sums`, the control variates :mod:`.control_variates` and, summed by node over
the costs, :mod:`.grouped_baselines`.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from ..graph.cost_frame import CostFrame, _lead, magic_box
from ..estimators.checks import check_in_frame
from ..estimators.step_state import step_baseline
from ..graph import Graph
from ..graph.node import Node
from ..plates.tensor import align, plates_of, raw_of
from .control_variates import (_BASE_CONTROL_VARIATE, _base_control_variate, _baseline_term, _has_control_variate,
                               _with_control_variate)
from .grouped_baselines import _all_groupable, _grouped_cost
from .order import _guard_control_variate
from .running_sums import _constant, _passive, _running_sums, _sum_at, _Sums


def cost_nodes(graph: Graph, cost) -> list[Node]:
    """The stochastic nodes upstream of ``cost``, in topological order."""
    get = graph.plates.get
    nodes = [owner for p in plates_of(cost) if isinstance(owner := get(p.name), Node)]
    if len(nodes) > 1:
        nodes.sort(key=_index)
    return nodes


_index = operator.attrgetter("index")

def _at_cost(cost_plates: tuple, raw: torch.Tensor, nodes: list[Node]):
    """The nodes as the cost sees them: a partition as of the step of the cost's partition plate
    (``node.at(t)``: step t's sample, distribution, L_t, ...).

    Causal credit (paper, section 3.2; DiCE): a cost computed at step t of a partition gets the
    partition's cumulative gradient function L_t, not the whole sequence's. For a partition
    without causal credit (sampling without replacement: weights belong to the final set), the
    cost is moved to the last step (re-indexed by the parents) instead.
    """
    out = []
    for node in nodes:
        if node.history is not None:
            p = next(q for q in cost_plates if q.name == node.plate.name)
            if not node.estimator.causal_credit and p.step != node.step:
                new = tuple(node.plate if q.name == p.name else q for q in cost_plates)
                names = {q.name for q in new}
                new += tuple(q for q in node.parents if q.name not in names)  # of later steps
                raw = align(raw, cost_plates, new)
                cost_plates = new
            step = p.step if node.estimator.causal_credit else node.step
            if step == node.step and not node.estimator.uniform_weights and node.weight_values is None:
                # the last step's weights are the node's own (read from it after the surrogate)
                node.weight_values = _lead(node.estimator.weighting_function(node), len(node.plates))
            # the view of the cost's step (without causal credit: the last step's), also at the last
            # step: the node itself holds the last step's sample but the first step's distribution
            node = node.at(step)
        _ensure_weights(node)
        out.append(node)
    return cost_plates, raw, out


def _ensure_weights(node: Node) -> None:
    """Compute the node's weights w(x) if they are not uniform (w = 1/N: the surrogate takes a mean) and not
    computed yet (a partition's last step's are read from the node after the surrogate)."""
    if not node.estimator.uniform_weights and node.weight_values is None:
        node.weight_values = _lead(node.estimator.weighting_function(node), len(node.plates))

def _cost_surrogate(cost, nodes: list[Node], name: Optional[str] = None, order: int = 1,
                    renamed: Optional[tuple] = None, sums: Optional[_Sums] = None) -> torch.Tensor:
    """The cost's term of Eq. 2. ``renamed``: the cost's state name and the plate names of the nodes whose
    frames use it (:func:`_state_names`), or ``None``. ``sums``: the running sums of the gradient functions
    shared by the costs of one surrogate (:class:`_Sums`), or ``None`` (this cost's own)."""
    if not nodes:  # a cost of the data alone (a KL term): the mean over the data points
        raw = raw_of(cost)
        return raw.mean() if raw.dim() else raw
    settled = sums.nodes if sums is not None else None
    if settled is not None and (not settled[0] or settled[0].isdisjoint(map(id, nodes))):
        plates, raw = plates_of(cost), raw_of(cost)  # (_at_cost would hand back the nodes as they are)
    else:
        settled = None
        plates, raw, nodes = _at_cost(plates_of(cost), raw_of(cost), nodes)
    if len(nodes) == 1:
        node = nodes[0]
        if sums is None or node.history is not None:  # (a partition's view of a step: built per cost)
            return _one_node_surrogate(raw, plates, node, name, order, renamed)
        boxes = sums.boxes
        if boxes is None:
            boxes = sums.boxes = {}
        key = (id(node), plates)
        box = boxes.get(key)
        if box is None:
            box = boxes[key] = magic_box(align(node.gradient_values, node.plates, plates))
        return _one_node_surrogate(raw, plates, node, name, order, renamed, box)
    # L_k (and, for the nodes with a control variate, L_{i-1}: Theorem 2's MagicBox arguments) aligned to
    # the cost's plates, from the running sums shared with the surrogate's other costs; constant gradient
    # functions (a pathwise node's zeros) are not added (the same MagicBox functions, see _constant)
    if sums is None:
        sums = _Sums()
    elif settled is not None and not settled[1] and (not settled[2] or settled[2].isdisjoint(map(id, nodes))):
        # every node of the cost active (no passive node in the graph), none with a control variate or weights:
        # the loop below would only collect each plate for the final mean (the same terms, no loop over the nodes)
        total = _sum_at(_running_sums(nodes, plates, sums)[-1], plates)
        inner = raw if total is None else magic_box(total) * raw
        return inner.mean() if inner.dim() else inner
    memo = sums.passive
    if memo is None:
        memo = sums.passive = {}
    passive = []
    active = []  # the nodes that are not passive, and each node's count of them before it (at[i])
    at = []
    for node in nodes:
        key = id(node)
        flag = memo.get(key)
        if flag is None:
            flag = memo[key] = _passive(node)
        passive.append(flag)
        at.append(len(active))
        if not flag:
            active.append(node)
    levels = _running_sums(active, plates, sums, passive[-1]) if active else None
    total = None if levels is None else _sum_at(levels[-1], plates)
    box = None if total is None else magic_box(total)  # MagicBox(L_k)
    inner = raw if box is None else box * raw  # line 7 of Algorithm 1
    if sums.groups is not None and _all_groupable(nodes, order, sums):
        return _grouped_cost(inner, plates, nodes, passive, active, at, levels, name, order, renamed, sums)
    last = len(nodes) - 1
    # line 14 with w = 1/N (D.2.1) is a mean over the node's plate; consecutive means (no control
    # variate added in between) are one reduction, and the last ones join the final mean over
    # the data plates: the autograd graph of a single node with one cost is DiCE's, as by hand
    pending: list[int] = []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        dim = plates.index(node.plate)
        if passive[i]:  # (w = 1/N, no control variate, l constant: the mean over its plate alone)
            pending.append(dim)
            continue
        est = node.estimator
        if _has_control_variate(est):
            if pending:
                inner, pending = inner.mean(pending, keepdim=True), []
            state = renamed[0] if renamed is not None and node.plate.name in renamed[1] else None
            frame = CostFrame(inner.detach(), plates, node, inner, name, state, order)
            node.frames[frame.key] = frame  # what update_parameters trains on
            j = at[i]  # L_{i-1}: the sum of the non-passive nodes' l before node i (a passive one's is constant)
            prefix = _sum_at(levels[j - 1], plates) if j and levels is not None else None
            base = type(est).control_variate is _BASE_CONTROL_VARIATE
            if i == last and box is not None and base:
                # L_{k-1} = l of the first active node alone: its MagicBox is the one that node's own control
                # variate reads (below), built once (_shared_box). At order 1 only: the values are the same
                # bitwise (the MagicBox is 1: its backward multiplies by 1), the gradient up to the order of a sum
                # (l_1's three uses are added as a + (b + c), not (a + b) + c: 1 ulp in float32, review r-44);
                # higher orders keep the general path's graph
                outer = (_shared_box(sums, active[0], plates) if order == 1 and j == 1 and prefix is not None
                         and active[0].history is None else None)
                inner = _baseline_term(inner, est, node, frame, box, prefix, outer)
            elif (base and order == 1 and prefix is None and node.history is None
                  and not _constant(l := node.gradient_values)
                  and l.dim() >= len(node.plates)):  # (else CostFrame.align's _lead: the general path)
                a = _base_control_variate(est, node, frame, _shared_box(sums, node, plates))  # line 11
                _guard_control_variate(a, node, order)
                if a is not None:
                    inner = inner + a
            else:
                a = est.control_variate(node, frame)  # line 11
                if a is not None and (type(a) is not torch.Tensor or (a.shape != frame.tensor.shape and a.dim())):
                    check_in_frame(est, "control_variate", a, frame)  # (the common path: one tuple comparison)
                _guard_control_variate(a, node, order)
                if a is not None:
                    inner = inner + (a if prefix is None else magic_box(prefix) * a)
        if est.uniform_weights:
            pending.append(dim)
        else:
            if pending:
                inner, pending = inner.mean(pending, keepdim=True), []
            w = align(node.weight_values, node.plates, plates)
            inner = (w * inner).sum(dim, keepdim=True)  # line 14: weight and sum over X_i
    # what is left are independent plates (and size-1 dims): the mean over data points
    return inner.mean() if inner.dim() else inner


def _shared_box(sums: _Sums, node: Node, plates: tuple) -> torch.Tensor:
    """MagicBox(l) of ``node`` at ``plates``, built once per surrogate (``sums.boxes``): the same tensor for its own
    control variate, the next node's MagicBox(L_{k-1}) and the one-node costs. A partition's view of a step
    reaches it too (its ``gradient_values`` are its L_t; views are cached on the node, so ``id`` is stable). The
    one-node cost path in :func:`_cost_surrogate` does the same inline (one call fewer on the common path)."""
    boxes = sums.boxes
    if boxes is None:
        boxes = sums.boxes = {}
    key = (id(node), plates)
    box = boxes.get(key)
    if box is None:
        box = boxes[key] = magic_box(align(node.gradient_values, node.plates, plates))
    return box


def _one_node_surrogate(raw: torch.Tensor, plates: tuple, node: Node, name: Optional[str],
                        order: int = 1, renamed: Optional[tuple] = None,
                        box: Optional[torch.Tensor] = None, uniform: Optional[bool] = None) -> torch.Tensor:
    """:func:`_cost_surrogate` for a cost downstream of one node: the DiCE objective written by hand,
    mean over the plates of MagicBox(l) · C, and with the base class's control variate (a baseline b)
    ``lerp(⊥b, C, MagicBox(l))`` = MagicBox(l) · C + (1 - MagicBox(l)) · ⊥b in one autograd node
    (the same function, so the same derivatives at every order; its value is C exactly, as
    ``torch.lerp`` computes ``end - (end - start) · (1 - weight)`` at weight 1). ``box``: MagicBox(l) at
    ``plates`` where the surrogate's other costs of this node share it (built once for all of them, as by hand:
    the same values; a gradient summed in another order). ``uniform``: the estimator's ``uniform_weights``, where the
    caller read it already."""
    est = node.estimator
    if box is None:
        box = magic_box(align(node.gradient_values, node.plates, plates))  # MagicBox(l), line 7
    if est.has_control_variate():
        state = renamed[0] if renamed is not None and node.plate.name in renamed[1] else None
        if type(est).control_variate is _BASE_CONTROL_VARIATE:
            # the frame's values are C's (MagicBox(l) = 1); its live tensor is built if asked for
            frame = CostFrame(raw.detach(), plates, node, lambda: box * raw, name, state, order)
            node.frames[frame.key] = frame  # what update_parameters trains on
            b = step_baseline(est, node, frame)
            if b is None:
                inner = box * raw
            else:
                if type(b) is not torch.Tensor or (b.shape != raw.shape and b.dim()):  # (a scalar: no call)
                    check_in_frame(est, "baseline", b, frame)
                if b.requires_grad:  # b must not carry gradient (appendix D.2.1); most are built detached
                    b = b.detach()
                if b.dtype == raw.dtype == box.dtype and b.device == raw.device:
                    inner = torch.lerp(b, raw, box)
                else:
                    inner = box * raw + (1.0 - box) * b
        else:
            inner = box * raw
            frame = CostFrame(inner.detach(), plates, node, inner, name, state, order)
            node.frames[frame.key] = frame
            inner = _with_control_variate(inner, est, node, frame, order)
    else:
        inner = box * raw
    if not (est.uniform_weights if uniform is None else uniform):
        dim = plates.index(node.plate)
        w = align(node.weight_values, node.plates, plates)
        inner = (w * inner).sum(dim, keepdim=True)  # line 14: weight and sum over X_i
    # w = 1/N: the mean over the node's plate and the data plates is one reduction
    return inner.mean() if inner.dim() else inner

