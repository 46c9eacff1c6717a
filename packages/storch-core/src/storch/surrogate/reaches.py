"""A pathwise node's cost that reaches the sample at all (``_check_reaches``): a cost that carries the node's plate but
whose autograd graph does not reach the sample (a comparison, ``.long()``, ``detach``) is refused, its pathwise
gradient silently 0; so is a threshold of a ``jump_free`` estimator's relaxed sample (REBAR, RELAX).
``_REACH_KEY`` keeps, on the estimator, the cost names checked (``None``: never pathwise, ``_pathwise``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Categorical, OneHotCategorical

from ..distributions import base_distribution, grad_parameters
from ..errors import OrderError
from ..graph.node import Node
from ..plates.tensor import raw_of
from ..conditions.smoothness import _reaches


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
        "torch.where, detach(), or a cost computed under torch.no_grad(); or a tensor made from the sample's shape "
        "alone, torch.zeros_like(z) or ones_like(z), which carries the plate without reading z: a prior "
        "Normal(zeros_like(z), ones_like(z)) in an analytic kl_divergence(q, prior) is one; build such a constant "
        "without the sample, Normal(torch.zeros(d), torch.ones(d))). Use a score-function estimator for "
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
    (estimators.first_steps._sample_node's watch): its log_prob of that sample."""
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
