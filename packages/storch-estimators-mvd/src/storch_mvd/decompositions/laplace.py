"""Weak derivatives of the Laplace distribution."""

from __future__ import annotations

import torch
from torch.distributions import Laplace

from ._base import Part, WeakDerivative, new

__all__ = ["LaplaceWeakDerivative"]


class LaplaceWeakDerivative(WeakDerivative):
    """Laplace(μ, b): p(x) = (1/(2b)) e^{−|r|}, r = (x − μ)/b.

    loc μ:   ∂_μ p = (sign(r)/b) p = (1/(2b)) [(1/b) e^{−r} [r > 0] − (1/b) e^{r} [r < 0]]
             = c (p⁺ − p⁻) with c = 1/(2b), p⁺ = μ + bE, p⁻ = μ − bE, E ~ Exponential(1): the two
             one-sided halves of p, each renormalised. Check: c (E_{p⁺}[x] − E_{p⁻}[x]) = (1/(2b)) · 2b = 1.
             Coupled: one E for both.
    scale b: ∂_b p = ((|r| − 1)/b) p = c (p⁺ − p⁻) with c = 1/b, p⁺(x) = |r| p(x) (it integrates to
             E_p|r| = 1), p⁻ = p. Under p⁺, |r| has density g e^{−g} (Gamma(2, 1)) and the sign of r is
             fair: p⁺ = μ + b S G, S = ±1 with probability ½, G ~ Gamma(2, 1) = E₁ + E₂ (the double-sided
             Gamma(2), the Laplace twin of the Normal's double-sided Maxwell). p⁻ = μ + b S' E'.
             Check: c (E_{p⁺}[x²] − E_{p⁻}[x²]) = (1/b)(6b² − 2b²) = 4b = ∂_b (μ² + 2b²).
             Coupled: G = E₁ + E₂ and p⁻ = μ + b S E₁ (the same sign and the first exponential).

    Density ratios to p: p⁺_μ/p = 2 [r > 0], p⁻_μ/p = 2 [r < 0], p⁺_b/p = |r|, p⁻_b/p = 1; their sum
    is 3 + |r| (for r ≠ 0; r = 0 has probability 0 under every part).
    """

    families = (Laplace,)

    def parts(self, d: Laplace, n: int, coupled: bool) -> list[Part]:
        mu, b = d.loc, d.scale
        shape = (n, 1) + tuple(d.batch_shape)
        with torch.no_grad():
            m, s = mu.detach(), b.detach()
            e_plus = new(m, shape).exponential_()
            e_minus = e_plus if coupled else new(m, shape).exponential_()
            sign = _signs(m, shape)
            e1, e2 = new(m, shape).exponential_(), new(m, shape).exponential_()
            if coupled:
                sign_minus, e_scale = sign, e1
            else:
                sign_minus, e_scale = _signs(m, shape), new(m, shape).exponential_()
        loc = Part(mu.unsqueeze(0), (0.5 / s).unsqueeze(0), m + s * e_plus, m - s * e_minus)
        scale = Part(b.unsqueeze(0), (1.0 / s).unsqueeze(0), m + s * sign * (e1 + e2), m + s * sign_minus * e_scale)
        return [loc, scale]

    def ratio_sum(self, d: Laplace, y: torch.Tensor) -> torch.Tensor:
        r = (y - d.loc.detach()) / d.scale.detach()
        return 3.0 + r.abs()


def _signs(like: torch.Tensor, shape) -> torch.Tensor:
    """Independent fair signs ±1 of ``shape``, in the dtype and on the device of ``like``."""
    return 2.0 * torch.randint(0, 2, tuple(shape), device=like.device).to(like.dtype) - 1.0
