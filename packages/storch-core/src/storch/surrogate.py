"""The Storchastic surrogate loss (paper, Eq. 2; Algorithm 1), vectorised over plates.

For each cost C, the sampling plates it carries name exactly the nodes upstream of it (credit
assignment by plate membership). With those nodes in topological order 1..k and
L_i = l_1 + ... + l_i, the nested sums of Eq. 2 are computed from the innermost out, one tensor
reduction per node, never a Python loop over samples:

    inner_k   = MagicBox(L_k) · C
    inner_i-1 = Σ_{x_i ∈ X_i} w_i(x_i) · [ inner_i + MagicBox(L_{i-1}) · a_i(x<i, X_i) ]

so each control variate is multiplied by MagicBox of the gradient functions before it (Theorem 2,
appendix C), which keeps baselines zero-mean at every order, so they can reduce variance there (measured:
usually the Hessian's total, not every entry). Independent (data) plates
are reduced by the mean; the costs' surrogates are summed.
"""

from __future__ import annotations

import math
import numbers
import operator
import threading
import warnings
import weakref
from typing import Callable, Optional, Sequence, Union

import torch
from torch.distributions import Categorical, OneHotCategorical

from .cost import CostFrame, _lead, magic_box
from .eager import eager_only
from .distributions import RSAMPLE_ORDER_NOTE, base_distribution, grad_parameters, rsample_max_order
from .errors import NonFiniteCostError, OrderError, StorchError, UnusedSampleWarning
from .estimators.base import Estimator, _is_score_node, check_in_frame
from .estimators.catalog import installed_classes, supporting_estimators
from .graph import Graph, current_graph, is_tracing, tracing_recorder
from .node import Node
from .plates.tensor import Plate, align, plates_of, raw_of
from ._order_guard import (FORWARD_OVER_REVERSE, FUNCTORCH_OVER_OUTER, CountedRefusal, differentiating_transforms,
                           forward_level_open, has_tangent, is_differentiated, outer_requires_grad,
                           refuse_create_graph, unbatched, unwrapped)
from . import smoothness
from .score_conditions import KINK_FREE, log_prob_kinks, smooth_log_prob_parameters
from .smoothness import _reaches, require_smooth

__all__ = ["surrogate_loss", "backward", "cost_nodes", "cost_estimates"]


def cost_nodes(graph: Graph, cost) -> list[Node]:
    """The stochastic nodes upstream of ``cost``, in topological order."""
    get = graph.plates.get
    nodes = [owner for p in plates_of(cost) if isinstance(owner := get(p.name), Node)]
    if len(nodes) > 1:
        nodes.sort(key=_index)
    return nodes


_index = operator.attrgetter("index")


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
    (Laplace's |x - loc|; storch.score_conditions.log_prob_kinks, a walk cached per distribution structure and
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
    higher = [n for n in supporting_estimators(d) if _unbiased_to(n, order)]
    others = (f" (installed, unbiased at order {order} for this node's {type(d).__name__}: {', '.join(higher)})"
              if higher else "")
    option = f", or an option that raises it: {est.higher_order_options}" if est.higher_order_options else ""
    return (f"estimator {est.name!r} on plate {node.plate.name!r} {what} (with its options: est.info()), but order "
            f"{order} was requested; choose an estimator with a higher max_order for this node{others}{option}")


def _unbiased_to(name: str, order: int) -> bool:
    try:
        cls = installed_classes()[name]
    except Exception:  # noqa: BLE001  (only for an error message)
        return False
    return not cls.biased and cls.max_order >= order


# estimator -> {cost name: the kinks (autograd node names) on the path from its sample to the cost, () if
# none}: the costs checked at order 1 (see _check_smooth)
_CHECKED_AT_ORDER_1: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_smooth(name: str, cost: torch.Tensor, nodes: list[Node], order: int,
                  memos: Optional[dict] = None) -> None:
    """A pathwise node (its estimator ``requires_rsample``: the cost is differentiated through the sample
    itself) is unbiased at order n only for a cost whose derivatives of order < n are continuous in its
    sample: refuse an operation on a path from a value it handed out to the cost that breaks this
    (storch.smoothness). At order >= 2, a kink (ReLU, abs, clamp, max) or a jump, at every surrogate; at
    order 1 only a jump (round, sign, floor, nearest grid_sample: the pathwise gradient is 0 where the
    expectation's is not), checked at the first step of each estimator, cost name and partition step of
    the cost (a walk of the cost's graph per step would cost the common case time; a model's operations
    rarely change between steps; an episode's costs of one name differ per step). That walk also records
    the kinks: an order-1 surrogate whose cost has one is refused when it is differentiated again (its
    cost hooked: :mod:`storch._order_guard`). ``memos``: per pathwise node, what the walks of this
    surrogate learned (:class:`storch.smoothness.PathMemo`): each autograd node is expanded once."""
    if order < 1:  # the value alone: surrogate_loss(order=0) is detached, nothing differentiated
        return
    key = None  # (name, the cost's partition steps): computed once per cost, for its first pathwise node
    for node in nodes:
        est = node.estimator
        if est.requires_rsample and node.handed:
            if order < 2:
                seen = _CHECKED_AT_ORDER_1.get(est)
                if seen is None:
                    seen = _CHECKED_AT_ORDER_1[est] = {}
                if key is None:
                    key = (name, _steps_of(cost))
                kinks = seen.get(key)
                if kinks == ():
                    continue  # checked, smooth: nothing to do at this step
            who = f"estimator {est.name!r} on plate {node.plate.name!r}"
            inputs = [raw for raw, _ in node.handed]
            roots = _differentiated_through(node, name, cost, nodes)
            walks = memos
            if any(_batched(t) for t in inputs):
                # under torch.func.vmap the batched tensors have no autograd graph: walk the one of the tensors
                # they batch, which a derivative outside vmap differentiates (a walk of the batched tensors found
                # nothing: no refusal at order 2, and a cached smooth verdict let a later Hessian through a ReLU)
                inputs = [unbatched(t) for t in inputs]
                roots = [(unbatched(root), what, other) for root, what, other in roots]
                if not any(t.requires_grad for t in inputs):
                    continue  # no graph: no verdict (nothing outside vmap differentiates this node)
                walks = None
            if order < 2 and forward_level_open():
                # under torch.func.jvp the wrapped tensors have no autograd graph: walk the outer autograd's
                # (the tensors under the wrappers), which a second derivative would differentiate; a walk that
                # sees no graph is no verdict (cached, a smooth verdict let a later Hessian through a ReLU)
                handed = inputs
                inputs = [_graph_of(t) for t in inputs]
                roots = [(_graph_of(root), what, other) for root, what, other in roots]
                if not any(t.requires_grad for t in inputs):
                    if kinks is None and any(has_tangent(t) for t in handed):
                        # detached primals: no graph to walk for a jump (round, sign: a tangent of 0 where the
                        # expectation's is not, which reverse mode refuses); only an eager walk's verdict can tell
                        raise OrderError(_unchecked_jvp_message(who, name))
                    continue
                walks = None  # (the memo is keyed by the node, for the tensors as handed)
            memo = _memo_for(walks, node, inputs, 2 if order < 2 else order + 1)
            if order >= 2:
                # walked at order + 1: what surrogate_loss(order=n+1) would refuse. An operation whose derivative of
                # order < n jumps is refused; one of order n (ELU's second derivative at order 2) is not, but the
                # (n+1)-th derivative of this order-n surrogate through it is biased: hooked with the counting refusal
                for root, what, other in roots:
                    here, blame = _nonsmooth_through(root, other, inputs, order + 1, memo)
                    if any(k < order for k in here.values()):
                        require_smooth(blame, inputs, order, who=who, what=what,  # says why
                                       through="the reparameterised sample", instead=_PATHWISE_INSTEAD)
                    if here:
                        kinks = tuple(sorted(here))
                        _refuse_twice(root, lambda kinks=kinks: _kink_message(who, name, kinks, order), order)
                continue
            if kinks is None:
                found: dict = {}
                for root, what, other in roots:
                    here, blame = _nonsmooth_through(root, other, inputs, 2, memo)  # (tests count walks)
                    if any(k < 1 for k in here.values()):  # a jump: refused (require_smooth says why)
                        require_smooth(blame, inputs, 1, who=who, what=what,
                                       through="the reparameterised sample", instead=_PATHWISE_INSTEAD)
                    found.update(here)
                kinks = seen[key] = tuple(sorted(found))  # (after the check: a refused cost is checked again)
            if kinks:
                hooked = walks.setdefault("hooked", set()) if walks is not None else set()
                for root, _, _ in roots:
                    if id(root) not in hooked:  # (a downstream step's log p is a root of every later cost)
                        hooked.add(id(root))
                        _refuse_twice(root, lambda: _kink_message(who, name, kinks))


def _unchecked_jvp_message(who: str, name: str) -> str:
    return (f"{who}: the cost {name!r} is differentiated in forward mode (torch.func.jvp / jacfwd, "
            "torch.autograd.forward_ad) through the reparameterised sample, with primals that do not require grad: "
            "there is no autograd graph, so storch cannot check that the path from the sample to the cost has no "
            "jump (round, sign, floor, nearest grid_sample: the pathwise derivative is 0 there while the "
            "expectation's is not, which reverse mode refuses), and a tangent of 0 would be silently wrong. The check "
            "runs once per estimator and cost name: build one step of this estimator and cost outside the forward-mode "
            "transform with parameters that require grad first (storch.backward(), or storch.surrogate_loss()), after "
            "which forward mode uses its verdict; or differentiate in reverse mode (torch.func.grad / jacrev, "
            "torch.autograd.grad), or use an estimator that does not differentiate through the sample ('score')")


def _graph_of(t: torch.Tensor) -> torch.Tensor:
    """``t``, or where it has no autograd graph of its own (a torch.func.jvp level's wrapper) the tensor under
    its functorch wrappers, whose graph is the autograd's outside the transforms."""
    return unwrapped(t) if t.grad_fn is None else t


def _batched(t) -> bool:
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t)


