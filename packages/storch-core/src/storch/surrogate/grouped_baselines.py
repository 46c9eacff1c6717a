"""The control variates of a surrogate's costs grouped by node (Theorem 2's sum over the costs): the base class's
``(1 - MagicBox(l_w)) ⊥b_w(c)`` of the costs that share a node's plates, summed into one term per node.

``_all_groupable`` says whether a cost's control variates may join their groups, ``_grouped_cost`` builds the cost's
term without them (their frames and baselines as the per-cost path asks them), ``_join`` adds a baseline to its
node's group, ``_grouped_terms`` builds the groups' terms, and ``_LiveInner`` a frame's live tensor when asked.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from ..graph.cost_frame import CostFrame, magic_box
from ..estimators.checks import check_in_frame
from ..estimators.step_state import step_baseline
from ..graph.node import Node
from ..plates.tensor import align
from .control_variates import _BASE_CONTROL_VARIATE, _has_control_variate
from .order import _low_order
from .running_sums import _constant, _running_sums, _sum_at, _Sums


def _all_groupable(nodes: list[Node], order: int, sums: _Sums) -> bool:
    """Whether the cost's control variates may join their nodes' groups (:func:`_grouped_cost`): every node has
    uniform weights (between the cost and a node's control variate there are only means) and is no partition's
    step, and each node with a control variate has the base class's ``(1 - MagicBox(l)) b`` with a baseline ``b``
    (a constant), unbiased at ``order`` (no refusal to hook). Asked once per node a surrogate."""
    memo = sums.groupable
    if memo is None:
        memo = sums.groupable = {}
    for node in nodes:
        flag = memo.get(id(node))
        if flag is None:
            est = node.estimator
            flag = memo[id(node)] = node.history is None and est.uniform_weights and (
                not _has_control_variate(est)
                or (type(est).control_variate is _BASE_CONTROL_VARIATE and not _low_order(node, order)))
        if not flag:
            return False
    return True


def _grouped_cost(inner: torch.Tensor, plates: tuple, nodes: list[Node], passive: list, active: list, at: list,
                  levels: Optional[list], name: Optional[str], order: int, renamed: Optional[tuple],
                  sums: _Sums) -> torch.Tensor:
    """The cost's term of Eq. 2 without its control variates, which join their nodes' groups (``sums.groups``):
    Theorem 2's Σ_c Σ_{w upstream of c} MagicBox(L_{w-1}) (1 - MagicBox(l_w)) ⊥b_w(c) is, for the costs whose
    plates at w's term (the cost's, without those of the nodes after w: reduced by their means before it) are the
    same, MagicBox(L_{w-1}) (1 - MagicBox(l_w)) Σ_c ⊥b_w(c): the baselines are constants, summed without autograd,
    and each term's share of the cost's final mean is its own mean (the reductions between are means). A chain
    of M nodes with a cost each builds M such terms, not M²/2 (each with its MagicBoxes, alignments and a mean
    of the cost per pair: an autograd graph of O(M²) nodes). The frames, the baselines asked, the estimators'
    state (a moving average per (cost, node)) are the per-cost path's: each frame's values are the cost's mean
    over the plates of the later nodes (the control variates added before are 0), computed in the same chunks.
    ``inner``: MagicBox(L_k) · C at ``plates``."""
    val = inner.detach()
    pending: list[int] = []
    keep = list(range(len(plates)))  # the dims but those of the nodes after node i (reduced before its term)
    # per node from the last: what a frame's live tensor is rebuilt from (no Node: a frame is held by its node)
    seen: list = []
    groups = sums.groups
    assert groups is not None
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        dim = plates.index(node.plate)
        est = node.estimator
        b = None
        cv = not passive[i] and _has_control_variate(est)
        if cv:
            if pending:
                if any(val.shape[d] != 1 for d in pending):  # (a mean over size-1 dims: the same values)
                    val = val.mean(pending, keepdim=True)
                pending = []
            state = renamed[0] if renamed is not None and node.plate.name in renamed[1] else None
            live = _LiveInner(inner, plates, levels, seen, len(seen))
            frame = CostFrame(val, plates, node, live, name, state, order)
            node.frames[frame.key] = frame  # what update_parameters trains on
            b = step_baseline(est, node, frame)
            if b is not None:
                if type(b) is not torch.Tensor or (b.shape != val.shape and b.dim()):  # (a scalar: no call)
                    check_in_frame(est, "baseline", b, frame)
                b = b.detach()
                if not _constant(node.gradient_values):  # (else 1 - MagicBox(l) is 0 with every derivative)
                    _join(groups, node, plates, keep, active[:at[i]], b)
        seen.append((dim, cv, node.gradient_values, node.plates, at[i], b))
        pending.append(dim)
        keep.remove(dim)
    return inner.mean() if inner.dim() else inner


def _join(groups: dict, node: Node, plates: tuple, keep: list, prefix: list, b: torch.Tensor) -> None:
    """Add the baseline ``b`` (laid out like the frame at ``plates``; size 1 but at the dims ``keep``) to the group
    of ``node`` at the plates ``keep``, whose L_{i-1} sums the (non-passive) nodes ``prefix``."""
    if len(keep) == len(plates):
        target = plates
    else:
        pick = operator.itemgetter(*keep) if len(keep) > 1 else (lambda t: (t[keep[0]],))
        target = pick(plates)
        if b.dim():
            shape = (1,) * (len(plates) - b.dim()) + tuple(b.shape)
            b = b.reshape(pick(shape))
    key = (id(node), target, tuple(map(id, prefix)))
    group = groups.get(key)
    if group is None:
        groups[key] = [node, target, prefix, b]
    else:
        group[3] = group[3] + b


def _grouped_terms(sums: _Sums) -> Optional[torch.Tensor]:
    """The control variates of the groups (:func:`_grouped_cost`): per group, the mean of MagicBox(L_{i-1})
    (1 - MagicBox(l_i)) Σ_c ⊥b_i(c) at the group's plates (value 0); ``None`` where there are none."""
    out = None
    for node, plates, prefix, b in (sums.groups or {}).values():
        x = 1.0 - magic_box(align(node.gradient_values, node.plates, plates))
        if prefix:
            total = _sum_at(_running_sums(prefix, plates, sums)[-1], plates)
            if total is not None:
                x = magic_box(total) * x
        t = x * b
        t = t.mean() if t.dim() else t
        out = t if out is None else out + t
    return out


class _LiveInner:
    """A frame's live tensor on the grouped path (:func:`_grouped_cost`), built when first asked for: the inner
    cost estimate with its graph as the per-cost path had it at the frame's node, MagicBox(L_k) · C with the later
    nodes' control variates added and the means between (``seen[:upto]``: the later nodes, from the last)."""

    __slots__ = ("args",)

    def __init__(self, *args) -> None:
        self.args = args

    def __call__(self) -> torch.Tensor:
        inner, plates, levels, seen, upto = self.args
        pending: list[int] = []
        for dim, cv, l, node_plates, k, b in seen[:upto]:
            if cv:
                if pending:
                    inner, pending = inner.mean(pending, keepdim=True), []
                if b is not None:
                    prefix = _sum_at(levels[k - 1], plates) if k and levels is not None else None
                    a = (1.0 - magic_box(align(l, node_plates, plates))) * b
                    inner = inner + (a if prefix is None else magic_box(prefix) * a)
            pending.append(dim)
        return inner.mean(pending, keepdim=True) if pending else inner

