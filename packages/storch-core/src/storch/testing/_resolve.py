"""Turning what a test hands the kit (a name, an instance, a class or a factory) into a factory."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Optional, Union

import torch
from torch.distributions import Normal

from ..errors import OptionError
from ..estimators.base import Estimator
from ..estimators.construction import _offered_options
from ..graph.node import Node
from ..plates.tensor import PlateTensor
from ..registry import estimator as _make_estimator
from ..registry import get_estimator_class
from ._models import EstimatorFactory

__all__ = ["EstimatorLike", "resolve", "is_factory", "default_orders", "replicas"]

EstimatorLike = Union[Callable[[str], Estimator], str, Estimator, type[Estimator]]
"""A registry name, an estimator instance, an estimator class, or a factory ``make(plate)``."""


def resolve(estimator: EstimatorLike, options: Optional[dict[str, Any]] = None) -> tuple[EstimatorFactory, Estimator]:
    """A factory ``make(plate)`` for ``estimator`` and one probe instance (for its metadata).

    A name or class is built with ``options``; if ``options`` is ``None`` and the estimator
    has an ``n_samples`` option, ``n_samples=2`` is used so that multi-sample parts (e.g.
    leave-one-out baselines) are exercised. An instance is deep-copied for each node, with
    its ``plate`` renamed.
    """
    make: EstimatorFactory  # (called with the plate positionally; a user's factory may name its parameter freely)
    if isinstance(estimator, str) or (isinstance(estimator, type) and issubclass(estimator, Estimator)):
        cls = get_estimator_class(estimator) if isinstance(estimator, str) else estimator
        opts = dict(options) if options is not None else ({"n_samples": 2} if _takes_n_samples(cls) else {})
        if isinstance(estimator, str):
            def by_name(plate: str) -> Estimator:
                return _make_estimator(estimator, plate, **opts)
            make = by_name
        else:
            def by_class(plate: str) -> Estimator:
                return cls(plate=plate, **opts)
            make = by_class
    elif isinstance(estimator, Estimator):
        if options:
            raise TypeError("options are only used with an estimator name or class, not with an instance")
        proto = estimator

        def by_copy(plate: str) -> Estimator:
            est = copy.deepcopy(proto)
            est.plate = plate
            return est
        make = by_copy
    elif callable(estimator):
        if options:  # (they would be ignored: the factory builds the estimator)
            raise TypeError("options are only used with an estimator name or class, not with a factory make(plate): "
                            "pass them where the factory builds the estimator, lambda plate: Score(plate, **options)")
        make = estimator
    else:
        raise TypeError(
            f"expected an estimator name, instance, class or factory make(plate), got {type(estimator).__name__}"
        )
    probe = make("probe")
    if not isinstance(probe, Estimator):
        raise TypeError(f"the estimator factory returned {type(probe).__name__}, not a storch.Estimator")
    return make, probe


def _takes_n_samples(cls: type[Estimator]) -> bool:
    """Whether ``cls`` takes ``n_samples=``: named by its constructor, or forwarded through its ``**kwargs`` to a
    base's that takes it unless it sets it itself, as a probe's construction shows (review r-28: ``Pairs``, whose
    ``super().__init__(plate, n_samples=2 * pairs, **kwargs)`` refuses it with an OptionError; one that only
    defaults it, ``kwargs.setdefault("n_samples", 4)``, takes it: review r-29)."""
    if "n_samples" in cls.options():
        return True
    if "n_samples" not in _offered_options(cls):
        return False
    try:
        cls(plate="probe", n_samples=2)
    except OptionError:
        return False
    return True


def is_factory(estimator: EstimatorLike) -> bool:
    """Whether ``estimator`` is a factory ``make(plate)`` (which may make a different estimator per node), not a
    name, class or instance (one estimator for every node)."""
    return not (isinstance(estimator, (str, Estimator))
                or (isinstance(estimator, type) and issubclass(estimator, Estimator)))


def default_orders(est: Estimator) -> tuple[int, ...]:
    """Orders 0..min(max_order, 3) for unbiased estimators; order 0 only for biased ones."""
    if est.biased:
        return (0,)
    top = 3 if est.max_order == math.inf else min(int(est.max_order), 3)
    return tuple(range(top + 1))


class _Replicas(Estimator):
    """R copies of a parameter on a sampling plate whose weights are leaf tensors equal to 1/R.

    The surrogate reduces this (outermost) plate by Σ_r u_r S_r, so ∂loss/∂u_r is S_r, the
    forward value of replicate r's estimate, and ∂loss/∂θ_r is ĝ_r / R, as with
    :func:`storch.testing.replicate`. Its gradient function is 0 and it has no control variate,
    so it leaves every other node's estimate untouched.
    """

    name = "_replicas"

    def __init__(self, plate: str, copies: torch.Tensor, weights: torch.Tensor) -> None:
        super().__init__(plate, copies.shape[0])
        self._copies = copies
        self._weights = weights

    def proposal(self, node: Node) -> torch.Tensor:
        return self._copies

    def weighting_function(self, node: Node) -> torch.Tensor:
        return self._weights

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=self._copies.dtype, device=self._copies.device)


def replicas(param: torch.Tensor, n: int, plate: str = "replicate") -> tuple[torch.Tensor, torch.Tensor, PlateTensor]:
    """Like :func:`storch.testing.replicate`, plus per-replicate forward values.

    Returns:
        ``(leaf, weights, copies)``: differentiate the loss w.r.t. ``weights`` (shape ``(n,)``)
        to get each replicate's forward estimate, w.r.t. ``leaf`` for its derivatives.
    """
    leaf = param.detach().unsqueeze(0).expand(n, *param.shape).clone().requires_grad_(True)
    weights = torch.full((n,), 1.0 / n, dtype=param.dtype, device=param.device, requires_grad=True)
    # the distribution only fixes the batch shape; the proposal returns the copies themselves
    shape_only = Normal(torch.zeros_like(param.detach()), torch.ones_like(param.detach()))
    return leaf, weights, _Replicas(plate, leaf, weights)(shape_only)
