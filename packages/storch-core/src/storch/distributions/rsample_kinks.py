"""Kinks and jumps inside a distribution's own ``rsample``: between its parameters and the sample.

A pathwise estimator differentiates c(g(ε, θ)) in θ. :mod:`storch.conditions.smoothness` walks the path from the sample to
the cost; the reparameterisation g itself may hold a non-smooth operation of the noise and the parameters too:
torch's folded normal ``TransformedDistribution(Normal(μ, 1), [AbsTransform()])`` (|μ + ε|), a hard-concrete
gate's stretch-and-clamp, a rounding in a user's ``rsample``. Autograd loses the delta of its next derivative
there just as in the cost: a kink biases the pathwise derivatives from order 2 (the folded normal's Hessian of
E[x] came out 0 for an exact 2φ(μ)), a jump from order 1 (a rounded gate's gradient came out exactly 0).

:func:`rsample_kinks` walks the autograd graph of a sample down to the distribution's parameters (the tensors
it holds that require grad, :func:`~storch.distributions.grad_parameters`; not below them: what made the
parameters is the user's code, a deterministic function of θ) with the table of
:func:`storch.extending.nonsmooth_operations`. Only where :func:`rsample_walked` says so: torch's own classes
whose ``rsample`` is smooth in their parameters, and ``Independent`` / ``TransformedDistribution`` wrappers of
them with torch's smooth transforms, are known by class (one dict lookup; their numerical guards, such as the
clamp of ``SigmoidTransform`` at the dtype's tiny, would read as clamps). Everything else is walked: a user's
class or transform, ``AbsTransform`` (a kink wherever the base sample's sign moves with the parameters; torch's
``HalfNormal`` and ``HalfCauchy`` fold a base centred at a constant 0, which is smooth, and are known by class),
``CumulativeDistributionTransform`` (the cdf of a ``Uniform`` clamps); of a ``TransformedDistribution``, only
those parts (:func:`rsample_kinks`). ``ContinuousBernoulli`` is smooth outside its unstable region, where torch's
rsample does not depend on ``probs``: its values are read; so are a ``GeneralizedPareto``'s, whose rsample does not
depend on its concentration where that is within ``torch.isclose`` of 0 (and loses the digits of its derivative
nearer 0 than 1000 eps of its dtype).
"""

from __future__ import annotations

import math
import sys
import weakref
from types import MappingProxyType
from typing import Optional

import torch
from torch.distributions import (Beta, Cauchy, Chi2, ContinuousBernoulli, Dirichlet, Distribution, Exponential,
    FisherSnedecor, Gamma, Gumbel, HalfCauchy, HalfNormal, Independent, InverseGamma, Kumaraswamy, Laplace,
    LogisticNormal, LogNormal, LowRankMultivariateNormal, MultivariateNormal, Normal, Pareto, RelaxedBernoulli,
    RelaxedOneHotCategorical, StudentT, TransformedDistribution, Uniform, Weibull, Wishart)
from torch.distributions import transforms as _t
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from torch.overrides import TorchFunctionMode

from ..conditions import smoothness
from ..conditions.order_guard import unbatched
from .._util.qualname import code_qualname
from ..errors import ASSUMPTIONS
from ..runtime.generators import current_generator
from ..plates.dispatch import CASTS, INDEX_VALUES, JUMPS, casts_to_jump
from .parameters import grad_parameters

__all__ = ["rsample_kinks", "rsample_walked", "rsample_params", "SMOOTH_RSAMPLE", "SMOOTH_TRANSFORMS", "IMPLICIT_REPARAMETERISATION",
           "RsampleComparisons", "COMPARISON", "STRAIGHT_THROUGH", "PIECEWISE_CONSTANT", "WITH_INDICES", "ADDITIVE", "CARRIES", "DRAWS"]

# the backward nodes of torch's implicit reparameterisation of the gamma family (torch._standard_gamma: Gamma, Chi2,
# StudentT, FisherSnedecor, InverseGamma, Wishart; torch._sample_dirichlet: Dirichlet, Beta) -> 1: exact at order 1,
# with no derivative of their own (a second derivative through them fails, Gamma, or silently leaves out terms,
# Beta, Dirichlet: a Hessian of 0.0005 for 0.1662). torch's own classes are lowered by rsample_max_order; inside a
# walked rsample (a user's class drawing Beta(...).rsample(), a user transform's base) the walk finds them
IMPLICIT_REPARAMETERISATION: MappingProxyType = MappingProxyType({"StandardGammaBackward0": 1, "_DirichletBackward": 1})
_TABLE: MappingProxyType = MappingProxyType({**smoothness.nonsmooth_operations(), **IMPLICIT_REPARAMETERISATION})

# torch's classes whose rsample is a smooth function of their parameters (and the noise) wherever it is finite
# (exact types: a subclass may override rsample). The gamma family's implicit reparameterisation has no second
# derivative at all: rsample_max_order lowers its order to 1, not this table.
SMOOTH_RSAMPLE: frozenset = frozenset({
    Normal, LogNormal, Gumbel, Laplace, Cauchy, Uniform, Exponential, Gamma, Chi2, Beta, Dirichlet, StudentT,
    FisherSnedecor, InverseGamma, Wishart, MultivariateNormal, LowRankMultivariateNormal, Kumaraswamy, Weibull,
    Pareto, HalfNormal, HalfCauchy, RelaxedBernoulli, LogitRelaxedBernoulli, RelaxedOneHotCategorical,
    ExpRelaxedCategorical, LogisticNormal, ContinuousBernoulli,
} | ({getattr(torch.distributions, "GeneralizedPareto")} if hasattr(torch.distributions, "GeneralizedPareto")
     else set()))

