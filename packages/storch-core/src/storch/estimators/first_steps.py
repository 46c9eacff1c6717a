"""A node's first step (paper, section 3.2: the proposal, the gradient and weighting functions, the value handed
out): :func:`_sample_node` on the general path, :func:`_plain_node` for a plain node (issue 19: decided per
(estimator, distribution type) by :func:`_is_plain`, chosen by :func:`_first_node`), and the draw's watches and
records shared with the partition steps."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from torch.distributions import Distribution, Independent, TransformedDistribution

from ..graph.cost_frame import _widened
from ..distributions import base_distribution, holds_grad, rekey_transform_cache, rsample_params, strict_support
from ..distributions.precision import precision_checked
from ..distributions.rsample_kinks import RsampleComparisons
from ..errors import PlateError, StorchError, UnsupportedDistributionError
from ..graph import is_tracing
from ..graph.node import Node
from ..plates.integer_reads import MARKS, marked_parameter
from ..plates.tensor import MAX_DIMS, Lineage, Plate, PlateTensor, too_many_dims_message
from ..conditions.score import KINK_FREE, support_is_fixed
from .checks import _check_sample_entries, _checked_lead, note_compared, note_rsample
from .messages import _output_shape_message, _plate_tensor_draw_message, _sample_dtype_message, _sample_shape_message
from .watch import _CATEGORIES, _both, _compare_watch, _threshold_watch, is_pathwise
from .catalog import partition_estimators
from .capabilities import _detect_log_p_gradient, _is_score_function, _lowers_order

if TYPE_CHECKING:
    from .base import Estimator
else:  # the class is defined above this module (storch.estimators.base imports it): bound there, read at call time
    Estimator = None


def _sample_node(est: Estimator, graph, raw: Distribution, parents: tuple[Plate, ...], distribution: Distribution,
                 inputs: Any) -> PlateTensor:
    """The first call of this estimator in ``graph``: a new node for the raw distribution ``raw``. (A check
    added here must be added to :func:`_is_plain`'s conditions, or to :func:`_plain_node`, which leaves out
    the branches that are no-ops for a plain node.)"""
    est.check_distribution(raw)
    if est.requires_enumerate_support:  # probabilities of exactly 0 (probs=) are impossible values
        est._check_enumeration(raw)
        raw = strict_support(raw, is_tracing())
    own = raw.batch_shape + raw.event_shape  # (torch.Size: parents, own batch, event)
    ndims = 1 + len(own)  # the sample: plate, batch, event
    if ndims > MAX_DIMS:
        raise PlateError(_too_many_dims(est, raw, ndims))
    if inputs is not None:
        est.check_inputs(inputs, parents, 0)
    node = Node(est, raw, parents, original=distribution, inputs=inputs)
    if MARKS:  # (an integer value read from a pathwise sample is live: its parameters may carry it)
        _note_integer_parameter(node, distribution, 0)
    drawn = est._nodes_drawn
    if drawn is not None:  # (storch.estimator's record of a stateful estimator: storch.registry._note_created)
        drawn[0] += 1
    if not torch.is_grad_enabled():
        _sampled_without_grad(node, distribution, 0)
    if _lowers_order(type(est)):  # storch.surrogate_loss(order) checks it (OrderError)
        node.max_order = est.max_order_for(raw)
    _check_sample_entries(est, raw, parents)
    # a distribution whose rsample storch looks into (a user's class or transform): its parameters before the
    # draw (what the rsample keeps in it, a caching transform's last value, is no parameter); torch's smooth
    # classes: one dict lookup
    params = rsample_params(raw) if est.requires_rsample else None
    sample = _watched_draw(node, raw, params, est.proposal, node)
    if type(sample) is PlateTensor:
        raise UnsupportedDistributionError(_plate_tensor_draw_message(est, distribution, "proposal"))
    # one tuple comparison (a wrong shape would silently move the plate); dims after them may hold a
    # representation of the value (a relaxation's one-hot vector for a Categorical)
    if sample.shape[1:len(own) + 1] != own:
        raise StorchError(_sample_shape_message(est, "proposal", sample.shape, own))
    if params is not None and not node.rsample_noted:  # a kink or jump inside the distribution's rsample
        note_rsample(node, sample, raw, params)  # lowers the node's order (unless the proposal noted its rsample)
    if precision_checked(raw) is not None:  # (one dict lookup for other classes)
        est._check_draw_precision(raw, sample)
    plate, plates = _add_scored_node(est, graph, node, raw, parents, sample, own)
    if not est.uniform_weights:  # uniform ones (1/N) are built only if read (Node.weight_values)
        node.weight_values = _widened(_checked_lead(est, "weighting_function", est.weighting_function(node),
                                                    plates, 0, raw, sample))
    if type(est).evaluation_from is not Estimator.evaluation_from:
        plate.lineage.evaluation_from = est.evaluation_from(node)  # (read by a user's register_hook)
    if (est.score_function is None and not _is_score_function(type(est))
            and (type(raw) not in KINK_FREE or not support_is_fixed(type(raw)))):
        _detect_log_p_gradient(est, node, raw)
    if est.eos is not None:
        node.finished = est.is_eos(raw, sample, len(parents))
    out = est.output(node)
    lead = len(plates)  # the value's plate dims; the dims after them may hold a representation (a one-hot vector)
    if out.shape[:lead] != sample.shape[:lead]:  # (a shape that broadcasts would move the plate dims of the value)
        raise StorchError(_output_shape_message(est, out, sample, lead))
    if not out.is_inference():  # (torch.inference_mode(): no version counter, no backward either)
        node.handed.append((out, out._version))
    if out.requires_grad and (est.jump_free or isinstance(base_distribution(raw), _CATEGORIES)):
        # a relaxed / straight-through one-hot value of a category: torch's (OneHot)Categorical.log_prob of it
        # reads an argmax (or .long() casts) of it, a jump the gradient misses (and a wrong value for
        # Categorical): refused by storch.surrogate_loss whichever estimator hands it out
        plate.lineage.watch = _threshold_watch(node, est.jump_free)
        if is_pathwise(est):  # (gumbel_softmax of a category): its comparisons in user code too
            plate.lineage.watch = _both(plate.lineage.watch, _compare_watch(node))
    elif out.requires_grad and is_pathwise(est):
        # a pathwise sample: a comparison of a value it reaches (torch.where(x > 0, x, 0)) is a kink autograd
        # cannot see, refused by storch.surrogate_loss(order >= 2) (surrogate.pathwise._check_smooth)
        plate.lineage.watch = _compare_watch(node)
    node.value = value = PlateTensor._wrap(out, plates)
    # the user's log_prob of the value they got (SAC's q.log_prob(a)) reuses the pre-tanh sample
    # that TanhTransform(cache_size=1) cached for `out`, as in plain torch (atanh(±1) is infinite)
    if isinstance(raw, _MAY_CACHE):  # (a Bernoulli or Normal has no transforms: not called)
        _keep_preimages(node, rekey_transform_cache(raw, out, value, lambda r: PlateTensor._wrap(r, plates),
                                                    distribution))
    return value


# the distributions whose transforms may hold a cache of the sample (rekey_transform_cache)
_MAY_CACHE = (TransformedDistribution, Independent)


def _keep_preimages(node: Node, preimages: list) -> None:
    """Record the cached pre-images of a handed-out sample that require grad (the pre-tanh sample u of
    a = tanh(u)): ``log_prob(a)`` is computed from them, so a cost made of it (SAC's entropy term) reaches
    u, not a; the surrogate's check that a pathwise node's cost reaches its sample accepts them too."""
    grad = tuple(x for x in preimages if x.requires_grad)
    if grad:
        node.preimages = node.preimages + grad


def _gradient_function_failed(est: Estimator, raw: Distribution, sample: torch.Tensor, own: tuple,
                              e: BaseException) -> None:
    """Raise storch's explanation of the error ``e`` of a node's first gradient function where there is one (the
    caller re-raises ``e`` otherwise)."""
    if isinstance(e, StorchError):  # (storch's own error, e.g. a PlateError in a gradient function: as it is)
        return
    # the usual reader of the sample's dtype is log p: a proposal that returns another dtype than the
    # distribution's (a long tensor for a Bernoulli) fails in torch with "result type Float can't be
    # cast to the desired output type Long"; say which component gave the wrong dtype (error path only)
    message = _sample_dtype_message(est, raw, sample, own, e)
    if message is not None:
        raise StorchError(message) from e


# what storch's estimators set at each update (score's and the variance-trained estimators' update_steps, and
# storch.extending.optimizer_step's skipped_updates: numbers that only count; their optimizer, _optimizer): read by
# no decision of the estimator call (set every step, they would send a learned baseline's node through the general
# path and _is_plain, ~2 us, at every step); nn.Module.train() / .eval() set `training`, which no decision reads
# (a loop calling model.train() every step stayed on the general path: review r-24)
_PLAIN_KEEPS = frozenset({"update_steps", "skipped_updates", "_optimizer", "training"})

# the estimator's methods that _plain_node does not call (the general path calls them through the instance)
_PLAIN_SKIPS = ("check_distribution", "supports", "output", "evaluation_from", "is_eos", "max_order_for",
                "_check_draw_precision", "weighting_function")


def _is_plain(est: Estimator, raw: Distribution) -> bool:
    """Whether a node of ``est`` for a distribution of ``type(raw)`` is a plain node (:func:`_plain_node`): every
    branch of :func:`_sample_node` that :func:`_plain_node` leaves out is a no-op for any instance of the
    type with this estimator's present options. Decided once per (estimator, distribution type) after the general
    path ran for the type, and cached in the estimator's ``_storch_plain`` (cleared by ``Estimator.__setattr__``,
    on any attribute set: an option, a flag set on the instance). The per-call conditions (no live
    integer-read mark, grad enabled, not traced by storch.compile, only independent parent plates: no draw
    count to check) are tested by the caller; hooks, a generator, an overriding forward, arguments other than
    ``inputs=``, a compiled module or a jit trace take ``nn.Module.__call__`` and the general path."""
    cls, kind = type(est), type(raw)
    return (
        # a torch class (its type fixes its structure: no user subclass, no wrapper of another distribution whose
        # log p, support or rsample its type does not tell), whose support check this estimator passed before
        # (check_distribution's cache of a fixed support: the same answer for every instance of the type)
        kind.__module__.startswith("torch.distributions.") and not isinstance(raw, _MAY_CACHE)
        and kind in est.__dict__.get("_storch_fixed_support_ok", ())
        and cls.check_distribution is Estimator.check_distribution
        # no enumeration check, order lowering, rsample watch, precision check, evaluation entries, eos, watch of
        # the value's comparisons, or transform cache: the branches _plain_node leaves out
        and not est.requires_enumerate_support and not _lowers_order(cls) and not est.requires_rsample
        and not is_pathwise(est) and not est.jump_free and precision_checked(raw) is None
        and est.uniform_weights is True and cls.evaluation_from is Estimator.evaluation_from and est.eos is None
        and cls.output is Estimator.output and cls.is_eos is Estimator.is_eos
        # none of the methods it leaves out set on the instance (est.output = f: nn.Module keeps it in __dict__)
        and not any(name in est.__dict__ for name in _PLAIN_SKIPS)
        # a score function (no detection of an overridden gradient function that returns log p)
        and not (est.score_function is None and not _is_score_function(cls)
                 and (kind not in KINK_FREE or not support_is_fixed(kind))))


def _first_node(est: Estimator, graph, raw: Distribution, parents: tuple[Plate, ...], distribution: Distribution,
                inputs: Any) -> PlateTensor:
    """The estimator's first node in ``graph`` on ``Estimator.__call__``'s lean path: a plain node
    (:func:`_plain_node`) where that was decided for the distribution's type and the call's conditions hold, else
    :func:`_sample_node`, after which the type is decided (check_distribution has then cached what it
    accepted)."""
    kind = type(raw)
    known = est.__dict__.get("_storch_plain")
    ok = known.get(kind) if known is not None else None
    if ok and not MARKS and _grad_enabled() and not is_tracing():
        for p in parents:
            if not p.independent:  # a node's sample plate: the draw count is checked (_check_sample_entries)
                break
        else:
            return _plain_node(est, graph, raw, parents, distribution, inputs)
    value = _sample_node(est, graph, raw, parents, distribution, inputs)
    if ok is None:
        if known is None:
            known = est.__dict__["_storch_plain"] = {}
        known[kind] = _is_plain(est, raw)
    return value


def _add_scored_node(est: Estimator, graph, node: Node, raw: Distribution, parents: tuple[Plate, ...],
                     sample: torch.Tensor, own: tuple) -> tuple[Plate, tuple[Plate, ...]]:
    """A node's first step once its sample is drawn and checked (:func:`_sample_node` and
    :func:`_plain_node` alike): its plate, the node added to ``graph``, and its gradient function l evaluated,
    checked and widened. Returns the plate and the node's plates."""
    plate = node.plate = Plate(est.plate, sample.shape[0], False, 0, Lineage())
    node.sample = sample
    graph.add_node(node)
    plates = (plate,) + parents
    try:
        l_x = est.gradient_function(node)
    except (RuntimeError, TypeError, ValueError) as e:
        _gradient_function_failed(est, raw, sample, own, e)
        raise
    # a float16 / bfloat16 l (a model under autocast) in float32: MagicBox(l) · C and (1 - MagicBox(l)) · ⊥b
    # cancelled in bfloat16 (cost._widened); l's dtype compared, one cast for a reduced one
    node.gradient_values = _widened(_checked_lead(est, "gradient_function", l_x, plates, 0, raw, sample))
    return plate, plates


