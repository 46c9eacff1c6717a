"""When the score-function identity holds for a distribution: a support that stays put, a smooth log p.

An estimator whose gradient function is the score log p(x) (``score``, ``importance``, LAX) relies on

    ∇_θ E_p[f] = ∇_θ ∫_S p_θ(x) f(x) dx = E_p[f ∇_θ log p_θ],

which needs the support S not to move with θ. Where it does (``Uniform(low, high)``, ``Pareto(scale, α)``, an
affine map of a bounded base distribution), Leibniz's rule adds a boundary term, f at the bound times the
density there, that no sample's log p sees: the estimate is silently biased (z ~ Uniform(0, h):
d/dh E[z²] = 2h/3, the score gives -h/3). :func:`moving_support` finds such parameters; the estimator base
class refuses the node with ``storch.UnsupportedDistributionError``. Public as
``storch.extending.moving_support``.

At order n the surrogate differentiates log p n times in the parameters (MagicBox's derivatives). A kink of
log p in a parameter (``Laplace``'s -|x - loc| / b) has a delta in its second derivative that autograd reports
as 0, so from order 2 the estimate is biased (d²/dloc² E[z²] = 2 for a Laplace: leave-one-out gave 0).
:func:`log_prob_kinks` finds such operations; the surrogate refuses the order with ``storch.OrderError``.
"""

from __future__ import annotations

import inspect
from typing import Optional, Union

import torch
from torch.distributions import (
    Bernoulli,
    Binomial,
    ComposeTransform,
    ContinuousBernoulli,
    Distribution,
    Independent,
    MixtureSameFamily,
    Transform,
    TransformedDistribution,
    constraints,
)

from ..distributions.support import _STRICT, _changes_only_init
from .smoothness import _nonsmooth_on_path
from .order_guard import is_differentiated, unbatched

__all__ = ["moving_support", "log_prob_kinks", "same_support"]

# what a distribution type's `support` attribute says about every instance (cached per type):
_FIXED = 0        # a constraint object of the class (Normal's real, Beta's unit interval), or discrete
_TRANSFORMED = 1  # TransformedDistribution's own: the base's support mapped by the transforms
_COMPUTED = 2     # a property computed per instance (Uniform's interval(low, high)): read it
_KIND: dict[type, int] = {}


def _support_kind(cls: type) -> int:
    k = _KIND.get(cls)
    if k is None:
        attr = inspect.getattr_static(cls, "support", None)
        if isinstance(attr, constraints.Constraint) and not constraints.is_dependent(attr):
            k = _FIXED
        elif getattr(attr, "_is_discrete", None) is True:
            # a discrete support (Categorical's {0..K-1}, Binomial's {0..total_count}): its bounds are counts,
            # in which the expectation has no derivative for any estimator to miss
            k = _FIXED
        elif attr is inspect.getattr_static(TransformedDistribution, "support"):
            k = _TRANSFORMED
        else:
            k = _COMPUTED
        _KIND[cls] = k
    return k


def support_is_fixed(cls: type) -> bool:
    """Whether the class ``cls`` declares a support that no parameter can move (a constant constraint, or a
    discrete one): :func:`moving_support` is ``[]`` for every instance."""
    return _support_kind(cls) == _FIXED


def moving_support(d: Distribution) -> list[str]:
    """The parameters of ``d`` that are differentiated and move its (continuous) support, by name.

    ``["high"]`` for ``Uniform(0, h)`` with ``h.requires_grad`` (or a forward-mode tangent, see
    :func:`storch.extending.is_differentiated`), ``["scale"]`` for ``Pareto(scale, α)``,
    ``["transforms[0].loc"]`` for a ``TransformedDistribution`` that shifts a bounded base (a ``Uniform``,
    an ``Exponential``) by a learned ``AffineTransform``; ``[]`` when the support does not depend on
    parameters that require grad (every distribution whose class declares a fixed ``support``:
    ``Normal``, ``Beta``, ``Kumaraswamy``, ``LogNormal``, ... and discrete supports). Looked through:
    ``Independent``, ``MixtureSameFamily`` (its components), ``TransformedDistribution`` (its base, then
    each transform: a transform with parameters that require grad moves the support unless the set it
    maps is its whole domain, e.g. an affine map of the real line). A score-function gradient (log p)
    misses the boundary term of such a support; a pathwise gradient (``rsample``) moves the samples
    with it and is right.

    Cheap for the common case: one dict lookup per distribution type whose class fixes its support;
    the support is read only for types that compute it per instance.
    """
    kind = _support_kind(type(d))
    if kind == _FIXED:
        return []
    if isinstance(d, Independent):
        return moving_support(d.base_dist)
    if isinstance(d, MixtureSameFamily):
        return [f"component_distribution.{n}" for n in moving_support(d.component_distribution)]
    if kind == _TRANSFORMED and isinstance(d, TransformedDistribution):
        return _moving_transformed(d)
    try:
        support = d.support
    except NotImplementedError:  # a user distribution that declares no support: nothing to check
        return []
    if support is None or support.is_discrete:
        return []
    grads = [t for t in _constraint_tensors(support, 0) if is_differentiated(t)]
    if not grads:
        return []
    named = [k for k, v in vars(d).items() if isinstance(v, torch.Tensor) and any(v is t for t in grads)]
    return named or ["its support's bounds"]


