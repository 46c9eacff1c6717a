"""The derivative order: each node's estimator must be unbiased at the order the surrogate is built for.

Before the surrogate is built, ``_check_order`` refuses an estimator (or a node whose distribution lowers its
estimator's order) below the requested order, and at order >= 2 a score-function node whose log p has a kink in
its parameters. Once it is built, ``_guard_low_order`` hooks the terms of the nodes unbiased only up to that
order (and ``_guard_control_variate`` their control variates), so that differentiating it once more is refused
(:mod:`.refusals`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..conditions.order_guard import unbatched
from ..distributions import RSAMPLE_ORDER_NOTE, rsample_kinks_note, rsample_max_order
from ..distributions.rsample_kinks import _GPD_OP as GPD_OP, _UNSTABLE_OP as UNSTABLE_OP
from ..errors import OrderError
from ..estimators.capabilities import _is_score_node
from ..estimators.catalog import installed_classes, partition_needs, supporting_estimators
from ..graph import Graph
from ..graph.node import Node
from ..conditions.score import KINK_FREE, log_prob_kinks
from .refusals import _AGAIN, _again, _refuse_twice


def _check_order(nodes: list[Node], order: int) -> None:
    for node in nodes:
        est = node.estimator
        if est.max_order < order:
            raise OrderError(_order_message(node, order))
        if node.max_order < order:
            raise OrderError(_node_order_message(node, order))
        if order >= 2 and _is_score_node(node):
            _check_log_prob_smooth(node, order)


def _check_log_prob_smooth(node: Node, order: int) -> None:
    """An estimator whose gradient function is the score log p (score, importance, LAX) is unbiased at order
    n >= 2 only where log p's derivatives of order < n are continuous in the parameters: refuse a kink
    (Laplace's |x - loc|; storch.conditions.score.log_prob_kinks, a walk cached per distribution structure and
    learned parameters). A partition is checked by its first step's distribution and log-probability."""
    lp = node.step_log[0][1] if node.step_log is not None else node.gradient_values
    if not isinstance(lp, torch.Tensor):
        return
    d = node.distribution
    params, found = log_prob_kinks(d, lp, order)
    if not found:
        return
    est = node.estimator
    name = type(node.original if node.original is not None else d).__name__
    ops = ", ".join(f"{op} (its derivative of order {k} is discontinuous)" for op, k in sorted(found.items()))
    lowest = min(found.values())
    lower = f", or differentiate at most {lowest} time(s) (storch.surrogate_loss(order={lowest}))" if lowest else ""
    instead = (f"use 'reparameterization' for this node ({name} has rsample; it differentiates the sample, not "
               "log p)" if d.has_rsample else "use an estimator whose gradient function is not log p for this node")
    raise OrderError(
        f"estimator {est.name!r} on plate {node.plate.name!r}: its gradient function is the score log p(x) of "
        f"{name}, which the order-{order} surrogate differentiates {order} times in {', '.join(params)}, but on a "
        f"path from them log p holds {ops}, e.g. the |x - loc| of a Laplace. Autograd reports 0 for the delta in "
        f"the next derivative, so the estimate would be biased. Choose a distribution whose log p is smooth in its "
        f"parameters, or {instead}{lower}")


def _order_message(node: Node, order: int) -> str:
    """An estimator's max_order is below ``order``: what it is, and the installed estimators that would do."""
    est = node.estimator
    what = (f"is biased (it estimates another objective) and its estimate is defined only up to order {est.max_order}"
            if est.biased else f"is unbiased only up to order {est.max_order}")
    d = node.original if node.original is not None else node.distribution
    classes = [(n, c) for n in supporting_estimators(d) if (c := _installed_class(n)) is not None]
    unbiased = [(n, c) for n, c in classes if not c.biased and c.max_order >= order]
    partition = node.step > 0  # one estimator at several steps: only those supporting partitions take its place
    higher = [n + _cost_form(c) + (partition_needs(c) if partition else "")
              for n, c in unbiased if not partition or c.supports_partitions]
    per_step = [n + _cost_form(c) for n, c in unbiased if partition and not c.supports_partitions]
    others = (f" (installed, unbiased at order {order} for this node's {type(d).__name__}"
              f"{' and for a partition' if partition else ''}: {', '.join(higher)}"
              f"{'; or one estimator per step: ' + ', '.join(per_step) if partition and per_step else ''})"
              if higher or (partition and per_step) else "")
    option = f", or an option that raises it: {est.higher_order_options}" if est.higher_order_options else ""
    return (f"estimator {_shown(est)} on plate {node.plate.name!r} {what} (with its options: est.info()), but order "
            f"{order} was requested; choose an estimator with a higher max_order for this node{others}{option}")


