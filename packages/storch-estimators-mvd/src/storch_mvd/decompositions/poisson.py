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

    A rate of exactly 0 (torch allows λ >= 0; a zero-inflated Poisson ``Poisson(lam * z)``): p = δ₀, and
    p(x; λ) = e^{−λ} λˣ / x! gives ∂_λ p(x) = p(x − 1) − p(x) at λ = 0 too (the one-sided derivative,
    which is also the analytic one: E_p[f] = Σ_x f(x) e^{−λ} λˣ / x! is entire in λ), i.e. δ₁ − δ₀: the
    same c = 1, p⁺ = 1 + Poisson(0) = δ₁, p⁻ = Poisson(0) = δ₀, drawn as at any rate, and ∂_λ E_p[f] =
    f(1) − f(0). The ratios are p⁻(0)/p(0) = 1, p⁺(0)/p(0) = 0 (not y/λ = 0/0, which was NaN and made
    every weight and gradient of the step NaN) and p⁺(y)/p(y) = ∞ at y >= 1 (p(y) = 0): the point x⁺ = 1
    has weight 0 (p has no mass there), and ``mvd`` carries its term f(1) ∇λ through the weight's
    derivative (``mvd.py``). The cost is evaluated at x⁺ = 1 there, as GO evaluates its neighbour: the
    derivative at a rate of 0 needs f(1).
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
        # p⁺(y)/p(y) = y/λ, and at λ = 0: 0 at y = 0 (where y/λ is 0/0), ∞ above (see the class docstring)
        r = y / d.rate.detach()
        return 1.0 + torch.where(y == 0, torch.zeros_like(r), r)