def _constraint_tensors(c, depth: int) -> list[torch.Tensor]:
    """The tensors a constraint holds (its bounds; those of the constraints it is built from)."""
    out: list[torch.Tensor] = []
    if depth > 4:
        return out
    for v in vars(c).values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, constraints.Constraint):
            out += _constraint_tensors(v, depth + 1)
        elif isinstance(v, (list, tuple)):
            for w in v:
                if isinstance(w, constraints.Constraint):
                    out += _constraint_tensors(w, depth + 1)
    return out


def _moving_transformed(d: TransformedDistribution) -> list[str]:
    """A TransformedDistribution's support is the image of its base's support under the transforms
    (torch reports only the last transform's codomain: ``real`` for an affine map of a Uniform)."""
    moved = moving_support(d.base_dist)
    if moved:
        return [f"base_dist.{n}" for n in moved]
    current: Optional[constraints.Constraint] = d.base_dist.support  # None: a fixed set with no constraint
    for i, t in enumerate(_flat(d.transforms)):
        if current is not None and same_support(current, t.domain):
            current = t.codomain  # the whole domain maps onto the codomain, whatever the parameters
            continue
        grads = _transform_grads(t, "", 0)
        if grads:  # the image of part of the domain moves with the transform's parameters
            return [f"transforms[{i}]{n}" for n in grads]
        current = None  # the image of part of the domain under a fixed map: fixed, but no longer a domain
    return []


def _flat(transforms) -> list[Transform]:
    out: list[Transform] = []
    for t in transforms:
        out += _flat(t.parts) if isinstance(t, ComposeTransform) else [t]
    return out


def _transform_grads(t, prefix: str, depth: int) -> list[str]:
    """``.name`` of a transform's tensors that require grad (those of the transforms it wraps too: an
    ``_InverseTransform``'s, an ``IndependentTransform``'s)."""
    out: list[str] = []
    if depth > 4:
        return out
    for k, v in vars(t).items():
        if isinstance(v, torch.Tensor) and is_differentiated(v):
            out.append(f"{prefix}.{k}")
        elif isinstance(v, Transform) and not k.startswith("_cached"):
            out += _transform_grads(v, f"{prefix}.{k}", depth + 1)
    return out


def same_support(a: Union[constraints.Constraint, Distribution, None],
                 b: Union[constraints.Constraint, Distribution, None]) -> bool:
    """Whether ``a`` and ``b`` are certainly the same set: two constraints (a distribution stands for its
    ``support``) of the same type with the same bounds, reinterpreted (``independent``) dims aside.

    Conservative: ``False`` when unsure (a dependent constraint such as a ``TransformedDistribution``'s,
    bounds that require grad, bounds that do not broadcast). Bounds expanded to a batch shape are the same
    set as the scalar bound they repeat. For an estimator that needs two distributions to put mass on the
    same values (an importance proposal and p, perturbed copies of p); public as
    ``storch.extending.same_support``.

    Example:
        >>> same_support(Uniform(0.0, 1.0), Uniform(torch.zeros(3), 1.0))
        True
    """
    if isinstance(a, Distribution):
        a = a.support
    if isinstance(b, Distribution):
        b = b.support
    while isinstance(a, constraints.independent):
        a = a.base_constraint
    while isinstance(b, constraints.independent):
        b = b.base_constraint
    if a is b:
        return True
    if type(a) is not type(b) or constraints.is_dependent(a) or constraints.is_dependent(b):
        return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    for k, x in va.items():
        y = vb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            if is_differentiated(x) or is_differentiated(y):
                return False
            # bounds expanded to a batch shape (TransformedDistribution expands its base: Uniform(0, 1)'s
            # low of shape (1,)) are the same set as the scalar bound they repeat
            try:
                x, y = torch.broadcast_tensors(x, y.to(x))
            except RuntimeError:
                return False
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


