"""Stochastic beam search: Gumbel-top-k over a joint support too large to enumerate.

For a node whose n batch elements are independent finite variables (K values each), the K^n
joint values are never listed: the ordered sample without replacement of size k is drawn
variable by variable with the top-down truncated Gumbels of Kool et al. (2019), which gives
exactly the distribution of Gumbel-top-k over the joint (their Theorem 1), in O(n k K).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from storch import Node

__all__ = ["stochastic_beam_search", "beam_step", "top_possible"]


def _gumbel_like(x: torch.Tensor) -> torch.Tensor:
    """Standard Gumbels of ``x``'s shape: -log(-log U), U uniform on [tiny, 1) (torch's CPU
    ``exponential_`` costs ~6x a ``rand_like``; in place: no further tensors)."""
    return torch.rand_like(x).clamp_min_(torch.finfo(x.dtype).tiny).log_().neg_().log_().neg_()


def _truncated(phi_g: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Gumbels ``phi_g`` (last dim: siblings) conditioned on their maximum being ``bound``.

    G̃ = -log(exp(-T) - exp(-Z) + exp(-G)) with Z = max G, in the stable form of Kool et al.
    (2019), appendix B: v = T - G + log(1 - exp(G - Z)), G̃ = T - max(v, 0) - log1p(exp(-|v|)).
    """
    z = phi_g.max(-1, keepdim=True).values
    t = bound.unsqueeze(-1)
    # log(1 - exp(G - Z)) with G - Z <= 0; -inf where G = Z (then v = -inf and G̃ = T). It is added
    # to O(1) values, so its absolute error matters: log(-expm1(.)) alone is accurate to ~1e-16
    # absolute for every G - Z <= 0 (the two-branch log1mexp is for relative accuracy near 0)
    v = t - phi_g + torch.log(-torch.expm1(phi_g - z))
    # max(v, 0) + log1p(exp(-|v|)) is softplus(v): one op (exact to float precision)
    return t - F.softplus(v, threshold=50.0)


