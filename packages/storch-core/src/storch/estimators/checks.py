"""The checks of what an estimator's components return and draw: the plate dims of a gradient or
weighting function's values (``(N, *parents)``), a baseline or control variate laid out as the cost frame,
and the number of sample entries a chain of nodes would draw (refused before memory runs out); the kinks inside
a distribution's own rsample (:func:`note_rsample`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.distributions import Distribution

from ..graph.cost_frame import CostFrame, _lead
from ..conditions.order_guard import unbatched
from ..distributions import rsample_kinks, rsample_params
from ..distributions.precision import location_scale_problem, precision_checked, unit_interval_problem
from ..distributions.rsample_kinks import COMPARISON, STRAIGHT_THROUGH
from ..errors import PlateError, PrecisionWarning, StorchError, UnsupportedDistributionError
from ..graph import is_tracing
from ..graph.node import Node
from ..plates.tensor import Plate, PlateTensor
from .messages import _step

if TYPE_CHECKING:
    from .base import Estimator

__all__ = ["check_in_frame", "MAX_SAMPLE_ENTRIES", "MAX_DRAW_ENTRIES", "note_rsample", "note_compared", "check_precision",
           "warn_precision"]


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def check_precision(est: Estimator, distribution: Distribution, sample: torch.Tensor) -> None:
    """Refuse (:class:`~storch.UnsupportedDistributionError`) samples of ``distribution`` (a node's raw one, or a
    partition step's) that its dtype cannot resolve where ``est``'s gradient reads them: a Beta, Kumaraswamy or
    Dirichlet (near 0 only) drawn at the float spacing of 0 or 1 by a concentration near 0, a location-scale family whose
    scale is below ``SPREAD`` float spacings at its loc (:mod:`storch.distributions.precision`). Called by the estimator base
    class for an estimator with ``score_function`` and by mvd (its points loc ± scale·w); storch.extending
    exports it for other estimators that read the sample's position.

    Both checks read the parameters, not the sample (deterministic: a refusal that depends on the draw would
    come at random steps near the limit; the parameters are also smaller than the sample, by ``n_samples``).
    Cost: nothing for another class (one dict lookup). On the CPU every draw is checked (three or four small
    kernels on the parameters and one read: a few microseconds), so parameters that drift into the problem while
    training are caught at that step. On an accelerator a read would wait for the device, so only the first draw per
    estimator, distribution class and dtype is checked (one wait), and a later drift is not caught there. Not
    checked while storch.compile traces a step or under a torch.func transform (no value to read)."""
    found = precision_checked(distribution)
    if found is None or is_tracing() or sample.is_meta or _is_wrapped(sample):
        return
    kind, d = found
    problem = _problem_once(est, d, sample, "_storch_precision_seen",
                            unit_interval_problem if kind == "unit" else location_scale_problem)
    if problem is None:
        return
    raise UnsupportedDistributionError(
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {problem}")


def _problem_once(est: Estimator, d: Distribution, sample: torch.Tensor, seen_attr: str,
                  problem_of: Callable[[Distribution, torch.Tensor], Optional[str]]) -> Optional[str]:
    """``problem_of(d, sample)``: at every draw on the CPU; on an accelerator (a read waits for the device) only
    at the first draw per distribution class and dtype without a problem (recorded in ``est.<seen_attr>``)."""
    seen = None if sample.is_cpu else est.__dict__.setdefault(seen_attr, set())
    key = (type(d), sample.dtype)
    if seen is not None and key in seen:
        return None
    problem = problem_of(d, sample)
    if problem is None and seen is not None:
        seen.add(key)
    return problem


def warn_precision(est: Estimator, distribution: Distribution, sample: torch.Tensor,
                   stacklevel: Optional[Callable[[], int]] = None) -> None:
    """Warn (:class:`~storch.PrecisionWarning`, once per estimator) where a pathwise estimator (``requires_rsample``,
    not a score function) draws a Beta, Kumaraswamy or Dirichlet whose concentration puts mass closer to 0 or 1
    than the dtype resolves (:func:`storch.distributions.precision.unit_interval_problem` with ``pathwise``).

    A warning, not a refusal: the pathwise gradient of such a draw is exact for a cost that stays bounded as the
    sample goes to 0 or 1 (E[x], a squared error: unbiased at Beta(1, 1e-3), float64), and biased only for one that
    reads log(1 - x) or log x (a Beta-Bernoulli likelihood, a sampled KL q.log_prob(x): Beta(1, 0.1) float32 gave 4.8
    for the exact 10). storch cannot see which one the cost is (the cost is added after the draw, and the log may sit
    inside a user's function), so a refusal would break the exact case for every user of a small concentration
    (an IBP's stick-breaking Beta(alpha, 1) at alpha 0.1, a sparse prior), and an opt-out option would make every
    such user change code to keep a correct model running. The warning names the concentration, the measured bias and
    the remedies; it fires once per estimator (not once per step), and ``warnings`` filters control it (``"error"``
    makes it a refusal, ``"ignore"`` silences it for a bounded cost). The same limits and costs as
    :func:`check_precision`: every draw on the CPU until it warned, the first per distribution class and dtype on an
    accelerator; nothing while tracing or under a torch.func transform. ``stacklevel``: called here, the level
    that points the warning at the user's estimator call (``storch._util.stacklevel.user_stacklevel``)."""
    found = precision_checked(distribution)
    if found is None or found[0] != "unit" or est.__dict__.get("_storch_precision_warned") or is_tracing() \
            or sample.is_meta or _is_wrapped(sample):
        return
    problem = _problem_once(est, found[1], sample, "_storch_precision_seen_pathwise",
                            lambda d, sample: unit_interval_problem(d, sample, pathwise=True))
    if problem is None:
        return
    est.__dict__["_storch_precision_warned"] = True
    warnings.warn(PrecisionWarning(
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {problem}. (Given once per "
        "estimator; silence it where the cost stays bounded with warnings.filterwarnings('ignore', "
        "category=storch.PrecisionWarning).)"), stacklevel=stacklevel() if stacklevel else 2)


def note_compared(node: Node, distribution: Distribution, found: Optional[str], jump: Optional[str] = None) -> None:
    """Record a comparison made inside the draw of ``distribution`` (``found``: its name, from
    :class:`~storch.distributions.rsample_kinks.RsampleComparisons`, or None: nothing) for ``node``: lowers
    ``node.max_order`` to 1, as ``Node.compared`` does for one in the cost, named in ``node.rsample_kinks``.
    ``jump`` (the watch's ``jump``: a piecewise-constant value, such as ``one_hot(y.argmax(-1))``, added to one
    that carries gradient, a straight-through ``hard + soft - soft.detach()``) lowers it to 0: the pathwise
    gradient is biased at order 1 already."""
    if found is None and jump is None:
        return
    name, kinks, where = node.rsample_kinks or (type(distribution).__name__, {}, {})
    kinks = dict(kinks)
    if found is not None:
        op = COMPARISON + found
        kinks[op] = min(1, kinks.get(op, 1))
    if jump is not None:
        kinks[STRAIGHT_THROUGH + jump] = 0
    node.rsample_kinks = (name, kinks, where)
    node.max_order = min(node.max_order, 0 if jump is not None else 1)


def note_rsample(node: Node, x: torch.Tensor, distribution: Optional[Distribution] = None,
                 params: Optional[list] = None) -> None:
    """Record the non-smooth operations inside the rsample that drew ``x`` (a value ``distribution.rsample()``
    returned; ``distribution``: the node's raw distribution, or the partition step's) for ``node``: a kink
    lowers ``node.max_order`` to 1, a jump (round, floor, sign) to 0, so that ``storch.surrogate_loss(order)``
    refuses what it would refuse for the same operation in the cost, and an order-1 surrogate with a kink
    differentiated twice is refused (:func:`storch.distributions.rsample_kinks`; the distribution's class name,
    the operations and the parts they were found in (a transform's class) in ``node.rsample_kinks``, for the
    message). torch's implicit reparameterisation of the gamma family drawn inside a walked rsample (a user's
    class calling ``Beta(...).rsample()``) lowers it to 1 too. torch's classes whose rsample is known
    smooth cost one dict lookup. An rsample that returned a value without an autograd graph while the
    distribution holds parameters that require grad (a threshold ``(y > 0).float()``, a draw under
    ``torch.no_grad()``, a ``.detach()``) is refused with a StorchError: its pathwise gradient would be
    silently 0.

    ``params``: the distribution's :func:`~storch.distributions.grad_parameters`, taken before ``x`` was drawn
    (what the rsample keeps in the distribution, a caching transform's last value, is then not taken for a
    parameter); passing them says that :func:`~storch.distributions.rsample_walked` is True for it. Estimator
    ``_sample_node`` calls it so with the proposal of an estimator that ``requires_rsample`` (and each
    partition step's draw); one whose proposal hands out something else than the rsample (LAX's detached ⊥x)
    calls it on the rsample itself: ``storch.extending.note_rsample(node, x)`` (after the draw: the
    parameters are read then), or with ``params=`` taken before it."""
    d = node.distribution if distribution is None else distribution
    node.rsample_noted = True  # (first_steps._sample_node does not note the proposal's value again: LAX's ⊥x)
    if params is None:
        params = rsample_params(d)
        if params is None:
            return
    if params and torch.is_grad_enabled():
        u = unbatched(x)
        if isinstance(u, torch.Tensor) and u.grad_fn is None and not u.requires_grad:
            raise StorchError(
                f"estimator {node.estimator.name!r} (plate {node.estimator.plate!r}): the rsample of "
                f"{type(d).__name__} returned a value without an autograd graph, although the distribution holds "
                f"{len(params)} parameter tensor(s) that require grad: the sample does not depend on them in "
                "autograd (a threshold or comparison such as (y > 0).float(), a draw under torch.no_grad(), a "
                ".detach() or .sample() inside rsample), so its pathwise gradient would be silently 0. Return a value "
                "computed from the parameters with differentiable operations (a smooth relaxation of the threshold, "
                "or a straight-through estimator written explicitly), or use an estimator that does not "
                "differentiate through the sample ('score'; it needs log_prob)")
    places: dict = {}
    found = rsample_kinks(d, x, node.max_order, params=params, tracing=is_tracing(), where=places)
    if not found:
        return
    name, kinks, where = node.rsample_kinks or (type(d).__name__, {}, {})
    kinks, where = dict(kinks), {op: list(p) for op, p in where.items()}
    for op, k in found.items():
        kinks[op] = min(k, kinks.get(op, k))
        for place in places.get(op, ()):
            if place not in where.setdefault(op, []):
                where[op].append(place)
    node.rsample_kinks = (name, kinks, where)  # (the class named: the first step's with a kink, of a partition)
    node.max_order = min(node.max_order, min(found.values()))


def _checked_lead(est: Estimator, component: str, t: Any, plates: tuple[Plate, ...], step: int = 0,
                  distribution: Any = None, sample: Any = None) -> torch.Tensor:
    """``t`` (a gradient function's or weighting function's result) with its leading dims ``(N, *parents)``,
    after checking that it has no other dims and that each is the plate's size or 1 (broadcast: a pathwise
    estimator's gradient function may be one 0 of shape (1,)); fewer dims are padded with size-1 dims.
    With the node's raw ``distribution`` and ``sample``, a result with extra dims is blamed on the
    distribution's ``log_prob`` where that is where they come from (:func:`_log_prob_shape_message`)."""
    n = len(plates)
    if type(t) is not torch.Tensor or t.dim() < n:
        t = _lead(t, n)
    shape = t.shape
    if len(shape) == n:
        if n <= 2:  # (the common nodes, with no parent or one: no generator)
            if (shape[0] == plates[0].size or shape[0] == 1) and (
                    n == 1 or shape[1] == plates[1].size or shape[1] == 1):
                return t
        elif all(s == p.size or s == 1 for s, p in zip(shape, plates)):
            return t
    want = tuple(p.size for p in plates)
    extra = len(shape) > n
    if extra and distribution is not None:
        message = _log_prob_shape_message(est, distribution, sample)
        if message is not None:
            raise StorchError(message)
    fix = ("sum it over the node's own batch (and event) dims: node.log_prob(x) does (not "
           "node.distribution.log_prob(x), which is per entry)" if extra else
           f"give it the sizes of the plates {', '.join(repr(p.name) for p in plates)} (or 1 to broadcast)")
    raise StorchError(
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {component}{_step(step)} returned a "
        f"tensor of shape {tuple(shape)}, but it must have the dims (N, *parents) = {want} (plate sizes, or 1 to "
        f"broadcast) and no others (docs/writing-an-estimator.md, section 1): {fix}")


def _log_prob_shape_message(est: Estimator, d: Distribution, sample: Any) -> Optional[str]:
    """Where a user's distribution's ``log_prob`` keeps dims that are not batch dims (per-event terms not
    summed over the event: shape ``(N, *batch, *event)`` instead of ``(N, *batch)``), the message that says
    so; else None. A gradient or weighting function then returned extra dims, which the generic message
    blamed on the estimator's author. Error path only: one more ``log_prob`` of the sample (torch's own
    classes are not probed: their ``log_prob`` follows torch's layout)."""
    cls = type(d)
    if cls.__module__.startswith("torch.distributions."):
        return None
    own = d.batch_shape + d.event_shape
    try:
        with torch.no_grad():
            if not (isinstance(sample, torch.Tensor) and sample.shape[1:] == own):
                sample = d.sample()  # (the node's is in another representation: one draw of the distribution's)
            lp = d.log_prob(sample)
    except Exception:  # (storch cannot tell: the generic message)
        return None
    want = tuple(sample.shape[:sample.dim() - len(d.event_shape)])
    if not isinstance(lp, torch.Tensor) or tuple(lp.shape) == want:
        return None
    return (f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {cls.__name__}.log_prob returned "
            f"a tensor of shape {tuple(lp.shape)} for samples of shape {tuple(sample.shape)}, but a distribution's "
            f"log_prob must return one log-probability per sample and batch entry: the sample's shape without its "
            f"event dims, {want} (batch_shape {tuple(d.batch_shape)}, event_shape {tuple(d.event_shape)}; storch's "
            "plates lead the batch dims). Sum the per-element terms over the event dims (e.g. `.sum(-1)` for a "
            "vector-valued value), or, if those dims are independent entries, declare them in batch_shape rather "
            "than event_shape")


def check_in_frame(est: Estimator, component: str, t: Any, frame: CostFrame) -> None:
    """Refuse a ``baseline`` or ``control_variate`` result that is not laid out like the cost frame.

    Called only when the result is not a plain tensor of exactly the frame's shape (the callers compare
    the shapes first: one tuple comparison per call). A tensor that broadcasts to ``frame.tensor``
    without adding dims or growing one (a scalar, size-1 dims) is accepted; any other shape would either
    fail in the surrogate with torch's broadcasting error or, where it broadcasts, widen the cost's
    estimate by dims of its own: a wrong value and gradient, and the upstream nodes' frames (a leave-one-out
    or unordered-set baseline) would read that wider tensor."""
    want = frame.tensor.shape
    if type(t) is torch.Tensor and len(t.shape) <= len(want) and all(
            s == w or s == 1 for s, w in zip(reversed(t.shape), reversed(want))):
        return  # (a moving average's scalar, every step: no message is built)
    who = f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}): {component}"
    layout = (f"the cost frame's shape {tuple(want)} (the leading dims are the plates "
              f"{[p.name for p in frame.plates]}, `cost.plates`)")
    how = ("Compute it from cost.tensor (e.g. storch.extending.leave_one_out(cost, node.n)), bring a tensor "
           "laid out by the node's plates into the frame with cost.align(t), or return a tensor that broadcasts "
           "to the frame without changing it (a scalar, or size-1 dims); docs/writing-an-estimator.md, section 1")
    if type(t) is PlateTensor:
        own = next((p for p in t.plates if p.name == est.plate), None)
        if own is not None and component == "baseline":
            # (1 - MagicBox(l)) b is zero in expectation only for a b that does not depend on x (appendix C); in a
            # partition l = L_t holds x_0..x_t, so no step's sample may enter b (a subclass's V(s_t) of the last
            # action: |z| up to 60, found by a tester; aligning it as the layout advice said hid the plate)
            step = f" at step {own.step}" if own.step else ""
            raise StorchError(
                f"{who} returned a value that depends on the samples of plate {own.name!r}{step} (the PlateTensor "
                "carries that plate). A baseline must not depend on the sample it is a baseline for, nor, in a "
                "partition, on the sequence's samples of any step (a state value V(s_t) of earlier actions): the "
                "control variate (1 - MagicBox(L_t)) b is then biased. Compute it from values before the node (before "
                "the sequence's first step), or from the other samples' costs (storch.extending.leave_one_out), or "
                "use a control variate that corrects for the dependence. For a critic V(s_t) of an episode's state "
                "(actor-critic), add TD residuals as the step costs instead, -gamma**t * (r_t + gamma * V(s_{t+1}) - "
                "V(s_t)) with V detached: they sum to the return minus V(s_0), the critic as every step's baseline "
                "(docs/partitions.md, 'Actor-critic: a critic as the per-step baseline')")
        raise StorchError(
            f"{who} returned a PlateTensor (per-sample shape {tuple(t.shape)}, plates "
            f"{[p.name for p in t.plates]}), but it must return a plain tensor laid out as {layout}: "
            f"return cost.align(t.tensor, t.plates) (a baseline that does not depend on the node's samples). {how}")
    if not isinstance(t, torch.Tensor):
        raise StorchError(f"{who} returned {type(t).__name__} {t!r:.80}, but it must return None or a torch.Tensor "
                          f"laid out as {layout}. {how}")
    shape = t.shape
    if len(shape) > len(want):
        why = (f"it has {len(shape) - len(want)} dim(s) more than the cost, which broadcasting would add to the "
               "cost's estimate (a keepdim=True, an unsqueeze, or copies stacked along a new dim)")
    else:
        bad = [i for i, (s, w) in enumerate(zip(reversed(shape), reversed(want))) if s != w and s != 1]
        if not bad:
            return
        i = len(shape) - 1 - bad[-1]
        j = len(want) - 1 - bad[-1]
        why = (f"its dim {i} has size {shape[i]} where the cost's dim {j} (aligned from the right, as torch "
               f"broadcasts) has size {want[j]}")
    raise StorchError(
        f"{who} returned a tensor of shape {tuple(shape)}, but it must have {layout}, or a shape that broadcasts "
        f"to it without adding dims or growing one: {why}. {how}")


# The samples of a node are drawn for every entry of its parents' sample plates: along a chain of
# nodes their n_samples multiply. Beyond this many entries per data point the step would not fit in
# memory (the process is killed before torch can raise), so storch says why first.
MAX_SAMPLE_ENTRIES = 2 ** 24
# ... and every data point and every value of a draw multiplies them again: a chain's node whose sample
# would hold more than this many entries in all (parents' sample entries x its own samples x the data
# plates' sizes x the values of one draw; 2 GiB in float32, and a chain's peak is several such tensors:
# 2^27 entries peaked at 3.7 GB for a chain of Bernoulli nodes) is refused too. Only for a chain: a node
# drawn once per data point is the user's batch, not storch's to refuse; the limit is high enough for
# hierarchical models with large batches (2 layers of 16 samples, 2048 data points, 784 values: 2^28.6)
MAX_DRAW_ENTRIES = 2 ** 29


def _check_sample_entries(est: Estimator, raw: Distribution, parents: tuple[Plate, ...]) -> None:
    entries, chain, data = 1, 0, 1
    for p in parents:
        if p.independent:
            data *= p.size
        else:
            entries *= p.size
            chain += 1
    if entries <= 1:  # no chain: one draw per data point, whatever the data's size (not storch's to refuse)
        return
    if entries > MAX_SAMPLE_ENTRIES:
        total, limit, parts = entries, MAX_SAMPLE_ENTRIES, [f"{entries} entries per data point of the sample plates "
                                                            f"of the {chain} earlier nodes it depends on"]
    else:
        own = getattr(est, "n_samples", 1)
        own = own if isinstance(own, int) and own > 0 else 1
        per = math.prod(raw.batch_shape[len(parents):]) * math.prod(raw.event_shape)  # the values of one draw
        total = entries * own * data * per
        if total <= MAX_DRAW_ENTRIES:
            return
        limit = MAX_DRAW_ENTRIES
        parts = [f"{entries} entries of the sample plates of the {chain} earlier nodes it depends on", f"{own} samples"]
        if data > 1:
            parts.append(f"{data} data points")
        if per > 1:
            parts.append(f"{per} values per draw")
    raise PlateError(
        f"estimator {est.name!r} (plate {est.plate!r}) would sample {total} entries (" + " x ".join(parts)
        + f"), more than {limit}: each node's samples are drawn for every sample of the nodes before it, so their "
        "numbers multiply along a chain, and again by the size of the data plates. For a sequence of stochastic "
        "steps (an episode, a decoder loop), create ONE estimator outside the loop and call it at every step: its "
        "calls make one partition with one plate (docs/partitions.md). Otherwise draw fewer samples in the chain "
        "(n_samples=1 for some nodes; an estimator whose plate holds more than its samples, such as 'go' (the "
        "sample and one neighbour per variable), still multiplies at n_samples=1: use one with a plate of "
        "n_samples, such as 'score' or 'reparameterization', for some nodes), use fewer chained nodes, or pass "
        "the data in smaller batches")