def _shown(est) -> str:
    """The estimator as a message names it: its registered name, or for a class of another package that inherits
    the name (a user's ``class Score2(Score): max_order = 2``) the class and the name it inherits, so that the
    message does not blame the registered estimator, nor offer it as the fix as if it were the same (found by
    porting, p-lola)."""
    cls = type(est)
    if not est.name or "name" in cls.__dict__:  # (the class names itself)
        return repr(est.name)
    registered = _installed_class(est.name)
    if registered is cls or (registered is not None
                             and cls.__module__.split(".")[0] == registered.__module__.split(".")[0]):
        return repr(est.name)  # (a first-party variant: sum_and_sample's sequence estimator)
    return f"{cls.__name__} (a subclass of {est.name!r})"


def _installed_class(name: str) -> Optional[type]:
    """The installed estimator class of that name, or None where it cannot be loaded (only for an error message)."""
    try:
        return installed_classes()[name]
    except Exception:  # noqa: BLE001  (only for an error message)
        return None


def _cost_form(cls: type) -> str:
    """For the list of alternatives: a note on an estimator whose costs are written its own way (its
    ``cost_hint``: vimco's bound), which does not take the node's costs as they are."""
    return " (only for costs written its own way: see its docs)" if cls.cost_hint else ""


def _low_order(node: Node, order: int = 1) -> bool:
    """Whether the node's term is unbiased only up to ``order`` (cached attributes only)."""
    return node.estimator.max_order <= order or node.max_order <= order


def _low_order_message(node: Node, order: int = 1) -> Callable[[], str]:
    est, plate, node_order = node.estimator, node.plate.name, node.max_order
    name, kinks, where = node.rsample_kinks or ("", None, None)

    def message() -> str:
        if est.max_order <= order:
            why = (f"is biased and its estimate is defined only at order {est.max_order}" if est.biased
                   else f"is unbiased only up to order {est.max_order} (its max_order; with its options: est.info())")
        elif kinks and min(kinks.values()) <= order:
            why = (f"is unbiased only up to order {node_order} for this node's distribution: "
                   f"{rsample_kinks_note(name, kinks, where)}; or use an estimator that does not differentiate through the "
                   "sample for this node ('score')")
        else:
            why = (f"is unbiased only up to order {node_order} for this node's distribution (lowered by "
                   f"{type(est).__name__}.max_order_for)")
        return f"estimator {_shown(est)} on plate {plate!r} {why}: {_again(order)}"
    return message


def _guard_low_order(graph: Graph, order: int = 1) -> None:
    """At order n: hook the tensors through which the gradient of a node unbiased only up to order n flows into
    the surrogate (its gradient function, weights and handed samples that carry gradient; control variates are
    hooked where the surrogate adds them) so that differentiating the surrogate more than n times is refused
    (what surrogate_loss(order=n+1) refuses, :func:`_check_order`). Likewise a score-function node whose log p
    has a derivative of order n that jumps in its parameters (see :func:`_guard_log_prob_kink`)."""
    for node in graph.nodes:
        if not _low_order(node, order):
            # (a bare type is in KINK_FREE only where the type fixes what the distribution wraps; a wrapper's
            # structure is looked up by log_prob_kinks)
            if type(node.distribution) not in KINK_FREE and _is_score_node(node):
                _guard_log_prob_kink(node, order)
            continue
        message = _low_order_message(node, order)
        if node.step_log is not None:
            for _, l in node.step_log:
                _refuse_twice(l, message, order)
        else:
            _refuse_twice(node.gradient_values, message, order)
        if not node.estimator.uniform_weights:
            _refuse_twice(node._weight_values, message, order)
        for raw, _ in node.handed:
            _refuse_twice(raw, message, order)


