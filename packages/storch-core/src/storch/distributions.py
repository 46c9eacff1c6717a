"""Turning a distribution built from plate tensors into a raw one with the plates as batch dims.

User code builds ``torch.distributions`` objects from plate tensors (written for one sample).
An estimator samples from the *raw* distribution, whose parameters are the raw tensors aligned
to the union of their plates and expanded to the plate sizes, so that every plate entry gets
its own, independent samples.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import torch
from torch.distributions import (
    Bernoulli,
    Binomial,
    Categorical,
    ContinuousBernoulli,
    Dirichlet,
    Distribution,
    Gamma,
    Independent,
    LKJCholesky,
    MixtureSameFamily,
    Multinomial,
    OneHotCategorical,
    OneHotCategoricalStraightThrough,
    Poisson,
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    TransformedDistribution,
)
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical
from torch.distributions.transforms import AffineTransform, PowerTransform, Transform
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.distributions.utils import lazy_property

from .errors import UnsupportedDistributionError
from .plates.tensor import Plate, PlateTensor, align, plates_of, union_plates

__all__ = ["base_distribution", "unwrap_distribution", "raw_log_prob", "raw_sample", "strict_support",
           "rsample_max_order", "RSAMPLE_ORDER_NOTE", "enumeration_support", "rekey_transform_cache",
           "straight_through_rsample"]


def base_distribution(d: Distribution) -> Distribution:
    """The distribution under one ``Independent`` wrapper (the one that holds the parameters); ``d`` otherwise.

    Only ``Independent`` is unwrapped, once: a ``TransformedDistribution`` such as ``LogNormal`` is
    not its base ``Normal`` (a capability check that looked through it would accept it wrongly).
    """
    return d.base_dist if isinstance(d, Independent) else d

# a parameter given in two equivalent forms: keep one of them
_PAIRS = (("logits", "probs"),)


_PLAIN_PROPERTY: dict = {}


def _plain_property(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is a property that is not a lazy_property, cached per class.

    Looked up in the classes' ``__dict__``: ``getattr(cls, name)`` on a lazy_property builds a new
    descriptor object on every access (tens of microseconds per distribution).
    """
    key = (cls, name)
    r = _PLAIN_PROPERTY.get(key)
    if r is None:
        attr = next((k.__dict__[name] for k in cls.__mro__ if name in k.__dict__), None)
        r = _PLAIN_PROPERTY[key] = isinstance(attr, property) and not isinstance(attr, lazy_property)
    return r


def parameters(d: Distribution) -> dict:
    """The parameter tensors ``d`` was built from, by their ``arg_constraints`` names: of ``probs`` and
    ``logits`` the one that was given (never the other form, which torch computes and caches in the
    instance once read); a ``OneHotCategorical``'s or ``Multinomial``'s from its inner ``Categorical``. With
    :func:`rebuild`, the way to build ``d`` again from changed parameters (perturbed, detached copies
    to differentiate per sample). Public as ``storch.extending.parameters``."""
    if isinstance(d, (OneHotCategorical, Multinomial)):
        d = d._categorical
    params = _parameters(d)
    if "logits" in params and given_by_probs(d):  # both forms cached in d: _parameters keeps the logits
        params = {("probs" if n == "logits" else n): (d.probs if n == "logits" else v) for n, v in params.items()}
    return params


def _parameters(d: Distribution) -> dict:
    def available(name: str) -> bool:
        return name in d.__dict__ or _plain_property(type(d), name)

    names = [n for n in d.arg_constraints if available(n)]
    for keep, drop in _PAIRS:
        if keep in names and drop in names:
            names.remove(drop)  # one form is enough: never compute the other (e.g. a softmax)
    return {n: d.__dict__[n] if n in d.__dict__ else getattr(d, n) for n in names}


def _holds_plate_tensor(d, depth: int = 0, known: tuple[Plate, ...] = ()) -> bool:
    """Whether ``d`` (a distribution or a transform) or what it holds (base distributions, components,
    transforms and their parts) has a plate tensor with a plate that is not among ``known`` (by name)."""
    names = {p.name for p in known}
    for v in d.__dict__.values():
        items = v if isinstance(v, (list, tuple)) else (v,)
        for item in items:
            if type(item) is PlateTensor:
                if not known or any(p.name not in names for p in item._plates):
                    return True
            elif isinstance(item, (Distribution, Transform)) and depth < 8 and _holds_plate_tensor(
                    item, depth + 1, known):
                return True
    return False


def holds_grad(d) -> bool:
    """Whether a tensor that ``d`` (a distribution or a transform) holds, or what it holds (base
    distributions, components, transforms and their parts), requires grad: whether its parameters
    carry gradient. Read only for a node sampled under ``torch.no_grad()`` (``Node.no_grad_step``)."""
    return next(grad_parameters(d), None) is not None


def grad_parameters(d, depth: int = 0):
    """The tensors that ``d`` (a distribution or a transform) holds, or what it holds (base distributions,
    components, transforms and their parts), that require grad (raw, not plate tensors): its parameters
    that carry gradient, as far as its attributes show them (lazily computed ones, e.g. ``probs`` of a
    distribution built from ``logits``, once read). A generator: :func:`holds_grad` stops at the first."""
    for v in d.__dict__.values():
        items = v if isinstance(v, (list, tuple)) else (v,)
        for item in items:
            if type(item) is PlateTensor:
                item = item._raw
            if isinstance(item, torch.Tensor):
                if item.requires_grad:
                    yield item
            elif isinstance(item, (Distribution, Transform)) and depth < 8:
                yield from grad_parameters(item, depth + 1)


