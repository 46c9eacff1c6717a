"""The GO gradient for independent discrete variables, as a control variate on the score function."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributions import (Bernoulli, Binomial, Categorical, Distribution, Geometric, NegativeBinomial,
                                 OneHotCategorical, Poisson)

from storch import CostFrame, Estimator, Node, UnsupportedDistributionError, magic_box
from storch.extending import (assume, base_distribution, differentiated_total_count, given_by_probs, is_tracing,
                              strict_support)

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
        order: Categorical only: the order of the categories per row, shape ``(*batch, K)``
            (``_category_order``); None for the other distributions.
        raised: 1[x has a neighbour] (a next possible value), shape of ``index``.
        descending: Binomial given by ``probs`` only: the entries ordered (n, ..., 0), those
            whose probs are exactly 1 (see ``Go``), shape ``(*batch)``; None for the other distributions.
    """

    x: Optional[torch.Tensor] = None
    index: Optional[torch.Tensor] = None
    m: int = 0
    l: Optional[torch.Tensor] = None
    order: Optional[torch.Tensor] = None
    raised: Optional[torch.Tensor] = None
    descending: Optional[torch.Tensor] = None


class Go(Estimator):
    """GO gradient (Cong et al. 2019) for independent discrete variables (appendix D.2.6).

    Components, for a node with m independent dimensions x_1..x_m on ordered supports:
        q(X | x<i): n samples x, and for each of them the m neighbours x + e_j (x_j raised to the
            next possible value; left at x_j where x_j is the last one); plate layout: n real
            samples, then block j = 1..m of neighbours (evaluation only);
        w = 1/n on the real samples, 0 on the neighbours;
        l(x) = log p(x | x<i) on the real samples;
        a(x<i, X) = Σ_j 1[x_j not last] ⊥((f(x) - f(x + e_j)) / p_j(x_j)) (P_j(x_j) - ⊥P_j(x_j))
                    - ⊥f(x) (MagicBox(l) - 1),
            P_j the CDF of dimension j (in the order of its values). The term ∇P_j(x_j) / p_j(x_j) in
            closed form where one exists: Bernoulli / Binomial(n, p) -(n - x) ∇p / (1 - p), Geometric
            (failures before the first success) (x + 1) ∇p / p, NegativeBinomial(r, p) -(x + r) ∇p / (1 - p),
            Poisson -∇λ (each from ∂_θ P(X <= x) in closed form; no sum over the support); Categorical:
            the cumulative sum of the probabilities in the row's order.

    First order: ∇ = Σ_j (f(x) - f(x + e_j)) ∇P_j(x_j) / p_j(x_j), the GO gradient; the second line
    of a cancels the surrogate's score term f(x) ∇l.

    Note (paper vs. math): appendix D.2.6 prints the first factor as "( (P) - 1)"; the GO
    gradient needs ∇P_j exactly, i.e. (P - ⊥P), which is what we use (tested against enumeration).

    A Bernoulli bit that is 0 surely (probs exactly 0: ``probs * mask``, a logit of −∞, or one whose
    sigmoid underflows) has no neighbour, and one that is 1 surely is at its last value: the impossible
    value is never handed to the cost (as for a Categorical's impossible categories). In the logits the
    derivative there is exactly 0 (∇P(0) = −σ'(logit) ∇logit, σ' = p (1 − p) = 0); with probs a
    parameter on its boundary, the one-sided derivative (f(1) − f(0)) ∇p, which needs the cost at the
    impossible value, is not estimated (0).
    A Binomial(n, p) is treated alike: its last value x = n has no neighbour (∇P(n) = 0); at a logit
    of −∞ (x = 0 surely) no neighbour is evaluated, and at +∞ x = n is last; at probs exactly 0 the
    neighbour 1 gives n (f(1) − f(0)) ∇p; an entry with probs exactly 1 is ordered (n, ..., 0), the
    neighbour of n is n − 1 and the term n (f(n) − f(n − 1)) ∇p is the exact one-sided derivative.
    A Geometric at probs exactly 1 needs nothing (x = 0 is not last: the neighbour 1 gives
    f(0) − f(1)); at a logit of +∞ its neighbour is not evaluated (coefficient exactly 0). A
    NegativeBinomial at probs exactly 0 (x = 0 surely) gets r (f(1) − f(0)) ∇p from the neighbour 1.
    Refused (``UnsupportedDistributionError``): a Geometric with probs 0 and a NegativeBinomial with
    probs 1 (no finite sample; also a logit whose sigmoid rounds to 0, or to 1, in its dtype), a
    NegativeBinomial with a logit of −∞ (torch's log_prob is NaN: give ``probs`` 0 instead), and a
    differentiated ``total_count`` (the term differentiates probs only; :meth:`check_distribution`, and
    :meth:`supports` agrees: ``storch.extending.differentiated_total_count``).

    Variance: on a smooth bounded cost (``tests/relaxed/test_go_counts.py``) GO's variance per component
    is below that of 'score' with as many evaluations (n_samples = 1 + m, leave-one-out baseline): at most
    0.44 of it for Binomial, 0.18 for Geometric, 0.17 for NegativeBinomial over 12 seeds. Not a general claim.

    Requires: Bernoulli, Binomial (a fixed total_count, per entry or shared), Categorical or
    OneHotCategorical (categories in index order: the neighbour of category k is k + 1, handed to user
    code as a one-hot vector for OneHotCategorical), Poisson, Geometric or NegativeBinomial (a fixed
    total_count), independent over the node's own batch dims (optionally under one Independent); any
    cost, not necessarily differentiable in x (a table lookup is fine). Costs 1 + m evaluations per
    sample (m = the number of own batch elements; K does not count).

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
    distributions = (Bernoulli, Binomial, Categorical, OneHotCategorical, Poisson, Geometric, NegativeBinomial)
    State = GoState

    @classmethod
    def supports(cls, distribution: Distribution) -> bool:
        """The base class's check, and no differentiated ``total_count`` (a Binomial's, a NegativeBinomial's):
        the registry's listing agrees with :meth:`check_distribution`."""
        return super().supports(distribution) and differentiated_total_count(distribution) is None

    def check_distribution(self, d: Distribution) -> None:
        reason = differentiated_total_count(d)
        if reason is not None:
            # the term differentiates the CDF in probs / logits only: total_count would get no gradient, silently
            raise UnsupportedDistributionError(
                f"estimator {self.name!r} (plate {self.plate!r}) does not support {type(base_distribution(d)).__name__} "
                f"{reason}")
        super().check_distribution(d)

    def proposal(self, node: Node) -> torch.Tensor:
        d = base_distribution(node.distribution)
        _check_parameters(d)
        x = d.sample((self.n_samples,))
        onehot = isinstance(d, OneHotCategorical)
        index = x.argmax(-1) if onehot else x  # a one-hot value as its category index
        lead = 1 + len(node.parents)
        m = math.prod(index.shape[lead:])
        order = descending = None
        if isinstance(d, (Categorical, OneHotCategorical)):
            order = _category_order(d.probs.detach())  # ⊥: the order is a constant of the step
            up, raised = _next_category(d.probs.detach(), order, index)
        elif isinstance(d, (Bernoulli, Binomial)):  # support {0, ..., top}: top = 1, or total_count
            top = _top(d)
            up, raised = index + 1, index < top  # x = top is the largest value: its term is 0 since ∇P(top) = 0
            if isinstance(d, Bernoulli):
                # a bit that is 0 surely (probs 0: a mask multiplied in, a logit of −∞, or one whose sigmoid
                # underflows) has no neighbour: the value 1 is impossible and never handed to the cost. Its
                # coefficient ∇P(0) = −σ'(logit) ∇logit is 0 in the logits; in probs the one-sided derivative
                # (f(1) − f(0)) ∇p on the boundary is not estimated (as for a Categorical's probs 0). A bit that is
                # 1 surely is at the last value (no neighbour) in the order (0, 1): it is not reordered, since its
                # neighbour 0 would be impossible too (torch.where / comparisons: no branch on values)
                raised = raised & (d.probs.detach() > 0)
            elif given_by_probs(d):
                # probs exactly 1: x = top surely, so in the order (0, ..., top) no term reaches the one-sided
                # derivative top (f(top) − f(top − 1)) ∇p; in the order (top, ..., 0) the neighbour of x is x − 1.
                # (torch.where, not a branch on values: the same program under storch.compile)
                descending = d.probs.detach() == 1
                raised = torch.where(descending, index > 0, raised)
                up = torch.where(descending, index - 1, up)
            else:
                # a logit of −∞: x = 0 surely, its neighbour 1 is impossible, and its term's coefficient
                # ∇P(0) = −top σ'(−∞) ∇logit is exactly 0, so it is not evaluated (the cost saw the impossible 1,
                # and one infinite there made the gradient NaN: −inf · 0). probs exactly 0 keep their
                # neighbour: see the class docstring
                raised = raised & (d.logits.detach() > -math.inf)
        else:  # Poisson, Geometric, NegativeBinomial: support {0, 1, ...}, every value has a next one
            up, raised = index + 1, torch.ones_like(index, dtype=torch.bool)
            if isinstance(d, Geometric):
                # a logit of +∞ (read only where given: no logits computed and cached from probs): x = 0 surely,
                # the neighbour 1 is impossible and its coefficient ∇P(0) / p(0) = σ'(+∞) ∇logit is exactly 0
                logits = d.__dict__.get("logits")
                if isinstance(logits, torch.Tensor):
                    raised = raised & (logits.detach() < math.inf)
        up = torch.where(raised, up, index)  # no next value: keep x (its term is 0)
        xf, upf = flat(index, lead), flat(up, lead)  # (n, *parents, m)
        step = torch.eye(m, dtype=torch.bool, device=x.device).reshape((m,) + (1,) * lead + (m,))
        nb = torch.where(step, upf.unsqueeze(0), xf.unsqueeze(0))  # (m, n, *parents, m): neighbour j raises dimension j
        nb = nb.reshape((m * self.n_samples,) + tuple(index.shape[1:]))
        if onehot:
            nb = torch.nn.functional.one_hot(nb, x.shape[-1]).to(x.dtype)
        node.state.x, node.state.index, node.state.m = x, index, m
        node.state.order, node.state.raised, node.state.descending = order, raised, descending
        return torch.cat([x, nb], 0)

    def weighting_function(self, node: Node) -> torch.Tensor:
        return blocks_weights(node, self.n_samples, 1 + node.state.m)

    def gradient_function(self, node: Node) -> torch.Tensor:
        d = node.distribution
        # infinite Bernoulli logits (a masked bit): log p(x) exactly 0 on the value they always draw, where
        # torch's is NaN; elsewhere torch's values and derivatives. While storch.compile traces, strict_support
        # gives this copy whatever the values (its log_prob is a torch.where on the logits), so a compiled
        # step gives the eager result
        node.state.l = node.log_prob(node.state.x, strict_support(d))
        return pad_blocks(node.state.l, 1 + node.state.m)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        n, m, dim = self.n_samples, node.state.m, cost.dim
        f = cost.tensor.unflatten(dim, (1 + m, n))
        f_x = f.select(dim, 0)  # (frame): real samples
        f_nb = f.narrow(dim, 1, m).movedim(dim, -1)  # (frame, m): neighbours
        term = _cdf_term(base_distribution(node.distribution), node.state)
        dP = cost.align(flat(term, len(node.plates)))
        g = ((f_x.unsqueeze(-1) - f_nb) * dP).sum(-1)  # appendix D.2.6, first line
        l = cost.align(node.state.l)
        return pad_blocks(g - f_x * (magic_box(l) - 1.0), 1 + m, dim)  # second line: - score term


