"""The node's distribution as the relaxed estimators read it: its parameter tensors, and the logits
that the noise is added to."""

from __future__ import annotations

import math

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, OneHotCategorical

from storch import Node
from storch.extending import base_distribution, given_by_probs

from ._precision import REDUCED, noise_dtype

__all__ = ["param_tensors", "exact_logits", "sample_log_prob"]


def param_tensors(d: Distribution) -> list[torch.Tensor]:
    """The tensors ``d`` was built from (its arg_constraints present as attributes) that need grad."""
    d = base_distribution(d)
    if isinstance(d, OneHotCategorical):
        d = d._categorical
    out = []
    for name in d.arg_constraints:
        v = d.__dict__.get(name)
        if isinstance(v, torch.Tensor) and v.requires_grad:
            out.append(v)
    return out


def exact_logits(d: Distribution, finite: bool = False) -> torch.Tensor:
    """``d.logits`` of a Bernoulli, Categorical or OneHotCategorical, where ``d`` is given by probabilities
    that are exactly 0 (or, for a Bernoulli, exactly 1) moved so far that the noise never draws them.

    torch computes the logits of a distribution given by ``probs`` from probabilities clamped to
    [eps, 1 - eps]: log(eps) = -15.9 in float32, -4.8 in bfloat16. The noise added to them (Gumbel-max,
    logistic) then draws a value of probability 0 about eps of the time (1.2e-7 per entry in float32),
    a value that ``d.sample()`` never draws: an action a mask forbids.

    The noise is bounded: ``_noise.uniform`` clamps U to [eps, 1 - eps] (eps of the noise's dtype below:
    float32's for a float16 / bfloat16 ``d``, ``_precision.noise_dtype``), so a logistic L lies in
    [log eps, -log eps] and a Gumbel G in [-log(-log eps), -log eps]; every other logit is at least
    log eps (the clamp, with d's eps >= that one). A probability 0 gets the logit 3 log eps (-47.7 in
    float32 and in bfloat16): then 3 log eps + max G < log eps + min G, because eps (-log eps) < 1, so Gumbel-max never picks it, and
    3 log eps + max L = 2 log eps < 0, so 1[α + L > 0] is never 1 (a Bernoulli's probability 1 gets
    -3 log eps, never 0). Finite, not -inf: the relaxations, the conditional noise, a learned
    temperature's derivative and RELAX's network stay finite (an infinite logit gives 0 * inf = NaN in
    the derivative with respect to λ of σ(z / λ)). ``torch.where`` selects a constant there, so such a
    probability gets no derivative: the derivative with respect to a probability that is exactly 0 is
    not estimated, as with the enumerating estimators (``storch.extending.strict_support``); torch's
    clamp gave it none either. Always a ``torch.where`` for ``probs`` (no host read of the values: the
    same program whatever they are); ``d.logits`` itself for ``logits``.

    ``finite``: also for ``logits``, clamp them to [-3 log eps, ...] (a Bernoulli's to
    [3 log eps, -3 log eps]): a masked logit (``masked_fill(mask, -inf)``, or -1e9) made the noise
    conditioned on the sample (REBAR, RELAX: exp(-log p) overflows) NaN in the backward pass. A value
    with a logit that low is never drawn by the bounded noise anyway (its logit plus the largest Gumbel
    stays below the smallest possible maximum, as above); the clamp gives it no derivative.
    """
    if isinstance(d, OneHotCategorical):
        d = d._categorical
    logits = d.logits
    far = -3.0 * math.log(torch.finfo(noise_dtype(logits.dtype)).eps)  # 47.7 in float32 (and bfloat16)
    if not given_by_probs(d):
        if not finite:
            return logits
        return logits.clamp(-far, far) if isinstance(d, Bernoulli) else logits.clamp(min=-far)
    probs = d.probs
    out = torch.where(probs == 0, torch.full((), -far, dtype=logits.dtype, device=logits.device), logits)
    if isinstance(d, Bernoulli):
        out = torch.where(probs == 1, torch.full((), far, dtype=logits.dtype, device=logits.device), out)
    return out


def sample_log_prob(node: Node, value: torch.Tensor) -> torch.Tensor:
    """``node.log_prob(value)`` of a Bernoulli, Categorical or OneHotCategorical node (``Independent`` too),
    computed in float32 where its parameter is float16 / bfloat16, and returned in float32.

    Its derivative is b - σ(α) (softmax for categoricals): in bfloat16 σ(5) = 0.99331 rounds to 0.99219, so
    1 - σ(α) is 0.0078 instead of 0.0067, and E[∇l] = σ - σ̂ is not 0. REBAR's and RELAX's score term
    (f(b) - c(z̃)) ∇l then carries a bias (σ - σ̂) E[f(b) - c(z̃)] (8 % of the gradient at logit 5). The
    float32 copy is built from the same tensor (``probs`` or ``logits``, as ``d`` was given), so the
    derivative reaches it; float32 and float64 call ``node.log_prob`` as it is.

    Returned in float32, not cast back: l meets the costs twice, in the surrogate's MagicBox(l) · f(b) and in the
    control variate's -MagicBox(l) c(z̃); cast back to bfloat16, each term's gradient (~ f ∇l and -c ∇l, f and c
    near 300 under a cost of 300 + 0.1 · signal) was rounded to bfloat16 before they were added, and the small
    difference f(b) - c(z̃) was lost (RELAX and REBAR z ~ -31, found by a tester). In float32 they are added in
    float32, and only their sum is cast back by the backward of ``param.float()``.
    """
    d = node.distribution
    base = base_distribution(d)
    inner = base._categorical if isinstance(base, OneHotCategorical) else base
    param: torch.Tensor = inner.__dict__["_param"]  # probs or logits, as given
    if param.dtype not in REDUCED:
        return node.log_prob(value)
    by_probs = given_by_probs(inner)
    probs, logits = (param.float(), None) if by_probs else (None, param.float())
    work: Distribution
    if isinstance(base, Bernoulli):
        work = Bernoulli(probs=probs, logits=logits, validate_args=False)
    elif isinstance(base, OneHotCategorical):
        work = OneHotCategorical(probs=probs, logits=logits, validate_args=False)
    else:
        work = Categorical(probs=probs, logits=logits, validate_args=False)
    if isinstance(d, Independent):
        work = Independent(work, d.reinterpreted_batch_ndims, validate_args=False)
    return node.log_prob(value.float() if value.is_floating_point() else value, work)