def unwrap_distribution(d: Distribution, within: tuple[Plate, ...] = ()) -> tuple[Distribution, tuple[Plate, ...]]:
    """Return ``(raw_distribution, plates)``; ``plates`` lead the raw batch shape.

    With ``within`` (a partition's plates at its last step, partition plate first), the raw batch
    shape leads with at least those plates, ``within[0]`` first: parameters from earlier steps of
    the partition are re-indexed to its last step, and missing plates are expanded.
    """
    if isinstance(d, Independent):
        base, plates = unwrap_distribution(d.base_dist, within)
        if not plates:
            return d, ()
        return Independent(base, d.reinterpreted_batch_ndims, validate_args=False), plates
    if not isinstance(d, Distribution):
        raise UnsupportedDistributionError(
            f"expected a torch.distributions.Distribution, got {type(d).__name__}"
        )
    if type(d) is TransformedDistribution:
        return _unwrap_transformed(d, within)
    if type(d) is MixtureSameFamily:
        return _unwrap_mixture(d, within)
    same = _as_raw(d, within)  # the common case, without looking up parameters or plates again
    if same is not None:
        return same
    torch_categorical = type(d) in (Categorical, OneHotCategorical)
    if torch_categorical:
        # torch's own categoricals: the parameters as the user's constructor left them (normalised;
        # probs too when argument validation computed them), carried over as Categorical.expand does
        c = d._categorical if type(d) is OneHotCategorical else d
        params = {n: c.__dict__[n] for n in ("logits", "probs") if n in c.__dict__}
        by_probs = given_by_probs(c)
        same = _categorical_on_one_layout(type(d), params, within, by_probs)
        if same is not None:
            return same
    else:
        try:
            params = _parameters(d)
        except NotImplementedError:
            params = {}
    # `within` first: where a parameter has the same plates in another order, `within`'s order wins, so
    # the parts of a MixtureSameFamily unwrapped within one tuple of plates get that very layout
    plates = union_plates([within] + [plates_of(v) for v in params.values()] + [()])
    if within and plates[0].name != within[0].name:  # the partition's plate first
        plates = (next(p for p in plates if p.name == within[0].name),) + tuple(
            p for p in plates if p.name != within[0].name)
    if _holds_plate_tensor(d, known=plates):
        # sampling it as it is would share one noise draw across the entries of those plates
        raise UnsupportedDistributionError(
            f"{type(d).__name__} holds plate tensors that storch cannot find among its "
            f"arg_constraints {sorted(type(d).arg_constraints)} (in an attribute such as a temperature, "
            "a base distribution or a transform): sampling it would share one noise draw across plate "
            "entries. Pass the per-data-point (or per-sample) tensors only as parameters listed in "
            "arg_constraints, build the other parts from plain tensors, or use a distribution that takes "
            "them as parameters (LogNormal(loc, scale), Independent(Normal(...)), "
            "TransformedDistribution(base, [AffineTransform(loc, scale)]))"
        )
    if not plates:
        return d, ()  # built from plain tensors: nothing to unwrap
    sizes = [p.size for p in plates]
    raw = {}
    m = len(plates)
    for name, v in params.items():
        if type(v) is PlateTensor:
            r = align(v._raw, v._plates, plates)
            # an expand to the shape it has is still a view (one more autograd node): skip it
            raw[name] = r if list(r.shape[:m]) == sizes else r.expand(*sizes, *r.shape[m:])
        else:
            raw[name] = v.expand(*sizes, *v.shape) if hasattr(v, "expand") else v
    if torch_categorical:
        return _categorical(type(d), raw, by_probs), plates
    return _rebuilt(d, raw, torch.Size(sizes)), plates


def rebuild(d: Distribution, params: dict) -> Distribution:
    """``d``'s class built from ``params`` (parameter tensors by their arg_constraints names: perturbed,
    expanded or re-aligned ones) and the constructor arguments ``d`` keeps outside its arg_constraints
    (a Multinomial's ``total_count``, a ContinuousBernoulli's ``lims``, a class's own ``self.k``), without
    argument validation. ``type(d)(**params)`` alone would silently give those arguments their defaults
    (a Multinomial of 1 trial). Public as ``storch.extending.rebuild``.

    Raises:
        UnsupportedDistributionError: an argument ``d`` does not keep where it can be found, or a class
            written outside torch whose copy may not be the same distribution (see ``unwrap_distribution``).
    """
    return _rebuilt(d, params, torch.Size())


def _rebuilt(d: Distribution, raw: dict, plates: torch.Size) -> Distribution:
    """The raw copy of ``d`` from ``raw`` (its parameters, with ``plates`` leading their batch dims) and the
    constructor arguments it keeps; refused where storch cannot tell that it is the same distribution."""
    known = _torch_owner(type(d))
    extra = _extra_arguments(d, raw, known)
    try:
        # parameters were validated when the user built `d`; the raw copy is internal
        new = _rebuild(type(d), raw, extra)
    except TypeError as e:
        raise UnsupportedDistributionError(
            f"storch cannot rebuild {type(d).__name__} from its parameters {sorted(raw)}"
            f"{' and constructor arguments ' + str(sorted(extra)) if extra else ''} ({e}); use a distribution "
            "whose constructor takes its arg_constraints as keywords, and keeps each other constructor "
            "argument in an attribute of the same name"
        ) from e
    if known is None:  # a class storch does not know: the rebuilt copy must be the user's distribution
        _check_rebuilt(d, new, raw, extra, plates)
    return new


# transforms whose tensor attributes storch re-aligns (their constructor takes them as keywords)
_TRANSFORM_PARAMS = {AffineTransform: ("loc", "scale"), PowerTransform: ("exponent",)}


def _unwrap_transformed(d: TransformedDistribution,
                        within: tuple[Plate, ...]) -> tuple[Distribution, tuple[Plate, ...]]:
    """A ``TransformedDistribution`` whose base distribution or transforms hold plate tensors.

    The base distribution is unwrapped with the plates of every plate tensor (the transforms' ones
    too), so each plate entry draws its own noise. A transform of :data:`_TRANSFORM_PARAMS`
    (``AffineTransform``, ``PowerTransform``) holding plate tensors is rebuilt from their raw tensors,
    aligned to those plates and padded to the per-sample rank of the value it transforms (so the
    per-sample dims broadcast as in one-sample code); any other transform holding one is refused.
    """
    found = [within]
    for t in d.transforms:
        names = _TRANSFORM_PARAMS.get(type(t), ())
        held = [t.__dict__.get(n) for n in names]
        found += [v._plates for v in held if type(v) is PlateTensor]
        if _holds_plate_tensor(t, known=tuple(p for g in found for p in g)):
            raise UnsupportedDistributionError(
                f"TransformedDistribution: its transform {type(t).__name__} holds plate tensors, and storch "
                f"can re-align the tensors only of {', '.join(c.__name__ for c in _TRANSFORM_PARAMS)} given "
                "directly in the list of transforms: sampling it as it is would share one noise draw across "
                "plate entries. Put the data-dependent part in the base distribution's parameters, pass "
                "AffineTransform/PowerTransform directly in the list, or apply the transform to the sample "
                "(y = f(est(base)))")
    wanted = union_plates(found + [()])
    if within and wanted and wanted[0].name != within[0].name:  # the partition's plate first
        wanted = (within[0],) + tuple(p for p in wanted if p.name != within[0].name)
    base, plates = unwrap_distribution(d.base_dist, wanted)
    if not plates:
        return d, ()  # built from plain tensors: nothing to unwrap
    m = len(plates)
    shape = d.base_dist.batch_shape + d.base_dist.event_shape  # per sample, as the transforms see it
    raw_transforms = []
    for t in d.transforms:
        names = _TRANSFORM_PARAMS.get(type(t), ())
        if any(type(t.__dict__.get(n)) is PlateTensor for n in names):
            kwargs = {}
            for n in names:
                v = t.__dict__[n]
                if type(v) is PlateTensor:
                    r = align(v._raw, v._plates, plates)
                    per = r.shape[m:]
                    if len(per) > len(shape):
                        raise UnsupportedDistributionError(
                            f"TransformedDistribution: {type(t).__name__}.{n} has per-sample shape {tuple(per)}, "
                            f"more dims than the value it transforms ({tuple(shape)}); give the base "
                            "distribution that shape (base.expand(...)), or apply the transform to the sample")
                    v = r.reshape(r.shape[:m] + (1,) * (len(shape) - len(per)) + per)
                kwargs[n] = v
            if type(t) is AffineTransform:
                raw_transforms.append(AffineTransform(**kwargs, event_dim=t.event_dim, cache_size=t._cache_size))
            else:
                raw_transforms.append(PowerTransform(**kwargs, cache_size=t._cache_size))
        else:
            raw_transforms.append(t)  # plain: broadcasts over the leading plate dims
        shape = t.forward_shape(shape)
    return TransformedDistribution(base, raw_transforms, validate_args=False), plates