# Categorical: the order of the categories. Summation by parts (GO, Cong et al. 2019, eq. 5-6) holds
# for any fixed order σ of the K categories: with P_σ(k) = Σ_{σ(j) <= σ(k)} p_j and next(k) the category
# after k, E[f] = Σ_k P_σ(k) (f(k) - f(next(k))) + f(last), so ∇E = Σ_{k not last} ∇P_σ(k) (f(k) - f(next(k)))
# = E_x[∇P_σ(x) / p(x) (f(x) - f(next(x)))], the GO gradient, where the expectation over x ~ p reaches
# only the categories with p > 0. Hence two rules:
#  * a category with p_k = 0 has ∇p_k = 0 (a nonnegative differentiable function at its minimum: masked
#    logits, a mask multiplied into the probabilities), so it can be left out of the order: P_σ and ∇P_σ
#    are unchanged, and the terms that the sampler never reaches are exactly those it does not need. The
#    index order over all K categories lost them: ∇P(k) = ∇P(k - 1) ≠ 0 at a masked k, never sampled
#    (z up to 245 against enumeration), and the cost saw the masked k as the neighbour of k - 1.
#    (Probabilities that are parameters on their boundary, probs = θ with θ_k = 0, have one-sided
#    derivatives that depend on f(k); no estimator that never evaluates f(k) gets them.)
#  * a category with 0 < p_k << 1 inside the order is exact in expectation but not in practice: its term
#    ∇P_σ(k) / p_k (f(k) - f(next(k))) is O(1 / p_k) (1e13 at a logit gap of 30) with probability p_k, so
#    the mean of any realistic number of samples misses its O(1) contribution (the same z of 245); this is
#    not rounding, a stable form of the ratio does not help. Placed after every more probable category,
#    ∇P_σ(k) = -Σ_{j after k} ∇p_j, and for softmax logits |∂p_j| <= p_j <= p_k, so |∇P_σ(k) / p_k| <= K:
#    bounded. The order σ is chosen from ⊥p at each step, a constant of the step (max_order 1).
# Index order is kept over the categories of probability >= _RARE (an ordinal cost keeps its small
# differences f(k) - f(k + 1) there); the rarer possible ones follow by decreasing probability.
_RARE = 1e-3


