"""Importance sampling with the score function."""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch.distributions import (
    Categorical, Distribution, Independent, MixtureSameFamily, Multinomial, Transform, TransformedDistribution, constraints, transform_to,
)

from storch import Estimator, Node, OptionError, Plate, StorchError
from storch.extending import align, assume, base_distribution, is_tracing, parameters, plates_of, raw_of, rebuild, same_support, strict_support

__all__ = ["Importance", "ImportanceState"]


@dataclass
class ImportanceState:
    """Per-node record of importance sampling, filled by ``proposal`` (called first) and read by the
    gradient and weighting functions, each ``(N, *parent plates)`` and joint over the node's own batch dims:

    Attributes:
        proposal: the q the samples came from.
        log_q: log q(x) of q's draws (detached: only the weights read it).
        log_p: log p(x) of the sample, with gradient.
        impossible: whether a draw of q is a value p cannot produce (p(x) = 0: outside p's support, or a
            masked value with log p = -inf); its sample holds a value p can produce instead (weight 0, l = 0).
            ``None`` where no draw is.
    """

    proposal: Optional[Distribution] = None
    log_q: Optional[torch.Tensor] = None
    log_p: Optional[torch.Tensor] = None
    impossible: Optional[torch.Tensor] = None


class Importance(Estimator):
    """Score function on samples from a user-given proposal, reweighted by ⊥(p/q) (appendix D.2.2).

    Components:
        q(X | x<i) = n i.i.d. samples from the proposal q (the ``proposal`` option);
        w(x) = ⊥(p(x | x<i) / q(x | x<i)) / n (detached importance weights);
        l(x) = log p(x | x<i), summed over the node's own batch dims (0 where p(x) = 0);
        a = 0.

    Requires: p and q with ``log_prob`` on the same event shape; q must put mass wherever p does
    (otherwise the estimate is biased, as for any importance sampler): a q of the other kind (continuous for
    a discrete p, or discrete for a continuous one) or whose support ends before p's is refused. q may be of
    another family (a Categorical for a Bernoulli): its draws take the dtype of p's samples. q may put mass
    where p does not (outside p's support, or on values p masks with ``-inf`` logits or probabilities of
    0): such a draw has weight 0 and l = 0, and the user's code gets a value p can produce in its place
    (p's mode for a discrete p, its mean, strictly inside the support, for a continuous one), so that it
    never sees one the model cannot produce.

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
    partition_hint = ("For an episode drawn now from a behaviour policy (off-policy), create one importance estimator "
                      "per step before the loop (plate=f'a{t}', n_samples=1: a plate of one draw per step, whose "
                      "weights p/q multiply into the costs of the later steps), or draw it as a partition of 'score' "
                      "from the detached behaviour policy with the per-decision ratios in the costs; episodes stored "
                      "earlier (a replay buffer) are data, not draws: put them on a data plate with the ratios in "
                      "the costs (docs/estimators/importance.md, 'Episodes from a behaviour policy (off-policy)')")
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

    def extra_repr(self) -> str:
        q = self.proposal_distribution
        # a distribution as torch shows it; a function by its name (without its enclosing function's)
        name = getattr(q, "__qualname__", None)
        shown = repr(q) if isinstance(q, Distribution) or not isinstance(name, str) else name.rsplit("<locals>.")[-1]
        return f"{super().extra_repr()}, proposal={shown if len(shown) <= 80 else shown[:77] + '...'}"

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
            except NotImplementedError as e:
                # a user distribution without expand (torch's Distribution.expand raises with no text)
                raise OptionError(
                    f"importance: the proposal {type(q).__name__} has batch shape {tuple(q.batch_shape)} and the "
                    f"node's distribution has batch shape {tuple(p.batch_shape)} ((*parent plates, *own batch)), but "
                    f"{type(q).__name__}.expand is not implemented{': ' + str(e) if str(e) else ''}. Implement "
                    f"expand(batch_shape) on {type(q).__name__} (docs/your-own-distribution.md), or give a proposal "
                    "(or a callable p -> q) whose batch shape is the node's") from e
            except (RuntimeError, ValueError) as e:
                raise OptionError(
                    f"importance: the proposal's batch shape {tuple(q.batch_shape)} does not broadcast to the "
                    f"node's batch shape {tuple(p.batch_shape)} ({_dims_named(node, p)}): {str(e).rstrip('. ')}. A proposal given as "
                    "raw tensors lines up with the node's dims from the right, as torch broadcasts (its last batch "
                    "dim with the node's last), not by plate. Give its parameters as plate tensors, which are lined "
                    "up with the node's plates by name: a behaviour policy per data point on the data plate, "
                    "`x, logits_q = storch.denote_independent((x, logits_q), 0, 'data')` then "
                    "`proposal=lambda p: Categorical(logits=logits_q)` (docs/estimators/importance.md); or raw "
                    "tensors whose leading dims are the node's parent plates in that order") from e
        _check_same_kind(p, q)
        _check_bounds(p, q)
        _check_multinomial(p, q)
        _check_covers(p, q)
        return q

    def proposal(self, node: Node) -> torch.Tensor:
        q = self._sampler(node)
        x = q.sample((self.n_samples,)).contiguous()  # (a Categorical's draw is a transposed view: as raw_sample)
        with torch.no_grad():  # q's own draws (inside its support); only the detached weights read it
            log_q = node.log_prob(x, q)
        x = _as_values_of(node.distribution, q, x)
        x, log_p, impossible = _possible_draws(node, x, q)
        c = node.state
        c.proposal, c.log_q, c.log_p, c.impossible = q, log_q, log_p, impossible
        return x

    def weighting_function(self, node: Node) -> torch.Tensor:
        c = node.state
        log_ratio = c.log_p.detach() - c.log_q
        if c.impossible is not None:  # p(x) = 0 for q's draw (its sample was replaced): weight 0
            log_ratio = torch.where(c.impossible, torch.full((), -math.inf, dtype=log_ratio.dtype,
                                                             device=log_ratio.device), log_ratio)
        # ⊥(p/q): the importance weights are detached (appendix D.2.2, condition 3 of Theorem 1)
        return log_ratio.exp() / node.n

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        # a draw of q that p cannot produce was replaced by a value p can produce, at weight 0: the user's value
        # there is a stand-in, not q's draw (a self-normalised loss of the user's, log p(z) - log q(z) over the
        # plate, would count it as a draw)
        return node.state.impossible

    def gradient_function(self, node: Node) -> torch.Tensor:
        """l(x) = log p(x | x<i); 0 (any finite value: the weight is 0) where q drew a value p cannot produce."""
        c = node.state
        if c.impossible is None:
            return c.log_p
        return torch.where(c.impossible, torch.zeros((), dtype=c.log_p.dtype, device=c.log_p.device), c.log_p)


def _possible_draws(node: Node, x: torch.Tensor, q: Distribution
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(sample, log_p, impossible)``: q's draws ``x`` with every value p cannot produce replaced by one it
    can, log p of the sample (with gradient, joint over the node's own batch dims) and whether each joint
    draw had a value p cannot produce (``None`` where none had).

    q may draw where p(x) = 0: outside p's support (a Normal for an Exponential, 7 categories for p's 5)
    or on a value p masks (``-inf`` logits, probabilities of exactly 0: the uniform behaviour policy of a
    masked pointer network). p(x) = 0 there, so the weight is 0, but log p = -inf makes MagicBox(l) NaN (a
    NaN loss and gradient), torch's argument validation raises outside the support, and the user's cost
    (w[z], an embedding lookup, +inf on a truncated token) must not see such a value. As the padding
    entries of unordered_set and sum_and_sample, the entry takes a value p can produce instead (p's mode or,
    continuous, its mean; else a point of its support) and keeps weight 0 with l = 0. The replacement is per element of the
    node's own batch dims (p factorises over them), so the joint value is one p can produce.
    """
    p = strict_support(node.distribution)  # probabilities of exactly 0 are impossible values too
    n_event = len(p.event_shape)
    k = len(p.batch_shape) - len(node.parents)  # the node's own batch dims: log p is joint over them
    support = _support(p)
    same = support is None or same_support(support, _support(q))  # p's support unknown: nothing is masked
    inside = None if same else _inside(p, x)
    if inside is None and not same:
        _check_evaluable(p, q, x)
    if inside is None:
        lp = _log_p_of_draws(p, x, q)
        possible = lp.detach() != -math.inf  # (a NaN is left to the checks downstream: it is not p(x) = 0)
    else:  # log p only inside p's support: torch's validation raises outside it
        mask, valid = inside
        lp = _log_p_of_draws(p, torch.where(_event(mask, n_event), x, valid), q)
        possible = mask & (lp.detach() != -math.inf)
    # no value-dependent branch while storch.compile records the step, nor on the meta device (no values)
    static = is_tracing() or x.is_meta
    if not static and bool(possible.all()):  # the common case: every draw is one p can produce
        return x, _joint(lp, k), None
    sub = _possible_value(p, x, static)
    if sub is None:
        if not static:
            raise StorchError(
                f"importance: the proposal {type(q).__name__} drew values that the node's {type(p).__name__} "
                "cannot produce (p(x) = 0), and storch found no value p can produce to put in their place "
                "(p's mode (its mean if continuous) and a point of p.support have p = 0 too): give p a mode or a support "
                "(torch.distributions.Distribution.mode / .support), or a proposal that draws only where p "
                "has mass")
        sub = valid if inside is not None else x
    x = torch.where(_event(possible, n_event), x, sub)
    joint = possible.reshape(possible.shape[:possible.dim() - k] + (-1,)).all(-1) if k > 0 else possible
    return x, _joint(p.log_prob(x), k), ~joint


