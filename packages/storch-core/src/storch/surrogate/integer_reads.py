"""A pathwise node's cost computed from an integer value read from its sample (``_check_integer_reads``): the value
jumps where the sample crosses a threshold and has no autograd history (marked by :mod:`storch.plates.integer_reads`
when it was made), so the pathwise gradient would miss the jump's term: refused at every order >= 1.
"""

from __future__ import annotations

from typing import Optional

from ..conditions.order_guard import unbatched
from ..errors import OrderError
from ..graph.node import Node
from ..plates.integer_reads import MARKS, record_of
from ..conditions.smoothness import _reaches


def _check_integer_reads(name: str, cost, nodes: list[Node], order: int, closed: Optional[dict] = None) -> None:
    """At every order >= 1: refuse a cost computed from an integer value read from a pathwise node's sample (an
    integer cast, argmax / argsort, bucketize / searchsorted, the indices of max / topk / sort / kthvalue and of the
    max poolings: marked by :mod:`storch.plates.integer_reads` when it was made, where the operand's autograd graph
    reaches a value the node handed out, or it was detached and carries only the node's plates). The value jumps
    where the sample crosses a threshold and has no autograd history, so the pathwise gradient misses the jump's
    term, also where the cost depends on the sample smoothly as well (``img[l.long()] + l ** 2``: 0.460 for
    0.511). So is a cost that reaches a later node drawn from parameters computed from such a value
    (``Normal(img[x.long()], 1)``, ``Categorical(logits=emb[x.long()])``: ``Node.integer_parameter``): neither its
    sample nor the cost carries the mark (found by review: 0.460 for 0.504, z = -12; 0.460 for -0.323, z = 218).
    ``closed``: the graph's ``integer_costs``, the records of its costs' marks kept when its ``with`` block ended
    (the marks end with the step: a surrogate built after the block reads them there).
    One dict test and one attribute read per node where no mark is live."""
    if order < 1:
        return
    for later in nodes:
        kept = later.integer_parameter
        if kept is not None:
            node = _marking_node(kept[0], nodes)
            if node is not None:
                raise OrderError(_integer_read_message(node, name, kept[0][1], order, (later, kept[1], kept[2])))
    record = record_of(cost) if MARKS else None
    if record is None:
        if not closed:
            return
        record = closed.get(id(cost))
        if record is None:
            return
    node = _marking_node(record, nodes)
    if node is not None:
        raise OrderError(_integer_read_message(node, name, record[1], order))


def _marking_node(record: tuple, nodes: list[Node]) -> Optional[Node]:
    """The pathwise node of a mark's ``record`` where it is among ``nodes`` and the marked value was read from a
    value computed from its samples (the operand's autograd graph reaches one it handed out), else None."""
    ref, _, raw = record
    node = ref()
    if node is None or not any(n is node for n in nodes):
        return None
    if raw is not None:
        handed = [h for h in (unbatched(h) for h, _ in node.handed) if h.requires_grad]
        handed += [unbatched(u) for u in node.preimages]
        if not handed or not _reaches([unbatched(raw)], handed):
            return None
    return node


def _integer_read_message(node: Node, name: str, func: str, order: int, later: Optional[tuple] = None) -> str:
    est = node.estimator
    p = node.plate.name
    if later is None:
        how = f"the cost {name!r} is computed from an integer value"
        used = "used as an index or as a number"
    else:
        other, path, step = later
        at = f" (at step {step} of its partition)" if step else ""
        how = (f"the cost {name!r} reaches node {other.plate.name!r} (estimator {other.estimator.name!r}), whose "
               f"distribution's parameter {path}{at} was computed from an integer value")
        used = ("used as an index or as a number (Normal(img[k], 1), Categorical(logits=emb[k]) with k = x.long()); "
                f"{other.estimator.name!r} draws from that parameter, so neither {other.plate.name!r}'s sample nor "
                "the cost carries the jump")
    if est.jump_free:
        return _jump_free_index_message(node, how, func, used, order)
    return (
        f"estimator {est.name!r} on plate {p!r}: {how} that {func} "
        "read from a value computed from the node's sample (an integer cast such as l.long() or .to(torch.int64), "
        "argmax / argsort, bucketize / searchsorted, or the indices of max / min / topk / sort / kthvalue or of a "
        f"max pooling), {used}. {est.name!r} differentiates the cost through the sample, but that integer jumps "
        "where the sample crosses a threshold and has no derivative (autograd does not see it), so the gradient "
        f"of the order-{order} surrogate would miss the jump's term and be silently biased, even where the cost "
        "also depends on the sample smoothly (img[l.round().long()] + l ** 2). Use a score-function estimator for "
        "the discrete decision ('score', with baseline='leave_one_out'; for a continuous node 'lax', or "
        "sample the decision as a discrete node of its own: a Categorical over the indices, whose index the cost may "
        "read), or read the value continuously without an index: linear interpolation by hat functions, "
        "(torch.relu(1 - (l - torch.arange(n)).abs()) * img).sum(-1), or F.grid_sample(..., mode='bilinear') (kinks: "
        "unbiased at order 1), a soft weighting (torch.softmax(l * w / t, -1) @ img instead of img[argmax]), "
        "l.max(-1).values instead of l.gather(-1, l.argmax(-1, keepdim=True)). An index that no cost uses (a metric, "
        "a size taken from l.tensor) is not refused, nor a bool mask of a function continuous at its threshold "
        "(torch.where(x > 0, x, 0), at order 1)")


def _jump_free_index_message(node: Node, how: str, func: str, used: str, order: int) -> str:
    """:func:`_integer_read_message` for a ``jump_free`` estimator (REBAR, RELAX): the indices of max / topk / sort
    of a value its relaxed sample reaches (its argmax, the jumps themselves are refused as thresholds)."""
    est = node.estimator
    p = node.plate.name
    return (
        f"estimator {est.name!r} on plate {p!r}: {how} that {func} read from a value computed from the node's "
        "sample (the indices of max / min with a dim, topk, sort, kthvalue, median, mode or of a max pooling: "
        f"m.max(-1).indices, m.topk(2).indices), {used}. {est.name!r} differentiates the cost through the relaxed "
        "sample (REBAR and RELAX: the cost at the relaxed sample σ_λ(z), in their control variate η f(σ_λ(z))), "
        "and these indices are an argmax of it: they jump where the relaxed sample crosses a threshold, autograd "
        "sees no derivative of the jump (they are integers, outside the autograd graph), so the control variate no "
        f"longer cancels and the gradient of the order-{order} surrogate would be silently biased (only the smooth "
        "terms' gradient is left). Use an estimator that does not differentiate the cost through the sample for "
        "this node: 'score' (with baseline='leave_one_out'), 'arm', 'disarm' or 'unordered_set'; or write the cost "
        "without indices: on the one-hot sample m, (m * w).sum(-1) instead of w[m.max(-1).indices] and m @ emb "
        "instead of emb[m.argmax(-1)] (the same value on the hard sample, continuous on the relaxed one). The "
        "values are accepted (m.max(-1).values, x - x.max(-1, keepdim=True).values); indices that no cost uses (a "
        "metric) are not refused, or compute them on the raw tensor, m.tensor.detach()")
