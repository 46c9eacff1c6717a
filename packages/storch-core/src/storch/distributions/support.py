"""The support of a distribution as the enumerating estimators see it: the values they walk
(``enumeration_support``), and a copy whose ``log_prob`` is ``-inf`` on the values it never draws
(``strict_support``: probabilities of exactly 0, infinite logits, a Poisson's zero rate).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch.distributions import (Bernoulli, Binomial, Categorical, Distribution, Independent, MixtureSameFamily,
    OneHotCategorical, Poisson)

from ..errors import UnsupportedDistributionError
from ..plates.tensor import raw_of
from .parameters import base_distribution, given_by_probs

__all__ = ["enumeration_support", "check_enumeration", "strict_support", "varying_total_count"]


def enumeration_support(d: Distribution) -> torch.Tensor:
    """``d.enumerate_support(expand=False)``: every value, shape ``(K, 1, ..., 1, *event)``.

    A ``Binomial`` whose ``total_count`` differs between entries (a count per data point), which
    torch's ``enumerate_support`` refuses, gets the counts 0..max(total_count): a count above an
    entry's own total has log-probability -inf there (an impossible value, which ``expect`` weighs 0
    and never hands to the cost).
    """
    try:
        return d.enumerate_support(expand=False)
    except NotImplementedError as e:
        if not isinstance(d, Binomial):
            raise UnsupportedDistributionError(
                f"{type(d).__name__} declares has_enumerate_support = True, but its enumerate_support raised "
                f"NotImplementedError({str(e)!r}): an enumerating estimator (expect, unordered_set, sum_and_sample) "
                "walks the values it returns. Implement enumerate_support(expand=True) (every value, shape "
                "(K, *batch_shape, *event_shape); with expand=False (K, 1, ..., 1, *event_shape)), or set "
                "has_enumerate_support = False and use a sampling estimator (e.g. 'score') for this node") from e
        k = int(d.total_count.max())
        values = torch.arange(1 + k, dtype=d._param.dtype, device=d._param.device)
        return values.view((-1,) + (1,) * len(d.batch_shape))


def _count_varies(d: Distribution) -> bool:
    """Whether ``d`` is a ``Binomial`` whose ``total_count`` differs between entries (torch's
    ``enumerate_support`` refuses it: one shared support 0..N per distribution). ``total_count`` may be
    a plate tensor (entries of its plates count too: the raw distribution's batch holds them). Read by
    value (torch's own check reads it too); a tensor without values (meta, or batched by vmap) is not
    read."""
    if not isinstance(d, Binomial):
        return False
    count = raw_of(d.__dict__.get("total_count"))
    if not isinstance(count, torch.Tensor) or count.numel() <= 1 or count.is_meta:
        return False
    if torch._C._functorch.is_batchedtensor(count):
        return False
    count = count.detach()
    return bool((count != count.reshape(-1)[0]).any())


def varying_total_count(d: Distribution) -> Optional[str]:
    """Why an estimator that draws from torch's ``enumerate_support`` (``unordered_set``,
    ``sum_and_sample``: they sample the support's values without replacement) cannot take ``d``: a
    ``Binomial`` (under one ``Independent``) whose ``total_count`` differs between entries, for which
    torch's ``enumerate_support`` raises ``NotImplementedError`` (the values 0..N are one tensor shared
    by every entry). ``None`` otherwise. ``expect`` takes such a Binomial (:func:`enumeration_support`:
    0..max(total_count), the counts above an entry's own total impossible there).

    The reason completes ``f"estimator {name!r} does not support {type(d).__name__} "`` (as
    ``UnsupportedDistributionError``'s messages read) and says what to use instead. Call it in
    ``check_distribution`` and ``supports`` alike, so that the registry's list of supporting estimators
    agrees with the refusal. ``d`` may hold plate tensors. Public as ``storch.extending.varying_total_count``.
    """
    base = base_distribution(d)
    if not _count_varies(base):
        return None
    count = raw_of(base.total_count).detach()
    values = sorted({int(v) for v in count.reshape(-1)[:64].tolist()})
    shown = ", ".join(str(v) for v in values[:8]) + (", ..." if len(values) > 8 or count.numel() > 64 else "")
    return (f"with a total_count that differs between entries ({shown}): torch's enumerate_support, whose values "
            "this estimator samples without replacement, enumerates one support 0..N shared by every entry and "
            "refuses a count per entry. Use 'expect' (exact: it enumerates 0..max(total_count) and weighs the counts "
            "above an entry's own total 0), a sampling estimator such as 'score', or one Binomial node per distinct "
            "total_count (each with a single count)")


def check_enumeration(d: Distribution) -> None:
    """Refuse a distribution written outside torch whose ``enumerate_support`` an enumerating estimator
    cannot walk: one that raises ``NotImplementedError`` although ``has_enumerate_support`` is set, or
    whose values are not laid out as torch lays them out with ``expand=False``: ``(K, 1, ..., 1,
    *event_shape)``, one size-1 dim per batch dim (or no batch dims at all: the same values for every
    entry), which the estimators read as ``K`` values of the event shape.
    Such a layout (an event dim declared as a batch dim) failed deep inside an estimator with torch's
    reshape or expand error. Read once per node, where storch first reads the support (torch's own
    classes are not read: their layout is torch's).

    Raises:
        UnsupportedDistributionError: saying which shape was returned and which one is needed.
    """
    cls = type(d)
    if cls.__module__.startswith("torch.distributions.") or cls in _STRICT_CLASSES:
        return
    values = enumeration_support(d)
    batch, event = d.batch_shape, d.event_shape
    shape = tuple(values.shape) if isinstance(values, torch.Tensor) else None
    if shape is not None and len(shape) >= 1 + len(event) and shape[len(shape) - len(event):] == tuple(event):
        middle = shape[1:len(shape) - len(event)]
        if not middle or (len(middle) == len(batch) and all(m == 1 for m in middle)):
            return
    got = f"a tensor of shape {shape}" if shape is not None else f"a {type(values).__name__}"
    raise UnsupportedDistributionError(
        f"{cls.__name__}.enumerate_support(expand=False) returned {got}, but its batch_shape is {tuple(batch)} and "
        f"its event_shape {tuple(event)}: an enumerating estimator needs every value laid out as (K, *batch_shape, "
        f"*event_shape) = (K, {', '.join(str(n) for n in (*batch, *event))}) with expand=True, and (K, "
        f"{', '.join(['1'] * len(batch) + [str(n) for n in event])}) with expand=False (K values). Check that "
        "batch_shape and event_shape (given to Distribution.__init__) say which dims are independent entries and "
        "which make up one value (a vector-valued sample's last dim is an event dim, not a batch dim), and that "
        "enumerate_support lays its values out by them")


# -- values a distribution never draws ---------------------------------------------------------


class _StrictBernoulli(Bernoulli):
    """A ``Bernoulli`` whose ``log_prob`` is ``-inf`` on the value it never draws. Given by probabilities:
    where the probability is exactly 0 (value 1 at p = 0, value 0 at p = 1); torch's own ``log_prob``
    clamps p to [eps, 1 - eps] (log p(1) = -15.9 at p = 0 in float32) although ``sample`` never draws
    such a value. Given by logits: where a logit is infinite (a masked bit, ``logits + mask`` with
    ``mask = -inf``, or a certain one at ``+inf``), whose torch ``log_prob`` is NaN for the value it
    always draws (inf - inf), so an enumerating estimator found no possible joint value at all
    (:func:`_infinite_logits_log_prob`). Elsewhere the same values and derivatives as torch's."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if not given_by_probs(self):
            return _infinite_logits_log_prob(self.logits, value, self.logits.new_ones(()),
                                             lambda logits: Bernoulli(logits=logits, validate_args=False).log_prob(value))
        lp = super().log_prob(value)
        p = self.probs
        never = torch.where(value.to(torch.bool), p == 0, p == 1)
        return lp.masked_fill(never, -math.inf)


class _StrictBinomial(Binomial):
    """A ``Binomial`` whose ``log_prob`` is ``-inf`` on the counts it never draws: given by probabilities,
    any count above 0 at p = 0 and any below ``total_count`` at p = 1; given by logits, every count but
    0 at a logit of ``-inf`` and every count but ``total_count`` at ``+inf`` (torch's is NaN there), as
    :class:`_StrictBernoulli`."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        n = self.total_count
        # a count above an entry's own total (expect enumerates 0..max(total_count) where the total differs
        # between entries): -inf, computed at the count 0 in its place (torch's lgamma(n - k + 1) at a pole
        # there, whose derivatives in total_count are NaN), so no NaN reaches a derivative of any order
        # (always, not by value: a step that storch.compile traced gives the eager result on any counts)
        above = value > n
        safe = torch.where(above, torch.zeros((), dtype=value.dtype, device=value.device), value)
        lp = self._log_prob_within(safe)
        return torch.where(above, torch.full((), -math.inf, dtype=lp.dtype, device=lp.device), lp)

    def _log_prob_within(self, value: torch.Tensor) -> torch.Tensor:
        """log p(value) for counts 0..total_count."""
        if not given_by_probs(self):
            n = self.total_count
            return _infinite_logits_log_prob(self.logits, value, n, lambda logits: _binomial_log_prob(n, logits, value))
        lp = _binomial_log_prob(self.total_count, self.logits, value)  # (torch's, smooth at a logit of 0)
        p = self.probs
        never = ((p == 0) & (value > 0)) | ((p == 1) & (value < self.total_count))
        return lp.masked_fill(never, -math.inf)


class _StrictPoisson(Poisson):
    """A ``Poisson`` whose ``log_prob`` has finite derivatives where a rate is exactly 0
    (:func:`_poisson_log_prob`; torch's are NaN there); elsewhere torch's values and derivatives."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return _poisson_log_prob(self.rate, value)


def _poisson_log_prob(rate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log p(value | rate) = value log rate - rate - lgamma(value + 1) of a Poisson, for rates >= 0.

    torch allows a rate of exactly 0 (a zero-inflated Poisson ``Poisson(lam * z)``, z ~ Bernoulli): a
    point mass at 0, log p(0) = -rate (derivative -1, finite), and every count above 0 impossible
    (-inf, never drawn). torch's ``value.xlogy(rate)`` has those values, but its derivative with
    respect to the rate is value / rate = 0 / 0 = NaN at (0, 0), which poisoned the gradient of every
    parameter upstream (``lam``) although d rate / d lam is 0 there. Here the log term reads 1 in
    place of a zero rate where the value is 0 (xlogy(0, 1) = 0, derivative 0 / 1 = 0) and 0 where it
    is above 0 (xlogy(k, 0) = -inf, the impossible value): one ``torch.where``, whose backward sends
    the rate no derivative through the log term at those entries (and none of the NaN or infinity that
    it computes there), so the rate gets exactly d(-rate) = -1. Where the rate is above 0 the values
    and derivatives (of every order) are torch's.
    """
    safe = torch.where(rate > 0, rate, value == 0)  # (a bool promoted to the rate's dtype: 1 or 0)
    return value.xlogy(safe) - rate - (value + 1).lgamma()


def _binomial_log_prob(total_count: torch.Tensor, logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log p(value) of a Binomial: torch's formula, k·logits - n·softplus(logits) + log C(n, k), with the
    softplus written ``logaddexp(0, logits)``.

    torch writes it ``clamp(logits, min=0) + log1p(exp(-|logits|))`` (its ``_clamp_by_zero``): the two kinks
    cancel in the value and the first derivative, but autograd differentiates abs and clamp at exactly 0
    as constants, so its second derivative there is 0 instead of -n/4. A logit of exactly 0 (probs 0.5, a
    parameter initialised at zero) then got every order-2 estimate of a score function wrong, ``expect``'s
    exact enumeration included (|z| 32 for score, 58 for vimco, ``tests/all/test_distribution_zoo.py``).
    ``logaddexp`` computes the same max-shifted value, and its derivatives of every order are analytic.
    """
    return (value * logits - total_count * torch.logaddexp(torch.zeros_like(logits), logits)
            + torch.lgamma(total_count + 1) - torch.lgamma(value + 1) - torch.lgamma(total_count - value + 1))


def _infinite_logits_log_prob(logits: torch.Tensor, value: torch.Tensor, top: torch.Tensor,
                              torch_log_prob: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """log p(value) of a Bernoulli or Binomial given by ``logits`` that may be infinite.

    A logit of ``-inf`` draws 0 surely and one of ``+inf`` draws ``top`` (1, or ``total_count``): log p
    is 0 on that value and ``-inf`` on every other. torch's formula gives NaN there (inf - inf, or
    0 * inf), so it runs on the finite logits only (the infinite ones replaced by 0 and their result
    discarded: no NaN in the derivatives either); there the values and derivatives are torch's.
    """
    infinite = torch.isinf(logits)
    lp = torch_log_prob(torch.where(infinite, torch.zeros_like(logits), logits))
    sure = torch.where(logits > 0, top.to(logits.dtype), torch.zeros((), dtype=logits.dtype, device=logits.device))
    fixed = torch.where(value == sure, torch.zeros_like(lp), torch.full_like(lp, -math.inf))
    return torch.where(infinite, fixed, lp)


_STRICT = {Bernoulli: _StrictBernoulli, Binomial: _StrictBinomial, Poisson: _StrictPoisson}
_STRICT_CLASSES = frozenset(_STRICT.values())

# a class's own members that are bookkeeping, not behaviour
_BOOKKEEPING = frozenset(("__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                          "__firstlineno__", "__static_attributes__", "__orig_bases__", "__parameters__", "__init__"))


def _changes_only_init(t: type, base: type) -> bool:
    """Whether the classes from ``t`` up to ``base`` redefine no member of ``base`` but ``__init__`` (which
    only sets the tensors that log p reads, from where the walk would start)."""
    for c in t.__mro__[:t.__mro__.index(base)]:
        if any(k not in _BOOKKEEPING and hasattr(base, k) for k in vars(c)):
            return False
    return True


_BINOMIAL_LIKE: dict[type, bool] = {Binomial: True}


def binomial_like(t: type) -> bool:
    """Whether ``t`` is torch's ``Binomial`` or a user's subclass of it that changes only ``__init__`` (a
    ``Binomial`` of a fixed count, say): its log p is torch's, which storch computes by
    :func:`_binomial_log_prob` instead (torch's second derivative at a logit of exactly 0 is 0). A subclass
    read as torch's own class got every order-2 estimate wrong there (|z| 32 for score and importance, expect's
    exact enumeration too). Cached per type."""
    v = _BINOMIAL_LIKE.get(t)
    if v is None:
        v = _BINOMIAL_LIKE[t] = (issubclass(t, Binomial) and t not in _STRICT_CLASSES
                                 and _changes_only_init(t, Binomial))
    return v


def binomial_components(c: Distribution) -> bool:
    """Whether a mixture's component distribution ``c`` is :func:`binomial_like` or an ``Independent`` of such: its
    log p is computed by :func:`_binomial_log_prob` (``raw_log_prob``, :func:`strict_support`), not torch's."""
    return binomial_like(type(c.base_dist if type(c) is Independent else c))


def strict_support(d: Distribution, traced: bool = False, drawn_only: bool = False) -> Distribution:
    """``d`` with ``log_prob = -inf`` on every value it never draws: probabilities that are exactly 0.

    ``torch.distributions`` computes ``log_prob`` of a ``Bernoulli``, ``Binomial``, ``Categorical`` or
    ``OneHotCategorical`` given by ``probs`` from clamped probabilities, so a value of probability 0
    (a masked action ``probs * mask``, a saturated ``sigmoid``) gets log p = log(eps) (-15.9 in
    float32) while ``sample`` never draws it. An estimator that enumerates the support or samples it
    without replacement (``expect``, ``unordered_set``, ``sum_and_sample``) reads those log
    probabilities to decide which values exist: the base class passes every estimator with
    ``requires_enumerate_support`` its distribution through this (``storch.estimators.first_steps._sample_node``,
    ``storch.estimators.partition_steps._extend_partition``), so such values are impossible (``-inf``) there as they are with ``-inf``
    logits, and the user's cost never sees them. A ``Bernoulli`` or ``Binomial`` given by ``logits``
    with an infinite logit (``logits + mask``, mask ``-inf`` on a masked bit) needs the same: torch's
    ``log_prob`` is NaN on the value such a logit always draws, so no joint value looked possible
    (``unordered_set`` drew one impossible value with a zero gradient, ``expect`` gave NaN).
    A ``Poisson`` with a rate of exactly 0 (a zero-inflated Poisson ``Poisson(lam * z)``) has torch's
    values (log p(0) = 0 there, -inf above 0) but NaN derivatives (``value.xlogy(rate)``: 0 / 0), which
    made the gradient of every parameter upstream NaN (``importance`` reads this log_prob).
    A ``Binomial`` always gets the copy: its ``log_prob`` (:func:`_binomial_log_prob`) has the right second
    derivative at a logit of exactly 0 (probs 0.5, a parameter initialised at zero), where torch's is 0;
    and where ``total_count`` differs between entries, ``expect`` enumerates 0..max(total_count)
    (:func:`enumeration_support`), and the copy's ``log_prob`` is ``-inf`` above an entry's own total
    (computed at count 0 there: no NaN in any derivative) where torch's, which validates its arguments by
    default, raised.

    A ``Categorical`` or ``OneHotCategorical`` given by ``logits`` whose probability is exactly 0 at a finite
    logit (a ``-1e9`` mask, whose ``exp`` underflows; checked by value; with ``traced``, the copy always, its
    mask by tensor ops) gets ``-inf`` there, unless ``drawn_only``: a caller that reads log p only at values drawn
    by ``d`` or by a distribution with the same underflowed logits (vimco at its draws; spsa's perturbed leaves at
    their siblings' draws, whose logits differ by a small step), where the copy changes nothing, skips that check
    (a softmax and a value read per call). go and importance keep it: they read values beside or not from draws.

    Returns ``d`` itself unless it is a ``Binomial`` or (an ``Independent`` of) one of those four, given by ``probs``,
    with a probability that is exactly 0 (checked by value; with ``traced``, which
    ``storch.extending.strict_support`` passes while ``storch.compile`` records the step: whenever it
    is given by ``probs``, so that the program does not depend on the values), or a ``Bernoulli`` /
    ``Binomial`` given by ``logits`` with an infinite logit (checked by value; with ``traced``, always:
    its ``log_prob`` is a ``torch.where`` on the logits, so a step that ``storch.compile`` traced with
    finite logits gives the eager result when a replayed call meets infinite ones, where torch's NaN
    made ``expect``'s value and gradient NaN), or a ``Poisson`` with a
    rate of exactly 0 (checked by value; with ``traced``, always). Otherwise a copy that samples as ``d``
    does (the same random numbers) and has the same log-probabilities, with the same derivatives, on
    every value it can draw: a ``Categorical`` / ``OneHotCategorical`` with ``-inf`` logits there, a
    ``Bernoulli`` / ``Binomial`` whose ``log_prob`` masks those values, a ``Poisson`` whose ``log_prob``
    (:func:`_poisson_log_prob`) has finite derivatives at a zero rate. The derivative
    with respect to a probability that is exactly 0 is not estimated (it depends on the cost of a
    value that is never drawn); the estimates are of the derivative within the support.
    """
    t = type(d)
    if t is Independent:
        base = strict_support(d.base_dist, traced, drawn_only)
        return d if base is d.base_dist else Independent(base, d.reinterpreted_batch_ndims, validate_args=False)
    if t is Poisson:
        # a rate of exactly 0: torch's log_prob has the right values but NaN derivatives (checked by value;
        # while traced always, so that the program does not depend on the values)
        rate = d.rate
        if not traced and not rate.is_meta and not bool((rate == 0).any()):
            return d
        new = _StrictPoisson.__new__(_StrictPoisson)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    if t is MixtureSameFamily:
        # Binomial components are always copied (their smooth log p): the mixture over the copies, so that its log p
        # (importance's and vimco's read it here) is raw_log_prob's (the score walk caches one verdict for both)
        comp = d.component_distribution
        if not binomial_components(comp):
            return d
        return MixtureSameFamily(d.mixture_distribution, strict_support(comp, traced, drawn_only), validate_args=False)
    if t is not Binomial and binomial_like(t):  # (a user's subclass changing only __init__: the same as a Binomial)
        t = Binomial
    if t not in (Bernoulli, Binomial, Categorical, OneHotCategorical):
        return d
    inner = d._categorical if t is OneHotCategorical else d
    strict = _STRICT.get(t)
    if t is Binomial:
        # always the copy: its log_prob is smooth at a logit of exactly 0 (_binomial_log_prob; torch's second
        # derivative is 0 there), which no value check can skip. It also covers a total_count per entry:
        # expect enumerates 0..max(total_count), and a count above an entry's own total is an impossible
        # value there (torch's log_prob, which validates, refused it); no value is read (storch.compile's
        # trace refuses a value read: go's compiled Binomial step)
        new = strict.__new__(strict)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    if not given_by_probs(inner):
        # given by logits: a Categorical's -inf logits are -inf log-probabilities already; a Bernoulli's or
        # Binomial's infinite logits make torch's log_prob NaN on the value they always draw, and -inf or
        # NaN on the others (checked by value; while traced, the copy always: the program must not depend
        # on values, and the copy's log_prob is exact at finite and infinite logits alike)
        if strict is None:
            # (drawn_only: log p read at drawn values only, which an underflowed logit never is: no value read)
            return d if drawn_only else _underflowed_logits(d, inner, t, traced)
        logits = inner.logits
        if not traced and (logits.is_meta or not bool(torch.isinf(logits).any())):
            return d
        new = strict.__new__(strict)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    p = inner.probs
    never = (p == 0) | (p == 1) if strict is not None else p == 0
    if not traced and not p.is_meta and not bool(never.any()):
        return d
    if strict is not None:
        new = strict.__new__(strict)
        new.__dict__.update(d.__dict__)
        new._validate_args = False
        return new
    return _without(d, inner, t, never)


def _underflowed_logits(d: Distribution, inner: Categorical, t: type, traced: bool) -> Distribution:
    """A ``Categorical`` / ``OneHotCategorical`` given by logits, with ``-inf`` logits where a finite logit's
    probability is exactly 0 in its dtype: a mask written with a large negative number,
    ``logits.masked_fill(mask, -1e9)``, whose ``exp`` underflows, so torch's ``sample`` never draws the value,
    as with a ``-inf`` logit. Its ``log_prob`` is finite (-1e9), so an enumerating estimator counted it
    possible: ``unordered_set`` with more samples than possible tours handed tours that visit a city twice to
    the cost (weight 0), and ``sum_and_sample`` replayed a remembered sequence through a masked token.
    ``d`` itself where no logit underflows (checked by value). While ``storch.compile`` traces, the copy always,
    its mask computed by tensor ops (no value read), so that the program does not depend on the values: a
    compiled step skipped the check and handed the cost the masked values at weight 0 (a cost infinite there,
    NaN), where the eager step never did."""
    logits = inner.logits
    if not traced and logits.is_meta:
        return d
    with torch.no_grad():
        # torch's own probabilities (Categorical.probs is softmax(logits), what sample draws from), not exp(logits):
        # the two round differently near the underflow (a float32 logit of -97.065 beside 1000 zeros has
        # probability 1.4e-45 by softmax and exp 0; in float16 one of -10.42 the reverse), and a value torch can
        # draw must not get log p = -inf. Computed here, not read from the lazy ``probs`` (no_grad: the cached
        # tensor would be detached)
        never = torch.isfinite(logits) & (torch.softmax(logits, -1) == 0)
        if not traced and not bool(never.any()):
            return d
    return _without(d, inner, t, never)


def _without(d: Distribution, inner: Categorical, t: type, never: torch.Tensor) -> Distribution:
    """A copy of the ``Categorical`` (or ``OneHotCategorical``) ``d`` whose logits are ``-inf`` where ``never``."""
    logits = inner.logits
    c = Categorical.__new__(Categorical)
    c.__dict__.update(inner.__dict__)
    c.logits = torch.where(never, torch.full((), -math.inf, dtype=logits.dtype, device=logits.device), logits)
    c._validate_args = False
    if t is Categorical:
        return c
    new = OneHotCategorical.__new__(OneHotCategorical)
    new.__dict__.update(d.__dict__)
    new._categorical = c
    new._validate_args = False
    return new