# -- a smooth log p: the score's derivatives of order >= 2 ------------------------------------------------

# How to tell a kink of log p in the parameters. The walk of the autograd graph of the node's log p (its
# gradient values) from the parameters, with the table of storch.conditions.smoothness, rather than a table of
# distributions: the walk also sees user distributions (and Independent / Transformed wrappers of
# torch's), and it sees which parameters are learned (a Laplace with a learned scale only is smooth:
# -|x - loc| / b - log 2b is smooth in b). It is cached per (distribution type, the parameters that require
# grad), so a step at steady state walks nothing. log|u| is not a kink (see _nonsmooth_on_path's
# log_of_abs: the log|det J| of affine and power transforms, ContinuousBernoulli's normaliser). What the walk
# cannot tell is listed here: torch distributions whose graph holds a listed operation but whose log p is
# smooth in the parameters.
# Not Binomial: torch's log_prob writes softplus(logits) as clamp(logits, min=0) + log1p(exp(-|logits|)), whose
# kinks cancel in the value and the first derivative only (autograd's second derivative at a logit of exactly 0
# is 0, not -n/4). storch computes a Binomial's log p smoothly itself (distributions.support._binomial_log_prob:
# a Binomial, a subclass changing only __init__, an Independent of either, the strict copy, and the components of
# torch's MixtureSameFamily of them: raw_log_prob and strict_support alike, as the verdict below is cached per
# structure for every estimator), whose graph the walk finds kink-free; where torch's formula is still read (a
# user's subclass of MixtureSameFamily) the walk finds its abs and clamp and order 2 is refused, not estimated
# with the wrong derivative.
_SMOOTH_LOG_PROB: dict[type, str] = {
    # x·logits - softplus(logits), smooth in the logits (and in probs, through logit(p)). Eager torch computes
    # it with the fused binary_cross_entropy_with_logits, whose graph the walk finds kink-free; under a
    # torch.func transform (grad, jacrev, vmap) that op is decomposed into clamp_min(-x, 0) +
    # log(exp(-m) + exp(-x - m)) (softplus's max-shift): the value does not depend on m, so m's kink
    # cancels at every order (unlike torch's Binomial, whose abs is of the logit itself)
    Bernoulli: "log_prob is -binary_cross_entropy_with_logits, smooth in the logits; under torch.func it is "
               "decomposed into clamp_min + log(exp + exp): the kinks cancel",
    # -binary_cross_entropy_with_logits (as Bernoulli) + the log normaliser log|2 atanh(1 - 2p) / (1 - 2p)|
    # (the walk's log|u|, with a Taylor branch near p = 1/2 that matches the function it replaces)
    ContinuousBernoulli: "log_prob is Bernoulli's (see there) plus a smooth log normaliser",
}
_KINKS: dict = {}  # (structure(d), names of its tensors that require grad) -> {operation: k}
# the structures (see structure()) whose log p was walked with every tensor they hold requiring grad and has
# no kink: none with fewer learned tensors can have one (the paths from a subset of the inputs are a subset),
# so later calls skip even building the cache key (the common step: Bernoulli / Categorical logits); the
# types whose log p is known smooth start there. A bare type is put here only for a type that fixes its
# structure (_FIXED), so `type(d) in KINK_FREE` is a sound fast path (the surrogate's order-1 guard uses it).
# torch's Binomial itself: storch reads its log p only through _binomial_log_prob (raw_log_prob, strict_support),
# kink-free; not on the smooth list above, which would pass torch's formula too (a MixtureSameFamily of them).
# (Without it a Binomial step looked its walk up every step: +54 Python calls of ~1090 for a score step.)
KINK_FREE: set = set(_SMOOTH_LOG_PROB) | {Binomial}
_ALL_ORDERS = 1 << 30

