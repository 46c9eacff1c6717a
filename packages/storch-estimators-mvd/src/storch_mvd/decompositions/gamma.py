"""Weak derivative of the Gamma distribution in its rate."""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Chi2, Gamma

from storch.extending import is_differentiated, raw_of

from ._base import Part, WeakDerivative, new

__all__ = ["GammaWeakDerivative"]


class GammaWeakDerivative(WeakDerivative):
    """Gamma(α, β) (torch's: concentration α, rate β), p(x) = β^α x^{α−1} e^{−βx} / Γ(α), in its rate:

        ∂_β p(x) = (α/β − x) p(x) = (α/β) [Gamma(α, β)(x) − Gamma(α + 1, β)(x)],

    since x p(x) = β^α x^α e^{−βx} / Γ(α) = (Γ(α + 1)/(β Γ(α))) Gamma(α + 1, β)(x) = (α/β) Gamma(α + 1, β)(x).
    So c = α/β, p⁺ = Gamma(α, β) = p, p⁻ = Gamma(α + 1, β) (α = 1: the Exponential's 1/λ,
    Exp(λ), Gamma(2, λ)). Check: c (E_{p⁺}[x] − E_{p⁻}[x]) = (α/β)(α/β − (α + 1)/β) = −α/β² = ∂_β (α/β).
    Coupled: x⁻ = x⁺ + E/β with E ~ Exponential(1) independent (Gamma(α + 1) = Gamma(α) + Gamma(1)).

    Density ratios to p: p⁺(y)/p(y) = 1, p⁻(y)/p(y) = β y / α.

    The concentration has no weak derivative here: ∂_α p = (log(βx) − ψ(α)) p changes sign at
    x = e^{ψ(α)}/β, and neither of its normalised halves is a law with a sampler (Mohamed et al. 2020,
    Table 1, list the rate only). A concentration that requires grad (a Chi2's df: concentration = df/2)
    is refused (:meth:`unsupported`): use 'reparameterization' (Gamma has rsample) or 'score'.
    """

    families = (Gamma,)  # (and Chi2, a Gamma subclass with rate ½)

    def unsupported(self, d: Gamma) -> Optional[str]:
        if is_differentiated(raw_of(d.concentration)):
            what = "a df" if isinstance(d, Chi2) else "a concentration"
            return (f"with {what} that requires grad: mvd has a weak derivative of the Gamma in its rate only "
                    "(∂_α p = (log(βx) − ψ(α)) p changes sign at x = e^ψ(α)/β, and neither normalised half has a "
                    "standard sampler). Use "
                    "'reparameterization' for this node (Gamma has rsample) or 'score', or detach "
                    f"{'df' if isinstance(d, Chi2) else 'the concentration'} if it is not to be learned")
        return None

    def parts(self, d: Gamma, n: int, coupled: bool) -> list[Part]:
        alpha, rate = d.concentration, d.rate
        shape = (n, 1) + tuple(d.batch_shape)
        with torch.no_grad():
            a, r = alpha.detach(), rate.detach()
            plus = torch.distributions.Gamma(a, r, validate_args=False).sample((n,)).unsqueeze(1)
            if coupled:
                minus = plus + new(r, shape).exponential_() / r
            else:
                minus = torch.distributions.Gamma(a + 1, r, validate_args=False).sample((n,)).unsqueeze(1)
        return [Part(rate.unsqueeze(0), (a / r).unsqueeze(0), plus, minus)]

    def ratio_sum(self, d: Gamma, y: torch.Tensor) -> torch.Tensor:
        return 1.0 + d.rate.detach() * y / d.concentration.detach()
