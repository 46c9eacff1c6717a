"""Importance sampling with the score function."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.distributions import Distribution, Independent, Transform, constraints, transform_to

from storch import Estimator, Node, OptionError, StorchError
from storch.extending import align, base_distribution, is_tracing, parameters, plates_of, raw_of, rebuild, strict_support

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
        l(x) = log p(x | x<i), summed over the node's own batch dims (0 where p(x) = 0);
        a = 0.

    Requires: p and q with ``log_prob`` on the same event shape; q must put mass wherever p does
    (otherwise the estimate is biased, as for any importance sampler). q may be wider: a draw outside
    p's support has weight 0 (p's ``log_prob`` is evaluated only inside it), and a cost finite there.

    max_order: ∞ — the weights are detached, so Σ_x q(x) ⊥(p/q) ∇ⁿ(MagicBox(l) f) equals the
    score function's any-order estimate under p (D.2.2, using D.2.1).

    Args:
        plate: name of the node's plate.
        proposal: the sampling distribution: a ``torch.distributions.Distribution`` whose batch
            shape broadcasts to the node's (it is expanded to it), or a callable that gets the
            node's raw distribution p (batch shape ``(*parent_plates, *own_batch)``) and returns
            q with the same batch shape, e.g. ``lambda p: Categorical(logits=p.logits.detach() / 2)``.
            Its parameters may be plate tensors on plates of p (a behaviour policy written as the
            target is, ``Categorical(probs=MU[x])`` with ``x`` on a data plate): they are lined up
            with p's parent plates, as p's own are.
        n_samples: number of samples from q.

    Example:
        >>> q = torch.distributions.Categorical(probs=torch.full((5,), 0.2))
        >>> est = storch.estimator("importance", plate="z", proposal=q, n_samples=4)
        >>> z = est(torch.distributions.Categorical(logits=theta))

    References:
        [1] Storchastic: A Framework for General Stochastic Automatic Differentiation (van Krieken et al., 2021)
    """

    name = "importance"
    score_function = True  # l = log p (its override only zeroes draws outside p's support)
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
        q = _on_parent_plates(q, node)
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
        log_ratio = _log_p(node, x, -math.inf) - node.log_prob(x, node.state.proposal)
        # ⊥(p/q): the importance weights are detached (appendix D.2.2, condition 3 of Theorem 1)
        return log_ratio.detach().exp() / node.n

    def gradient_function(self, node: Node) -> torch.Tensor:
        """l(x) = log p(x | x<i); 0 (any finite value: the weight is 0) where x is outside p's support."""
        return _log_p(node, node.sample, 0.0)


def _log_p(node: Node, x: torch.Tensor, outside: float) -> torch.Tensor:
    """log p(x), joint over the node's own batch dims, and ``outside`` for a draw of q that p never draws
    (outside p's support: p(x) = 0, so its weight is 0).

    A proposal wider than p (a Normal for an Exponential, Poisson(2) for a Binomial(3)) is standard importance
    sampling, but p.log_prob on such a value trips torch's argument validation, or gives log p = -inf, whose
    MagicBox is NaN (a NaN loss and gradient). So log p is computed on x with those values replaced by one
    inside the support, and the result masked (the double where: the replaced entries carry no NaN gradient).
    Where p's support cannot be checked (its ``support`` or a value inside it is not known): plain log p(x).
    """
    p, q = node.distribution, node.state.proposal
    inside = None
    if q is not None and not _same_support(_support(p), _support(q)):
        inside = _inside(p, x)
    if inside is None:
        return node.log_prob(x)
    mask, valid = inside
    safe = torch.where(mask.reshape(mask.shape + (1,) * len(p.event_shape)), x, valid)
    lp = node.log_prob(safe)
    k = len(p.batch_shape) - len(node.parents)  # the node's own batch dims, summed by node.log_prob
    joint = mask.reshape(mask.shape[:mask.dim() - k] + (-1,)).all(-1) if k > 0 else mask
    return torch.where(joint, lp, torch.full((), outside, dtype=lp.dtype, device=lp.device))


def _support(d: Distribution):
    """``d.support``; ``None`` where it is not defined."""
    try:
        return d.support
    except NotImplementedError:
        return None


