"""RELAX: REBAR's relaxed-cost control variate plus a learned residual network, for discrete nodes."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from storch import Node, OptionError, PlateError, PlateTensor
from storch.extending import align

from ._categorical import DEFAULT_DISTRIBUTIONS
from ._network import evaluate_network, flat
from ._relaxed_cost import MAX_CHAIN_ENTRIES, RelaxedCost

__all__ = ["Relax"]

_FORMS = ("rebar+network", "network")


class Relax(RelaxedCost):
    """RELAX: the score function with c_φ(z) = η f(σ_λ(z)) + r_ρ(z), η, λ and ρ learned.

    Components (paper, appendix D.2.4; Grathwohl et al. 2018, §3.3 and their discrete experiments):
        q(X | x<i): per real sample, z reparameterised (Logistic(α, 1) for Bernoulli, log p + Gumbel
            for categoricals), b = H(z) (an exact sample), z̃ ~ p(z | b) reparameterised; the node's
            plate holds 3 blocks of n entries: b, σ_λ(z) and σ_λ(z̃), so that user code evaluates the
            cost f at the relaxed inputs too (as ``rebar``);
        w = 1/n on the b block, 0 on the relaxed blocks (evaluation only);
        l(x) = log p(b | x<i) on the b block;
        a(x<i, X) = c_φ(z) - ⊥c_φ(z) - MagicBox(l) c_φ(z̃) + ⊥c_φ(z̃) on the b block, with
            c_φ(z) = η f(σ_λ(z)) + r_ρ(z): REBAR's relaxed cost (η × the live cost estimate at the
            relaxed entry) plus a learned residual network r_ρ on z.

    With ``control_variate="network"``, c_φ(z) = r_ρ(z) only: no relaxed entries (the plate has
    n entries, user code receives b only, and the cost need not be defined on relaxed inputs).

    First order: ∇ = (f(b) - c_φ(z̃)) ∇l + ∇c_φ(z) - ∇c_φ(z̃), Grathwohl et al.'s RELAX (Eq. 6).

    Note (paper vs. math): appendix D.2.4 writes the z̃ part as -c_φ(z̃) + (2 - MagicBox(l)) ⊥c_φ(z̃).
    Its first derivative is the same, but its second derivative misses the cross terms
    ∇l ∇c_φ(z̃)ᵀ + ∇c_φ(z̃) ∇lᵀ of ∇²E[c_φ(z̃)] (z̃ depends on θ through b AND through the
    conditional reparameterisation), so it is biased at order 2. We use -MagicBox(l) c_φ(z̃) +
    ⊥c_φ(z̃) (``storch_relaxed._network.tilde_term``): evaluates to 0, and all its derivatives are
    those of the DiCE estimate MagicBox(l) c_φ(z̃) of E[c_φ(z)], so the control variate is zero in
    expectation at every order. ``tests/relaxed/test_relaxed_unbiased.py`` checks both forms.

    User code receives, on the b block, b: 0/1 for Bernoulli, a one-hot vector for
    OneHotCategorical, the index for a Categorical with ``control_variate="network"``; on the
    relaxed blocks, points in (0, 1) or on the simplex.

    Requires: Bernoulli or OneHotCategorical, or a Categorical with ``control_variate="network"`` (or
    with ``categorical="one_hot"``); a cost defined and differentiable on relaxed inputs (for the
    control variate only; not with ``control_variate="network"``). With the relaxed-cost term a
    Categorical is refused by default (``storch.UnsupportedDistributionError``): the relaxed entries
    cannot be integer indices, so its node would hand out one-hot vectors where every other estimator
    hands out the index, and a cost written for the index would silently be another one. Pass
    ``OneHotCategorical`` (the same parameters) instead.

    max_order: ∞ for a cost and network n times differentiable in the relaxed sample (appendix D.2.4,
    with the correction above): then E[∇ⁿc_φ(z)] = ∇ⁿE[c_φ(z)], and MagicBox(l) c_φ(z̃) is an any-order
    estimate of the same. A kink (ReLU, clamp, abs, max...) on a path from σ_λ(z) to the cost, or from
    z to a user ``network=``'s output, breaks the interchange from order 2 on (autograd reports 0 for
    its delta): ``storch.surrogate_loss(order >= 2)`` then raises ``storch.OrderError``
    (``storch.extending.require_smooth``). A jump there (round, sign, floor) breaks it from order 1 on:
    refused at order 1 too, checked at the first step of each plate and cost name. That check records a
    kink too: the order-1 surrogate differentiated twice through it (``create_graph=True``,
    ``torch.autograd.functional.hessian``) raises ``storch.OrderError`` as order 2 does. Use a smooth
    activation (softplus, GELU, SiLU, tanh), order 1 (for a kink), or a score-family estimator.

    ``plain_direct_gradient=True`` (``"rebar+network"``): the plate holds 5 blocks, and the parameters the cost
    reads directly get the plain ∇f(b), as for ``rebar`` (see there); max_order ∞ as above. r_ρ does not read
    the cost, so it is unchanged; with ``"network"`` the option has no effect.

    η, λ and ρ are trained by ``storch.backward()`` to minimise the variance of ∂loss/∂(distribution
    parameters) (Adam, ``lr``, one step in ``update_parameters``); ``update=False`` leaves
    ``est.parameters()`` to you. The default residual network starts at 0, so an untrained RELAX
    is REBAR. Inputs given at the call, ``est(q, inputs=h)`` (e.g. the observation of a VAE), are
    fed to the residual with z: r_ρ(z, ⊥h); h depends only on x<i, so a stays zero-mean. With
    several costs, the control variate enters once per cost.

    Args:
        plate: name of the node's plate (its size is 3 n, 5 n with ``plain_direct_gradient``, or n with
            ``control_variate="network"``).
        n_samples: number of real samples n.
        control_variate: ``"rebar+network"`` (η f(σ_λ(z)) + r_ρ(z), the default) or ``"network"``
            (r_ρ(z) only).
        network: r_ρ, a module mapping ``(..., F)`` (z with own dims flattened) to ``(...)``;
            default: a tanh MLP with ``hidden`` units, built at the first node: frozen there where η and λ
            are both frozen then (a parent's ``model.requires_grad_(False)`` reaches them, not the layers not
            built yet), unless ``est.network.requires_grad_(True)`` asked otherwise. At order n >= 2 it
            must be n times differentiable (no ReLU; see max_order).
        hidden: hidden width of the default network.
        temperature: initial λ > 0 (``"rebar+network"``).
        eta: initial η (``"rebar+network"``).
        lr: Adam learning rate of the variance-minimising update.
        update: whether ``storch.backward()`` trains η, λ and ρ.
        categorical: ``"refuse"`` (the default) or ``"one_hot"``: with ``"rebar+network"``, take a
            Categorical node too, handing out one-hot vectors (and relaxed ones) of shape ``(..., K)`` for
            it, not indices. ``"network"`` takes a Categorical and hands out its index without it.
        max_chain_entries: with ``"rebar+network"``, the most entries per data point of a chain of relaxed
            nodes: this node's 3 n times the sizes of the plates of the REBAR / RELAX nodes with relaxed blocks
            it depends on (each is sampled for every entry upstream, the relaxed ones included, so M chained
            nodes hold (3 n)^M). Above it the node is refused (``storch.PlateError``) before its draw;
            default 32768 (9 chained nodes of n = 1 run, 10 are refused: 12 s a step, 20 run out of memory);
            a node in no chain is never refused.
        plain_direct_gradient: with ``"rebar+network"``, give the parameters the cost reads directly the plain
            ∇f(b) (5 blocks of n entries; see ``rebar``); fixed at construction.

    Example:
        >>> est = storch.estimator("relax", plate="b")
        >>> b = est(Bernoulli(logits=theta))

    References:
        [1] Backpropagation through the Void (Grathwohl et al., 2018)
        [2] REBAR: Low-variance, unbiased gradient estimates for discrete latent variable models (Tucker et al., 2017)
    """

    name = "relax"
    distributions = DEFAULT_DISTRIBUTIONS  # a Categorical with "network", or categorical="one_hot" (_categorical)

    def __init__(self, plate: str, n_samples: int = 1, control_variate: str = "rebar+network",
                 network: Optional[Callable] = None, hidden: int = 32, temperature: float = 0.5,
                 eta: float = 1.0, lr: float = 1e-2, update: bool = True, categorical: str = "refuse",
                 max_chain_entries: int = MAX_CHAIN_ENTRIES, plain_direct_gradient: bool = False) -> None:
        super().__init__(plate, n_samples)
        if control_variate not in _FORMS:
            raise OptionError(f"relax: control_variate={control_variate!r} is not accepted; use "
                              f"{' or '.join(repr(f) for f in _FORMS)}")
        self.control_variate_form = control_variate
        self.relaxed_cost = control_variate == "rebar+network"
        # "network": the plate holds b only, a Categorical's index (_noise.discrete_with_relaxation)
        self._takes_index = "" if self.relaxed_cost else "control_variate='network'"
        self.categorical = categorical
        self.jump_free = self.relaxed_cost  # "network": the cost is evaluated at b only (see RelaxedCost)
        self._init_plain_direct_gradient(plain_direct_gradient)  # (no effect with "network": c has no cost term)
        self._init_chain_limit(max_chain_entries)
        self._init_network(network, hidden, zero_output=self.relaxed_cost)
        if self.relaxed_cost:
            self._init_relaxed_cost(temperature, eta)
        self._init_training(lr, update)

    def residual(self, node: Node, z: torch.Tensor) -> Optional[torch.Tensor]:
        # r_ρ(z) (or r_ρ(z, h) with inputs h): the learned part of c_φ, one number per (sample, parent entry)
        lead = 1 + len(node.parents)
        if node.inputs is not None:
            z = torch.cat([flat(z, lead), _inputs_like(node, z, lead)], -1)
        return evaluate_network(self.name, self.network, z, lead)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, control_variate={self.control_variate_form!r}"

    def state_options(self) -> dict:
        return {"control_variate": self.control_variate_form}  # (with or without η f(σ_λ(z)): other parameters)


def _inputs_like(node: Node, z: torch.Tensor, lead: int) -> torch.Tensor:
    """The node's inputs h, flattened and broadcast to z's leading dims ``(n, *parents, F_h)``.

    Detached: r_ρ depends on θ only through z, so E[∇ⁿ r_ρ(z, h)] = ∇ⁿ E[r_ρ(z, h)] as for r_ρ(z).
    """
    h = node.inputs
    if type(h) is PlateTensor:
        if any(p not in node.parents for p in h.plates):
            raise PlateError(f"relax: inputs have plates {[p.name for p in h.plates]}, not all among the node's "
                             f"parent plates {[p.name for p in node.parents]}")
        raw = align(h.tensor, h.plates, node.parents)
    elif isinstance(h, torch.Tensor):
        raw = h.reshape((1,) * len(node.parents) + tuple(h.shape))
    else:
        raise OptionError(f"relax: inputs must be a tensor or a PlateTensor, got {type(h).__name__}")
    raw = flat(raw.detach(), lead - 1).to(z.dtype).unsqueeze(0)  # ⊥h (see above)
    return raw.expand(tuple(z.shape[:lead]) + raw.shape[-1:])
