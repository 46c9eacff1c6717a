"""The precision the relaxed family draws its noise in: float32 at least.

A float16 / bfloat16 model (``model.bfloat16()``, or logits under ``torch.autocast``) would otherwise draw
U(0, 1) in its own dtype, clamped to [eps, 1 - eps] with eps = 2^-7 in bfloat16 and 2^-8 steps: a logistic
noise bounded by ±4.84 and coarsely quantised, a truncated Gumbel, and b = H(z) not a sample of p
(bfloat16 Bernoulli at logit 5: P(b = 1) = 1 instead of 0.9933; the RELAX gradient 60 times too small).
The noise, z = logits + noise, b = H(z) and z̃ | b are computed in float32; what the model reads (the
sample, the relaxation) is cast back to the model's dtype. float32 and float64 are computed as they are:
no cast, no copy, the same random stream.
"""

from __future__ import annotations

import torch

__all__ = ["REDUCED", "noise_dtype", "to_work", "to_model"]

REDUCED = (torch.float16, torch.bfloat16)


def noise_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the noise of a ``dtype`` model is drawn in: float32 for float16 / bfloat16, else ``dtype``."""
    return torch.float32 if dtype in REDUCED else dtype


def to_work(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is float16 / bfloat16 (differentiable cast), else ``x`` itself (no cast)."""
    return x.float() if x.dtype in REDUCED else x


def to_model(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to the model's ``dtype`` (differentiable) where :func:`to_work` raised it, else ``x`` itself."""
    return x if x.dtype == dtype else x.to(dtype)