def _joint(lp: torch.Tensor, k: int) -> torch.Tensor:
    """``lp`` summed over its ``k`` trailing dims (the node's own batch dims), as ``Node.log_prob``."""
    return lp if k <= 0 else lp.sum(tuple(range(-k, 0)))


def _event(mask: torch.Tensor, n_event: int) -> torch.Tensor:
    """``mask`` with ``n_event`` trailing dims of size 1: it broadcasts to a value with event dims."""
    return mask.reshape(mask.shape + (1,) * n_event)


def _log_p_of_draws(p: Distribution, x: torch.Tensor, q: Distribution) -> torch.Tensor:
    """p.log_prob(x) per element for draws ``x`` of q; torch's argument validation of a value outside p's
    support (one storch cannot check beforehand) is said to come from the proposal."""
    try:
        return p.log_prob(x)
    except StorchError:
        raise
    except ValueError as e:
        raise OptionError(_cannot_evaluate(p, q, str(e))) from e


def _cannot_evaluate(p: Distribution, q: Distribution, why: str) -> str:
    return (f"importance: the node's {type(p).__name__} cannot evaluate log p on values drawn from the proposal "
            f"{type(q).__name__}: {why}. A proposal may draw values p cannot produce (they get weight 0) only where "
            f"storch can check p's support ({_support(p)!r}) and knows a value inside it. Give a proposal over "
            "p's values, or a p whose support is a torch.distributions constraint with a value inside it "
            "(transform_to(support) or a lower bound)")


