"""Turning a distribution built from plate tensors into a raw one with the plates as batch dims.

User code builds ``torch.distributions`` objects from plate tensors (written for one sample).
An estimator samples from the *raw* distribution, whose parameters are the raw tensors aligned
to the union of their plates and expanded to the plate sizes, so that every plate entry gets
its own, independent samples.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import (Categorical, Distribution, Independent, MixtureSameFamily, OneHotCategorical,
    TransformedDistribution)
from torch.distributions.transforms import AffineTransform, PowerTransform, Transform

from ..errors import UnsupportedDistributionError
from ..plates.tensor import Plate, PlateTensor, align, plates_of, union_plates
from .parameters import _holds_plate_tensor, _parameters, given_by_probs
from .rebuild import _categorical, _rebuilt

__all__ = ["unwrap_distribution"]


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
    if type(d) is TransformedDistribution or (isinstance(d, TransformedDistribution) and _copyable(d)):
        return _unwrap_transformed(d, within)  # (torch's subclasses, LogNormal, RelaxedBernoulli: rebuilt below)
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
            "TransformedDistribution(base, [AffineTransform(loc, scale)]))" + _subclass_fix(d)
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

    A subclass (that keeps this structure: :func:`_copyable`) is copied, not built again: the copy keeps its
    methods and attributes, with the raw base distribution and transforms, the shapes they give, and each
    plate tensor it holds itself (``self.loc``) aligned and expanded to the plates and padded to the base's
    per-sample rank, as the base's parameters are.
    """
    found = [within]
    if type(d) is not TransformedDistribution:  # a subclass's own plate tensors (self.loc): their plates too
        found += [v._plates for v in d.__dict__.values() if type(v) is PlateTensor]
    for t in d.transforms:
        names = _TRANSFORM_PARAMS.get(type(t), ())
        held = [t.__dict__.get(n) for n in names]
        found += [v._plates for v in held if type(v) is PlateTensor]
        # only storch's re-aligned transforms may hold plate tensors of known plates: a user's transform is applied
        # as it is to raw tensors (a plate tensor there makes a nested, wrongly broadcast sample), whatever plates
        # the distribution's other parts have
        if _holds_plate_tensor(t, known=tuple(p for g in found for p in g)) if names else _holds_plate_tensor(t):
            stale = _stale_attributes(t)
            if stale:
                raise UnsupportedDistributionError(
                    f"TransformedDistribution: its transform {type(t).__name__} keeps a plate tensor of a finished "
                    f"step in {', '.join(f'self.{a}' for a in stale)} (a value its _call kept, as a pyro-style "
                    "log-det cache does, when the transform was applied to a sample by hand, y = f(est(base))). "
                    "Storch cannot tell it from a parameter. Clear it before using the transform in a "
                    f"TransformedDistribution (t.{stale[0]} = None), or use a separate transform object for each way "
                    "of applying it")
            raise UnsupportedDistributionError(
                f"TransformedDistribution: its transform {type(t).__name__} holds plate tensors, and storch "
                f"can re-align the tensors only of {', '.join(c.__name__ for c in _TRANSFORM_PARAMS)} given "
                "directly in the list of transforms: sampling it as it is would share one noise draw across "
                "plate entries. Put the data-dependent part in the base distribution's parameters, pass "
                "AffineTransform/PowerTransform directly in the list, or apply the transform to the sample "
                "(y = f(est(base))). The node is then the base's sample x, and its log-probability (a score-function "
                "estimator's score) is the base's: where the cost needs the density of y (an ELBO's log q(y)), "
                "write it as base.log_prob(x) - f.log_abs_det_jacobian(x, y)")
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
    plain = TransformedDistribution(base, raw_transforms, validate_args=False)
    if type(d) is TransformedDistribution:
        return plain, plates
    return _copy_transformed(d, plain, plates), plates


