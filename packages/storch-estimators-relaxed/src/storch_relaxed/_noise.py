"""Noise of the relaxations: uniform, logistic and Gumbel noise, and noise conditioned on a discrete sample;
the discrete sample together with its relaxation (temperature checks included)."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch.distributions import Bernoulli, Distribution, OneHotCategorical

from storch.extending import options

from ._params import exact_logits

__all__ = ["Temperature", "uniform", "logistic_noise", "gumbel_noise", "conditional_logistic", "conditional_gumbel", "discrete_with_relaxation", "check_temperature"]


Temperature = Union[float, Callable[[int], float]]


def uniform(shape, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise clamped away from 0 and 1 (so logits of it are finite)."""
    eps = torch.finfo(like.dtype).eps
    return torch.rand(shape, dtype=like.dtype, device=like.device).clamp_(eps, 1 - eps)


def logistic_noise(shape, like: torch.Tensor) -> torch.Tensor:
    u = uniform(shape, like)
    return torch.log(u) - torch.log1p(-u)


def gumbel_noise(shape, like: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(shape, like)))


def conditional_logistic(alpha: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z̃ ~ Logistic(α, 1) conditioned on 1[z̃ > 0] = b, reparameterised in α (Tucker et al. 2017, App. A).

    With p = σ(α): u' = 1 - p + v p if b = 1 else v (1 - p), v ~ U(0, 1); z̃ = α + logit(u').
    """
    p = torch.sigmoid(alpha)
    v = uniform(b.shape, alpha)
    u = torch.where(b > 0.5, 1 - p + v * p, v * (1 - p))
    eps = torch.finfo(alpha.dtype).eps
    u = u.clamp(eps, 1 - eps)
    return alpha + torch.log(u) - torch.log1p(-u)


def conditional_gumbel(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """z̃ = log p + g conditioned on argmax z̃ = ``index`` (Tucker et al. 2017, App. A; Gumbel-max).

    z̃_b = -log(-log v_b), z̃_k = -log(-log v_k / p_k - log v_b) for k != b, v ~ U(0, 1)^K,
    with normalised p (so that max_k (log p_k + g_k) ~ Gumbel(0)).

    z̃_k is computed as log p_k - log(-log v_k - p_k log v_b), the same value: exp(-log p_k) overflows
    for a masked logit (-3 log eps = 20.8 in float16: 1e9 > 65504, so z̃_k = -inf and its derivative NaN),
    p_k <= 1 never does.
    """
    v = uniform(index.shape + logp.shape[-1:], logp)
    logp = logp.expand(v.shape)
    log_vb = torch.log(v.gather(-1, index.unsqueeze(-1)))  # log v_b, shape (..., 1)
    other = logp - torch.log(-torch.log(v) - log_vb * torch.exp(logp))
    top = -torch.log(-log_vb).expand_as(other)
    onehot = torch.nn.functional.one_hot(index, logp.shape[-1]).bool()
    return torch.where(onehot, top, other)


def discrete_with_relaxation(d: Distribution, n: int):
    """n samples of ``d`` (Bernoulli, Categorical, OneHotCategorical) through their continuous z.

    Returns ``(z, b, onehot, z_tilde)``: z (reparameterised: Logistic(α, 1) for Bernoulli, log p +
    Gumbel for categoricals), the discrete sample b = H(z) as ``d`` samples it (float 0/1, index, or
    one-hot), b as a float (one-hot for categoricals), and z̃ ~ p(z | b), reparameterised.
    """
    # far below the rest where d's probabilities are exactly 0 (never drawn), and finite (masked logits):
    # the conditional noise z̃ divides by p
    logits = exact_logits(d, finite=True)
    shape = (n,) + tuple(logits.shape)
    if isinstance(d, Bernoulli):
        z = logits + logistic_noise(shape, logits)
        b = (z > 0).to(logits.dtype)  # H(z): an exact Bernoulli(σ(α)) sample, no gradient
        return z, b, b, conditional_logistic(logits, b)
    z = logits + gumbel_noise(shape, logits)
    index = z.argmax(-1)  # Gumbel-max: an exact categorical sample, no gradient
    onehot = torch.nn.functional.one_hot(index, z.shape[-1]).to(logits.dtype)
    b = onehot if isinstance(d, OneHotCategorical) else index
    return z, b, onehot, conditional_gumbel(logits, index)


def check_temperature(name: str, temperature) -> None:
    if callable(temperature):
        return
    options.number(name, "temperature", temperature, above=0, finite=True,
                   what="a finite float > 0 or a schedule step -> float")