# torch's transforms that are smooth on their domain (with their parameters: AffineTransform's loc and scale,
# PowerTransform's exponent on its positive domain). Not here: AbsTransform (a kink at 0),
# CumulativeDistributionTransform (a distribution's cdf: Uniform's clamps), and a user's transform: walked.
SMOOTH_TRANSFORMS: frozenset = frozenset({
    _t.AffineTransform, _t.ExpTransform, _t.SigmoidTransform, _t.TanhTransform, _t.SoftplusTransform,
    _t.SoftmaxTransform, _t.StickBreakingTransform, _t.PowerTransform, _t.LowerCholeskyTransform,
    _t.PositiveDefiniteTransform, _t.CorrCholeskyTransform, _t.ReshapeTransform,
})

_SMOOTH, _WALK, _INDEPENDENT, _TRANSFORMED, _UNSTABLE = 0, 1, 2, 3, 4
# distribution class -> one of the five (rsample_walked's per-class verdict): torch's own classes in a plain dict
# (one lookup per draw), classes made at run time (a user's, type(...)) in a weak one (not kept alive by it)
_BY_CLASS: dict = {}
_BY_USER_CLASS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# what a subclass may define over a smooth torch class and keep its verdict: names no torch rsample reads
# (ContinuousBernoulli's and GeneralizedPareto's read icdf, Wishart's support: not here), and Python's own
_INHERITS = frozenset({
    "log_prob", "entropy", "cdf", "mean", "mode", "variance", "stddev", "perplexity", "enumerate_support",
    "has_enumerate_support", "arg_constraints", "__repr__", "__module__", "__qualname__", "__doc__", "__dict__",
    "__weakref__", "__annotations__", "__firstlineno__", "__static_attributes__", "__orig_bases__",
    "__parameters__", "_abc_impl",
})

# ContinuousBernoulli.rsample is icdf(u), which returns u itself where probs is inside _lims (0.499, 0.501 by
# default, its numerically unstable region): the sample does not depend on probs there (the pathwise gradient
# is 0, for an exact d E[x]/dp = 1/3 at p = 0.5); found per instance, by the values (the op named in the note)
_UNSTABLE_OP = "ContinuousBernoulli.icdf"
# GeneralizedPareto.rsample is icdf(u), which switches to the exponential formula loc - scale·log(1 - u) where
# torch.isclose(concentration, 0) (|concentration| <= 1e-8): that branch does not depend on the concentration, so
# the pathwise derivative in it is 0 there (exact: scale·log(1 - u)²/2, 10.85 on 5 draws); found as above
_GPD_OP = "GeneralizedPareto.icdf"
_GPD = getattr(torch.distributions, "GeneralizedPareto", None)  # (torch after 2.7)
_GPD_EPS = 1000  # (|concentration| in eps of its dtype below which the pathwise derivative in it is refused)
# (what the two notes above end with where no caller adds it: a traced step's assertion message)
_INSTEAD = "; or use an estimator that does not differentiate through the sample for this node (e.g. 'score')"


def _smooth_ancestor(cls: type) -> Optional[type]:
    """The class of :data:`SMOOTH_RSAMPLE` whose verdict ``cls`` keeps: ``cls`` itself, or the nearest such base
    class where ``cls`` and the classes between define nothing that the base class has (a subclass that only
    adds methods, or overrides ``log_prob``; not one that overrides ``__init__``, ``rsample`` or what it reads)."""
    if cls in SMOOTH_RSAMPLE:
        return cls
    mro = cls.__mro__
    for i, base in enumerate(mro[1:], 1):
        if base in SMOOTH_RSAMPLE:
            defined = set().union(*(vars(k) for k in mro[:i])) - _INHERITS
            return base if not any(hasattr(base, name) for name in defined) else None
    return None


def _class_verdict(cls: type) -> int:
    v = _BY_CLASS.get(cls)
    if v is None:
        v = _BY_USER_CLASS.get(cls)
    if v is None:
        smooth = _smooth_ancestor(cls)
        if smooth is not None:
            v = _UNSTABLE if smooth is ContinuousBernoulli or (_GPD is not None and smooth is _GPD) else _SMOOTH
        elif issubclass(cls, Independent) and cls.rsample is Independent.rsample:
            v = _INDEPENDENT
        elif issubclass(cls, TransformedDistribution) and cls.rsample is TransformedDistribution.rsample:
            v = _TRANSFORMED  # (a user's subclass that only sets up base and transforms in __init__ too)
        else:
            v = _WALK
        (_BY_CLASS if cls.__module__.startswith("torch.") else _BY_USER_CLASS)[cls] = v
    return v


def _smooth_transform(t, depth: int = 0) -> bool:
    cls = type(t)
    if cls in SMOOTH_TRANSFORMS:
        return True
    if depth > 8:
        return False
    if cls is _t.ComposeTransform or cls is _t.CatTransform or cls is _t.StackTransform:
        parts = t.parts if cls is _t.ComposeTransform else t.transforms
        return all(_smooth_transform(p, depth + 1) for p in parts)
    if cls is _t.IndependentTransform:
        return _smooth_transform(t.base_transform, depth + 1)
    if cls is _t._InverseTransform:  # the inverse of a smooth bijection (logit of SigmoidTransform().inv)
        return _smooth_transform(t._inv, depth + 1)
    return False


def rsample_walked(d: Distribution, depth: int = 0) -> bool:
    """Whether :func:`rsample_kinks` looks into ``d``'s rsample: False for torch's classes whose rsample is known
    smooth in their parameters (:data:`SMOOTH_RSAMPLE`, and a subclass that only adds methods or overrides
    ``log_prob``: not ``__init__``, ``rsample`` nor what rsample reads), and ``Independent`` /
    ``TransformedDistribution`` (or a subclass that keeps their ``rsample``) of one with transforms of
    :data:`SMOOTH_TRANSFORMS` (``ComposeTransform``, ``IndependentTransform``, ``CatTransform``,
    ``StackTransform`` and inverses of them looked into). True for a user's class or transform,
    ``AbsTransform``, ``CumulativeDistributionTransform``, and ``ContinuousBernoulli`` (its values are read: see
    :func:`rsample_kinks`). The class's part is cached per class; a wrapper's base and transforms are looked at
    per instance."""
    cls = type(d)
    v = _BY_CLASS.get(cls)
    if v is None:
        v = _class_verdict(cls)
    if v == _SMOOTH:
        return False
    if v == _WALK or v == _UNSTABLE or depth > 8:
        return True
    if v == _TRANSFORMED and not all(_smooth_transform(t) for t in d.transforms):  # type: ignore[attr-defined]
        return True
    return rsample_walked(d.base_dist, depth + 1)  # type: ignore[attr-defined]


