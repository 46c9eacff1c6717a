"""A cost's term of Eq. 2 in the form of Theorem 2 (the nested sums of the package docstring).

``cost_nodes`` finds the nodes upstream of a cost (by the sampling plates it carries), ``_at_cost`` takes each
as the cost sees it (a partition at the cost's step: causal credit), ``_running_sums`` shares the sums
L_j = l_1 + ... + l_j between the costs of one surrogate, and ``_cost_surrogate`` reduces MagicBox(L_k) · C with
each node's control variate and weights (``_one_node_surrogate``: a single node's DiCE objective as by hand).
"""

from __future__ import annotations

import operator
from typing import Optional

import torch

from .._order_guard import is_differentiated
from ..cost import CostFrame, _lead, magic_box
from ..estimators.base import Estimator
from ..estimators.checks import check_in_frame
from ..estimators.step_state import step_baseline
from ..graph import Graph
from ..node import Node
from ..plates.tensor import align, plates_of, raw_of
from .order import _guard_control_variate, _low_order


def cost_nodes(graph: Graph, cost) -> list[Node]:
    """The stochastic nodes upstream of ``cost``, in topological order."""
    get = graph.plates.get
    nodes = [owner for p in plates_of(cost) if isinstance(owner := get(p.name), Node)]
    if len(nodes) > 1:
        nodes.sort(key=_index)
    return nodes


_index = operator.attrgetter("index")


def _has_control_variate(est) -> bool:
    return est.has_control_variate()


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
            if i == last and box is not None and type(est).control_variate is _BASE_CONTROL_VARIATE:
                inner = _baseline_term(inner, est, node, frame, box, prefix)
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


_BASE_CONTROL_VARIATE = Estimator.control_variate


def _with_control_variate(inner: torch.Tensor, est, node: Node, frame: CostFrame, order: int,
                          guarded: Optional[Node] = None) -> torch.Tensor:
    """``inner`` plus the estimator's own control variate (line 11) of ``node`` at ``frame``, its layout checked
    for an estimator author and refused where differentiating it would be biased at ``order`` (for the node
    ``guarded``: the partition's node where ``node`` is its stacked steps)."""
    a = est.control_variate(node, frame)  # line 11
    if a is not None and (type(a) is not torch.Tensor or (a.shape != frame.tensor.shape and a.dim())):
        check_in_frame(est, "control_variate", a, frame)
    _guard_control_variate(a, node if guarded is None else guarded, order)
    return inner if a is None else inner + a


def _baseline_term(inner: torch.Tensor, est, node: Node, frame: CostFrame, box: torch.Tensor,
                   prefix: Optional[torch.Tensor]) -> torch.Tensor:
    """``inner`` plus the base class's control variate of the innermost node, MagicBox(L_{k-1}) ·
    (1 - MagicBox(l_k)) ⊥b = (MagicBox(L_{k-1}) - MagicBox(L_k)) ⊥b (a product of MagicBoxes is the
    MagicBox of the sum), with MagicBox(L_k) the cost's own ``box``: the same values and derivatives
    at every order, without computing that MagicBox a second time."""
    b = step_baseline(est, node, frame)
    if b is None:
        return inner
    if type(b) is not torch.Tensor or (b.shape != frame.tensor.shape and b.dim()):  # (a scalar: no call)
        check_in_frame(est, "baseline", b, frame)
    outer = 1.0 if prefix is None else magic_box(prefix)
    return inner + (outer - box) * b.detach()
