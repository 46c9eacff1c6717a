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
    p⁺_k = δ_k, p⁻_k = p(· | x ≠ k) (p renormalised without category k).

    One (p⁺, p⁻) pair per category, K pairs per batch element. The logits used are the
    distribution's normalised ``logits`` (= log probs); softmax is shift invariant, so the
    chain rule back to whatever the user passed (logits or probs) is exact. p⁺_k is a point
    mass, so there is nothing to couple.

    Density ratios at y = m: Σ_k (p⁺_k + p⁻_k)(m)/p_m = 1/p_m + Σ_{k≠m} 1/(1 − p_k).
    """

    families = (Categorical, OneHotCategorical)

    def parts(self, d, n: int, coupled: bool) -> list[Part]:
        logits = d.logits
        k = logits.shape[-1]
        with torch.no_grad():
            p = d.probs.detach()
            c = p * (1 - p)
            # p⁻_k: category k removed, (K, *batch, K)
            eye = torch.eye(k, dtype=torch.bool, device=logits.device)
            eye = eye.reshape((k,) + (1,) * (logits.dim() - 1) + (k,))
            masked = logits.detach().unsqueeze(0).masked_fill(eye, -float("inf"))
            minus = torch.distributions.Categorical(logits=masked, validate_args=False).sample((n,))
            plus = torch.arange(k, device=logits.device).reshape((1, k) + (1,) * (logits.dim() - 1))
            plus = plus.expand_as(minus)
            if isinstance(d, OneHotCategorical):
                plus = F.one_hot(plus, k).to(p.dtype)
                minus = F.one_hot(minus, k).to(p.dtype)
        return [Part(logits.movedim(-1, 0), c.movedim(-1, 0), plus, minus)]

    def ratio_sum(self, d, y: torch.Tensor) -> torch.Tensor:
        p = d.probs.detach()
        tiny = torch.finfo(p.dtype).tiny
        idx = y.argmax(-1) if isinstance(d, OneHotCategorical) else y
        p_y = torch.gather(p.expand(idx.shape + p.shape[-1:]), -1, idx.unsqueeze(-1).long()).squeeze(-1)
        inv_rest = 1.0 / (1.0 - p).clamp_min(tiny)
        rest = inv_rest.sum(-1) - torch.gather(inv_rest.expand(idx.shape + p.shape[-1:]), -1,
                                               idx.unsqueeze(-1).long()).squeeze(-1)
        return 1.0 / p_y.clamp_min(tiny) + rest