def rsample_params(d: Distribution) -> Optional[list]:
    """``d``'s parameters that require grad (:func:`~storch.distributions.grad_parameters`) where
    :func:`rsample_walked` says its rsample is looked into, else ``None`` (torch's smooth classes: one dict
    lookup). Take them before drawing (a caching transform's last value, or what the rsample keeps in ``d``, is
    no parameter) and pass them to :func:`rsample_kinks` (``storch.extending.note_rsample``) with the draw."""
    return list(grad_parameters(d)) if rsample_walked(d) else None


def rsample_kinks(d: Distribution, x: torch.Tensor, order: float = math.inf,
                  params: Optional[list] = None, tracing: bool = False,
                  where: Optional[dict] = None) -> dict[str, int]:
    """The non-smooth operations inside ``d``'s rsample: ``{autograd node name: k}`` (k: the order of its first
    discontinuous derivative, those below ``order``; 0 a jump, 1 a kink) on a path in the autograd graph from
    one of ``d``'s parameters that require grad to ``x``, a value ``d.rsample()`` returned. ``{}`` where
    :func:`rsample_walked` knows ``d``'s class smooth (nothing walked), where ``x`` has no graph or ``d`` no
    parameter that requires grad.

    ``params``: ``d``'s parameters (:func:`~storch.distributions.grad_parameters`), taken before ``x`` was drawn
    (an rsample may keep what it computed in the distribution: the walk would stop there); passing them says
    that :func:`rsample_walked` was True. The walk stops at the parameters: what made them (``logits =
    relu(h)``) is a function of θ alone, which the pathwise derivative differentiates correctly; at a leaf that
    requires grad too (a parameter held where the attributes do not show it is walked to, not missed). An
    operation on the parameters alone inside rsample (``self.scale.clamp(min=1e-6)``) is counted (the graph
    does not show which operations the noise enters): apply it to the parameter before building the
    distribution. The backward of torch's implicit reparameterisation of the gamma family
    (:data:`IMPLICIT_REPARAMETERISATION`: ``StandardGammaBackward0``, ``_DirichletBackward``) is found with k = 1
    wherever a walked rsample draws through it (a user's class whose rsample calls ``Beta(...).rsample()``): it is
    exact at order 1 but has no derivative of its own. Comparisons and masks inside rsample (``torch.where(y > 0, y,
    0)``, ``y * (y > 0)``) leave no trace in the autograd graph and are not seen by this walk: the estimators watch
    the draw of a walked distribution for them (:class:`RsampleComparisons`; in the cost: ``Node.compared``).

    An ``Independent`` is its base's rsample. For a ``TransformedDistribution`` (that keeps torch's rsample) of
    torch's classes only, only the parts that are not known smooth are walked, each from its output down to its
    input and its own parameters: storch draws the base again and applies each transform to it, keeping the values
    between them (torch's random state, that of the ``storch.Graph``'s generator and the transforms' caches are
    restored: ``x`` and what follows it are not changed), so a smooth transform's numerical guards (the clamp of
    ``SigmoidTransform`` at the dtype's tiny) and a smooth base are not counted. Where a user's class or transform
    is in it (its code is not run a second time: it may keep state, as a flow's cached log-det or a batch norm's
    running statistics do) and while tracing, ``x``'s own graph is walked, guards included.

    A ``ContinuousBernoulli`` (also as a base) whose probabilities that require grad lie in its ``_lims``
    ((0.499, 0.501), where torch's rsample returns the uniform noise unchanged: the sample does not depend on
    them, a pathwise gradient of 0) gives ``{"ContinuousBernoulli.icdf": 0}`` (the values are read: one device
    sync; while tracing, where they cannot be, always). Under ``torch.func.vmap`` the tensors that the batched
    ones batch are walked. ``tracing``: ``storch.compile`` is tracing the step (``storch.extending.is_tracing()``:
    no values read, no draw of storch's own).

    ``where``: a dict filled with ``{autograd node name: [the parts of d it was found in]}``, for messages: ``"its
    transform ClampT"``, ``"its base FoldedNormal"`` (nested: ``"its base TransformedDistribution's transform
    ClampT"``); nothing for ``d``'s own rsample."""
    if params is None:
        params = rsample_params(d)
        if params is None:
            return {}
    k = int(order) if math.isfinite(order) else 1 << 30
    return _kinks(d, x, k, params, 0, tracing, where, "")


def _merge(found: dict, more: dict) -> None:
    for op, k in more.items():
        found[op] = min(k, found.get(op, k))


def _walk(x: torch.Tensor, params: list, order: int, where: Optional[dict] = None, place: str = "") -> dict[str, int]:
    x = unbatched(x)
    if x.grad_fn is None:
        return {}
    found = smoothness._nonsmooth_on_path(x, [unbatched(p) for p in params], order, any_leaf=True, table=_TABLE)
    if where is not None and place:
        for op in found:
            if place not in where.setdefault(op, []):
                where[op].append(place)
    return found


def _part(place: str, part: str) -> str:
    """``part`` ("its transform ClampT") of what ``place`` names ("its base TransformedDistribution"), in words."""
    return part if not place else f"{place}'s {part[4:]}"


