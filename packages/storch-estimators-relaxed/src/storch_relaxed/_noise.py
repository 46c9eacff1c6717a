"""Noise of the relaxations: uniform, logistic and Gumbel noise, and noise conditioned on a discrete sample;
the discrete sample together with its relaxation (temperature checks included).

All of it in float32 at least (``_precision``): a float16 / bfloat16 ``like`` gets float32 noise."""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch.distributions import Bernoulli, Distribution, OneHotCategorical

from storch.extending import options

from ._params import exact_logits
from ._precision import noise_dtype, to_model, to_work

__all__ = ["Temperature", "uniform", "logistic_noise", "gumbel_noise", "conditional_logistic", "conditional_gumbel", "discrete_with_relaxation", "check_temperature"]


Temperature = Union[float, Callable[[int], float]]


def uniform(shape, like: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise clamped away from 0 and 1 (so logits of it are finite), in ``like``'s dtype, float32
    for a float16 / bfloat16 ``like`` (``_precision.noise_dtype``: bfloat16's eps = 2^-7 bounded a logistic
    noise by ±4.84, and its uniforms come in steps of 2^-8)."""
    dtype = noise_dtype(like.dtype)
    eps = torch.finfo(dtype).eps
    return torch.rand(shape, dtype=dtype, device=like.device).clamp_(eps, 1 - eps)


def logistic_noise(shape, like: torch.Tensor) -> torch.Tensor:
    u = uniform(shape, like)
    return torch.log(u) - torch.log1p(-u)


def gumbel_noise(shape, like: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(shape, like)))


def conditional_logistic(alpha: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z̃ ~ Logistic(α, 1) conditioned on 1[z̃ > 0] = b, reparameterised in α (Tucker et al. 2017, App. A).

    With p = σ(α): u' = 1 - p + v p if b = 1 else v (1 - p), v ~ U(0, 1); z̃ = α + logit(u').
    In float32 for a float16 / bfloat16 α (1 - p of a bfloat16 p = σ(5) is 0.0078 or 0.0039, not 0.0067).
    """
    alpha = to_work(alpha)
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
    p_k <= 1 never does. In float32 for a float16 / bfloat16 ``logp``.
    """
    logp = to_work(logp)
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

    z and z̃ are in float32 for a float16 / bfloat16 ``d`` (``_precision``; the caller casts what it
    hands to the model), b and the one-hot b in ``d``'s dtype.
    """
    # far below the rest where d's probabilities are exactly 0 (never drawn), and finite (masked logits):
    # the conditional noise z̃ divides by p
    logits = exact_logits(d, finite=True)
    dtype = logits.dtype
    logits = to_work(logits)
    shape = (n,) + tuple(logits.shape)
    if isinstance(d, Bernoulli):
        z = logits + logistic_noise(shape, logits)
        b = (z > 0).to(logits.dtype)  # H(z): an exact Bernoulli(σ(α)) sample, no gradient
        z_tilde = conditional_logistic(logits, b)
        b = to_model(b, dtype)
        return z, b, b, z_tilde
    z = logits + gumbel_noise(shape, logits)
    index = z.argmax(-1)  # Gumbel-max: an exact categorical sample, no gradient
    onehot = torch.nn.functional.one_hot(index, z.shape[-1]).to(dtype)
    b = onehot if isinstance(d, OneHotCategorical) else index
    return z, b, onehot, conditional_gumbel(logits, index)


def check_temperature(name: str, temperature) -> None:
    if callable(temperature):
        return
    options.number(name, "temperature", temperature, above=0, finite=True,
                   what="a finite float > 0 or a schedule step -> float")
