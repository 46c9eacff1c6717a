"""LAX: the score function with a learned, reparameterised control variate (continuous nodes)."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from storch import CostFrame, Node, magic_box
from storch.extending import note_rsample, rekey_transform_cache, rsample_params

from ._network import (
    NETWORK_THROUGH, NETWORK_WHAT, evaluate_network, order_1_kinks, refuse_twice_on_kinks, smooth_network,
    smoothness_checked, smoothness_due,
)
from ._params import param_tensors
from ._variance_trained import VarianceTrained

__all__ = ["Lax"]


class Lax(VarianceTrained):
    """LAX: score function plus a learned control variate c_φ differentiated through ``rsample``.

    Components (paper, appendix D.2.4):
        q(X | x<i) = n i.i.d. reparameterised samples x = g(ε, θ);
        w(x) = 1/n;
        l(x) = log p(⊥x | x<i) (the cost is NOT differentiated through x: user code gets ⊥x);
        a(x<i, X) = c_φ(x) - MagicBox(l) c_φ(⊥x) (c_φ(⊥x): the value ⊥c_φ(x), constant in θ but
            differentiable in φ, so that the variance update sees ĝ's -c_φ(x) ∇l term).

    First order: ∇ = (f(x) - c_φ(x)) ∇l + ∇_θ c_φ(x(θ, ε)). The control variate is zero in
    expectation at every order: E[∇ⁿ c_φ(x)] is the pathwise and E[⊥c_φ(x) ∇ⁿ MagicBox(l)] the score
    function estimate of ∇ⁿ E[c_φ(x)] (c_φ has no other dependence on θ).

    Requires: a distribution with ``rsample``; the cost need not be differentiable.

    max_order: ∞ for a network c_φ n times differentiable in x (appendix D.2.4). A kink in c_φ (a
    ReLU network) breaks E[∇ⁿc_φ(x)] = ∇ⁿE[c_φ(x)] from order 2 on: ``storch.surrogate_loss(order >= 2)``
    then raises ``storch.OrderError`` (``storch.extending.require_smooth``); a jump in c_φ (round, sign)
    from order 1 on: refused at order 1 too, checked at the first step of each plate and cost name. That
    check records a kink too: the order-1 surrogate differentiated twice through the network's output
    (``create_graph=True``, ``torch.autograd.functional.hessian``) raises ``storch.OrderError``.

    φ is trained to minimise the variance of ĝ = ∂loss/∂(distribution parameters) by
    ``storch.backward()`` (Adam, ``lr``, one step in ``update_parameters``). The
    parameters are ``est.parameters()``; to train them yourself pass ``update=False``.

    Args:
        plate: name of the node's plate.
        n_samples: number of samples.
        network: c_φ, a module mapping ``(..., F)`` (the sample, own dims flattened) to ``(...)``;
            default: a tanh MLP with ``hidden`` units, built at the first node. At order n >= 2 it
            must be n times differentiable (no ReLU; see max_order).
        hidden: hidden width of the default network.
        lr: Adam learning rate of the variance-minimising update.
        update: whether ``storch.backward()`` trains φ.

    Example:
        >>> est = storch.estimator("lax", plate="x", n_samples=1)
        >>> x = est(Normal(mu, 1.0))   # detached sample; its cost may be non-differentiable

    References:
        [1] Backpropagation through the Void (Grathwohl et al., 2018)
    """

    name = "lax"
    requires_rsample = True

    def __init__(self, plate: str, n_samples: int = 1, network: Optional[Callable] = None, hidden: int = 32,
                 lr: float = 1e-2, update: bool = True) -> None:
        super().__init__(plate, n_samples)
        self._init_network(network, hidden)
        self._init_training(lr, update)

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution
        node.state.params = param_tensors(d)
        # (a kink or jump inside rsample: c_φ(x) is differentiated through it) the parameters of a distribution
        # whose rsample storch looks into, taken before the draw (not a caching transform's last value)
        params = rsample_params(d)
        x = d.rsample((self.n_samples,))
        if params is not None:
            note_rsample(node, x, d, params)
        node.state.z = x
        xd = x.detach()  # ⊥x: the cost's gradient goes through l and c_φ only
        # l = log p(⊥x) reuses the detached pre-images a caching transform kept (TanhTransform(cache_size=1):
        # atanh of a sample saturated at ±1 is infinite); the same values as inverting ⊥x where that is finite
        rekey_transform_cache(node.distribution, x, xd, torch.Tensor.detach)
        return xd

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        c = evaluate_network(self.name, self.network, node.state.z, len(node.plates))
        # c_φ's derivatives of order < n continuous in x: from order 2 a ReLU network's are not; at order 1
        # a jump (round, sign) breaks it, checked once per plate and cost name (the core's order-1 check of
        # a requires_rsample node walks the cost from ⊥x, which the network is not on)
        # (a kink, not refused at order 1, is recorded by that check: the network's output is then hooked at
        # every order-1 step, so that the order-1 surrogate differentiated twice through it is refused)
        if smoothness_due(self, node, cost):
            found = {"network": smooth_network(self, node, cost.order, c, node.state.z)}
            smoothness_checked(self, node, cost, found)
        else:
            found = order_1_kinks(self, node, cost)
        if found.get("network"):
            refuse_twice_on_kinks(self, node, NETWORK_WHAT, NETWORK_THROUGH, found["network"], c)
        # appendix D.2.4: a = c_φ(x) - MagicBox(l) ⊥c_φ(x), with the score term's c_φ evaluated at ⊥x (constant in
        # θ, as ⊥c_φ(x) is: every θ-derivative is the paper's) but not cut from φ: ĝ's -c_φ(x) ∇l term must
        # depend on φ, or the update's ∂/∂φ Σ ĝ² sees only the pathwise ∇c_φ(x) and its steps make the
        # variance grow (c.detach() here: 1.3 untrained, 189 after 1000 steps on the Normal toy)
        c_score = evaluate_network(self.name, self.network, node.state.z.detach(), len(node.plates))
        a = c - magic_box(node.gradient_values) * c_score
        return cost.align(a)
