"""What a pathwise node (one whose gradient flows through the sample it handed out) needs of a cost.

A smooth path (``_check_smooth``): no jump on the path from the sample to the cost at order 1, no kink at
order >= 2 (storch.smoothness), an order-1 surrogate whose cost has a kink hooked against a second derivative.
A path at all (``_check_reaches``): a cost that carries the node's plate but whose autograd graph does not reach
the sample (a comparison, ``.long()``, ``detach``) is refused, its pathwise gradient silently 0.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.distributions import Categorical, OneHotCategorical

from .. import smoothness
from .._order_guard import forward_level_open, has_tangent, is_differentiated, unbatched, unwrapped
from ..distributions import base_distribution, grad_parameters
from ..errors import OrderError
from ..estimators.watch import compared, is_pathwise
from ..node import Node
from ..plates.integer_reads import MARKS, record_of
from ..plates.tensor import plates_of, raw_of
from ..score_conditions import smooth_log_prob_parameters
from ..smoothness import _reaches, require_smooth
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
    (storch.smoothness). At order >= 2, a kink (ReLU, abs, clamp, max) or a jump, at every surrogate; at
    order 1 only a jump (round, sign, floor, nearest grid_sample: the pathwise gradient is 0 where the
    expectation's is not), checked at the first step of each estimator, cost name and partition step of
    the cost (a walk of the cost's graph per step would cost the common case time; a model's operations
    rarely change between steps; an episode's costs of one name differ per step). That walk also records
    the kinks: an order-1 surrogate whose cost has one is refused when it is differentiated again (its
    cost hooked: :mod:`storch._order_guard`); so is one whose node's sample was compared in user code in a step
    (``Node.compared``, :func:`storch.estimators.watch.compared`: the mask of ``torch.where(x > 0, x, 0)``, a kink
    outside the autograd graph; at order >= 2 :func:`_check_compared` refuses it). ``memos``: per pathwise node, what the walks of this
    surrogate learned (:class:`storch.smoothness.PathMemo`): each autograd node is expanded once."""
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
        if (not _reaches([raw_of(cost)], handed) and not _reaches_preimages(node, cost)
                and not _explained(node, nodes, handed)):
            raise OrderError(_cut_message(node, name))
        if seen != ():  # (undecided: checked, not recorded; asked again at the next step)
            seen.add(name)


def _reaches_preimages(node: Node, cost) -> bool:
    """Whether the cost reaches a pre-image that the distribution's transforms cached for a handed-out value
    (Node.preimages: the pre-tanh sample u of a = tanh(u), TanhTransform(cache_size=1)). ``q.log_prob(a)`` of
    the value handed out (SAC's entropy term as a cost of its own) is computed from u, upstream of a, so its
    graph never reaches a; it is log q(a) all the same, a function of the sample differentiated along u =
    q's inverse of a, so its pathwise gradient is right. A value that is not the cached one (``a.detach()``,
    a copy) is inverted afresh, and does not reach u. Asked only where the cost does not reach the sample."""
    pre = [x for x in node.preimages if x.requires_grad]
    return bool(pre) and _reaches([raw_of(cost)], pre)


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
        "differentiable in the relaxed sample: e.g. sigmoid((z - c) / t) instead of (z > c).float(); a term that "
        "stops gradients on purpose, such as a VQ-VAE's commitment loss ((e - q.detach())**2 with q = z @ C), "
        "detaches the parameters instead of the sample: ((e - z @ C.detach())**2)). A cost "
        "that is not meant to train this node (a metric, another model's loss) can be added with "
        "storch.add_cost(..., credit=False): that removes the score-function credit (no MagicBox, no control "
        "variate), and the cost is differentiated as written, so a differentiable path from the sample (or the "
        "node's parameters) to it still carries gradient; a cost that must give the node no gradient at all is "
        "computed from detached inputs (z.detach())"
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
        "cast, signbit, a finiteness test of a value not finite somewhere in this step, a count such as histc or "
        "count_nonzero, frexp) was applied to a value that carries the gradient of the node's sample. "
        f"{est.name!r} differentiates the cost through that sample (REBAR and RELAX: the cost at the relaxed sample "
        "σ_λ(z), in their control variate η f(σ_λ(z))): a threshold such as m > 0.5 makes that relaxed cost jump, autograd sees no "
        "derivative of the jump (its result is a bool, outside the autograd graph), so the control variate no "
        "longer cancels and the gradient is silently biased (only the smooth terms' gradient is left). Use an "
        "estimator that does not differentiate the cost through the sample for this node: 'score' (with "
        "baseline='leave_one_out'), 'arm', 'disarm' or 'unordered_set'; or write the cost without thresholding "
        "the sample: multiply by it (m * a, m * x + (1 - m) * y: on the hard sample it is the same mask, on the "
        "relaxed one it is continuous), and for a piecewise function that is continuous at its threshold "
        "(torch.where(h > 0, h, 0.01 * h)) use torch's own (F.leaky_relu). A comparison whose result no cost "
        "uses (a metric): compute it on the raw tensor, m.tensor.detach() (a plain tensor with the plate dims first), "
        "or after the step; m.detach() or torch.no_grad() is not enough (the mask of torch.where(m.detach() > 0.5, "
        "a, b) feeds the cost all the same)")
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