def _category_order(probs: torch.Tensor) -> torch.Tensor:
    """The order σ of the categories per row (see above), shape ``probs.shape``: σ[..., r] is the
    category of rank r; categories of probability 0 come last (and are never a neighbour)."""
    k = probs.shape[-1]
    p = probs.to(torch.float64)
    idx = torch.arange(k, dtype=torch.float64, device=p.device).expand_as(p)
    key = torch.where(p >= _RARE, idx, k + 1.0 - p / _RARE)  # rare: after all, by decreasing p
    key = torch.where(p > 0, key, torch.full_like(p, 2.0 * k + 2.0))  # impossible: last
    return torch.argsort(key, dim=-1, stable=True)


def _ranks(order: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank of ``index`` in ``order``, ``order`` broadcast to ``index.shape + (K,)``)."""
    order = order.expand(index.shape + order.shape[-1:])
    rank = torch.argsort(order, -1)  # the inverse permutation
    return rank.gather(-1, index.unsqueeze(-1)).squeeze(-1), order


def _next_category(probs: torch.Tensor, order: torch.Tensor, index: torch.Tensor):
    """(the category after ``index`` in ``order``, 1[it exists and is possible])."""
    k = probs.shape[-1]
    r, order = _ranks(order, index)
    r1 = (r + 1).clamp_max(k - 1).unsqueeze(-1)
    nxt = order.gather(-1, r1).squeeze(-1)
    p_nxt = probs.expand(index.shape + (k,)).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return nxt, (r + 1 < k) & (p_nxt > 0)


def _top(d) -> torch.Tensor:
    """The largest value of a Bernoulli (1) or Binomial (``total_count``), a tensor of ``d``'s batch shape."""
    if isinstance(d, Binomial):
        return d.total_count.detach()
    return torch.ones_like(d.logits if not given_by_probs(d) else d.probs).detach()


