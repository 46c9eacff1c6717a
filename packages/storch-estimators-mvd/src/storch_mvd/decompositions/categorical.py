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

    Cost: O(K log K) per batch element and replicate (:func:`_draw_without`, :meth:`ratio_sum`);
    no (K, *batch, K) tensor. A OneHotCategorical's points are one-hot vectors: its 2K points
    per element and replicate hold 2K² numbers whatever the decomposition does.

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
            # p⁻_k: n independent draws of p(· | x ≠ k) for every k, (n, K, *batch); drawn from probs, not
            # logits: a Categorical built from probs has logits log(clamp(probs, eps)), finite at probs = 0
            minus = _draw_without(p, n).movedim(-1, 1)
            ks = torch.arange(k, device=logits.device).reshape((1, k) + (1,) * (logits.dim() - 1))
            # at p_k = 1 nothing is left: the (inactive) slot holds k itself
            minus = torch.where((p < 1).movedim(-1, 0), minus, ks)
            # p⁺_k = δ_k at p_k = 0 is impossible: the inactive slot holds p⁻_k's draw (a draw of p)
            plus = torch.where(possible.movedim(-1, 0), ks, minus)
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
        kk = p.shape[-1]
        p_y = torch.gather(p.expand(idx.shape + (kk,)), -1, idx.unsqueeze(-1)).squeeze(-1)
        # Σ_{k≠y} 1/(1 − p_k) in O(K) per element and O(1) per y. Not as Σ_k − term y: at p_y = 1 that term
        # is 1/tiny and the subtraction cancels the rest to 0. Instead, with a = argmax p and
        # S = Σ_{k≠a} 1/(1 − p_k): the sum is S at y = a, else (S − 1/(1 − p_y)) + 1/(1 − p_a). This is
        # exact up to rounding: only p_a can exceed 1/2, so for y ≠ a the term removed is at most 2 while every
        # term left in S − 1/(1 − p_y) is at least 1 (no cancellation), and the possibly huge 1/(1 − p_a) is
        # added last.
        inv = 1.0 / (1.0 - p).clamp_min(tiny)
        top = p.argmax(-1, keepdim=True)
        s = inv.scatter(-1, top, 0.0).sum(-1)
        inv_top = inv.gather(-1, top).squeeze(-1)
        inv_y = torch.gather(inv.expand(idx.shape + (kk,)), -1, idx.unsqueeze(-1)).squeeze(-1)
        rest = torch.where(idx == top.squeeze(-1), s, (s - inv_y) + inv_top)
        return 1.0 / p_y.clamp_min(tiny) + rest


def _draw_without(p: torch.Tensor, n: int) -> torch.Tensor:
    """For each category k, ``n`` independent draws of p(· | x ≠ k): shape ``(n, *batch, K)``, entry
    ``[..., k]`` a draw without k, all entries independent. O(K log K) per batch element and draw.

    Inverse CDF of p with k's interval cut out: with C_j = Σ_{i≤j} p_i (C_{−1} = 0), category m owns
    [C_{m−1}, C_m) of [0, C_{K−1}). Draw v uniform on [0, C_{k−1} + (C_{K−1} − C_k)), the mass without k;
    v below C_{k−1} lies in the same place, v above is moved past k's interval to C_k + (v − C_{k−1}). Each
    m ≠ k then gets an interval of length p_m, so P(m) = p_m / (1 − p_k) = p(m | x ≠ k) (up to the rounding
    of C, as torch.multinomial's own inverse CDF). No draw lands on k: below C_{k−1} the search stops at
    m ≤ k − 1, and C_k + (v − C_{k−1}) ≥ C_k in floating point (adding a non-negative number never rounds
    down), so m ≥ k + 1; nor on a category of probability 0 (its interval is empty: C_m = C_{m−1} exactly).
    A search that runs off the end (rounding that lost the mass after k; probability ~1e−16) takes the
    most probable category other than k. At p_k = 1 the entry is meaningless (nothing is left); the caller
    replaces it.

    The same law as masking p to a (K, *batch, K) tensor and drawing each row (O(K²)); a common x₀ ~ p
    with y_k = x₀ if x₀ ≠ k, else the runner-up of a Gumbel top-2, also has these marginals in O(K), but
    couples the y_k across k, which changes the variance of a gradient summed over the logits.
    """
    # MPS has no float64; elsewhere, sum in float64 so that the rounding of C is far below p's own
    wide = torch.float32 if p.device.type == "mps" else torch.float64
    pw = p.to(wide)
    cum = pw.cumsum(-1)  # C_k
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], -1)  # C_{k−1}, exactly
    total = cum[..., -1:]
    left = before + (total - cum)  # the mass without k
    u = torch.rand(p.shape[:-1] + (n, p.shape[-1]), dtype=wide, device=p.device)  # (*batch, n, K)
    v = u * left.unsqueeze(-2)
    pos = torch.where(v < before.unsqueeze(-2), v, cum.unsqueeze(-2) + (v - before.unsqueeze(-2)))
    m = torch.searchsorted(cum, pos.flatten(-2), right=True).reshape(pos.shape)
    kk = p.shape[-1]
    if kk > 1:
        top2 = p.topk(2, -1).indices  # the most probable category other than k: the first of these ≠ k
        ks = torch.arange(kk, device=p.device)
        other = torch.where(top2[..., :1] == ks, top2[..., 1:], top2[..., :1])  # (*batch, K)
        m = torch.where(m < kk, m, other.unsqueeze(-2))
    else:
        m = m.clamp_max(0)
    return m.movedim(-2, 0)  # (n, *batch, K)
