"""A discrete VAE with a convolutional encoder and a transposed-convolution decoder (8x8 images).

The model code is written for ONE image ``(1, 8, 8)`` and one latent vector; storch runs it on
every data point and sample (the ``conv2d`` / ``conv_transpose2d`` calls get all plate dims
flattened into their batch dim). :func:`hand_surrogate` is the same model written by hand in
batched torch (samples laid out ``(n, batch, latent)``), the floor of ``storch-compare overhead``
(problem ``cnn``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli

import storch

from .handwritten import score_surrogate

__all__ = ["ConvVAE", "storch_surrogate", "batched_reconstruction", "hand_surrogate"]


class ConvVAE(nn.Module):
    """Bernoulli latents; encoder 2 strided convolutions, decoder 2 transposed convolutions.

    Every layer accepts one image ``(1, 8, 8)`` (unbatched) as well as a batch ``(B, 1, 8, 8)``.

    Args:
        n_latent: number of Bernoulli latents.
        channels: channels of the two hidden feature maps (4x4 and 2x2).
    """

    def __init__(self, n_latent: int = 16, channels: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = channels
        self.n_latent = n_latent
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU(),  # 8x8 -> 4x4
            nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU(),  # 4x4 -> 2x2
            nn.Flatten(-3), nn.Linear(c2 * 4, n_latent))
        self.decoder = nn.Sequential(
            nn.Linear(n_latent, c2 * 4), nn.ReLU(), nn.Unflatten(-1, (c2, 2, 2)),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.ReLU(),  # 2x2 -> 4x4
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1))  # 4x4 -> 8x8 logits

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(q(z | x) || Bernoulli(1/2)^n_latent), summed over the latents (closed form)."""
        kl = torch.sigmoid(logits) * F.logsigmoid(logits) + torch.sigmoid(-logits) * F.logsigmoid(-logits)
        return (kl + math.log(2.0)).sum(-1)

    def reconstruction(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z) of one image ``x`` ``(1, 8, 8)``, summed over the pixels."""
        return F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum()


def storch_surrogate(model: ConvVAE, est, images: torch.Tensor) -> storch.PlateTensor:
    """One step's graph in the current ``storch.Graph``; ``images`` ``(B, 1, 8, 8)``; returns z."""
    x = storch.denote_independent(images, 0, "data")
    logits = model.encoder(x)  # one image (1, 8, 8) -> (n_latent,)
    z = est(Bernoulli(logits=logits))
    storch.add_cost(model.kl(logits), name="kl")
    storch.add_cost(model.reconstruction(z, x), name="reconstruction")
    return z


def batched_reconstruction(model: ConvVAE, z: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) by hand: z ``(n, B, n_latent)``, images ``(B, 1, 8, 8)`` -> ``(n, B)``."""
    n, b = z.shape[:2]
    logits = model.decoder(z.reshape(n * b, -1)).view(n, b, *images.shape[1:])  # one conv call for all samples
    return F.binary_cross_entropy_with_logits(logits, images.expand_as(logits), reduction="none").flatten(-3).sum(-1)


def hand_surrogate(model: ConvVAE, images: torch.Tensor, n: int, leave_one_out: bool = True,
                   z: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The same step by hand: score function (with the leave-one-out baseline), batched torch.

    Args:
        images: ``(B, 1, 8, 8)``.
        n: samples per image.
        z: ``(n, B, n_latent)`` samples to use; drawn as storch draws them when ``None``.
    """
    logits = model.encoder(images)  # (B, n_latent)
    q = Bernoulli(logits=logits)
    if z is None:
        z = q.sample((n,))
    rec = batched_reconstruction(model, z, images)
    return model.kl(logits).mean() + score_surrogate(q.log_prob(z).sum(-1), rec, leave_one_out)