def _check_parameters(d) -> None:
    """Refuse what GO cannot sample or whose log p torch gives as NaN (eagerly by value; while traced, ``assume``).

    * a Geometric with probs 0 (a logit of −∞, or below about −88.7 in float32, −709.8 in float64, where σ
      underflows to 0): no success ever, its sample is infinite;
    * a NegativeBinomial with probs 1 (a logit of +∞, or above about 16.6 in float32, 36.7 in float64, where σ
      rounds to 1): its sample is infinite (torch's clamp makes it merely huge); with a logit of −∞ (x = 0
      surely) torch's log_prob is NaN (0 · −∞): give ``probs`` (0 there) instead.

    (A differentiated ``total_count`` is refused before, by :meth:`Go.check_distribution`.)
    """
    if isinstance(d, Geometric):
        p = d.probs.detach()
        checks = [(~(p > 0),
                   f"go: a Geometric with probs 0 (a logit of -inf, or one so negative that sigmoid underflows to 0 in "
                   f"{p.dtype}) never succeeds: its sample is infinite. Keep probs above 0 (e.g. logits clamped below "
                   "at -30), or mask the node's cost instead of its probability")]
    elif isinstance(d, NegativeBinomial):
        p = d.probs.detach()
        if given_by_probs(d):
            ones = "probs 1"
        else:  # σ(l) = 1 / (1 + e^-l) is 1 once e^-l < eps / 2: from l = log(2 / eps), 16.6 in float32, 36.7 in float64
            ones = (f"probs 1 (a logit of +inf, or one so large that sigmoid rounds to 1 in {p.dtype}: above about "
                    f"{math.log(2 / torch.finfo(p.dtype).eps):.1f})")
        checks = [(~(p < 1),
                   f"go: a NegativeBinomial with {ones} never fails: it has no finite sample (torch's clamp draws a "
                   "huge count). Keep probs below 1 (e.g. logits clamped above at 15, or the model in float64, where "
                   "logits up to about 36 give probs below 1)")]
        if not given_by_probs(d):
            checks.append((d.logits.detach() == -math.inf,
                           "go: a NegativeBinomial with a logit of -inf (0 surely) has torch's log_prob NaN (0 * -inf). "
                           "For a count that is 0 surely give probs (0 there: NegativeBinomial(r, "
                           "probs=torch.sigmoid(logits)) with -inf logits) instead of logits"))
    else:
        return
    if p.is_meta:
        return
    for bad, message in checks:
        if is_tracing():  # storch.compile: no branch on values
            assume(~bad.any(), message)
        elif bool(bad.any()):
            raise UnsupportedDistributionError(message)


