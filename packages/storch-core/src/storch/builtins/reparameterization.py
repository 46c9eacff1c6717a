"""The pathwise derivative (reparameterization trick)."""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from ..estimators.base import Estimator
from ..graph.node import Node

__all__ = ["Reparameterization"]


class Reparameterization(Estimator):
    """Pathwise derivative: differentiate through ``rsample`` (paper, section 3.6).

    Components:
        q(X | x<i) = n i.i.d. reparameterised samples x = g(ε, θ);
        w(x) = 1/n;
        l(x) = 0 (the gradient flows through the sample itself);
        a = 0.

    Requires: a distribution with ``rsample`` and a cost differentiable in the sample.

    max_order: ∞ — the SCG is transformed so that sampling is off the path from θ to the cost
    (Schulman et al. 2015); any order of the pathwise estimate is unbiased.

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.

    Example:
        >>> est = storch.estimator("reparameterization", plate="z", n_samples=4)
        >>> z = est(torch.distributions.Normal(mu, 1.0))
    """

    name = "reparameterization"
    aliases = ("pathwise",)
    requires_rsample = True
    supports_partitions = True

    def proposal(self, node: Node) -> torch.Tensor:
        return node.distribution.rsample((self.n_samples,))

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=node.sample.dtype, device=node.sample.device)

    def draw(self, distribution: Distribution, shape: tuple) -> torch.Tensor:
        # a later step's draw (Estimator.extend): one rsample per prefix, as proposal draws. Overridden here, with
        # proposal, so that a subclass overriding proposal alone is refused at step 1 of a partition (its steps
        # would be drawn by this draw, not by its proposal), not silently drawn otherwise
        return distribution.rsample(shape)

    def step_gradient_function(self, node: Node, distribution: Distribution, sample: torch.Tensor,
                               plates: tuple) -> torch.Tensor:
        return torch.zeros((1,), dtype=sample.dtype, device=sample.device)
