"""RELAX: a learned control variate on relaxed inputs for discrete nodes."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from storch import CostFrame, Node, magic_box

from ._common import (VarianceTrained, base_of, discrete_with_relaxation, evaluate_network,
                      param_tensors)

__all__ = ["Relax"]


class Relax(VarianceTrained):
    """RELAX: the score function with a learned control variate c_φ on relaxed samples.

    Components (paper, appendix D.2.4):
        q(X | x<i): z reparameterised (Logistic(α, 1) for Bernoulli, log p + Gumbel for
            categoricals), b = H(z) (an exact sample), z̃ ~ p(z | b) reparameterised;
        w(x) = 1/n;
        l(x) = log p(b | x<i);
        a(x<i, X) = c_φ(z) - ⊥c_φ(z) - MagicBox(l) c_φ(z̃) + ⊥c_φ(z̃).

    First order: ∇ = (f(b) - c_φ(z̃)) ∇l + ∇c_φ(z) - ∇c_φ(z̃), Grathwohl et al.'s RELAX.

    Note (paper vs. math): appendix D.2.4 writes the z̃ part as -c_φ(z̃) + (2 - MagicBox(l)) ⊥c_φ(z̃).
    Its first derivative is the same, but its second derivative misses the cross terms
    ∇l ∇c_φ(z̃)ᵀ + ∇c_φ(z̃) ∇lᵀ of ∇²E[c_φ(z̃)] (z̃ depends on θ through b AND through the
    conditional reparameterisation), so it is biased at order 2. We use -MagicBox(l) c_φ(z̃) +
    ⊥c_φ(z̃): evaluates to 0, and all its derivatives are those of the DiCE estimate
    MagicBox(l) c_φ(z̃) of E[c_φ(z)], so the control variate is zero in expectation at every order.
    ``tests/relaxed/test_relax_rebar.py`` checks both forms at order 2.

    User code receives b as the distribution samples it (0/1, an index, or a one-hot vector).

    Requires: Bernoulli, Categorical or OneHotCategorical; any cost (not differentiated).

    max_order: ∞ (appendix D.2.4, with the correction above).

    φ is trained by ``storch.backward()`` to minimise the variance of ∂loss/∂(distribution
    parameters) (Adam, ``lr``), applied at the estimator's next node; ``update=False`` leaves
    ``est.parameters()`` to you. With several costs, the control variate enters once per cost.

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        network: c_φ, a module mapping ``(..., F)`` (z with own dims flattened) to ``(...)``;
            default: a tanh MLP with ``hidden`` units, built at the first node.
        hidden: hidden width of the default network.
        lr: Adam learning rate of the variance-minimising update.
        update: whether ``storch.backward()`` trains φ.

    Example:
        >>> est = storch.estimator("relax", plate="b")
        >>> b = est(Bernoulli(logits=theta))

    References:
        [1] Backpropagation through the Void (Grathwohl et al., 2018)
    """

    name = "relax"
    distributions = (Bernoulli, Categorical, OneHotCategorical)

    def __init__(self, plate: str, n_samples: int = 1, network: Optional[Callable] = None, hidden: int = 32,
                 lr: float = 1e-2, update: bool = True) -> None:
        super().__init__(plate, n_samples)
        self._init_network(network, hidden)
        self._init_training(lr, update)

    def proposal(self, node: Node) -> torch.Tensor:
        self.apply_pending_update()
        node.context["params"] = param_tensors(node.distribution)
        z, b, _, z_tilde = discrete_with_relaxation(base_of(node.distribution), self.n_samples)
        node.context.update(z=z, z_tilde=z_tilde)
        return b

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        lead = len(node.plates)
        c_z = evaluate_network(self.name, self.network, node.context["z"], lead)
        c_zt = evaluate_network(self.name, self.network, node.context["z_tilde"], lead)
        a = c_z - c_z.detach() + self._tilde_term(c_zt, node.gradient_function)  # ⊥: value 0
        return cost.align(a)

    @staticmethod
    def _tilde_term(c_zt: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        # -MagicBox(l) c(z̃) + ⊥c(z̃): the any-order form (see the class docstring)
        return c_zt.detach() - magic_box(l) * c_zt
