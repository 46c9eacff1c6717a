"""The running sums L_j = l_1 + ... + l_j of the gradient functions of a cost's nodes (the MagicBox arguments of
Theorem 2), shared by the costs of one surrogate.

``_Sums`` is the trie of the prefixes (by node) with each prefix's sum at the plates the costs asked for, and the
facts the surrogate asks once per node (``settle``); ``_running_sums`` finds or extends a cost's prefixes,
``_sum_at`` reads a prefix's L at a cost's plates. A constant gradient function (``_constant``: a pathwise node's
zeros) is never added, and a node that adds only the mean over its plate (``_passive``) is left out of the sums.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..conditions.order_guard import is_differentiated
from ..graph.node import Node
from ..plates.tensor import align
from .control_variates import _has_control_variate


class _Sums:
    """One surrogate's running sums L_j = l_1 + ... + l_j of the cost's nodes' gradient functions, shared by
    its costs: a trie by node (``children``: ``id(node)`` -> the level of the prefix one node longer), each
    level holding the prefix's sum at the plates the costs asked for (``entries``: ``(plates, L)``, ``L``
    ``None`` where every gradient function of the prefix is a constant). A chain of K nodes with a cost per
    node adds K gradient functions, not K²/2 (each summed again for every cost downstream of it, and each
    aligned to every cost's plates: O(K³) Python, O(K²) autograd nodes), as the DiCE objective written by
    hand keeps one running L."""

    __slots__ = ("children", "entries", "passive", "boxes", "paths", "nodes", "groups", "groupable")

    def __init__(self) -> None:
        self.children: dict = {}
        self.entries: list = []
        self.passive: Optional[dict] = None  # (the root's: id(node) -> _passive(node), asked once per node)
        # (the root's: (id(node), plates) -> MagicBox(l) at those plates, for the costs of one node that is not a
        # partition: built once, not once per cost; see _one_node_surrogate)
        self.boxes: Optional[dict] = None
        # (the root's: the ids of a prefix's nodes -> its levels, so that a cost one node longer than an earlier
        # one finds its levels without walking the trie again: O(1) Python per cost of a chain, not O(k))
        self.paths: Optional[dict] = None
        # (the root's, see settle: the ids of the graph's nodes that _at_cost changes, that are passive, and
        # that have a control variate or weights)
        self.nodes: Optional[tuple] = None
        # (the root's, where the surrogate sums them, see _grouped_cost: the control variates of the costs by
        # node, ``(id(node), plates, ids of L_{i-1}'s nodes)`` -> ``[node, plates, those nodes, Σ_c b(c)]``; ``None``:
        # each cost adds its own; ``groupable``: id(node) -> whether the node's control variate may join a group)
        self.groups: Optional[dict] = None
        self.groupable: Optional[dict] = None

    def settle(self, nodes: list[Node]) -> None:
        """Ask each of the graph's ``nodes`` once what :func:`_cost_surrogate` asks each cost's nodes: whether
        :func:`_at_cost` takes another view of it or computes its weights (a partition; weights not computed
        yet), whether it is :func:`_passive`, whether its term has a control variate or weights (``special``).
        A cost of none of the first and third kinds, in a graph without passive nodes (a chain of score nodes
        without baseline) is then built without a loop over its nodes."""
        changed, passive, special = set(), set(), set()
        memo = self.passive
        if memo is None:
            memo = self.passive = {}
        for node in nodes:
            est = node.estimator
            uniform = est.uniform_weights
            if node.history is not None or (not uniform and node.weight_values is None):
                changed.add(id(node))
            flag = memo[id(node)] = _passive(node)  # (the per-cost loop's memo: asked once per node)
            if flag:
                passive.add(id(node))
            elif not uniform or _has_control_variate(est):
                special.add(id(node))
        self.nodes = (changed, passive, special)

    def held(self, target: tuple, within: set):
        """An entry whose plates are all in ``target`` (the exact plates first), or ``None``."""
        entries = self.entries
        for i in range(len(entries) - 1, -1, -1):
            e = entries[i]
            if e[0] == target:
                return e
        for i in range(len(entries) - 1, -1, -1):
            e = entries[i]
            if within.issuperset(e[0]):
                return e
        return None


def _constant(l) -> bool:
    """Whether a gradient function is a constant of everything differentiated (the zeros of a pathwise node:
    reparameterization, gumbel_softmax; a frozen distribution's log p): its l - ⊥l is 0 with every
    derivative 0 at every order, so it leaves each MagicBox(L) the same function and is not added. One that
    requires grad or carries a forward tangent stays, a zero that carries gradient included."""
    return isinstance(l, torch.Tensor) and not is_differentiated(l)


def _running_sums(nodes: list[Node], plates: tuple, sums: _Sums, record: bool = False) -> list:
    """The levels of ``sums`` for the prefixes of ``nodes`` (``levels[i]``: nodes[:i+1]); the last holds
    L_k = l_1 + ... + l_k at ``plates`` (an entry whose plates are ``plates``). A prefix some earlier cost
    summed (at plates that are all in ``plates``) is aligned and extended: one addition per node the cost
    does not share with it. The sums are added in the nodes' order, so the values are those of the plain
    sum at ``plates`` (a view of a broadcast sum is the sum of the views). ``record``: keep the last prefix's sum
    aligned to ``plates`` on its level also where nothing is added (the cost's last nodes were passive, left
    out: the next cost aligns from this one's plates, as it did from the passive node's level)."""
    paths = sums.paths
    if paths is None:
        paths = sums.paths = {}
    ids: tuple = tuple(map(id, nodes))
    levels = paths.get(ids)
    if levels is None:
        head = paths.get(ids[:-1]) if len(ids) > 1 else None
        if head is not None:  # (the prefix one node shorter: the trie's walk would find its levels)
            level = head[-1]
            nxt = level.children.get(ids[-1])
            if nxt is None:
                nxt = level.children[ids[-1]] = _Sums()
            levels = head + [nxt]
        else:
            levels = []
            level = sums
            for key in ids:
                nxt = level.children.get(key)
                if nxt is None:
                    nxt = level.children[key] = _Sums()
                levels.append(nxt)
                level = nxt
        paths[ids] = levels
    within = set(plates)
    total, start = None, 0
    for j in range(len(levels) - 1, -1, -1):
        e = levels[j].held(plates, within)
        if e is not None:
            if j == len(levels) - 1 and e[0] == plates:
                return levels
            total, start = e[1], j + 1
            if total is not None:
                total = align(total, e[0], plates)
            if record and start == len(levels):
                levels[j].entries.append((plates, total))
            break
    for i in range(start, len(nodes)):
        node = nodes[i]
        l_i = node.gradient_values
        if not _constant(l_i):
            l_i = align(l_i, node.plates, plates)
            total = l_i if total is None else total + l_i
        levels[i].entries.append((plates, total))
    return levels


def _passive(node: Node) -> bool:
    """Whether ``node`` adds nothing to a cost's term but the mean over its plate: uniform weights, no control
    variate, a constant gradient function (:func:`_constant`: a pathwise node's zeros), not a partition.
    :func:`_cost_surrogate` then reduces its plate with the others' and leaves it out of the running sums (a
    constant is not added there either: the same values). M pathwise nodes with a cost each: asked M times a
    surrogate, not M²/2 (each cost asked each node upstream of it for its weights, control variate and L)."""
    est = node.estimator
    return (node.history is None and est.uniform_weights and not _has_control_variate(est)
            and _constant(node.gradient_values))


def _sum_at(level: _Sums, plates: tuple) -> Optional[torch.Tensor]:
    """The prefix's L at ``plates`` (``None``: constant); :func:`_running_sums` left one within them."""
    e = level.held(plates, set(plates))
    return None if e[1] is None else align(e[1], e[0], plates)