def _steps_of(cost) -> tuple:
    """The partition steps of a cost's plates (all 0 outside partitions): an episode's costs of one name
    at different steps are different costs for the order-1 checks."""
    return tuple(p.step for p in plates_of(cost))


def _memo_for(memos: Optional[dict], node: Node, inputs: list, order: int):
    if memos is None:
        return None
    key = (id(node), order)
    memo = memos.get(key)
    if memo is None:
        memo = memos[key] = smoothness.PathMemo(inputs, order)
    return memo


def _differentiated_through(node: Node, name: str, cost, nodes: list[Node]) -> list:
    """What the surrogate differentiates through a pathwise node's sample for one cost, with words for a
    message: the cost, and the gradient functions and weights of the cost's nodes downstream of it (a
    score node whose logits are h(z), an ``expect`` node's probabilities: the surrogate differentiates
    E_b[f(b) | z] through z along them, so a jump or kink of h biases it as one in the cost would). Of a
    downstream partition, the steps up to the cost's (causal credit: L_t of the cost's step t)."""
    roots = [(raw_of(cost), f"the cost {name!r}", None)]
    plates = None
    for other in nodes:
        if other is node or not any(p.name == node.plate.name for p in other.parents):
            continue
        log = other.step_log
        if log is None:
            terms = [(other.gradient_values, "")]
        else:
            if plates is None:
                plates = plates_of(cost)
            t = next((p.step for p in plates if p.name == other.plate.name), len(log) - 1)
            terms = [(l, f" at step {s}") for s, (_, l) in enumerate(log[:t + 1])]
        for l, at in terms:
            # (under torch.func.jvp: a tangent; under vmap: the tensor it batches requires grad)
            if isinstance(l, torch.Tensor) and is_differentiated(unbatched(l)):
                roots.append((l, f"the log-probability of node {other.plate.name!r}{at} (downstream, on the path "
                                 f"to the cost {name!r})", other if log is None else None))
        w = other._weight_values
        if isinstance(w, torch.Tensor) and unbatched(w).requires_grad:  # (_weights_carry, under vmap too)
            roots.append((w, f"the weights of node {other.plate.name!r} (downstream, on the "
                                                f"path to the cost {name!r})", other if log is None else None))
    return roots


_PATHWISE_INSTEAD = "an estimator that does not differentiate through the sample, e.g. 'score'"


def _nonsmooth_through(root: torch.Tensor, other: Optional[Node], inputs: list, order: int,
                       memo) -> tuple[dict, torch.Tensor]:
    """The non-smooth operations (name -> order of the first discontinuous derivative, those < ``order``) on a
    path from ``inputs`` (a pathwise node's samples) to ``root``, and the tensor whose walk found them (for
    require_smooth's message). ``other``: the downstream node whose log-probability or weights ``root`` is
    (``None`` for a cost, or a partition's step, whose distribution is per step).

    torch writes some log-densities that are smooth in their parameters with kinks that cancel (Binomial's
    softplus(logits) as clamp(logits, min=0) + log1p(exp(-|logits|))), which the walk of the autograd graph
    counts. Where the walk from ``root`` finds an operation, every path from ``inputs`` to ``root`` passes
    through the tensors of ``other``'s distribution that require grad (its parameters θ), and its log p is known
    smooth in them (score_conditions.smooth_log_prob_parameters: Binomial on the list, or a cached walk), what lies
    between θ and ``root`` is the node's own business at fixed θ: its log p, smooth, and its estimator's
    computations on it, whose order-n derivatives in θ are unbiased up to its max_order (_check_order refuses
    a lower one; _check_log_prob_smooth a score node's kink in log p). Then E_b[f | θ] is smooth in θ, and the
    pathwise derivatives through x are unbiased where θ(x) is smooth: the paths from ``inputs`` to θ, the
    user's own code (logits = relu(x) is refused), are walked instead."""
    found = smoothness._nonsmooth_on_path(root, inputs, order, memo=memo)
    if not found or other is None:
        return found, root
    params = smooth_log_prob_parameters(other.distribution, order)
    if params is None:
        return found, root
    params = [_graph_of(t) for t in params]
    if not params or _reaches([root], inputs, avoid=params):
        return found, root  # a path that bypasses θ (a sample that carries gradient, an estimator's own input)
    found, blame = {}, root
    for t in params:
        here = smoothness._nonsmooth_on_path(t, inputs, order, memo=memo)
        if here and not found:
            blame = t
        for k, v in here.items():
            found[k] = min(v, found.get(k, v))
    return found, blame


def _refuse_twice(tensor, message, order: int = 1) -> None:
    """Refuse a second differentiation of the order-1 surrogate through ``tensor`` (:mod:`storch._order_guard`):
    a hook, or under torch.func (whose hooks cannot tell) an OrderError now if two transforms differentiate, or
    one does and the term takes part in the autograd outside it (a gradient of the transform's result, e.g. of
    a torch.func.jvp tangent or a torch.func.grad, is a second derivative). ``order`` >= 2: an (order + 1)-th
    differentiation of the order-``order`` surrogate (:func:`_refuse_beyond`)."""
    if order >= 2:
        _refuse_beyond(tensor, message, order)
        return
    recorder = tracing_recorder() if is_tracing() else None
    if recorder is not None:
        # a compiled step's replays do not run the traced step's hooks: storch.compile hooks each replay's
        # outputs with the refusal its recorder keeps (CompiledStep.eager, without a recorder, hooks as here)
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            recorder.refuse(message)
        return
    nested = differentiating_transforms()
    if nested >= 2:
        raise OrderError(message())
    if nested == 1:
        if not isinstance(tensor, torch.Tensor) or not is_differentiated(tensor):
            return
        if outer_requires_grad(tensor):
            # the transform's result requires grad outside it: a gradient of it (of a jvp's tangent, a grad) is
            # a second derivative through this term that no hook sees (hooks here run with grad mode on)
            raise OrderError(message() + FUNCTORCH_OVER_OUTER)
        _PENDING.mixed.append(message)  # the surrogate checks whether its loss takes part outside (_check_mixed)
        return
    if not nested:
        # under torch.func.vmap (no differentiating transform) the batched tensor reports requires_grad=False:
        # hook the tensor it batches, which a backward pass outside vmap (create_graph=True: a Hessian of
        # vmap(f)) reaches; a plain backward pass through it runs the hook with grad mode off, as eagerly
        tensor = unbatched(tensor)
        if forward_level_open() and isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            if has_tangent(tensor):
                # differentiated in both modes at once: a backward pass through it gives its gradient a tangent
                # (forward-over-reverse); a gradient of its tangent reaches no hook (reverse-over-forward)
                raise OrderError(message() + FORWARD_OVER_REVERSE)
            _PENDING.mixed.append(message)  # the surrogate checks whether its loss carries a tangent (_check_mixed)
        refuse_create_graph(tensor, message)


def _refuse_beyond(tensor, message, order: int) -> None:
    """Refuse an (order + 1)-th differentiation of the order-``order`` surrogate through ``tensor``: a hook that
    counts the create_graph passes (storch._order_guard._Count), kept alive with the loss (_keep_counted). Under
    torch.func, whose hooks run with grad mode on and cannot count, the transforms are counted when the surrogate
    is built: more than ``order`` refused, and so is a term that takes part in the autograd outside them (the
    passes there are not counted: a conservative refusal); under forward mode (a tangent), likewise."""
    refusal = CountedRefusal(message, order)
    recorder = tracing_recorder() if is_tracing() else None
    if recorder is not None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            recorder.refuse(refusal)  # (storch.compile hooks each replay's outputs with the counting hook)
        return
    nested = differentiating_transforms()
    if nested > order:
        raise OrderError(message())
    if nested:
        if isinstance(tensor, torch.Tensor) and is_differentiated(tensor) and outer_requires_grad(tensor):
            raise OrderError(message() + FUNCTORCH_OVER_OUTER.replace("order-1", f"order-{order}"))
        return
    tensor = unbatched(tensor)
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return
    if forward_level_open() and has_tangent(tensor):
        raise OrderError(message() + FORWARD_OVER_REVERSE.replace("order-1", f"order-{order}"))
    _PENDING.counted.append(tensor)
    refuse_create_graph(tensor, refusal)


def _keep_counted(loss: torch.Tensor) -> None:
    """The counting hooks hold their tensors weakly (a hook on a tensor's autograd node that held the tensor would
    be a cycle autograd never frees): keep the hooked tensors of this build alive as long as the loss's autograd
    node, in its metadata (no cycle: the hooked tensors are upstream of it). Not as long as the Python tensor: a
    loss used in an expression (``surrogate_loss(order=2) + reg``, ``hessian(lambda m: 0.5 * f(m), mu)``) is a
    temporary whose node lives on in the result's graph (a review found those refused as "freed")."""
    counted = _PENDING.counted
    if counted:
        keep = list(counted)
        node = loss.grad_fn
        if node is not None:
            node.metadata.setdefault("storch_counted", []).extend(keep)
        else:  # (no graph of its own: a vmapped loss) as long as the tensor
            weakref.finalize(loss, list.clear, keep)
        counted.clear()


class _Pending(threading.local):
    """Per thread (graphs are per thread): the refusals hooked while this thread's surrogate is built with a
    forward-AD level open, or found under one torch.func transform. One list for the process let a surrogate built in another thread meanwhile clear
    this build's refusals, and its forward-over-reverse second derivative went through."""

    def __init__(self) -> None:
        self.mixed: list = []
        self.counted: list = []  # the tensors hooked by _refuse_beyond in this build (see _keep_counted)


_PENDING = _Pending()


def _check_mixed(loss: torch.Tensor) -> None:
    """A loss that requires grad and carries a forward tangent is differentiated in both modes at once: a
    backward pass gives its gradients tangents that are second derivatives (the mixed ones through a hooked
    term whose own tangent is 0 too: a cost's tangent under an order-1 node's detached cost), and a gradient
    of its tangent passes no hook. Where an order-1 refusal was hooked, refuse now. Under one torch.func
    transform, likewise a loss that requires grad in the autograd outside it (see :func:`_refuse_twice`)."""
    mixed = _PENDING.mixed
    try:
        if not mixed:
            return
        if differentiating_transforms() == 1:
            # under one torch.func transform: a loss that requires grad outside it (a cost's parameter) makes the
            # outer gradient of the transform's result a mixed second derivative through the hooked terms
            if outer_requires_grad(loss):
                raise OrderError(mixed[0]() + FUNCTORCH_OVER_OUTER)
        elif loss.requires_grad and has_tangent(loss):
            raise OrderError(mixed[0]() + FORWARD_OVER_REVERSE)
    finally:
        mixed.clear()