def _stale_attributes(t: Transform) -> list[str]:
    """The attributes of ``t`` that hold a plate tensor of a graph that has ended (a log-det a pyro-style
    ``_call`` kept when the user applied ``t`` to a sample by hand), for the refusal's message."""
    return [k for k, v in t.__dict__.items()
            if type(v) is PlateTensor and any(p.lineage is not None and p.lineage.closed is not None for p in v._plates)]


def _copy_transformed(d: TransformedDistribution, plain: TransformedDistribution,
                      plates: tuple[Plate, ...]) -> TransformedDistribution:
    """The raw copy of ``d`` (a subclass of ``TransformedDistribution`` that :func:`_copyable` accepts): its
    attributes, with ``plain``'s raw base distribution, transforms and shapes, and its own plate tensors aligned
    to ``plates``, expanded to their sizes (as :func:`unwrap_distribution` expands a parameter that lacks a plate:
    an rsample or sample of its own that shapes its noise from ``self.loc`` draws it per plate entry) and padded to
    the base's per-sample rank."""
    cls = type(d)
    new = cls.__new__(cls)
    old_base = d.base_dist
    pad = len(old_base.batch_shape + old_base.event_shape)
    m = len(plates)
    sizes = [p.size for p in plates]
    for k, v in d.__dict__.items():
        if v is old_base:
            v = plain.base_dist
        elif type(v) is PlateTensor:
            v = align(v._raw, v._plates, plates, pad_to=pad)
            if list(v.shape[:m]) != sizes:  # expanded to every plate, as unwrap_distribution's parameters are: an
                v = v.expand(*sizes, *v.shape[m:])  # rsample of its own shaping noise from it draws per entry
        new.__dict__[k] = v
    new.transforms = plain.transforms
    new._batch_shape, new._event_shape = plain.batch_shape, plain.event_shape
    new._validate_args = False  # validated when the user built `d`
    return new


def _copyable(d: TransformedDistribution) -> bool:
    """Whether ``d``, an instance of a subclass of ``TransformedDistribution``, keeps its structure so that its
    raw copy can be made as the plain class's is, without calling its constructor (pytorch_sac's
    ``SquashedNormal(loc, scale)``, with its own methods and ``self.loc``; a class written outside torch): it holds its base distribution in
    ``base_dist`` and its transforms in ``transforms`` (a list of transforms), and a plate tensor only there or in
    an attribute of its own that is a plate tensor itself (re-aligned in the copy). Not where a plate tensor is
    held elsewhere (another distribution, a container, a transform outside ``transforms``, a transform in
    ``transforms`` other than ``AffineTransform`` and ``PowerTransform``): the copy would keep it as it is (one
    noise draw, or one value, shared across plate entries, or a nested plate tensor)."""
    if type(d).__module__.startswith("torch.distributions."):
        return False  # torch's own subclasses (LogNormal, RelaxedBernoulli, ...) are rebuilt from their parameters
    h = d.__dict__
    base, transforms = h.get("base_dist"), h.get("transforms")
    if not isinstance(base, Distribution) or not isinstance(transforms, list) or not all(
            isinstance(t, Transform) for t in transforms):
        return False
    if any(type(t) not in _TRANSFORM_PARAMS and _holds_plate_tensor(t) for t in transforms):
        # a transform of its own holding plate tensors ([MyScale(scale)]) cannot be re-aligned: rebuilt through
        # its constructor where arg_constraints allow it, refused (naming both fixes) otherwise
        return False
    for k, v in h.items():
        if k in ("base_dist", "transforms") or v is base or type(v) is PlateTensor or k == "_cached_x_y":
            continue
        if isinstance(v, Transform) and any(v is t for t in transforms):
            continue  # (a transform of transforms also kept as an attribute: self.affine)
        if not isinstance(v, (dict, list, tuple, Distribution, Transform, torch.Tensor)) and any(
                type(x) is PlateTensor for x in getattr(v, "__dict__", {}).values()):
            return False  # an object holding plate tensors (a SimpleNamespace of the parameters): not re-aligned
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)):
            if any(type(x) is PlateTensor or (isinstance(x, (Distribution, Transform)) and _holds_plate_tensor(x))
                   for x in v):
                return False
        elif isinstance(v, (Distribution, Transform)) and _holds_plate_tensor(v):
            return False
    return True