def _kinks(d: Distribution, x: torch.Tensor, order: int, params: list, depth: int,
           tracing: bool, where: Optional[dict] = None, place: str = "") -> dict[str, int]:
    cls = type(d)
    v = _BY_CLASS.get(cls)
    if v is None:
        v = _class_verdict(cls)
    if v == _SMOOTH:
        return {}
    if v == _UNSTABLE:
        return _unstable(d, tracing)
    if depth > 8 or v == _WALK:
        return _walk(x, params, order, where, place)
    if not rsample_walked(d, depth):
        return {}
    if v == _INDEPENDENT:  # (Independent.rsample is its base's)
        base = d.base_dist  # type: ignore[attr-defined]
        return _kinks(base, x, order, params, depth + 1, tracing, where,
                      _part(place, f"its base {type(base).__name__}"))
    if tracing or not _torch_only(d):
        # storch's own draw would run the user's code a second time (a transform that keeps state: a flow's
        # cached log-det, a batch norm's running statistics): the sample's own graph is walked instead (torch's
        # numerical guards in it, such as SigmoidTransform's clamp, then read as kinks), and an unstable base's
        # values are read
        found = _walk(x, params, order, where, place)
        _merge(found, _unstable_bases(d, tracing))
        return found
    return _transformed(d, x, order, depth, where, place)  # type: ignore[arg-type]


def _unstable_bases(d: Distribution, tracing: bool, depth: int = 0) -> dict[str, int]:
    """:func:`_unstable` of the ContinuousBernoulli under ``d``'s wrappers (Independent, TransformedDistribution)."""
    while depth <= 8 and isinstance(d, (Independent, TransformedDistribution)):
        d, depth = d.base_dist, depth + 1
    if _class_verdict(type(d)) == _UNSTABLE:  # (it reads the per-class cache first)
        return _unstable(d, tracing)
    return {}


def _torch_only(d: Distribution, depth: int = 0) -> bool:
    """Whether drawing ``d`` (a TransformedDistribution or Independent, with its base and transforms) runs torch's
    classes only: storch draws such a distribution again to walk its parts (:func:`_transformed`) and must not run a
    user's code twice."""
    if depth > 8:
        return False
    if isinstance(d, TransformedDistribution):  # (storch's draw runs its base and transforms, not the class's code)
        if not all(_torch_transform(t) for t in d.transforms):
            return False
        return _torch_only(d.base_dist, depth + 1)
    if isinstance(d, Independent):
        return _torch_only(d.base_dist, depth + 1)
    return type(d).__module__.startswith("torch.")


def _torch_transform(t, depth: int = 0) -> bool:
    if depth > 8 or not type(t).__module__.startswith("torch."):
        return False
    for v in t.__dict__.values():  # (parts, inverses, base transforms, a CumulativeDistributionTransform's distribution)
        for item in (v if isinstance(v, (list, tuple)) else (v,)):
            if isinstance(item, _t.Transform) and item is not t and not _torch_transform(item, depth + 1):
                return False
            if isinstance(item, Distribution) and not _torch_only(item, depth + 1):
                return False
    return True


def _unstable(d: Distribution, tracing: bool) -> dict[str, int]:
    if not isinstance(d, ContinuousBernoulli):
        return _near_zero_concentration(d, tracing)
    p = d.__dict__.get("probs")
    p = unbatched(d.probs if p is None else p)
    if not p.requires_grad:
        return {}
    lo, hi = d._lims  # type: ignore[attr-defined]
    inside = (p > lo) & (p <= hi)  # (torch's unstable region: _outside_unstable_region is p <= lo or p > hi)
    if tracing:  # storch.compile: no value read; the replayed step checks it at every call
        message = "storch: " + rsample_kinks_note("ContinuousBernoulli", {_UNSTABLE_OP: 0}) + _INSTEAD
        ASSUMPTIONS.add(message)
        torch._assert_async(~inside.any(), message)
        return {}
    if bool(inside.any()):
        return {_UNSTABLE_OP: 0}
    return {}


def gpd_concentration_bound(dtype: torch.dtype) -> float:
    """The |concentration| above which a GeneralizedPareto's pathwise derivative in it is accurate in ``dtype`` (to
    about 1e-3 relative): torch's icdf loc + scale·expm1(c·L)/c (L = -log(1 - u)) differentiates to terms of size
    L/c that cancel to scale·L²/2, losing digits as eps/|c| (measured on the mean over draws in float32: 1.65 off at
    c = 1e-7, 6-7% at 1e-6 (7.2% on 20k draws), 1% at 1e-5, below 1e-3 at 1.2e-4 = 1000 eps). Not below 1e-7, well outside torch.isclose's
    1e-8, where it takes the exponential formula (refused; tests/core/test_rsample_kinks.py checks the bound)."""
    return max(1e-7, _GPD_EPS * torch.finfo(dtype).eps)


def _near_zero_concentration(d: Distribution, tracing: bool) -> dict[str, int]:
    """A GeneralizedPareto whose concentration requires grad and is within torch.isclose of 0 (its icdf's
    exponential branch there: a pathwise derivative of 0 in the concentration), or nearer 0 than 1000 eps of its
    dtype (the derivative loses digits as eps/|c|: 7% off at 1e-6 in float32, where torch.isclose does not fire),
    gives ``{"GeneralizedPareto.icdf": 0}``. Not the floor of :func:`gpd_concentration_bound` (1e-7): float64's
    derivative is accurate to 1e-8 relative from torch.isclose's 1e-8 up, so it is refused within isclose only."""
    c = unbatched(d.concentration)  # type: ignore[attr-defined]
    if not c.requires_grad:
        return {}
    # (the test torch's icdf makes; and gpd_concentration_bound without its floor)
    near = torch.isclose(c, torch.zeros_like(c)) | (c.abs() < _GPD_EPS * torch.finfo(c.dtype).eps)
    if tracing:
        message = "storch: " + rsample_kinks_note("GeneralizedPareto", {_GPD_OP: 0}) + _INSTEAD
        ASSUMPTIONS.add(message)
        torch._assert_async(~near.any(), message)
        return {}
    return {_GPD_OP: 0} if bool(near.any()) else {}


def _parts(t, depth: int = 0) -> list:
    """``t``'s parts applied one after another (a ComposeTransform's, flattened)."""
    if type(t) is _t.ComposeTransform and depth < 8:
        return [q for p in t.parts for q in _parts(p, depth + 1)]
    return [t]


