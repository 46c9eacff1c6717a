"""A node's log-probability and draw on its raw distribution: torch's kernels, without the Python
checks a raw copy does not need (a Bernoulli), a Poisson's log p with finite derivatives at a zero rate, and
a Binomial's with the right second derivative at a logit of 0 (alone, or as a mixture's components).
"""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Distribution, Independent, MixtureSameFamily, Poisson

from .support import _BINOMIAL_LIKE, _binomial_log_prob, _poisson_log_prob, binomial_components, binomial_like

__all__ = ["raw_log_prob", "raw_sample"]

_bce_with_logits = torch.binary_cross_entropy_with_logits


def raw_log_prob(d: Distribution, value: torch.Tensor) -> torch.Tensor:
    """``d.log_prob(value)`` for a raw distribution and raw ``value``.

    A ``Bernoulli`` given by its logits, without argument validation (the raw copy of a user's
    distribution), is computed as torch computes it, ``-binary_cross_entropy_with_logits``, with
    the logits expanded to the value's shape directly instead of through ``broadcast_all`` (its
    Python checks and a second view for the value): the same kernel (called directly, not through
    ``F.binary_cross_entropy_with_logits``), values and derivatives. A ``Poisson`` (or an ``Independent`` of
    one) is computed by :func:`_poisson_log_prob`: torch's values, and finite derivatives where a rate
    is exactly 0 (torch's are NaN there). A ``Binomial`` (a subclass changing only ``__init__``, or an ``Independent`` of
    either) by :func:`_binomial_log_prob`: torch's values, and
    the right second derivative where a logit is exactly 0 (torch's is 0 there); a ``MixtureSameFamily`` of
    such Binomials (:func:`binomial_components`) by torch's mixture formula over theirs (:func:`_mixture_log_prob`);
    an ``Independent`` of any of these, nested too, sums theirs (:func:`_own_log_prob`). Any other case (and any
    other distribution) calls ``d.log_prob``.
    """
    t = type(d)
    like = _BINOMIAL_LIKE.get(t)  # (a Binomial, or a subclass changing only __init__; one lookup once cached)
    if like is None:
        like = binomial_like(t)
    if like:
        if d._validate_args:
            d._validate_sample(value)
        return _binomial_log_prob(d.total_count, d.logits, value)
    if t is Poisson:
        if d._validate_args:
            d._validate_sample(value)
        return _poisson_log_prob(d.rate, value)
    if t is Independent and _own_log_prob(d.base_dist):
        lp, n = raw_log_prob(d.base_dist, value), d.reinterpreted_batch_ndims
        return lp.sum(tuple(range(-n, 0))) if n else lp
    if t is Bernoulli and not d._validate_args and type(value) is torch.Tensor:
        logits = d.__dict__.get("logits")
        if type(logits) is torch.Tensor:
            shape = value.shape
            if logits.shape != shape:
                k = logits.dim()
                if k > len(shape) or shape[len(shape) - k:] != logits.shape:
                    return d.log_prob(value)  # a broadcast of the value too: torch's own
                logits = logits.expand(shape)
            # torch's kernel as F.binary_cross_entropy_with_logits calls it (reduction "none" = 0), without that
            # Python wrapper's checks (plain tensors of equal shapes here: its size check passes)
            return -_bce_with_logits(logits, value, None, None, 0)
    if t is MixtureSameFamily and binomial_components(d.component_distribution):  # (an identity test on the common path)
        return _mixture_log_prob(d, value)
    return d.log_prob(value)


def _own_log_prob(b: Distribution) -> bool:
    """Whether :func:`raw_log_prob` computes ``b``'s log p itself (a Poisson, a Binomial, a mixture of Binomials, an
    Independent of any of these, nested): then an Independent of ``b`` sums that, as :func:`strict_support` copies
    each of them under any number of Independents. The score walk caches one kink verdict per structure for both
    (an importance step on ``Independent(MixtureSameFamily(Binomial))`` found strict_support's log p smooth, and a
    later score step differentiated torch's twice: a Hessian of 6.4 for -1.3 at a logit of exactly 0)."""
    t = type(b)
    if t is Independent:
        return _own_log_prob(b.base_dist)
    return (t is Poisson or binomial_like(t)
            or (t is MixtureSameFamily and binomial_components(b.component_distribution)))


def _mixture_log_prob(d: MixtureSameFamily, value: torch.Tensor) -> torch.Tensor:
    """``MixtureSameFamily.log_prob`` (torch's formula, logsumexp of the components' log p plus the mixture's
    log-softmax) with the components' log p from :func:`raw_log_prob`: a mixture of Binomials through torch's
    own was refused at order 2 (its softplus's clamp and abs: a second derivative of 0 at a logit of exactly 0)."""
    if d._validate_args:
        d._validate_sample(value)
    comp = d.component_distribution
    x = value.unsqueeze(-1 - len(d.event_shape))  # (torch's _pad: the components' dim)
    if comp._validate_args:
        comp._validate_sample(x)
    return torch.logsumexp(raw_log_prob(comp, x) + torch.log_softmax(d.mixture_distribution.logits, dim=-1), dim=-1)


def raw_sample(d: Distribution, sample_shape: tuple = ()) -> torch.Tensor:
    """``d.sample(sample_shape)`` for a raw distribution (default: one draw, no sample shape).

    A ``Bernoulli`` without argument validation (the raw copy of a user's distribution) is drawn
    as torch draws it, ``torch.bernoulli`` of its probabilities (``sigmoid(logits)`` when given
    by its logits) expanded to ``sample_shape + batch_shape``, without gradient: the same random
    numbers and values, without the lazy property's grad mode (torch computes the probabilities with
    gradient and caches them on ``d``), a ``no_grad`` block (the parameters are detached) and
    ``_extended_shape``. The probabilities computed here are not cached on ``d`` (reading ``d.probs``
    computes them again). Any other case calls ``d.sample(sample_shape)``, laid out contiguously: torch's
    ``Categorical`` (and what draws through it) returns a transposed view ``(n, *batch)`` of its
    ``multinomial`` draw, and an advanced index by such a sample (``A[s]``) has strides that torch's meta
    function for ``aten.index`` does not predict (it follows the indexed tensor's only), so under
    ``storch.compile`` with an AOT backend that runs eager kernels (``aot_eager``) the view a later ``matmul``
    was compiled with failed ("view size is not compatible with input tensor's size and stride";
    tests/models/test_switching_state_space.py).
    """
    if type(d) is Bernoulli and not d._validate_args:
        state = d.__dict__
        p = state.get("probs")
        logits = state.get("logits") if p is None else None
        if type(p if p is not None else logits) is torch.Tensor:
            shape = d._batch_shape
            if sample_shape:
                shape = torch.Size(sample_shape) + shape
            # detached instead of under no_grad (the same values and random numbers; a grad-mode
            # context costs ~1 us, a policy's step draws once per step)
            p = torch.sigmoid(logits.detach()) if p is None else p.detach()  # logits_to_probs(is_binary=True)
            return torch.bernoulli(p if p.shape == shape else p.expand(shape))
    return (d.sample(sample_shape) if sample_shape else d.sample()).contiguous()  # (itself when contiguous)
