"""The Gumbel-Rao estimator: straight-through Gumbel-softmax, Rao-Blackwellised over the noise."""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from storch import Node
from storch.extending import base_distribution, options

__all__ = ["GumbelRao", "conditional_gumbels"]


def conditional_gumbels(logp: torch.Tensor, hard: torch.Tensor, m: int) -> torch.Tensor:
    """m draws of Gumbel noise G ~ Gumbel(0, 1)^K conditioned on argmax(logp + G) = hard.

    With E ~ Exp(1)^K and i the index of ``hard``, the perturbed log-probabilities U = logp + G
    given the argmax are U_i = -log E_i and U_k = -log(E_k / p_k + E_i) for k != i: the maximum
    of K Gumbels with locations log p_k is Gumbel(log Σ p) = Gumbel(0), and each other one is a
    Gumbel(log p_k) truncated below U_i (Paulus et al. 2021, appendix; Maddison et al. 2014).

    Args:
        logp: normalised log-probabilities, shape ``(..., K)``.
        hard: the one-hot value of the argmax, shape ``(..., K)`` (broadcast with ``logp``).
        m: the number of draws.

    A category of probability exactly 0 (``logp = -inf``: a masked logit, a pinned Bernoulli bit) has U_k = -inf
    whatever its noise, so any finite G_k gives log p_k + G_k = U_k: it gets G_k = 0 (U_k - log p_k would be NaN).

    Returns:
        G, shape ``(m, ..., K)``, without gradient.
    """
    with torch.no_grad():
        logp, hard = torch.broadcast_tensors(logp, hard.to(logp.dtype))
        log_e = torch.empty((m,) + logp.shape, dtype=logp.dtype, device=logp.device).exponential_().log()
        log_ei = (log_e * hard).sum(-1, keepdim=True)
        # log(E_k / p_k + E_i), computed in log space so that tiny p_k cannot overflow
        others = -torch.logaddexp(log_e - logp, log_ei)
        u = torch.where(hard.bool(), -log_ei, others)
        return torch.where(torch.isneginf(logp), torch.zeros((), dtype=u.dtype, device=u.device), u - logp)


class GumbelRao(storch.Estimator):
    """Gumbel-Rao: the straight-through Gumbel-softmax gradient, averaged over the noise given the sample.

    Components:
        q(X | x<i) = n i.i.d. exact samples x ~ p (0/1 for Bernoulli, one-hot for OneHotCategorical);
        w(x) = 1/n;
        l(x) = 0;
        a = 0;
        output: x + (ȳ - ⊥ȳ), with ȳ = (1/M) Σ_m softmax((log p + ⊥G_m) / τ) and
        G_m ~ Gumbel | argmax(log p + G) = x (:func:`conditional_gumbels`).

    The forward value is exactly the discrete sample. The gradient through ȳ is
    E[∇_θ softmax((log p + G)/τ) | x], the conditional expectation of the straight-through
    Gumbel-softmax gradient given the sample it produced; by the Rao-Blackwell theorem it has
    the same expectation as straight-through Gumbel-softmax and no more variance, and it
    approaches that conditional expectation as M grows.

    Requires: Bernoulli or OneHotCategorical, and a cost differentiable in the sample.

    max_order: 1, and ``biased``: like straight-through Gumbel-softmax it estimates the gradient of
    a relaxed objective, not ∇E[f(x)]; it is defined for first derivatives only (Paulus et al.
    do not define higher ones), so asking for order 2 raises ``storch.OrderError``. The forward
    value (order 0) is an unbiased estimate of E[f(x)].

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        temperature: τ > 0 of the relaxation.
        n_gumbels: M >= 1, conditional noise draws per sample.

    Example:
        >>> est = storch.estimator("gumbel_rao", plate="z", temperature=0.5, n_gumbels=10)
        >>> z = est(OneHotCategorical(logits=encoder(x)))

    References:
        [1] Rao-Blackwellizing the Straight-Through Gumbel-Softmax Gradient Estimator (Paulus et al., 2021)
        [2] A* Sampling (Maddison et al., 2014)
    """

    name = "gumbel_rao"
    max_order = 1
    biased = True
    distributions = (Bernoulli, OneHotCategorical)

    def __init__(self, plate: str, n_samples: int = 1, temperature: float = 1.0, n_gumbels: int = 10) -> None:
        super().__init__(plate, n_samples)
        options.number("gumbel_rao", "temperature", temperature, above=0, finite=True, what="a number > 0")
        options.integer("gumbel_rao", "n_gumbels", n_gumbels, minimum=1)
        self.temperature = float(temperature)
        self.n_gumbels = n_gumbels

    def proposal(self, node: Node) -> torch.Tensor:
        return node.distribution.sample((self.n_samples,))  # exact samples, no gradient

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=node.sample.dtype, device=node.sample.device)

    def output(self, node: Node) -> torch.Tensor:
        # the parameters are on the wrapped distribution of an Independent (supports() matches
        # `distributions` against it); its reinterpreted dims are elementwise here like batch dims
        d, x = base_distribution(node.distribution), node.sample
        if isinstance(d, Bernoulli):  # a Bernoulli is a 2-category distribution, log p = (log σ(-ℓ), log σ(ℓ))
            # (not log_softmax of (0, ℓ): at ℓ = +inf that is inf - inf = NaN; an infinite logit is a pinned bit,
            # log p = (0, -inf) or (-inf, 0), whose relaxation is its sample with no gradient, as gumbel_softmax's)
            logp = torch.stack([F.logsigmoid(-d.logits), F.logsigmoid(d.logits)], -1)
            hard = torch.stack([1 - x, x], -1)
        else:
            logp, hard = torch.log_softmax(d.logits, -1), x
        g = conditional_gumbels(logp.detach(), hard, self.n_gumbels)
        # ⊥G: the gradient is the straight-through one for fixed noise, averaged over the M draws
        relaxed = torch.softmax((logp + g) / self.temperature, -1).mean(0)
        if isinstance(d, Bernoulli):
            relaxed = relaxed[..., 1]
        # ⊥: the forward value is exactly the discrete sample, the gradient is the relaxed one's
        return x + (relaxed - relaxed.detach())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature}, n_gumbels={self.n_gumbels}"
