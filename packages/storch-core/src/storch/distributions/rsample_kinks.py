"""Kinks and jumps inside a distribution's own ``rsample``: between its parameters and the sample.

A pathwise estimator differentiates c(g(ε, θ)) in θ. :mod:`storch.smoothness` walks the path from the sample to
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
``CumulativeDistributionTransform`` (the cdf of a ``Uniform`` clamps).
"""

from __future__ import annotations

import math
import torch
from torch.distributions import (Beta, Cauchy, Chi2, ContinuousBernoulli, Dirichlet, Distribution, Exponential,
    FisherSnedecor, Gamma, Gumbel, HalfCauchy, HalfNormal, Independent, InverseGamma, Kumaraswamy, Laplace,
    LogisticNormal, LogNormal, LowRankMultivariateNormal, MultivariateNormal, Normal, Pareto, RelaxedBernoulli,
    RelaxedOneHotCategorical, StudentT, TransformedDistribution, Uniform, Weibull, Wishart)
from torch.distributions import transforms as _t
from torch.distributions.relaxed_bernoulli import LogitRelaxedBernoulli
from torch.distributions.relaxed_categorical import ExpRelaxedCategorical

from .. import smoothness
from .._order_guard import unbatched
from .parameters import grad_parameters

__all__ = ["rsample_kinks", "rsample_walked", "SMOOTH_RSAMPLE", "SMOOTH_TRANSFORMS"]

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

_SMOOTH, _WALK, _INDEPENDENT, _TRANSFORMED = 0, 1, 2, 3
_BY_CLASS: dict = {}  # distribution class -> one of the four (rsample_walked's per-class verdict)


def _class_verdict(cls: type) -> int:
    v = _BY_CLASS.get(cls)
    if v is None:
        if cls in SMOOTH_RSAMPLE:
            v = _SMOOTH
        elif issubclass(cls, Independent) and cls.rsample is Independent.rsample:
            v = _INDEPENDENT
        elif issubclass(cls, TransformedDistribution) and cls.rsample is TransformedDistribution.rsample:
            v = _TRANSFORMED  # (a user's subclass that only sets up base and transforms in __init__ too)
        else:
            v = _WALK
        _BY_CLASS[cls] = v
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
    """Whether :func:`rsample_kinks` walks ``d``'s rsample: False for torch's classes whose rsample is known
    smooth in their parameters (:data:`SMOOTH_RSAMPLE`), and ``Independent`` / ``TransformedDistribution``
    (or a subclass that keeps their ``rsample``) of one with transforms of :data:`SMOOTH_TRANSFORMS`
    (``ComposeTransform``, ``IndependentTransform``, ``CatTransform``, ``StackTransform`` and inverses of them
    looked into). True for a user's class or transform, ``AbsTransform``, ``CumulativeDistributionTransform``.
    The class's part is cached per class; a wrapper's base and transforms are looked at per instance."""
    v = _BY_CLASS.get(type(d))
    if v is None:
        v = _class_verdict(type(d))
    if v == _SMOOTH:
        return False
    if v == _WALK or depth > 8:
        return True
    if v == _TRANSFORMED and not all(_smooth_transform(t) for t in d.transforms):  # type: ignore[attr-defined]
        return True
    return rsample_walked(d.base_dist, depth + 1)  # type: ignore[attr-defined]


def rsample_kinks(d: Distribution, x: torch.Tensor, order: float = math.inf) -> dict[str, int]:
    """The non-smooth operations inside ``d``'s rsample: ``{autograd node name: k}`` (k: the order of its first
    discontinuous derivative, those below ``order``; 0 a jump, 1 a kink) on a path in the autograd graph from
    one of ``d``'s parameters that require grad to ``x``, a value ``d.rsample()`` returned. ``{}`` where
    :func:`rsample_walked` knows ``d``'s class smooth (nothing walked), where ``x`` has no graph or ``d`` no
    parameter that requires grad. The walk stops at the parameters: what made them (``logits = relu(h)``) is
    a function of θ alone, which the pathwise derivative differentiates correctly; an operation on the
    parameters alone inside rsample (``self.scale.clamp(min=1e-6)``) is counted (the graph does not show
    which operations the noise enters): apply it to the parameter before building the distribution. Under
    ``torch.func.vmap`` the tensors that the batched ones batch are walked."""
    if not rsample_walked(d):
        return {}
    x = unbatched(x)
    if x.grad_fn is None:
        return {}
    params = [unbatched(p) for p in grad_parameters(d)]
    if not params:
        return {}
    return smoothness._nonsmooth_on_path(x, params, int(order) if math.isfinite(order) else 1 << 30)


def rsample_kinks_note(name: str, found: dict) -> str:
    """In words, for an error message: ``found`` (of :func:`rsample_kinks`) inside ``name``'s rsample."""
    ops = ", ".join(f"{op} (its derivative of order {k} is discontinuous)" for op, k in sorted(found.items()))
    folded = (" AbsTransform folds the base sample, a kink wherever its sign moves with the parameters; a base "
              "centred at a constant 0 is smooth (scale · |ε|): torch's HalfNormal and HalfCauchy are known "
              "smooth." if "AbsBackward0" in found else "")
    return (f"the rsample of {name} holds {ops} on a path from its parameters to the sample (inside rsample or "
            "its transforms, not in the cost): the sample is a non-smooth function of the parameters, autograd "
            "reports 0 for the delta in the next derivative, and the pathwise estimate would be biased." + folded +
            " Write rsample (or the transform) smoothly (a sigmoid or softplus instead of a clamp, round or "
            "threshold; an operation on the parameters alone inside rsample, such as self.scale.clamp(min=1e-6), "
            "is counted too, as the graph does not show where the noise enters: apply it to the parameter before "
            "building the distribution)")