# The generic wrappers: what an instance wraps (base distribution, components, transforms) is its
# constructor's argument, so its type says nothing of its log p: Independent(Bernoulli) kink-free must not
# make Independent(Laplace) so. torch's other distributions build what they hold themselves (StudentT's
# Chi2, LogNormal's Normal and ExpTransform): their type fixes the structure.
_WRAPPERS = (Independent, MixtureSameFamily, TransformedDistribution)
_FIXED: dict[type, bool] = {}  # distribution type -> whether the type alone fixes what it holds
_LISTED: dict[type, bool] = {}  # type -> on the smooth list (a listed type, a subclass changing only __init__)


# storch's strict copies (storch.distributions.strict_support: what the enumerating estimators' nodes hold
# where a probability is exactly 0 or a logit infinite) -> the torch class whose verdicts they share. Their
# log_prob is the base's on every value they draw (-inf on the others, a constant on an infinite logit,
# finite derivatives at a Poisson rate of 0): the same kinks in the parameters. Keyed by the exact type,
# so that a user's subclass of them (which may redefine anything) keeps the walk.
_VERDICT_TYPE: dict[type, type] = {strict: base for base, strict in _STRICT.items()}


def structure(d: Distribution):
    """The key of ``d``'s log p in the kink caches: ``type(d)`` for a type that fixes what it holds (one
    lookup: torch's Bernoulli, Categorical, Normal, LogNormal ...; for storch's strict copies of Bernoulli,
    Binomial and Poisson, that torch class: :data:`_VERDICT_TYPE`), else ``(type, ((attribute, key), ...))``
    over the distributions and transforms it holds, recursively (Independent, MixtureSameFamily,
    TransformedDistribution and user classes, whose instances may hold anything); ``None`` past the depth
    the walks read (not cached)."""
    t = type(d)
    t = _VERDICT_TYPE.get(t, t)
    return t if _fixed(t) else _structure(d, 0)


def _fixed(t: type) -> bool:
    fixed = _FIXED.get(t)
    if fixed is None:
        fixed = _FIXED[t] = t.__module__.startswith("torch.distributions.") and t not in _WRAPPERS
    return fixed


def _structure(obj, depth: int):
    """``(type, parts)`` of a distribution or transform whose type does not fix what it holds."""
    if depth > 4:
        return None
    parts = []
    for k, v in vars(obj).items():
        if isinstance(v, (Distribution, Transform)):
            s = _part(v, depth)
            if s is None:
                return None
            parts.append((k, s))
        elif type(v) is list or type(v) is tuple:  # (transforms; not a torch.Size, whose entries are ints)
            for i, w in enumerate(v):
                if isinstance(w, (Distribution, Transform)):
                    s = _part(w, depth)
                    if s is None:
                        return None
                    parts.append((k, i, s))
    return (type(obj), tuple(parts))


def _part(v, depth: int):
    """The key of a distribution or transform that ``_structure`` finds held at ``depth``."""
    if isinstance(v, Distribution):
        t = _VERDICT_TYPE.get(type(v), type(v))  # (an Independent of a strict copy: as of its torch base)
        if _fixed(t):
            return t
    return _structure(v, depth + 1)


def _listed(t: type) -> bool:
    v = _LISTED.get(t)
    if v is None:
        v = _LISTED[t] = any(issubclass(t, b) and _changes_only_init(t, b) for b in _SMOOTH_LOG_PROB)
    return v


def _smooth_by_list(key) -> bool:
    """Whether log p of a structure is smooth by the list alone, whatever ran before (eager torch and
    torch.func decompose Bernoulli's log p differently): a listed type, a subclass of one that changes only
    ``__init__``, an Independent (log p the sum of its base's) of such."""
    if isinstance(key, type):
        return _listed(key)
    t, parts = key
    if not parts:
        return _listed(t)
    return (issubclass(t, Independent) and _changes_only_init(t, Independent)
            and all(len(p) == 2 and _is_distribution_key(p[1]) and _smooth_by_list(p[1]) for p in parts))


def _is_distribution_key(key) -> bool:
    return issubclass(key if isinstance(key, type) else key[0], Distribution)


