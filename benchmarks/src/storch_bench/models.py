"""The discrete VAE of the Storchastic paper's Table 1, sized for 8x8 digits.

Two latent spaces: 20 Bernoulli variables, or 20 categorical variables with 10 categories
(one-hot). Encoder and decoder are one-hidden-layer MLPs. The model code is written for ONE
data point; storch vectorises it over the data plate and the estimator's sample plate. The
same functions run on plain batched tensors (evaluation, the hand-written references).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli, OneHotCategorical

import storch

__all__ = ["VAE", "storch_step", "storch_surrogate", "negative_elbo"]


class VAE(nn.Module):
    """A VAE with discrete latents.

    Args:
        latent: ``"bernoulli"`` (``n_latent`` binary latents) or ``"categorical"`` (``n_latent``
            one-hot latents with ``n_categories`` categories).
        n_latent: number of latent variables.
        n_categories: categories per latent (categorical model only).
        hidden: width of the hidden layers.
        n_in: input pixels.
    """

    def __init__(self, latent: str = "bernoulli", n_latent: int = 20, n_categories: int = 10,
                 hidden: int = 128, n_in: int = 64) -> None:
        super().__init__()
        if latent not in ("bernoulli", "categorical"):
            raise ValueError(f"latent must be 'bernoulli' or 'categorical', got {latent!r}")
        self.latent = latent
        self.n_latent = n_latent
        self.k = 1 if latent == "bernoulli" else n_categories
        width = n_latent * self.k
        self.encoder = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, width))
        self.decoder = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, n_in))

    def posterior(self, x: torch.Tensor):
        """q(z | x) for one data point (or a batch of them): ``(distribution, logits)``."""
        logits = self.encoder(x)
        if self.latent == "bernoulli":
            return Bernoulli(logits=logits), logits
        logits = logits.unflatten(-1, (self.n_latent, self.k))
        return OneHotCategorical(logits=logits), logits

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """KL(q(z | x) || uniform prior), summed over the latents (closed form)."""
        if self.latent == "bernoulli":
            # q log q/p for both values of each bit; p = 1/2
            kl = torch.sigmoid(logits) * F.logsigmoid(logits) + torch.sigmoid(-logits) * F.logsigmoid(-logits)
            return (kl + math.log(2.0)).sum(-1)
        logp = torch.log_softmax(logits, -1)
        return (logp.exp() * (logp + math.log(self.k))).sum(-1).sum(-1)

    def reconstruction(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | z), summed over the pixels."""
        if self.latent == "categorical":
            z = z.flatten(-2)
        logits = self.decoder(z)
        if logits.shape != x.shape:  # plain tensors with a leading sample dim (hand-written code)
            x = x.expand_as(logits)
        return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


def storch_surrogate(model: VAE, est, x: torch.Tensor) -> None:
    """Build one step's graph in the current ``storch.Graph``: the one-sample model code."""
    x = storch.denote_independent(x, 0, "data")  # the minibatch dim: independent data points
    q, logits = model.posterior(x)
    z = est(q, inputs=x)  # the estimator, picked by name, is the only thing that changes (x: for
    # estimators that condition on the observation, e.g. NVIL's learned baseline)
    storch.add_cost(model.kl(logits), name="kl")
    storch.add_cost(model.reconstruction(z, x), name="reconstruction")


def storch_step(model: VAE, est, x: torch.Tensor, optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """One training step with storch; returns the surrogate's (detached) cost estimate."""
    optimizer.zero_grad(set_to_none=True)
    with storch.Graph():
        storch_surrogate(model, est, x)
        value = storch.backward()
    optimizer.step()
    return value


@torch.no_grad()
def negative_elbo(model: VAE, x: torch.Tensor, generator: torch.Generator, n_samples: int = 1) -> float:
    """-ELBO per data point with hard samples z ~ q(z | x) (plain torch, no estimator).

    Every estimator is evaluated the same way (relaxations included), with noise from
    ``generator`` so that curves are comparable and reproducible.
    """
    total = 0.0
    for _ in range(n_samples):
        q, logits = model.posterior(x)
        u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype)
        if model.latent == "bernoulli":
            z = (u < torch.sigmoid(logits)).to(logits.dtype)
        else:  # Gumbel-max: an exact sample of each categorical
            g = -torch.log(-torch.log(u.clamp_min(1e-20)))
            z = F.one_hot((logits + g).argmax(-1), model.k).to(logits.dtype)
        total += (model.kl(logits) + model.reconstruction(z, x)).mean().item()
    return total / n_samples