def _caches(t, out: list, depth: int = 0) -> list:
    """The transforms in ``t`` (itself, its parts, inverses, base transforms) with their ``_cached_x_y``."""
    if isinstance(t, _t.Transform) and depth < 8:
        out.append((t, t.__dict__.get("_cached_x_y", _NONE)))
        for v in t.__dict__.values():
            for item in (v if isinstance(v, (list, tuple)) else (v,)):
                if isinstance(item, _t.Transform):
                    _caches(item, out, depth + 1)
    return out


_NONE = object()


def _transformed(d: TransformedDistribution, x: torch.Tensor, order: int, depth: int,
                 where: Optional[dict] = None, place: str = "") -> dict[str, int]:
    """The walk of a TransformedDistribution's parts that are not known smooth, on a draw of its own."""
    base = d.base_dist
    n = x.dim() - len(d.batch_shape) - len(d.event_shape)
    shape = x.shape[:max(n, 0)]
    caches = [c for t in d.transforms for c in _caches(t, [])]
    dev = x.device
    found: dict = {}
    gen = current_generator()  # (storch.Graph(generator=g): storch's own draws use g; fork_rng restores the global one)
    gen_state = gen.get_state() if gen is not None else None
    try:
        with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev.index or 0],
                                   device_type="cuda" if dev.type == "cpu" else dev.type):
            walked = rsample_walked(base, depth + 1)
            base_params = list(grad_parameters(base)) if walked else None
            y = base.rsample(shape)
            if walked:
                _merge(found, _kinks(base, y, order, base_params, depth + 1, False,  # type: ignore[arg-type]
                                     where, _part(place, f"its base {type(base).__name__}")))
            for t in (q for p in d.transforms for q in _parts(p)):
                if _smooth_transform(t):
                    y = t(y)
                    continue
                own = list(grad_parameters(t))
                out = t(y)
                _merge(found, _walk(out, own + [y], order, where, _part(place, f"its transform {type(t).__name__}")))
                y = out
    finally:
        if gen is not None:
            gen.set_state(gen_state)
        for t, c in caches:
            if c is _NONE:
                t.__dict__.pop("_cached_x_y", None)
            else:
                t._cached_x_y = c
    return found


# the prefix of rsample_kinks' name for a comparison inside a walked rsample (RsampleComparisons): "comparison gt"
COMPARISON = "comparison "
# and for a piecewise-constant value added to one that carries gradient (RsampleComparisons.jump): "straight-through
# add in GumbelSinkhornST.rsample"
STRAIGHT_THROUGH = "straight-through "


# the packages whose comparisons RsampleComparisons does not count (torch's and storch's own), by root package name:
# a user's module named torch_utils, storch_helpers or torchrl is not one of them
_OWN_PACKAGES = frozenset({"torch", "storch", "storch_score", "storch_relaxed", "storch_mvd"})


def _is_log_prob_frame(frame) -> bool:
    """Whether ``frame`` runs an estimator's ``step_gradient_function`` or a distribution's ``log_prob`` (a
    partition step's gradient function, which ``extend`` computes beside its draw): not the draw."""
    name = frame.f_code.co_name
    return name == "step_gradient_function" or name == "log_prob" and isinstance(frame.f_locals.get("self"),
                                                                                   Distribution)


_GUMBEL_SOFTMAX = torch.nn.functional.gumbel_softmax

# the functions whose result is a value detached from their operand (RsampleComparisons watches it too)
_DETACH = frozenset({torch.Tensor.detach, torch.detach, torch.Tensor.data.__get__})  # type: ignore[attr-defined]


def _flat_tensors(args, kwargs) -> list:
    """The tensors among ``args`` and ``kwargs``' values, and in lists and tuples of them (``torch.cat([a, b])``)."""
    out = []
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, torch.Tensor))
    return out


_T = torch.Tensor


def _fns(names: tuple) -> frozenset:
    out = {getattr(torch, n) for n in names if hasattr(torch, n)}
    out.update(getattr(_T, n) for n in names if hasattr(_T, n))
    return frozenset(out)


# what makes a value piecewise constant in its operand (derivative 0 almost everywhere, changing by jumps) outside
# the autograd graph: the comparisons, argmax / argmin / argsort, bool and integer casts of JUMPS, and rounding
# (of a detached value: of one that requires grad, the walk of the autograd graph finds RoundBackward0 itself)
PIECEWISE_CONSTANT: frozenset = (JUMPS - INDEX_VALUES) | _fns(("round", "floor", "ceil", "trunc", "fix", "sign",
                                                             "sgn", "signbit", "floor_divide",
                                                             "__floordiv__", "__rfloordiv__"))
# the functions that return (values, indices): the indices are piecewise constant (the values are continuous:
# sort values, a max, are kinks)
WITH_INDICES: frozenset = _fns(("sort", "topk", "max", "min", "kthvalue", "mode", "median", "nanmedian", "cummax",
                                "cummin", "aminmax", "frexp"))
# the functions that put their operands' values into their result as they are (a sum, a concatenation): a
# piecewise-constant operand makes the result jump where autograd sees a derivative of 0, as a straight-through
# hard + soft - soft.detach() does. A product or torch.where with a mask selects between values (relu's
# torch.where(y > 0, y, 0) is continuous): not here.
ADDITIVE: frozenset = _fns(("add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
                            "__isub__", "subtract", "subtract_", "rsub", "cat", "concat", "concatenate", "stack",
                            "hstack", "vstack", "dstack", "column_stack", "row_stack"))

# the functions that carry their operands' summands into their result, scaled, cast or rearranged (a straight-through
# part survives them: (soft - soft.detach()) * 2, .view(...), [..., 0], .to(float64)); a function not here (softmax,
# a max, exp) ends them: logits - logits.detach().max() is a stabilised logit, no stop-gradient summand of the sample
CARRIES: frozenset = _fns(("neg", "negative", "__neg__", "positive", "__pos__", "mul", "mul_", "__mul__", "__rmul__",
                           "__imul__", "multiply", "div", "div_", "__truediv__", "__itruediv__", "divide", "true_divide",
                           "clone", "contiguous", "reshape", "view", "view_as", "reshape_as", "expand", "expand_as",
                           "squeeze", "unsqueeze", "flatten", "unflatten", "permute", "transpose", "movedim", "t",
                           "__getitem__", "select", "narrow", "index_select", "gather", "to", "type", "float",
                           "double", "half", "bfloat16", "broadcast_to", "where", "masked_fill", "scatter",
                           "scatter_add", "roll", "flip", "repeat", "tile", "chunk", "split", "unbind"))
