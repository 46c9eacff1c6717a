"""The parameters of a distribution: the ones it was built from (of ``probs`` and ``logits`` the
given one), the distribution under one ``Independent``, the tensors it holds that are plate tensors
or carry gradient, and a differentiated count (``total_count``) that an estimator of the probabilities
alone cannot differentiate.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch.distributions import Binomial, Distribution, Independent, Multinomial, NegativeBinomial, OneHotCategorical
from torch.distributions.transforms import Transform
from torch.distributions.utils import lazy_property

from ..conditions.order_guard import is_differentiated, unbatched
from ..plates.tensor import Plate, PlateTensor, raw_of

_is_batched = torch._C._functorch.is_batchedtensor

__all__ = ["base_distribution", "parameters", "given_by_probs", "holds_grad", "grad_parameters",
           "differentiated_total_count"]


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


# the attribute where storch records the names of a transform's attributes that it wrote with plate tensors
# (storch.distributions.transform_cache refreshes a user's side cache, pyro's _cached_logDetJ, on the sample it
# hands out): values of the last draw, hit only with that sample, not tensors the transform holds
SIDE_CACHE = "_storch_side_cache"


def _holds_plate_tensor(d, depth: int = 0, known: tuple[Plate, ...] = ()) -> bool:
    """Whether ``d`` (a distribution or a transform) or what it holds (base distributions, components,
    transforms and their parts) has a plate tensor with a plate that is not among ``known`` (by name). Not in a
    caching transform's ``_cached_x_y``, nor what storch wrote on a transform when it handed out a sample
    (``SIDE_CACHE``: a log-det kept by ``_call``, refreshed on the plate tensors)."""
    names = {p.name for p in known}
    written = d.__dict__.get(SIDE_CACHE, ())
    for k, v in d.__dict__.items():
        if k == "_cached_x_y" or k == SIDE_CACHE or k in written:
            continue  # a caching transform's last (input, output), hit only by that very object (`is`): never by
            # a raw draw's new tensors (storch rekeys it to the plate tensors it hands out: left from the last step)
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


def grad_parameters(d: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors that ``d`` (a distribution or a transform) holds, or what it holds (base distributions,
    components, transforms and their parts, the parameters of an ``nn.Module``), that require grad (raw, not
    plate tensors): its parameters that carry gradient, as far as its attributes show them (tensors, lists,
    tuples and dicts of them; lazily computed ones, e.g. ``probs`` of a distribution built from ``logits``,
    once read). Not a caching transform's ``_cached_x_y`` (its last input and output: after a draw, the
    sample). Under ``torch.func.vmap`` the tensor that a batched one batches (a batched tensor reports
    ``requires_grad=False``; the one under it is the one the backward pass outside vmap reaches). A generator:
    :func:`holds_grad` stops at the first."""
    for k, v in d.__dict__.items():
        if k == "_cached_x_y":
            continue
        if isinstance(v, (list, tuple)):
            items = v
        elif isinstance(v, dict):
            items = v.values()
        else:
            items = (v,)
        for item in items:
            if type(item) is PlateTensor:
                item = item._raw
            if isinstance(item, torch.Tensor):
                if item.requires_grad:
                    yield item
                elif _is_batched(item):
                    item = unbatched(item)
                    if item.requires_grad:
                        yield item
            elif isinstance(item, (Distribution, Transform)):
                if depth < 8:
                    yield from grad_parameters(item, depth + 1)
            elif isinstance(item, torch.nn.Module):
                yield from (p for p in item.parameters() if p.requires_grad)


def given_by_probs(d: Distribution) -> bool:
    """Whether ``d`` (a ``Bernoulli``, ``Binomial``, ``Categorical``, ``OneHotCategorical``, ...) was built
    from ``probs=`` rather than ``logits=``: torch's ``logits`` are then computed from clamped probabilities
    (a probability of exactly 0 gets log(eps), not ``-inf``)."""
    if isinstance(d, (OneHotCategorical, Multinomial)):
        d = d._categorical
    param = d.__dict__.get("_param")
    return param is not None and param is d.__dict__.get("probs")


def differentiated_total_count(d: Distribution) -> Optional[str]:
    """Why an estimator that differentiates a ``Binomial``'s or ``NegativeBinomial``'s probabilities only
    (``probs`` / ``logits``: GO's CDF term, mvd's weak derivative) cannot take ``d``: its ``total_count`` is
    differentiated (requires grad, or carries a forward-mode tangent), and would get no gradient, silently.
    ``None`` when it is not, or ``d`` (under one ``Independent``) is neither. Public as
    ``storch.extending.differentiated_total_count``.

    The reason completes ``f"estimator {name!r} does not support {type(d).__name__} "`` (as
    ``UnsupportedDistributionError``'s messages read) and says what to do instead: a Binomial's count of
    trials is an integer, in which E[f] has no derivative (detach it); a NegativeBinomial's r is a real
    number > 0, whose derivative such an estimator does not compute (``'score'`` does, through log p).
    Call it in ``check_distribution`` and ``supports`` alike, so that the registry's list of supporting
    estimators agrees with the refusal. ``d`` may hold plate tensors (the registry asks with the user's
    distribution). A read of ``requires_grad`` per call.
    """
    d = base_distribution(d)
    if not isinstance(d, (Binomial, NegativeBinomial)):
        return None
    count = getattr(d, "total_count", None)
    if not isinstance(count, torch.Tensor) or not is_differentiated(unbatched(raw_of(count))):
        return None
    if isinstance(d, Binomial):
        return ("with a total_count that requires grad: the number of trials is an integer, in which E[f] has no "
                "derivative, and this estimator differentiates probs / logits only (total_count would get no "
                "gradient, silently). Detach total_count (a fixed count, shared or per entry)")
    return ("with a total_count that requires grad: this estimator differentiates probs / logits only, so the "
            "derivative in r = total_count (a real number > 0) would be silently missing. Use 'score' for this "
            "node (its log p differentiates total_count too), or detach total_count if it is not to be learned")
