"""Weak derivative of the Poisson distribution."""

from __future__ import annotations

import torch
from torch.distributions import Poisson

from ._base import Part, WeakDerivative

__all__ = ["PoissonWeakDerivative"]


class PoissonWeakDerivative(WeakDerivative):
    """Poisson(λ): ∂_λ p(x) = p(x − 1) − p(x), so c = 1, p⁺ = 1 + Poisson(λ), p⁻ = Poisson(λ)
    (Mohamed et al. 2020, Table 1). Coupled: x⁺ = x⁻ + 1.

    The paper (appendix D.4) sketches Poisson as "p⁺ has the same support as p: one
    importance sample from p⁺ with a score-function control variate". That support claim is
    false: p⁺ puts no mass on 0, so importance sampling from p⁺ alone misses f(0)·p(0) and is
    biased. It is p⁻ that equals p. Here the two parts are importance samples together
    (balance heuristic over {p⁺, p⁻}, whose union covers the whole support, see ``mvd.py``),
    which is unbiased and gives the same first derivative c (f(x⁺) − f(x⁻)) as the sketch.

    Density ratios: p⁺(y)/p(y) = y/λ, p⁻(y)/p(y) = 1.
    """

    families = (Poisson,)

    def parts(self, d: Poisson, n: int, coupled: bool) -> list[Part]:
        rate = d.rate
        with torch.no_grad():
            base = torch.distributions.Poisson(rate.detach(), validate_args=False)
            minus = base.sample((n,)).unsqueeze(1)
            plus = (minus if coupled else base.sample((n,)).unsqueeze(1)) + 1.0
        return [Part(rate.unsqueeze(0), torch.ones_like(rate).unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Poisson, y: torch.Tensor) -> torch.Tensor:
        return 1.0 + y / d.rate.detach()
