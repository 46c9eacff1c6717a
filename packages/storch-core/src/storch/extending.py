"""The public API for estimator authors: the helpers storch's own estimator families use.

An estimator package (first- or third-party) imports only ``storch``, ``storch.extending`` and
``storch.testing``; the import contract of ``tox -e lint`` checks it for the first-party families.
What is here is stable like ``storch``'s own names. Besides these helpers, the base class
:class:`storch.Estimator` offers the methods a subclass calls: ``draw`` (``rsample`` or
``sample``, as the estimator requires), ``supports`` / ``check_distribution`` (the capability
check), and for partitions with an end-of-sequence value ``eos_value``, ``is_eos`` and
``mask_after_eos``.

Plate tensors across steps:
    :func:`align` lines a raw tensor up from one tuple of plates to another (by plate name: a
    permute/unsqueeze view; at a later step of a partition it follows the parent indices), e.g.
    a network's output computed on ``node.parents`` aligned to a cost frame's plates.
    :func:`plates_of` and :func:`raw_of` read a value that may or may not be a plate tensor.

Distributions:
    :func:`base_distribution` is the distribution under one ``Independent`` wrapper, the one
    that holds the parameters (only ``Independent``, once: a ``LogNormal`` is not a ``Normal``).
    :func:`strict_support` gives values of probability exactly 0 (``probs`` with zeros) the
    log-probability ``-inf`` that torch's clamped ``log_prob`` does not (estimators with
    ``requires_enumerate_support`` get their distributions through it already), so that a sample never
    holds a value the model cannot produce.
    :func:`given_by_probs` says whether a ``Bernoulli`` / ``Categorical`` was built from ``probs``
    (its ``logits`` then come from clamped probabilities).
    :func:`rsample_max_order` is the derivative order to which autograd differentiates a distribution's
    ``rsample`` correctly (1 for torch's gamma family); ``Estimator.max_order_for`` lowers an
    estimator's order per node with it (the default, for estimators with ``requires_rsample``).

Random numbers:
    :func:`drawing_with` makes the random draws of a block use a generator (the per-graph
    generator of ``storch.Graph(generator=g)`` is ``storch.current_generator()``): a learned
    part built lazily inside a component initialises from it, so runs are reproducible.

Learned parts:
    :func:`learned_dtype` is the dtype to build a learned part's parameters in from its first input
    (the input's, but not a reduced precision that ``torch.autocast`` gave it).

Baselines:
    :func:`leave_one_out` is the leave-one-out baseline of a node's samples from its cost frame.

Smoothness (pathwise terms at order n >= 2):
    :func:`require_smooth` refuses (``storch.OrderError``) when an output is differentiated through
    a sample along an operation whose derivatives of order < n are not all continuous (ReLU, abs,
    clamp, max, sort...: the table :func:`nonsmooth_operations`). Autograd reports 0 for the delta such
    an operation has in its next derivative, so E[∇ⁿc(z)] = ∇ⁿE[c(z)] fails and a pathwise
    (relaxed, reparameterised) term is biased. A control variate calls it when
    ``cost.order >= 2`` (the frame's derivative order), as REBAR, RELAX and LAX do.

Options:
    :mod:`options` (``storch.extending.options``) checks constructor options once, with errors
    that name the option, the value and what is accepted: ``integer``, ``number``, ``flag``,
    ``choice``, ``optional_index``.

Tracing:
    :func:`is_tracing` says whether ``storch.compile`` is recording the step. A component that picks
    its path by values (``bool(tensor)``, ``.item()``: "are all values possible?") cannot be traced;
    while tracing it takes a path whose operations do not depend on the values (with the same
    distribution), and guards what that path assumes with :func:`assume`, which the replayed
    program checks at every call. An estimator that updates its own state lets a compiled step
    replay the update by setting ``replays_update`` and implementing ``update_inputs``,
    ``update_from`` and ``state_tensors`` (methods of :class:`storch.Estimator`; see
    docs/writing-an-estimator.md, "An update that storch.compile replays").

Steps:
    :func:`step_guard` (``with step_guard():``) discards the current graph's step when its block
    raises, as every storch call does, so an error in code that an estimator runs outside its
    components never leaks the step's nodes into the next step.

Example:
    >>> import storch
    >>> from storch.extending import base_distribution, leave_one_out, options
    >>> class MyScore(storch.Estimator):
    ...     name = "my_score"
    ...     def __init__(self, plate, n_samples=4):
    ...         super().__init__(plate, options.integer(self.name, "n_samples", n_samples, minimum=2))
    ...     def baseline(self, node, cost):
    ...         return leave_one_out(cost, node.n)
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, ContextManager, Mapping, Optional, Sequence, Union

import torch

from . import options
from .cost import leave_one_out
from .distributions import base_distribution, given_by_probs, rsample_max_order
from .distributions import strict_support as _strict_support
from .errors import OrderError
from .generators import drawing_with
from .graph import current_graph, is_tracing
from .plates.tensor import align, plates_of, raw_of

__all__ = [
    "align", "plates_of", "raw_of", "base_distribution", "drawing_with", "leave_one_out", "options", "step_guard",
    "match_optimizer_state",
    "is_tracing", "assume", "strict_support", "rsample_max_order", "given_by_probs", "learned_dtype",
    "require_smooth", "nonsmooth_operations",
]


def strict_support(d: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """``d`` with ``log_prob = -inf`` on the values it never draws (probabilities given as exactly 0).

    torch computes ``log_prob`` of a ``Bernoulli``, ``Binomial``, ``Categorical`` or ``OneHotCategorical`` given by
    ``probs`` from clamped probabilities: a value of probability 0 gets log p = log(eps) although
    ``sample`` never draws it. An estimator with ``requires_enumerate_support`` gets its distributions
    through this already; call it where other code reads log-probabilities to decide which values exist
    (enumerating the support, sampling without replacement), so that such values are impossible as
    they are with ``-inf`` logits. Returns ``d`` itself when nothing changes; see
    ``storch.distributions.strict_support``.
    """
    return _strict_support(d, is_tracing())


def assume(condition: torch.Tensor, message: str) -> None:
    """Record that ``condition`` (a boolean tensor, e.g. ``torch.isfinite(lp).all()``) must hold: a
    step traced by ``storch.compile`` checks it at every replayed call and raises a ``RuntimeError``
    with ``message`` where it fails (``torch._assert_async``: no host sync on a GPU, where the
    failure is reported at the next synchronisation). Eagerly it checks at once. Use it for what a
    traced path assumes in place of a value-dependent branch; say in ``message`` what to do instead."""
    torch._assert_async(condition, message)


def step_guard() -> ContextManager[None]:
    """``with step_guard():`` discard the current graph's step if the block raises (the error propagates).

    The same guard runs around every storch call that can fail during a step (an estimator call,
    ``add_cost``, ``denote_independent``, ``surrogate_loss``, ``storch.estimator``).
    """
    return current_graph().guard()


def learned_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the parameters of a learned part (a baseline's or control variate's network) built
    lazily from its first input ``x``: ``x``'s dtype (float32, or float64 for a model converted with
    ``.double()``), but at least ``torch.get_default_dtype()``.

    A reduced-precision input (bfloat16, float16) is usually ``torch.autocast``'s, and the part may be
    built outside the autocast block (by the surrogate, in ``storch.backward()``): parameters in that
    precision would stay so after autocast ends (a later step without autocast failed with a dtype
    mismatch) and its optimizer would step reduced-precision weights. Mixed precision keeps the weights
    in full precision; so does this. Call the part on ``x.to(dtype)`` when the dtypes differ.
    """
    dtype = x.dtype
    if dtype.is_floating_point and torch.finfo(dtype).bits < 32:
        return torch.promote_types(dtype, torch.get_default_dtype())
    return dtype


