"""Weak derivative of the Geometric distribution (torch's: failures before the first success)."""

from __future__ import annotations

import torch
from torch.distributions import Geometric

from storch import UnsupportedDistributionError
from storch.extending import assume, is_tracing

from ._base import Part, WeakDerivative

__all__ = ["GeometricWeakDerivative"]


class GeometricWeakDerivative(WeakDerivative):
    """Geometric(θ) in its ``probs`` θ, on {0, 1, ...}: p(x) = θ (1 − θ)ˣ. With q = 1 − θ,

        ∂_θ p(x) = qˣ − x θ q^{x−1} = (1/θ) [θ qˣ − x θ² q^{x−1}] = (1/θ) [Geom(θ)(x) − (1 + NB(2, θ))(x)],

    where x θ² q^{x−1} (x >= 1) is the law of 1 + G₁ + G₂ with G₁, G₂ ~ Geom(θ) independent
    (NB(2, θ), failures before the second success, has pmf (y + 1) θ² q^y). So c = 1/θ,
    p⁺ = Geom(θ) = p, p⁻ = 1 + G₁ + G₂ — the discrete twin of the Exponential's Exp(λ) − Gamma(2, λ).
    Check: c (E_{p⁺}[x] − E_{p⁻}[x]) = (1/θ)(q/θ − 1 − 2q/θ) = −1/θ² = ∂_θ (q/θ).
    Coupled: x⁻ = 1 + x⁺ + G with G ~ Geom(θ) independent. A Geometric built from ``logits`` is
    differentiated through ``probs = sigmoid(logits)``.

    Density ratios to p: p⁺(y)/p(y) = 1, p⁻(y)/p(y) = y θ/q.

    θ = 1 (p = δ₀; torch allows it): p⁻ = δ₁ and ∂_θ E_p[f] = f(0) − f(1); p⁻(0)/p(0) = 0 (not 0/0),
    and x⁻ = 1, where p has no mass, carries its term through its weight's derivative (``mvd.py``).

    θ = 0 (a logit of −∞, or one so negative that σ underflows to 0: below about −88.7 in float32,
    −709.8 in float64) never succeeds: every sample is infinite and c = 1/θ is too. Refused with
    ``UnsupportedDistributionError`` before anything is drawn (the cost was evaluated at inf and the
    step failed late, with a ``NonFiniteCostError`` naming the cost); under ``storch.compile`` an
    ``assume`` of the replayed step.
    """

    families = (Geometric,)

    def parts(self, d: Geometric, n: int, coupled: bool) -> list[Part]:
        theta = d.probs
        _refuse_probs_0(theta.detach())
        with torch.no_grad():
            p = theta.detach()
            geom = torch.distributions.Geometric(probs=p, validate_args=False)
            plus = geom.sample((n,)).unsqueeze(1)
            first = plus if coupled else geom.sample((n,)).unsqueeze(1)
            minus = 1.0 + first + geom.sample((n,)).unsqueeze(1)
        return [Part(theta.unsqueeze(0), (1.0 / p).unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Geometric, y: torch.Tensor) -> torch.Tensor:
        p = d.probs.detach()
        # at θ = 1: 0 at y = 0 (where y θ/q is 0/0), ∞ above
        return 1.0 + torch.where(y == 0, torch.zeros_like(y), y * p / (1 - p))


def _refuse_probs_0(p: torch.Tensor) -> None:
    """Refuse probs 0 (eagerly by value; while traced, ``assume``: no branch on values)."""
    if p.is_meta:
        return
    bad = ~(p > 0)
    message = (f"estimator 'mvd' does not support Geometric with probs 0 (a logit of -inf, or one so negative that "
               f"sigmoid underflows to 0 in {p.dtype}): it never succeeds, its sample is infinite. Keep probs above "
               "0 (e.g. logits clamped below at -30), or mask the node's cost instead of its probability")
    if is_tracing():
        assume(~bad.any(), message)
    elif bool(bad.any()):
        raise UnsupportedDistributionError(message)
