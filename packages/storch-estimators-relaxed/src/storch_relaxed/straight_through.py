"""The plain straight-through estimator: the hard sample forward, the probabilities' derivative backward."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, OneHotCategorical

from storch import Estimator, Node
from storch.extending import base_distribution, given_by_probs

from ._categorical import DEFAULT_DISTRIBUTIONS, OneHotForCategorical
from ._precision import REDUCED
from .gumbel_softmax import EOS_HINT

__all__ = ["StraightThrough"]


def _given(d: Distribution) -> torch.Tensor:
    """The tensor a Bernoulli, Categorical or OneHotCategorical was built from (its probs or its logits), read
    without computing the other (torch caches a computed ``probs`` on ``d``)."""
    inner = d._categorical if isinstance(d, OneHotCategorical) else d
    return inner.probs if given_by_probs(inner) else inner.logits


class StraightThrough(OneHotForCategorical, Estimator):
    """Straight-through: an exact discrete sample forward, the derivative of its probabilities backward (biased).

    Components:
        q(X | x<i) = n i.i.d. samples b ~ p, handed out as x = b + (p - ⊥p): Bernoulli: b in {0, 1},
            p = σ(α); categorical: b = one_hot(k), p the vector of probabilities (torch's
            ``OneHotCategoricalStraightThrough.rsample``, what DreamerV2 writes by hand);
        w(x) = 1/n;
        l(x) = 0;
        a = 0.

    The forward value is exactly b (p - ⊥p evaluates to 0): 0/1 for Bernoulli, a one-hot vector (shape
    ``(..., K)``) for OneHotCategorical. No noise is relaxed and there is no temperature: the gradient is
    ∇_b f(b)ᵀ ∂p/∂θ (Bengio et al. 2013, section 4), where ``gumbel_straight_through`` differentiates a
    Gumbel-softmax sample at τ instead.

    Requires: Bernoulli or OneHotCategorical (a Categorical only with ``categorical="one_hot"``: its node then
    hands out one-hot vectors, not indices, as ``gumbel_straight_through``'s does), or an Independent of
    them; a cost differentiable in the value handed out. A continuous distribution is refused: with
    ``rsample`` its pathwise gradient is exact (``reparameterization``).

    max_order: ∞: the estimate of every order is defined (the derivatives of f(b + p - ⊥p)), but it is
    ``biased`` from order 1: E[∇_b f(b)]ᵀ ∂p/∂θ is ∇E[f(b)] only where f is linear in each variable on its
    own (multilinear in the independent variables, a Bernoulli or a one-hot vector as a whole: then
    E[f(b)] = f(p), and the derivatives of every order are unbiased, as each mixed partial of f is free of
    the variables it differentiates; x₀x₁ of ONE one-hot x is not: E[x₀x₁] = 0, f(p) = p₀p₁). For
    f(b) = (b - t)² its expected gradient is 2(p - t) p' where the exact one is (1 - 2t) p': a bias of (2p - 1) p' at order 1, and the order-2 estimate 2p'² + 2(p - t) p'' against
    (1 - 2t) p''. Order 2 is no more biased than order 1 where order 1 is exact, so the order is not lowered.

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        categorical: ``"refuse"`` (the default) or ``"one_hot"``: take a Categorical node too, handing out
            one-hot vectors of shape ``(..., K)`` for it, not indices (see ``gumbel_softmax``).

    Example:
        >>> est = storch.estimator("straight_through", plate="z")
        >>> logits = torch.zeros(32, requires_grad=True)
        >>> z = est(OneHotCategorical(probs=0.99 * logits.softmax(-1) + 0.01 / 32))   # one-hot; unimix (DreamerV3)

    References:
        [1] Estimating or Propagating Gradients Through Stochastic Neurons for Conditional Computation
            (Bengio et al., 2013)
        [2] Mastering Atari with Discrete World Models (Hafner et al., 2021)
    """

    name = "straight_through"
    #: read by ``storch.estimator`` when it refuses an option this class does not take (this class's only)
    unknown_option_hints = {
        "temperature": "This estimator relaxes nothing (the gradient is that of the probabilities, as torch's "
                       "OneHotCategoricalStraightThrough): drop the option, or, for the gradient of a Gumbel-softmax "
                       "sample at a temperature, use the estimator \"gumbel_straight_through\"",
        "hard": "This estimator is already hard (the exact sample forward, the probabilities' gradient): drop the "
                "option",
        "eos": EOS_HINT,
    }
    biased = True
    distributions = DEFAULT_DISTRIBUTIONS  # a Categorical only with categorical="one_hot" (_categorical)
    # ∇_b f(b) ∂p/∂θ is the derivative of no objective: no kink of f makes it more biased than it is by design, so
    # the cost's path is not checked as a relaxation's is (as gumbel_straight_through)
    pathwise = False
    # one instance called at every step (a world model's latent per step) is one partition with one plate: each
    # step drawn by proposal (the core's components path: l = 0, uniform weights), as gumbel_softmax's
    supports_partitions = True

    def __init__(self, plate: str, n_samples: int = 1, categorical: str = "refuse") -> None:
        super().__init__(plate, n_samples)
        self.categorical = categorical

    def proposal(self, node: Node) -> torch.Tensor:
        return self.draw(node.distribution, (self.n_samples,))

    def draw(self, distribution: Distribution, shape: tuple) -> torch.Tensor:
        """``shape`` exact samples of ``distribution`` (appendix D.2.1's draw, no gradient), handed out as
        b + (p - ⊥p). At a later step of a partition (``Estimator.extend``: ``shape`` is ``()``) each sequence
        continues with one draw given its own prefix, as gumbel_softmax's hook does (the core's components path
        would draw n per prefix and keep the diagonal)."""
        d = base_distribution(distribution)
        # float16 / bfloat16: from float32 probabilities
        hard = self._draw_in_float32(d, shape) if _given(d).dtype in REDUCED else distribution.sample(shape)
        probs = d.probs
        if isinstance(d, Categorical):  # an index (categorical="one_hot"): its one-hot vector, as p is one per class
            hard = F.one_hot(hard, probs.shape[-1])
        hard = hard.to(probs.dtype)
        # x = b + (p - ⊥p) (Bengio et al. 2013): the forward value is exactly b, the gradient that of p
        return hard + (probs - probs.detach())

    def _draw_in_float32(self, d: Distribution, shape: tuple) -> torch.Tensor:
        """n samples of a float16 / bfloat16 ``d`` drawn from its probabilities computed in float32 (the
        relaxed family's precision, ``_precision``): torch's own draw computes σ(α) in bfloat16, where σ(6.5) =
        0.9985 rounds to 1 (b = 0 was never drawn) and σ(5) = 0.9933 to 0.9922. Given by ``probs``: those
        probabilities, widened exactly; by ``logits``: σ / softmax of the logits, widened exactly."""
        shape = tuple(shape)
        if isinstance(d, Bernoulli):
            p = d.probs.detach().float() if given_by_probs(d) else torch.sigmoid(d.logits.detach().float())
            return torch.bernoulli(p.expand(shape + p.shape))
        cat = d._categorical if isinstance(d, OneHotCategorical) else d
        wide = (Categorical(probs=cat.probs.detach().float(), validate_args=False) if given_by_probs(cat)
                else Categorical(logits=cat.logits.detach().float(), validate_args=False))
        index = wide.sample(shape)
        return F.one_hot(index, _given(d).shape[-1]) if isinstance(d, OneHotCategorical) else index

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=node.sample.dtype, device=node.sample.device)  # l = 0: pathwise through x

    def step_gradient_function(self, node: Node, distribution: Distribution, sample: torch.Tensor,
                               plates: tuple) -> torch.Tensor:
        """l_t = 0 (the gradient flows through b + (p - ⊥p)), broadcast over the plates as at step 0."""
        return torch.zeros((1,), dtype=sample.dtype, device=sample.device)

    def _unsupported_message(self, d: Distribution) -> str:
        message = super()._unsupported_message(d)
        inner = d
        while isinstance(inner, Independent):
            inner = inner.base_dist
        if d.has_rsample and not isinstance(inner, (Bernoulli, Categorical, OneHotCategorical)):
            # before the list of the estimators that support it, which ends the message
            head, sep, tail = message.partition(" Estimators that support it:")
            message = (f"{head} {type(d).__name__} has rsample: its pathwise gradient is exact, use "
                       "'reparameterization' for this node (straight-through is for discrete samples, whose value "
                       f"has no derivative).{sep}{tail}")
        return message

    def extra_repr(self) -> str:
        extra = f", categorical={self.categorical!r}" if self.categorical != "refuse" else ""
        return f"{super().extra_repr()}{extra}"