def _cdf_term(d, state: GoState) -> torch.Tensor:
    """1[x not last] (P(x) - ⊥P(x)) / ⊥p(x) per dimension: only the CDF is differentiated."""
    x = state.index
    assert x is not None and state.raised is not None  # (filled by proposal)
    if isinstance(d, (Bernoulli, Binomial)):
        # P(x) = Σ_{k <= x} C(n, k) p^k (1 - p)^(n - k), n = top (1 for a Bernoulli). Its derivative in p is
        # -n C(n - 1, x) p^x (1 - p)^(n - 1 - x) (the identity ∂_p I_{1-p}(n - x, x + 1)), so
        # ∇P(x) / p(x) = -(n - x) ∇p / (1 - p): written so (no CDF, no sum over the support), with ⊥ on the pmf
        # (D.2.6 differentiates the CDF only). 1 - p from the logits (exact near p = 1), and 1 where there is no
        # term: torch.where would otherwise send 0 · (1 / 0) = NaN into the gradient from the branch it does not
        # select. No term where there is no neighbour (x = n, or a logit −∞, whose ∇P(0) is exactly 0).
        p = d.probs
        below = state.raised
        top = _top(d)
        q = torch.sigmoid(-d.logits).detach().expand_as(p)
        term = -(top - x) * (p - p.detach()) / torch.where(below, q, torch.ones_like(q))
        if state.descending is not None:
            # order (n, ..., 0): P(X >= x), whose derivative in p is n C(n - 1, x - 1) p^(x - 1) (1 - p)^(n - x),
            # so the term is x ∇p / ⊥p (p = 1 where it is used; 1 elsewhere, so that no 0 · (1 / 0) = NaN comes
            # from the unselected branch)
            down = state.descending & below
            term = torch.where(down, x * (p - p.detach()) / torch.where(down, p.detach(), torch.ones_like(p)), term)
        return torch.where(below, term, torch.zeros_like(term))
    if isinstance(d, (Categorical, OneHotCategorical)):  # x: the category index
        assert state.order is not None
        r, order = _ranks(state.order, x)
        probs = d.probs.expand(x.shape + d.probs.shape[-1:])
        P = probs.gather(-1, order).cumsum(-1).gather(-1, r.unsqueeze(-1)).squeeze(-1)  # P_σ(x)
        p = probs.gather(-1, x.unsqueeze(-1)).squeeze(-1).detach()  # ⊥p_j(x_j): a coefficient (D.2.6)
        # the last possible category: ∇P_σ = -Σ ∇p over the impossible ones = 0 (exactly, not rounded)
        return torch.where(state.raised, (P - P.detach()) / p, torch.zeros_like(P))
    if isinstance(d, Geometric):
        # torch's Geometric counts the failures before the first success: P(x) = 1 - (1 - p)^(x + 1), whose
        # derivative (x + 1) (1 - p)^x ∇p over p(x) = p (1 - p)^x is (x + 1) ∇p / p: written so (exact at
        # p = 1, where (1 - p)^x is 0^0 at x = 0). p > 0 (_check_parameters). No term where x = 0 is sure at a
        # logit of +∞ (its coefficient σ'(∞) is exactly 0; no neighbour was evaluated).
        p = d.probs
        term = (x + 1) * (p - p.detach()) / p.detach()
        return torch.where(state.raised, term, torch.zeros_like(term))
    if isinstance(d, NegativeBinomial):
        # torch's NegativeBinomial(r, p) counts the successes before r failures: P(x) = I_{1-p}(r, x + 1), whose
        # derivative in p is -(1 - p)^(r - 1) p^x / B(r, x + 1); over p(x) = Γ(x + r) / (Γ(r) x!) p^x (1 - p)^r
        # that is -(x + r) ∇p / (1 - p): written so (torch has no incomplete beta; no sum up to x). 1 - p from
        # the logits (exact near p = 1). At probs exactly 0 (x = 0 surely) the term -r ∇p with the neighbour 1
        # is the exact one-sided derivative r (f(1) - f(0)).
        p = d.probs
        q = torch.sigmoid(-d.logits).detach()
        return -(x + d.total_count.detach()) * (p - p.detach()) / q
    # Poisson: P(X <= x) = Q(x + 1, λ), and ∂P(x)/∂λ = -λ^x e^{-λ} / x! = -p(x), so the term
    # (P - ⊥P) / ⊥p(x) (D.2.6) has value 0 and first derivative -∇λ for every x: written so. Through
    # gammaincc and a division by p(x) it was NaN at a rate of exactly 0 (the derivative of Q(1, λ) at
    # λ = 0 is 0 · log 0 in torch's formula), where the term is -∇λ as anywhere (the neighbour x + 1 = 1
    # gives the one-sided derivative f(1) - f(0) at λ = 0), and a ratio of two underflowing numbers in
    # the far tail. (max_order 1: only the first derivative is used.)
    rate = d.rate
    return (rate.detach() - rate).expand(x.shape)
