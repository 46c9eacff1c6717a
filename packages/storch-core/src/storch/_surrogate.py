"""The Storchastic surrogate loss (paper, Eq. 2; Algorithm 1), vectorised over plates.

For each cost C, the sampling plates it carries name exactly the nodes upstream of it (credit
assignment by plate membership). With those nodes in topological order 1..k and
L_i = l_1 + ... + l_i, the nested sums of Eq. 2 are computed from the innermost out, one tensor
reduction per node, never a Python loop over samples:

    inner_k   = MagicBox(L_k) · C
    inner_i-1 = Σ_{x_i ∈ X_i} w_i(x_i) · [ inner_i + MagicBox(L_{i-1}) · a_i(x<i, X_i) ]

so each control variate is multiplied by MagicBox of the gradient functions before it (Theorem 2,
appendix C), which makes baselines reduce variance at every order. Independent (data) plates
are reduced by the mean; the costs' surrogates are summed.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._errors import OrderError, StorchError
from ._estimator import CostFrame, Estimator, magic_box
from ._graph import Graph, Node, current_graph
from ._plates import align, plates_of, raw_of

__all__ = ["surrogate_loss", "backward", "cost_nodes"]


def cost_nodes(graph: Graph, cost) -> list[Node]:
    """The stochastic nodes upstream of ``cost``, in topological order."""
    nodes = [graph.node_of(p.name) for p in plates_of(cost)]
    return sorted((n for n in nodes if n is not None), key=lambda n: n.index)


def _check_order(nodes: list[Node], order: int) -> None:
    for node in nodes:
        est = node.estimator
        if est.max_order < order:
            raise OrderError(
                f"estimator {est.name!r} on plate {node.plate.name!r} is unbiased only up to order "
                f"{est.max_order} (with its options: est.info()), but order {order} was requested; choose "
                "an estimator with a higher max_order (see storch.available_estimators()) for this node"
            )


def _has_control_variate(est) -> bool:
    cls = type(est)
    return cls.control_variate is not Estimator.control_variate or cls.baseline is not Estimator.baseline


def _cost_surrogate(cost, nodes: list[Node], name: Optional[str] = None) -> torch.Tensor:
    plates = plates_of(cost)
    raw = raw_of(cost)
    # L_{i-1} for every node i, aligned to the cost's plates (Theorem 2's MagicBox arguments)
    prefix: list[Optional[torch.Tensor]] = []
    total = None
    for node in nodes:
        prefix.append(total)
        l_i = align(node.gradient_values, node.plates, plates)
        total = l_i if total is None else total + l_i
    inner = raw if total is None else magic_box(total) * raw  # line 7 of Algorithm 1
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        dim = plates.index(node.plate)
        if _has_control_variate(node.estimator):
            frame = CostFrame(inner.detach(), plates, node, inner, name)
            node.frames[frame.name or ""] = frame  # what update_parameters trains on
            a = node.estimator.control_variate(node, frame)  # line 11
            if a is not None:
                inner = inner + (a if prefix[i] is None else magic_box(prefix[i]) * a)
        if node.estimator.uniform_weights:
            inner = inner.mean(dim, keepdim=True)  # line 14 with w = 1/N (D.2.1): one op, not two
        else:
            w = align(node.weight_values, node.plates, plates)
            inner = (w * inner).sum(dim, keepdim=True)  # line 14: weight and sum over X_i
    # what is left are independent plates (and size-1 dims): the mean over data points
    return inner.mean() if inner.dim() else inner


def surrogate_loss(order: int = 1, graph: Optional[Graph] = None) -> torch.Tensor:
    """The surrogate loss of the current graph (paper, Eq. 2).

    Its value is the estimate of the expected total cost; differentiating it ``order`` times
    gives unbiased estimates of the ``order``-th derivative (Theorem 1) for every estimator whose
    ``max_order`` >= ``order``.

    Raises:
        OrderError: an estimator upstream of a cost is not unbiased to ``order``.
    """
    graph = graph or current_graph()
    if not graph.costs:
        raise StorchError("the graph has no costs; call storch.add_cost(...) before the surrogate loss")
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise StorchError(f"order must be an int >= 0, got {order!r}")
    per_cost = [(name, cost, cost_nodes(graph, cost)) for name, cost in graph.costs]
    for _, _, nodes in per_cost:
        _check_order(nodes, order)
    loss = None
    for name, cost, nodes in per_cost:
        s = _cost_surrogate(cost, nodes, name)
        loss = s if loss is None else loss + s
    return loss.reshape(())


def backward(graph: Optional[Graph] = None) -> torch.Tensor:
    """Backpropagate the first-order surrogate, run estimators' own updates, reset the graph.

    Order: the surrogate loss (order 1) is built and backpropagated (its graph kept while any
    estimator updates), then ``update_parameters(nodes, loss)`` runs once per estimator with
    ``has_update`` (the only place estimator state changes), then the graph is reset (also after
    an exception).

    Returns:
        the detached estimate of the expected total cost.
    """
    graph = graph or current_graph()
    try:
        loss = surrogate_loss(1, graph)
        updating: dict[int, list[Node]] = {}
        for node in graph.nodes:
            if node.estimator.has_update:
                updating.setdefault(id(node.estimator), []).append(node)
        loss.backward(retain_graph=bool(updating))
        for nodes in updating.values():
            nodes[0].estimator.update_parameters(nodes, loss)
        return loss.detach()
    finally:
        graph.reset()