def _plain_node(est: Estimator, graph, raw: Distribution, parents: tuple[Plate, ...], distribution: Distribution,
                inputs: Any) -> PlateTensor:
    """:func:`_sample_node` of a plain node (:func:`_is_plain`; issue 19): the same node, value and
    errors, without the checks that are decided per (estimator, distribution type) and come out as no-ops (~20
    statements and calls a node: the step's Python runs cold, so the code it runs matters, not only each call)."""
    own = raw._batch_shape + raw._event_shape  # (a torch class, _is_plain: what its two shape properties return)
    if len(own) + 1 > MAX_DIMS:
        raise PlateError(_too_many_dims(est, raw, len(own) + 1))
    if inputs is not None:
        est.check_inputs(inputs, parents, 0)
    node = Node(est, raw, parents, original=distribution, inputs=inputs)
    drawn = est._nodes_drawn
    if drawn is not None:
        drawn[0] += 1
    sample = est.proposal(node)
    if type(sample) is PlateTensor:
        raise UnsupportedDistributionError(_plate_tensor_draw_message(est, distribution, "proposal"))
    if sample.shape[1:len(own) + 1] != own:
        raise StorchError(_sample_shape_message(est, "proposal", sample.shape, own))
    plate, plates = _add_scored_node(est, graph, node, raw, parents, sample, own)
    if not sample.is_inference():
        node.handed.append((sample, sample._version))
    if sample.requires_grad and isinstance(raw, _CATEGORIES):  # (as _sample_node: a proposal's one-hot with grad)
        plate.lineage.watch = _threshold_watch(node, False)
    node.value = value = PlateTensor._wrap(sample, plates)
    return value