_AGAIN = ("differentiating the order-1 surrogate (storch.surrogate_loss(), storch.backward()) again, after a "
          "backward pass with create_graph=True (torch.autograd.grad(..., create_graph=True), "
          "torch.autograd.functional.hessian / hvp, loss.backward(create_graph=True), nested torch.func "
          "transforms), may give a silently biased higher derivative. For derivatives of order n build "
          "storch.surrogate_loss(order=n), which checks every node and names the estimators unbiased at that "
          "order; if create_graph=True was incidental (only the first derivative is used), pass "
          "create_graph=False or detach the first derivative; if what is differentiated afterwards depends on "
          "the first derivative only linearly through this term (GradNorm's loss weights, learning-to-reweight's "
          "example weights: no second derivative of the storch term is taken), or it is an estimator's own update "
          "(training a learned part on the gradient's variance), run the create_graph pass inside "
          "`with storch.extending.estimator_create_graph():`. torch.autograd.functional.jvp computes its first "
          "derivative this way (a create_graph=True backward pass, then a second one w.r.t. its dummy "
          "grad_outputs), which the guard cannot tell from a second derivative at the first pass: use "
          "torch.func.jvp(f, (x.detach(),), (v,)) (forward mode) for a Jacobian-vector product")


def _again(order: int) -> str:
    """What to do instead of differentiating the order-``order`` surrogate more than ``order`` times."""
    if order < 2:
        return _AGAIN
    return (f"differentiating the order-{order} surrogate (storch.surrogate_loss(order={order})) more than {order} "
            f"times (a backward pass with create_graph=True after {order - 1} such pass(es): "
            "torch.autograd.grad(..., create_graph=True), loss.backward(create_graph=True), "
            f"torch.autograd.functional.hessian of a derivative, nested torch.func transforms) gives a silently "
            f"biased derivative of order {order + 1}. For derivatives of order k build storch.surrogate_loss(order=k) "
            "with k the number of derivatives you take, which checks every node and names the estimators unbiased at "
            f"that order (here it refuses order {order + 1}); if the last create_graph=True was incidental (only the "
            f"derivative of order {order} is used), pass create_graph=False or detach it. "
            "torch.autograd.functional.hvp (and hessian(..., create_graph=True)) build an order-2 product with such a "
            "pass: use torch.autograd.functional.vhp (the Hessian is symmetric) or hessian(...) @ v instead")


def _kink_message(who: str, name: str, kinks: tuple, order: int = 1) -> str:
    if order >= 2:
        return (f"{who}: the cost {name!r} has an operation on the path from the reparameterised sample whose "
                f"derivative of order {order} is discontinuous ({', '.join(kinks)}), so its pathwise derivatives of "
                f"order >= {order + 1} are biased (autograd reports 0 for the delta in the derivative of order "
                f"{order + 1}; surrogate_loss(order={order + 1}) refuses it too); {_again(order)}. An operation "
                f"smooth to order {order + 1} on that path (softplus, GELU, SiLU, tanh) or an estimator that does not "
                "differentiate through the sample ('score') is unbiased at every order")
    return (f"{who}: the cost {name!r} has a kink on the path from the reparameterised sample "
            f"({', '.join(kinks)}: its derivative jumps), so its pathwise derivatives of order >= 2 are biased "
            f"(autograd reports 0 for the delta in the second derivative); {_AGAIN}. A smooth operation on that "
            "path (softplus, GELU, SiLU, tanh instead of ReLU; logsumexp instead of max) or an estimator that "
            "does not differentiate through the sample ('score') is unbiased at every order")


def _low_order(node: Node, order: int = 1) -> bool:
    """Whether the node's term is unbiased only up to ``order`` (cached attributes only)."""
    return node.estimator.max_order <= order or node.max_order <= order


def _low_order_message(node: Node, order: int = 1) -> Callable[[], str]:
    est, plate, node_order = node.estimator, node.plate.name, node.max_order

    def message() -> str:
        if est.max_order <= order:
            why = (f"is biased and its estimate is defined only at order {est.max_order}" if est.biased
                   else f"is unbiased only up to order {est.max_order} (its max_order; with its options: est.info())")
        else:
            why = (f"is unbiased only up to order {node_order} for this node's distribution (lowered by "
                   f"{type(est).__name__}.max_order_for)")
        return f"estimator {est.name!r} on plate {plate!r} {why}: {_again(order)}"
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


# estimator -> the cost names checked by _check_reaches (None: never pathwise: it hands out samples without
# gradient, or with a gradient that is not a path from the distribution's parameters, by design; an empty
# set: pathwise, no cost name passed yet)
# kept in the estimator's __dict__ under this key (a plain dict read per node and cost: the common step's
# score nodes are marked never pathwise after their first surrogate)
_REACH_KEY = "_storch_reach_checked"


def _check_reaches(name: str, cost: torch.Tensor, nodes: list[Node], order: int) -> None:
    """A node that hands out a sample that is a differentiable function of its distribution's parameters
    (reparameterization, the relaxations; REBAR and RELAX on their relaxed blocks) gets its gradient through
    that sample: refuse a cost that carries its plate (it depends on the sample's value) but whose autograd
    graph does not reach the sample (a comparison, ``.bool()``, ``.long()``, ``argmax``, ``torch.where``'s
    condition, ``detach``): its pathwise gradient is silently 0 where the expectation's is not. A node
    downstream of it that the cost carries and whose gradient function or weights reach the sample (a score
    node whose logits depend on it) explains the dependence (the surrogate credits it through that node's
    log-probability); one with a control variate is trusted to. A handed-out value that requires grad only
    through a leaf of the estimator's own (MuProp's evaluation-only entry x̄, whose ∇f(x̄) its control variate
    reads from ``cost.live()``) is no path from the parameters: its gradient is not part of the estimate, so
    the estimator is never pathwise (:func:`_pathwise`). The walk runs once per estimator and cost name (a
    model's operations rarely change between steps); a refused cost is checked again at the next step."""
    if order < 1:  # the value alone (detached: see surrogate_loss)
        return
    for node in reversed(nodes):  # the node nearest the cost first: the cut is reported where it is
        if node.thresholded is not None:  # (jump_free estimators only: see Estimator.jump_free)
            raise OrderError(_thresholded_message(node, name))
        if node.no_grad_cut and torch.is_grad_enabled():
            continue  # sampled under no_grad: its own refusal says so (_check_sampled_with_grad)
        est = node.estimator
        seen = est.__dict__.get(_REACH_KEY, ())
        if seen is None or (name in seen and raw_of(cost).requires_grad):
            # checked for this name at an earlier step; a cost without any graph now (cut after a warm-up
            # that computed it softly: sigmoid(z / t), then (z > 0)) is looked at again, one attribute read
            continue
        handed = [raw for raw, _ in node.handed if raw.requires_grad]
        if not handed:
            if node.handed and (any(l.requires_grad for l in _gradient_terms(node)) or _weights_carry(node)):
                est.__dict__[_REACH_KEY] = None  # its parameters have gradient, its samples not: never pathwise
            continue  # (parameters without gradient now, e.g. frozen: checked when they have one)
        if seen == ():  # not known yet whether its gradient flows through what it hands out
            pathwise = _pathwise(node)
            if pathwise is False:
                est.__dict__[_REACH_KEY] = None  # a leaf of its own requires grad, no parameter's path
                continue
            if pathwise:
                seen = est.__dict__[_REACH_KEY] = set()
        if not _reaches([raw_of(cost)], handed) and not _explained(node, nodes, handed):
            raise OrderError(_cut_message(node, name))
        if seen != ():  # (undecided: checked, not recorded; asked again at the next step)
            seen.add(name)


def _pathwise(node: Node) -> Optional[bool]:
    """Whether the node's gradient flows through the value it handed out at its first call (which requires
    grad): whether that value's autograd graph reaches a parameter that requires grad of the first call's
    distribution (the raw one, or the one the user built, whose raw tensors the raw one's are computed from).
    False, e.g., for an evaluation-only entry handed out as a leaf of the estimator's own (MuProp's x̄) beside
    samples without gradient: never pathwise. True where the first value has no gradient (a later step's has).
    ``None`` (undecided: checked as pathwise at this step, asked again at the next) where the distributions
    show no parameter that requires grad (frozen ones, or held where their attributes do not show them).
    Asked at an estimator's first checked step (then cached by _check_reaches): one walk of the first value's
    graph, which stops at the first parameter it meets."""
    first = node.handed[0][0]
    if not first.requires_grad:
        return True
    params = list(grad_parameters(node.distribution))
    if node.original is not None:
        params.extend(grad_parameters(node.original))
    return _reaches([first], params) if params else None


def _weights_carry(node: Node) -> bool:
    w = node._weight_values
    return isinstance(w, torch.Tensor) and w.requires_grad


def _gradient_terms(node: Node) -> list:
    """The node's gradient function: l_t of each step of a partition (without computing L_t), or l."""
    log = node.step_log
    terms = [l for _, l in log] if log is not None else [node.gradient_values]
    return [l for l in terms if isinstance(l, torch.Tensor)]


def _explained(node: Node, nodes: list[Node], handed: list) -> bool:
    """Whether another node of the cost, downstream of ``node``, credits the cost's dependence on ``node``'s
    sample through its own gradient function or weights (whose graph reaches that sample), or through a
    control variate (not inspected: trusted)."""
    roots = []
    for other in nodes:
        if other is node or not any(p.name == node.plate.name for p in other.parents):
            continue
        if other.estimator.has_control_variate():
            return True
        roots.extend(_gradient_terms(other))
        if _weights_carry(other):
            roots.append(other._weight_values)
    roots = [r for r in roots if r.requires_grad]
    return bool(roots) and _reaches(roots, handed)


