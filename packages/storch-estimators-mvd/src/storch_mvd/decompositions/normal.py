"""Weak derivatives of the Normal distribution (Mohamed et al. 2020, Table 1)."""

from __future__ import annotations

import math

import torch
from torch.distributions import Normal

from ._base import Part, WeakDerivative, new

__all__ = ["NormalWeakDerivative"]

_SQRT_2PI = math.sqrt(2 * math.pi)


class NormalWeakDerivative(WeakDerivative):
    """N(μ, σ²), with r = (x − μ)/σ:

    mean μ:  ∂_μ p = (r/σ) p  =  c (p⁺ − p⁻) with c = 1/(σ√(2π)),
             p⁺ = μ + σW, p⁻ = μ − σW, W ~ Weibull(shape 2, scale √2) (the Rayleigh
             distribution; together a double-sided Weibull). Coupled: one W for both.
    scale σ: ∂_σ p = ((r² − 1)/σ) p  =  c (p⁺ − p⁻) with c = 1/σ,
             p⁺ = μ + σM, M ~ double-sided Maxwell (density m² φ(m)), p⁻ = N(μ, σ²).
             Coupled: z ~ N(0, I₃), M = sign(z₁)·|z|, p⁻'s noise = z₁.

    Density ratios to p (for the importance weights): p⁺_μ/p = √(2π) r [r > 0],
    p⁻_μ/p = √(2π) |r| [r < 0], p⁺_σ/p = r², p⁻_σ/p = 1.
    """

    families = (Normal,)

    def parts(self, d: Normal, n: int, coupled: bool) -> list[Part]:
        mu, sigma = d.loc, d.scale
        shape = (n, 1) + tuple(d.batch_shape)
        with torch.no_grad():
            m, s = mu.detach(), sigma.detach()
            w_plus = (2 * new(m, shape).exponential_()).sqrt()  # Rayleigh = Weibull(2, √2)
            w_minus = w_plus if coupled else (2 * new(m, shape).exponential_()).sqrt()
            z = torch.randn(shape + (3,), dtype=m.dtype, device=m.device)
            maxwell = torch.sign(z[..., 0]) * z.norm(dim=-1)  # double-sided Maxwell
            eps = z[..., 0] if coupled else torch.randn(shape, dtype=m.dtype, device=m.device)
        mean = Part(mu.unsqueeze(0), (1.0 / (s * _SQRT_2PI)).unsqueeze(0), m + s * w_plus, m - s * w_minus)
        scale = Part(sigma.unsqueeze(0), (1.0 / s).unsqueeze(0), m + s * maxwell, m + s * eps)
        return [mean, scale]

    def ratio_sum(self, d: Normal, y: torch.Tensor) -> torch.Tensor:
        r = (y - d.loc.detach()) / d.scale.detach()
        return _SQRT_2PI * r.abs() + r * r + 1.0
