"""The pre-images a ``TransformedDistribution``'s transforms cached for a sample, kept for the value
handed out (``log_prob`` of a squashed Gaussian's action reuses its pre-tanh sample).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch.distributions import Distribution, Independent, TransformedDistribution
from torch.distributions.transforms import Transform

from ..errors import UnsupportedDistributionError
from ..plates.tensor import PlateTensor

_SIDE_CACHE = "_storch_side_cache"  # (storch.distributions.parameters.SIDE_CACHE: a sibling module, not imported)

__all__ = ["rekey_transform_cache"]


def _raw_log_det(u: Transform, x: PlateTensor, y: PlateTensor) -> Optional[bool]:
    """Whether ``u.log_abs_det_jacobian(x, y)`` of plate tensors ``x``, ``y`` is a tensor without plates whose
    leading dims are the plate dims of ``x`` (a value computed from the raw draw and kept: one without them,
    log|scale| of a raw parameter, is a constant per sample, broadcast rightly); ``None`` where it raises (a
    missing or stale side cache, or a log-det the transform cannot compute on plate tensors)."""
    try:
        r = u.log_abs_det_jacobian(x, y)
    except Exception:  # noqa: BLE001 (the user's log_prob raises it again where it is asked for)
        return None
    if not isinstance(r, torch.Tensor) or isinstance(r, PlateTensor):
        return False
    # the whole raw shape of a log-det of the draw (the plate dims, then x's dims but the transform's event dims),
    # not only its leading dims: a log|scale| of a raw parameter whose first dim happens to be the sample count is
    # a constant per sample (found by review: refused at n_samples = 4 for a scale of 4 elements)
    raw = x._raw
    event = getattr(getattr(u, "domain", None), "event_dim", 0)
    return r.shape == raw.shape[:raw.dim() - event]


def _refresh_side_cache(u: Transform, x: PlateTensor, y: PlateTensor) -> None:
    """A transform of the user's (pyro's Planar, Radial, Sylvester, AffineAutoregressive, Spline) may compute
    log|det J| in ``_call`` and keep it on itself (``self._cached_logDetJ``), which ``log_abs_det_jacobian(x, y)``
    returns where ``(x, y)`` is its cached pair. storch ran ``_call`` on the raw tensors, so that value has no
    plates, and ``log_prob`` of the handed-out value (keyed to it now) would mix it into plate tensors as a
    constant, broadcast against the per-sample dims: a silently wrong log q (-37.7 for -3.1). Where the log-det
    of ``(x, y)`` is such a tensor (or fails), ``_call(x)`` runs again on the plate tensors, which keeps what it
    caches with its plates (one more forward of the layer per draw, only for such transforms); a log-det still
    without plates after it is refused, as is one without plates whose ``_call`` fails on plate tensors. torch's
    own transforms cache nothing else: not asked."""
    first = _raw_log_det(u, x, y)
    if not first:
        # (a log-det computed from x, or a constant per sample; or none that can be computed on plate tensors, with
        # nothing kept to correct: the user's _call is not run a second time)
        return
    # _call runs again on a shallow copy (found by review: run on the transform itself, a layer that also keeps
    # statistics, a running mean, updated them twice a draw or stored them per sample): only the attributes that
    # held the raw draw's per-sample values (the raw plate dims leading) are taken from it; state changed in place
    # (a tensor the copy shares) is refused, as storch cannot run such a _call a second time
    lead = x._raw.shape[:len(x.plates)]
    shadow = copy.copy(u)
    for name in ("_parameters", "_buffers", "_modules"):  # (an nn.Module's: copied, not shared, so are its buffers)
        if isinstance(u.__dict__.get(name), dict):
            shadow.__dict__[name] = dict(u.__dict__[name])
    versions = {k: v._version for k, v in _tensors(u)}
    try:
        shadow._call(x)
    except Exception as e:  # noqa: BLE001
        raise UnsupportedDistributionError(_side_cache_message(u, f"running its _call on the plate tensor failed "
                                                                 f"({type(e).__name__}: {e})")) from e
    changed = sorted(k for k, v in _tensors(u) if k in versions and v._version != versions[k])
    if changed:
        raise UnsupportedDistributionError(_side_cache_message(u, f"its _call changes {', '.join(changed)} in place, "
                                                                 "so storch cannot run it again on the plate tensor"))
    per_sample = {k for k, v in u.__dict__.items()
                  if type(v) is torch.Tensor and v.shape[:len(lead)] == lead and type(shadow.__dict__.get(k)) is PlateTensor}
    for k in per_sample:
        u.__dict__[k] = shadow.__dict__[k]
    u._cached_x_y = (x, y)
    # this draw's values, not tensors the transform holds (a transform reused in the next step is not refused for
    # them: parameters.SIDE_CACHE)
    u.__dict__[_SIDE_CACHE] = frozenset(per_sample)
    if _raw_log_det(u, x, y):
        raise UnsupportedDistributionError(_side_cache_message(u, "it still does after _call(x) ran on the plate "
                                                                  "tensor"))


def _tensors(u: Transform):
    """The tensors ``u`` holds as attributes (an nn.Module's buffers and parameters too), by name."""
    for k, v in u.__dict__.items():
        if isinstance(v, torch.Tensor) and type(v) is not PlateTensor:
            yield k, v
    for name in ("_parameters", "_buffers"):
        for k, v in (u.__dict__.get(name) or {}).items():
            if isinstance(v, torch.Tensor):
                yield k, v


def _side_cache_message(u: Transform, why: str) -> str:
    name = type(u).__name__
    return (f"transform {name}: log_abs_det_jacobian(x, y) of the sample storch hands out (a plate tensor) returns a "
            "tensor without plates: a value cached when storch drew the sample from raw tensors (a log-det kept on "
            f"the transform in _call, pyro's self._cached_logDetJ); {why}. log_prob of the sample would add it as a "
            "constant broadcast against the per-sample dims: a wrong log-probability and gradient. Compute the "
            f"log-det from x in {name}.log_abs_det_jacobian (or recompute it there when x is not the tensor _call "
            "saw), or apply the flow to the sample yourself (z = flow(storch.estimator(...)(base)) and the "
            "log-density base.log_prob(x) - log|det J| written from x)")


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
        if (isinstance(new_x, PlateTensor) and isinstance(new_y, PlateTensor)
                and not type(u).__module__.startswith("torch.distributions.")):
            _refresh_side_cache(u, new_x, new_y)
        found.append(x)
        y, new_y = x, new_x
    return found