def _guard_log_prob_kink(node: Node, order: int = 1) -> None:
    """At order 1, a score-function node (score, importance, LAX) whose log p has a kink in its learned
    parameters (Laplace's |x - loc|): ``surrogate_loss(order=2)`` refuses it (:func:`_check_log_prob_smooth`),
    and the order-1 surrogate differentiated twice loses the same delta (a Hessian of 4.3 for an exact 2 at
    Laplace(loc, 1)), so its log p (each step's, of a partition) is hooked with the refusal. The analysis is
    log_prob_kinks' cache (per distribution structure and learned parameters: a lookup at steady state, the walk
    once), asked at order 2: a kink of log p itself (its derivative of order 1 jumps)."""
    log = node.step_log
    lp = log[0][1] if log is not None else node.gradient_values
    if not isinstance(lp, torch.Tensor) or not unbatched(lp).requires_grad:  # (under vmap: the tensor it batches)
        return
    d = node.distribution
    params, found = log_prob_kinks(d, lp, order + 1)  # (at order n >= 2, those below n were refused: _check_order)
    if not found:
        return
    est, plate = node.estimator, node.plate.name
    name = type(node.original if node.original is not None else d).__name__
    rsample = d.has_rsample

    def message() -> str:
        ops = ", ".join(sorted(found))
        instead = (f"'reparameterization' for this node ({name} has rsample; it differentiates the sample, not "
                   "log p)" if rsample else "an estimator whose gradient function is not log p for this node")
        return (f"estimator {est.name!r} on plate {plate!r}: its gradient function is the score log p(x) of {name}, "
                f"which has a kink in {', '.join(params)} ({ops}, e.g. the |x - loc| of a Laplace: its derivative "
                f"jumps), so the derivatives of order >= 2 of its term are biased (autograd reports 0 for the delta "
                f"in the second derivative; surrogate_loss(order=2) refuses it too); {_AGAIN}. A distribution whose "
                f"log p is smooth in its parameters, or {instead}, is unbiased at every order") if order < 2 else (
                f"estimator {est.name!r} on plate {plate!r}: its gradient function is the score log p(x) of {name}, "
                f"whose derivative of order {order} is discontinuous in {', '.join(params)} ({ops}), so the "
                f"derivatives of order >= {order + 1} of its term are biased (surrogate_loss(order={order + 1}) "
                f"refuses it too); {_again(order)}. A distribution whose log p is smooth in its parameters, or "
                f"{instead}, is unbiased at every order")
    if log is not None:
        for _, l in log:
            _refuse_twice(l, message, order)
    else:
        _refuse_twice(lp, message, order)


def _guard_control_variate(a, node: Node, order: int) -> None:
    if order >= 1 and a is not None and _low_order(node, order):
        _refuse_twice(a, _low_order_message(node, order), order)


def _node_order_message(node: Node, order: int) -> str:
    """Why a node's distribution lowers its estimator's order (Estimator.max_order_for), and what to do."""
    est = node.estimator
    name = type(node.original if node.original is not None else node.distribution).__name__
    kinked, kinks, where = node.rsample_kinks or ("", None, None)
    if kinks and min(kinks.values()) < order:
        lowest = min(kinks.values())
        lower = (f"; or differentiate at most {lowest} time(s) (storch.surrogate_loss(order={lowest}))" if lowest
                 else "" if set(kinks) <= {GPD_OP, UNSTABLE_OP}  # (inaccurate near 0; the sample not depending
                 # on probs in ContinuousBernoulli's (0.499, 0.501): no jump, and each note says why)
                 else " (a jump: its pathwise derivative is 0 where the expectation's is not, at every order)")
        return (f"estimator {est.name!r} on plate {node.plate.name!r}: the order-{order} surrogate differentiates "
                f"through the sample of {kinked}, but {rsample_kinks_note(kinked, kinks, where)}; or use an estimator that "
                "does not differentiate through the sample for this node, e.g. 'score' (it needs log_prob; "
                "baseline='leave_one_out' for less variance)" + lower)
    why = ""
    if est.requires_rsample and rsample_max_order(node.distribution) <= node.max_order:
        why = f": {RSAMPLE_ORDER_NOTE}"
    return (f"estimator {est.name!r} on plate {node.plate.name!r} is unbiased only up to order {node.max_order} "
            f"for its distribution {name} (its max_order is {est.max_order}, lowered for this distribution by "
            f"{type(est).__name__}.max_order_for{why}), but order {order} was requested. Use an estimator that "
            "does not differentiate through the sample for this node, e.g. 'score' (any order; "
            "baseline='leave_one_out' for less variance), or differentiate at most "
            f"{node.max_order} time(s)")