def match_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Move an estimator's own optimizer state to its parameters' dtype and device, in place.

    ``est.to(...)``, ``.double()`` or ``.cuda()`` (or the model's, with the estimator a submodule)
    converts the parameters but not the state of an optimizer the estimator keeps (Adam's moments
    of a learned baseline or control variate), and the next ``optimizer.step()`` fails with a dtype
    or device mismatch. Call this before each step (a loop over the parameters; nothing is copied
    when they match). ``"step"`` counters stay as they are, as ``Optimizer.load_state_dict`` leaves
    them.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor) and (
                        value.dtype != p.dtype or value.device != p.device):
                    state[key] = value.to(dtype=p.dtype if value.is_floating_point() else value.dtype,
                                          device=p.device)


def _clamp_order(node) -> Optional[int]:
    """A clamp whose bounds are numerical guards is not counted: a probability clamped to [eps, 1 - eps] of its
    dtype (torch.distributions' ``clamp_probs`` for a Bernoulli or Categorical given by ``probs``, the
    relaxations' conditional noise), a logit clamped at magnitude >= -3 log eps (47.7 in float32: a
    probability of e^-47.7; the relaxations' finite logits). They are active only where a probability is
    within eps of 0 or 1. Any other clamp (``clamp(min=0)``, ``clamp(-1, 1)``) is a kink: 1."""
    lo, hi = getattr(node, "_saved_min", None), getattr(node, "_saved_max", None)
    try:
        dtype = node._saved_self.dtype
    except (AttributeError, RuntimeError):
        return 1
    if not dtype.is_floating_point:
        return 1
    eps = torch.finfo(dtype).eps
    far = -3.0 * math.log(eps) * (1 - 1e-6)

    def guard(bound, probability: float) -> bool:
        return bound is None or bound == probability or (isinstance(bound, float) and abs(bound) >= far)

    return None if (lo is not None or hi is not None) and guard(lo, eps) and guard(hi, 1 - eps) else 1