def _unwrap_mixture(d: MixtureSameFamily,
                    within: tuple[Plate, ...]) -> tuple[Distribution, tuple[Plate, ...]]:
    """A ``MixtureSameFamily`` whose mixture or component distribution holds plate tensors (a Gaussian
    mixture per data point): both are unwrapped (with their own parameters, as any distribution) on one
    tuple of plates, so the raw mixture weights of each plate entry pair with that entry's components
    (batch dims: the plates, then the mixture's batch; the components' end with the K components), and
    the raw mixture is built from them. Each plate entry draws its own component index and value."""
    mix, comp = d.mixture_distribution, d.component_distribution
    raw_mix, plates = unwrap_distribution(mix, within)
    raw_comp, comp_plates = unwrap_distribution(comp, plates)
    if comp_plates != plates:  # the components have plates the weights do not: expand the weights to them
        raw_mix, plates = unwrap_distribution(mix, comp_plates)
    if not plates:
        return d, ()  # built from plain tensors: nothing to unwrap
    if plates != comp_plates:  # (unwrap_distribution keeps the order of `within`; a guard, not a path)
        raise UnsupportedDistributionError(
            f"MixtureSameFamily: storch could not put its mixture and component distributions on one layout "
            f"of plates ({[p.name for p in plates]} and {[p.name for p in comp_plates]}); build both from "
            "tensors on the same plates")
    return MixtureSameFamily(raw_mix, raw_comp, validate_args=False), plates


def _transforms(d: Distribution) -> list:
    """The transforms of ``d`` (a ``TransformedDistribution``, under ``Independent`` wrappers), or []."""
    while isinstance(d, Independent):
        d = d.base_dist
    return list(d.transforms) if isinstance(d, TransformedDistribution) else []


def rekey_transform_cache(d: Distribution, sample: torch.Tensor, value: torch.Tensor,
                          convert: Callable[[torch.Tensor], torch.Tensor],
                          into: Optional[Distribution] = None) -> list:
    """Let ``log_prob(value)`` reuse the pre-images that ``d``'s transforms cached when they made ``sample``.

    A ``TransformedDistribution`` whose transforms have ``cache_size=1`` (``TanhTransform(cache_size=1)``
    of a squashed Gaussian policy) keeps, per transform, the last ``(x, y)`` it computed, and its
    ``log_prob(y)`` reuses ``x`` only for that very tensor ``y`` (``is``). Elsewhere it inverts: atanh of a
    float32 sample that rounded to ±1 is infinite, where the cached pre-tanh value is finite. The value an
    estimator hands out is another object than the raw sample (a plate tensor wrapping it, or a detached
    copy), so without this the cache is missed. Walking the transforms from the last, each one whose
    cached output is (the previous step's) ``sample`` gets its cache keyed by ``value`` instead, its
    cached input by ``convert(input)`` (a plate tensor wrapper, ``torch.Tensor.detach``); the walk stops
    at the first transform that did not cache that value, or whose inverse does not read its own cache
    (``ComposeTransform``, an inverse ``t.inv``).

    Args:
        d: the distribution that drew ``sample`` (its transforms hold the caches).
        sample: the raw sample ``d`` returned.
        value: what ``log_prob`` will be called with instead (``sample`` wrapped, detached...).
        convert: maps each cached intermediate value as ``sample`` was mapped to ``value``.
        into: the distribution whose transforms get the new keys (default ``d``): the user's one, whose
            transforms are ``d``'s own objects or raw copies of them (a ``TransformedDistribution``
            with per-data-point parameters), position by position.

    After it, ``d.log_prob(sample)`` on the old key inverts again where ``into``'s transforms are ``d``'s
    objects: compute what needs the raw sample's log-probability first (an estimator's gradient function).

    Returns:
        The cached pre-images whose keys it moved (``d``'s raw ones, the last transform's first; ``[]``
        if none): ``log_prob(value)`` is computed from them, not from ``value`` (its autograd graph
        reaches the pre-tanh sample, not the sample handed out).
    """
    found: list = []
    have = _transforms(d)
    want = have if into is None or into is d else _transforms(into)
    if not have or len(want) != len(have):
        return found
    y, new_y = sample, value
    for t, u in zip(reversed(have), reversed(want)):
        if (t._cache_size != 1 or u._cache_size != 1 or type(t).inv is not Transform.inv
                or type(u).inv is not Transform.inv or type(t)._inv_call is not Transform._inv_call
                or type(u)._inv_call is not Transform._inv_call):
            return found  # no cache, or an inverse that reads another transform's cache
        x, cached_y = t._cached_x_y
        if cached_y is not y or x is None:
            return found
        new_x = convert(x)
        u._cached_x_y = (new_x, new_y)  # u.inv(new_y) is new_x: Transform._inv_call
        found.append(x)
        y, new_y = x, new_x
    return found


