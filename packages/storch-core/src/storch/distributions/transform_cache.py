"""The pre-images a ``TransformedDistribution``'s transforms cached for a sample, kept for the value
handed out (``log_prob`` of a squashed Gaussian's action reuses its pre-tanh sample).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.distributions import Distribution, Independent, TransformedDistribution
from torch.distributions.transforms import Transform

__all__ = ["rekey_transform_cache"]


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