def log_prob_kinks(d: Distribution, log_prob: torch.Tensor, order: int) -> tuple[list[str], dict[str, int]]:
    """``(parameters, {operation: k})``: the operations of ``storch.extending.nonsmooth_operations()`` whose
    derivative of order k < ``order`` is discontinuous that lie on a path from ``d``'s tensors that require
    grad (``parameters``, by name) to ``log_prob`` (``d``'s log-probability, with its graph: a node's gradient
    values). Differentiating log p ``order`` times there loses the delta of the next derivative.

    Decided once per distribution structure (:func:`structure`: its type, and what a wrapper wraps) and set
    of parameters that require grad (the first log p of that kind is walked; later calls are a lookup), as
    the cost-path check is once per estimator and cost name. A walk under a torch.func transform is not
    cached (its graph is of decomposed ops).
    """
    if type(d) in KINK_FREE:  # (a bare type only where the type fixes the structure)
        return [], {}
    key = structure(d)
    if key is not None and key in KINK_FREE:
        return [], {}
    # under torch.func.vmap the batched tensors report requires_grad=False and have no graph: the tensors they
    # batch do, and a derivative outside vmap differentiates those (read batched, nothing was found: an order-1
    # surrogate's Hessian outside vmap, or surrogate_loss(order=2) inside, went through a Laplace's |x - loc|)
    log_prob = unbatched(log_prob)
    named = _grad_tensors(d, "", 0)
    if not named or log_prob.grad_fn is None:
        return [n for n, _ in named], {}
    if key is not None and _smooth_by_list(key):
        KINK_FREE.add(key)  # (a verdict of the structure alone: the same in every process state)
        return [n for n, _ in named], {}
    ckey = (key, tuple(n for n, _ in named))
    found = _KINKS.get(ckey) if key is not None else None
    if found is None:
        found = _nonsmooth_on_path(log_prob, [t for _, t in named], _ALL_ORDERS, log_of_abs=True)
        # Under a torch.func transform (grad, jacrev, vmap) torch decomposes fused ops into primitives with
        # kinks that cancel (softplus as clamp_min + log(exp + exp)), so a walk there can see a kink that the
        # eager graph of the same log p has not. Such a verdict holds for this call only: cached, it would
        # refuse every later eager second derivative of the process (the eager verdict, once cached, is used
        # under the transforms too: it is of the same function).
        if key is not None and torch._C._functorch.maybe_current_level() is None:
            _KINKS[ckey] = found
            if not found and len(named) == len(_grad_tensors(d, "", 0, every=True)):
                KINK_FREE.add(key)
    return [n for n, _ in named], {k: v for k, v in found.items() if v < order}


def smooth_log_prob_parameters(d: Distribution, order: int) -> Optional[list[torch.Tensor]]:
    """``d``'s tensors that require grad (its parameters, under vmap the tensors they batch) where its log p is
    known to have no operation whose derivative of order < ``order`` is discontinuous on a path from them,
    without walking: a structure on the smooth list (Bernoulli and ContinuousBernoulli, whose graphs hold
    softplus's max-shift), or one whose walk by :func:`log_prob_kinks` is cached (kink-free,
    or kinks only of order >= ``order``). ``None`` where that is not known (never walked: the caller keeps its
    own, conservative, verdict)."""
    named = _grad_tensors(d, "", 0)
    if type(d) not in KINK_FREE:  # (a bare type only where the type fixes the structure)
        key = structure(d)
        if key is None:
            return None
        if key not in KINK_FREE and not _smooth_by_list(key):
            found = _KINKS.get((key, tuple(n for n, _ in named)))
            if found is None or any(k < order for k in found.values()):
                return None
    return [t for _, t in named]


def _grad_tensors(obj, prefix: str, depth: int, every: bool = False) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the tensors that require grad held by a distribution (its base distributions'
    and transforms' too); ``every``: of all the tensors it holds."""
    out: list[tuple[str, torch.Tensor]] = []
    if depth > 4:
        return out
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            v = unbatched(v)  # (see log_prob_kinks: vmap's batched tensors report requires_grad=False)
            if every or v.requires_grad:
                out.append((prefix + k, v))
        elif isinstance(v, (Distribution, Transform)):
            out += _grad_tensors(v, f"{prefix}{k}.", depth + 1, every)
        elif type(v) is list or type(v) is tuple:  # (transforms; not a torch.Size, whose entries are ints)
            for i, w in enumerate(v):
                if isinstance(w, (Distribution, Transform)):
                    out += _grad_tensors(w, f"{prefix}{k}[{i}].", depth + 1, every)
    return out