def _elu_order(node) -> int:
    """ELU's first derivative is continuous at 0 when α · input_scale = 1 (ELU with α = 1, CELU): 2; else
    (SELU, ELU with another α) it is a kink: 1."""
    alpha, input_scale = getattr(node, "_saved_alpha", None), getattr(node, "_saved_input_scale", None)
    return 2 if isinstance(alpha, float) and alpha * float(input_scale or 1) == 1.0 else 1


# the table of nonsmooth_operations() (see there)
_NONSMOOTH: Mapping[str, Union[int, Callable[[object], Optional[int]]]] = MappingProxyType({
    # kinks (k = 1): activations
    "ReluBackward0": 1, "ThresholdBackward0": 0, "ThresholdBackward1": 0,  # F.threshold may jump
    "LeakyReluBackward0": 1, "LeakyReluBackward1": 1, "PreluKernelBackward0": 1,
    "RreluWithNoiseBackward0": 1, "RreluWithNoiseBackward1": 1, "RreluWithNoiseFunctionalBackward0": 1,
    "HardtanhBackward0": 1,  # hardtanh, relu6
    "HardswishBackward0": 1, "HardsigmoidBackward0": 1, "SoftshrinkBackward0": 1, "HardshrinkBackward0": 0,
    "EluBackward0": _elu_order, "EluBackward1": _elu_order, "CeluBackward0": 2, "CeluBackward1": 2,
    # kinks: clamp, abs, elementwise max/min
    "ClampBackward0": 1, "ClampBackward1": _clamp_order, "ClampMinBackward0": 1, "ClampMinBackward1": 1,
    "ClampMaxBackward0": 1, "ClampMaxBackward1": 1, "AbsBackward0": 1,
    "MaximumBackward0": 1, "MinimumBackward0": 1, "FmaxBackward0": 1, "FminBackward0": 1,
    # reductions and selections by value: which entry is taken changes with the values
    "MaxBackward0": 1, "MaxBackward1": 1, "MinBackward0": 1, "MinBackward1": 1, "AmaxBackward0": 1,
    "AminBackward0": 1, "AminmaxBackward0": 1, "SortBackward0": 1, "SortBackward1": 1, "TopkBackward0": 1,
    "KthvalueBackward0": 1, "MedianBackward0": 1, "MedianBackward1": 1, "NanmedianBackward0": 1,
    "NanmedianBackward1": 1, "ModeBackward0": 1, "CummaxBackward0": 1, "CumminBackward0": 1,
    "MaxPool2DBackward0": 1, "MaxPool2DWithIndicesBackward0": 1, "MaxPool3DWithIndicesBackward0": 1,
    "AdaptiveMaxPool2DBackward0": 1, "AdaptiveMaxPool3DBackward0": 1, "FractionalMaxPool2DBackward0": 1,
    "FractionalMaxPool3DBackward0": 1,
    # losses with kinks; smooth_l1's beta is not saved (beta = 0 is l1): counted as a kink
    "SmoothL1LossBackward0": 1, "HuberLossBackward0": 2, "MultiMarginLossBackward0": 1,
    "MultilabelMarginLossBackward0": 1,
    # jumps (k = 0)
    "SignBackward0": 0, "SgnBackward0": 0, "RoundBackward0": 0, "RoundBackward1": 0, "FloorBackward0": 0,
    "CeilBackward0": 0, "TruncBackward0": 0, "FracBackward0": 0, "FmodBackward0": 0, "FmodBackward1": 0,
    "RemainderBackward0": 0, "RemainderBackward1": 0,
})


def nonsmooth_operations() -> dict[str, Union[int, Callable[[object], Optional[int]]]]:
    """The autograd operations :func:`require_smooth` looks for: ``type(tensor.grad_fn).__name__`` -> the
    order k of the operation's first discontinuous derivative (0: the value jumps, as ``sign``; 1: a kink,
    as ReLU's), or a function of the autograd node giving k (``None``: not counted; clamps to the
    numerical guards [eps, 1 - eps] of probabilities, ELU whose first derivative is continuous).
    Differentiating n > k times through one of them loses the delta of its (k+1)-th derivative.

    ``torch.where`` is not listed: its condition is not in the autograd graph, so a selection by data
    (or by a downstream node's discrete sample, which that node's estimator accounts for) cannot be
    told from one by the values differentiated. Decompositions show as their parts (``softsign`` and
    ``l1_loss`` as ``AbsBackward0``, ``hinge_embedding_loss`` as ``ClampMinBackward0``);
    ``smooth_l1_loss`` counts as a kink (its beta is not saved; ``huber_loss``'s delta is: C¹).
    A copy: changing it changes nothing.
    """
    return dict(_NONSMOOTH)


