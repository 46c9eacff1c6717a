"""VIMCO: the score function of a multi-sample bound with a baseline per draw (Mnih & Rezende, 2016)."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.distributions import Distribution

import storch
from storch import (CostError, CostFrame, Estimator, Node, PlateError, PlateTensor, StorchError,
                    UnsupportedDistributionError, magic_box)
from storch.extending import (grad_parameters, is_differentiated, leave_one_out_log_baselines, options, step_guard,
                              strict_support, torch_class_hint, unbatched)

__all__ = ["Vimco", "VimcoState"]


@dataclass
class VimcoState:
    """Per-node record of VIMCO (call order: ``gradient_function``, then ``bound``, then ``control_variate``).

    Attributes:
        log_q: log q(z_k) of each draw, shape ``(n, *parents, K)``, with gradient (``gradient_function``).
        bound: the plate tensor :meth:`Vimco.bound` returned (the cost it recognises by identity).
        log_w: the per-draw log-weights it was given, raw and detached, leading dims ``log_w_plates``, then K.
        log_w_plates: the plates of ``log_w``.
        graph: the graph ``bound`` was called in (a weak reference: it looks up the costs there).
    """

    log_q: Optional[torch.Tensor] = None
    bound: Optional[PlateTensor] = None
    log_w: Optional[torch.Tensor] = None
    log_w_plates: tuple = ()
    graph: Any = None


class Vimco(Estimator):
    """VIMCO: score function of a K-draw bound with a leave-one-out baseline per draw (Mnih & Rezende, 2016).

    The node holds ONE set of K i.i.d. draws z_1..z_K of q per sample (``n_samples`` independent sets);
    the model computes the per-draw log-weights log w_k (e.g. log p(x, z_k) - log q(z_k)) and adds
    ``est.bound(log_w)`` = L = -log (1/K Σ_k w_k) as a cost.

    Components:
        q(X | x<i) = n i.i.d. sets of K i.i.d. draws of q (the estimator expands q to K copies);
        w(X) = 1/n per set;
        l(X) = Σ_k l_k, l_k = log q(z_k | x<i) (each summed over q's own batch dims);
        a(x<i, X) = Σ_k (1 - MagicBox(l_k)) ⊥b_k for the cost ``bound`` (the surrogate multiplies it by
        MagicBox of the nodes before: Theorem 2), with b_k the bound with log w_k replaced by
        mean_{j≠k} log w_j (the geometric mean of the other weights; Mnih & Rezende 2016, Eq. 9-10);
        none (plain score-function credit) for other costs that depend on the node.
        The first-order gradient is Σ_k (L - b_k) ∇ l_k + ∇L, ∇L the bound's direct dependence on θ.

    Requires: a distribution with ``expand`` and ``sample``, whose ``log_prob`` gives one value per
    batch entry; the cost ``est.bound(log_w)`` itself (not a function of it), log w of per-sample
    shape (K,) computed from this step's draws (and from data and earlier nodes only).

    max_order: ∞ — b_k is detached and does not depend on z_k (the draws are independent), so
    E_{z_k}[∇^m (1 - MagicBox(l_k))] ⊥b_k = 0 at every order m (appendix C), draw by draw; the rest is
    the score function (appendix D.2.1), unbiased at any order.

    Args:
        plate: name of the node's plate.
        n_draws: K, the draws of one bound (>= 2: each draw's baseline uses the others).
        n_samples: number of independent sets of K draws (the plate size).

    Example:
        >>> est = storch.estimator("vimco", plate="z", n_draws=5)
        >>> z = est(Bernoulli(logits=encoder(x)))            # per-sample shape (5, D)
        >>> log_w = log_joint(x, z) - Bernoulli(logits=encoder(x)).log_prob(z).sum(-1)   # (5,)
        >>> storch.add_cost(est.bound(log_w), name="iwae")

    References:
        [1] Variational Inference for Monte Carlo Objectives (Mnih & Rezende, 2016)
        [2] Importance Weighted Autoencoders (Burda et al., 2016)
        [3] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
    """

    name = "vimco"
    cost_hint = ("A vimco node hands out its K draws as the first per-sample dim of the value it returns: reduce them "
                 "with the bound, storch.add_cost(est.bound(log_w)), log_w holding one log-weight per draw "
                 "(log p(x, z_k) - log q(z_k)), instead of adding a cost per draw")
    partition_hint = ("For one bound over a whole sequence, write the chain as one joint torch Distribution and put "
                      "vimco on that node: each of the K draws is then a whole path (docs/estimators/vimco.md, "
                      "'Several stochastic layers')")
    score_function = True  # l = Σ_k log q(z_k), the joint log-probability of the set
    requires_expand = True  # the K draws are one q.expand((K, *batch_shape)): a q without expand is not supported
    multi_sample_bound = True  # its costs are written with est.bound: generic per-sample harnesses skip it
    State = VimcoState

    def __init__(self, plate: str, n_draws: int = 2, n_samples: int = 1) -> None:
        super().__init__(plate, n_samples)
        self.n_draws = self.check_option("n_draws", n_draws)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "n_draws":
            return options.integer(self.name, "n_draws", value, minimum=2,
                                   what="an int >= 2 (each draw's baseline averages the others)")
        return super().check_option(name, value)

    def forward(self, distribution: Distribution, inputs: Any = None) -> PlateTensor:
        if isinstance(distribution, Distribution):
            try:  # the K copies of q are the node's first own batch dim, after its plates
                distribution = distribution.expand(torch.Size((self.n_draws,)) + distribution.batch_shape)
            except NotImplementedError as e:
                # torch's own reason where it gives one: a subclass of a torch class with an __init__ of its own
                # (class CountOf4(Binomial)) inherits an expand that cannot build it
                name = type(distribution).__name__
                raise UnsupportedDistributionError(
                    f"estimator 'vimco' (plate {self.plate!r}) makes its K={self.n_draws} draws with "
                    f"{name}.expand, which raised NotImplementedError ({e or 'not implemented'}); define "
                    f"{name}.expand{torch_class_hint(type(distribution))}, or use 'score' on a distribution that holds the K copies yourself"
                ) from None
        return super().forward(distribution, inputs)

    def gradient_function(self, node: Node) -> torch.Tensor:
        try:  # strict_support: a Poisson rate of exactly 0 (Poisson(lam * mask)) gets finite derivatives (torch's: NaN)
            lp = strict_support(node.distribution, drawn_only=True).log_prob(node.sample)
        except NotImplementedError:
            lp = None
        want = node.sample.shape[:1] + node.distribution.batch_shape
        if lp is None or lp.shape != want:
            raise UnsupportedDistributionError(
                f"estimator 'vimco' (plate {self.plate!r}) needs log q(z_k) of each draw, but "
                f"{type(node.original).__name__}.log_prob gave "
                f"{'nothing' if lp is None else 'shape ' + str(tuple(lp.shape))} for samples of batch shape "
                f"{tuple(want)}; use a distribution whose log_prob gives one value per batch entry")
        own = node.batch_ndims - 1  # q's own batch dims after the K copies: summed (they are one draw)
        node.state.log_q = lp.sum(tuple(range(-own, 0))) if own else lp
        return node.state.log_q.sum(-1)  # l = Σ_k l_k: the set is one sample

    def bound(self, log_w: torch.Tensor, *, independent_of_q: bool = False) -> torch.Tensor:
        """L = -(logsumexp_k log w_k - log K), the negative multi-sample bound of this step's draws.

        Add the result itself as a cost (``storch.add_cost(est.bound(log_w), name=...)``): that cost
        gets the per-draw baselines. ``log_w`` has per-sample shape (K,): entry k computed from draw k.
        Log-weights that carry no gradient while q's parameters require grad (log q computed in numpy,
        or detached) are refused (``storch.CostError``): they drop the bound's direct term ∇L through
        log q. ``independent_of_q=True`` says they truly do not depend on q's parameters (an objective
        -log mean_k exp f(z_k) of the draws alone, not an importance weight p / q) and skips that check.
        """
        with step_guard():
            graph = storch.current_graph()
            node = graph.partition_of(self)
            if node is None:
                raise StorchError(f"vimco (plate {self.plate!r}): bound() was called before the estimator drew "
                                  "this step's set (z = est(q)), or after the step ended; compute log_w from z")
            if type(log_w) is not PlateTensor or node.plate not in log_w.plates:
                other = [p.name for p in log_w.plates if not p.independent] if type(log_w) is PlateTensor else []
                raise PlateError(
                    f"vimco (plate {self.plate!r}): the log-weights passed to bound() do not come from this step's "
                    f"draws of plate {self.plate!r} (their sample plates: {other}); compute log_w from the value "
                    "that est(q) returned in this step, one entry per draw")
            if tuple(log_w.shape) != (self.n_draws,) or not log_w.is_floating_point():
                raise CostError(
                    f"vimco (plate {self.plate!r}): bound() needs the log-weights as floats of per-sample shape "
                    f"({self.n_draws},), one per draw, got {tuple(log_w.shape)} {log_w.dtype}; reduce each draw's "
                    "log p(x, z_k) - log q(z_k) over its own dims first" + _shape_hint(log_w, self.n_draws))
            later = [p.name for p in log_w.plates if (o := graph.node_of(p.name)) is not None and o.index > node.index]
            if later:
                # b_k would depend on z_k through the later nodes' samples: not a baseline
                raise PlateError(
                    f"vimco (plate {self.plate!r}): the log-weights depend on nodes sampled after it ({later}); "
                    "the bound may depend only on the draws, the data and earlier nodes. For a posterior of several "
                    "layers, write the layers as one torch Distribution of the joint and put vimco on that one node "
                    "(docs/estimators/vimco.md, 'Several stochastic layers'); or make the K draws one sample of "
                    "Categorical / Bernoulli parameters expanded to (K, ...) under 'score' (leave_one_out), with the "
                    "later nodes below it, and add the bound -(logsumexp(log_w, 0) - log K) as an ordinary cost")
            if node.state.bound is not None:
                raise StorchError(f"vimco (plate {self.plate!r}): bound() was already called in this step; a set "
                                  "of draws has one bound (add it once, or use one estimator per bound)")
            if not independent_of_q:
                _check_log_q_in_log_w(self.plate, node, log_w)
            value = -(torch.logsumexp(log_w, -1) - math.log(self.n_draws))
            s = node.state
            s.bound, s.log_w, s.log_w_plates = value, log_w.tensor.detach(), log_w.plates  # ⊥: b_k is a constant
            s.graph = weakref.ref(graph)
            return value

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        s = node.state
        graph = s.graph() if s.graph is not None else None
        costs = graph.costs if graph is not None else []
        names = {name for name, c in costs if c is s.bound}
        if not names:
            raise StorchError(
                f"vimco (plate {self.plate!r}): cost {cost.name!r} depends on the draws, but "
                + ("est.bound(log_w) was not called in this step" if s.bound is None else
                   "the value est.bound(log_w) returned was not added as a cost")
                + "; add it itself, storch.add_cost(est.bound(log_w), name=...), and other terms as costs of "
                "their own (a function of the bound gets no per-draw baselines)")
        if cost.name not in names:
            return None  # another cost: plain score-function credit
        if any(name == cost.name and c is not s.bound for name, c in costs):
            raise CostError(f"vimco (plate {self.plate!r}): the bound shares its cost name {cost.name!r} with "
                            "another cost; give it a name of its own")
        b = leave_one_out_log_baselines(s.log_w)  # Eq. 9-10, detached (bound() kept ⊥log w); O(K) per set
        l_k = cost.align(s.log_q, node.plates)
        # Σ_k (1 - MagicBox(l_k)) ⊥b_k: zero-mean at every order, as b_k does not depend on z_k (appendix C)
        return ((1.0 - magic_box(l_k)) * cost.align(b, s.log_w_plates)).sum(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, n_draws={self.n_draws}"


def _check_log_q_in_log_w(plate: str, node: Node, log_w: PlateTensor) -> None:
    """Refuse log-weights that carry no gradient while q's parameters do (grad mode on).

    log w_k = log p(x, z_k) - log q(z_k) depends on q's parameters through log q: the bound's direct
    dependence on them (∇L) is part of VIMCO's gradient. Log-weights computed outside torch (log q in numpy,
    or detached) drop it, and the gradient is biased without a sign; refused here. (A log q detached while
    log p keeps a gradient is not seen: log_w then requires grad.)"""
    if not torch.is_grad_enabled() or is_differentiated(unbatched(log_w.tensor)):
        return
    if next(grad_parameters(node.distribution), None) is None:
        return  # nothing of q is trained: no direct term to lose
    raise CostError(
        f"vimco (plate {plate!r}): the log-weights passed to bound() carry no gradient, but the distribution of "
        f"the draws ({type(node.distribution).__name__}) has parameters that require grad. VIMCO's gradient "
        "includes the bound's direct dependence on them through log q(z_k) in log w_k = log p(x, z_k) - "
        "log q(z_k); without it the gradient is biased. Compute log q in torch from the distribution passed to "
        "est(q): log_w = storch.PlateTensor(torch.as_tensor(log_p), z.plates) - q.log_prob(z).sum(-1), where "
        "log_p may come from outside torch (numpy, a simulator); do not detach log q or compute it in numpy. "
        "Log-weights that truly do not depend on q's parameters (a multi-sample objective of the draws alone, "
        "not an importance weight p / q): est.bound(log_w, independent_of_q=True)")


def _shape_hint(log_w: PlateTensor, k: int) -> str:
    """What a log-weight of more than one dim usually means (the message of a wrong shape)."""
    if log_w.dim() < 2 or log_w.shape[0] != k:
        return ""
    return (f". Log-weights of shape {tuple(log_w.shape)}: if a dim after the {k} draws is a minibatch, put the batch on "
            "a data plate (x = storch.denote_independent(x, 0, 'data')) and write the model for one data point: "
            "summing over it would make one bound of the whole batch, not one per data point. vimco makes the K "
            "copies of q itself: pass q of one draw (not logits.expand(K, ...))")
