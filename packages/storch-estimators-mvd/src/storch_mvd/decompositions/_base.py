"""The weak derivative of a distribution family: (c_θ, p⁺, p⁻) for each of its parameters.

For a parameter θ of p, a weak derivative is a triple with

    ∂/∂θ p(x) = c_θ (p⁺(x) − p⁻(x)),   so   ∂/∂θ E_p[f] = c_θ (E_{p⁺}[f] − E_{p⁻}[f])

(Mohamed et al. 2020, section 6.1; paper, appendix D.4). A family module describes, per
*element* of the distribution's batch, one such triple for every scalar component of every
parameter (Categorical's logits have K components, one pair per category).
"""

from __future__ import annotations

import abc

from typing import ClassVar, NamedTuple, Optional

import torch
from torch.distributions import Distribution

__all__ = ["Part", "WeakDerivative"]


class Part(NamedTuple):
    """The weak derivative of one parameter, for all its K components and all batch elements.

    Attributes:
        theta: the parameter WITH its graph, shape ``(K, *batch)`` (K = 1 for a scalar parameter).
        c: the constant c_θ, shape ``(K, *batch)``.
        plus: samples of p⁺, shape ``(n, K, *batch, *event)``, detached.
        minus: samples of p⁻, shape ``(n, K, *batch, *event)``, detached.
        active: ``None`` (every slot is a proposal), or a bool tensor of shape ``(K, 2, *batch)``
            (2: p⁺, p⁻): whether the slot's p^± is one of the element's proposals G_e. An inactive
            slot is one whose p^± does not exist or puts mass where p has none (a Categorical's
            p⁺_k = δ_k at p_k = 0): its c must be 0, it gets weight 0, and its sample is a stand-in
            in p's support, so the cost never sees an impossible value. :meth:`WeakDerivative.ratio_sum`
            sums over the active slots only.
    """

    theta: torch.Tensor
    c: torch.Tensor
    plus: torch.Tensor
    minus: torch.Tensor
    active: Optional[torch.Tensor] = None


class WeakDerivative(abc.ABC):
    """Base class of a family's decomposition (one module per family in this package).

    Subclasses list the torch distribution types they handle in ``families`` and implement
    :meth:`parts` and :meth:`ratio_sum`; one that differentiates only some of a family's parameters
    overrides :meth:`unsupported` to refuse a distribution whose other parameters require grad.
    """

    families: ClassVar[tuple[type, ...]] = ()

    def unsupported(self, d: Distribution) -> Optional[str]:
        """Why ``d`` cannot be differentiated here, and what to use instead (``None``: it can).

        A parameter that requires grad but has no weak derivative in this module (Gamma's
        concentration, Binomial's total_count) would silently get no gradient: the estimator
        refuses the distribution with this reason. ``d`` may hold plate tensors (the registry's
        capability listing asks with the user's distribution).
        """
        return None

    @abc.abstractmethod
    def parts(self, d: Distribution, n: int, coupled: bool) -> list[Part]:
        """The weak derivative of every parameter of ``d``, with ``n`` draws of p⁺ and p⁻.

        Args:
            d: the (raw) distribution; its whole batch shape is treated elementwise.
            n: number of independent draws.
            coupled: draw p⁺ and p⁻ with common random numbers where the family allows it.
        """

    @abc.abstractmethod
    def ratio_sum(self, d: Distribution, y: torch.Tensor) -> torch.Tensor:
        """Σ over all parameters, components and signs of q(y) / p(y), elementwise (active slots only).

        ``q`` runs over every p⁺ and p⁻ of :meth:`parts` for one batch element; ``y`` has
        shape ``(..., *batch, *event)`` and the result ``(..., *batch)``. This is the
        denominator of the balance-heuristic importance weights (see ``mvd.py``).
        """


def new(like: torch.Tensor, shape) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with the dtype and device of ``like``."""
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)
