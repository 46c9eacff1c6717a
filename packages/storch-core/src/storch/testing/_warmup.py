"""Warm-up: train an estimator's learned parts through ``storch.backward()`` before it is tested.

A learned baseline or control variate is only as good (or as biased) as its training makes it:
tested at its initial weights, a baseline that regresses on the very sample it is used for looks
harmless, since its untrained output barely depends on the sample. The kit therefore reuses one
estimator per node for a whole check and, with ``warmup=N``, first runs N training steps of the
model (``storch.backward()``, which runs ``update_parameters``) at the tested θ.
"""

from __future__ import annotations

from ._models import EstimatorFactory, Model
from ._stats import replicate
from ..graph import Graph
from ..surrogate import backward

__all__ = ["persistent", "warm_up"]


def persistent(make: EstimatorFactory) -> EstimatorFactory:
    """A factory that creates each plate's estimator once and then returns the same instance."""
    made: dict = {}

    def make_once(plate: str):
        if plate not in made:
            made[plate] = make(plate)
        return made[plate]

    return make_once


def warm_up(model: Model, make: EstimatorFactory, steps: int, replicates: int) -> None:
    """``steps`` training steps of ``model`` (``replicates`` copies of θ on a data plate each)."""
    for _ in range(steps):
        with Graph():
            _, theta = replicate(model.theta, replicates)
            model.build(make, theta)
            backward()
