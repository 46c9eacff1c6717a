"""Weak derivative of the NegativeBinomial distribution (torch's: successes before r failures; fixed total_count)."""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch.distributions import Distribution, NegativeBinomial

from storch import UnsupportedDistributionError
from storch.extending import assume, differentiated_total_count, given_by_probs, is_tracing

from ._base import Part, WeakDerivative

__all__ = ["NegativeBinomialWeakDerivative"]


class NegativeBinomialWeakDerivative(WeakDerivative):
    """NegativeBinomial(r, θ) in its ``probs`` θ, r = total_count fixed (a real number >= 0), on {0, 1, ...}:
    p(x) = C(x + r − 1, x) θˣ (1 − θ)ʳ (torch's parametrisation: x successes before the r-th failure), and

        ∂_θ p(x) = (x/θ − r/(1 − θ)) p(x) = r/(1 − θ) [NB(r + 1, θ)(x − 1) − NB(r, θ)(x)]

    since x C(x + r − 1, x) = r C(x + r − 1, x − 1) (Γ(x + r)/(Γ(x) Γ(r)) = r Γ(x + r)/(Γ(x) Γ(r + 1)), so real
    r too) and θˣ (1 − θ)ʳ = θ (1 − θ)⁻¹ · θ^{x−1} (1 − θ)^{r+1}: (x/θ) NB(r, θ)(x) = r/(1 − θ) NB(r + 1, θ)(x − 1).
    So c = r/(1 − θ), p⁺ = 1 + NB(r + 1, θ), p⁻ = NB(r, θ) = p: the Poisson's shift decomposition with one
    more failure. Source: derived here from the score x/θ − r/(1 − θ), by the identity above (the same
    product-rule step as the Binomial's row; Mohamed et al. 2020, section 6, Table 1 has no NegativeBinomial
    row); checked pointwise against autograd of torch's log_prob (``test_negative_binomial_weak_derivative_is_dp``
    in ``tests/mvd/test_mvd_negative_binomial.py``).
    Check: c (E_{p⁺}[x] − E_{p⁻}[x]) = r/(1 − θ) (1 + (r + 1)θ/(1 − θ) − rθ/(1 − θ)) = r/(1 − θ)² = ∂_θ (rθ/(1 − θ)).
    Coupled: x⁺ = 1 + x⁻ + G with G ~ NB(1, θ) independent (NB(r + 1, θ) is NB(r, θ) plus an independent
    NB(1, θ)), as the Poisson's x⁺ = x⁻ + 1 and the Geometric's x⁻ = 1 + x⁺ + G. A NegativeBinomial built
    from ``logits`` is differentiated through ``probs = sigmoid(logits)``.

    Density ratios to p: p⁺(y)/p(y) = y (1 − θ)/(r θ), p⁻(y)/p(y) = 1.

    Edges. θ = 0 (p = δ₀; probs 0 or a logit of −∞): p⁺ = δ₁, p⁻ = δ₀, c = r, ∂_θ E_p[f] = r (f(1) − f(0))
    (the one-sided derivative, also the analytic one: E_p[f] is a power series in θ); p⁺(0)/p(0) = 0 (not
    0/0), and x⁺ = 1, where p has no mass, carries its term through its weight's derivative as a Poisson at
    a rate of 0 does (``mvd.py``). r = 0 (p = δ₀, nothing to differentiate): p⁺ = p⁻ = δ₀ = p with c = 0,
    both ratios 1. θ = 1 (probs 1, a logit of +∞, or one so large that σ rounds to 1: above about 16.6 in
    float32, 36.7 in float64) never fails: its sample is infinite (torch's clamp draws a huge one) and so is
    c = r/(1 − θ); refused with ``UnsupportedDistributionError`` (an ``assume`` under ``storch.compile``), as
    ``go`` refuses it. total_count is a real r whose derivative this module does not compute: a total_count
    that requires grad is refused (:meth:`unsupported`: use ``'score'``, or detach it).
    """

    families = (NegativeBinomial,)

    # (the parameters are typed as the base class's: a NegativeBinomial is what decomposition_for hands over)

    def unsupported(self, d: Distribution) -> Optional[str]:
        return differentiated_total_count(d)  # (the words GO's refusal uses too)

    def parts(self, d: Distribution, n: int, coupled: bool) -> list[Part]:
        d = cast(NegativeBinomial, d)
        theta = d.probs
        _refuse_probs_1(d, theta.detach())
        with torch.no_grad():
            p = theta.detach()
            total = d.total_count.detach().to(p.dtype).expand_as(p)
            some = total > 0
            possible = p > 0  # at θ = 0 every draw is 0 (torch's probs_to_logits clamps 0 to eps: rarely 1)
            base = torch.distributions.NegativeBinomial(total, probs=p, validate_args=False)
            minus = torch.where(possible, base.sample((n,)), 0.0).unsqueeze(1)
            if coupled:
                one = torch.distributions.NegativeBinomial(torch.ones_like(p), probs=p, validate_args=False)
                extra = minus + torch.where(possible, one.sample((n,)), 0.0).unsqueeze(1)
            else:
                wider = torch.distributions.NegativeBinomial(total + 1, probs=p, validate_args=False)
                extra = torch.where(possible, wider.sample((n,)), 0.0).unsqueeze(1)
            plus = torch.where(some, 1.0 + extra, minus)  # at r = 0: p⁺ = δ₀ = p
            c = torch.where(some, total / (1 - p), torch.zeros_like(p))
        return [Part(theta.unsqueeze(0), c.unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Distribution, y: torch.Tensor) -> torch.Tensor:
        d = cast(NegativeBinomial, d)
        p = d.probs.detach()
        total = d.total_count.detach().to(p.dtype)
        one = torch.ones((), dtype=p.dtype, device=p.device)
        # p⁺(y)/p(y) = y (1 − θ)/(r θ); at θ = 0: 0 at y = 0 (where it is 0/0), ∞ above (see the class docstring)
        plus = torch.where(y == 0, torch.zeros_like(y), y * (1 - p) / (total * p))
        return torch.where(total == 0, 2 * one, 1.0 + plus)


def _refuse_probs_1(d: NegativeBinomial, p: torch.Tensor) -> None:
    """Refuse probs 1 (eagerly by value; while traced, ``assume``: no branch on values)."""
    if p.is_meta:
        return
    if given_by_probs(d):
        ones = "probs 1"
    else:  # σ(l) = 1 / (1 + e^-l) is 1 once e^-l < eps / 2: from l = log(2 / eps), 16.6 in float32, 36.7 in float64
        ones = (f"probs 1 (a logit of +inf, or one so large that sigmoid rounds to 1 in {p.dtype}: above about "
                f"{math.log(2 / torch.finfo(p.dtype).eps):.1f})")
    message = (f"estimator 'mvd' does not support NegativeBinomial with {ones}: it never fails, its sample is "
               "infinite (torch's clamp draws a huge count) and so is c = r/(1 - probs). Keep probs below 1 (e.g. "
               "logits clamped above at 15, or the model in float64, where logits up to about 36 give probs below 1)")
    bad = ~(p < 1)
    if is_tracing():
        assume(~bad.any(), message)
    elif bool(bad.any()):
        raise UnsupportedDistributionError(message)
