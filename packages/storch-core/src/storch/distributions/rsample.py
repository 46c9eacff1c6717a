"""What torch's ``rsample`` can be differentiated to: the order of its derivatives (the gamma
family's implicit reparameterisation: first order only), a straight-through ``rsample`` that is no
reparameterisation at all, and one that autograd cannot differentiate at the sample shapes storch draws.
"""

from __future__ import annotations

import math

from torch.distributions import (Dirichlet, Distribution, Gamma, Independent, OneHotCategoricalStraightThrough,
    TransformedDistribution, Wishart)

__all__ = ["rsample_max_order", "straight_through_rsample", "undifferentiable_rsample", "RSAMPLE_ORDER_NOTE",
           "UNDIFFERENTIABLE_RSAMPLE_NOTE"]


def rsample_max_order(d: Distribution) -> float:
    """The highest derivative order to which autograd differentiates ``d.rsample()`` correctly.

    1 when ``d`` draws through torch's implicit reparameterisation of the gamma family with a
    concentration that carries gradient: ``Gamma`` and ``Chi2`` (``torch._standard_gamma``),
    ``Dirichlet`` and ``Beta`` (``torch._sample_dirichlet``), and every distribution that holds one
    (``StudentT``, ``FisherSnedecor``, ``InverseGamma``, ``Wishart``, and ``Independent`` or
    ``TransformedDistribution`` wrappers of them). Their backward (``_standard_gamma_grad``,
    ``_dirichlet_grad``) is exact but has no derivative of its own: a second derivative through the
    sample raises (Gamma) or silently leaves out terms (Beta, Dirichlet). ``math.inf`` otherwise
    (``Normal``, ``LogNormal``, ``Kumaraswamy``, ``Gumbel``, ...: explicit functions of the noise).
    """
    if isinstance(d, (Gamma, Dirichlet)):
        return 1 if d.concentration.requires_grad else math.inf
    for v in d.__dict__.values():
        if isinstance(v, Distribution) and rsample_max_order(v) < math.inf:
            return 1
    return math.inf


def straight_through_rsample(d: Distribution) -> bool:
    """Whether ``d.rsample()`` is a straight-through estimator rather than a reparameterisation.

    torch's ``OneHotCategoricalStraightThrough.rsample`` returns ``hard + probs - ⊥probs``: the value is
    a hard sample, its derivative that of ``probs``. That is not the derivative of a sample as a function
    of the parameters (a discrete sample has none), so a pathwise estimator (``reparameterization``,
    ``lax``) built on it is biased at every order (a z-test gave |z| 63 at order 1). Looks under
    ``Independent`` and ``TransformedDistribution`` wrappers.
    """
    while isinstance(d, (Independent, TransformedDistribution)):
        d = d.base_dist
    return isinstance(d, OneHotCategoricalStraightThrough)


def undifferentiable_rsample(d: Distribution) -> bool:
    """Whether autograd cannot differentiate ``d.rsample(sample_shape)`` for the sample shapes storch draws.

    torch's ``Wishart.rsample`` (seen in torch 2.13) tests its Bartlett draw with ``support.check`` where it
    means "not in the support", so it takes every valid draw for a singular one ("Singular sample detected")
    and redraws it in place (``sample[is_singular] = ...``), then updates the boolean mask in place too. With a
    sample shape (storch draws ``(n_samples,)``), that mask was saved for the backward of the indexed
    assignment, and the first backward raises "one of the variables needed for gradient computation has been
    modified by an inplace operation" (a bare RuntimeError from the user's ``backward``). A pathwise estimator
    refuses it up front instead. Looks under ``Independent`` and ``TransformedDistribution`` wrappers.
    ``tests/all/test_distribution_zoo.py`` checks that torch still fails, so the refusal can go when it does not.
    Decided by the method, not the class: a user's subclass of ``Wishart`` that draws with an ``rsample`` of its
    own (a differentiable Bartlett draw) is accepted; one that keeps torch's is refused like ``Wishart``.
    """
    while isinstance(d, (Independent, TransformedDistribution)):
        d = d.base_dist
    return type(d).rsample is Wishart.rsample


UNDIFFERENTIABLE_RSAMPLE_NOTE = (
    "torch's Wishart.rsample cannot be differentiated at a sample shape: it takes every draw for a singular one "
    "and redraws it in place, so the first backward raises (an in-place modification of a tensor saved for "
    "backward). Use 'score' for this node (Wishart has log_prob; baseline='leave_one_out' for less variance)")

RSAMPLE_ORDER_NOTE = (
    "torch's rsample of the gamma family (Gamma, Chi2, Beta, Dirichlet, and StudentT, FisherSnedecor, "
    "InverseGamma, Wishart built on them) is an implicit reparameterisation whose backward has no "
    "derivative of its own, so a second derivative through the sample is wrong (Beta, Dirichlet) or fails "
    "(Gamma)")
