"""Weak derivative of the Binomial distribution (fixed total_count)."""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Binomial

from storch.extending import differentiated_total_count

from ._base import Part, WeakDerivative

__all__ = ["BinomialWeakDerivative"]


class BinomialWeakDerivative(WeakDerivative):
    """Binomial(N, θ) in its ``probs`` θ, N = total_count fixed: p(x) = C(N, x) θˣ (1 − θ)ᴺ⁻ˣ, and

        ∂_θ p(x) = N [Bin(N − 1, θ)(x − 1) − Bin(N − 1, θ)(x)]

    (x C(N, x) = N C(N − 1, x − 1) and (N − x) C(N, x) = N C(N − 1, x)), so c = N,
    p⁺ = 1 + Bin(N − 1, θ), p⁻ = Bin(N − 1, θ) (Mohamed et al. 2020, section 6; N = 1 is the
    Bernoulli's δ₁ − δ₀). Check: c (E_{p⁺}[x] − E_{p⁻}[x]) = N · 1 = ∂_θ (Nθ).
    Coupled: x⁺ = x⁻ + 1 (one draw of Bin(N − 1, θ)). A Binomial built from
    ``logits`` is differentiated through ``probs = sigmoid(logits)``.

    Density ratios to p: p⁺(y)/p(y) = y/(Nθ), p⁻(y)/p(y) = (N − y)/(N(1 − θ)).

    Edges. θ = 0 (p = δ₀): p⁺ = δ₁, p⁻ = δ₀, ∂_θ E_p[f] = N (f(1) − f(0)); p⁺(0)/p(0) = 0 (not 0/0),
    and x⁺ = 1, where p has no mass, carries its term through its weight's derivative as a Poisson
    at a rate of 0 does (``mvd.py``); θ = 1 likewise with p⁻ = δ_{N−1}. N = 0 (p = δ₀, nothing to
    differentiate): p⁺ = p⁻ = δ₀ = p with c = 0, both ratios 1. total_count itself is an integer
    and has no derivative: a total_count that requires grad is refused (:meth:`unsupported`).
    """

    families = (Binomial,)

    def unsupported(self, d: Binomial) -> Optional[str]:
        return differentiated_total_count(d)  # (the words GO's refusal uses too)

    def parts(self, d: Binomial, n: int, coupled: bool) -> list[Part]:
        theta = d.probs
        with torch.no_grad():
            p = theta.detach()
            total = d.total_count.detach().to(p.dtype).expand_as(p)
            some = total > 0
            inner = torch.distributions.Binomial((total - 1).clamp_min(0), probs=p, validate_args=False)
            minus = inner.sample((n,)).unsqueeze(1)
            first = minus if coupled else inner.sample((n,)).unsqueeze(1)
            plus = first + some.to(p.dtype)  # at N = 0: p⁺ = δ₀ = p
        return [Part(theta.unsqueeze(0), total.unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Binomial, y: torch.Tensor) -> torch.Tensor:
        p = d.probs.detach()
        total = d.total_count.detach().to(p.dtype)
        one = torch.ones((), dtype=p.dtype, device=p.device)
        # 0/0 at θ = 0 (y = 0) and at θ = 1 (y = N) is 0: that part puts no mass there; above it, ∞
        plus = torch.where(y == 0, torch.zeros_like(y), y / (total * p))
        minus = torch.where(y == total, torch.zeros_like(y), (total - y) / (total * (1 - p)))
        return torch.where(total == 0, 2 * one, plus + minus)
