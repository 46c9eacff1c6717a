"""Weak-derivative decompositions (c_θ, p⁺, p⁻), one module per distribution family."""

from __future__ import annotations

from typing import Optional

from torch.distributions import Distribution

from ._base import Part, WeakDerivative
from .bernoulli import BernoulliWeakDerivative
from .binomial import BinomialWeakDerivative
from .categorical import CategoricalWeakDerivative
from .exponential import ExponentialWeakDerivative
from .gamma import GammaWeakDerivative
from .geometric import GeometricWeakDerivative
from .laplace import LaplaceWeakDerivative
from .negative_binomial import NegativeBinomialWeakDerivative
from .normal import NormalWeakDerivative
from .poisson import PoissonWeakDerivative

__all__ = ["Part", "WeakDerivative", "DECOMPOSITIONS", "SUPPORTED", "decomposition_for"]

DECOMPOSITIONS: tuple[WeakDerivative, ...] = (
    NormalWeakDerivative(),
    BernoulliWeakDerivative(),
    CategoricalWeakDerivative(),
    PoissonWeakDerivative(),
    ExponentialWeakDerivative(),
    BinomialWeakDerivative(),
    GeometricWeakDerivative(),
    NegativeBinomialWeakDerivative(),
    LaplaceWeakDerivative(),
    GammaWeakDerivative(),
)

# the distribution types with a decomposition (the `distributions` of the mvd estimator)
SUPPORTED: tuple[type, ...] = tuple(t for dec in DECOMPOSITIONS for t in dec.families)


def decomposition_for(d: Distribution) -> Optional[WeakDerivative]:
    """The decomposition for ``d`` (``None`` if its family has none)."""
    for dec in DECOMPOSITIONS:
        if isinstance(d, dec.families):
            return dec
    return None
