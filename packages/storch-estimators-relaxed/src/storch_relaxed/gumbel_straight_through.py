"""The straight-through Gumbel estimator."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Distribution

from storch.extending import base_distribution

from .gumbel_softmax import EOS_HINT, GumbelSoftmax

__all__ = ["GumbelStraightThrough"]


class GumbelStraightThrough(GumbelSoftmax):
    """Straight-through Gumbel: a discrete forward value, the relaxed sample's gradient (biased).

    Components:
        q(X | x<i) = n i.i.d. samples x = H(z) + (z - ⊥z), where z is the Gumbel-softmax sample
            at temperature τ and H(z) its discretisation (1[z > 1/2]; one_hot(argmax z)), which
            is an exact sample of the Bernoulli / categorical;
        w(x) = 1/n;
        l(x) = 0;
        a = 0.

    The forward value is exactly H(z) (the term z - ⊥z evaluates to 0): 0/1 for Bernoulli, a
    one-hot vector (shape ``(..., K)``) for OneHotCategorical.

    Requires: Bernoulli or OneHotCategorical (a Categorical only with ``categorical="one_hot"``), and
    a cost differentiable in its (one-hot) input. A Categorical is refused by default
    (``storch.UnsupportedDistributionError``): its integer index would carry no gradient, so its node
    would hand out a one-hot vector where every other estimator hands out the index, and a cost
    written for the index would silently be another one. Pass ``OneHotCategorical`` (the same
    parameters) instead.

    max_order: ∞ for its own surrogate, but ``biased``: ∇f(H(z)) · ∂z/∂θ is not the gradient of
    E[f(b)]; the bias depends on τ (it vanishes as τ → 0 for costs quadratic in b).

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        temperature: τ > 0, or a schedule ``step -> τ`` (see ``gumbel_softmax``).
        categorical: ``"refuse"`` (the default) or ``"one_hot"``: take a Categorical node too, handing out
            one-hot vectors of shape ``(..., K)`` for it, not indices (see ``gumbel_softmax``).

    Example:
        >>> est = storch.estimator("gumbel_straight_through", plate="z", temperature=1.0)
        >>> b = est(Bernoulli(logits=theta))   # values 0/1

    References:
        [1] Categorical Reparameterization with Gumbel-Softmax (Jang et al., 2017)
        [2] Estimating or Propagating Gradients Through Stochastic Neurons (Bengio et al., 2013)
    """

    name = "gumbel_straight_through"
    #: read by ``storch.estimator`` when it refuses an option this class does not take (this class's only)
    unknown_option_hints = {
        "hard": "This estimator is already hard (a discrete forward value, the relaxed sample's gradient, as torch's "
                "F.gumbel_softmax(hard=True)): drop the option",
        "eos": EOS_HINT,
    }
    # ∇f(H(z)) ∂z/∂θ is the derivative of no objective: no kink or jump of f makes it more biased than it is by
    # design, so the cost's path is not checked as gumbel_softmax's is
    pathwise = False

    def draw(self, distribution: Distribution, shape: tuple) -> torch.Tensor:
        soft, z = self._relaxed(distribution, shape)
        z = z.detach()  # H(z) carries no gradient
        if isinstance(base_distribution(distribution), Bernoulli):
            hard = (z > 0).to(soft.dtype)  # = 1[σ(z/τ) > 1/2] (z: float32 for a bfloat16 model, soft: its dtype)
        else:
            hard = F.one_hot(z.argmax(-1), z.shape[-1]).to(soft.dtype)
        # ⊥: the forward value is exactly the hard sample, the gradient is the relaxed one's
        return hard + (soft - soft.detach())