def _cut_message(node: Node, name: str) -> str:
    est = node.estimator
    return (
        f"estimator {est.name!r} on plate {node.plate.name!r}: the cost {name!r} depends on the node's sample (it "
        f"carries the plate {node.plate.name!r}) only through operations without a derivative, so the gradient "
        "that flows through the sample would be 0 although the gradient of the expected cost is not: its autograd "
        "graph does not reach the sample (a comparison such as z > 0, .bool(), .long(), argmax, the condition of "
        "torch.where, detach(), or a cost computed under torch.no_grad()). Use a score-function estimator for "
        "this node ('score', with baseline='leave_one_out' for less variance; 'lax' for a continuous node), or "
        "keep the path from the sample to the cost differentiable (a relaxed estimator needs a cost "
        "differentiable in the relaxed sample: e.g. sigmoid((z - c) / t) instead of (z > c).float()). A cost "
        "that is meant to give no gradient to this node can be added with storch.add_cost(..., credit=False)"
        + _category_hint(node))


def _category_hint(node: Node) -> str:
    """For a Categorical / OneHotCategorical node: torch's log_prob of its one-hot value is such an operation."""
    if not isinstance(base_distribution(node.distribution), (Categorical, OneHotCategorical)):
        return ""
    return (". For the one-hot value z of this (OneHot)Categorical node: torch's OneHotCategorical.log_prob(z) reads z through "
            "its argmax (value.max(-1)) and Categorical.log_prob(z) through z.long(); write the log-probability as "
            + _ONE_HOT_LOG_PROB)


def _thresholded_message(node: Node, name: str) -> str:
    est = node.estimator
    p = node.plate.name
    if node.thresholded_in is not None:
        return _index_read_message(node, name)
    return (
        f"estimator {est.name!r} on plate {p!r}: the cost {name!r} carries the plate {p!r}, and in this step "
        f"{node.thresholded} (a comparison, or another operation without a derivative: argmax, a bool or integer "
        "cast) was applied to a value that carries the gradient of the node's sample. "
        f"{est.name!r} differentiates the cost through that sample (REBAR and RELAX: the cost at the relaxed sample "
        "σ_λ(z), in their control variate η f(σ_λ(z))): a threshold such as m > 0.5 makes that relaxed cost jump, autograd sees no "
        "derivative of the jump (its result is a bool, outside the autograd graph), so the control variate no "
        "longer cancels and the gradient is silently biased (only the smooth terms' gradient is left). Use an "
        "estimator that does not differentiate the cost through the sample for this node: 'score' (with "
        "baseline='leave_one_out'), 'arm', 'disarm' or 'unordered_set'; or write the cost without thresholding "
        "the sample: multiply by it (m * a, m * x + (1 - m) * y: on the hard sample it is the same mask, on the "
        "relaxed one it is continuous), and for a piecewise function that is continuous at its threshold "
        "(torch.where(h > 0, h, 0.01 * h)) use torch's own (F.leaky_relu). A comparison whose result no cost "
        "uses (a metric): compute it on m.detach() or under torch.no_grad()")


# for a one-hot (relaxed) value z of a category: what to write instead of torch's (OneHot)Categorical.log_prob
_ONE_HOT_LOG_PROB = (
    "(z * logits.log_softmax(-1)).sum(-1), the log-probability's continuous extension (for a sampled KL: "
    "(z * (q.logits.log_softmax(-1) - p.logits.log_softmax(-1))).sum(-1)): on a one-hot z it equals log_prob, and "
    "it is differentiable in the relaxed one")


def _index_read_message(node: Node, name: str) -> str:
    """A relaxed or straight-through Categorical / OneHotCategorical sample read as indices by torch.distributions
    (Estimator._sample_node's watch): its log_prob of that sample."""
    est = node.estimator
    p = node.plate.name
    return (
        f"estimator {est.name!r} on plate {p!r}: the cost {name!r} carries the plate {p!r}, and in this step torch's "
        f"{node.thresholded_in} applied {node.thresholded} to a value that carries the gradient of the node's "
        f"sample, which {est.name!r} hands out as a one-hot vector (a relaxed point of the simplex on its relaxed "
        "entries). torch's log_prob of a category reads that vector as indices: OneHotCategorical.log_prob takes "
        "value.max(-1) (its argmax), Categorical.log_prob takes value.long() (the K entries as K indices: a "
        "wrong value and shape even on a one-hot vector). The log-probability of the argmax jumps along the relaxed "
        "sample, autograd sees no derivative of the jump, so the gradient would be silently wrong (validate_args="
        "False makes log_prob the continuous extension for a Bernoulli only). Write it yourself instead: "
        f"{_ONE_HOT_LOG_PROB}. A log_prob that no cost uses (a metric): compute it on z.detach() or under "
        "torch.no_grad()")


def _node_order_message(node: Node, order: int) -> str:
    """Why a node's distribution lowers its estimator's order (Estimator.max_order_for), and what to do."""
    est = node.estimator
    name = type(node.original if node.original is not None else node.distribution).__name__
    why = ""
    if est.requires_rsample and rsample_max_order(node.distribution) <= node.max_order:
        why = f": {RSAMPLE_ORDER_NOTE}"
    return (f"estimator {est.name!r} on plate {node.plate.name!r} is unbiased only up to order {node.max_order} "
            f"for its distribution {name} (its max_order is {est.max_order}, lowered for this distribution by "
            f"{type(est).__name__}.max_order_for{why}), but order {order} was requested. Use an estimator that "
            "does not differentiate through the sample for this node, e.g. 'score' (any order; "
            "baseline='leave_one_out' for less variance), or differentiate at most "
            f"{node.max_order} time(s)")


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
        if not node.estimator.uniform_weights and node.weight_values is None:
            node.weight_values = _lead(node.estimator.weighting_function(node), len(node.plates))
        out.append(node)
    return cost_plates, raw, out


class _Sums:
    """One surrogate's running sums L_j = l_1 + ... + l_j of the cost's nodes' gradient functions, shared by
    its costs: a trie by node (``children``: ``id(node)`` -> the level of the prefix one node longer), each
    level holding the prefix's sum at the plates the costs asked for (``entries``: ``(plates, L)``, ``L``
    ``None`` where every gradient function of the prefix is a constant). A chain of K nodes with a cost per
    node adds K gradient functions, not K²/2 (each summed again for every cost downstream of it, and each
    aligned to every cost's plates: O(K³) Python, O(K²) autograd nodes), as the DiCE objective written by
    hand keeps one running L."""

    __slots__ = ("children", "entries")

    def __init__(self) -> None:
        self.children: dict = {}
        self.entries: list = []

    def held(self, target: tuple, within: set):
        """An entry whose plates are all in ``target`` (the exact plates first), or ``None``."""
        entries = self.entries
        for i in range(len(entries) - 1, -1, -1):
            e = entries[i]
            if e[0] == target:
                return e
        for i in range(len(entries) - 1, -1, -1):
            e = entries[i]
            if all(p in within for p in e[0]):
                return e
        return None


def _constant(l) -> bool:
    """Whether a gradient function is a constant of everything differentiated (the zeros of a pathwise node:
    reparameterization, gumbel_softmax; a frozen distribution's log p): its l - ⊥l is 0 with every
    derivative 0 at every order, so it leaves each MagicBox(L) the same function and is not added. One that
    requires grad or carries a forward tangent stays, a zero that carries gradient included."""
    return isinstance(l, torch.Tensor) and not is_differentiated(l)


def _running_sums(nodes: list[Node], plates: tuple, sums: _Sums) -> list:
    """The levels of ``sums`` for the prefixes of ``nodes`` (``levels[i]``: nodes[:i+1]); the last holds
    L_k = l_1 + ... + l_k at ``plates`` (an entry whose plates are ``plates``). A prefix some earlier cost
    summed (at plates that are all in ``plates``) is aligned and extended: one addition per node the cost
    does not share with it. The sums are added in the nodes' order, so the values are those of the plain
    sum at ``plates`` (a view of a broadcast sum is the sum of the views)."""
    levels = []
    level = sums
    for node in nodes:
        key = id(node)
        nxt = level.children.get(key)
        if nxt is None:
            nxt = level.children[key] = _Sums()
        levels.append(nxt)
        level = nxt
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
            break
    for i in range(start, len(nodes)):
        node = nodes[i]
        l_i = node.gradient_values
        if not _constant(l_i):
            l_i = align(l_i, node.plates, plates)
            total = l_i if total is None else total + l_i
        levels[i].entries.append((plates, total))
    return levels


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
    plates, raw, nodes = _at_cost(plates_of(cost), raw_of(cost), nodes)
    if len(nodes) == 1:
        return _one_node_surrogate(raw, plates, nodes[0], name, order, renamed)
    # L_k (and, for the nodes with a control variate, L_{i-1}: Theorem 2's MagicBox arguments) aligned to
    # the cost's plates, from the running sums shared with the surrogate's other costs; constant gradient
    # functions (a pathwise node's zeros) are not added (the same MagicBox functions, see _constant)
    levels = _running_sums(nodes, plates, _Sums() if sums is None else sums)
    total = _sum_at(levels[-1], plates)
    box = None if total is None else magic_box(total)  # MagicBox(L_k)
    inner = raw if box is None else box * raw  # line 7 of Algorithm 1
    last = len(nodes) - 1
    # line 14 with w = 1/N (D.2.1) is a mean over the node's plate; consecutive means (no control
    # variate added in between) are one reduction, and the last ones join the final mean over
    # the data plates: the autograd graph of a single node with one cost is DiCE's, as by hand
    pending: list[int] = []
    for i in range(len(nodes) - 1, -1, -1):
        node = nodes[i]
        dim = plates.index(node.plate)
        est = node.estimator
        if _has_control_variate(est):
            if pending:
                inner, pending = inner.mean(pending, keepdim=True), []
            state = renamed[0] if renamed is not None and node.plate.name in renamed[1] else None
            frame = CostFrame(inner.detach(), plates, node, inner, name, state, order)
            node.frames[frame.key] = frame  # what update_parameters trains on
            prefix = _sum_at(levels[i - 1], plates) if i else None  # L_{i-1}
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


