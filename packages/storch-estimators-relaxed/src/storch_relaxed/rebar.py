"""REBAR: RELAX whose control variate is the cost itself at relaxed inputs."""

from __future__ import annotations

from ._categorical import DEFAULT_DISTRIBUTIONS
from ._relaxed_cost import MAX_CHAIN_ENTRIES, RelaxedCost

__all__ = ["Rebar"]


class Rebar(RelaxedCost):
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
    for OneHotCategorical; on the relaxed blocks, points in (0, 1) or on the simplex. Only the b
    block is weighted, so the estimate of E[f] is f(b).

    Requires: Bernoulli or OneHotCategorical (a Categorical only with ``categorical="one_hot"``), and
    a cost defined and differentiable on relaxed inputs (for the control variate only). A Categorical
    is refused by default (``storch.UnsupportedDistributionError``): the relaxed entries cannot be
    integer indices, so its node would hand out one-hot vectors where every other estimator hands out
    the index, and a cost written for the index would silently be another one. Pass
    ``OneHotCategorical`` (the same parameters) instead.

    max_order: ∞ for a cost n times differentiable in the relaxed sample (appendix D.2.4): then
    E[∇ⁿc(z)] = ∇ⁿE[c(z)], and MagicBox(l) c(z̃) is an any-order estimate of the same expectation.
    A kink on a path from σ_λ(z) to the cost (ReLU, clamp, abs, max...) breaks the interchange from
    order 2 on (autograd reports 0 for its delta): ``storch.surrogate_loss(order >= 2)`` then raises
    ``storch.OrderError`` (``storch.extending.require_smooth``). A jump there (round, sign, floor) breaks it
    from order 1 on (η ∇f(σ_λ(z)) misses its delta; f(b) itself may be fine): refused at order 1 too,
    checked at the first step of each plate and cost name. That check records a kink too: the order-1
    surrogate differentiated twice through it (``create_graph=True``, ``torch.autograd.functional.hessian``)
    raises ``storch.OrderError`` as order 2 does. Use a smooth activation (softplus, GELU, SiLU, tanh),
    order 1 (for a kink), or a score-family estimator.

    With ``plain_direct_gradient=True`` the plate holds 5 blocks: also ⊥σ_λ(z), ⊥σ_λ(z̃) (the same points,
    detached), and a adds -(c(⊥σ_λ(z)) - ⊥c(z)) + (c(⊥σ_λ(z̃)) - ⊥c(z̃)): 0 in value, it cancels the control
    variate's derivatives along the cost's direct paths, so a parameter the cost reads directly (a decoder,
    log q) gets the plain ∇f(b) (Tucker et al.'s), without η (∇f(σ_λ(z)) - ∇f(σ_λ(z̃))), zero-mean noise that
    is uncorrelated with ∇f(b). max_order: ∞ as above: the added term's derivatives are F(⊥σ_λ(z̃)) - F(⊥σ_λ(z))
    for one function F, and z̃ has z's law. A cost that reads the node through a stochastic node sampled from
    its entries keeps the 3-block form (that node draws anew for the ⊥ blocks; docs/estimators/rebar.md).

    λ (as log λ) and η are trained by ``storch.backward()`` to minimise the variance of
    ∂loss/∂(distribution parameters) (Adam, ``lr``, one step in ``update_parameters``);
    ``update=False`` leaves ``est.parameters()`` to you. The components are shared with ``relax``
    (``storch_relaxed._relaxed_cost``), which adds a learned residual to c.

    Args:
        plate: name of the node's plate (its size is 3 n; 5 n with ``plain_direct_gradient``).
        n_samples: number of real samples n.
        temperature: initial λ > 0.
        eta: initial η.
        lr: Adam learning rate of the variance-minimising update.
        update: whether ``storch.backward()`` trains λ and η.
        categorical: ``"refuse"`` (the default) or ``"one_hot"``: take a Categorical node too, handing out
            one-hot vectors (and relaxed ones) of shape ``(..., K)`` for it, not indices.
        max_chain_entries: the most entries per data point of a chain of relaxed nodes: this node's 3 n times
            the sizes of the plates of the REBAR / RELAX nodes with relaxed blocks it depends on (each is
            sampled for every entry upstream, the relaxed ones included, so M chained nodes hold (3 n)^M).
            Above it the node is refused (``storch.PlateError``) before its draw; default 32768 (see ``relax``).
        plain_direct_gradient: give the parameters the cost reads directly the plain ∇f(b) (5 blocks of n
            entries; see above); fixed at construction.

    Example:
        >>> est = storch.estimator("rebar", plate="b", temperature=0.5)
        >>> b = est(Bernoulli(logits=theta))
        >>> storch.add_cost(((b - 0.45) ** 2).sum())

    References:
        [1] REBAR: Low-variance, unbiased gradient estimates for discrete latent variable models (Tucker et al., 2017)
        [2] Backpropagation through the Void (Grathwohl et al., 2018)
    """

    name = "rebar"
    distributions = DEFAULT_DISTRIBUTIONS  # a Categorical only with categorical="one_hot" (_categorical)

    def __init__(self, plate: str, n_samples: int = 1, temperature: float = 0.5, eta: float = 1.0,
                 lr: float = 1e-2, update: bool = True, categorical: str = "refuse",
                 max_chain_entries: int = MAX_CHAIN_ENTRIES, plain_direct_gradient: bool = False) -> None:
        super().__init__(plate, n_samples)
        self._init_plain_direct_gradient(plain_direct_gradient)
        self._init_chain_limit(max_chain_entries)
        self.categorical = categorical
        self._init_relaxed_cost(temperature, eta)
        self._init_training(lr, update)
