"""Importance sampling with the score function."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.distributions import Distribution

from storch import Estimator, Node, OptionError
from storch.extending import is_tracing, strict_support

__all__ = ["Importance", "ImportanceState"]


@dataclass
class ImportanceState:
    """Per-node record of importance sampling: ``proposal`` is the q the samples came from."""

    proposal: Optional[Distribution] = None


class Importance(Estimator):
    """Score function on samples from a user-given proposal, reweighted by ⊥(p/q) (appendix D.2.2).

    Components:
        q(X | x<i) = n i.i.d. samples from the proposal q (the ``proposal`` option);
        w(x) = ⊥(p(x | x<i) / q(x | x<i)) / n (detached importance weights);
        l(x) = log p(x | x<i), summed over the node's own batch dims;
        a = 0.

    Requires: p and q with ``log_prob`` on the same event shape; q must put mass wherever p does
    (otherwise the estimate is biased, as for any importance sampler).

    max_order: ∞ — the weights are detached, so Σ_x q(x) ⊥(p/q) ∇ⁿ(MagicBox(l) f) equals the
    score function's any-order estimate under p (D.2.2, using D.2.1).

    Args:
        plate: name of the node's plate.
        proposal: the sampling distribution: a ``torch.distributions.Distribution`` whose batch
            shape broadcasts to the node's (it is expanded to it), or a callable that gets the
            node's raw distribution p (batch shape ``(*parent_plates, *own_batch)``) and returns
            q with the same batch shape, e.g. ``lambda p: Categorical(logits=p.logits.detach() / 2)``.
        n_samples: number of samples from q.

    Example:
        >>> q = torch.distributions.Categorical(probs=torch.full((5,), 0.2))
        >>> est = storch.estimator("importance", plate="z", proposal=q, n_samples=4)
        >>> z = est(torch.distributions.Categorical(logits=theta))

    References:
        [1] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
    """

    name = "importance"
    State = ImportanceState

    def __init__(self, plate: str, proposal: Optional[Union[Distribution, Callable[[Distribution], Distribution]]] = None,
                 n_samples: int = 1) -> None:
        super().__init__(plate, n_samples)
        if proposal is None:
            raise OptionError("importance: the option `proposal` is required: a torch.distributions.Distribution "
                              "or a callable p -> q")
        if not isinstance(proposal, Distribution) and not callable(proposal):
            raise OptionError(f"importance: proposal={proposal!r} is not accepted; give a "
                              "torch.distributions.Distribution or a callable p -> q")
        self.proposal_distribution = proposal

    def _sampler(self, node: Node) -> Distribution:
        p = node.distribution
        q = self.proposal_distribution
        q = q if isinstance(q, Distribution) else q(p)
        if not isinstance(q, Distribution):
            raise OptionError(f"importance: the proposal callable returned {type(q).__name__}, not a Distribution")
        if q.event_shape != p.event_shape:
            raise OptionError(
                f"importance: the proposal has event shape {tuple(q.event_shape)} but the node's distribution "
                f"{type(p).__name__} has event shape {tuple(p.event_shape)}")
        if q.batch_shape != p.batch_shape:
            try:
                q = q.expand(p.batch_shape)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                raise OptionError(
                    f"importance: the proposal's batch shape {tuple(q.batch_shape)} does not broadcast to the "
                    f"node's batch shape {tuple(p.batch_shape)} ((*parent plates, *own batch)): {e}") from e
        _check_covers(p, q)
        return q

    def proposal(self, node: Node) -> torch.Tensor:
        q = self._sampler(node)
        node.state.proposal = q
        return q.sample((self.n_samples,))

    def weighting_function(self, node: Node) -> torch.Tensor:
        x = node.sample
        log_ratio = node.log_prob(x) - node.log_prob(x, node.state.proposal)
        # ⊥(p/q): the importance weights are detached (appendix D.2.2, condition 3 of Theorem 1)
        return log_ratio.detach().exp() / node.n


_MAX_CHECKED = 4096  # values of a finite support checked one by one


def _check_covers(p: Distribution, q: Distribution) -> None:
    """Raise where a finite support shows that q puts no mass on a value p can draw (a proposal over fewer
    categories than p, or with a probability of exactly 0 where p's is positive): the importance weights
    p/q cannot correct that, and the estimate would be biased without a word (found by porting an
    off-policy correction whose behaviour policy had 3 actions of 4). Continuous supports are not checked
    (documented: q must put mass wherever p does)."""
    if is_tracing() or not (p.has_enumerate_support and q.has_enumerate_support):
        return
    values = p.enumerate_support(expand=True)  # (K, *batch, *event)
    if values.shape[0] > _MAX_CHECKED or values.is_meta:
        return
    with torch.no_grad():
        lp = strict_support(p).log_prob(values)
        try:
            lq = strict_support(q).log_prob(values)  # probs of exactly 0: -inf (torch clamps them)
        except (ValueError, IndexError, RuntimeError):  # a value outside q's support (torch's validation)
            lq = None
        missed = lq is None or bool((torch.isfinite(lp) & (lq == -math.inf)).any())
    if missed:
        raise OptionError(
            f"importance: the proposal {type(q).__name__} puts no mass on values that the node's {type(p).__name__} "
            f"can draw ({values.shape[0]} values: a proposal over fewer values, or with probability 0 where p's is "
            "positive); the importance weights p/q cannot correct that and the estimate would be biased. Give a "
            "proposal over the same values with positive probability wherever p's is positive")
