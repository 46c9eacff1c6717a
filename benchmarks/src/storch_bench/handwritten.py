"""The estimators written by hand in plain torch: the floor that storch's overhead is measured against.

Each function returns the surrogate loss a user would write without storch, for samples laid
out as ``(n, batch, ...)``: the score function (optionally with the leave-one-out baseline), the
unordered set estimator with its built-in baseline (Kool et al., 2020), and the Gumbel-softmax
(concrete) relaxation. Sampling uses the same calls as storch's estimators where the result
is the same (``distribution.sample((n,))``), so that equal seeds give equal samples.

References:
    [1] Estimating Gradients for Discrete Random Variables by Sampling without Replacement
        (Kool et al., 2020)
    [2] Stochastic Beams and Where to Find Them (Kool et al., 2019)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["score_surrogate", "gumbel_topk_bernoulli", "unordered_set_weights", "unordered_set_surrogate"]


def score_surrogate(logp: torch.Tensor, cost: torch.Tensor, leave_one_out: bool = False) -> torch.Tensor:
    """Σ over samples of (cost + log p · ⊥advantage) / n, mean over the batch; ``(n, batch)`` inputs."""
    n = cost.shape[0]
    adv = cost.detach()
    if leave_one_out:
        adv = adv - (adv.sum(0, keepdim=True) - adv) / (n - 1)
    return (cost + logp * adv).mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp_max(-1e-30)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def gumbel_topk_bernoulli(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k distinct joint samples of independent Bernoullis by stochastic beam search [2].

    Args:
        logits: ``(batch, D)``.
        k: samples without replacement (at most 2^D are returned).

    Returns:
        ``(z, logp)``: z ``(k', batch, D)`` in {0, 1}, logp ``(k', batch)`` the joint log-probabilities
        (with gradient), in descending order of the perturbed log-probability.
    """
    b, d = logits.shape
    lp = torch.stack([F.logsigmoid(-logits), F.logsigmoid(logits)], -1)  # (batch, D, 2): values 0, 1
    phi = logits.new_zeros(b, 1)  # log-probability of each prefix
    g = logits.new_zeros(b, 1)  # its perturbed log-probability (root: 0)
    seqs = logits.new_zeros(b, 1, 0)
    for i in range(d):
        phi_c = (phi.unsqueeze(-1) + lp[:, None, i, :]).flatten(1)  # (batch, beams * 2)
        with torch.no_grad():
            gc = phi_c + -torch.log(-torch.log(torch.rand_like(phi_c).clamp_min(1e-20)))
            z = gc.unflatten(1, (-1, 2)).max(-1, keepdim=True).values.flatten(1).repeat_interleave(2, 1)
            # condition the children's Gumbels on their parent's maximum ([2], appendix B)
            t = g.repeat_interleave(2, 1)
            v = t - gc + _log1mexp(gc - z)
            gc = t - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))
            top = gc.topk(min(k, gc.shape[1]), 1).indices  # (batch, beams')
        g = gc.gather(1, top)
        phi = phi_c.gather(1, top)
        parent, value = top // 2, (top % 2).to(logits.dtype)
        seqs = torch.cat([seqs.gather(1, parent.unsqueeze(-1).expand(-1, -1, i)), value.unsqueeze(-1)], -1)
    return seqs.transpose(0, 1), phi.transpose(0, 1)


def unordered_set_weights(logp: torch.Tensor, points: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out and leave-two-out ratios of the unordered set estimator [1], detached.

    With a_s = p(s) / p(D \\ S), p^D(S) = ∫_0^1 Π_{s∈S} (1 - u^{a_s}) du (numerical integration over
    ``points`` midpoints, in log space); leaving samples out drops their factors.

    Args:
        logp: ``(k, batch)`` joint log-probabilities of the k distinct samples.

    Returns:
        ``(w, bw)``: w ``(k, batch)`` = p(s) R(S, s); bw ``(k, k, batch)`` the built-in baseline's
        weights p(s') R^{D\\{s}}(S, s') = p(s') p^{D\\{s,s'}}(S \\ {s,s'}) / p^{D\\{s}}(S \\ {s}) for
        s' != s, and p(s) for s' = s ([1], Theorem 4).
    """
    logp = logp.detach()
    k = logp.shape[0]
    log_rest = _log1mexp(torch.logsumexp(logp, 0).clamp_max(0.0))  # log p(D \ S)
    u = (torch.arange(points, dtype=logp.dtype, device=logp.device) + 0.5) / points
    # log(1 - u^{a_s}) for each sample and point: (k, batch, P)
    terms = _log1mexp((logp - log_rest).exp().unsqueeze(-1) * u.log())
    total = terms.sum(0)  # (batch, P)
    log_p_all = torch.logsumexp(total, -1) - math.log(points)
    loo = torch.logsumexp(total - terms, -1) - math.log(points)  # (k, batch)
    w = (logp + loo - log_p_all).exp()  # p(s) R(S, s)
    l2o = torch.logsumexp(total - terms.unsqueeze(1) - terms.unsqueeze(0), -1) - math.log(points)
    bw = (logp.unsqueeze(0) + l2o - loo.unsqueeze(1)).exp()
    eye = torch.eye(k, dtype=torch.bool, device=logp.device).unsqueeze(-1)
    bw = torch.where(eye, logp.exp().unsqueeze(0), bw)  # R^{D\{s}}(S, s) = 1 on the diagonal
    return w, bw


def unordered_set_surrogate(logp: torch.Tensor, cost: torch.Tensor, points: int = 100) -> torch.Tensor:
    """Σ_s ⊥(p(s) R(S, s)) [cost(s) + log p(s) ⊥(cost(s) - b(s))], mean over the batch; ``(k, batch)``."""
    w, bw = unordered_set_weights(logp, points)
    if logp.shape[0] == 1:  # the built-in baseline needs a second sample: plain score function
        return (w * (cost + logp * cost.detach())).sum(0).mean()
    baseline = (bw * cost.detach().unsqueeze(0)).sum(1)  # (k, batch): b(s) = Σ_{s'} bw[s, s'] cost(s')
    return (w * (cost + logp * (cost.detach() - baseline))).sum(0).mean()
