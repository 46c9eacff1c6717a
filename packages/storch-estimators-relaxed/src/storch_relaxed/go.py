"""The GO gradient for independent discrete variables, as a control variate on the score function."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical, Poisson

from storch import CostFrame, Estimator, Node, magic_box
from storch.extending import base_distribution

from ._blocks import blocks_weights, pad_blocks
from ._network import flat

__all__ = ["Go", "GoState"]


@dataclass
class GoState:
    """Per-node record of GO (filled by ``proposal``, then ``gradient_function``).

    Attributes:
        x: the real samples as the distribution draws them, shape ``(n, *parents, *own, *event)``.
        index: x on the ordered support (x itself; the category index for a one-hot x),
            shape ``(n, *parents, *own)``.
        m: the number of independent dimensions (one neighbour block each).
        l: log p(x) of the real block.
    """

    x: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    m: int = 0
    l: Optional[torch.Tensor] = None


class Go(Estimator):
    """GO gradient (Cong et al. 2019) for independent discrete variables (appendix D.2.6).

    Components, for a node with m independent dimensions x_1..x_m on ordered supports:
        q(X | x<i): n samples x, and for each of them the m neighbours x + e_j (x_j raised by one;
            left at x_j where x_j is the largest value); plate layout: n real samples, then
            block j = 1..m of neighbours (evaluation only);
        w = 1/n on the real samples, 0 on the neighbours;
        l(x) = log p(x | x<i) on the real samples;
        a(x<i, X) = Σ_j 1[x_j < d] ⊥((f(x) - f(x + e_j)) / p_j(x_j)) (P_j(x_j) - ⊥P_j(x_j))
                    - ⊥f(x) (MagicBox(l) - 1),
            P_j the CDF of dimension j.

    First order: ∇ = Σ_j (f(x) - f(x + e_j)) ∇P_j(x_j) / p_j(x_j), the GO gradient; the second line
    of a cancels the surrogate's score term f(x) ∇l.

    Note (paper vs. math): appendix D.2.6 prints the first factor as "( (P) - 1)"; the GO
    gradient needs ∇P_j exactly, i.e. (P - ⊥P), which is what we use (tested against enumeration).

    Requires: Bernoulli, Categorical or OneHotCategorical (categories in index order: the
    neighbour of category k is k + 1, handed to user code as a one-hot vector for
    OneHotCategorical) or Poisson, independent over the node's own batch dims; any cost. Costs
    1 + m evaluations per sample (m = the number of own batch elements; K does not count).

    max_order: 1 (appendix D.2.6: the control variate cancels the score function at first order).

    Args:
        plate: name of the node's plate (its size is n (1 + m)).
        n_samples: number of samples n.

    Example:
        >>> est = storch.estimator("go", plate="k")
        >>> k = est(Poisson(rate))

    References:
        [1] GO Gradient for Expectation-Based Objectives (Cong et al., 2019)
    """

    name = "go"
    max_order = 1
    distributions = (Bernoulli, Categorical, OneHotCategorical, Poisson)
    State = GoState

    def proposal(self, node: Node) -> torch.Tensor:
        d = base_distribution(node.distribution)
        x = d.sample((self.n_samples,))
        onehot = isinstance(d, OneHotCategorical)
        index = x.argmax(-1) if onehot else x  # a one-hot value as its category index
        lead = 1 + len(node.parents)
        m = math.prod(index.shape[lead:])
        xf = flat(index, lead)  # (n, *parents, m)
        step = torch.eye(m, dtype=xf.dtype, device=x.device).reshape((m,) + (1,) * lead + (m,))
        nb = xf.unsqueeze(0) + step  # (m, n, *parents, m): neighbour j raises dimension j
        top = _largest(d)
        if top is not None:  # outside the support: keep x (its term is 0 since ∇P(d) = 0)
            nb = torch.where(nb > top, xf.unsqueeze(0), nb)
        nb = nb.reshape((m * self.n_samples,) + tuple(index.shape[1:]))
        if onehot:
            nb = torch.nn.functional.one_hot(nb, x.shape[-1]).to(x.dtype)
        node.state.x, node.state.index, node.state.m = x, index, m
        return torch.cat([x, nb], 0)

    def weighting_function(self, node: Node) -> torch.Tensor:
        return blocks_weights(node, self.n_samples, 1 + node.state.m)

    def gradient_function(self, node: Node) -> torch.Tensor:
        node.state.l = node.log_prob(node.state.x)
        return pad_blocks(node.state.l, 1 + node.state.m)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        n, m, dim = self.n_samples, node.state.m, cost.dim
        f = cost.tensor.unflatten(dim, (1 + m, n))
        f_x = f.select(dim, 0)  # (frame): real samples
        f_nb = f.narrow(dim, 1, m).movedim(dim, -1)  # (frame, m): neighbours
        dP = cost.align(flat(_cdf_term(base_distribution(node.distribution), node.state.index), len(node.plates)))
        g = ((f_x.unsqueeze(-1) - f_nb) * dP).sum(-1)  # appendix D.2.6, first line
        l = cost.align(node.state.l)
        return pad_blocks(g - f_x * (magic_box(l) - 1.0), 1 + m, dim)  # second line: - score term


def _largest(d) -> Optional[int]:
    if isinstance(d, Bernoulli):
        return 1
    if isinstance(d, (Categorical, OneHotCategorical)):
        return d.logits.shape[-1] - 1
    return None


def _cdf_term(d, x: torch.Tensor) -> torch.Tensor:
    """1[x < d] (P(x) - ⊥P(x)) / ⊥p(x) per dimension: only the CDF is differentiated."""
    if isinstance(d, Bernoulli):
        p = d.probs
        # P(0) = 1 - p, P(1) = 1 (constant); ⊥ on the pmf: D.2.6 differentiates the CDF only.
        # 1 - p from the logits (exact near p = 1), and 1 where x = 1: torch.where would otherwise
        # send 0 · (1 / 0) = NaN into the gradient from the branch it does not select
        below = x < 0.5
        q = torch.sigmoid(-d.logits).detach().expand_as(p)
        return torch.where(below, -(p - p.detach()) / torch.where(below, q, torch.ones_like(q)), torch.zeros_like(p))
    if isinstance(d, (Categorical, OneHotCategorical)):  # x: the category index
        probs = d.probs.expand(x.shape + d.probs.shape[-1:])
        idx = x.unsqueeze(-1)
        P = probs.cumsum(-1).gather(-1, idx).squeeze(-1)
        p = probs.gather(-1, idx).squeeze(-1).detach()  # ⊥p_j(x_j): a coefficient (D.2.6)
        inside = x < probs.shape[-1] - 1
        return torch.where(inside, (P - P.detach()) / p, torch.zeros_like(P))
    rate = d.rate
    P = torch.special.gammaincc(x + 1, rate)  # Poisson CDF P(X <= x) = Q(x + 1, λ)
    p = d.log_prob(x).exp().detach()  # ⊥p(x): a coefficient (D.2.6)
    return (P - P.detach()) / p