def _check_evaluable(p: Distribution, q: Distribution, x: torch.Tensor) -> None:
    """q's support differs from p's and storch knows no value inside p's to put in place of a draw outside it:
    every draw must be inside p's support. Eagerly torch's argument validation of p.log_prob caught such a
    draw (where on); with validation off, as in a step storch.compile traces, p.log_prob evaluates its
    formula outside the support (a Multinomial of 3 trials on draws of 4: a loss biased by z = 16). So the
    draws are checked against p.support here, at every replayed call where traced (``assume``); a trace is
    refused where p.support cannot be checked on them."""
    try:
        with torch.no_grad():
            mask = p.support.check(x)
    except (NotImplementedError, TypeError, ValueError, RuntimeError, AttributeError):
        mask = None
    if mask is not None and (mask.dtype is not torch.bool or mask.shape != x.shape[:x.dim() - len(p.event_shape)]):
        mask = None
    if mask is None:
        if is_tracing():
            raise OptionError(_cannot_evaluate(p, q, "storch cannot check p.support on them in a step that "
                                               "storch.compile traces (torch's argument validation, which checks "
                                               "them eagerly, is off there: run the step eagerly)"))
        return  # eagerly torch's validation (where on) says it
    if x.is_meta:  # no values
        return
    message = _cannot_evaluate(p, q, "some draws are outside p.support (its check is False)")
    if is_tracing():
        assume(mask.all(), message + " (checked at every call of the step storch.compile traced)")
    elif not bool(mask.all()):
        raise OptionError(message)


