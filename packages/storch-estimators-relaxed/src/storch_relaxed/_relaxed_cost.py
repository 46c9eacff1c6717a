"""What REBAR and RELAX share: the conditional relaxation z, b = H(z), z̃ ~ p(z | b), and the
control variate c(z) - ⊥c(z) - MagicBox(l) c(z̃) + ⊥c(z̃) with REBAR's relaxed-cost term
η f(σ_λ(z)) (Tucker et al. 2017), to which RELAX adds a learned residual r_ρ (Grathwohl et al. 2018).

With the relaxed-cost term, the node's plate holds 3 blocks of n entries: b, σ_λ(z) and σ_λ(z̃)
(σ_λ(z) = σ(z/λ), or softmax(z/λ) for categoricals), so that user code evaluates the cost f at
the relaxed inputs too; only the b block is weighted (1/n), the relaxed blocks are evaluation only.

With ``plain_direct_gradient=True`` it holds 5 blocks: also ⊥σ_λ(z) and ⊥σ_λ(z̃), the same points detached,
where the cost has only its direct paths (its own parameters: a decoder, log q). The control variate then
subtracts c(⊥σ_λ(z)) - ⊥c(z) and adds c(⊥σ_λ(z̃)) - ⊥c(z̃) (:meth:`RelaxedCost.control_variate`): its derivatives
in a parameter the cost reads only directly are exactly 0 (that parameter gets the plain ∇f(b), Tucker et al.'s),
those through the sample are REBAR's, and it stays zero-mean at every order (z and z̃ have the same law).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch.distributions import Bernoulli

from storch import CostFrame, Node, PlateError, current_graph
from storch.extending import base_distribution, options, require_smooth

from ._categorical import OneHotForCategorical
from ._blocks import block, blocks_weights, pad_blocks
from ._network import (
    NETWORK_THROUGH, NETWORK_WHAT, RELAXED_THROUGH, SMOOTH_INSTEAD, cost_what, order_1_kinks, refuse_twice_on_kinks,
    smooth_network, smooth_who, smoothness_checked, smoothness_due, tilde_term,
)
from ._noise import discrete_with_relaxation
from ._params import param_tensors, sample_log_prob
from ._precision import to_model
from ._variance_trained import VarianceTrained

__all__ = ["RelaxedCost", "MAX_CHAIN_ENTRIES"]

# A relaxed-cost node's plate holds 3 n entries (b, σ_λ(z), σ_λ(z̃)), and a node downstream of it is sampled for
# every one of them, the relaxed ones included: along a chain of such nodes the entries per data point grow as
# (3 n)^M. Measured (Bernoulli, batch 16, 8 values, n = 1, CPU): relax 4.8 ms a step at M = 1, 35 ms at 4,
# 154 ms at 6, 1.3 s at 8 (6561 entries), 12 s at 10, out of memory (23 GB) at 20; rebar 201 ms at 7. The
# default refuses a node downstream of another relaxed node whose chain would exceed 32768 entries per data
# point: 9 chained nodes of n = 1 (19683) or two of n = 32 (9216: 0.05 s a step, review r-thirteen) still run,
# 10 of n = 1 (59049: 12 s a step) are refused before their samples are drawn. A node that depends on no
# earlier relaxed node is never refused (its 3 n entries grow linearly: n = 2000 alone took 0.17 s).
MAX_CHAIN_ENTRIES = 32768


class RelaxedCost(OneHotForCategorical, VarianceTrained):
    """Base of ``rebar`` and ``relax``: c(z) = [η f(σ_λ(z))] + [r_ρ(z)], λ, η (and ρ) learned.

    Subclasses set ``self.relaxed_cost`` (whether c has the η f(σ_λ(z)) term) and may override
    :meth:`residual` (r_ρ, none by default). With the relaxed-cost term a Categorical node hands out
    one-hot vectors, so it is taken only with ``categorical="one_hot"`` (:mod:`storch_relaxed._categorical`).
    """

    relaxed_cost: bool = True
    plain_direct_gradient: bool = False  # the ⊥σ_λ(z), ⊥σ_λ(z̃) blocks (see the module's docstring)
    # (in neither state_options() nor evolution_options(): η, λ and their moments mean the same in both forms, and
    # under torch.distributed their step is the ranks' mean with one lr, so ranks that differ hold one φ)
    # the cost is differentiated at σ_λ(z): a comparison of the relaxed sample (m > 0.5) makes it jump,
    # and η ∇f(σ_λ(z)) misses the jump's delta (refused: storch.Estimator.jump_free)
    jump_free: bool = True
    _tilde_term = staticmethod(tilde_term)

    fixed_options = {
        **VarianceTrained.fixed_options,
        "temperature": "it is the initial value of λ, a parameter (log_temperature) trained from then on; set "
                       "est.log_temperature.data instead to move the trained value",
        "plain_direct_gradient": "it decides the node's plate layout (3 or 5 blocks of n entries) at construction; "
                                 "create another estimator for the other form",
        "eta": "it is the initial value of η, a parameter (eta) trained from then on; set est.eta.data instead to move "
               "the trained value",
    }

    def _init_chain_limit(self, max_chain_entries: int) -> None:
        self.max_chain_entries = options.integer(self.name, "max_chain_entries", max_chain_entries, minimum=1)

    def _check_chain(self, node: Node) -> None:
        """Refuse a chain of relaxed-cost nodes whose entries per data point would exceed ``max_chain_entries``.

        The plates counted are this node's (3 n) and those of the parents that hold evaluation-only entries
        (``Lineage.evaluation_from``: REBAR's and RELAX's relaxed blocks). Called before the draw: the node's
        distribution is the size of its parents' entries, the draw would be 3 n times that.
        """
        size = self.blocks * self.n_samples
        chain = [p for p in node.parents if not p.independent and p.lineage is not None
                 and p.lineage.evaluation_from is not None]
        if not chain:  # not in a chain: a node's own 3 n entries grow linearly (a large n_samples is the user's)
            return
        entries = size * math.prod(p.size for p in chain)
        if entries <= self.max_chain_entries:
            return
        upstream = ", ".join(f"{p.name!r} ({p.size})" for p in chain)
        raise PlateError(
            f"{self.name} (plate {self.plate!r}): this node would hold {entries} entries per data point: its plate "
            f"holds {self.blocks} blocks of n_samples={self.n_samples} ({self._block_names()}), {size} entries, and it depends on "
            f"{len(chain)} earlier relaxed node(s) whose plates hold such blocks too ({upstream}). Each node is "
            f"sampled for every entry of the plates it depends on, the relaxed ones included, so every relaxed node "
            f"of a chain multiplies the entries downstream by {self.blocks} n (({self.blocks} n)^M for M chained nodes), here more than "
            f"max_chain_entries={self.max_chain_entries}. Time and memory grow with it (a chain of 8 Bernoulli "
            f"nodes with n_samples=1: 1.3 s a step, of 10: 12 s; of 20: out of memory). Use relax with control_variate='network' "
            f"(a plate of n entries, no relaxed blocks), a score-function estimator with a baseline "
            f"(storch.estimator('score', plate=..., baseline='moving_average')) for the inner nodes, or fewer "
            f"chained relaxed nodes; or pass a larger max_chain_entries if the step fits in time and memory "
            f"(docs/estimators/relax.md, \"Chained nodes\")")

    def _block_names(self) -> str:
        return "b, σ_λ(z), σ_λ(z̃)" + (", ⊥σ_λ(z), ⊥σ_λ(z̃)" if self.blocks == 5 else "")

    def _init_plain_direct_gradient(self, plain_direct_gradient: bool) -> None:
        self.plain_direct_gradient = options.flag(self.name, "plain_direct_gradient", plain_direct_gradient)

    def _init_relaxed_cost(self, temperature: float, eta: float) -> None:
        options.number(self.name, "temperature", temperature, above=0, finite=True)
        options.number(self.name, "eta", eta, finite=True)
        # λ as log λ (positive), η: trained with the rest of c by update_parameters (Tucker et al., §3.3)
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float64))
        self.eta = torch.nn.Parameter(torch.tensor(float(eta), dtype=torch.float64))

    @property
    def blocks(self) -> int:
        if not self.relaxed_cost:
            return 1
        return 5 if self.plain_direct_gradient else 3

    @property
    def uniform_weights(self) -> bool:
        return not self.relaxed_cost

    def proposal(self, node: Node) -> torch.Tensor:
        d = base_distribution(node.distribution)
        if self.relaxed_cost:
            self._check_chain(node)  # before the draw: a chain of relaxed nodes multiplies its entries by 3 n
        s = node.state
        s.params = param_tensors(node.distribution)
        s.z, s.b, hard, s.z_tilde = discrete_with_relaxation(d, self.n_samples)
        if not self.relaxed_cost:
            return s.b
        lam = self.log_temperature.clone().exp().to(s.z)  # z's dtype and device  # clone: see _network.param_clones
        if isinstance(d, Bernoulli):
            soft, soft_tilde = torch.sigmoid(s.z / lam), torch.sigmoid(s.z_tilde / lam)
        else:
            soft, soft_tilde = torch.softmax(s.z / lam, -1), torch.softmax(s.z_tilde / lam, -1)
        # z, z̃ are float32 for a float16 / bfloat16 model (the noise's precision, _precision): the cost reads
        # the relaxations in the model's dtype, as b
        soft, soft_tilde = to_model(soft, hard.dtype), to_model(soft_tilde, hard.dtype)
        s.relaxed = (soft, soft_tilde)  # what the cost is differentiated through (require_smooth: smoothness_due)
        entries = [hard, soft, soft_tilde]  # b (one-hot for categoricals), σ_λ(z), σ_λ(z̃)
        if self.blocks == 5:
            # ⊥σ_λ(z), ⊥σ_λ(z̃): detached from θ, λ (and upstream samples), so the cost there differentiates
            # only along its direct paths, which the control variate cancels (plain_direct_gradient)
            entries += [soft.detach(), soft_tilde.detach()]
        return torch.cat(entries, 0)

    def weighting_function(self, node: Node) -> torch.Tensor:
        if not self.relaxed_cost:
            return super().weighting_function(node)
        return blocks_weights(node, self.n_samples, self.blocks)

    def evaluation_from(self, node: Node) -> Optional[int]:
        # the relaxed blocks σ_λ(z), σ_λ(z̃) are the control variate's evaluation points: a user's gradient hook
        # leaves their gradient alone (its pathwise part must stay the derivative of c's value, read from them)
        return self.n_samples if self.relaxed_cost else None

    score_function = True  # l = log p(b), padded to the blocks

    def gradient_function(self, node: Node) -> torch.Tensor:
        node.state.l = sample_log_prob(node, node.state.b)  # l on the b block (float32 inside for bfloat16)
        return pad_blocks(node.state.l, self.blocks)

    def residual(self, node: Node, z: torch.Tensor) -> Optional[torch.Tensor]:
        """r_ρ(z) per entry, shape ``(n, *parents)``; ``None`` for no residual (REBAR)."""
        return None

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        n, s = self.n_samples, node.state
        c_z: Optional[torch.Tensor] = None
        c_zt: Optional[torch.Tensor] = None
        direct: Optional[tuple] = None  # η f(⊥σ_λ(z)), η f(⊥σ_λ(z̃)) (plain_direct_gradient)
        # the cost at σ_λ(z) (and the network at z) with derivatives of order < n continuous there: a jump
        # matters from order 1 on, a kink from order 2 on (checked at order 1 once per plate and cost name)
        check = smoothness_due(self, node, cost)
        # at order 1 a kink is not refused, but the order-1 surrogate differentiated twice through it is biased:
        # the outputs where the (once per plate and cost name) check found one are hooked at every step
        found = {} if check else order_1_kinks(self, node, cost)
        if self.relaxed_cost:
            live = cost.live()  # with its graph: c must be differentiable in θ, λ, η
            if check:
                found["cost"] = require_smooth(live, s.relaxed, cost.order, who=smooth_who(self, node),
                                               what=cost_what(cost), through=RELAXED_THROUGH, instead=SMOOTH_INSTEAD)
            if found.get("cost"):
                refuse_twice_on_kinks(self, node, cost_what(cost), RELAXED_THROUGH, found["cost"], live)
            eta = self.eta.clone().to(live)  # live's dtype and device  # clone: see _network.param_clones
            c_z, c_zt = eta * block(live, cost, n, 1), eta * block(live, cost, n, 2)  # η f(σ_λ(·))
            if self.blocks == 5 and not _sampled_from(node, cost):
                # η f(⊥σ_λ(·)): the same values, derivatives along the cost's direct paths only
                direct = (eta * block(live, cost, n, 3), eta * block(live, cost, n, 4))
        r_z, r_zt = self.residual(node, s.z), self.residual(node, s.z_tilde)
        if r_z is not None:
            if check:
                found["network"] = smooth_network(self, node, cost.order, r_z, s.z, r_zt, s.z_tilde)
            if found.get("network"):
                refuse_twice_on_kinks(self, node, NETWORK_WHAT, NETWORK_THROUGH, found["network"], r_z, r_zt)
            r_z, r_zt = cost.align(r_z), cost.align(r_zt)
            c_z = r_z if c_z is None else c_z + r_z
            c_zt = r_zt if c_zt is None else c_zt + r_zt
        if check:
            smoothness_checked(self, node, cost, found)
        if c_z is None:
            return None
        # Grathwohl et al. 2018, Eq. 6 in Storchastic's form (appendix D.2.4, see tilde_term):
        # a = c(z) - ⊥c(z) - MagicBox(l) c(z̃) + ⊥c(z̃), which evaluates to 0
        a = c_z - c_z.detach() + self._tilde_term(c_zt, cost.align(s.l))
        if direct is not None:
            d_z, d_zt = direct
            # plain_direct_gradient: - (c(⊥σ_λ(z)) - ⊥c(z)) + (c(⊥σ_λ(z̃)) - ⊥c(z̃)) evaluates to 0, and cancels the
            # direct-path derivatives of c(z) and MagicBox(l) c(z̃) above (MagicBox(l) = 1, free of the cost's
            # own parameters): a parameter the cost reads only directly gets ∇f(b) alone. Zero-mean at every order:
            # its derivatives are F(⊥σ_λ(z̃)) - F(⊥σ_λ(z)) for one function F, and z̃ has z's law
            a = a - (d_z - d_z.detach()) + (d_zt - d_zt.detach())
        return pad_blocks(a, self.blocks, cost.dim)


def _sampled_from(node: Node, cost: CostFrame) -> bool:
    """Whether ``cost`` reads a stochastic node sampled from this node's entries (its parents hold the node's plate).

    That node draws anew for the ⊥ blocks, so f(⊥σ_λ(z)) is not f(σ_λ(z)) with its sample paths cut: its direct
    derivatives differ from those of f(σ_λ(z)) by the later draws' noise, and subtracting them would add that noise
    where it was to remove some. Such a cost keeps the 3-block control variate (plain_direct_gradient leaves it).
    A node whose estimator draws nothing (``deterministic_proposal``: ``expect``) is not such a node: its values at
    a ⊥ entry are those at the entry it copies, so the cost read through it is a deterministic function of the
    sample as any other (a node sampled from that node's entries is still found: its parents hold this plate too).
    """
    graph, own = current_graph(), node.plate.name
    for p in cost.plates:
        if p.independent or p.name == own:
            continue
        later = graph.node_of(p.name)
        if later is not None and not later.estimator.deterministic_proposal and any(q.name == own for q in later.parents):
            return True
    return False
