"""What torch's ``rsample`` can be differentiated to: the order of its derivatives (the gamma
family's implicit reparameterisation: first order only), and a straight-through ``rsample`` that is no
reparameterisation at all.
"""

from __future__ import annotations

import math

from torch.distributions import (Dirichlet, Distribution, Gamma, Independent, OneHotCategoricalStraightThrough,
    TransformedDistribution)

__all__ = ["rsample_max_order", "straight_through_rsample", "RSAMPLE_ORDER_NOTE"]


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


RSAMPLE_ORDER_NOTE = (
    "torch's rsample of the gamma family (Gamma, Chi2, Beta, Dirichlet, and StudentT, FisherSnedecor, "
    "InverseGamma, Wishart built on them) is an implicit reparameterisation whose backward has no "
    "derivative of its own, so a second derivative through the sample is wrong (Beta, Dirichlet) or fails "
    "(Gamma)")