def _subclass_fix(d: Distribution) -> str:
    """The other fix for a subclass of ``TransformedDistribution`` that storch cannot copy (:func:`_copyable`)."""
    if not isinstance(d, TransformedDistribution) or type(d).__module__.startswith("torch.distributions."):
        return ""
    cls = type(d).__name__
    return (f". {cls} is a TransformedDistribution whose raw copy storch cannot make from base_dist and transforms "
            "(it holds plate tensors elsewhere: in another distribution, a container, or a transform not in "
            f"self.transforms). Either keep them only in base_dist, in self.transforms (AffineTransform, "
            f"PowerTransform) or as plate-tensor attributes of {cls} itself, or let storch rebuild it from its "
            f"parameters: list them in {cls}.arg_constraints (arg_constraints = {{'loc': constraints.real, "
            "'scale': constraints.positive}), keep each as self.<name> = <name>, and give __init__ a validate_args "
            "keyword passed on to TransformedDistribution.__init__ (storch calls "
            f"{cls}(**parameters, validate_args=False))")


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


_ONE_HOT_KEYS = frozenset(("_categorical", "_batch_shape", "_event_shape", "_validate_args"))


def _as_raw(d: Distribution, within: tuple[Plate, ...]) -> Optional[tuple[Distribution, tuple[Plate, ...]]]:
    """``(raw distribution, plates)`` for ``d`` without rebuilding it; ``None`` unless that is
    exactly what :func:`unwrap_distribution` would build.

    The common case (``Bernoulli(logits=x)``, ``Normal(mu, sigma)`` on tensors of one model): every
    tensor the distribution holds (parameters, and what its constructor or argument validation
    derived from them) is a plate tensor with the same plates (those of ``within`` too, if given),
    at their full sizes, and with one per-sample dim per batch and event dim (and, for torch's
    ``Categorical``, its parameters' category dim: the rebuilt copy of the general path,
    :func:`~storch.distributions.rebuild._categorical`, holds the same tensors). The raw tensors then
    already have the raw distribution's layout, so a copy of the object with them (and the plates
    prepended to its batch shape) is the raw distribution: no second constructor call
    (``broadcast_all``, shapes), no expand views. Anything else (plain tensors to expand, other
    plates, size-1 plate dims, tensors shaped unlike the batch, base distributions, containers)
    returns ``None``. A ``OneHotCategorical`` is a copy holding its ``Categorical``'s copy.
    """
    if type(d) is OneHotCategorical:  # (torch's: it holds a Categorical and its own two shapes, nothing else)
        if d.__dict__.keys() - _ONE_HOT_KEYS:
            return None
        inner = _as_raw(d._categorical, within)
        if inner is None:
            return None
        c, plates = inner
        new = OneHotCategorical.__new__(OneHotCategorical)
        new.__dict__.update(_categorical=c, _batch_shape=c._batch_shape, _event_shape=d._event_shape,
                            _validate_args=False)
        return new, plates
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
                want = m + len(d.batch_shape) + len(d.event_shape) + (type(d) is Categorical)
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


def _categorical_on_one_layout(cls: type, params: dict, within: tuple[Plate, ...], by_probs: bool):
    """``(raw categorical, plates)`` when its parameters (the logits, and the probs argument
    validation computed) are plate tensors on the same plates (``within``'s, if given) at their
    full sizes: the raw tensors are the raw parameters as they are, what the general path's
    ``union_plates`` and ``align`` would give. ``None`` otherwise. (``_as_raw`` does this for
    other distributions and torch's categoricals at full size; this function is the general path's.)"""
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