# the draws of a discrete variable from probabilities: piecewise constant in them, as an argmax is (torch's
# OneHotCategoricalStraightThrough by hand: one_hot(multinomial(p, 1)) + p - p.detach())
DRAWS: frozenset = _fns(("multinomial", "bernoulli", "bernoulli_", "poisson", "binomial"))
# RsampleComparisons' flags of a value's summands: a piecewise-constant value, a detached copy of one with gradient
_HARD, _STOPPED = 1, 2


def _keep(table: dict, out) -> None:
    for o in (out if isinstance(out, (tuple, list)) else (out,)):
        if isinstance(o, torch.Tensor):
            table[id(o)] = o


def _is_mode_frame(frame) -> bool:
    """Whether ``frame`` runs a ``TorchFunctionMode``'s ``__torch_function__`` (a mode above the watch passing
    the call on): the code that made the call is further up."""
    return frame.f_code.co_name == "__torch_function__" and isinstance(frame.f_locals.get("self"), TorchFunctionMode)


class RsampleComparisons(TorchFunctionMode):
    """Records the first comparison (a function of ``storch.plates.dispatch.JUMPS``: ``>``, ``torch.where``'s
    condition, a mask, a bool or integer cast) that code outside storch and torch applies to a tensor that requires
    grad while it is active: around the draw of a distribution whose rsample storch walks (:func:`rsample_walked`:
    a user's class or transform), the mask of ``torch.where(y > 0, y, 0)``, ``y * (y > 0)``,
    ``y.masked_fill(y < 0, 0)`` inside rsample, which leaves no trace in the autograd graph. ``found``: its name
    and the function that made it (``"gt in WhereClamp._call"``), or None. Comparisons made by torch (``torch.distributions``' constraint checks and formula branches,
    its transforms) and by storch (a module whose root package is in ``_OWN_PACKAGES``: not a user's torch_utils) are
    not counted, the caller read through any ``TorchFunctionMode`` above this one (``torch.device(...)`` inside
    rsample); nor one of a value that does not require grad (the noise
    alone), unless it was detached from one (``y.detach()``, ``y.data``, and what is computed from them while the mode
    is active). Tensor operands in keywords count (``torch.gt(input=y, other=0)``), and ``Tensor.to`` /
    ``Tensor.type`` to a bool or integer dtype (``storch.plates.dispatch.CASTS``). Not counted: a comparison made
    under a ``log_prob`` or an estimator's ``step_gradient_function`` (``extend`` computes the step's gradient
    function beside its draw: a piecewise density is no kink of the sample). Counted like ``Node.compared`` in the cost: from order 2 (a piecewise function, a kink or a jump
    autograd does not see).

    ``jump``: the first straight-through, or None: a value piecewise constant in the parameters (a function of
    :data:`PIECEWISE_CONSTANT` or a draw of :data:`DRAWS` of a watched value, the indices of :data:`WITH_INDICES`, and
    what is computed from them and values without gradient alone: ``one_hot``, a float cast, a scatter into zeros)
    and a detached copy of a value that carries gradient (``soft.detach()``, ``soft.data``; carried through sums and
    :data:`CARRIES`: scalings, casts, reshapes, indexing) that functions of :data:`ADDITIVE` put, in any order, into
    a value that carries gradient (``one_hot(soft.argmax(-1)) + soft - soft.detach()``, ``(hard - soft).detach() +
    soft``, ``one_hot(multinomial(p, 1)) + p - p.detach()``; also ``F.gumbel_softmax(..., hard=True)`` of a watched
    value, whose operations the mode does not see), in code outside storch (torch's counted) and not under a
    ``log_prob``: its words (``"sub in GumbelSinkhornST.rsample"``). The sample jumps with the parameters while
    autograd sees the soft part's derivative only: biased at order 1, counted from order 1
    (``storch.estimators.checks.note_compared``). Without the detached copy it is not one: a continuous
    piecewise-linear spline adds a bin index to a value that carries gradient (``cq[b] + (y * K - b) * q[b]``, ``b =
    floor(y * K)``; the index of ``searchsorted(cdf.detach(), u)``: a detached value that only makes an index is no
    copy), its terms' jumps cancel, and its pathwise gradient is exact (found by review: the first version of this
    rule refused such splines). A detached value reduced before it is added (``logits - logits.detach().max()``) is
    no copy either. Not seen: a jump without a detached copy (``y + (y > 0).float()``, ``torch.where(y > 0, y + 1,
    y)``: the comparison lowers the node to order 1 only) or whose copy is made under ``torch.no_grad()``. A mask
    that multiplies or selects (``y * (y > 0).float()``, ``torch.where``) or indexes (``y.gather(-1, idx)``) is not
    one (relu, a max: kinks).
    Costs a Python call per torch function inside the draw, for walked classes only."""

    def __init__(self) -> None:
        super().__init__()
        self.found: Optional[str] = None
        # the first straight-through (a piecewise-constant value added to one that carries gradient): its words
        self.jump: Optional[str] = None
        # the values piecewise constant in the parameters, without gradient (argmax of a value that requires grad,
        # a comparison, and what is computed from them alone: one_hot, a float cast, a scatter into zeros), by id
        self._discrete: dict = {}
        # the values detached (y.detach(), y.data) from a value that requires grad while active, and what was
        # computed from them (ids, with the tensors kept alive: the draw's own, dropped with the mode)
        self._detached: dict = {}
        # the values that hold, as a summand, a piecewise-constant value (_HARD: hard + soft) or a detached copy of a
        # value that carries gradient (_STOPPED: soft.detach(), soft - soft.detach(), (hard - soft).detach()): id ->
        # (the tensor, kept alive, the flags). Both added into a value that carries gradient: a straight-through
        self._parts: dict = {}

    def _watched(self, a) -> bool:
        return isinstance(a, torch.Tensor) and (unbatched(a).requires_grad or id(a) in self._detached)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None and (func in JUMPS and func not in INDEX_VALUES
                                   or func in CASTS and casts_to_jump(args, kwargs)):
            if any(self._watched(a) for a in args) or any(self._watched(a) for a in kwargs.values()):
                self._note(func)
        out = func(*args, **kwargs)
        if self.jump is None:
            self._track_jumps(func, args, kwargs, out)
        if self.found is None and isinstance(out, torch.Tensor) and not out.requires_grad:
            # a comparison of y.detach() (torch.where(y.detach() > 0, y, 0)) is as much a kink as one of y: the
            # detached value (and what is computed from it) is watched too
            if func in _DETACH and args and isinstance(args[0], torch.Tensor) and unbatched(args[0]).requires_grad \
                    or self._detached and (any(id(a) in self._detached for a in args if isinstance(a, torch.Tensor))
                                           or any(id(a) in self._detached for a in kwargs.values()
                                                  if isinstance(a, torch.Tensor))):
                self._detached[id(out)] = out
        return out

    def _track_jumps(self, func, args, kwargs, out) -> None:
        """Mark ``out`` piecewise constant (``_discrete``) where ``func`` makes such a value of a watched one
        (:data:`PIECEWISE_CONSTANT`; the indices of :data:`WITH_INDICES`) or of piecewise-constant values alone,
        and note a straight-through (``jump``) where :data:`ADDITIVE` puts one into a value that carries
        gradient."""
        discrete, parts = self._discrete, self._parts
        if func is _GUMBEL_SOFTMAX:  # (torch's straight-through: the mode does not see the operations inside it)
            hard = kwargs.get("hard", args[2] if len(args) > 2 else False)
            if hard and self._watched_or_discrete(args, kwargs):
                self._note_jump(func)
            return
        if func in WITH_INDICES:
            if isinstance(out, tuple) and len(out) == 2 and not unbatched(out[1]).requires_grad \
                    and self._watched_or_discrete(args, kwargs):
                discrete[id(out[1])] = out[1]
            return
        if func in PIECEWISE_CONSTANT or func in DRAWS or func in CASTS and casts_to_jump(args, kwargs):
            # (y.floor() and bernoulli(p) require grad, with a derivative of 0: piecewise constant all the same)
            if isinstance(out, torch.Tensor) and self._watched_or_discrete(args, kwargs):
                discrete[id(out)] = out
            return
        if func in _DETACH:  # a detached copy of a value that carries gradient: a stop-gradient summand
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor) \
                    and unbatched(args[0]).requires_grad:
                parts[id(out)] = (out, _STOPPED | parts.get(id(args[0]), (None, 0))[1]
                                  | (_HARD if id(args[0]) in discrete else 0))
            return
        if not discrete and not parts:
            return
        operands = _flat_tensors(args, kwargs)
        additive = func in ADDITIVE
        grad = any(unbatched(a).requires_grad and id(a) not in discrete for a in operands)
        if func not in CARRIES and not additive:
            if not grad and any(id(a) in discrete for a in operands):
                _keep(discrete, out)  # (computed from piecewise-constant values and values without gradient alone)
            return
        flags = 0
        for a in operands:
            flags |= parts[id(a)][1] if id(a) in parts else 0
            if additive and id(a) in discrete:
                flags |= _HARD
        if additive and grad and flags == _HARD | _STOPPED:
            self._note_jump(func)
            return
        if any(id(a) in discrete for a in operands) and not grad:
            _keep(discrete, out)
        if flags:
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor):
                    parts[id(o)] = (o, flags)

    def _note_jump(self, func) -> None:
        """Record the straight-through made by ``func`` where the code that called it is not storch's (its
        gumbel_straight_through is biased by design, and marked so) nor under a ``log_prob``."""
        frame = sys._getframe(3)  # (_note_jump, _track_jumps, __torch_function__: its caller)
        while frame.f_back is not None and _is_mode_frame(frame):
            frame = frame.f_back
        caller = frame.f_globals.get("__name__", "")
        if caller.partition(".")[0] not in _OWN_PACKAGES - {"torch"} and not self._in_log_prob(frame):
            code = frame.f_code
            self.jump = (f"{getattr(func, '__name__', str(func)).strip('_')} in "
                         f"{code_qualname(code, frame)}")

    def _watched_or_discrete(self, args, kwargs) -> bool:
        return any(self._watched(a) or id(a) in self._discrete for a in _flat_tensors(args, kwargs))

    def __enter__(self):
        self._entry = sys._getframe(1)  # (the code that draws under the watch: the frames below it are the draw's)
        return super().__enter__()

    def _note(self, func) -> None:
        frame = sys._getframe(2)
        while frame.f_back is not None and _is_mode_frame(frame):
            frame = frame.f_back  # another mode above this one (torch.device(...) inside rsample): its caller
        caller = frame.f_globals.get("__name__", "")
        if caller.partition(".")[0] not in _OWN_PACKAGES and not self._in_log_prob(frame):
            code = frame.f_code
            self.found = (f"{getattr(func, '__name__', str(func)).strip('_')} in "
                          f"{code_qualname(code, frame)}")

    def _in_log_prob(self, frame) -> bool:
        """Whether the comparison is made (``frame``: its caller) under a log-density, between here and where
        the watch was entered: ``extend`` runs the step's gradient function (``step_gradient_function``, the
        user's ``log_prob``) under the watch beside the draw; a piecewise density is no kink of the sample."""
        entry = getattr(self, "_entry", None)
        while frame is not None and frame is not entry:
            if _is_log_prob_frame(frame):
                return True
            frame = frame.f_back
        return False