def _one_node_surrogate(raw: torch.Tensor, plates: tuple, node: Node, name: Optional[str],
                        order: int = 1, renamed: Optional[tuple] = None) -> torch.Tensor:
    """:func:`_cost_surrogate` for a cost downstream of one node: the DiCE objective written by hand,
    mean over the plates of MagicBox(l) · C, and with the base class's control variate (a baseline b)
    ``lerp(⊥b, C, MagicBox(l))`` = MagicBox(l) · C + (1 - MagicBox(l)) · ⊥b in one autograd node
    (the same function, so the same derivatives at every order; its value is C exactly, as
    ``torch.lerp`` computes ``end - (end - start) · (1 - weight)`` at weight 1)."""
    est = node.estimator
    box = magic_box(align(node.gradient_values, node.plates, plates))  # MagicBox(l), line 7
    if est.has_control_variate():
        state = renamed[0] if renamed is not None and node.plate.name in renamed[1] else None
        if type(est).control_variate is _BASE_CONTROL_VARIATE:
            # the frame's values are C's (MagicBox(l) = 1); its live tensor is built if asked for
            frame = CostFrame(raw.detach(), plates, node, lambda: box * raw, name, state, order)
            node.frames[frame.key] = frame  # what update_parameters trains on
            b = est.baseline(node, frame)
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
            a = est.control_variate(node, frame)  # line 11
            if a is not None and (type(a) is not torch.Tensor or (a.shape != frame.tensor.shape and a.dim())):
                check_in_frame(est, "control_variate", a, frame)
            _guard_control_variate(a, node, order)
            if a is not None:
                inner = inner + a
    else:
        inner = box * raw
    if not est.uniform_weights:
        dim = plates.index(node.plate)
        w = align(node.weight_values, node.plates, plates)
        inner = (w * inner).sum(dim, keepdim=True)  # line 14: weight and sum over X_i
    # w = 1/N: the mean over the node's plate and the data plates is one reduction
    return inner.mean() if inner.dim() else inner


@eager_only
def cost_estimates(graph: Optional[Graph] = None) -> dict[str, torch.Tensor]:
    """The estimate of the expectation of each cost, by name (detached; for logging).

    Each cost is reduced as the surrogate reduces it: sampling plates by their estimators'
    weights, data plates by the mean. This is the number a user computes by averaging the samples
    of plain Monte Carlo, and the right one where the plate holds entries that are not samples of
    p: the greedy entry of ``score(baseline="greedy")`` (weight 0), the memory slots and rejected
    samples of ``sum_and_sample``, the weight-0 padding of ``unordered_set`` when the support is
    smaller than k, and the weighted sets of ``expect`` and ``unordered_set``. Averaging a cost's
    sample dimension by hand counts those entries as samples. The values are the estimates of the costs,
    not a decomposition of the surrogate: they sum to the surrogate's forward value only where every
    control variate's forward value is 0 (a baseline enters as (1 - MagicBox(l)) b, whose value is 0); a
    control variate that is 0 in expectation only (its value at the samples is not: a learned or relaxed
    control variate, such as RELAX's c(z) - c(z̃) terms) adds to the surrogate's value, not to these.
    """
    graph = graph or current_graph()
    out: dict[str, torch.Tensor] = {}
    for name, cost in graph.costs:
        # the partition views (cumulative L_t) and weights that _at_cost builds are cached on the nodes for
        # the surrogate: built with grad, also when this is called under torch.no_grad() (built without,
        # they cut the loss of a later storch.backward() off from autograd; found by porting a TSP policy)
        with torch.enable_grad():
            plates, raw, nodes = _at_cost(plates_of(cost), raw_of(cost), cost_nodes(graph, cost))
        with torch.no_grad():
            value = _weighted_mean(plates, raw.detach(), nodes).reshape(())
        out[name] = out[name] + value if name in out else value
    return out


_BASE_CONTROL_VARIATE = Estimator.control_variate


def _baseline_term(inner: torch.Tensor, est, node: Node, frame: CostFrame, box: torch.Tensor,
                   prefix: Optional[torch.Tensor]) -> torch.Tensor:
    """``inner`` plus the base class's control variate of the innermost node, MagicBox(L_{k-1}) ·
    (1 - MagicBox(l_k)) ⊥b = (MagicBox(L_{k-1}) - MagicBox(L_k)) ⊥b (a product of MagicBoxes is the
    MagicBox of the sum), with MagicBox(L_k) the cost's own ``box``: the same values and derivatives
    at every order, without computing that MagicBox a second time."""
    b = est.baseline(node, frame)
    if b is None:
        return inner
    if type(b) is not torch.Tensor or (b.shape != frame.tensor.shape and b.dim()):  # (a scalar: no call)
        check_in_frame(est, "baseline", b, frame)
    outer = 1.0 if prefix is None else magic_box(prefix)
    return inner + (outer - box) * b.detach()


@eager_only
def surrogate_loss(order: int = 1, graph: Optional[Graph] = None) -> torch.Tensor:
    """The surrogate loss of the current graph (paper, Eq. 2).

    Its value is the estimate of the expected total cost; differentiating it ``order`` times
    gives unbiased estimates of the ``order``-th derivative (Theorem 1) for every estimator whose
    ``max_order`` >= ``order``.

    ``order=0`` is the value alone: the same estimate of the expected total cost, returned detached (no
    ``grad_fn``; like :func:`cost_estimates`, whose values it sums), because storch checks nothing a
    derivative needs at order 0 (the jumps and kinks on a pathwise path, the estimators unbiased only at
    order 1), so a derivative of it would not be guaranteed unbiased. Its ``.backward()`` raises torch's
    "does not require grad"; for a gradient build order 1 (the default) or higher.

    ``surrogate_loss().backward()`` leaves the estimators as ``storch.backward()`` does: when the
    backward pass accumulates gradients (``.backward()``, not ``torch.autograd.grad``, which stays an
    evaluation pass), the estimators' ``update_parameters`` run once, after the pass (moving
    averages, sum-and-sample's buffer, annealing steps). Once per step: the step's surrogates share one
    record, so a pass that reaches several of them (``(main + 0 * storch.surrogate_loss()).backward()``, an
    order-1 and an order-2 surrogate) updates once, and a later pass of the step (a second ``.backward()``
    with ``retain_graph=True``, of this or another of its surrogates, or ``storch.backward()``) accumulates
    its gradients again but updates nothing: estimator state advances one step per training step. An
    estimator whose update differentiates the loss again (a learned control variate: RELAX, LAX, REBAR) is refused there, before any gradient
    is accumulated, with the advice to call ``storch.backward()``. Unlike ``storch.backward()``, the
    graph is not reset. A second-order training objective built from ``g = torch.autograd.grad(loss,
    params, create_graph=True)`` (a gradient penalty, a MAML outer step through ``params - lr * g``) runs
    the updates too when it is backpropagated with ``.backward()``: the loss is ``loss + loss · probe`` with a
    zero leaf ``probe`` (one node; the same value and derivatives), and ``g = ∂loss + probe ∂loss`` holds it.

    Built inside ``torch.func.vmap`` (an ensemble: ``vmap(step, randomness="different")(params).sum()
    .backward()``, or ``stack_module_state`` + ``functional_call``), the surrogate's ``.backward()`` outside
    vmap raises ``StorchError`` when an estimator of the step would update its state (before any gradient is
    accumulated): the step's values are batched over the members, and one estimator's state would mix them.
    Estimators without state (``score`` with ``baseline='leave_one_out'`` or none, ``update=False``) train
    under vmap; ``torch.autograd.grad`` (and ``torch.func.grad``) of a vmapped surrogate, which never updates, is
    not refused. ``storch.backward()`` inside vmap raises ``StorchError`` (no backward pass runs inside vmap).

    A node that no cost is downstream of (no cost carries its plate) and whose gradient function or
    weights carry gradient gets a :class:`storch.UnusedSampleWarning`: its parameters get no gradient
    from it, typically because a cost was computed from its samples outside storch's plates
    (``z.tensor``).

    The order-1 surrogate is the any-order form of Eq. 2: differentiated twice (``torch.autograd.grad``
    with ``create_graph=True``, ``torch.autograd.functional.hessian`` / ``hvp``) it gives unbiased
    higher derivatives for the estimators whose ``max_order`` allows them (score, expect, importance,
    RELAX, ...). Where a node is unbiased only at order 1 (ARM, DisARM, GO, MVD, SPSA, the unordered
    set with its baseline), a pathwise node's cost has a kink on the path from its sample (ReLU,
    abs, max; REBAR's, RELAX's and LAX's control variates likewise, their cost at the relaxed sample and
    their network), or a score-function node's log p has a kink in its learned parameters (Laplace's
    |x - loc|), the backward pass with ``create_graph=True`` through its term raises ``OrderError``
    (torch.func: two nested differentiating transforms raise it when the surrogate is built, and so does
    one (``torch.func.jvp``, ``grad``, ``vjp``, ``jacrev``) whose inputs or captured tensors require grad
    outside it: a ``torch.autograd.grad`` / ``.backward`` of its result, the jvp's tangent or the gradient,
    would be a second derivative that no hook sees; pass it detached tensors for a first derivative).
    Under ``torch.func.vmap`` (``randomness="different"``) the tensors under the batching are hooked and
    checked, so a derivative of the vmapped surrogate outside vmap is refused or allowed as eagerly (the
    estimators' updates excepted: see above).

    Forward mode (``torch.func.jvp`` / ``jacfwd``, ``torch.autograd.forward_ad``) of detached primals through a
    pathwise node: there is no autograd graph in which to check its cost for a jump (round, sign, floor: a
    tangent of 0 where the expectation's is not, which reverse mode refuses), so it uses the verdict of an
    earlier step of the same estimator and cost name built with parameters that require grad (outside the
    forward-mode transform), and without one raises ``OrderError``: run one such step first.

    Raises:
        OrderError: an estimator upstream of a cost is not unbiased to ``order``. Like every
            error raised during a step, it discards the step (the graph is reset). At order 1,
            raised by the backward pass with ``create_graph=True`` described above.
        StorchError: built with gradients enabled, a cost depends on a node that was sampled under
            ``torch.no_grad()`` from parameters that require grad (its gradient would be missing).
    """
    graph = graph or current_graph()
    if not isinstance(order, int) or isinstance(order, bool) or order < 0:
        raise StorchError(f"order must be an int >= 0, got {order!r}")  # a bad argument: the step is intact
    if order == 0:
        # detached because no guard of a derivative ran (before, its gradient skipped the order-1 refusals:
        # round(z) gave 0, a ReLU's or ARM's Hessian no OrderError)
        return value_surrogate(graph).detach()
    with graph.guard():
        if order >= 2:
            recorder = tracing_recorder()
            if recorder is not None and not recorder.replay_only:
                raise StorchError(
                    f"surrogate_loss(order={order}) in a step compiled by storch.compile with a compiler backend: "
                    "torch's compiled programs cannot be differentiated twice (inductor says it does not support "
                    "double backward; with aot_eager the second derivative came out unused, None with "
                    "allow_unused=True). Use storch.compile(step, backend=None), whose replay runs the traced "
                    "operations through autograd (every order), or run the step eagerly")
        loss = _surrogate_loss(order, graph)
    graph.loss_built = True
    loss = _updates_on_backward(loss, graph)
    if order >= 2:
        _keep_counted(loss)
    return loss