def top_possible(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest ``scores`` along the last dim, never an impossible (``-inf``) entry.

    m = min(k, the largest number of finite scores of any row): where the support is smaller than
    k the sample is smaller. A row with fewer than m finite scores gets padding slots that repeat
    its best entry (a value the model can produce) with score -inf; the caller gives them
    probability 0 (weight 0, gradient function 0).

    Returns:
        ``(indices, values, pad)``, each ``(*rows, m)``; ``values`` is ``-inf`` on padding; ``pad``
        is ``None`` when every score is finite (the common case: no padding, no extra work).
    """
    finite = torch.isfinite(scores)
    if scores.is_meta or bool(finite.all()):  # meta: no values, every score counts as finite
        top = scores.topk(min(k, scores.shape[-1]), dim=-1)  # sorted: the order of the sample
        return top.indices, top.values, None
    n_ok = int(finite.sum(-1).max()) if finite.numel() else 0
    m = max(1, min(k, n_ok))
    top = scores.topk(m, dim=-1)  # sorted: the order of the sample
    pad = ~torch.isfinite(top.values)
    indices = torch.where(pad, top.indices[..., :1].expand_as(top.indices), top.indices)
    values = top.values.masked_fill(pad, -math.inf)
    return indices, values, pad


def stochastic_beam_search(node: Node, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An ordered sample without replacement of ``k`` joint values of the node.

    Returns:
        ``(values, logp, g)``: ``values`` of shape ``(k, *parents, *own_batch, *event)``, the joint
        log-probabilities ``logp`` of shape ``(k, *parents)``, carrying gradient, and the perturbed
        log-probabilities ``g`` (their Gumbels), which a partition's next step conditions on.
    """
    d = node.distribution
    support = d.enumerate_support(expand=False)  # (K, 1, ..., 1, *event)
    n_cat = support.shape[0]
    event = tuple(d.event_shape)
    parents = tuple(d.batch_shape[:len(node.parents)])
    own = tuple(d.batch_shape[len(node.parents):])
    n = math.prod(own)
    p = math.prod(parents)
    # log p of every value of every variable: (K, P, n), with gradient
    lp = d.log_prob(support.expand((n_cat,) + tuple(d.batch_shape) + event)).reshape(n_cat, p, n)
    with torch.no_grad():  # sampling is not differentiated
        lpt = lp.detach().permute(2, 1, 0)  # (n, P, K): variable j's log-probabilities, one row per entry
        # the beam in the layout (P, beam): candidates (P, beam, K) flatten to (P, beam * K) as a view
        phi = lpt.new_zeros(p, 1)  # log-probabilities of the beam's prefixes
        g = _gumbel_like(phi)  # their perturbed values: G_root ~ Gumbel(0)
        steps = []  # (parent, value) per variable, (P, m) each: the sample is read back at the end
        for j in range(n):
            cand_phi = phi.unsqueeze(-1) + lpt[j].unsqueeze(1)  # (P, beam, K)
            finite = torch.isfinite(cand_phi)
            if cand_phi.is_meta or bool(finite.all()):  # the common case: every value possible
                cand_g = _truncated(cand_phi + _gumbel_like(cand_phi), g)
            else:  # never an impossible value: -inf candidates stay -inf, the rest are truncated as usual
                safe = torch.where(finite, cand_phi, torch.full_like(cand_phi, -1e30))
                bound = torch.where(torch.isfinite(g), g, torch.full_like(g, -1e30))
                cand_g = _truncated(safe + _gumbel_like(safe), bound)
                cand_g = torch.where(finite, cand_g, torch.full_like(cand_g, -math.inf))
            beam = phi.shape[1]
            indices, top_g, pad = top_possible(cand_g.reshape(p, beam * n_cat), k)  # (P, m), sorted
            steps.append((indices // n_cat, indices % n_cat))
            g = top_g
            phi = cand_phi.reshape(p, beam * n_cat).gather(1, indices)
            if pad is not None:
                phi = phi.masked_fill(pad, -math.inf)
        # each kept value's choices, from the last variable back along the parents
        at = torch.arange(phi.shape[1], device=lp.device).expand(p, -1)  # (P, m): rows of the last beam
        picks = []
        for parent, value in reversed(steps):
            picks.append(value.gather(1, at))
            at = parent.gather(1, at)
        choices = torch.stack(picks[::-1], -1).permute(1, 0, 2) if picks else \
            torch.empty(1, p, 0, dtype=torch.long, device=lp.device)  # (m, P, n)
        g = g.t()  # (m, P)
    m = choices.shape[0]
    # joint log-probability of each drawn value, with gradient: Σ_j log p_j(choice_j); -inf on padding
    # (an entry with fewer than m possible joint values repeats a possible one there: weight 0)
    logp = lp.unsqueeze(0).expand(m, n_cat, p, n).gather(1, choices.unsqueeze(1)).squeeze(1).sum(-1)
    logp = logp.masked_fill(torch.isneginf(phi.t()), -math.inf)  # phi: (P, m)
    values = support.reshape((n_cat,) + event)[choices]  # (m, P, n, *event)
    return values.reshape((m,) + parents + own + event), logp.reshape((m,) + parents), g.reshape((m,) + parents)


def beam_step(lp: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, k: int):
    """One step of stochastic beam search over a partition (Kool et al., 2019, Algorithm 1).

    Every prefix of the beam is extended by each of the M values of the step; each child's
    perturbed log-probability is a Gumbel at its log-probability, conditioned (top-down) on the
    maximum over its siblings being the parent's perturbed value; the k largest survive. The
    result is an ordered sample without replacement of k prefixes (their Theorem 1).

    Args:
        lp: log p(value | prefix) of each value and prefix, shape ``(M, beam, *P)`` (``-inf`` for an
            impossible value); P: other plates (one beam per entry).
        phi: log-probabilities of the prefixes, ``(beam, *P)``.
        g: perturbed log-probabilities of the prefixes, ``(beam, *P)``.
        k: the beam size.

    Returns:
        ``(parent, value, g, phi, log_left, pad)``: the first four of shape ``(m, *P)`` with
        m = min(k, the most possible children of any entry): the parent index and value index of
        each surviving prefix, its perturbed and plain log-probability; ``log_left`` ``(*P)``: log
        of the probability of the children that were not kept; ``pad`` ``(m, *P)``: True where an
        entry has fewer than m possible children (those slots repeat its most probable child, with
        phi = g = -inf: weight 0, never a prefix the model cannot produce); ``None`` if none has.
    """
    with torch.no_grad():
        n_val, beam = lp.shape[:2]
        rest = lp.shape[2:]
        cand = (phi.unsqueeze(0) + lp).movedim(0, -1)  # (beam, *P, M)
        finite = torch.isfinite(cand)
        safe = torch.where(finite, cand, torch.full_like(cand, -1e30))
        cand_g = _truncated(safe + _gumbel_like(safe), g)
        cand_g = torch.where(finite, cand_g, torch.full_like(cand_g, -math.inf))
        flat_g = cand_g.movedim(0, -2).reshape(rest + (beam * n_val,))  # (*P, beam·M)
        flat_phi = cand.movedim(0, -2).reshape(rest + (beam * n_val,))
        indices, g_top, pad = top_possible(flat_g, k)
        parent, value = indices // n_val, indices % n_val
        kept = torch.zeros_like(flat_g, dtype=torch.bool).scatter(-1, indices, True)
        left = torch.logsumexp(flat_phi.masked_fill(kept, -math.inf), -1)
        # a padding entry (fewer than k possible prefixes) repeats a possible one with log p = -inf
        new_phi = flat_phi.gather(-1, indices)
        if pad is not None:
            new_phi = new_phi.masked_fill(pad, -math.inf)
        return (parent.movedim(-1, 0), value.movedim(-1, 0), g_top.movedim(-1, 0),
                new_phi.movedim(-1, 0), left, None if pad is None else pad.movedim(-1, 0))