def _possible_value(p: Distribution, x: torch.Tensor, static: bool) -> Optional[torch.Tensor]:
    """A value p can produce for each element of a sample (shape of ``x`` without its sample dim). For a
    discrete support p's mode where it has positive probability (a masked Categorical's most probable value);
    for a continuous one p's mean (a point strictly inside the support: the mode may lie on its boundary, an
    Exponential's 0, where a cost's log(z) is -inf and storch.backward() raised NonFiniteCostError on about
    one step in six); else a point of p's support (``transform_to(support)(0)``, a discrete support's lower
    bound) where that has; ``None`` where some element has none (not checked by value where ``static``)."""
    shape = x.shape[1:]
    n_event = len(p.event_shape)
    found, value = None, None
    try:
        discrete = _support(p) is None or bool(p.support.is_discrete)
    except NotImplementedError:  # a dependent constraint that does not say
        discrete = True
    central = (lambda: p.mode) if discrete else (lambda: p.mean)
    for make in (central, lambda: _support_point(p, x[:1])[0]):
        try:
            with torch.no_grad():
                c = make().to(x.dtype).expand(shape)
                ok = p.support.check(c) & torch.isfinite(p.log_prob(c))
        except (NotImplementedError, TypeError, ValueError, RuntimeError, AttributeError, IndexError):
            continue
        if ok.dtype is not torch.bool or ok.shape != shape[:len(shape) - n_event]:
            continue
        if found is None:
            found, value = ok, c
        else:
            value = torch.where(_event(found, n_event), value, c)
            found = found | ok
    if found is None or (not static and not bool(found.all())):
        return None
    return value


def _support(d: Distribution):
    """``d.support``; ``None`` where it is not defined."""
    try:
        return d.support
    except NotImplementedError:
        return None


def _support_point(p: Distribution, x: torch.Tensor) -> torch.Tensor:
    """A value inside p's support, shaped as ``x``; raises where none is known."""
    inside = _inside(p, x)
    if inside is None:
        raise NotImplementedError(f"no value inside the support of {type(p).__name__} is known")
    return inside[1].expand_as(x)


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


def _dims_named(node: Node, p: Distribution) -> str:
    """The node's raw batch dims named for a message: ``plate 'data' (3), plate 'z' (2), own batch (4)``."""
    plates = [f"plate {pl.name!r} ({pl.size})" for pl in node.parents]
    own = tuple(p.batch_shape)[len(node.parents):]
    return ", ".join(plates + [f"own batch ({n})" for n in own]) or "no batch dims"


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
    names = {pl.name: pl for pl in node.parents}
    for n, v in plated.items():
        extra = [pl.name for pl in plates_of(v) if pl.name not in names]
        if extra:
            raise OptionError(
                f"importance: the proposal's parameter {n!r} is on plates {extra} that the node's distribution is "
                f"not on (its plates: {sorted(names)}); a proposal may depend only on what p depends on (data, "
                "earlier nodes that p's parameters carry)")
        for pl in plates_of(v):
            _check_same_plate(n, pl, names[pl.name])
    raw = {n: align(raw_of(v), plates_of(v), node.parents) if n in plated else v for n, v in params.items()}
    # the plate tensors are aligned to the node's parent plates, which lead the copy's batch dims (review
    # r-twentythree: a user's class was refused for its batch shape)
    unplated = rebuild(base, raw, torch.Size(pl.size for pl in node.parents) if plated else torch.Size())
    return Independent(unplated, q.reinterpreted_batch_ndims) if base is not q else unplated


def _check_same_plate(param: str, pl: Plate, own: Plate) -> None:
    """Refuse a proposal parameter whose plate has p's plate's name but is another plate: one of an earlier
    graph (a proposal callable that reads a tensor computed in an earlier step, a dict not updated in this
    one) would be lined up by name and silently give that step's behaviour policy."""
    # (a partition's plate at another step is the same plate: one lineage; align re-indexes it)
    if pl.lineage is own.lineage and pl.size == own.size and pl.independent == own.independent:
        return
    closed = pl.lineage.closed if pl.lineage is not None else None
    why = (f"comes from a graph that was {closed}" if closed is not None else
           f"has size {pl.size} where the node's has {own.size}" if pl.size != own.size else
           "is another plate of that name (another graph's, or one built by hand)")
    raise OptionError(
        f"importance: the proposal's parameter {param!r} is on plate {pl.name!r}, but that plate {why}: it is not "
        f"the node's plate {pl.name!r}, and lining them up by name would give the proposal of another step (its "
        "data points, its behaviour policy). Compute the proposal's parameters in this step's graph (a callable "
        "p -> q that reads a value set in the step must have it set in every step, evaluation steps included)")


def _holds_plates(d, depth: int = 0) -> bool:
    """Whether ``d`` (a distribution or transform) or what it holds has a plate tensor."""
    for v in d.__dict__.values():
        for item in v if isinstance(v, (list, tuple)) else (v,):
            if plates_of(item):
                return True
            if isinstance(item, (Distribution, Transform)) and depth < 8 and _holds_plates(item, depth + 1):
                return True
    return False