def value_surrogate(graph: Graph) -> torch.Tensor:
    """The order-0 surrogate with its autograd graph (``surrogate_loss(order=0)`` detaches it): for
    storch.testing, which differentiates it only in the replicate plate's weights (each replicate's
    estimate: the loss is linear in them), never in the parameters, whose derivatives nothing here guards.
    Built with grad: the partition views and weights it caches on the nodes serve a later surrogate of the
    step, which must keep their graph."""
    with graph.guard():
        loss = _surrogate_loss(0, graph)
    graph.loss_built = True
    return loss


def _updating(graph: Graph) -> dict[int, list[Node]]:
    """The nodes of each estimator in the graph that has an update, by estimator."""
    updating: dict[int, list[Node]] = {}
    for node in graph.nodes:
        if node.estimator.has_update:
            updating.setdefault(id(node.estimator), []).append(node)
    return updating


def _updates_on_backward(loss: torch.Tensor, graph: Graph) -> torch.Tensor:
    """``loss`` plus a zero leaf whose gradient accumulation (``.backward()`` reaches it first: the
    engine runs AccumulateGrad nodes before the others) checks the step and queues the estimators'
    updates for the end of the pass. ``torch.autograd.grad(loss, params)`` never accumulates into
    it: evaluation passes change no estimator state."""
    updating = _updating(graph)
    if not updating:
        return loss
    recorder = tracing_recorder()
    if recorder is not None:  # storch.compile records the step: it attaches the probe to each replay
        return recorder(loss, updating)
    if not loss.requires_grad:
        # under torch.func.vmap the batched loss reports requires_grad=False although the tensor it batches
        # takes part in the autograd outside vmap (vmap(step)(params).sum().backward()): that pass must not
        # silently skip the updates (it did), nor run them on batched values (one state would mix members)
        if _batched(loss) and unbatched(loss).requires_grad:
            return _refuse_updates_under_vmap(loss, updating)
        return loss
    # one zero leaf, one node: loss + loss · probe (addcmul) has the loss's value and derivatives in θ at
    # every order (probe = 0: the added terms are exact zeros), and .backward() accumulates into probe
    # (∂/∂probe = loss). A second-order objective built from g = autograd.grad(loss, θ, create_graph=True)
    # (a gradient penalty, a MAML outer step through θ - lr·g) reaches it too: g = ∂loss + probe ∂loss
    # holds it in its graph
    probe = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
    # one record for every probe of the step: a pass that reaches two of its surrogates (main + 0 * another,
    # an order-1 and an order-2 part) updates once, as storch.backward() does
    done = graph.step_updated
    if done is None:
        done = graph.step_updated = set()

    def check():
        learners = sorted({f"{n[0].estimator.name!r} (plate {n[0].plate.name!r})" for n in updating.values()
                           if getattr(n[0].estimator, "update_uses_loss_graph", False)})
        if learners:
            raise StorchError(
                f"surrogate_loss().backward() cannot train the learned control variate of estimator "
                f"{', '.join(learners)}: its update differentiates the surrogate again after the backward pass, "
                "which needs the surrogate's graph then (storch cannot see whether this pass retains it). Nothing "
                "was backpropagated. Call storch.backward() instead (it backpropagates, updates every estimator "
                "and resets the graph; storch.backward(scale=scaler) with a torch.amp.GradScaler for loss scaling), "
                "or create the estimator with update=False")
        _check_finite(loss, graph)

    def run(todo):
        for key in todo:
            nodes = updating[key]
            nodes[0].estimator.update_parameters(nodes, loss)

    update_on_backward(probe, check, run, done, tuple(updating))
    return torch.addcmul(loss, loss, probe)


def _refuse_updates_under_vmap(loss: torch.Tensor, updating: dict[int, list[Node]]) -> torch.Tensor:
    """``loss`` plus a zero probe (as :func:`_updates_on_backward`'s) whose gradient accumulation raises: a
    ``.backward()`` outside ``torch.func.vmap`` of a surrogate built inside it would update the estimators.
    ``torch.autograd.grad`` of it (an evaluation pass, which never updates) never reaches the probe and is
    left alone. The probe's AccumulateGrad runs first, so nothing is backpropagated when it raises."""
    names = ", ".join(sorted({f"{n[0].estimator.name!r} (plate {n[0].plate.name!r})" for n in updating.values()}))
    message = (
        f"storch.surrogate_loss() was built inside torch.func.vmap, and its .backward() outside vmap would have to "
        f"update the state of estimator {names} (a moving average, a learned baseline or control variate, an "
        "annealing schedule, a memory buffer): storch cannot. Inside vmap the step's values are batched over "
        "the vmapped members, and one estimator's state would mix them. "
        "Nothing was backpropagated. Run the members in a Python loop (an estimator per member, each step "
        "ending with storch.backward()), use an estimator without state (e.g. score with "
        "baseline='leave_one_out' or 'none', a constant temperature), or create the estimator with "
        "update=False where it has that option (score, relax, lax, rebar: its state is then never updated). "
        "torch.autograd.grad of the vmapped surrogate (an evaluation pass) updates nothing and is not refused")

    def refuse(_):
        raise StorchError(message)

    probe = torch.zeros((), dtype=loss.dtype, device=loss.device, requires_grad=True)
    probe.register_post_accumulate_grad_hook(refuse)
    return torch.addcmul(loss, loss, probe)


def update_on_backward(probe: Union[torch.Tensor, tuple], check: Callable[[], None],
                       run: Callable[[list], None], done: set, keys: tuple = (None,)) -> None:
    """The update probe's mechanism (eager surrogates, and each call of a step compiled by
    ``storch.compile``): when ``.backward()`` accumulates into the zero leaf ``probe`` (added to
    the loss; ``torch.autograd.grad`` never accumulates into it), or into one of several, ``check()`` runs
    (it raises to stop the pass before any state changes) and ``run()`` (the estimators' updates) is queued
    for the end of the pass, once per step and estimator: ``done`` is the step's record of the ``keys`` (the
    estimators, by id) updated, shared by the probes of all its surrogates, so neither a pass that reaches
    several of them nor a second pass (``retain_graph=True``, or another surrogate of the step) updates an
    estimator again, while one that an earlier pass did not reach (a node added after it) is updated;
    ``run(todo)`` updates the keys in ``todo``. ``run`` has grad mode on, as under ``storch.backward()``
    (the engine's callback runs with it off, so a learned baseline's regression would build no graph and
    silently not train)."""

    def on_backward(_):
        todo = [k for k in keys if k not in done]
        if not todo:
            return
        check()  # before the record: a refused pass (a non-finite loss) is refused again, never let through
        done.update(todo)

        def queued():
            with torch.enable_grad():
                run(todo)

        torch.autograd.Variable._execution_engine.queue_callback(queued)

    for p in probe if isinstance(probe, tuple) else (probe,):
        p.register_post_accumulate_grad_hook(on_backward)


def _surrogate_loss(order: int, graph: Graph) -> torch.Tensor:
    if not graph.costs:
        ended = ("" if graph.nodes or graph.last_end is None else
                 f" (its last step was {graph.last_end}: storch.backward() ends the step and resets the graph, "
                 "so call it once per step, after the step's costs)")
        raise StorchError(f"the graph has no costs{ended}; call storch.add_cost(...) before the surrogate loss")
    pending = _PENDING.mixed
    pending.clear()  # (refusals of an earlier build of this thread that raised)
    per_cost = []
    plain = []  # costs added with credit=False: differentiated as written
    reached = 0
    no_credit = graph.no_credit
    memos: dict = {}  # the smoothness walks' memo, shared by the costs of this surrogate
    for name, cost in graph.costs:
        nodes = cost_nodes(graph, cost)
        if no_credit and id(cost) in no_credit:
            plain.append((cost, nodes))
            reached += len(nodes)
            continue
        if nodes:
            _check_order(nodes, order)
            _check_smooth(name, cost, nodes, order, memos)
            _check_reaches(name, cost, nodes, order)
            reached += len(nodes)
        per_cost.append((name, cost, nodes))
    grad = None
    for node in graph.nodes:
        for raw, version in node.handed:
            if raw._version != version and _reads_its_samples(node):
                _changed_in_place(node)
        if node.no_grad_cut:
            if grad is None:
                grad = torch.is_grad_enabled()
            if grad:  # a training surrogate (an evaluation one is built under no_grad too)
                _check_sampled_with_grad(node, per_cost)
    n = len(graph.nodes)
    if n and (reached == 0 or n > 1):  # one node and some cost upstream of it: nothing to look for
        _warn_unused(graph, per_cost + [(None, c, ns) for c, ns in plain])
    renamed = _state_names(per_cost) if len(graph.costs) > 1 and n else None
    loss = None
    single, groups = [], {}
    if any(len(nodes) == 1 and nodes[0].history is not None for _, _, nodes in per_cost):
        stackable: dict = {}  # id(node) -> whether its steps' costs may be stacked (asked once per node)
        for name, cost, nodes in per_cost:
            key = _step_group(cost, nodes, stackable)
            if key is None:
                single.append((name, cost, nodes))
            else:
                groups.setdefault(key, []).append((name, cost, nodes))
    else:  # only the costs of a partition's steps (one node with a history) can be stacked
        single = per_cost
    for members in groups.values():
        if len(members) == 1:
            single.extend(members)
        else:
            s = _steps_surrogate(members[0][2][0], members, order)
            loss = s if loss is None else loss + s
    sums = _Sums()  # the running sums of the gradient functions, shared by the costs
    for name, cost, nodes in single:
        s = _cost_surrogate(cost, nodes, name, order, renamed and renamed.get(id(cost)), sums)
        loss = s if loss is None else loss + s
    for cost, nodes in plain:
        s = _plain_surrogate(cost, nodes)
        loss = s if loss is None else loss + s
    if n and order:  # (order 0, the value alone: nothing differentiated)
        _guard_low_order(graph, order)
    if pending:
        _check_mixed(loss)
    return loss if loss.dim() == 0 else loss.reshape(())  # a reshape of a 0-dim loss is one more node