def _sampled_without_grad(node: Node, distribution: Distribution, step: int) -> None:
    """Record a step sampled with gradients disabled: its gradient function (and a pathwise sample)
    is computed without grad, so parameters that require grad get no gradient through the node. The
    surrogate refuses such a node when a cost reaches it and it is built with grad (a training step);
    evaluation under no_grad and nodes without costs are fine. Only read under no_grad: a training
    step pays one ``torch.is_grad_enabled()`` per call."""
    if node.no_grad_step is None:
        node.no_grad_step = step
    if not node.no_grad_cut and holds_grad(distribution):
        node.no_grad_cut, node.no_grad_step = True, step


def _watched_draw(node: Node, raw: Distribution, params: Optional[list], draw: Callable, *args: Any) -> Any:
    """``draw(*args)`` (an estimator's proposal or extend); where ``params`` says ``raw``'s rsample is looked into
    (:func:`~storch.distributions.rsample_params`), under :class:`RsampleComparisons`, whose finds lower the node's
    order (a mask inside rsample leaves no trace in the autograd graph; under storch.compile's trace too, where
    the mode sees the traced tensors and the refusal comes at trace time)."""
    if params is None:
        return draw(*args)
    with RsampleComparisons() as watch:
        made = draw(*args)
    note_compared(node, raw, watch.found, watch.jump)
    return made


