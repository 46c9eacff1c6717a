"""ARM: the augment-REINFORCE-merge estimator for multivariate Bernoulli nodes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

from storch import CostFrame, Estimator, Node, magic_box
from storch.extending import base_distribution

from ._blocks import block, blocks_weights, pad_blocks
from ._noise import logistic_noise
from ._precision import to_model
from ._params import exact_logits

__all__ = ["Arm", "AntitheticState"]


@dataclass
class AntitheticState:
    """Per-node record of ARM and DisARM (filled by ``proposal``, then ``gradient_function``).

    Attributes:
        eps: the logistic noise ε, shape ``(n, *parents, *own)``.
        x: the real samples 1[α + ε > 0]; x_tilde: the antithetic samples 1[α - ε > 0].
        l: the score log p(x) of the real block (DisARM).
    """

    eps: Optional[torch.Tensor] = None
    x: Optional[torch.Tensor] = None
    x_tilde: Optional[torch.Tensor] = None
    l: Optional[torch.Tensor] = None


class Arm(Estimator):
    """ARM: a logistic score function with the antithetic pair's mean cost as baseline.

    Components (paper, appendix D.2.5, in the logistic form of Dong et al. 2020):
        q(X | x<i): ε ~ Logistic(0, 1) per dimension, z = α + ε, z̃ = α - ε; the node's plate holds
            x = 1[z > 0] (the real samples, exact Bernoulli(σ(α)) draws) and then the antithetic
            x̃ = 1[z̃ > 0] (evaluation only);
        w = 1/n on x, 0 on x̃;
        l(x) = log q_α(z) = Σ_dims log Logistic(z; α, 1) (z fixed, α differentiated) on x, 0 on x̃;
        a(x<i, X) = (1 - MagicBox(l)) ½ (f(x) + f(x̃)) on x.

    First order: ∇_α = ½ (f(x) - f(x̃)) ∇_α log q_α(z) = (f(x) - f(x̃)) (σ(ε) - ½), Yin & Zhou's ARM.

    Requires: Bernoulli (any number of independent dimensions, i.e. a multivariate Bernoulli);
    any cost. Costs two evaluations per sample.

    max_order: 1 (appendix D.2.5): the baseline depends on x; it is zero in expectation only
    because ∇ log q_α is odd in ε, and the second-order score is even.

    Args:
        plate: name of the node's plate (its size is 2 n).
        n_samples: number of antithetic pairs n.

    Example:
        >>> est = storch.estimator("arm", plate="b")
        >>> b = est(Bernoulli(logits=theta))

    References:
        [1] ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks (Yin & Zhou, 2019)
        [2] DisARM: An Antithetic Gradient Estimator for Binary Latent Variables (Dong et al., 2020)
    """

    name = "arm"
    max_order = 1
    distributions = (Bernoulli,)
    State = AntitheticState

    def proposal(self, node: Node) -> torch.Tensor:
        # far from 0 where the probabilities are exactly 0 or 1: x and x̃ never take a value of probability 0.
        # gradient_function reads torch's (finite, clamped) logits: ∇_α log q_α(z) depends on ε alone
        alpha = exact_logits(base_distribution(node.distribution))
        eps = logistic_noise((self.n_samples,) + tuple(alpha.shape), alpha)  # float32 for a bfloat16 α (_precision)
        node.state.eps = eps
        x = (alpha + eps > 0).to(alpha.dtype)  # the real samples (no gradient); α + ε in ε's precision
        x_tilde = (alpha - eps > 0).to(alpha.dtype)  # antithetic
        node.state.x, node.state.x_tilde = x, x_tilde
        return torch.cat([x, x_tilde], 0)

    def weighting_function(self, node: Node) -> torch.Tensor:
        return blocks_weights(node, self.n_samples, 2)

    def gradient_function(self, node: Node) -> torch.Tensor:
        alpha = base_distribution(node.distribution).logits
        eps = node.state.eps  # z - α with z = ⊥z: only α is differentiated
        e = (alpha.detach() + eps) - alpha
        log_q = -e - 2 * F.softplus(-e)  # log density of Logistic(α, 1) at z (appendix D.2.5, item 3)
        k = log_q.dim() - len(node.plates)
        l = log_q.sum(tuple(range(-k, 0))) if k > 0 else log_q
        return pad_blocks(to_model(l, alpha.dtype), 2)  # (e is ε's float32 for a bfloat16 α)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        n = self.n_samples
        f = cost.tensor  # detached cost estimates of all 2n entries
        baseline = 0.5 * (block(f, cost, n, 0) + block(f, cost, n, 1))
        l = block(cost.align(node.gradient_values), cost, n, 0)
        # appendix D.2.5, item 4: a = (1 - MagicBox(l)) ½ (f(x) + f(x̃))
        return pad_blocks((1.0 - magic_box(l)) * baseline, 2, cost.dim)
