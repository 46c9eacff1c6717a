"""spsa's check that a user's distribution can be built again from its perturbed parameters, done once per kind.

``Spsa.check_distribution`` rebuilds every leaf whose class is not torch's from its own (detached) parameters
before any draw, so that a class storch cannot rebuild is refused up front (and ``supports`` says so) rather than
where the perturbed copies are built. That rebuild cost about 7-9 us per call (a constructor call and
``storch.extending.rebuild``'s checks), paid at every step although a node's leaves are of one kind from step to
step. Its outcome depends only on what :func:`rebuild_key` reads: the class, the batch and event shapes, which
parameters are perturbed, and the leaf's attributes as the rebuild compares them (plain values; a tensor's type,
dtype, shape and plate names). A leaf with an attribute of another kind (a held distribution, a list, an object) has no
key and is checked at every call, and so is one with a tensor outside its arg_constraints (a constructor argument such
as a tensor temperature): whether a constructor that transforms its parameters is idempotent is probed with the values
of those arguments (``loc / temperature`` is for a temperature of 1, not for 0.5), which a key of dtypes and shapes
cannot see (a leaf with temperature 0.5 hit the acceptance of one with 1: check_distribution and ``supports`` accepted
it, and only the perturbed copies' rebuild refused it). Only acceptances are kept (a refusal raises each time), per class in a weak
dictionary (a user's class is not kept alive by it). What the key cannot see (a constructor that behaves by the
parameters' values) is still caught where it matters: ``Spsa.proposal`` builds the perturbed copies with
``rebuild`` and its full checks at every step. Measured: a user's Normal-like class, 16.5 -> 9 us per call.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.distributions import Distribution

from storch.extending import plates_of, raw_of

__all__ = ["rebuild_key", "known_rebuildable", "remember_rebuildable"]

# what the rebuild compares by value (storch.extending.rebuild: _differs' plain values)
_PLAIN = (type(None), bool, int, float, complex, str, torch.Size, torch.dtype, torch.device)

_ACCEPTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # class -> {rebuild_key} its rebuild accepted


def rebuild_key(leaf: Distribution, free: dict) -> Optional[tuple]:
    """What the rebuild check of ``leaf`` (perturbed parameters: the names of ``free``) reads, as a hashable key;
    None where an attribute is of a kind it compares more deeply, or a tensor outside arg_constraints (not cached)."""
    parts: list = [leaf.batch_shape, leaf.event_shape, tuple(free)]
    constrained = leaf.arg_constraints
    for k, v in leaf.__dict__.items():
        t = type(v)
        if isinstance(v, torch.Tensor) and k not in constrained:
            return None  # (a tensor constructor argument, or one derived: the rebuild check may read its values)
        if t is torch.Tensor:  # (the common case: no plate tensor to unwrap)
            parts.append((k, t, v.dtype, v.shape))
        elif isinstance(v, torch.Tensor):
            raw = raw_of(v)  # (plates by name: a step's plates are new objects; their sizes are in the raw shape)
            parts.append((k, type(v), raw.dtype, raw.shape, tuple(p.name for p in plates_of(v))))
        elif t in _PLAIN:
            parts.append((k, t, v))
        else:
            return None
    return tuple(parts)


def known_rebuildable(leaf: Distribution, key: Optional[tuple]) -> bool:
    """Whether a leaf of ``leaf``'s class with this ``key`` was rebuilt before."""
    if key is None:
        return False
    accepted = _ACCEPTED.get(type(leaf))
    return accepted is not None and key in accepted


def remember_rebuildable(leaf: Distribution, key: Optional[tuple]) -> None:
    """Keep ``key`` as accepted for ``leaf``'s class (nothing where it is None)."""
    if key is not None:
        _ACCEPTED.setdefault(type(leaf), set()).add(key)