def _plain_surrogate(cost, nodes: list[Node]) -> torch.Tensor:
    """A cost added with ``credit=False``: no MagicBox, no control variate; reduced as
    :func:`cost_estimates` reduces a cost, but with the cost's graph."""
    return _weighted_mean(*_at_cost(plates_of(cost), raw_of(cost), nodes))


def _weighted_mean(plates: tuple, inner: torch.Tensor, nodes: list[Node]) -> torch.Tensor:
    """``inner`` (leading dims ``plates``) reduced over the nodes' sampling plates by their weights
    (detached: not differentiated; 1/N as a mean for uniform ones), then the mean over what is left."""
    for node in reversed(nodes):
        dim = plates.index(node.plate)
        if node.estimator.uniform_weights:
            inner = inner.mean(dim, keepdim=True)
        else:
            inner = (align(node.weight_values.detach(), node.plates, plates) * inner).sum(dim, keepdim=True)
    return inner.mean() if inner.dim() else inner


def _reads_its_samples(node: Node) -> bool:
    """Whether the node's estimator reads the values it drew (a gradient function or weights that carry
    gradient, a control variate). A pathwise node (reparameterization, a relaxation without control
    variate) does not: autograd follows an in-place change of its sample as of any tensor."""
    est = node.estimator
    return bool(node.gradient_values.requires_grad or not est.uniform_weights or est.has_control_variate())


def _check_sampled_with_grad(node: Node, per_cost: list) -> None:
    """Refuse a node sampled under ``torch.no_grad()`` from parameters that require grad when a cost
    reaches it and the surrogate is built with grad: its gradient function (and a pathwise sample)
    has no graph, so its score term is silently missing from the gradient (only the other costs'
    terms remain, e.g. an entropy bonus). A node without costs may be sampled so (it silences
    :class:`UnusedSampleWarning`), and so may every node of an evaluation pass under no_grad. A cost added
    with ``credit=False`` is differentiated as written (no score term), and as written it reads a sample
    drawn without gradient: not refused (a world model trained on the actions of a policy sampled under
    no_grad)."""
    if not any(n is node for _, _, nodes in per_cost for n in nodes):
        return
    step = f" (step {node.no_grad_step} of its partition)" if node.step_log is not None else ""
    raise StorchError(
        f"node {node.plate.name!r} (estimator {node.estimator.name!r}) was sampled under torch.no_grad() (or "
        f"torch.inference_mode()){step}, from a distribution whose parameters require grad, and a cost depends "
        "on it: its gradient function was computed without grad, so these parameters would get no gradient "
        "through it (the gradient would silently be only the other costs'). Sample it with gradients enabled "
        "(est(distribution) outside the no_grad block); use torch.no_grad() only for evaluation steps (sampling, "
        "storch.cost_estimates() and the surrogate all under no_grad) or for nodes without costs; a loss that "
        "should not train this node's parameters can be added with storch.add_cost(..., credit=False)")


def _changed_in_place(node: Node) -> None:
    raise StorchError(
        f"the samples of node {node.plate.name!r} (estimator {node.estimator.name!r}) were changed in place after "
        "the estimator handed them out (z.mul_(2), z += 1, z[...] = v, z.clamp_(...)): its gradient function, "
        "weights and control variates refer to the values it drew, so the gradient would be wrong or torch would "
        "fail in the backward pass. Compute a new tensor instead (z = z * 2, z = z + 1, torch.where(...), "
        "z.clamp(...))")


def _state_names(per_cost: list) -> Optional[dict]:
    """The state names of costs that share a name with a cost of other plates reaching the same node.

    Per-cost estimator state (moving averages, NVIL's heads, the frames ``update_parameters`` reads,
    sum_and_sample's buffer totals) is kept by the frame's key, the cost's name and step. Costs added per
    layer under one name (``storch.add_cost(term, name="nelbo")`` for each layer) have different plates,
    and one baseline for all of them (the last one's average) would silently cost variance: at a node
    that several such costs reach, each is kept under its name with its plate names, sorted
    (``"nelbo[z1,z2]"``). A model without such costs keeps its keys (and state_dict) as they were.
    Two costs of one name with the same plates at one step do share the state: warned about.

    Returns:
        ``None`` (nothing renamed), or by ``id(cost)`` the cost's state name and the plate names of the
        nodes where it is used.
    """
    by_name: dict = {}
    for name, cost, nodes in per_cost:
        if nodes:
            by_name.setdefault(name, []).append((cost, nodes))
    renamed: Optional[dict] = None
    warned = False
    for name, members in by_name.items():
        if len(members) < 2:
            continue
        kinds: dict = {}  # the plate names of a cost: its costs (and their nodes)
        seen: set = set()
        for cost, nodes in members:
            plates = plates_of(cost)
            if plates in seen and not warned:
                warned = True
                warnings.warn(
                    f"two costs named {name!r} were added at the same step (the same plates): the loss counts both, "
                    "but estimator state kept per cost (moving-average and learned baselines, sum_and_sample's "
                    "buffer) is kept by name, plates and step, so they share it and one replaces the other there. "
                    "Give each cost of a step its own name (the same name at different steps of a partition, or "
                    "for costs of different plates such as one per layer, is fine)", UserWarning, stacklevel=5)
            seen.add(plates)
            kinds.setdefault(frozenset([p.name for p in plates]), []).append((cost, nodes))
        if len(kinds) < 2:  # (the steps of a partition: one kind)
            continue
        at_node: dict = {}  # a node's plate name -> the kinds of the costs that reach it
        for kind, costs in kinds.items():
            for _, nodes in costs:
                for node in nodes:
                    at_node.setdefault(node.plate.name, set()).add(kind)
        for kind, costs in kinds.items():
            state = f"{name or ''}[{','.join(sorted(kind))}]"
            for cost, nodes in costs:
                split = {node.plate.name for node in nodes if len(at_node[node.plate.name]) > 1}
                if split:
                    if renamed is None:
                        renamed = {}
                    renamed[id(cost)] = (state, split)
    return renamed


def _warn_unused(graph: Graph, per_cost: list) -> None:
    """Warn about each node whose gradient function carries gradient and that no cost is downstream of.

    Its score term (l, or its weights) reaches the parameters only through the costs downstream of it,
    which are the costs that carry its plate. A cost computed from its samples outside storch's plates
    (``z.tensor``, ``.item()``, numpy; a reduction over the sample plate such as an IWAE bound) does not
    carry it, so that node's parameters silently got no gradient from it. A node with a zero gradient
    function (reparameterization, the relaxations) is not reported: its gradient flows pathwise.
    """
    seen = {id(n) for _, _, nodes in per_cost for n in nodes}
    if len(seen) == len(graph.nodes):
        return
    for node in graph.nodes:
        if id(node) in seen:
            continue
        w = node.weight_values if not node.estimator.uniform_weights else None
        carries = node.gradient_values.requires_grad or (w is not None and w.requires_grad)
        if carries:
            warnings.warn(UnusedSampleWarning(
                f"node {node.plate.name!r} (estimator {node.estimator.name!r}) is upstream of no cost: no cost carries "
                f"its plate {node.plate.name!r}, so its distribution's parameters get no gradient from its estimator. "
                "If a cost was computed from its samples outside storch's plates (z.tensor, .item(), numpy, or a "
                "reduction over the sample plate such as an IWAE bound), storch cannot see that dependence: compute "
                "the cost from the plate tensor itself, one value per sample (a reduction over the samples is not a "
                "cost storch can differentiate with a score function; a continuous node can use "
                "'reparameterization'; a multi-sample bound such as IWAE's is the cost of ONE sample that holds its K "
                "draws: est(Bernoulli(logits=logits.expand(K, *logits.shape))), reduced over the first dim, or the "
                "'vimco' estimator, see docs/plates.md). A node sampled on purpose without a cost can be sampled under "
                "torch.no_grad() (or from detached parameters)"), stacklevel=5)


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
            a = est.control_variate(stacked, frame)  # line 11
            if a is not None and (type(a) is not torch.Tensor or (a.shape != frame.tensor.shape and a.dim())):
                check_in_frame(est, "control_variate", a, frame)
            _guard_control_variate(a, node, order)
            if a is not None:
                inner = inner + a
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