def _discrete(d: Distribution) -> Optional[bool]:
    """Whether ``d``'s support is discrete (``support.is_discrete``); ``None`` where torch cannot say."""
    support = _support(d)
    try:
        return None if support is None else bool(support.is_discrete)
    except NotImplementedError:  # a dependent constraint that does not say
        return None


def _check_same_kind(p: Distribution, q: Distribution) -> None:
    """Raise where one of p and q is discrete and the other continuous. A continuous q for a discrete p
    (a Normal or a Uniform for a Bernoulli) almost surely draws values p cannot produce: each got weight 0,
    and the loss and gradient were exactly 0 without a word (found by a tester). A discrete q for a
    continuous p puts its mass on points that p's density gives probability 0: it misses almost all of
    p's values, and p/q would divide a density by a probability (a biased estimate, silently)."""
    dp, dq = _discrete(p), _discrete(q)
    if dp is None or dq is None or dp == dq:
        return
    kind = {True: "discrete", False: "continuous"}
    head = (f"importance: the proposal {type(q).__name__} is {kind[dq]} (support {_shown(q)}) but the node's "
            f"{type(p).__name__} is {kind[dp]} (support {_shown(p)}): ")
    if dp:
        bp = _bounds(_support(p))
        if bp is not None and not isinstance(bp[1], torch.Tensor) and bp[1] == math.inf:  # a Poisson, a Geometric
            give = ("a Poisson, a Geometric or a NegativeBinomial: p's support has no upper bound, so a proposal "
                    "with one (a Binomial, a Categorical) cannot contain it")
        else:
            give = ("a Bernoulli or a Categorical over the same values for a Bernoulli, a Categorical over at least "
                    "p's categories, a Binomial with at least p's total_count or a Poisson for a bounded count")
        raise OptionError(head + (
            "q's draws are almost surely values p cannot produce, each weighed 0, so the loss and gradient "
            f"would be 0. Give a discrete proposal whose support contains p's (it may be wider than p): {give}"))
    raise OptionError(head + (
        "q puts its mass on points that p's density gives probability 0, so it misses almost all of p's "
        "values and the weights p/q (a density over a probability) give a biased estimate. Give a "
        "continuous proposal whose support contains p's (a Normal for a real p, a Normal, Gamma or "
        "Exponential for a positive one)"))


def _shown(d: Distribution) -> str:
    """``d.support`` for a message: its repr, which prints tensor bounds, eagerly; its type while
    ``storch.compile`` traces the step (printing a traced tensor reads its value)."""
    support = _support(d)
    return type(support).__name__.lstrip("_") if is_tracing() else repr(support)


