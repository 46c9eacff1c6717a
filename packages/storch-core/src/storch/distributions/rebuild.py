"""Building a distribution again from its parameters (the raw copy of a user's distribution, or
``storch.extending.rebuild``): with the constructor arguments it keeps outside its arg_constraints, without
argument validation, and refused where storch cannot tell that the copy is the same distribution.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch.distributions import (Binomial, Categorical, ContinuousBernoulli, Distribution, LKJCholesky, Multinomial,
    OneHotCategorical, RelaxedBernoulli, RelaxedOneHotCategorical)
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical
from torch.distributions.transforms import Transform
from torch.distributions.utils import lazy_property

from ..errors import UnsupportedDistributionError
from ..plates.tensor import PlateTensor
from .parameters import _holds_plate_tensor, _plain_property

__all__ = ["rebuild", "torch_class_hint"]


def rebuild(d: Distribution, params: dict, leading: torch.Size = torch.Size()) -> Distribution:
    """``d``'s class built from ``params`` (parameter tensors by their arg_constraints names: perturbed,
    expanded or re-aligned ones) and the constructor arguments ``d`` keeps outside its arg_constraints
    (a Multinomial's ``total_count``, a ContinuousBernoulli's ``lims``, a class's own ``self.k``), without
    argument validation. ``type(d)(**params)`` alone would silently give those arguments their defaults
    (a Multinomial of 1 trial). ``leading``: the dims that ``params`` carry ahead of ``d``'s batch dims
    (spsa's perturbations, ``(n,)``), which the copy's batch shape has ahead of ``d``'s: without it a class
    written outside torch was refused for its batch shape (found by a tester). Public as
    ``storch.extending.rebuild``.

    Raises:
        UnsupportedDistributionError: an argument ``d`` does not keep where it can be found, or a class
            written outside torch whose copy may not be the same distribution (see ``unwrap_distribution``).
    """
    return _rebuilt(d, params, torch.Size(leading))


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
            "whose constructor takes its arg_constraints as keywords and a validate_args keyword (storch calls "
            f"{type(d).__name__}(**parameters, validate_args=False)), and keeps each other constructor "
            f"argument in an attribute of the same name{torch_class_hint(type(d))}"
        ) from e
    if known is None:  # a class storch does not know: the rebuilt copy must be the user's distribution
        _check_rebuilt(d, new, raw, extra, plates)
    return new


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


def torch_class_hint(cls: type) -> str:
    """The end of a refusal of ``cls``, a subclass of a torch distribution with a constructor of its own
    (``class CountOf4(Binomial)`` whose ``__init__(self, logits)`` fixes ``total_count=4``), which storch cannot
    rebuild or expand: ``", or, where ..., build a Binomial itself with them"``; ``""`` for any other class."""
    base = next((k for k in cls.__mro__ if k.__module__.startswith("torch.distributions.")), Distribution)
    if base is Distribution or _torch_owner(cls) is not None:
        return ""
    return (f", or, where {cls.__name__}'s constructor only fixes some of {base.__name__}'s arguments, build a "
            f"{base.__name__} itself with them")


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

    The copy must keep its raw parameters (and the ``extra`` arguments carried over) as they were passed
    (the very tensors, or views of them: compared without reading values), or its constructor must be
    idempotent on them (:func:`_idempotent`: a normalisation, a mask): a constructor that transforms
    them otherwise (``self.logits = logits / temperature``, ``self.logits = logits + bias`` with ``bias``
    a parameter too) would apply the transformation a second time to what ``d`` keeps (a bias added
    twice: a silently wrong distribution, found by a tester). Checked for every class written outside
    torch, with or without ``extra`` arguments. Then the copy must agree with ``d`` in its event and
    batch shapes and its attributes (plain values, tensors' shapes and dtypes, held distributions): an
    argument that took its default shows there.
    """
    changed = [n for n, v in list(raw.items()) + list(extra.items())
               if isinstance(v, torch.Tensor) and not _kept_as_given(_kept(new, n), v)]
    if changed and not _idempotent(d, raw, extra, plates):  # (one probe however many parameters it changed)
        n = changed[0]
        args = f"{sorted(raw)} with the plates as batch dims" + (f", and {sorted(extra)}" if extra else "")
        raise UnsupportedDistributionError(
            f"storch rebuilds {type(d).__name__} from the parameters{' and constructor arguments' if extra else ''} "
            f"it keeps ({args}) where its parameters have different plates, and its constructor does not keep "
            f"{n!r} as it was given (as self.{n} = {n}): it transforms it (e.g. adds another parameter to it, or "
            "divides it by a temperature), so rebuilding from the kept values would transform them again. Keep "
            f"each parameter of arg_constraints as given (self.{n} = {n}) and combine them where they are used "
            "(in log_prob and sample, or a property), or compute the transformed parameters outside and pass them "
            "to a distribution whose constructor keeps them (torch's Categorical(logits=logits / t)). (A "
            "transformation that gives the same values when applied again, such as a normalisation, is "
            "accepted where storch can check it: its arg_constraints must be torch constraints, and the "
            "tensors not on the meta device.)")
    where = _differs(d, new, plates, 0)
    if where is not None:
        raise UnsupportedDistributionError(
            f"storch rebuilds {type(d).__name__} from its raw parameters {sorted(d.arg_constraints)} (the "
            "plates as batch dims) and the constructor arguments it keeps in attributes of the same name, "
            f"and the copy differs from yours in {where}: a constructor argument took its default. Keep each "
            "constructor argument in an attribute of the same name (self.k = k), as a named parameter of "
            "__init__ (not in **kwargs)")


_IDEMPOTENT: dict = {}


def _idempotent(d: Distribution, raw: dict, extra: dict, plates: torch.Size) -> bool:
    """Whether ``type(d)``'s constructor, applied to the parameters it keeps, keeps them again (a
    normalisation ``logits - logits.logsumexp(-1)``, torch's Categorical's; a mask): then its copy from
    the kept parameters is the same distribution, although it does not keep them as given.

    Checked on a probe, not on the user's values (no device sync of theirs): random parameters of the
    per-sample shapes, drawn within their arg_constraints (``biject_to``) by a generator of storch's own
    (the global random state is left alone), with ``d``'s constructor arguments outside them; built once,
    then again from what the first build keeps, the kept tensors must agree. Cached per class, parameter
    names and plain constructor arguments (a constructor's behaviour may depend on them: dividing by a
    temperature of 1 is idempotent, by 0.5 not). False where storch cannot probe (a constraint torch
    cannot draw from, a meta tensor, a constructor that fails on the probe).
    """
    cls = type(d)
    key = None
    if all(not isinstance(v, torch.Tensor) for v in extra.values()):
        try:
            key = (cls, tuple(sorted(raw)), tuple(sorted(extra.items())))
            hash(key)
        except TypeError:
            key = None
    if key is not None and key in _IDEMPOTENT:
        return _IDEMPOTENT[key]
    try:
        ok = _probe_idempotent(d, raw, extra, len(plates))
    except Exception:  # the constructor or a constraint refuses the probe: storch cannot tell
        ok = False
    if key is not None:
        _IDEMPOTENT[key] = ok
    return ok


def _probe_idempotent(d: Distribution, raw: dict, extra: dict, m: int) -> bool:
    """The probe of :func:`_idempotent` (raises where it cannot be run)."""
    from torch.distributions import biject_to

    cls = type(d)
    constraints = d.arg_constraints
    g = torch.Generator().manual_seed(0)
    probe = {}
    for n, v in raw.items():
        if not isinstance(v, torch.Tensor):
            probe[n] = v
            continue
        if v.is_meta or not v.is_floating_point():
            return False
        u = torch.randn(v.shape[m:], generator=g, dtype=v.dtype)
        with torch.no_grad():
            probe[n] = biject_to(constraints[n])(u).to(v.device)
    with torch.no_grad():
        first = cls(**probe, **extra, validate_args=False)
        kept = {}
        for n in raw:
            w = _kept(first, n)
            if w is None:
                return False
            kept[n] = w
        second = cls(**kept, **extra, validate_args=False)
        for n, w in kept.items():
            again = _kept(second, n)
            if not isinstance(w, torch.Tensor):
                if again is not w and again != w:
                    return False
            elif not (isinstance(again, torch.Tensor) and again.shape == w.shape
                      and bool(torch.allclose(again, w, rtol=1e-4, atol=1e-5, equal_nan=True))):
                return False
    return True


def _kept(d: Distribution, name: str) -> Any:
    """What ``d``'s constructor kept of its argument ``name``: ``d.<name>``, or ``d._<name>`` (a property's store)."""
    return d.__dict__.get(name, d.__dict__.get("_" + name))


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
        with torch._C.DisableTorchFunction():  # (storch.compile's trace refuses a user's storage read: not this one)
            same = w.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
        return same and w.storage_offset() == v.storage_offset() and w.stride() == e.stride()
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