def _as_raw(d: Distribution, within: tuple[Plate, ...]) -> Optional[tuple[Distribution, tuple[Plate, ...]]]:
    """``(raw distribution, plates)`` for ``d`` without rebuilding it; ``None`` unless that is
    exactly what :func:`unwrap_distribution` would build.

    The common case (``Bernoulli(logits=x)``, ``Normal(mu, sigma)`` on tensors of one model): every
    tensor the distribution holds (parameters, and what its constructor or argument validation
    derived from them) is a plate tensor with the same plates (those of ``within`` too, if given),
    at their full sizes, and with one per-sample dim per batch and event dim. The raw tensors then
    already have the raw distribution's layout, so a copy of the object with them (and the plates
    prepended to its batch shape) is the raw distribution: no second constructor call
    (``broadcast_all``, shapes), no expand views. Anything else (plain tensors to expand, other
    plates, size-1 plate dims, tensors shaped unlike the batch, base distributions, containers)
    returns ``None``.
    """
    out = {}
    plates = last = r = None
    want = sizes = m = 0
    for k, v in d.__dict__.items():
        t = type(v)
        if t is PlateTensor:
            if v is last:  # the same tensor again (torch's `_param` is the logits or probs): checked
                out[k] = r
                continue
            r, p = v._raw, v._plates
            if plates is None:
                plates = p
                if within and p is not within and p != within:
                    return None
                m = len(p)
                sizes = (p[0].size,) if m == 1 else tuple(q.size for q in p)
                want = m + len(d.batch_shape) + len(d.event_shape)
            elif p is not plates and p != plates:
                return None
            if r.dim() != want or r.shape[:m] != sizes:
                return None
            out[k] = r
            last = v
        elif t is torch.Size or t is bool or t is int or t is float or v is None:
            out[k] = v
        else:
            return None  # plain tensors (to expand), base distributions, containers, anything else
    if plates is None:
        return None
    new = type(d).__new__(type(d))
    new.__dict__.update(out)
    new._batch_shape = torch.Size(sizes) + d.batch_shape
    new._validate_args = False  # validated when the user built `d`
    return new, plates


def raw_log_prob(d: Distribution, value: torch.Tensor) -> torch.Tensor:
    """``d.log_prob(value)`` for a raw distribution and raw ``value``.

    A ``Bernoulli`` given by its logits, without argument validation (the raw copy of a user's
    distribution), is computed as torch computes it, ``-binary_cross_entropy_with_logits``, with
    the logits expanded to the value's shape directly instead of through ``broadcast_all`` (its
    Python checks and a second view for the value): the same kernel, values and derivatives. A ``Poisson`` (or an ``Independent`` of
    one) is computed by :func:`_poisson_log_prob`: torch's values, and finite derivatives where a rate
    is exactly 0 (torch's are NaN there). Any other case (and any other distribution) calls
    ``d.log_prob``.
    """
    t = type(d)
    if t is Poisson:
        if d._validate_args:
            d._validate_sample(value)
        return _poisson_log_prob(d.rate, value)
    if t is Independent and type(d.base_dist) is Poisson:
        lp, n = raw_log_prob(d.base_dist, value), d.reinterpreted_batch_ndims
        return lp.sum(tuple(range(-n, 0))) if n else lp
    if t is Bernoulli and not d._validate_args and type(value) is torch.Tensor:
        logits = d.__dict__.get("logits")
        if type(logits) is torch.Tensor:
            shape = value.shape
            if logits.shape != shape:
                k = logits.dim()
                if k > len(shape) or shape[len(shape) - k:] != logits.shape:
                    return d.log_prob(value)  # a broadcast of the value too: torch's own
                logits = logits.expand(shape)
            return -binary_cross_entropy_with_logits(logits, value, reduction="none")
    return d.log_prob(value)


def raw_sample(d: Distribution) -> torch.Tensor:
    """``d.sample()`` (one draw, no sample shape) for a raw distribution.

    A ``Bernoulli`` without argument validation (the raw copy of a user's distribution) is drawn
    as torch draws it, ``torch.bernoulli`` of its probabilities (``sigmoid(logits)`` when given
    by its logits) without gradient: the same random numbers and values, without the lazy
    property's grad mode, a ``no_grad`` block (the parameters are detached), ``_extended_shape`` and
    an expand to the shape the probabilities have. The probabilities computed here are not cached on
    ``d`` (reading ``d.probs`` computes them again). Any other case calls ``d.sample()``.
    """
    if type(d) is Bernoulli and not d._validate_args:
        state = d.__dict__
        p = state.get("probs")
        logits = state.get("logits") if p is None else None
        if type(p if p is not None else logits) is torch.Tensor:
            batch = d._batch_shape
            # detached instead of under no_grad (the same values and random numbers; a grad-mode
            # context costs ~1 us, a policy's step draws once per step)
            p = torch.sigmoid(logits.detach()) if p is None else p.detach()  # logits_to_probs(is_binary=True)
            return torch.bernoulli(p if p.shape == batch else p.expand(batch))
    return d.sample()


def _categorical_on_one_layout(cls: type, params: dict, within: tuple[Plate, ...], by_probs: bool):
    """``(raw categorical, plates)`` when its parameters (the logits, and the probs argument
    validation computed) are plate tensors on the same plates (``within``'s, if given) at their
    full sizes: the raw tensors are the raw parameters as they are, what the general path's
    ``union_plates`` and ``align`` would give. ``None`` otherwise. (``_as_raw`` does this for
    other distributions; a ``OneHotCategorical`` holds a ``Categorical``, which it leaves alone.)"""
    plates = None
    raw = {}
    for name, v in params.items():
        if type(v) is not PlateTensor:
            return None
        p = v._plates
        if plates is None:
            plates = p
            if within and p is not within and p != within:
                return None
        elif p is not plates and p != plates:
            return None
        r = v._raw
        if any(r.shape[i] != q.size for i, q in enumerate(p)):  # a size-1 plate dim: expanded there
            return None
        raw[name] = r
    if plates is None:
        return None
    return _categorical(cls, raw, by_probs), plates