def _bounds(support) -> Optional[tuple]:
    """``(lower, upper)`` of a support that is an interval of the reals or of the integers (numbers or
    tensors, ±inf where unbounded), reinterpreted dims aside; ``None`` for any other constraint."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    inf = math.inf
    if isinstance(support, constraints._Real):
        return -inf, inf
    if isinstance(support, constraints._Boolean):
        return 0, 1
    if isinstance(support, (constraints._GreaterThan, constraints._GreaterThanEq, constraints._IntegerGreaterThan)):
        return support.lower_bound, inf
    if isinstance(support, (constraints._LessThan, constraints._IntegerLessThan)):
        return -inf, support.upper_bound
    if isinstance(support, (constraints._Interval, constraints._HalfOpenInterval, constraints._IntegerInterval)):
        return support.lower_bound, support.upper_bound
    return None


def _check_bounds(p: Distribution, q: Distribution) -> None:
    """Raise where q's support ends before p's (a lower bound above p's, an upper bound below it): q puts no
    mass on values p can produce (a Categorical(5) or a Binomial(4) for a Poisson, an Exponential for a
    Normal), which the weights p/q cannot correct; it was accepted and the estimate was biased. Supports
    with the same ends (open or closed: a boundary point has no mass for a continuous p, and discrete
    supports are closed) and wider ones pass. Compared where both are intervals (``_bounds``); bounds that
    are tensors are per-call values, so while ``storch.compile`` traces the step the check is recorded
    (``assume``)."""
    bp, bq = _bounds(_support(p)), _bounds(_support(q))
    if bp is None or bq is None:
        return
    try:
        with torch.no_grad():
            def ends_before(a, b, below: bool):  # whether p's end a lies outside q's end b
                if not isinstance(b, torch.Tensor) and b == (-math.inf if below else math.inf):
                    return False  # q unbounded there (a Normal, a Poisson's upper end): no tensor read
                a = a.detach() if isinstance(a, torch.Tensor) else a
                b = b.detach() if isinstance(b, torch.Tensor) else b
                out = a < b if below else a > b
                return out.any() if isinstance(out, torch.Tensor) else out
            missed = [ends_before(bp[0], bq[0], True), ends_before(bp[1], bq[1], False)]
    except (RuntimeError, TypeError):  # bounds that do not broadcast: not compared
        return
    if any(isinstance(m, torch.Tensor) and m.is_meta for m in missed):  # no values
        return
    message = (
        f"importance: the proposal {type(q).__name__}'s support {_shown(q)} does not contain the node's "
        f"{type(p).__name__}'s support {_shown(p)}: q puts no mass on values p can produce, which the "
        "importance weights p/q cannot correct (a biased estimate). Give a proposal whose support contains "
        "p's (it may be wider: a Normal for an Exponential, a Poisson for a Binomial, a Poisson or a Geometric "
        "for a Poisson)")
    tensors = [m for m in missed if isinstance(m, torch.Tensor)]
    if any(m is True for m in missed):
        raise OptionError(message)
    if not tensors:
        return
    missed = torch.stack([m.to(torch.bool) for m in tensors]).any()
    if is_tracing():  # no value-dependent branch in a trace: checked at every call
        assume(~missed, message + " (checked at every call of the step storch.compile traced)")
    elif bool(missed):
        raise OptionError(message)


def _value_dtype(p: Distribution) -> Optional[torch.dtype]:
    """The dtype of p's samples, read without drawing (which would move the random numbers): its mode's,
    else its enumerated support's, else its mean's (a TransformedDistribution without them: its base's,
    whose dtype its transforms keep); ``None`` where none is known."""
    for read in (lambda: p.mode, lambda: p.enumerate_support(expand=False), lambda: p.mean):
        try:
            value = read()
        except (NotImplementedError, TypeError, ValueError, RuntimeError, AttributeError):
            continue
        if isinstance(value, torch.Tensor):
            return value.dtype
    if isinstance(p, (Independent, TransformedDistribution)):
        return _value_dtype(p.base_dist)
    return None


def _as_values_of(p: Distribution, q: Distribution, x: torch.Tensor) -> torch.Tensor:
    """q's draws ``x`` in the dtype of p's samples: the user's code gets the dtype p's own samples have.

    Where both are discrete (integer values, so the cast is exact): a Categorical proposal's integer draws
    for a Bernoulli crashed in Bernoulli.log_prob ("result type Float can't be cast to the desired output
    type Long"), and a Binomial proposal handed a Categorical node's code floats (an index w[z] fails).
    Floating draws of a q in another floating dtype, of the same family too: a float32 proposal (built with
    the default dtype) for a float64 or bfloat16 model handed the model float32 values (its F.linear failed
    with "mat1 and mat2 must have the same dtype"), and a float64 one silently upcast a float32 model. (log q
    is evaluated before, on the draws as q drew them; log p after, on the values the user's code gets.)"""
    dtype = _value_dtype(p)
    if dtype is None or dtype == x.dtype:
        return x
    if (_discrete(p) and _discrete(q)) or (x.is_floating_point() and dtype.is_floating_point):
        return x.to(dtype)
    return x


def _check_multinomial(p: Distribution, q: Distribution) -> None:
    """Raise where p and q are Multinomials and q cannot draw p's values: another ``total_count`` (q's counts
    sum to another number than p's: torch's Multinomial support accepts counts summing to at most
    ``total_count``, so p weighed q's draws of 2 trials as values of its own of 3), or probability exactly 0
    on a category where p's is positive. torch's Multinomial has no ``enumerate_support``, so the cover check
    never saw it: both were accepted and the gradient was biased (z = 219 and 38.8; found by a tester). The
    probabilities are per-call values: while ``storch.compile`` traces the step that part is recorded
    (``assume``)."""
    p, q = base_distribution(p), base_distribution(q)  # (an Independent of Multinomials: review r-twentythree)
    if not (isinstance(p, Multinomial) and isinstance(q, Multinomial)):
        return
    head = f"importance: the proposal Multinomial puts no mass on values that the node's {type(p).__name__} can draw: "
    if q.total_count != p.total_count:
        raise OptionError(
            head + f"its total_count is {q.total_count} and p's is {p.total_count}, so its counts sum to another "
            "number than p's and the importance weights p/q cannot correct that (a biased estimate). Give a proposal "
            f"that can: a Multinomial with total_count={p.total_count} and positive probability wherever p's is positive")
    with torch.no_grad():
        missed = ((p.probs.detach() > 0) & (q.probs.detach() == 0)).any()
    message = head + ("its probability is exactly 0 on a category where p's is positive; the importance weights "
                      "p/q cannot correct that (a biased estimate). Give a proposal with positive probability "
                      "wherever p's is positive")
    if is_tracing():
        assume(~missed, message + " (checked at every call of the step storch.compile traced)")
    elif missed.is_meta:
        return
    elif bool(missed):
        raise OptionError(message)


_MAX_CHECKED = 4096  # values of a finite support checked one by one


def _check_covers(p: Distribution, q: Distribution) -> None:
    """Raise where p's finite support shows that q puts no mass on a value p can draw (a proposal over fewer
    categories than p, or with a probability of exactly 0 where p's is positive): the importance weights
    p/q cannot correct that, and the estimate would be biased without a word (found by porting an
    off-policy correction whose behaviour policy had 3 actions of 4). Only p's support must be finite
    (``_finite_values``: enumerated, an ``Independent`` one through its base, up to ``_MAX_CHECKED`` values);
    q is any distribution with ``log_prob`` on those values: an ε-greedy ``MixtureSameFamily`` whose ε is
    annealed to 0, an ``Independent`` over the action dims of a multi-binary or multi-discrete action
    (each was accepted before, as the check ran only where both enumerated their support: biased by up to
    105.9 standard errors). Where p and q are ``Independent`` over the same dims, each marginal is checked
    (q covers p's joint values iff every marginal of q covers p's). Continuous supports are not checked
    (documented: q must put mass wherever p does). While ``storch.compile`` traces the step the check is
    recorded (``assume``): the probabilities are per-call values, so it runs at every replayed call."""
    names, per = (type(q).__name__, type(p).__name__), ""
    while (type(p) is Independent and type(q) is Independent
           and p.reinterpreted_batch_ndims == q.reinterpreted_batch_ndims
           and p.base_dist.batch_shape == q.base_dist.batch_shape):
        p_, q_ = p.base_dist, q.base_dist  # both factorise over the same dims: per marginal
        if _finite_count(p_) is None:
            break
        p, q, per = p_, q_, " per element"
    values = _finite_values(p)  # (K, *batch, *event)
    if values is None or values.is_meta:
        return
    why = ""
    with torch.no_grad():
        lp = _strict(p).log_prob(values)
        lq, other = None, _value_dtype(q)
        for dtype in [values.dtype] + ([other] if other is not None and other != values.dtype else []):
            try:  # p's values as they are, else in the dtype of q's values (a q whose log_prob needs floats)
                lq, why = _strict(q).log_prob(values.to(dtype)), ""  # probs of exactly 0: -inf (torch clamps them)
                break
            except StorchError:  # storch's own errors (a PlateError is a ValueError) say what was wrong
                raise
            except (ValueError, IndexError, RuntimeError) as e:  # a value outside q's support (torch's validation)
                why = f" (q.log_prob raised on them: {str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        missed = None if lq is None else (torch.isfinite(lp) & (lq == -math.inf)).any()
    message = (
        f"importance: the proposal {names[0]} puts no mass on values that the node's {names[1]} can draw "
        f"({values.shape[0]} values{per}{why}: a proposal over fewer values, or with probability 0 where p's is "
        "positive, an ε-greedy mixture with ε = 0); the importance weights p/q cannot correct that and the "
        "estimate would be biased. Give a proposal over the same values with positive probability wherever p's "
        "is positive")
    if missed is not None and is_tracing():  # no value-dependent branch in a trace: checked at every call
        assume(~missed, message + " (checked at every call of the step storch.compile traced)")
        return
    if missed is None or bool(missed):
        raise OptionError(message)


def _finite_count(d: Distribution) -> Optional[int]:
    """How many values ``d`` can draw (an ``Independent``'s joint values: its base's count to the power of its
    reinterpreted elements; a ``MixtureSameFamily``'s: its components'); ``None`` where its support is not
    finite, not known, or has more than ``_MAX_CHECKED`` values. Builds no values."""
    if d.has_enumerate_support:
        try:
            n = d.enumerate_support(expand=False).shape[0]
        except NotImplementedError:  # (a Binomial whose total_count differs between elements: not checked)
            return None
        return n if n <= _MAX_CHECKED else None
    if type(d) is Independent:
        k = _finite_count(d.base_dist)
        if k is None:
            return None
        batch = d.base_dist.batch_shape
        m = math.prod(batch[len(batch) - d.reinterpreted_batch_ndims:])
        if m > 0 and k > 1 and m * math.log(k) > math.log(_MAX_CHECKED) + 1e-9:
            return None
        return k ** m
    if isinstance(d, MixtureSameFamily):
        return _finite_count(d.component_distribution)
    interval = _integer_interval(d)
    if interval is not None:
        n = interval[1] - interval[0] + 1
        return n if n <= _MAX_CHECKED else None
    return None


def _integer_interval(d: Distribution) -> Optional[tuple[int, int]]:
    """``(lower, upper)`` of a scalar support ``{lower, ..., upper}`` (``constraints.integer_interval`` with
    number bounds, or ``constraints.boolean``) of a distribution without ``enumerate_support`` (a user's class:
    its values are listed from the support, for the cover check); ``None`` otherwise."""
    if d.has_enumerate_support or d.event_shape != torch.Size():
        return None
    support = _support(d)
    if isinstance(support, constraints._Boolean):
        return 0, 1
    if isinstance(support, constraints._IntegerInterval):
        lower, upper = support.lower_bound, support.upper_bound
        if isinstance(lower, (int, float)) and isinstance(upper, (int, float)) and math.isfinite(lower) \
                and math.isfinite(upper) and int(lower) == lower and int(upper) == upper and upper >= lower:
            return int(lower), int(upper)
    return None


def _finite_values(d: Distribution) -> Optional[torch.Tensor]:
    """Every value ``d`` can draw, ``(K, *batch, *event)`` (``enumerate_support(expand=True)``; an
    ``Independent``'s joint values from its base's, over its reinterpreted dims; a ``MixtureSameFamily``'s
    from its components', which share their values); ``None`` where :func:`_finite_count` is."""
    if _finite_count(d) is None:
        return None
    if d.has_enumerate_support:
        return d.enumerate_support(expand=True)
    if type(d) is Independent:
        values = _finite_values(d.base_dist)  # (k, *outer, *inner, *base event)
        if values is None:
            return None
        batch = d.base_dist.batch_shape
        r = d.reinterpreted_batch_ndims
        outer, inner, ev = batch[:len(batch) - r], batch[len(batch) - r:], d.base_dist.event_shape
        k, m = values.shape[0], math.prod(inner)
        n = k ** m
        flat = values.reshape((k,) + tuple(outer) + (m,) + tuple(ev))
        # every combination of one of the k values per reinterpreted element: (n, m) indices
        digits = torch.arange(n, device=values.device).unsqueeze(-1) // (k ** torch.arange(m - 1, -1, -1, device=values.device))
        index = (digits % k).reshape((n,) + (1,) * len(outer) + (m,) + (1,) * len(ev))
        joint = flat.gather(0, index.expand((n,) + tuple(outer) + (m,) + tuple(ev)))
        return joint.reshape((n,) + tuple(d.batch_shape) + tuple(d.event_shape))
    interval = _integer_interval(d)
    if interval is not None:  # a user's class over {lower, ..., upper}: its values in its samples' dtype
        dtype = _value_dtype(d) or torch.long
        values = torch.arange(interval[0], interval[1] + 1, dtype=dtype)
        return values.reshape((-1,) + (1,) * len(d.batch_shape)).expand((values.shape[0],) + tuple(d.batch_shape))
    values = _finite_values(d.component_distribution)  # a MixtureSameFamily (the only other counted case)
    return None if values is None else values.select(1 + len(d.batch_shape), 0)  # the components' values are the same


def _strict(d: Distribution) -> Distribution:
    """``strict_support`` (``log_prob = -inf`` where a probability is exactly 0) through an ``Independent`` and
    the parts of a ``MixtureSameFamily`` (an ε-greedy proposal whose ε is 0: torch's clamped probabilities
    gave its greedy part a finite log-probability on the values it never draws)."""
    if type(d) is Independent:
        base = _strict(d.base_dist)
        return d if base is d.base_dist else Independent(base, d.reinterpreted_batch_ndims, validate_args=False)
    if type(d) is MixtureSameFamily:
        mix, comp = strict_support(d.mixture_distribution), _strict(d.component_distribution)
        if (mix is d.mixture_distribution and comp is d.component_distribution) or not isinstance(mix, Categorical):
            return d  # (strict_support gives a Categorical for a Categorical: -inf logits where probs are 0)
        return MixtureSameFamily(mix, comp, validate_args=False)
    return strict_support(d)