@eager_only
def backward(graph: Optional[Graph] = None, *, order: int = 1,
             scale: Optional[Union[float, torch.Tensor, "torch.amp.GradScaler"]] = None,
             inputs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Backpropagate the first-order surrogate, run estimators' own updates, reset the graph.

    Order: the surrogate loss (order 1) is built and backpropagated (its graph kept for the updates,
    unless each of them reads the step's tensors as values only: ``update_uses_loss_graph = False``,
    or ``replays_update`` without it set), then ``update_parameters(nodes, loss)`` runs once per estimator with
    ``has_update`` (the only place estimator state changes; skipped where a ``surrogate_loss().backward()``
    of this step ran them already: once per step), then the graph is reset (also after an exception).

    ``inputs``: accumulate gradients into these tensors only (``Tensor.backward(inputs=...)``: one
    optimizer per parameter group). The estimators' updates run as without it. (``surrogate_loss().backward(
    inputs=...)`` runs no updates: a restricted pass never reaches the loss's update probe.)

    ``scale``: loss scaling for mixed precision. A ``torch.amp.GradScaler`` (or any object with a
    ``scale(loss)`` method): backpropagate ``scaler.scale(loss)``, then ``scaler.step(opt)``,
    ``scaler.update()`` as with ``scaler.scale(loss).backward()``::

        scaler = torch.amp.GradScaler(device)
        storch.backward(scale=scaler)
        scaler.step(opt); scaler.update(); opt.zero_grad()

    A number or tensor: backpropagate ``scale * loss`` (a fixed loss scale; not
    ``scaler.get_scale()``, which leaves the scaler without the scale that ``scaler.step`` unscales
    by). The estimators' updates read the unscaled loss, so their state is the same as without it.

    Returns:
        the detached estimate of the expected total cost.

    Raises:
        NonFiniteCostError: a cost (or the surrogate) is not finite (NaN or infinite); a
            ``CostError`` and a ``FloatingPointError``. Nothing is backpropagated and no estimator
            state changes (moving averages, learned control variates); the step is discarded.
            Catch it to skip the batch.
        OrderError: ``order`` other than 1 (a surrogate of higher order is built with
            :func:`surrogate_loss` and differentiated with ``torch.autograd.grad``).
    """
    graph = graph or current_graph()
    if not torch.is_grad_enabled():
        raise StorchError(
            "storch.backward() with gradients disabled (inside torch.no_grad() or torch.inference_mode()): "
            "nothing can be backpropagated. Build the step with gradients enabled; for an evaluation pass use "
            "storch.cost_estimates() and end the step with storch.reset() (or a `with storch.Graph():` block)")
    if order != 1:
        raise OrderError(
            f"storch.backward(order={order!r}): storch.backward() is the first-order training step. For "
            "derivatives of order n, build loss = storch.surrogate_loss(order=n) and differentiate it n times "
            "with torch.autograd.grad(..., create_graph=True) (or loss.backward(create_graph=True)); end the "
            "step with storch.reset() or a `with storch.Graph():` block")
    if not (scale is None or isinstance(scale, (numbers.Number, torch.Tensor)) or callable(getattr(scale, "scale", None))):
        raise StorchError(  # a bad argument: the step is intact
            f"storch.backward(scale={scale!r}): scale must be a torch.amp.GradScaler (storch.backward(scale=scaler), "
            "then scaler.step(opt) and scaler.update()), a number or a tensor")
    if is_tracing():
        graph.reset()
        raise StorchError(
            "storch.backward() inside a step compiled with storch.compile: a compiled step cannot run "
            "backward and estimator updates inside it. Return storch.surrogate_loss() from the step and "
            "call .backward() on what the compiled step returns")
    try:
        try:
            loss = _surrogate_loss(1, graph)
        except BaseException as e:
            graph.discard(e)
            raise
        if _batched(loss):  # torch said only "vmap: ... calling .item() on a Tensor" (the finiteness check)
            raise StorchError(
                "storch.backward() inside torch.func.vmap: a backward pass (and the estimators' updates) cannot "
                "run inside vmap. Return storch.surrogate_loss() from the vmapped function and call .backward() "
                "on its result outside vmap (for estimators without state: one whose state would be updated is "
                "refused there), or run the members in a Python loop, each step ending with storch.backward()")
        _check_finite(loss, graph)
        if not loss.requires_grad:
            # a node sampled under torch.no_grad() from parameters that do not require grad there (a
            # distribution built inside the block); one that does is refused by the surrogate
            cut = [n.plate.name for n in graph.nodes if n.no_grad_step is not None]
            no_grad = (f" The nodes {cut} were sampled under torch.no_grad() (or torch.inference_mode()): their "
                       "gradient functions and samples have no gradient; sample them, and build their "
                       "distributions, with gradients enabled (torch.no_grad() only for evaluation steps or nodes "
                       "without costs).") if cut else ""
            raise StorchError(
                "storch.backward(): the surrogate loss depends on no tensor that requires grad, so there is "
                f"nothing to backpropagate.{no_grad} Check that the distributions' parameters require grad, and "
                "that a pathwise node's (reparameterization, relaxations) cost is differentiable in its sample: "
                "(x > c).float(), round(x) or an integer cast have no gradient; use a score-function estimator "
                "('score') for such a cost")
        updating = _updating(graph)
        # the graph is kept for update_parameters (which may differentiate the loss again), except
        # when every update says it reads values only (update_uses_loss_graph False: sum_and_sample's
        # buffer) or replays from detached tensors (replays_update: a moving average, NVIL, a
        # schedule) without saying it differentiates the loss. Keeping it for those held all of the
        # backward's saved tensors to the end of the pass (peak memory 1.16-1.24x hand-written)
        keep = any(_needs_loss_graph(n[0].estimator) for n in updating.values())
        try:
            if scale is None:
                scaled = loss
            elif isinstance(scale, (numbers.Number, torch.Tensor)):
                scaled = loss * scale
            else:
                # a GradScaler: its scale() creates the scale tensor that scaler.step() unscales by (lazily,
                # at the first call), so scale=scaler.get_scale() failed there ("_scale is None")
                scaled = scale.scale(loss)
            scaled.backward(retain_graph=keep, inputs=inputs)
        except RuntimeError as e:
            if "backward through the graph a second time" not in str(e):
                raise
            raise StorchError(
                "storch.backward(): the step's autograd graph was already freed by an earlier backward pass "
                "through it (torch.autograd.grad(storch.surrogate_loss(), ...) or loss.backward() without "
                "retain_graph=True). Pass retain_graph=True to that earlier call, or build the step again; no "
                "estimator state was changed") from e
        ran = graph.step_updated or ()  # those a surrogate_loss().backward() of this step ran: once per step
        for key, nodes in updating.items():
            if key not in ran:
                nodes[0].estimator.update_parameters(nodes, loss)
        return loss.detach()
    except RuntimeError as e:
        _explain_ddp_error(e)
        raise
    finally:
        graph.reset()


def _needs_loss_graph(est: Estimator) -> bool:
    """Whether ``est.update_parameters`` may differentiate the loss, so ``storch.backward()`` keeps
    its graph: what the estimator says (``update_uses_loss_graph`` True or False), and where it says
    nothing (``None``), unless the update replays from detached tensors (``replays_update``:
    ``update_from`` of ``update_inputs``)."""
    uses = est.update_uses_loss_graph
    return (not est.replays_update) if uses is None else bool(uses)


def _check_finite(loss: torch.Tensor, graph: Graph) -> None:
    """Raise NonFiniteCostError naming the non-finite costs (one check of the total; the costs only if it fails)."""
    if loss.is_meta or math.isfinite(loss.item()):  # item(): ~0.2 us, torch.isfinite ~4 us; not .device (~5 us)
        return
    bad = [name for name, cost in graph.costs if not bool(torch.isfinite(raw_of(cost).detach()).all())]
    after = ("nothing was backpropagated, estimator state (moving averages, learned control variates) is "
             "unchanged and the step is discarded. ")
    if bad:
        raise NonFiniteCostError(
            f"cost {', '.join(repr(b) for b in bad)} is not finite (NaN or inf), so its gradient would be too: "
            f"{after}Find where the non-finite value comes from (e.g. log(0), NaN parameters, a diverging "
            "learning rate), or catch storch.NonFiniteCostError to skip the batch")
    names = sorted({f"{n.estimator.name!r} (plate {n.plate.name!r})" for n in graph.nodes})
    raise NonFiniteCostError(
        f"the surrogate loss is not finite although every cost is: the weights or gradient-function values of "
        f"an estimator are (estimators in this graph: {', '.join(names) or 'none'}; e.g. log p(x) = -inf, or "
        f"diverged parameters; a tanh-squashed distribution whose sample saturated at ±1, where "
        f"TanhTransform's inverse is infinite: use TanhTransform(cache_size=1) so log_prob reuses the "
        f"pre-tanh sample){_infinite_logits_hint(graph)}: {after}Catch storch.NonFiniteCostError to skip the batch")


def _infinite_logits_hint(graph: Graph) -> str:
    """For :func:`_check_finite`'s message (error path only): the nodes whose Bernoulli / Binomial has infinite
    logits, where torch's log_prob is NaN (inf - inf) for the value the bit always takes."""
    found = []
    for n in graph.nodes:
        d = n.original if n.original is not None else n.distribution
        while isinstance(d, (torch.distributions.Independent, torch.distributions.TransformedDistribution)):
            d = d.base_dist
        logits = d.__dict__.get("logits") if isinstance(d, (torch.distributions.Bernoulli,
                                                            torch.distributions.Binomial)) else None
        if isinstance(logits, torch.Tensor) and bool(torch.isinf(raw_of(logits).detach()).any()):
            found.append(f"{n.estimator.name!r} (plate {n.plate.name!r}, a {type(d).__name__})")
    if not found:
        return ""
    return (f". Infinite logits (a masked or certain bit) at {', '.join(found)}, "
            "where torch's log_prob is NaN (inf - inf) for the value the bit always takes: use a large finite "
            "logit (±30) for a masked bit, or an estimator that handles infinite logits (expect, unordered_set, "
            "sum_and_sample, spsa, go)")


def _explain_ddp_error(e: RuntimeError) -> None:
    """Raise a StorchError that says what to do for DDP's error with find_unused_parameters=True."""
    if "mark a variable ready only once" not in str(e):
        return
    # DistributedDataParallel(find_unused_parameters=True) looked for the used parameters from the
    # forward's outputs, which do not lead to storch's costs
    raise StorchError(
        "DistributedDataParallel(find_unused_parameters=True) marked the model's parameters unused, then "
        "storch.backward() gave them gradients: DDP finds used parameters from the outputs of the wrapped "
        "module's forward, and storch's loss is built from the registered costs. End the forward with "
        "`return storch.surrogate_loss()` (then call storch.backward() as before), or use "
        "find_unused_parameters=False. See storch.distributed.") from e