def _categorical(cls: type, raw: dict, by_probs: bool) -> Distribution:
    """A ``Categorical`` / ``OneHotCategorical`` from already normalised ``logits`` and/or ``probs``;
    ``by_probs``: whether the user's was given by ``probs`` (:func:`given_by_probs`).

    Like ``Categorical.expand``: no second normalisation (a logsumexp) and no second softmax when
    the user's distribution already computed ``probs``; no argument validation (done when the user
    built it).
    """
    c = Categorical.__new__(Categorical)
    # _param (set last): the form the user gave, as Categorical.__init__ sets it. Not the logits whenever
    # they are there: a distribution given by probs may hold logits too (argument validation of a
    # OneHotCategorical reads them, as does a user's `d.logits`), computed from clamped probabilities
    # (log(eps) = -15.9 for a probability of exactly 0), and the copy then looked given by those logits:
    # strict_support left it alone and the enumerating estimators handed the cost values that are never
    # drawn
    for name in (("logits", "probs") if by_probs else ("probs", "logits")):
        if name in raw:
            setattr(c, name, raw[name])
            c._param = raw[name]
    c._num_events = c._param.shape[-1]
    Distribution.__init__(c, c._param.shape[:-1], validate_args=False)
    if cls is Categorical:
        return c
    d = OneHotCategorical.__new__(OneHotCategorical)
    d._categorical = c
    Distribution.__init__(d, c.batch_shape, c.param_shape[-1:], validate_args=False)
    return d


def _rebuild(cls: type, raw: dict, extra: dict) -> Distribution:
    """``cls(**raw, **extra)`` without argument validation (which reads values: a device sync, impossible
    on meta)."""
    if issubclass(cls, OneHotCategorical) and cls.__init__ is OneHotCategorical.__init__:
        # OneHotCategorical.__init__ builds its Categorical with the *default* validation, whatever
        # validate_args says; build both parts without it
        d = cls.__new__(cls)
        d._categorical = Categorical(**raw, validate_args=False)
        Distribution.__init__(d, d._categorical.batch_shape, d._categorical.param_shape[-1:], validate_args=False)
        return d
    if issubclass(cls, Multinomial) and cls.__init__ is Multinomial.__init__:
        # likewise: Multinomial.__init__ builds its Categorical and Binomial with the default validation
        d = cls.__new__(cls)
        d.total_count = extra["total_count"]
        d._categorical = Categorical(**raw, validate_args=False)
        d._binomial = Binomial(total_count=d.total_count, probs=d._categorical.probs, validate_args=False)
        Distribution.__init__(d, d._categorical.batch_shape, d._categorical.param_shape[-1:], validate_args=False)
        return d
    return cls(**raw, **extra, validate_args=False)


# -- constructor arguments outside arg_constraints ------------------------------------------------

# torch's distributions whose constructor takes arguments outside arg_constraints, and the attribute
# each keeps them in: the raw copy is built with them (from its parameters alone, it would silently
# take their defaults: a Multinomial with total_count 1, ContinuousBernoulli's default lims).
# torch's other classes take only their arg_constraints (Uniform's and Wishart's are properties that
# list them); Independent, TransformedDistribution and MixtureSameFamily (its parts are distributions,
# not parameters) are unwrapped before.
_TORCH_EXTRA_ARGUMENTS: dict[type, dict[str, str]] = {
    Multinomial: {"total_count": "total_count"},
    ContinuousBernoulli: {"lims": "_lims"},
    LKJCholesky: {"dim": "dim"},
    LogitRelaxedBernoulli: {"temperature": "temperature"},
    RelaxedBernoulli: {"temperature": "temperature"},  # a property: its LogitRelaxedBernoulli's
    ExpRelaxedCategorical: {"temperature": "temperature"},
    RelaxedOneHotCategorical: {"temperature": "temperature"},
}

_OWNER: dict = {}
_SIGNATURE: dict = {}
_LAZY: dict = {}


def _torch_owner(cls: type) -> Optional[type]:
    """The torch.distributions class whose ``__init__`` ``cls`` uses (``cls`` itself, or a subclass
    that does not define its own), or ``None`` for a constructor written outside torch."""
    if cls not in _OWNER:
        owner = next(k for k in cls.__mro__ if "__init__" in k.__dict__)
        _OWNER[cls] = owner if owner.__module__.startswith("torch.distributions.") else None
    return _OWNER[cls]


def _lazy_names(cls: type) -> frozenset:
    """The names of ``cls``'s lazy properties (cached in the instance's ``__dict__`` when read)."""
    r = _LAZY.get(cls)
    if r is None:
        r = _LAZY[cls] = frozenset(n for k in cls.__mro__ for n, v in k.__dict__.items()
                                   if isinstance(v, lazy_property))
    return r