def rsample_kinks_note(name: str, found: dict, where: Optional[dict] = None) -> str:
    """In words, for an error message: ``found`` (of :func:`rsample_kinks`) inside ``name``'s rsample; ``where``:
    the parts each was found in (:func:`rsample_kinks`'s ``where``), named where known."""
    if _UNSTABLE_OP in found:
        return (f"the rsample of {name} draws from a ContinuousBernoulli whose probs (which require grad) lie in "
                "(0.499, 0.501) (its _lims): there torch's rsample (icdf) returns the uniform noise unchanged, so the "
                "sample does not depend on probs and the pathwise gradient is 0 (exact at probs 0.5: d E[x] / d probs "
                "= 1/3). Keep probs out of that interval (logits at least 0.004 away from 0: initialise them away "
                "from 0)")
    if _GPD_OP in found:
        return (f"the rsample of {name} draws from a GeneralizedPareto whose concentration (which requires grad) is "
                "too near 0 for its pathwise derivative: within torch.isclose of 0 (|concentration| <= 1e-8) torch's "
                "rsample (icdf) takes the exponential formula, which does not depend on the concentration, so its "
                "pathwise derivative is 0 (it is not: d x / d concentration = scale·log(1 - u)²/2); nearer 0 than 1000 "
                "eps of its dtype, the formula expm1(c·L) / c loses digits of that derivative as eps / |c| (7% off at "
                "1e-6 in float32). Initialise the concentration away from 0: |concentration| > "
                f"{gpd_concentration_bound(torch.float64):.0e} in float64, > {gpd_concentration_bound(torch.float32):.1e} "
                "in float32 (in float16 / bfloat16 the bound is 1000 eps = "
                f"{gpd_concentration_bound(torch.float16):.2g} / {gpd_concentration_bound(torch.bfloat16):.2g}, nearly "
                "every concentration: compute the distribution in float32)")
    where = where or {}

    def inside(op: str) -> str:
        parts = where.get(op)
        return f"in {' and '.join(parts)}; " if parts else ""

    compared = sorted(op[len(COMPARISON):] for op in found if op.startswith(COMPARISON))
    straight = sorted(op[len(STRAIGHT_THROUGH):] for op in found if op.startswith(STRAIGHT_THROUGH))
    kinks = sorted(op for op in found if op not in IMPLICIT_REPARAMETERISATION and not op.startswith(COMPARISON)
                   and not op.startswith(STRAIGHT_THROUGH))
    implicit = sorted(op for op in found if op in IMPLICIT_REPARAMETERISATION)
    said = []
    if straight:
        said.append(
            f"the rsample of {name} (or its transform) adds a value that is piecewise constant in its parameters (an "
            "argmax, argmin, one_hot of an index or of a multinomial draw, sort or topk indices, a comparison or a "
            "rounding cast to float) and a detached copy of a value that carries gradient to one that carries "
            f"gradient ({', '.join(straight)}): a straight-through sample such as "
            "one_hot(soft.argmax(-1)) + soft - soft.detach(). Its value jumps with the parameters while autograd "
            "sees the derivative of the soft part only, so the pathwise gradient is not that of the expectation: "
            "biased at order 1 already. For an unbiased gradient draw the discrete variable from a distribution "
            "with log_prob and use a score-function estimator on it ('score' with baseline='leave_one_out', or "
            "'rebar' / 'relax' for a Bernoulli or OneHotCategorical); for the biased straight-through gradient "
            "itself, use storch's 'straight_through' estimator (hard + p - ⊥p) or 'gumbel_straight_through' (a "
            "Gumbel-softmax sample's derivative) on a Bernoulli or OneHotCategorical (biased by design, and "
            "marked so); or return the soft (relaxed) value alone from rsample, a continuous "
            "relaxation whose pathwise gradient is exact for the relaxed objective")
    if kinks:
        ops = ", ".join(f"{op} ({inside(op)}its derivative of order {found[op]} is discontinuous)" for op in kinks)
        folded = (" AbsTransform folds the base sample, a kink wherever its sign moves with the parameters; a base "
                  "centred at a constant 0 is smooth (scale · |ε|): torch's HalfNormal and HalfCauchy are known "
                  "smooth." if "AbsBackward0" in found else "")
        said.append(
            f"the rsample of {name} holds {ops} on a path from its parameters to the sample (inside rsample or "
            "its transforms, not in the cost): the sample is a non-smooth function of the parameters, autograd "
            "reports 0 for the delta in the next derivative, and the pathwise estimate would be biased." + folded +
            " Write rsample (or the transform) smoothly (a sigmoid or softplus instead of a clamp, round or "
            "threshold; an operation on the parameters alone inside rsample, such as self.scale.clamp(min=1e-6), "
            "is counted too, as the graph does not show where the noise enters: apply it to the parameter before "
            "building the distribution)")
    if implicit:
        ops = ", ".join(f"{op}{' (' + inside(op)[:-2] + ')' if inside(op) else ''}" for op in implicit)
        said.append(
            f"{'and ' if kinks else ''}the rsample of {name} draws through {ops} on a path from its parameters to the "
            "sample: torch's implicit reparameterisation of the gamma family (Gamma, Chi2, Beta, Dirichlet, and "
            "StudentT, FisherSnedecor, InverseGamma, Wishart built on them), whose backward is exact at order 1 but "
            "has no derivative of its own, so a second derivative through the sample is wrong (Beta, Dirichlet: "
            "terms silently left out) or fails (Gamma). Differentiate through it once, or draw with explicit noise "
            "(Kumaraswamy instead of Beta, a LogNormal or a transformed Normal instead of Gamma)")
    if compared and not straight:  # (the comparison that made the straight-through value: said above)
        said.append(
            f"{'and ' if said else ''}the rsample of {name} (or its transform) compares a value that depends on its "
            f"parameters ({', '.join(compared)}: a mask or the condition of torch.where, such as torch.where(y > 0, "
            "y, 0), y * (y > 0), y.masked_fill(y < 0, 0)): the sample is a piecewise function of the parameters, "
            "with a kink or jump that autograd does not see, so derivatives of order >= 2 through it are biased. "
            "Write it smoothly (softplus, sigmoid, tanh instead of the mask), or differentiate at most once")
    return "; ".join(said)
