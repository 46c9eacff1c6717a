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
    :func:`parameters` are the parameter tensors a distribution was built from (the form given:
    ``probs`` or ``logits``), and :func:`rebuild` builds a distribution's class again from new parameter tensors, with the
    constructor arguments it keeps outside its arg_constraints (a Multinomial's ``total_count``);
    :func:`torch_class_hint` ends a refusal of a torch subclass with a constructor of its own that cannot be
    rebuilt or expanded (build the torch class itself).
    :func:`given_by_probs` says whether a ``Bernoulli`` / ``Categorical`` was built from ``probs``
    (its ``logits`` then come from clamped probabilities).
    :func:`rekey_transform_cache` lets ``log_prob`` of a value derived from a sample (detached, wrapped)
    reuse the pre-images a ``TransformedDistribution``'s caching transforms (``TanhTransform(cache_size=1)``)
    kept for the sample, instead of inverting a saturated tanh to infinity.
    :func:`rsample_max_order` is the derivative order to which autograd differentiates a distribution's
    ``rsample`` correctly (1 for torch's gamma family); ``Estimator.max_order_for`` lowers an
    estimator's order per node with it (the default, for estimators with ``requires_rsample``).
    :func:`rsample_kinks` finds the kinks and jumps inside a distribution's own ``rsample`` (between its
    parameters and a sample: a user's class or transform, ``AbsTransform``; torch's smooth classes are known
    by class, not walked), and :func:`note_rsample` lowers a node's order with them (a kink: 1, a jump: 0).
    An estimator with ``requires_rsample`` gets this for the value its ``proposal`` returns; one that hands out
    something else (LAX's detached ⊥x) calls ``note_rsample(node, x)`` on the rsample itself, best with the
    parameters taken before the draw where :func:`rsample_walked` says it is looked into:
    ``params = rsample_params(d)``, then ``note_rsample(node, x, d, params)`` after ``x = d.rsample(...)``.
    :func:`check_precision` refuses samples their dtype cannot resolve where an estimator's gradient reads
    their position (a Beta drawn at the float spacing of 1 by a concentration near 0, a Normal whose scale is
    below 12 float spacings at loc): the base class calls it for an estimator with ``score_function``, mvd for its points
    loc ± scale·w; call it in a proposal that reads the sample otherwise.
    :func:`moving_support` names the parameters that require grad and move a distribution's support
    (``Uniform``'s bounds, ``Pareto``'s scale): a score-function gradient misses the boundary term there,
    so an estimator with ``score_function`` refuses such a distribution.
    :func:`differentiated_total_count` says why an estimator that differentiates a ``Binomial``'s or
    ``NegativeBinomial``'s probabilities only (GO, mvd) cannot take one whose ``total_count`` is differentiated
    (that count would get no gradient, silently): refuse it in ``check_distribution`` and ``supports``.
    :func:`varying_total_count` says why an estimator that samples torch's ``enumerate_support`` without
    replacement (``unordered_set``, ``sum_and_sample``) cannot take a ``Binomial`` whose ``total_count``
    differs between entries (torch's ``enumerate_support`` refuses it): refuse it there too.
    :func:`same_support` says whether two supports are certainly the same set (an importance proposal
    and p, perturbed copies of p): where they may differ, an estimator must mask or refuse the values
    one of them cannot produce.

Random numbers:
    :func:`drawing_with` makes the random draws of a block use a generator (the per-graph
    generator of ``storch.Graph(generator=g)`` is ``storch.current_generator()``): a learned
    part built lazily inside a component initialises from it, so runs are reproducible.

Learned parts:
    :func:`learned_dtype` is the dtype to build a learned part's parameters in from its first input
    (the input's, but not a reduced precision that ``torch.autocast`` gave it), and to keep a running
    statistic in (score's moving average).
    :func:`refuse_lazy_build` refuses, with what to do, to build a learned part on first use where it
    cannot be built: in a step traced by ``storch.compile`` or under a ``torch.func`` transform.
    :func:`optimizer_step` is one step of the part's own optimizer (its state on the parameters' device,
    in float32 for float16 / bfloat16 parameters), rolled back where it overflows their dtype.
    :func:`warn_untrained_part` warns once that a part of an ``update=False`` estimator was built lazily in
    a training step (an optimizer built before it does not hold it).
    :func:`user_stacklevel` is the ``stacklevel`` at which a family's warning points at the user's line
    (skipping storch's, torch's and the family's own frames, whichever path led to it).
    :func:`own_optimizer`, :func:`hide_frozen_grads`, :func:`own_optimizer_state` and
    :func:`load_own_optimizer` keep an estimator's own Adam over every parameter of its learned part
    (frozen ones included, never stepped) and save and load its state matched by parameter name, so a
    checkpoint loads whatever is frozen when it is saved or loaded.
    :func:`state_record` (merged into ``get_extra_state()``) and :func:`check_state_record` (first in
    ``set_extra_state``) record which estimator saved a state, with the options that give it its meaning,
    and refuse (``storch.OptionError``) loading it into another estimator or one with other such options.

Baselines:
    :func:`leave_one_out` is the leave-one-out baseline of a node's samples from its cost frame.
    :func:`leave_one_out_log_baselines` are the per-draw baselines of a multi-sample bound
    -log (1/K Σ_k w_k) (VIMCO's: log w_k replaced by the mean of the others), from its K log-weights,
    with impossible draws (log w = -inf) handled; the first-party ``vimco`` uses it.

Smoothness (pathwise terms at order n >= 2):
    :func:`require_smooth` refuses (``storch.OrderError``) when an output is differentiated through
    a sample along an operation whose derivatives of order < n are not all continuous (ReLU, abs,
    clamp, max, sort...: the table :func:`nonsmooth_operations`). Autograd reports 0 for the delta such
    an operation has in its next derivative, so E[∇ⁿc(z)] = ∇ⁿE[c(z)] fails and a pathwise
    (relaxed, reparameterised) term is biased. A control variate calls it when
    ``cost.order >= 2`` (the frame's derivative order), as REBAR, RELAX and LAX do.

Differentiating the loss in an update:
    :func:`estimator_create_graph` (``with estimator_create_graph():``) marks an update's own
    ``torch.autograd.grad(loss, ..., create_graph=True)`` (training a learned part on the variance of the
    gradient, as RELAX, LAX and REBAR do), which the order-1 surrogate would otherwise refuse where an
    order-1 node (ARM, GO, ...) is in the loss: a backward pass with ``create_graph=True`` through such a
    node is how a user's second derivative of ``storch.surrogate_loss()`` starts.
    :func:`estimator_own_pass` (``with estimator_own_pass():``) marks an update's autograd pass that
    differentiates its own objective, not the loss (the gradient of Σ ĝ² in the control variate's
    parameters), and a control variate's own derivative of the cost (MuProp's ∇f(x̄) at an evaluation-only
    entry, in ``control_variate``): a user's gradient hook on a plate tensor (``register_hook``) is not run
    there.
    Both switch only the passes of the thread in the block (never another thread's); mark the outputs
    the pass starts from with the block's marker (``with estimator_own_pass() as own:
    torch.autograd.grad(own(objective), params)``) so that a CUDA backward, which runs its hooks in the
    autograd engine's threads, is the block's too.
    :func:`refuse_create_graph` marks a tensor of an estimator's term that the order-1 surrogate must not
    be differentiated twice through (a pathwise term whose output has a kink on the path from the sample,
    which :func:`require_smooth` returns at order 1): such a pass raises ``storch.OrderError``.
    :func:`is_differentiated` is the test of whether a tensor is being differentiated, in reverse mode
    (``requires_grad``) or forward mode (a ``torch.autograd.forward_ad`` / ``torch.func.jvp`` tangent, whose
    tensors do not require grad): use it, not ``requires_grad``, where a term is built or a check runs
    only for the parameters that are differentiated. :func:`unbatched` is the tensor a ``torch.func.vmap``
    batched tensor batches (a batched tensor reports ``requires_grad=False`` even where the tensor under it
    requires grad): ``is_differentiated(unbatched(t))`` reads a value computed under vmap as the backward pass
    outside it does (as :func:`grad_parameters` reads a distribution's parameters).

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
    ...         super().__init__(plate, n_samples)
    ...     def check_option(self, name, value):  # the constructor's check, and est.n_samples = v's
    ...         if name == "n_samples":
    ...             return options.integer(self.name, "n_samples", value, minimum=2)
    ...         return super().check_option(name, value)
    ...     def baseline(self, node, cost):
    ...         return leave_one_out(cost, node.n)
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, ContextManager, Iterable, Optional

import torch

from .estimators import validators as options  # public as storch.extending.options
from .graph.cost_frame import leave_one_out, leave_one_out_log_baselines
from .distributions import (base_distribution, differentiated_total_count, given_by_probs, grad_parameters, parameters,
                            rebuild, rekey_transform_cache, rsample_kinks, rsample_max_order, rsample_params,
                            rsample_walked, torch_class_hint, varying_total_count)
from .distributions import strict_support as _strict_support
from .errors import ASSUMPTIONS, StorchError
from .estimators.checks import check_precision, note_rsample
from .runtime.generators import drawing_with
from .graph import current_graph, is_tracing
from .plates.tensor import align, plates_of, raw_of
from .conditions.order_guard import estimator_create_graph, estimator_own_pass, is_differentiated, unbatched
from .estimators.own_optimizer import hide_frozen_grads, load_own_optimizer, own_optimizer, own_optimizer_state
from .estimators.own_optimizer import state_dtype as _step_dtype
from .estimators.state_record import check_state_record, state_record
from .conditions.score import moving_support, same_support
from .conditions.smoothness import nonsmooth_operations, require_smooth
from ._util.table_cache import table_cache
from ._util.stacklevel import user_stacklevel
from .surrogate import _refuse_twice

if TYPE_CHECKING:
    from .estimators.base import Estimator

__all__ = [
    "align", "plates_of", "raw_of", "base_distribution", "drawing_with", "leave_one_out", "options", "step_guard",
    "match_optimizer_state", "optimizer_step", "all_finite", "skip_nonfinite_update", "warn_untrained_part",
    "is_tracing", "assume", "strict_support", "rsample_max_order", "given_by_probs", "learned_dtype", "rebuild", "torch_class_hint", "parameters",
    "rekey_transform_cache", "require_smooth", "nonsmooth_operations", "moving_support", "same_support", "estimator_create_graph",
    "estimator_own_pass",
    "refuse_create_graph", "is_differentiated", "table_cache", "own_optimizer", "hide_frozen_grads", "own_optimizer_state",
    "load_own_optimizer", "refuse_lazy_build", "rsample_kinks", "rsample_walked", "rsample_params", "grad_parameters", "note_rsample",
    "check_precision", "unbatched",
    "state_record", "check_state_record", "differentiated_total_count", "varying_total_count",
    "leave_one_out_log_baselines", "user_stacklevel",
]


def refuse_create_graph(tensor: torch.Tensor, message: Callable[[], str]) -> None:
    """Refuse differentiating the order-1 surrogate twice through ``tensor``: a backward pass with
    ``create_graph=True`` that reaches it (``torch.autograd.grad(loss, params, create_graph=True)``,
    ``torch.autograd.functional.hessian`` / ``hvp``) raises ``storch.OrderError(message())``.

    For a tensor of a component's term through which a second derivative would be biased although the
    first is not: a pathwise term's output with a kink (ReLU, abs, max) on the path from the sample
    (what :func:`require_smooth` returns at order 1), as REBAR, RELAX and LAX hook the cost at the relaxed
    sample and the control-variate network's output. Call it at every step the tensor is built (a hook on
    this step's tensor); ``message`` is called only when the refusal is raised, so build the words there.
    A plain backward pass is not affected, nor an estimator's own ``create_graph=True`` pass inside
    :func:`estimator_create_graph`. Under ``torch.func``, two nested differentiating transforms raise at
    once, and so does one whose inputs (or captured tensors) require grad outside it (a gradient of its
    result, e.g. of a ``torch.func.jvp`` tangent, is a second derivative; detached inputs give first
    derivatives); a step traced by ``storch.compile`` hooks its replays' outputs the same way. A backward
    pass over forward-mode tangents (a ``torch.autograd.forward_ad`` dual that requires grad: forward-over-reverse,
    whose gradients' tangents are second derivatives) raises too, with or without ``create_graph``. A
    tensor that does not require grad is left alone."""
    _refuse_twice(tensor, message)


def strict_support(d: torch.distributions.Distribution, drawn_only: bool = False) -> torch.distributions.Distribution:
    """``d`` with ``log_prob = -inf`` on the values it never draws (probabilities given as exactly 0).

    torch computes ``log_prob`` of a ``Bernoulli``, ``Binomial``, ``Categorical`` or ``OneHotCategorical`` given by
    ``probs`` from clamped probabilities: a value of probability 0 gets log p = log(eps) although
    ``sample`` never draws it. An estimator with ``requires_enumerate_support`` gets its distributions
    through this already; call it where other code reads log-probabilities to decide which values exist
    (enumerating the support, sampling without replacement), so that such values are impossible as
    they are with ``-inf`` logits; so are a ``Categorical``'s finite logits whose probability underflows to 0
    (a ``-1e9`` mask). A ``Poisson`` with a rate of exactly 0 gets a ``log_prob`` with finite
    derivatives there (torch's are NaN: 0 / 0). Returns ``d`` itself when nothing changes; see
    ``storch.distributions.strict_support``.

    ``drawn_only=True`` where the caller reads log p only at values ``d`` drew (a score term at the sample), or
    values drawn by a distribution with the same underflowed logits (spsa reads each perturbed copy at its
    siblings' draws): a ``Categorical``'s underflowed logits are then left as they are (such a value is never
    drawn), which saves a softmax and a value read per call; the other copies (a ``Poisson``'s zero rate, infinite ``Bernoulli``
    logits, a ``Binomial``'s smooth log p) are made as without it.
    """
    return _strict_support(d, is_tracing(), drawn_only)


def assume(condition: torch.Tensor, message: str) -> None:
    """Record that ``condition`` (a boolean tensor, e.g. ``torch.isfinite(lp).all()``) must hold: a
    step traced by ``storch.compile`` checks it at every replayed call and raises a ``RuntimeError``
    with ``message`` where it fails (a ``storch.StorchError`` that is a ``RuntimeError`` too; ``torch._assert_async``: no host sync on a GPU, where the
    failure is reported at the next synchronisation). Eagerly it checks at once. Use it for what a
    traced path assumes in place of a value-dependent branch; say in ``message`` what to do instead."""
    ASSUMPTIONS.add(message)  # (storch.compile re-raises the failure as a StorchError with this message)
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

    Also the dtype to keep a running statistic of ``x`` in (score's moving average of the costs): in
    bfloat16 an average near 100 moves in steps of half a unit, so (1 - decay)·(cost - average) rounds away
    and the average stops following the costs.
    """
    dtype = x.dtype
    # (itemsize, not torch.finfo: this runs per estimator per step, and finfo costs ~3.5 us a call)
    if dtype.is_floating_point and dtype.itemsize < 4:
        return torch.promote_types(dtype, torch.get_default_dtype())
    return dtype


def refuse_lazy_build(what: str, width: str) -> None:
    """Raise ``storch.StorchError`` where a learned part built on first use cannot be built now: in a step
    that ``storch.compile`` traces (its parameters' creation would be recorded and replayed at every call),
    and under a ``torch.func`` transform (``grad``, ``jvp``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``,
    ``vmap``), which cannot create parameters (torch's own errors, "mutating directly with `.data` inside
    functorch transform" or vmap's "Cannot ask for different inplace randomness on an unbatched tensor",
    name neither the part nor what to do). Call it just before building the part.

    Args:
        what: the part (``"score's learned baseline's network for cost 'c'"``).
        width: what its input width is (``"h's"``, ``"the sample's"``).
    """
    if is_tracing():
        raise StorchError(
            f"storch.compile: {what} is built on first use (its input width is {width}), which a traced step "
            "cannot do. Run one step eagerly first (or load a state_dict that holds the network), then call the "
            "compiled step")
    if torch._C._functorch.maybe_current_level() is not None:  # torch.func.grad / jvp / vmap / jacrev
        raise StorchError(
            f"{what} is built on first use (its input width is {width}), and a torch.func transform "
            "(torch.func.grad, jvp, jacrev, jacfwd, hessian, vmap) cannot create parameters inside it. Build the "
            "learned part with one step outside the transform first (or load a state_dict that holds the "
            "network), then call it under torch.func")


def match_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Move an estimator's own optimizer state to its parameters' dtype and device, in place: the
    parameters' dtype, but at least float32 (the state of a float16 / bfloat16 parameter stays float32, and
    :func:`optimizer_step` steps it in float32).

    ``est.to(...)``, ``.double()`` or ``.cuda()`` (or the model's, with the estimator a submodule)
    converts the parameters but not the state of an optimizer the estimator keeps (Adam's moments
    of a learned baseline or control variate), and the next ``optimizer.step()`` fails with a dtype
    or device mismatch. Call this before each step (a loop over the parameters; nothing is copied
    when they match), or use :func:`optimizer_step`, which calls it. ``"step"`` counters stay as they
    are, as ``Optimizer.load_state_dict`` leaves them.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue
            dtype = _step_dtype(p)
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor) and (
                        (value.is_floating_point() and value.dtype != dtype) or value.device != p.device):
                    state[key] = value.to(dtype=dtype if value.is_floating_point() else value.dtype,
                                          device=p.device)


def optimizer_step(owner: Estimator, optimizer: torch.optim.Optimizer, part: str) -> bool:
    """One step of an estimator's own optimizer (Adam of a learned baseline or control variate) on its
    parameters' ``.grad``, after :func:`match_optimizer_state`; whether it was taken.

    A parameter in reduced precision (``model.half()`` with the estimator a submodule, ``est.bfloat16()``)
    is stepped in float32: its ``.grad`` and value are raised to float32 for the step, the optimizer's
    state stays float32, and the result is rounded back to the parameter's dtype. torch's Adam on float16
    state wrote NaN into the parameters: the second moment (~1e-12 for a regression that has converged)
    underflows to 0 while the first does not, and ``eps=1e-8`` is 0 in float16, so the step divided by
    zero. The estimator keeps training in the dtype the user chose, as mixed precision keeps optimizer
    state in float32; no float32 master copy of the parameters is kept (state a user could not see or
    load into a model), so an update smaller than the parameter's precision is lost (Adam's steps are
    ~``lr``, 1e-2 by default: float16 resolves them for parameters up to ~20 in magnitude).

    A step whose rounded result is not finite (it overflows the parameter's dtype) is rolled back:
    parameters and optimizer state as before, counted in ``owner.skipped_updates`` with a
    ``RuntimeWarning`` naming ``part`` (as :func:`skip_nonfinite_update`); it returns False. Only
    reduced-precision parameters are checked (one host sync then, none on the ``meta`` device): in
    float32 or float64, a step from finite gradients and state is finite.
    """
    match_optimizer_state(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    low = [p for p in params if p.dtype != _step_dtype(p)]
    if not low:
        optimizer.step()
        return True
    # what a rolled-back step restores: every parameter's state (Adam's "step" counter is a tensor it
    # increments in place), and the values of the parameters the step changes in place
    before = {p: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
              for p in params if optimizer.state.get(p)}
    values = [(p, p.detach().clone()) for p in params if p.dtype == _step_dtype(p)]
    kept = [(p.data, p.grad) for p in low]
    for p in low:
        p.data = p.data.to(_step_dtype(p))  # the same Parameter (the optimizer's key), in float32
        p.grad = None if p.grad is None else p.grad.to(p.dtype)
    try:
        optimizer.step()
        stepped = [p.data for p in low]
    finally:
        for p, (data, grad) in zip(low, kept):
            p.data, p.grad = data, grad
    rounded = [value.to(data.dtype) for value, (data, _) in zip(stepped, kept)]
    finite = all_finite(rounded)
    if not finite.is_meta and not bool(finite):
        for p in params:
            optimizer.state.pop(p, None)
            if p in before:
                optimizer.state[p] = before[p]
        with torch.no_grad():
            for p, value in values:
                p.copy_(value)
        _count_skip(owner, f"{part}'s parameters would not be finite in {low[0].dtype} after this update",
                    "the step overflows their dtype; ", part,
                    "Keep the estimator's learned parts in float32 (e.g. est.float() after model.half()), or lower "
                    "its lr")
        return False
    with torch.no_grad():
        for value, (data, _) in zip(rounded, kept):
            data.copy_(value)  # in place: the parameter's storage stays the one the model holds
    return True


def warn_untrained_part(owner: Optional[Estimator], who: str, part: str, parameters: str, own: str,
                        stacklevel: Optional[int] = None) -> None:
    """Warn once per estimator that a learned part was built lazily in a training step of an ``update=False``
    estimator (the user trains it): an optimizer built before this step (as usual) does not hold it, so it
    would never be trained. Not for a build in an evaluation pass (grad off: the recipe the message gives),
    nor for an estimator that trains its parts itself (``owner.update``).

    Args:
        owner: the estimator (``None``: a part used without one; nothing to warn).
        who: how the message names the estimator (``"relax (plate 'z')"``).
        part: what was built (``"its default control-variate network"``).
        parameters: the expression that gives its parameters (``"est.network.parameters()"``).
        own: the option that takes the user's own module instead (``"network="``).
        stacklevel: where the warning points; ``None`` (the default): the user's line (:func:`user_stacklevel`,
            which skips the estimator's family code under its method: a fixed level pointed into the family or
            into storch, depending on how deep the family's call was).
    """
    if owner is None or owner.update or getattr(owner, "_warned_lazy", False) or not torch.is_grad_enabled():
        return
    owner._warned_lazy = True
    warnings.warn(
        f"{who}: update=False, and {part} was built now, at its first use in a training step. An optimizer you "
        f"built before this step does not hold its parameters ({parameters}), so they would never be trained. "
        "Build it before you create your optimizer: one evaluation pass first (under torch.no_grad(): your model's "
        "forward with every cost, storch.surrogate_loss(), storch.reset()), or load a state_dict that holds it; or "
        f"pass {own} your own module; or add it to your optimizer now: opt.add_param_group({{'params': "
        f"{parameters}}})", RuntimeWarning, stacklevel=user_stacklevel() if stacklevel is None else stacklevel)


def all_finite(tensors: Iterable[Optional[torch.Tensor]]) -> torch.Tensor:
    """Whether every tensor in ``tensors`` (``None`` left out) is finite, as one boolean tensor.

    No host sync: compute it with an update's loss and gradients (reduce it over ranks where they are)
    and let :func:`skip_nonfinite_update` read it once. True for no tensors.
    """
    flags = [torch.isfinite(t).all() for t in tensors if t is not None]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


def skip_nonfinite_update(owner: Estimator, finite: torch.Tensor, part: str, objective: str, advice: str) -> bool:
    """Whether an estimator's learned part must skip this optimizer step: ``finite`` (e.g. :func:`all_finite`
    of the step's loss and gradients) is False. Then it counts the skip in ``owner.skipped_updates`` and says
    so in a ``RuntimeWarning``; the caller returns before the step, so the parameters and the optimizer state
    stay as they were (docs/reliability.md, "Non-finite costs").

    A finite surrogate (``storch.backward()`` checked it) can still give a training loss that overflows
    (a squared error or Σ ĝ² of large costs, reduced precision): one Adam step with it would write NaN into
    the learned part for good, and every later step's surrogate would be NaN although the costs are finite.
    ``part`` names the learned part as the message should (``"the baseline"``), ``objective`` its loss
    (``"regression"``), ``advice`` what to check. One host sync (``bool(finite)``).
    """
    if finite.is_meta or bool(finite.all()):  # meta: shapes only, no values to check; the step runs on shapes
        return False
    _count_skip(owner, f"{part}'s {objective} loss or gradients are not finite", "NaN or inf; ", part, advice)
    return True


def _count_skip(owner: Estimator, what: str, why: str, part: str, advice: str) -> None:
    # the count and the warning of a skipped update (docs/reliability.md, "Non-finite costs")
    owner.skipped_updates += 1
    warnings.warn(
        f"{owner.name} (plate {owner.plate!r}): {what} ({why}{owner.skipped_updates} update(s) skipped so far): this "
        f"update was skipped, {part}'s parameters and optimizer state are unchanged. {advice}",
        RuntimeWarning, stacklevel=user_stacklevel())  # (a fixed 4 pointed into storch's call of the family)
