"""When the score-function identity holds for a distribution: a support that stays put.

An estimator whose gradient function is the score log p(x) (``score``, ``importance``, LAX) relies on

    ∇_θ E_p[f] = ∇_θ ∫_S p_θ(x) f(x) dx = E_p[f ∇_θ log p_θ],

which needs the support S not to move with θ. Where it does (``Uniform(low, high)``, ``Pareto(scale, α)``, an
affine map of a bounded base distribution), Leibniz's rule adds a boundary term, f at the bound times the
density there, that no sample's log p sees: the estimate is silently biased (z ~ Uniform(0, h):
d/dh E[z²] = 2h/3, the score gives -h/3). :func:`moving_support` finds such parameters; the estimator base
class refuses the node with ``storch.UnsupportedDistributionError``. Public as
``storch.extending.moving_support``.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
from torch.distributions import (
    ComposeTransform,
    Distribution,
    Independent,
    MixtureSameFamily,
    Transform,
    TransformedDistribution,
    constraints,
)

__all__ = ["moving_support"]

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


def moving_support(d: Distribution) -> list[str]:
    """The parameters of ``d`` that require grad and move its (continuous) support, by name.

    ``["high"]`` for ``Uniform(0, h)`` with ``h.requires_grad``, ``["scale"]`` for ``Pareto(scale, α)``,
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
    grads = [t for t in _constraint_tensors(support, 0) if t.requires_grad]
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
        if current is not None and _same_set(current, t.domain):
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
        if isinstance(v, torch.Tensor) and v.requires_grad:
            out.append(f"{prefix}.{k}")
        elif isinstance(v, Transform) and not k.startswith("_cached"):
            out += _transform_grads(v, f"{prefix}.{k}", depth + 1)
    return out


def _same_set(a, b) -> bool:
    """Whether constraints ``a`` and ``b`` are the same set (reinterpreted dims aside): the same type with
    the same bounds. Conservative: ``False`` when unsure."""
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
            if x.requires_grad or y.requires_grad or x.shape != y.shape or not torch.equal(x, y.to(x)):
                return False
        elif x != y:
            return False
    return True