def _nonsmooth_on_path(output: torch.Tensor, inputs: Sequence[torch.Tensor], order: int) -> dict[str, int]:
    """{name: k} of the operations of nonsmooth_operations() with k < ``order`` that lie on a path from one of
    ``inputs`` to ``output`` in the autograd graph: one memoised walk from ``output.grad_fn`` down to
    the inputs (not below them: what made the inputs is not on such a path)."""
    root = output.grad_fn
    if root is None:
        return {}
    targets = {t.grad_fn for t in inputs if t.grad_fn is not None}
    leaves = {id(t) for t in inputs if t.grad_fn is None and t.requires_grad}  # their AccumulateGrad nodes
    if not targets and not leaves:
        return {}
    table = _NONSMOOTH
    found: dict[str, int] = {}
    reaches: dict = {}  # autograd node -> whether it reaches an input
    stack = [(root, False)]
    while stack:  # iterative post-order (graphs of long episodes are deeper than Python's recursion)
        fn, expanded = stack.pop()
        if expanded:
            r = any(reaches.get(m, False) for m, _ in fn.next_functions if m is not None)
            reaches[fn] = r
            if r:
                name = type(fn).__name__
                k = table.get(name)
                if k is not None and not isinstance(k, int):
                    k = k(fn)
                if k is not None and k < order:
                    found[name] = min(k, found.get(name, k))
            continue
        if fn in reaches:
            continue
        if fn in targets or (leaves and id(getattr(fn, "variable", None)) in leaves):
            reaches[fn] = True
            continue
        stack.append((fn, True))
        stack.extend((m, False) for m, _ in fn.next_functions if m is not None and m not in reaches)
    return found


def require_smooth(output: torch.Tensor, inputs: Sequence[torch.Tensor], order: int, *, who: str, what: str,
                   through: str, instead: str = "an estimator that does not differentiate through the "
                   "sample, e.g. 'score'") -> None:
    """Refuse to differentiate ``output`` ``order`` times through ``inputs`` along a non-smooth operation.

    A pathwise term E[∇ⁿc(z)] equals ∇ⁿE[c(z)] only when c's derivatives of order < n are continuous in
    z. Autograd differentiates ReLU (abs, clamp, max, sort, ...) as if its next derivative had no
    delta, so with a continuous z such a term is silently biased from the order at which that
    delta is lost (order 2 for a kink, order 1 for a jump). This walks the autograd graph of
    ``output`` once (memoised, down to ``inputs``) and raises if an operation of
    :func:`nonsmooth_operations` whose first discontinuous derivative has order < ``order`` lies on a path
    from one of ``inputs`` to ``output``. Operations on other paths (a ReLU of the parameters alone)
    are fine. The walk is Python over the graph's nodes: call it only at order >= 2
    (``cost.order >= 2`` in a control variate), where a kink matters.

    Args:
        output: what is differentiated (a cost with its graph, a control variate network's output).
        inputs: the samples it is differentiated through (tensors of its graph: their ``grad_fn``,
            or leaves).
        order: the derivative order (``cost.order``).
        who: the estimator and node, e.g. ``"estimator 'rebar' on plate 'z'"``.
        what: the output, e.g. ``"the cost 'rec'"``.
        through: the inputs, e.g. ``"the relaxed sample σ_λ(z)"``.
        instead: the alternative estimator to suggest.

    Raises:
        OrderError: naming ``who``, ``what``, the operations found and what to do.
    """
    found = _nonsmooth_on_path(output, inputs, order)
    if not found:
        return
    ops = ", ".join(f"{name} (its derivative of order {k} is discontinuous)" for name, k in sorted(found.items()))
    lowest = min(found.values())
    lower = (f"differentiate at most {lowest} time(s) (storch.surrogate_loss(order={lowest})), " if lowest >= 1
             else "")
    raise OrderError(
        f"{who}: the order-{order} surrogate differentiates {what} {order} times through {through}, which is "
        f"unbiased only if it is {order} times differentiable there (E[∇ⁿc(z)] = ∇ⁿE[c(z)] needs the "
        f"derivatives of order < {order} to be continuous). On a path from {through} to it the autograd graph "
        f"holds {ops}: autograd reports 0 for the delta in the next derivative, so the estimate would be biased. "
        "Use smooth operations on that path (an activation such as softplus, GELU, SiLU or tanh instead of "
        "ReLU / leaky_relu / hardtanh / clamp; logsumexp instead of max); or "
        f"{lower.replace(', ', '; or ')}use {instead} for this node")