def _same_support(a, b) -> bool:
    """Whether constraints ``a`` and ``b`` are certainly the same set (the same object, or the same type
    with the same plain bounds): then q never draws outside p's support and nothing is masked."""
    if a is b or a is None:  # unknown: as before (no masking)
        return True
    if type(a) is not type(b):
        return False
    va, vb = vars(a), vars(b)
    return va.keys() == vb.keys() and all(
        not isinstance(v, torch.Tensor) and not isinstance(vb[n], torch.Tensor) and v == vb[n] for n, v in va.items())


def _inside(p: Distribution, x: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(mask, valid)``: whether each value of ``x`` is in p's support (shape of ``x`` less p's event dims),
    and a value inside it (broadcasts to ``x``); ``None`` where either cannot be found."""
    try:
        support = p.support
        with torch.no_grad():
            mask = support.check(x)
            try:
                valid = transform_to(support)(torch.zeros_like(x))  # continuous: a point inside
            except NotImplementedError:  # discrete: its lowest value (0 for boolean)
                lower = 0 if support is constraints.boolean else getattr(support, "lower_bound", None)
                if not support.is_discrete or lower is None:
                    return None
                valid = torch.zeros_like(x) + lower
    except (NotImplementedError, TypeError, ValueError, RuntimeError, AttributeError):
        return None
    if mask.dtype is not torch.bool or mask.shape != x.shape[:x.dim() - len(p.event_shape)]:
        return None
    return mask, valid.to(x.dtype)


def _on_parent_plates(q: Distribution, node: Node) -> Distribution:
    """``q`` with its plate-tensor parameters as raw tensors whose leading dims are the node's parent
    plates (size 1 where a parameter lacks one), as p's raw distribution has them: the batch shape
    then broadcasts to p's. A q without plate tensors is returned as it is."""
    base = base_distribution(q)
    try:
        params = parameters(base)
    except NotImplementedError:  # no arg_constraints: storch cannot read its parameters
        params = {}
    plated = {n: v for n, v in params.items() if plates_of(v)}
    if not plated:
        if _holds_plates(q):
            raise OptionError(
                f"importance: the proposal {type(q).__name__} holds plate tensors outside its parameters (in a base "
                "distribution, a transform or an attribute that is not in arg_constraints), which cannot be lined up "
                "with the node's plates. Build it from plate tensors as parameters only (Categorical(probs=MU[x]), "
                "Normal(m[x], s), Independent(Normal(...), 1)), or from raw tensors whose leading dims are the "
                f"node's parent plates {[pl.name for pl in node.parents]}, in that order (x.tensor)")
        return q
    names = {pl.name for pl in node.parents}
    for n, v in plated.items():
        extra = [pl.name for pl in plates_of(v) if pl.name not in names]
        if extra:
            raise OptionError(
                f"importance: the proposal's parameter {n!r} is on plates {extra} that the node's distribution is "
                f"not on (its plates: {sorted(names)}); a proposal may depend only on what p depends on (data, "
                "earlier nodes that p's parameters carry)")
    raw = {n: align(raw_of(v), plates_of(v), node.parents) if n in plated else v for n, v in params.items()}
    unplated = rebuild(base, raw)
    return Independent(unplated, q.reinterpreted_batch_ndims) if base is not q else unplated


def _holds_plates(d, depth: int = 0) -> bool:
    """Whether ``d`` (a distribution or transform) or what it holds has a plate tensor."""
    for v in d.__dict__.values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if plates_of(item):
                return True
            if isinstance(item, (Distribution, Transform)) and depth < 8 and _holds_plates(item, depth + 1):
                return True
    return False


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
        except StorchError:  # storch's own errors (a PlateError is a ValueError) say what was wrong
            raise
        except (ValueError, IndexError, RuntimeError):  # a value outside q's support (torch's validation)
            lq = None
        missed = lq is None or bool((torch.isfinite(lp) & (lq == -math.inf)).any())
    if missed:
        raise OptionError(
            f"importance: the proposal {type(q).__name__} puts no mass on values that the node's {type(p).__name__} "
            f"can draw ({values.shape[0]} values: a proposal over fewer values, or with probability 0 where p's is "
            "positive); the importance weights p/q cannot correct that and the estimate would be biased. Give a "
            "proposal over the same values with positive probability wherever p's is positive")
