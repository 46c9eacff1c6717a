"""Weak derivative of the Bernoulli distribution."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli

from ._base import Part, WeakDerivative, new

__all__ = ["BernoulliWeakDerivative"]


class BernoulliWeakDerivative(WeakDerivative):
    """Bernoulli(θ) in its ``probs`` θ: p(x) = θˣ(1 − θ)¹⁻ˣ, so ∂_θ p = δ₁ − δ₀:

    c = 1, p⁺ = δ₁, p⁻ = δ₀ (Mohamed et al. 2020, Table 1). Both parts are deterministic, so
    the gradient f(1) − f(0) is exact given the other elements; ``coupled`` changes nothing.
    A Bernoulli built from ``logits`` is differentiated through ``probs = sigmoid(logits)``.

    Density ratios: p⁺/p + p⁻/p = 1/p(y) at y ∈ {0, 1}.
    """

    families = (Bernoulli,)

    def parts(self, d: Bernoulli, n: int, coupled: bool) -> list[Part]:
        theta = d.probs
        shape = (n, 1) + tuple(d.batch_shape)
        plus = new(theta, shape).fill_(1.0)
        minus = new(theta, shape).fill_(0.0)
        return [Part(theta.unsqueeze(0), torch.ones_like(theta).unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Bernoulli, y: torch.Tensor) -> torch.Tensor:
        # 1/p(y); log_prob is computed from logits, stable near 0 and 1
        return torch.exp(-d.log_prob(y).detach())
