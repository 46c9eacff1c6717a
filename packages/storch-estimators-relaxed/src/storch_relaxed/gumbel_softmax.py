"""The Gumbel-softmax (Concrete) relaxation."""

from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from storch import Estimator, Node, OptionError
from storch.extending import base_distribution

from ._noise import Temperature, check_temperature, gumbel_noise, logistic_noise

__all__ = ["GumbelSoftmax"]


class GumbelSoftmax(Estimator):
    """Gumbel-softmax / Concrete relaxation: a reparameterised relaxed sample (biased).

    Components:
        q(X | x<i) = n i.i.d. relaxed samples: Bernoulli: z = σ((α + L)/τ), L ~ Logistic(0, 1);
            categorical: z = softmax((log p + G)/τ), G ~ Gumbel(0, 1)^K;
        w(x) = 1/n;
        l(x) = 0 (the gradient flows through the relaxed sample, as for ``reparameterization``);
        a = 0.

    User code receives the relaxed sample: a number in (0, 1) for Bernoulli, a point of the
    simplex (shape ``(..., K)``) for OneHotCategorical AND for Categorical: integer categories
    cannot be relaxed, so a Categorical node hands out a relaxed one-hot vector instead of an
    index (write the cost for one-hot inputs, e.g. ``emb @ z`` instead of ``emb[z]``).

    Requires: Bernoulli, Categorical or OneHotCategorical, and a cost that is defined and
    differentiable on relaxed inputs.

    max_order: ∞, but of the RELAXED objective E_z[f(z)] (a reparameterisation of it); it is
    ``biased`` for E_b[f(b)]; the bias vanishes as τ → 0 while the variance grows.

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        temperature: τ > 0, or a schedule ``step -> τ`` (annealing); ``step`` counts the
            ``storch.backward()`` calls of graphs that used this estimator (``est.step``). Jang et
            al.'s schedule: ``lambda t: max(0.5, math.exp(-1e-5 * t))``. Only a schedule makes the
            estimator update its state (``has_update``): with a constant τ it has none, so a step
            that uses it can be compiled with ``storch.compile``.

    Example:
        >>> torch.manual_seed(0)
        >>> est = storch.estimator("gumbel_softmax", plate="z", temperature=0.5)
        >>> z = est(OneHotCategorical(logits=torch.zeros(5)))   # relaxed one-hot, sums to 1

    References:
        [1] Categorical Reparameterization with Gumbel-Softmax (Jang et al., 2017)
        [2] The Concrete Distribution (Maddison et al., 2017)
    """

    name = "gumbel_softmax"
    biased = True
    distributions = (Bernoulli, Categorical, OneHotCategorical)
    has_update = True  # only to advance an annealing schedule: per instance, see __init__

    def __init__(self, plate: str, n_samples: int = 1, temperature: Temperature = 1.0) -> None:
        super().__init__(plate, n_samples)
        check_temperature(self.name, temperature)
        self.temperature = temperature
        self.step = 0
        # the step counter is state only for a schedule: a constant temperature updates nothing
        # (storch.compile replays such a step; it refuses estimators that update their state)
        self.has_update = callable(temperature)

    def current_temperature(self) -> float:
        """τ at the current step (the schedule's value, checked)."""
        if not callable(self.temperature):
            return float(self.temperature)
        tau = self.temperature(self.step)
        try:
            check_temperature(self.name, float(tau))
        except (TypeError, ValueError):
            raise OptionError(f"{self.name}: the temperature schedule returned {tau!r} at step {self.step}; "
                              "it must return a finite float > 0") from None
        return float(tau)

    def relaxed(self, node: Node) -> tuple[torch.Tensor, torch.Tensor]:
        """n relaxed samples ``(n, *parents, *batch[, K])`` (differentiable) and their logits z."""
        d = base_distribution(node.distribution)
        tau = self.current_temperature()
        logits = d.logits
        shape = (self.n_samples,) + tuple(logits.shape)
        if isinstance(d, Bernoulli):
            z = logits + logistic_noise(shape, logits)  # z ~ Logistic(α, 1); 1[z > 0] ~ Bernoulli(σ(α))
            return torch.sigmoid(z / tau), z  # Maddison et al. 2017, Eq. 21 (binary Concrete)
        z = logits + gumbel_noise(shape, logits)  # Gumbel-max: argmax z ~ Categorical(p)
        return torch.softmax(z / tau, -1), z  # Jang et al. 2017, Eq. 1

    def proposal(self, node: Node) -> torch.Tensor:
        return self.relaxed(node)[0]

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=node.sample.dtype, device=node.sample.device)

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        self.step += 1

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, temperature={self.temperature!r}"
