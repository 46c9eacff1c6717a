"""What a pathwise node (one whose gradient flows through the sample it handed out) needs of a cost: a smooth path.

A smooth path (``_check_smooth``): no jump on the path from the sample to the cost at order 1, no kink at
order >= 2 (storch.conditions.smoothness), an order-1 surrogate whose cost has a kink hooked against a second derivative;
at order >= 2 no comparison of the sample in user code (``_check_compared``: a kink the walk cannot see).
A path at all is :mod:`.reaches`; an integer value read from the sample, a jump autograd does not see,
:mod:`.integer_reads`.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from ..conditions import smoothness
from ..conditions.order_guard import forward_level_open, has_tangent, is_differentiated, unbatched, unwrapped
from ..errors import OrderError
from ..estimators.watch import compared, is_pathwise
from ..graph.node import Node
from ..plates.tensor import plates_of, raw_of
from ..conditions.score import smooth_log_prob_parameters
from ..conditions.smoothness import _reaches, require_smooth
from .refusals import _AGAIN, _again, _batched, _refuse_twice


# estimator -> {cost name: the kinks (autograd node names) on the path from its sample to the cost, () if
# none}: the costs checked at order 1 (see _check_smooth)
_CHECKED_AT_ORDER_1: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _check_smooth(name: str, cost: torch.Tensor, nodes: list[Node], order: int,
                  memos: Optional[dict] = None) -> None:
    """A pathwise node (its estimator ``requires_rsample``, or ``pathwise``: a relaxation such as gumbel_softmax,
    whose objective is the relaxed one; :func:`~storch.estimators.watch.is_pathwise`: the cost is differentiated
    through the sample itself) is unbiased at order n only for a cost whose derivatives of order < n are continuous in its
    sample: refuse an operation on a path from a value it handed out to the cost that breaks this
    (storch.conditions.smoothness). At order >= 2, a kink (ReLU, abs, clamp, max) or a jump, at every surrogate; at
    order 1 only a jump (round, sign, floor, nearest grid_sample: the pathwise gradient is 0 where the
    expectation's is not), checked at the first step of each estimator, cost name and partition step of
    the cost (a walk of the cost's graph per step would cost the common case time; a model's operations
    rarely change between steps; an episode's costs of one name differ per step). That walk also records
    the kinks: an order-1 surrogate whose cost has one is refused when it is differentiated again (its
    cost hooked: :mod:`storch.conditions.order_guard`); so is one whose node's sample was compared in user code in a step
    (``Node.compared``, :func:`storch.estimators.watch.compared`: the mask of ``torch.where(x > 0, x, 0)``, a kink
    outside the autograd graph; at order >= 2 :func:`_check_compared` refuses it). ``memos``: per pathwise node, what the walks of this
    surrogate learned (:class:`storch.conditions.smoothness.PathMemo`): each autograd node is expanded once."""
    if order < 1:  # the value alone: surrogate_loss(order=0) is detached, nothing differentiated
        return
    key = None  # (name, the cost's partition steps): computed once per cost, for its first pathwise node
    for node in nodes:
        est = node.estimator
        if node.handed and is_pathwise(est):
            if order < 2:
                seen = _CHECKED_AT_ORDER_1.get(est)
                if seen is None:
                    seen = _CHECKED_AT_ORDER_1[est] = {}
                if key is None:
                    key = (name, _steps_of(cost))
                kinks = seen.get(key)
                if kinks == ():
                    mask = node.compared if node._compared_pending is None else compared(node)
                    if mask is None:
                        continue  # checked, smooth: nothing to do at this step
                    # a comparison first seen at a later step: remembered as a kink of this cost (hooked from now on)
                    kinks = seen[key] = (_COMPARISON + mask,)
            who = f"estimator {est.name!r} on plate {node.plate.name!r}"
            # the values it handed out, and the pre-images its transforms cached for them (Node.preimages: u of
            # z = t(u), AffineTransform / TanhTransform(cache_size=1)), which t.inv(z) and log_prob(z) return
            # instead of computing them from z: a cost of them is differentiated through the sample all the
            # same (round(t.inv(z)) gave a gradient of 1 for 2). The walk stops at each input, so the
            # transform between u and z (the rsample's business) is not walked for a cost of z
            inputs = [raw for raw, _ in node.handed] + list(node.preimages)
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
                                       through=_through(node), instead=_PATHWISE_INSTEAD)
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
                                       through=_through(node), instead=_PATHWISE_INSTEAD)
                    found.update(here)
                mask = compared(node)
                if mask is not None:
                    found[_COMPARISON + mask] = 1
                kinks = seen[key] = tuple(sorted(found))  # (after the check: a refused cost is checked again)
            if kinks:
                hooked = walks.setdefault("hooked", set()) if walks is not None else set()
                for root, _, _ in roots:
                    if id(root) not in hooked:  # (a downstream step's log p is a root of every later cost)
                        hooked.add(id(root))
                        _refuse_twice(root, lambda kinks=kinks: _kink_message(who, name, kinks))


def _through(node: Node) -> str:
    """The inputs of :func:`_check_smooth`'s walk, in words for require_smooth's message."""
    if not node.preimages:
        return "the reparameterised sample"
    return ("the reparameterised sample z (or the pre-image u of z = t(u) that its transforms cached, which "
            "t.inv(z) and log_prob(z) read)")


def _check_compared(name: str, nodes: list[Node], order: int) -> None:
    """At order >= 2: refuse a cost that carries the plate of a pathwise node whose sample was compared in user
    code in this step (``Node.compared``: the mask of ``torch.where(x > 0, x, 0)``, a kink the walk of the
    autograd graph cannot see: its Hessian came out 0). Called after :func:`_check_reaches`, whose refusal of a
    cost cut from the sample (by such a comparison) says more. Attribute reads where nothing was compared."""
    for node in nodes:
        if node.compared is not None or node._compared_pending is not None:
            mask = compared(node)
            if mask is not None:
                raise OrderError(_compared_message(node, name, mask, order))

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


def _kink_message(who: str, name: str, kinks: tuple, order: int = 1) -> str:
    masks = [k[len(_COMPARISON):] for k in kinks if k.startswith(_COMPARISON)]
    if masks:
        ops = tuple(k for k in kinks if not k.startswith(_COMPARISON))
        return (f"{who}: the cost {name!r} depends on a comparison ({', '.join(masks)}) of a value the reparameterised "
                "sample reaches (the mask of torch.where(x > 0, x, 0) or x * (x > 0)), whose result has no derivative: "
                "a piecewise function selected by it has a kink or jump there, and its pathwise derivatives of order "
                f">= 2 are biased (autograd sees the mask as a constant: the delta at the threshold is lost); {_AGAIN}. "
                f"{_SMOOTH_INSTEAD}" + (f". The path has other kinks too: {', '.join(ops)}" if ops else ""))
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


# a comparison of a value the sample reaches (Node.compared), among the kinks recorded for an order-1 cost
_COMPARISON = "comparison "

_SMOOTH_INSTEAD = (
    "Write that function smoothly (softplus, GELU, SiLU or tanh; a soft mask sigmoid((x - c) / t) instead of "
    "x > c), or use an estimator that does not differentiate through the sample for this node ('score', with "
    "baseline='leave_one_out'), which is unbiased at every order. A comparison whose result no cost uses (a "
    "metric, a check): compute it on the raw tensor, x.tensor.detach() (a plain tensor with the plate dims first, "
    "which storch does not see and which cannot be combined with plate tensors by accident), or after the step; "
    "x.detach() or torch.no_grad() is not enough (the mask of torch.where(x.detach() > 0, x, 0) is a kink too)")


def _compared_message(node: Node, name: str, mask: str, order: int) -> str:
    est = node.estimator
    p = node.plate.name
    return (
        f"estimator {est.name!r} on plate {p!r}: the order-{order} surrogate differentiates the cost {name!r} (it "
        f"carries the plate {p!r}) {order} times through the reparameterised sample, and in this step {mask} (a "
        "comparison, or another operation without a derivative: argmax, a bool or integer cast) was applied to a "
        "value computed from that sample (its autograd graph reaches it, or it is detached or made under "
        "torch.no_grad() and carries only the sample's plates): a mask such as the condition of "
        "torch.where(x > 0, x, 0), x * (x > 0).float(), torch.where(x.detach() > 0, x, 0) or "
        "torch.where(x > 0, x, 0.01 * x). Its result has no autograd history, so autograd "
        "differentiates the cost as if the mask were constant: the function it selects piecewise has a kink (or a "
        "jump) at the threshold, whose delta in the next derivative is lost, and the derivatives of order "
        f"{order} would be silently biased (the Hessian of E[relu(x)] written so came out exactly 0). Order 1 is "
        "unbiased for a function continuous at the threshold (storch.surrogate_loss(), storch.backward()). "
        "torch's own F.relu / leaky_relu / clamp are refused at order 2 the same way. " + _SMOOTH_INSTEAD)
