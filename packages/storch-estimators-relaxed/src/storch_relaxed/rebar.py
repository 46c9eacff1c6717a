"""REBAR: RELAX whose control variate is the cost itself at relaxed inputs."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

from storch import CostFrame, Node, OptionError, magic_box

from ._common import (VarianceTrained, base_of, block, blocks_weights, discrete_with_relaxation, pad_blocks,
                      param_tensors)

__all__ = ["Rebar"]


class Rebar(VarianceTrained):
    """REBAR: the score function with the control variate η f(σ_λ(z)), λ and η learned.

    Components (paper, appendix D.2.4, with c(z) = η f(σ_λ(z)) as in Tucker et al. 2017):
        q(X | x<i): per real sample, z (reparameterised), b = H(z), z̃ ~ p(z | b); the node's plate
            holds 3 blocks of n entries: b, σ_λ(z) and σ_λ(z̃) (σ_λ(z) = σ(z/λ), or softmax(z/λ)),
            so that user code evaluates the cost f at the relaxed inputs too;
        w = 1/n on the b block, 0 on the two relaxed blocks (evaluation only);
        l(x) = log p(b | x<i) on the b block (0 elsewhere);
        a(x<i, X) = c(z) - ⊥c(z) - MagicBox(l) c(z̃) + ⊥c(z̃) on the b block, with c(·) = η × the
            (live) cost estimate at the relaxed entry.

    First order: ∇ = (f(b) - η f(σ_λ(z̃))) ∇l + η ∇f(σ_λ(z)) - η ∇f(σ_λ(z̃)) (Tucker et al., Eq. 6).
    The z̃ term uses -MagicBox(l) c(z̃) + ⊥c(z̃) instead of the paper's -c(z̃) + (2 - MagicBox(l)) ⊥c(z̃),
    which is biased at order 2 (see ``relax``); the test suite checks both at order 2.

    User code receives, on the b block, b: 0/1 for Bernoulli, a one-hot vector (shape (..., K))
    for OneHotCategorical AND Categorical (the relaxed entries cannot be integer indices, so a
    Categorical node hands out one-hot vectors); on the relaxed blocks, points in (0, 1) or on
    the simplex. Only the b block is weighted, so the estimate of E[f] is f(b).

    Requires: Bernoulli, Categorical or OneHotCategorical, and a cost defined and differentiable
    on relaxed inputs (for the control variate only).

    max_order: ∞ (appendix D.2.4): c(z) is differentiable, so E[∇ⁿc(z)] = ∇ⁿE[c(z)], and
    MagicBox(l) c(z̃) is an any-order estimate of the same expectation.

    λ (as log λ) and η are trained by ``storch.backward()`` to minimise the variance of
    ∂loss/∂(distribution parameters) (Adam, ``lr``), applied at the estimator's next node;
    ``update=False`` leaves ``est.parameters()`` to you.

    Args:
        plate: name of the node's plate (its size is 3 n).
        n_samples: number of real samples n.
        temperature: initial λ > 0.
        eta: initial η.
        lr: Adam learning rate of the variance-minimising update.
        update: whether ``storch.backward()`` trains λ and η.

    Example:
        >>> est = storch.estimator("rebar", plate="b", temperature=0.5)
        >>> b = est(Bernoulli(logits=theta))
        >>> storch.add_cost(((b - 0.45) ** 2).sum())

    References:
        [1] REBAR: Low-variance, unbiased gradient estimates for discrete latent variable models (Tucker et al., 2017)
        [2] Backpropagation through the Void (Grathwohl et al., 2018)
    """

    name = "rebar"
    distributions = (Bernoulli, Categorical, OneHotCategorical)

    def __init__(self, plate: str, n_samples: int = 1, temperature: float = 0.5, eta: float = 1.0,
                 lr: float = 1e-2, update: bool = True) -> None:
        super().__init__(plate, n_samples)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise OptionError(f"{self.name}: temperature must be a finite float > 0, got {temperature!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta):
            raise OptionError(f"{self.name}: eta must be a finite float, got {eta!r}")
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float64))
        self.eta = torch.nn.Parameter(torch.tensor(float(eta), dtype=torch.float64))
        self._init_training(lr, update)

    def proposal(self, node: Node) -> torch.Tensor:
        self.apply_pending_update()
        d = base_of(node.distribution)
        node.context["params"] = param_tensors(node.distribution)
        z, b, hard, z_tilde = discrete_with_relaxation(d, self.n_samples)
        lam = self.log_temperature.exp().to(z)  # z's dtype and device
        if isinstance(d, Bernoulli):
            soft, soft_tilde = torch.sigmoid(z / lam), torch.sigmoid(z_tilde / lam)
        else:
            soft, soft_tilde = torch.softmax(z / lam, -1), torch.softmax(z_tilde / lam, -1)
        node.context["b"] = b
        return torch.cat([hard, soft, soft_tilde], 0)

    def weighting_function(self, node: Node) -> torch.Tensor:
        return blocks_weights(node, self.n_samples, 3)

    def gradient_function(self, node: Node) -> torch.Tensor:
        node.context["l"] = node.log_prob(node.context["b"])  # l on the b block
        return pad_blocks(node.context["l"], 3)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        n = self.n_samples
        live = cost.live()  # with its graph: c must be differentiable in θ, λ, η
        eta = self.eta.to(live)  # live's dtype and device
        c_z, c_zt = eta * block(live, cost, n, 1), eta * block(live, cost, n, 2)
        l = cost.align(node.context["l"])
        a = c_z - c_z.detach() + self._tilde_term(c_zt, l)  # ⊥: the control variate evaluates to 0
        return pad_blocks(a, 3, cost.dim)

    @staticmethod
    def _tilde_term(c_zt: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        # -MagicBox(l) c(z̃) + ⊥c(z̃): the any-order form (see ``relax``)
        return c_zt.detach() - magic_box(l) * c_zt