_grad_enabled = torch.is_grad_enabled


def _float_dtype(node: Node) -> torch.dtype:
    s = node.sample
    if s is not None and s.is_floating_point():
        return s.dtype
    for v in vars(node.distribution).values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return torch.get_default_dtype()


def _note_integer_parameter(node: Node, distribution: Distribution, step: int) -> None:
    """Keep on ``node`` (``Node.integer_parameter``) the record of a parameter of its distribution computed from an
    integer value read from a pathwise node's sample (``Normal(img[x.long()], 1)``): ``storch.surrogate_loss``
    refuses the costs that reach the node (``storch.surrogate.integer_reads._check_integer_reads``)."""
    found = marked_parameter(distribution)
    if found is not None:
        node.integer_parameter = (found[1], found[0], step)


def _too_many_dims(est: Estimator, raw: Distribution, n: int) -> str:
    """The refusal of a node that would need ``n`` > 64 dims. Its advice, one estimator called at every step (a
    partition), is for an estimator that supports partitions; for one that does not (importance; the Gumbel
    relaxations before they supported partitions, in a DreamerV3 world model's 64-step sequence), it names the installed
    estimators that do and accept the distribution, rather than the call that this estimator refuses."""
    head = f"estimator {est.name!r} (plate {est.plate!r}): "
    if est.supports_partitions:
        return head + too_many_dims_message(n)
    others = partition_estimators(raw)
    return head + (
        f"this needs a tensor with {n} dims, but torch supports at most {MAX_DIMS}: every stochastic node adds a "
        f"plate dim, and {est.name!r} does not support partitions (one estimator called at every step of a "
        "sequence, one plate dim for the whole sequence; docs/partitions.md), so each of its nodes adds one. For a "
        "longer sequence, use one estimator that supports partitions and this distribution, created outside the "
        "loop and called at every step"
        + (f" ({', '.join(others)})" if others else " (none installed accepts this distribution)")
        + ", or cut the sequence into shorter segments, each in a graph of its own")
