"""DisARM: ARM Rao-Blackwellised over the logistic noise."""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Bernoulli

from storch import CostFrame, Node, magic_box
from storch.extending import base_distribution

from ._blocks import block, pad_blocks
from ._network import flat
from .arm import Arm

__all__ = ["DisArm"]


class DisArm(Arm):
    """DisARM: antithetic Bernoulli pairs, ARM integrated over the noise given the pair.

    Components (the GO-style construction of appendix D.2.6: an unbiased first-order estimator
    written as a control variate on the score function):
        q(X | x<i): as ``arm``: x = 1[α + ε > 0] (real), x̃ = 1[α - ε > 0] (evaluation only);
        w = 1/n on x, 0 on x̃;
        l(x) = log p(x | x<i) (the Bernoulli score) on x, 0 on x̃;
        a(x<i, X) = Σ_j ⊥ĝ_j (α_j - ⊥α_j) - ⊥f(x) (MagicBox(l) - 1) on x, with
            ĝ_j = ½ (f(x) - f(x̃)) (-1)^{x̃_j} 1[x_j ≠ x̃_j] σ(|α_j|).

    First order: the f(x) ∇l of the surrogate cancels, leaving ĝ, Dong et al.'s DisARM
    (their Eq. 5): E[ARM | x, x̃], so its variance is never above ARM's.

    Requires: Bernoulli (multivariate); any cost. Two evaluations per sample.

    max_order: 1: the control variate cancels the score function at first order only (as for
    ARM, appendix D.2.5).

    Args:
        plate: name of the node's plate (its size is 2 n).
        n_samples: number of antithetic pairs n.

    Example:
        >>> est = storch.estimator("disarm", plate="b")
        >>> b = est(Bernoulli(logits=theta))

    References:
        [1] DisARM: An Antithetic Gradient Estimator for Binary Latent Variables (Dong et al., 2020)
    """

    name = "disarm"
    distributions = (Bernoulli,)

    def gradient_function(self, node: Node) -> torch.Tensor:
        node.state.l = node.log_prob(node.state.x)
        return pad_blocks(node.state.l, 2)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        n = self.n_samples
        alpha = base_distribution(node.distribution).logits
        x, x_tilde = node.state.x, node.state.x_tilde
        # ⊥: (-1)^{x̃} 1[x ≠ x̃] σ(|α|) is a coefficient; only (α - ⊥α) carries the gradient
        coef = ((1 - 2 * x_tilde) * (x != x_tilde) * torch.sigmoid(alpha.abs())).detach()
        lead = len(node.plates)
        per_dim = cost.align(flat(0.5 * coef * (alpha - alpha.detach()), lead))  # (frame, dims)
        f = cost.tensor
        f_x, f_xt = block(f, cost, n, 0), block(f, cost, n, 1)
        g = ((f_x - f_xt).unsqueeze(-1) * per_dim).sum(-1)
        l = cost.align(node.state.l)
        # subtract the score function term f(x) ∇l (appendix D.2.6's construction)
        return pad_blocks(g - f_x * (magic_box(l) - 1.0), 2, cost.dim)
