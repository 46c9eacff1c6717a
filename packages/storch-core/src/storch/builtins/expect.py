"""Exact enumeration of a finite discrete node."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.distributions import Categorical, OneHotCategorical

from ..distributions import enumeration_support
from ..estimators import validators
from ..errors import UnsupportedDistributionError
from ..estimators.base import Estimator
from ..estimators.first_steps import _float_dtype
from .._util.table_cache import table_cache
from ..graph import is_tracing
from ..graph.node import Node

__all__ = ["Expect"]


@dataclass
class ExpectState:
    """Per-node record of ``expect``: ``lp``, log p of each enumerated joint value per parent entry,
    shape ``(K^n, *parents)``, with gradient; ``-inf`` for a value the distribution never draws."""

    lp: Optional[torch.Tensor] = None


class Expect(Estimator):
    """Exact expectation by enumerating every joint value of the node (appendix D.1).

    Components:
        q(X | x<i) = δ over all joint values of the node's batch dims (K^n of them);
        w(x) = p(x | x<i), carrying gradient (0 with derivative 0 for a value of probability 0,
        whose entry holds a possible value instead: the cost is never evaluated on a value the
        distribution cannot draw, and an infinite cost there does not make the estimate NaN);
        l(x) = 0;
        a = 0.

    Requires: a distribution with ``enumerate_support`` (Bernoulli, Categorical,
    OneHotCategorical, Binomial, ...); K^n <= ``budget``. A ``Binomial`` whose ``total_count``
    differs between plate entries (a count per data point) is enumerated over 0..max(total_count),
    the counts above an entry's own total weighed 0 there.

    max_order: ∞ — condition 3 of Theorem 1 holds because Σ_x p(x) = 1 is constant (D.1).

    Args:
        plate: name of the node's plate (its size is K^n).
        budget: the largest number of joint values enumerated before raising an error.

    Example:
        >>> est = storch.estimator("expect", plate="z")
        >>> z = est(torch.distributions.Bernoulli(logits=theta))

    References:
        [1] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
    """

    name = "expect"
    aliases = ("enumerate",)
    requires_enumerate_support = True
    deterministic_proposal = True  # q is a δ over the support: nothing is drawn
    State = ExpectState
    fixed_options = {"n_samples": "expect enumerates every value of the support (its plate holds all of them, "
                                  "whatever n_samples is); `budget` caps how many"}

    def __init__(self, plate: str, budget: int = 4096) -> None:
        super().__init__(plate, 1)
        self.budget = self.check_option("budget", budget)

    def check_option(self, name: str, value: Any) -> Any:
        if name == "budget":
            return validators.integer("expect", "budget", value, minimum=1)  # NumPy's integers too, as an int
        return super().check_option(name, value)

    def proposal(self, node: Node) -> torch.Tensor:
        d = node.distribution  # (probabilities of exactly 0 have log p = -inf: estimators.first_steps._sample_node)
        # (K, 1, ..., 1, *event); a Binomial's total_count per data point: 0..max, -inf above an entry's own
        support = enumeration_support(d)
        k = support.shape[0]
        values = support.reshape((k,) + tuple(d.event_shape))
        own = tuple(d.batch_shape[len(node.parents):])
        n = math.prod(own)
        if k ** n > self.budget:
            raise UnsupportedDistributionError(_over_budget(self, node, k, own))
        joint = values[_joint_indices(k, n, values.device)].reshape((k ** n,) + own + tuple(d.event_shape))
        lead = (k ** n,) + (1,) * len(node.parents)
        joint = joint.reshape(lead + joint.shape[1:])
        sample = joint.expand((k ** n,) + tuple(d.batch_shape) + tuple(d.event_shape))
        lp = _categorical_log_probs(d, len(node.parents), n, k)
        if lp is None:
            lp = node.log_prob(sample)
        node.state.lp = lp  # (K^n, *parents)
        never = torch.isneginf(lp)
        if not is_tracing() and (lp.is_meta or not bool(never.any())):
            return sample  # every value possible (the common case): one expanded view of the values
        # an entry with impossible values holds its most probable value in their places (weight 0):
        # the user's cost only ever sees values the distribution can draw
        m = len(node.parents)
        rows = torch.arange(k ** n, device=lp.device).reshape((k ** n,) + (1,) * m)
        idx = torch.where(never, lp.detach().argmax(0, keepdim=True), rows)  # (K^n, *parents)
        idx = idx.reshape(idx.shape + (1,) * (sample.dim() - 1 - m))  # over the own batch and event dims
        return sample.gather(0, idx.expand(sample.shape))

    def weighting_function(self, node: Node) -> torch.Tensor:
        # w(x) = p(x): the probability of each joint value, WITH gradient (appendix D.1); 0 on impossible values
        lp = node.state.lp
        if lp.dtype is torch.float16 or lp.dtype is torch.bfloat16:  # (a model under autocast, or .bfloat16())
            # Σ_x p(x) C(x) rounded each p(x)'s gradient C(x) to lp's dtype before log p's backward summed them:
            # in bfloat16 a cost of 300 gave exactly ±0.375. p(x) - ⊥p(x) (S - ⊥S), S = Σ_x p(x): the same values,
            # and derivatives at every order (S is 1, ∇S = 0), but each p(x) receives C(x) - E[C], in float32
            p = lp.float().exp()
            s = p.sum(0, keepdim=True)
            return p - p.detach() * (s - s.detach())
        return lp.exp()

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        # an impossible value's entry holds the most probable value instead, with log p = -inf (weight 0: proposal)
        return torch.isneginf(node.state.lp.detach())

    def gradient_function(self, node: Node) -> torch.Tensor:
        return torch.zeros((1,), dtype=_float_dtype(node), device=node.sample.device)


# joint values past which enumeration is out of reach whatever the budget: each one is a cost evaluation,
# and the table of values alone is k^n · n integers (10^8 values of 20 variables: 16 GB)
_ASTRONOMICAL = 10 ** 8
_MINIBATCH = 8  # a first batch dim at least this large, with no data plate, may be a minibatch


def _over_budget(est: "Expect", node: Node, k: int, own: tuple) -> str:
    """The message when the k^n joint values of the node's own batch dims ``own`` exceed the budget:
    advice that can help with this node (raising the budget cannot for 10^20 values)."""
    n = math.prod(own)
    msg = (f"expect: enumerating {k}^{n} = {k ** n} joint values of plate {est.plate!r} exceeds the budget of "
           f"{est.budget}")
    data = any(p.independent for p in node.parents)
    per_point = k ** (n // own[0]) if own and own[0] else k ** n
    if not data and own and own[0] >= _MINIBATCH and per_point <= est.budget:
        # the batch dims are the node's own variables, enumerated jointly: a minibatch left there multiplies
        # the count by k per data point, while on a data plate each point is enumerated on its own
        rest = n // own[0]
        msg += (f". No data plate was denoted, so every batch dim of the distribution (shape {own}) is a variable "
                f"of this one node. If dim 0 (size {own[0]}) holds independent data points, it belongs on a data "
                "plate: `x = storch.denote_independent(x, 0, 'data')` on the input before the distribution is "
                f"computed from it; expect then enumerates {k}^{rest} = {per_point} values per data point")
        return msg + (". Otherwise use a sampling estimator (such as 'unordered_set' or 'score')"
                      if k ** n > _ASTRONOMICAL else
                      ". Otherwise raise `budget`, split the node into several nodes, or use a sampling estimator")
    if k ** n > _ASTRONOMICAL:
        return msg + ("; that many values cannot be enumerated whatever the budget: use a sampling estimator "
                      "(such as 'unordered_set', which samples without replacement, or 'score') instead")
    return msg + "; raise `budget`, split the node into several nodes, or use a sampling estimator"


def _categorical_log_probs(d, m: int, n: int, k: int) -> Optional[torch.Tensor]:
    """log p of every joint value of a Categorical / OneHotCategorical ``d`` (``m`` plate dims, ``n``
    own variables of ``k`` values), ``(k^n, *plates)``, read from its normalised logits; ``None`` for any
    other distribution. ``log_prob`` of the expanded support broadcasts each value against all K logits,
    (k^n, *batch, K), and its backward materialises that: K²·B time and memory for K values over B data
    points (5.9 GB at K = 4000, B = 16). These are the same numbers (``log_prob`` gathers them from the
    same logits; ``-inf`` where a value is never drawn, ``strict_support``), O(k^n · batch)."""
    t = type(d)
    if t is not Categorical and t is not OneHotCategorical:  # (a subclass may redefine log_prob)
        return None
    logits = (d if t is Categorical else d._categorical).logits  # (*plates, *own, K)
    if logits.dim() == m + 1:  # no own variable: the values are the K logits of each entry
        return logits.movedim(-1, 0)
    flat = logits.reshape(tuple(logits.shape[:m]) + (n, k))
    idx = _joint_indices(k, n, logits.device)  # (k^n, n): the value of each own variable
    picked = flat[..., torch.arange(n, device=idx.device), idx]  # (*plates, k^n, n)
    return picked.sum(-1).movedim(-1, 0)


@table_cache(maxsize=64)  # (not lru_cache: a table made inside a torch.func transform belongs to its level)
def _joint_indices(k: int, n: int, device: torch.device) -> torch.Tensor:
    """All k^n joint values of n variables with k values each, as indices, shape (k^n, n)."""
    return torch.tensor(list(itertools.product(range(k), repeat=n)), dtype=torch.long,
                        device=device).reshape(k ** n, n)