def _extra_arguments(d: Distribution, raw: dict, known: Optional[type]) -> dict:
    """The constructor arguments of ``d`` outside its parameters, read from ``d``, to build its raw copy.

    torch's classes: those of :data:`_TORCH_EXTRA_ARGUMENTS`. A class written outside torch: each
    named parameter of its ``__init__`` that is not among its arg_constraints, read from the attribute
    of the same name (or with a leading underscore, or a property of that name); one that ``d`` does not
    keep there is refused (the copy would take its default, whatever the user passed).
    (``*args`` and ``**kwargs`` are taken as forwarded to the base class: :func:`_check_rebuilt`
    compares the copy's attributes with ``d``'s.) A plate tensor there is refused: storch re-aligns only
    the parameters of arg_constraints (a temperature per data point would broadcast against the plate
    dims of the raw parameters, not their per-sample dims).
    """
    cls = type(d)
    if known is not None:
        names = _TORCH_EXTRA_ARGUMENTS.get(known, {})
        extra = {n: getattr(d, a) for n, a in names.items()}
    else:
        sig = _SIGNATURE.get(cls)
        if sig is None:
            try:
                sig = inspect.signature(cls.__init__).parameters
            except (TypeError, ValueError):
                sig = {}
            sig = _SIGNATURE[cls] = tuple(
                n for i, (n, p) in enumerate(sig.items())
                if i and n != "validate_args" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        constrained = d.arg_constraints
        lazy = _lazy_names(cls)
        extra = {}
        for n in sig:
            if n in raw or n in constrained:
                continue  # a parameter, or another form of one (probs for logits): None
            for a in (n, "_" + n):
                if a in d.__dict__ and a not in lazy:
                    extra[n] = d.__dict__[a]
                    break
            else:
                if not _plain_property(cls, n):
                    raise UnsupportedDistributionError(
                        f"storch rebuilds {cls.__name__} from its parameters {sorted(constrained)} with the plates "
                        f"as batch dims, and its constructor also takes {n!r}, which it does not keep as self.{n} "
                        f"(or self._{n}): the copy would take {n}'s default, whatever you passed. Keep it as "
                        f"self.{n} = {n}, or compute the parameters outside and pass them to a distribution "
                        "that takes only its arg_constraints")
                extra[n] = getattr(d, n)
    for n, v in extra.items():
        if type(v) is PlateTensor or (isinstance(v, (Distribution, Transform)) and _holds_plate_tensor(v)) or (
                isinstance(v, (list, tuple)) and any(type(x) is PlateTensor for x in v)):
            raise UnsupportedDistributionError(
                f"{cls.__name__}: its constructor argument {n!r} holds a plate tensor, and storch re-aligns "
                f"only the parameters in its arg_constraints {sorted(d.arg_constraints)}: sampling it would "
                f"not pair each plate entry with its own {n}. Pass {n} as a plain tensor (a value shared by "
                "all plate entries), or write a distribution that lists it in arg_constraints")
    return extra


def _check_rebuilt(d: Distribution, new: Distribution, raw: dict, extra: dict, plates: torch.Size) -> None:
    """Refuse the raw copy ``new`` of ``d`` (a class written outside torch) where it may not be the same
    distribution.

    With ``extra`` arguments carried over, the copy must keep its raw parameters and those arguments as
    they were passed (the very tensors, or views of them: compared without reading values): a
    constructor that transforms them (``self.logits = logits / temperature``, a normalisation) would
    apply the transformation a second time to what ``d`` keeps. Then the copy must agree with ``d`` in
    its event and batch shapes and its attributes (plain values, tensors' shapes and dtypes, held
    distributions): an argument that took its default shows there.
    """
    if extra:
        for n, v in list(raw.items()) + list(extra.items()):
            if isinstance(v, torch.Tensor) and not _kept_as_given(new.__dict__.get(n, new.__dict__.get("_" + n)), v):
                raise UnsupportedDistributionError(
                    f"storch rebuilds {type(d).__name__} from the parameters and constructor arguments it keeps "
                    f"({sorted(raw)} with the plates as batch dims, and {sorted(extra)}), and its constructor does "
                    f"not keep {n!r} as it was given (it transforms it, e.g. a normalisation or a division by "
                    "a temperature): rebuilding from the kept values would transform them again. Compute the "
                    "transformed parameters outside and pass them to a distribution whose constructor keeps them "
                    "(torch's Categorical(logits=logits / t)), or keep the arguments as given")
    where = _differs(d, new, plates, 0)
    if where is not None:
        raise UnsupportedDistributionError(
            f"storch rebuilds {type(d).__name__} from its raw parameters {sorted(d.arg_constraints)} (the "
            "plates as batch dims) and the constructor arguments it keeps in attributes of the same name, "
            f"and the copy differs from yours in {where}: a constructor argument took its default. Keep each "
            "constructor argument in an attribute of the same name (self.k = k), as a named parameter of "
            "__init__ (not in **kwargs)")


def _kept_as_given(w: Any, v: torch.Tensor) -> bool:
    """Whether ``w`` is ``v`` or a view of it with ``v``'s values (``v`` broadcast, as ``broadcast_all``
    gives): the same storage, offset and dtype, and the strides of ``v.expand(w.shape)``. No value is
    read (no device sync; meta tensors have no storage to compare, so only ``w is v`` is accepted)."""
    if w is v:
        return True
    if type(w) is not torch.Tensor or type(v) is not torch.Tensor or w.dtype != v.dtype or v.is_meta:
        return False
    try:
        e = v.expand(w.shape)
        return (w.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
                and w.storage_offset() == v.storage_offset() and w.stride() == e.stride())
    except RuntimeError:  # not a broadcast of v, or a tensor without storage
        return False


def _differs(d: Distribution, new: Any, plates: torch.Size, depth: int) -> Optional[str]:
    """The first attribute (a dotted name) in which ``new`` is not ``d`` rebuilt on ``plates``, or None.

    Values are not compared (that reads them: a device sync, and impossible on meta or while tracing),
    only what decides a distribution's meaning besides its parameters: plain values (numbers, flags,
    strings, shapes), tensors' shapes and dtypes (a derived tensor may gain the plates as leading dims),
    held distributions, recursively."""
    if type(new) is not type(d):
        return "its type"
    if new.event_shape != d.event_shape:
        return "event_shape"
    b, ob = new.batch_shape, d.batch_shape
    if depth == 0:
        if b != plates + ob:
            return "batch_shape"
    elif b[len(b) - len(ob):] != ob or len(b) > len(ob) + len(plates):  # a held one: built from plate tensors or not
        return "batch_shape"
    lazy = _lazy_names(type(d))
    for k, v in d.__dict__.items():
        if k in lazy or k in ("_batch_shape", "_event_shape", "_validate_args"):
            continue
        if k not in new.__dict__:
            return k
        inner = _differs_value(v, new.__dict__[k], plates, depth)
        if inner is not None:
            return k + inner
    return None


def _differs_value(v: Any, w: Any, plates: torch.Size, depth: int) -> Optional[str]:
    """'' (or a dotted or indexed tail) where ``w`` is not the rebuilt counterpart of ``v``, or None."""
    if isinstance(v, torch.Tensor):  # a plate tensor's shape is its per-sample shape
        if not isinstance(w, torch.Tensor) or w.dtype != v.dtype:
            return ""
        n = v.dim()
        return None if w.shape[w.dim() - n:] == v.shape and w.dim() <= n + len(plates) else ""
    if isinstance(v, Distribution):
        if depth >= 8:
            return None
        inner = _differs(v, w, plates, depth + 1)
        return None if inner is None else "." + inner
    if isinstance(v, (list, tuple)) and not isinstance(v, torch.Size):
        if type(w) is not type(v) or len(w) != len(v):
            return ""
        for i, (a, b) in enumerate(zip(v, w)):
            inner = _differs_value(a, b, plates, depth)
            if inner is not None:
                return f"[{i}]{inner}"
        return None
    if v is None or isinstance(v, (bool, int, float, complex, str, torch.Size, torch.dtype, torch.device)):
        same = type(w) is type(v) and (v == w or (v != v and w != w))  # NaN: the same value
        return None if same else ""
    return None if type(w) is type(v) else ""  # anything else (a function, a module): its kind only


# -- what torch's rsample can be differentiated to -------------------------------------------------


def rsample_max_order(d: Distribution) -> float:
    """The highest derivative order to which autograd differentiates ``d.rsample()`` correctly.

    1 when ``d`` draws through torch's implicit reparameterisation of the gamma family with a
    concentration that carries gradient: ``Gamma`` and ``Chi2`` (``torch._standard_gamma``),
    ``Dirichlet`` and ``Beta`` (``torch._sample_dirichlet``), and every distribution that holds one
    (``StudentT``, ``FisherSnedecor``, ``InverseGamma``, ``Wishart``, and ``Independent`` or
    ``TransformedDistribution`` wrappers of them). Their backward (``_standard_gamma_grad``,
    ``_dirichlet_grad``) is exact but has no derivative of its own: a second derivative through the
    sample raises (Gamma) or silently leaves out terms (Beta, Dirichlet). ``math.inf`` otherwise
    (``Normal``, ``LogNormal``, ``Kumaraswamy``, ``Gumbel``, ...: explicit functions of the noise).
    """
    if isinstance(d, (Gamma, Dirichlet)):
        return 1 if d.concentration.requires_grad else math.inf
    for v in d.__dict__.values():
        if isinstance(v, Distribution) and rsample_max_order(v) < math.inf:
            return 1
    return math.inf


def straight_through_rsample(d: Distribution) -> bool:
    """Whether ``d.rsample()`` is a straight-through estimator rather than a reparameterisation.

    torch's ``OneHotCategoricalStraightThrough.rsample`` returns ``hard + probs - ⊥probs``: the value is
    a hard sample, its derivative that of ``probs``. That is not the derivative of a sample as a function
    of the parameters (a discrete sample has none), so a pathwise estimator (``reparameterization``,
    ``lax``) built on it is biased at every order (a z-test gave |z| 63 at order 1). Looks under
    ``Independent`` and ``TransformedDistribution`` wrappers.
    """
    while isinstance(d, (Independent, TransformedDistribution)):
        d = d.base_dist
    return isinstance(d, OneHotCategoricalStraightThrough)


RSAMPLE_ORDER_NOTE = (
    "torch's rsample of the gamma family (Gamma, Chi2, Beta, Dirichlet, and StudentT, FisherSnedecor, "
    "InverseGamma, Wishart built on them) is an implicit reparameterisation whose backward has no "
    "derivative of its own, so a second derivative through the sample is wrong (Beta, Dirichlet) or fails "
    "(Gamma)")


# -- the values an enumerating estimator walks ---------------------------------------------------


def enumeration_support(d: Distribution) -> torch.Tensor:
    """``d.enumerate_support(expand=False)``: every value, shape ``(K, 1, ..., 1, *event)``.

    A ``Binomial`` whose ``total_count`` differs between entries (a count per data point), which
    torch's ``enumerate_support`` refuses, gets the counts 0..max(total_count): a count above an
    entry's own total has log-probability -inf there (an impossible value, which ``expect`` weighs 0
    and never hands to the cost).
    """
    try:
        return d.enumerate_support(expand=False)
    except NotImplementedError as e:
        if not isinstance(d, Binomial):
            raise UnsupportedDistributionError(
                f"{type(d).__name__}.enumerate_support is not implemented for this distribution ({e}); use a "
                "sampling estimator (e.g. 'score') for this node") from e
        k = int(d.total_count.max())
        values = torch.arange(1 + k, dtype=d._param.dtype, device=d._param.device)
        return values.view((-1,) + (1,) * len(d.batch_shape))


# -- values a distribution never draws ---------------------------------------------------------


class _StrictBernoulli(Bernoulli):
    """A ``Bernoulli`` whose ``log_prob`` is ``-inf`` on the value it never draws. Given by probabilities:
    where the probability is exactly 0 (value 1 at p = 0, value 0 at p = 1); torch's own ``log_prob``
    clamps p to [eps, 1 - eps] (log p(1) = -15.9 at p = 0 in float32) although ``sample`` never draws
    such a value. Given by logits: where a logit is infinite (a masked bit, ``logits + mask`` with
    ``mask = -inf``, or a certain one at ``+inf``), whose torch ``log_prob`` is NaN for the value it
    always draws (inf - inf), so an enumerating estimator found no possible joint value at all
    (:func:`_infinite_logits_log_prob`). Elsewhere the same values and derivatives as torch's."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if not given_by_probs(self):
            return _infinite_logits_log_prob(self.logits, value, self.logits.new_ones(()),
                                             lambda logits: Bernoulli(logits=logits, validate_args=False).log_prob(value))
        lp = super().log_prob(value)
        p = self.probs
        never = torch.where(value.to(torch.bool), p == 0, p == 1)
        return lp.masked_fill(never, -math.inf)


class _StrictBinomial(Binomial):
    """A ``Binomial`` whose ``log_prob`` is ``-inf`` on the counts it never draws: given by probabilities,
    any count above 0 at p = 0 and any below ``total_count`` at p = 1; given by logits, every count but
    0 at a logit of ``-inf`` and every count but ``total_count`` at ``+inf`` (torch's is NaN there), as
    :class:`_StrictBernoulli`."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if not given_by_probs(self):
            n = self.total_count
            return _infinite_logits_log_prob(self.logits, value, n,
                                             lambda logits: Binomial(n, logits=logits, validate_args=False).log_prob(value))
        lp = super().log_prob(value)
        p = self.probs
        never = ((p == 0) & (value > 0)) | ((p == 1) & (value < self.total_count))
        return lp.masked_fill(never, -math.inf)


class _StrictPoisson(Poisson):
    """A ``Poisson`` whose ``log_prob`` has finite derivatives where a rate is exactly 0
    (:func:`_poisson_log_prob`; torch's are NaN there); elsewhere torch's values and derivatives."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _poisson_log_prob(self.rate, value)


def _poisson_log_prob(rate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log p(value | rate) = value log rate - rate - lgamma(value + 1) of a Poisson, for rates >= 0.

    torch allows a rate of exactly 0 (a zero-inflated Poisson ``Poisson(lam * z)``, z ~ Bernoulli): a
    point mass at 0, log p(0) = -rate (derivative -1, finite), and every count above 0 impossible
    (-inf, never drawn). torch's ``value.xlogy(rate)`` has those values, but its derivative with
    respect to the rate is value / rate = 0 / 0 = NaN at (0, 0), which poisoned the gradient of every
    parameter upstream (``lam``) although d rate / d lam is 0 there. Here the log term reads 1 in
    place of a zero rate where the value is 0 (xlogy(0, 1) = 0, derivative 0 / 1 = 0) and 0 where it
    is above 0 (xlogy(k, 0) = -inf, the impossible value): one ``torch.where``, whose backward sends
    the rate no derivative through the log term at those entries (and none of the NaN or infinity that
    it computes there), so the rate gets exactly d(-rate) = -1. Where the rate is above 0 the values
    and derivatives (of every order) are torch's.
    """
    safe = torch.where(rate > 0, rate, value == 0)  # (a bool promoted to the rate's dtype: 1 or 0)
    return value.xlogy(safe) - rate - (value + 1).lgamma()


def _infinite_logits_log_prob(logits: torch.Tensor, value: torch.Tensor, top: torch.Tensor,
                              torch_log_prob: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """log p(value) of a Bernoulli or Binomial given by ``logits`` that may be infinite.

    A logit of ``-inf`` draws 0 surely and one of ``+inf`` draws ``top`` (1, or ``total_count``): log p
    is 0 on that value and ``-inf`` on every other. torch's formula gives NaN there (inf - inf, or
    0 * inf), so it runs on the finite logits only (the infinite ones replaced by 0 and their result
    discarded: no NaN in the derivatives either); there the values and derivatives are torch's.
    """
    infinite = torch.isinf(logits)
    lp = torch_log_prob(torch.where(infinite, torch.zeros_like(logits), logits))
    sure = torch.where(logits > 0, top.to(logits.dtype), torch.zeros((), dtype=logits.dtype, device=logits.device))
    fixed = torch.where(value == sure, torch.zeros_like(lp), torch.full_like(lp, -math.inf))
    return torch.where(infinite, fixed, lp)


_STRICT = {Bernoulli: _StrictBernoulli, Binomial: _StrictBinomial, Poisson: _StrictPoisson}


def given_by_probs(d: Distribution) -> bool:
    """Whether ``d`` (a ``Bernoulli``, ``Binomial``, ``Categorical``, ``OneHotCategorical``, ...) was built
    from ``probs=`` rather than ``logits=``: torch's ``logits`` are then computed from clamped probabilities
    (a probability of exactly 0 gets log(eps), not ``-inf``)."""
    if isinstance(d, (OneHotCategorical, Multinomial)):
        d = d._categorical
    param = d.__dict__.get("_param")
    return param is not None and param is d.__dict__.get("probs")


def strict_support(d: Distribution, traced: bool = False) -> Distribution:
    """``d`` with ``log_prob = -inf`` on every value it never draws: probabilities that are exactly 0.

    ``torch.distributions`` computes ``log_prob`` of a ``Bernoulli``, ``Binomial``, ``Categorical`` or
    ``OneHotCategorical`` given by ``probs`` from clamped probabilities, so a value of probability 0
    (a masked action ``probs * mask``, a saturated ``sigmoid``) gets log p = log(eps) (-15.9 in
    float32) while ``sample`` never draws it. An estimator that enumerates the support or samples it
    without replacement (``expect``, ``unordered_set``, ``sum_and_sample``) reads those log
    probabilities to decide which values exist: the base class passes every estimator with
    ``requires_enumerate_support`` its distribution through this (``Estimator._sample_node``,
    ``_extend_partition``), so such values are impossible (``-inf``) there as they are with ``-inf``
    logits, and the user's cost never sees them. A ``Bernoulli`` or ``Binomial`` given by ``logits``
    with an infinite logit (``logits + mask``, mask ``-inf`` on a masked bit) needs the same: torch's
    ``log_prob`` is NaN on the value such a logit always draws, so no joint value looked possible
    (``unordered_set`` drew one impossible value with a zero gradient, ``expect`` gave NaN).
    A ``Poisson`` with a rate of exactly 0 (a zero-inflated Poisson ``Poisson(lam * z)``) has torch's
    values (log p(0) = 0 there, -inf above 0) but NaN derivatives (``value.xlogy(rate)``: 0 / 0), which
    made the gradient of every parameter upstream NaN (``importance`` reads this log_prob).

    Returns ``d`` itself unless it is (an ``Independent`` of) one of those four, given by ``probs``,
    with a probability that is exactly 0 (checked by value; with ``traced``, which
    ``storch.extending.strict_support`` passes while ``storch.compile`` records the step: whenever it
    is given by ``probs``, so that the program does not depend on the values), or a ``Bernoulli`` /
    ``Binomial`` given by ``logits`` with an infinite logit (checked by value; with ``traced``, always:
    its ``log_prob`` is a ``torch.where`` on the logits, so a step that ``storch.compile`` traced with
    finite logits gives the eager result when a replayed call meets infinite ones, where torch's NaN
    made ``expect``'s value and gradient NaN), or a ``Poisson`` with a
    rate of exactly 0 (checked by value; with ``traced``, always). Otherwise a copy that samples as ``d``
    does (the same random numbers) and has the same log-probabilities, with the same derivatives, on
    every value it can draw: a ``Categorical`` / ``OneHotCategorical`` with ``-inf`` logits there, a
    ``Bernoulli`` / ``Binomial`` whose ``log_prob`` masks those values, a ``Poisson`` whose ``log_prob``
    (:func:`_poisson_log_prob`) has finite derivatives at a zero rate. The derivative
    with respect to a probability that is exactly 0 is not estimated (it depends on the cost of a
    value that is never drawn); the estimates are of the derivative within the support.
    """
    t = type(d)
    if t is Independent:
        base = strict_support(d.base_dist, traced)
        return d if base is d.base_dist else Independent(base, d.reinterpreted_batch_ndims, validate_args=False)
    if t is Poisson:
        # a rate of exactly 0: torch's log_prob has the right values but NaN derivatives (checked by value;
        # while traced always, so that the program does not depend on the values)
        rate = d.rate
        if not traced and not rate.is_meta and not bool((rate == 0).any()):
            return d
        new = _StrictPoisson.__new__(_StrictPoisson)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    if t not in (Bernoulli, Binomial, Categorical, OneHotCategorical):
        return d
    inner = d._categorical if t is OneHotCategorical else d
    strict = _STRICT.get(t)
    if not given_by_probs(inner):
        # given by logits: a Categorical's -inf logits are -inf log-probabilities already; a Bernoulli's or
        # Binomial's infinite logits make torch's log_prob NaN on the value they always draw, and -inf or
        # NaN on the others (checked by value; while traced, the copy always: the program must not depend
        # on values, and the copy's log_prob is exact at finite and infinite logits alike)
        if strict is None:
            return d
        logits = inner.logits
        if not traced and (logits.is_meta or not bool(torch.isinf(logits).any())):
            return d
        new = strict.__new__(strict)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    p = inner.probs
    never = (p == 0) | (p == 1) if strict is not None else p == 0
    if not traced and not p.is_meta and not bool(never.any()):
        return d
    if strict is not None:
        new = strict.__new__(strict)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    c = Categorical.__new__(Categorical)
    c.__dict__.update(inner.__dict__)
    c.logits = torch.where(never, torch.full((), -math.inf, dtype=p.dtype, device=p.device), inner.logits)
    c._validate_args = False
    if t is Categorical:
        return c
    new = OneHotCategorical.__new__(OneHotCategorical)
    new.__dict__.update(d.__dict__)
    new._categorical = c
    new._validate_args = False
    return new
