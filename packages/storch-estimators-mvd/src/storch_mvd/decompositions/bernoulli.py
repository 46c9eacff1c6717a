"""Weak derivative of the Bernoulli distribution."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli

from ._base import Part, WeakDerivative

__all__ = ["BernoulliWeakDerivative"]


class BernoulliWeakDerivative(WeakDerivative):
    """Bernoulli(θ) in its ``probs`` θ: p(x) = θˣ(1 − θ)¹⁻ˣ, so ∂_θ p = δ₁ − δ₀:

    c = 1, p⁺ = δ₁, p⁻ = δ₀ (Mohamed et al. 2020, Table 1). Both parts are deterministic, so
    the gradient f(1) − f(0) is exact given the other elements; ``coupled`` changes nothing.
    A Bernoulli built from ``logits`` is differentiated through ``probs = sigmoid(logits)``.

    Density ratios: p⁺/p + p⁻/p = 1/p(y) at y ∈ {0, 1}.

    Impossible and certain values (a mask: ``probs * mask``, logits −∞ or +∞, or a sigmoid that
    rounds to 0 or 1), as for a Categorical (``categorical.py``), each entry on its own:

    - θ = 0: p⁺ = δ₁ puts mass where p has none; its slot is inactive (weight 0) and holds 0, so
      the cost never sees the impossible 1. p⁻ = δ₀ = p stays a proposal.
    - θ = 1: likewise p⁻ = δ₀ is inactive and holds 1; p⁺ = δ₁ = p stays.
    - c = 0 there, and θ enters l as the constant 0 (no gradient at all). In the logits
      ∂_logit E_p[f] = σ'(logit) (f(1) − f(0)) = p (1 − p) (f(1) − f(0)) = 0, so nothing is lost.
      In probs, θ on its boundary has the one-sided derivative f(1) − f(0), which needs the cost at
      the impossible value: it is not estimated (0), as for a Categorical's probs 0.

    The active slots' density ratio at the possible y is still 1/p(y) (= 1 at θ ∈ {0, 1}).
    """

    families = (Bernoulli,)

    def parts(self, d: Bernoulli, n: int, coupled: bool) -> list[Part]:
        probs = d.probs
        with torch.no_grad():
            p = probs.detach()
            possible_1, possible_0 = p > 0, p < 1
            shape = (n, 1) + tuple(d.batch_shape)
            # an inactive slot holds the value that p draws surely: 0 at θ = 0, 1 at θ = 1
            plus = torch.where(possible_1, 1.0, 0.0).to(p.dtype).expand(shape).clone()
            minus = torch.where(possible_0, 0.0, 1.0).to(p.dtype).expand(shape).clone()
            inside = possible_1 & possible_0
            c = inside.to(p.dtype)
            active = torch.stack([possible_1, possible_0], 0).unsqueeze(0)  # (1, 2, *batch)
        # θ on the boundary enters l as 0 with no gradient (c = 0 there)
        theta = torch.where(inside, probs, torch.zeros((), dtype=probs.dtype, device=probs.device))
        return [Part(theta.unsqueeze(0), c.unsqueeze(0), plus, minus, active)]

    def ratio_sum(self, d: Bernoulli, y: torch.Tensor) -> torch.Tensor:
        # 1/p(y); log_prob is computed from logits, stable near 0 and 1. Where p draws y surely (θ = 0, y = 0;
        # θ = 1, y = 1) the ratio is 1: torch's log_prob is NaN at an infinite logit
        p = d.probs.detach()
        sure = ((p == 0) & (y == 0)) | ((p == 1) & (y == 1))
        ratio = torch.exp(-d.log_prob(y).detach())
        return torch.where(sure, torch.ones_like(ratio), ratio)
