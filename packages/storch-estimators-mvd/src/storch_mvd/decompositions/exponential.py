"""Weak derivative of the Exponential distribution."""

from __future__ import annotations

import torch
from torch.distributions import Exponential

from ._base import Part, WeakDerivative, new

__all__ = ["ExponentialWeakDerivative"]


class ExponentialWeakDerivative(WeakDerivative):
    """Exponential(λ): ∂_λ p(x) = e^{−λx}(1 − λx) = (1/λ)(Exp(λ) − Gamma(2, λ))(x), so
    c = 1/λ, p⁺ = Exponential(λ) = p, p⁻ = Gamma(2, λ) (Mohamed et al. 2020, Table 1).
    Coupled: x⁻ = x⁺ + e with e ~ Exponential(λ) independent (Gamma(2, λ) is a sum of two).

    Density ratios: p⁺(y)/p(y) = 1, p⁻(y)/p(y) = λy.
    """

    families = (Exponential,)

    def parts(self, d: Exponential, n: int, coupled: bool) -> list[Part]:
        rate = d.rate
        shape = (n, 1) + tuple(d.batch_shape)
        with torch.no_grad():
            r = rate.detach()
            plus = new(r, shape).exponential_() / r
            first = plus if coupled else new(r, shape).exponential_() / r
            minus = first + new(r, shape).exponential_() / r
        return [Part(rate.unsqueeze(0), (1.0 / r).unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Exponential, y: torch.Tensor) -> torch.Tensor:
        return 1.0 + d.rate.detach() * y
