"""Weak derivatives of Categorical and OneHotCategorical, one pair per category."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

from ._base import Part, WeakDerivative

__all__ = ["CategoricalWeakDerivative"]


class CategoricalWeakDerivative(WeakDerivative):
    """Categorical with p = softmax(θ) in its logits θ ∈ R^K:

    ∂_{θ_k} p(x) = p_k (δ_k(x) − p(x)) = c_k (p⁺_k − p⁻_k) with c_k = p_k (1 − p_k),
    p⁺_k = δ_k, p⁻_k = p(· | x ≠ k) (p renormalised without category k), since
    p = p_k δ_k + (1 − p_k) p⁻_k gives δ_k − p = (1 − p_k)(δ_k − p⁻_k).

    One (p⁺, p⁻) pair per category, K pairs per batch element. The logits used are the
    distribution's normalised ``logits`` (= log probs); softmax is shift invariant, so the
    chain rule back to whatever the user passed (logits or probs) is exact. p⁺_k is a point
    mass, so there is nothing to couple.

    Impossible and certain categories (masked logits θ_k = −∞, probs exactly 0 or 1; each row
    of a batch has its own): c_k = p_k (1 − p_k) is exactly 0 iff p_k ∈ {0, 1}, and then
    ∂_{θ_k} E_p[f] = c_k (E_{p⁺}[f] − E_{p⁻}[f]) = 0 needs neither expectation.

    - p_k = 0: p⁺_k = δ_k puts mass where p has none; its slot is inactive (weight 0, a draw of
      p as stand-in), so the cost never sees k. p⁻_k = p(· | x ≠ k) = p itself: a proposal as
      any other. θ_k = −∞ is replaced by 0 in l = ±θ ⊥(coefficient 0), where −∞ · 0 was NaN.
    - p_k = 1: p⁻_k does not exist (no mass left without k); its slot is inactive and holds k.

    So G_e = {p⁺_k : p_k > 0} ∪ {p⁻_k : p_k < 1}, and its density ratios at a possible y = m
    (p_m > 0, so every k ≠ m has p_k < 1):
    Σ_{q ∈ G_e} q(m)/p_m = 1/p_m + Σ_{k≠m} 1/(1 − p_k), the formula of the unmasked case
    (= K at p_m = 1).
    """

    families = (Categorical, OneHotCategorical)

    def parts(self, d, n: int, coupled: bool) -> list[Part]:
        logits = d.logits
        k = logits.shape[-1]
        with torch.no_grad():
            p = d.probs.detach()
            c = p * (1 - p)  # exactly 0 iff p_k ∈ {0, 1}
            possible = p > 0
            # p⁻_k: category k removed, (K, *batch, K); drawn from probs, not logits: a Categorical
            # built from probs has logits log(clamp(probs, eps)), finite at probs = 0
            eye = torch.eye(k, dtype=torch.bool, device=logits.device)
            eye = eye.reshape((k,) + (1,) * (logits.dim() - 1) + (k,))
            # at p_k = 1 nothing is left: k is not removed, the (inactive) slot draws k itself
            drop = eye & (p < 1).movedim(-1, 0).unsqueeze(-1)
            rest = p.unsqueeze(0).masked_fill(drop, 0.0)
            minus = torch.distributions.Categorical(probs=rest, validate_args=False).sample((n,))
            plus = torch.arange(k, device=logits.device).reshape((1, k) + (1,) * (logits.dim() - 1))
            # p⁺_k = δ_k at p_k = 0 is impossible: the inactive slot holds p⁻_k's draw (a draw of p)
            plus = torch.where(possible.movedim(-1, 0), plus, minus)
            active = torch.stack([possible, p < 1], 0).movedim(-1, 0)  # (K, 2, *batch)
            if isinstance(d, OneHotCategorical):
                plus = F.one_hot(plus, k).to(p.dtype)
                minus = F.one_hot(minus, k).to(p.dtype)
        # a masked logit (−∞, coefficient 0) enters l as 0 with no gradient: −∞ · 0 is NaN
        theta = torch.where(possible, logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
        return [Part(theta.movedim(-1, 0), c.movedim(-1, 0), plus, minus, active)]

    def ratio_sum(self, d, y: torch.Tensor) -> torch.Tensor:
        p = d.probs.detach()
        tiny = torch.finfo(p.dtype).tiny
        idx = (y.argmax(-1) if isinstance(d, OneHotCategorical) else y).long()
        p_y = torch.gather(p.expand(idx.shape + p.shape[-1:]), -1, idx.unsqueeze(-1)).squeeze(-1)
        # Σ_{k≠y} 1/(1 − p_k), summed without term y (not as total minus term y: at p_y = 1 that
        # term is 1/tiny and the subtraction cancels the rest to 0)
        inv_rest = (1.0 / (1.0 - p).clamp_min(tiny)).expand(idx.shape + p.shape[-1:])
        rest = inv_rest.masked_fill(F.one_hot(idx, p.shape[-1]).bool(), 0.0).sum(-1)
        return 1.0 / p_y.clamp_min(tiny) + rest
