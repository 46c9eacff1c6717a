"""A partition's later steps (paper, section 3.2: calling one estimator several times in a graph): the general step
(:func:`_extend_partition`), a step made from the estimator's components (:func:`_components_step`) or by its
``extend`` (:func:`_extended`), and the plain step (issue 19: :func:`_plain_step`). How a class's step t is made is
decided in :mod:`storch.estimators.partition_paths`; the checks of a step (its sample, ``eos=``, a step independent
of the earlier ones) are in :mod:`storch.estimators.step_checks`."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.distributions import Distribution

from ..graph.cost_frame import _lead, _widened
from ..distributions import rekey_transform_cache, rsample_params, strict_support, unwrap_distribution
from ..distributions.precision import precision_checked
from ..errors import PlateError, StorchError
from ..graph import is_tracing
from ..graph.node import Node, StepDraw
from ..plates.integer_reads import MARKS
from ..plates.tensor import Lineage, Plate, PlateTensor, align
from .checks import _checked_lead, note_rsample
from .messages import _output_shape_message, _sample_shape_message
from .watch import _compare_watch, is_pathwise
from .capabilities import _lowers_order
from .catalog import partition_estimators
from .first_steps import _MAY_CACHE, _keep_preimages, _note_integer_parameter, _sampled_without_grad, _watched_draw
from .partition_paths import _BY_COMPONENTS, _BY_EXTEND, _BY_EXTEND_OUTPUT, _STEP_PATH, _depth, _partition_path
from .step_checks import _check_eos_step, _check_step_sample, _warn_independent_step

if TYPE_CHECKING:
    from .base import Estimator
else:  # the class is defined above this module (storch.estimators.base imports it): bound there, read at call time
    Estimator = None


def _extend_partition(est: Estimator, graph, node: Node, distribution: Distribution,
                      unwrapped: Optional[tuple[Distribution, tuple[Plate, ...]]] = None,
                      inputs: Any = None, own: Optional[tuple[Plate, ...]] = None) -> PlateTensor:
    """A further call of this estimator in the same graph: step t of its partition (section 3.2).

    The calls form one partition with one plate; the plate of step t is
    ``Plate(name, size_t, False, t, lineage)`` and tensors computed from step t carry it. The
    node keeps the cumulative gradient function L_t = L_{t-1} + l_t of every step (``history``):
    a cost whose partition plate is at step t is credited to steps <= t only (causal credit,
    DiCE's cumulative MagicBox), unless ``causal_credit`` is False. Weights and baselines are per
    whole sequence. An estimator that selects parents at step t (sampling without replacement)
    records them with ``lineage.set_parents``; tensors of earlier steps then follow their
    prefixes when they meet step t's tensors (``storch.plates.tensor.align``).

    ``unwrapped``: ``(raw, plates)`` already built by :meth:`Estimator.forward` (``plates`` are the
    partition's plates at its last step, checked against the graph), or ``None``. ``inputs``:
    the step's ``inputs=`` (checked by :meth:`Estimator.check_inputs`, as at the first step), kept in
    ``node.step_inputs``; ``node.inputs`` becomes them. ``own``: the plates of the plate tensors
    ``distribution`` holds (``Graph.check_call``), or ``None`` where ``unwrapped`` says they are the
    partition's plates at its last step: a step that carries none of the partition's plates (depends on
    no earlier step) and lacks some of its parent plates gets an :class:`IndependentStepWarning`.

    (A per-step check added here must be added to :func:`_plain_step` too, or to the conditions under which
    :meth:`Estimator.forward` takes it: it leaves out the checks that are no-ops for a plain node's later steps.)
    """
    if not est.supports_partitions:
        others = partition_estimators(distribution)
        raise PlateError(
            f"estimator {est.name!r} (plate {est.plate!r}) was already used in this graph. Calling one "
            "estimator several times makes its calls one partition (a sequence with one plate), which "
            f"{est.name!r} does not support. Create one estimator per stochastic node (each adds a plate dim, "
            "torch allows 64 in all), or, for a sequence, one estimator that supports partitions"
            + (f" and this distribution ({', '.join(others)})" if others else "")
            + ", or start each step with a new graph (storch.backward() / storch.reset())"
            + (f". {est.partition_hint}" if est.partition_hint else "")
        )
    how = _STEP_PATH.get(type(est))  # (one dict lookup per step: the class's path, computed at its first step 1)
    if how is None:
        how = _partition_path(type(est))
    if how.__class__ is str:  # components its partition hooks were not written for: refused where it matters
        raise StorchError(
            f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) is called again in this "
            f"graph (step {node.step + 1} of its partition), but {how}")
    if unwrapped is None:
        raw, plates = unwrap_distribution(distribution, within=node.plates)
    else:
        raw, plates = unwrapped
    est.check_distribution(raw)
    if est.requires_enumerate_support:
        if type(raw) is not type(node.distribution):  # (read once per node and class)
            est._check_enumeration(raw)
        raw = strict_support(raw, is_tracing())
    if _lowers_order(type(est)):  # the partition's order: the lowest of its steps'
        node.max_order = min(node.max_order, est.max_order_for(raw))
    parents = plates[1:]
    t = node.step + 1
    if MARKS and node.integer_parameter is None:
        _note_integer_parameter(node, distribution, t)
    if est.eos is not None:
        _check_eos_step(est, node, raw, t)
    if not torch.is_grad_enabled():
        _sampled_without_grad(node, distribution, t)
    if inputs is not None:
        est.check_inputs(inputs, plates, t)
    if inputs is not None or node.step_inputs is not None:
        if node.step_inputs is None:
            node.step_inputs = [node.inputs] + [None] * (t - 1)
        node.step_inputs.append(inputs)
        if inputs is not None:
            node.inputs = inputs  # the inputs of the latest step that was given some
    if parents != node.parents:  # node.parents were checked at the step that added them
        for p in parents:
            other = graph.node_of(p.name)
            if other is not None and other.index > node.index:
                # the advice names what works (found by porting an RL loop): a node created anew per
                # call is still sampled after this partition started, so re-creating the *other*
                # estimator never helps; the partition itself must start after the node
                q, e = est.plate, p.name
                # (found by porting a switching state-space model, p-mix: z_t reads x_{t-1} and x_t reads z_t;
                # at z's step 1, x had been called once, and fix (1) alone then refused x's next call)
                both = (f" ({e!r} is a partition too: the two interleave, so each is created anew per segment "
                        "between the other's draws, or one estimator draws both)") if other.step else (
                        f" (if the estimator of {e!r} is itself called again at later steps, each step reading the "
                        "other sequence's last draw as in a switching state-space model, create BOTH estimators "
                        f"anew per step, for {q!r} and for {e!r})")
                # (found by porting M2: one estimator for the labelled and the unlabelled z, where no
                # sequence was meant; the partition suggestions below did not say so)
                alone = (f" This call depends on no earlier call of {q!r} (its distribution carries none of "
                         "their samples), as independent branches do."
                         if own is not None and all(o.name != q for o in own) else "")
                raise PlateError(
                    f"step {t} of partition {q!r} depends on node {e!r}, which was sampled after the partition "
                    f"started. Calling one estimator several times in a graph makes its calls ONE partition, a "
                    f"sequence of steps drawn in order (docs/partitions.md).{alone} If the calls are independent "
                    "branches of your model (e.g. the labelled and the unlabelled data of a semi-supervised VAE, "
                    "two encoders), you do not want a sequence: create one estimator per branch, "
                    "storch.estimator(...) for each, with plates of their own (e.g. "
                    f"plate='{q}_a' and plate='{q}_b'). If they are steps of one sequence: "
                    "a partition's steps may depend only on nodes sampled before its first call "
                    "(partitions are topologically ordered, paper, section 3.2), so creating the estimator of "
                    f"{e!r} anew for each of its calls does not help. Instead: (1) start a new partition of "
                    f"{q!r} after each such draw: create the estimator of {q!r} anew for each segment between "
                    f"the draws, storch.estimator(..., plate=f'{q}{{k}}') for segment k (a node drawn every "
                    "step, such as an environment transition: one estimator per step; an option drawn every "
                    f"K steps: one per option); (2) or draw {e!r} with the estimator of {q!r} itself (its calls "
                    f"make one partition, e.g. s = est(Categorical(probs=P[s, a])) for a transition); (3) or, "
                    "for environment randomness that needs no gradient, draw it with plain torch, "
                    "Categorical(probs=P[s, a]).sample() or torch.rand_like(...) and an inverse CDF: not a "
                    f"storch node{both}. docs/partitions.md, 'Stochastic environments and options'"
                )
    if own is not None and not node.branch_warned:
        _warn_independent_step(est, node, own, t)
    log = node.step_log
    if log is None:
        log = node.step_log = [(node.plates, node.gradient_values)]
        node._history = [log[0]]
        # step 0's draw, for node.at(0): the node itself goes on to hold the last step's sample
        node.step_draws = [StepDraw(node.sample, node.distribution, node.original, node.value, node.finished)]
    params = rsample_params(raw) if est.requires_rsample else None
    if params is not None:
        node.rsample_noted = False  # (set again where the step's draw notes its own rsample)
    if how is _BY_COMPONENTS:  # (never for a first-party estimator)
        sample, lp, out = _components_step(est, node, raw, plates, t)
    else:
        made = _watched_draw(node, raw, params, est.extend, node, raw, plates)
        sample, lp, out = _extended(est, made, plates, t, how)
    _check_step_sample(est, sample, raw, distribution, t)
    if precision_checked(raw) is not None:  # (as at the first step)
        est._check_draw_precision(raw, sample)
    if params is not None and not node.rsample_noted:  # (as at the first step: each step's rsample, its
        note_rsample(node, sample, raw, params)  # parameters taken before it)
    prev = node.plate
    plate = Plate(prev.name, sample.shape[0], False, t, prev.lineage)
    new = (plate,) + parents
    lp = _checked_lead(est, "extend (its gradient function l_t)", lp, new, t, raw, sample)
    if node.steps_in_place and (prev.lineage.parents or plate.size != prev.size or parents != node.parents
                                or lp.shape != log[0][1].shape):
        node.steps_in_place = False  # L_t re-indexed step by step (Node.history)
    # L_t = L_{t-1} + l_t is computed when read (Node.history, gradient_values); the stacked
    # surrogate of the partition's costs takes one cumulative sum over the logged l_t instead
    # (the log's last plates are the plates of the value returned below: Estimator.forward
    # matches the next step's distribution against them)
    log.append((new, lp))
    w = node._weight_values
    if w is not None and est.causal_credit and parents != node.parents:
        # weights kept from step 0 (not uniform, e.g. score's greedy entry): the plates grew (a data
        # plate joined), so give them this step's plate dims, as the gradient function has
        node._weight_values = align(_lead(w, len(node.plates)), node.plates, new)
    node.plate, node.parents, node.step = plate, parents, t
    node.sample = sample
    if not est.causal_credit:
        node.weight_values = None  # per whole sequence: computed at the last step, by the surrogate
    if not out.is_inference():
        node.handed.append((out, out._version))
    if out.requires_grad and is_pathwise(est) and prev.lineage.watch is None:
        prev.lineage.watch = _compare_watch(node)  # (the first step's sample had no gradient: see _sample_node)
    value = PlateTensor._wrap(out, new)
    # the step's own draw for node.at(t) (references, no copies): what a control variate of a cost
    # at step t reads (node.sample, node.distribution of step t: the raw one, `raw`; `distribution` is the user's)
    node.step_draws.append(StepDraw(sample, raw, distribution, value, node.finished))
    if isinstance(raw, _MAY_CACHE):  # (as above)
        _keep_preimages(node, rekey_transform_cache(raw, out, value, lambda r: PlateTensor._wrap(r, new),
                                                    distribution))
    return value


def _components_step(est: Estimator, node: Node, raw: Distribution, plates: tuple[Plate, ...],
                     t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step t of a partition of an estimator that overrides some of ``proposal``, ``gradient_function``
    and ``output`` but none of the partition hooks (``extend``, ``step_gradient_function``, ``draw``),
    whose defaults are the base class's components (a draw from p, l = log p, the sample handed out):
    the step is drawn, scored and handed out by the estimator's own components (found by a tester: a
    third-party pathwise estimator got l_t = log p of an rsample'd step, a score term on top of the
    pathwise one). Returns ``(sample, l_t, output)``.

    The components see step t as a node whose parents are ``plates`` (the partition's plate at t-1
    leads them, as a parent plate does): ``proposal`` draws its N entries for every prefix, shape
    ``(N, N_{t-1}, *parents, ...)``; prefix i continues with entry i of its own draws (the diagonal),
    as sampling with replacement continues entry i with entry i, and l_t and the output are the
    diagonal of ``gradient_function`` and ``output`` on that node. Uniform weights are kept per
    whole sequence (causal credit); other weights would have to be multiplied along the sequence,
    which only the estimator's own ``extend`` can say: refused."""
    name = est.name or type(est).__qualname__
    if not est.uniform_weights:
        raise StorchError(
            f"estimator {name!r} (plate {est.plate!r}) overrides weighting_function and is called again in "
            f"this graph (step {t} of its partition): the base class keeps one weight per whole sequence, and "
            "non-uniform weights of a sequence (e.g. importance weights) are a product over its steps that only "
            "the estimator can compute. Override extend(node, distribution, plates) to draw step t and return "
            "(sample, l_t) (docs/partitions.md, 'For estimator authors'), or set supports_partitions = False")
    view = Node.__new__(Node)  # step t as a node of its own, with the prefix plate among its parents
    view.__dict__.update(node.__dict__)  # (state, inputs, frames, handed: the partition's)
    view.distribution, view.distribution_plates, view.parents = raw, plates, plates
    view.step_log = view._history = view._views = view._eos_before = None
    view.plate = view.sample = view.value = view._gradient_values = view._weight_values = None  # type: ignore[assignment]
    view._owner, view.step = weakref.ref(node), t
    grid = est.proposal(view)
    full = raw._batch_shape + raw._event_shape  # (the prefix plate, the parents, the own batch, the event)
    if grid.shape[1:len(full) + 1] != full:
        raise StorchError(_sample_shape_message(est, "proposal", grid.shape, full, t))
    m, n = grid.shape[0], plates[0].size
    if m != n:
        raise StorchError(
            f"estimator {name!r} (plate {est.plate!r}): at step {t} of its partition, proposal drew {m} entries "
            f"per prefix but the partition has {n}: storch continues prefix i with entry i of its draws "
            "(sampling with replacement), which needs as many entries as at the step before. Override "
            "extend(node, distribution, plates) to draw step t yourself (docs/partitions.md, 'For estimator "
            "authors')")
    view.plate, view.sample = Plate(est.plate, m, False, t, Lineage()), grid
    l = _widened(_checked_lead(est, "gradient_function", est.gradient_function(view), view.plates, t, raw, grid))
    view.gradient_values = l
    out = est.output(view)
    if out.shape[:2] != grid.shape[:2]:  # (the step's plate and the prefix plate: the diagonal's two dims)
        raise StorchError(_output_shape_message(est, out, grid, 2, f"output (at step {t} of its partition)"))
    i = torch.arange(n, device=grid.device)
    sample, out = grid[i, i], out[i, i]  # entry i of prefix i's draws
    lp = l.expand((m, n) + l.shape[2:])[i, i]
    if est.eos is not None:
        if type(est).output is not Estimator.output:
            raise StorchError(
                f"estimator {name!r} (plate {est.plate!r}) overrides output and has eos={est.eos}: a finished "
                "sequence draws eos again, which its output would have to show. Override extend(node, "
                "distribution, plates) and return the masked step (docs/partitions.md, 'For estimator authors')")
        sample, lp = est.mask_after_eos(node, raw, sample, lp, plates)
        out = sample
    return sample, lp, out


def _extended(est: "Estimator", made: tuple, plates: tuple, t: int, how: object) -> tuple:
    """``(sample, l_t, output)`` of a partition step from what ``est.extend`` returned: a third element is the
    step's output (of the sample's plates); an estimator that overrides ``output`` must return it (``how`` is
    ``_BY_EXTEND_OUTPUT``), since the step would otherwise hand out the raw sample."""
    if len(made) == 3:  # (sample, l_t, output): an estimator with an output of its own
        sample, lp, out = made
        lead = len(plates)  # (the step's plate and the parents: the value's plates)
        if out.shape[:lead] != sample.shape[:lead]:
            raise StorchError(_output_shape_message(est, out, sample, lead, "extend (its third element)"))
        return sample, lp, out
    if how is _BY_EXTEND_OUTPUT:
        # the sample would be handed out instead of the output: silently another value (a tester's
        # {0, 1} where the estimator's output is a ±1 spin)
        owner = type(est).__mro__[_depth(type(est), "output")].__qualname__
        raise StorchError(
            f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) overrides output "
            f"(in {owner}), but its extend returned (sample, l_t) at step {t} of its partition: the step "
            "would hand out the raw sample, not the output. Return the step's output as the third element, "
            "(sample, l_t, output), with output of the sample's shape (e.g. sample, l_t = "
            "super().extend(node, distribution, plates), then your output of sample) "
            "(docs/partitions.md, 'For estimator authors')")
    sample, lp = made
    return sample, lp, sample


def _plain_step(est: Estimator, node: Node, distribution: Distribution, raw: Distribution,
                plates: tuple[Plate, ...]) -> PlateTensor:
    """:func:`_extend_partition` of a plain step (issue 19: a policy's episode, one call per step): step t
    of a partition whose estimator and distribution type were found plain (:func:`_is_plain`, the node's decision)
    and whose step has no ``inputs=`` and the partition's parents (``plates[1:] == node.parents``, so no
    topological-order walk, weight re-alignment or independent-step warning). The same step, value and errors,
    without the checks that come out as no-ops for such a step (the support check, enumeration, order lowering,
    integer-read marks, eos, no-grad record, rsample watch, precision check, pathwise watch, transform cache)."""
    t = node.step + 1
    sample, lp, out = _extended(est, est.extend(node, raw, plates), plates, t, _BY_EXTEND)
    _check_step_sample(est, sample, raw, distribution, t)
    prev, log, draws = node.plate, node.step_log, node.step_draws
    lineage = prev.lineage if prev is not None else None
    # (a partition started: its step 1 set them)
    assert prev is not None and lineage is not None and log is not None and draws is not None
    plate = Plate(prev.name, sample.shape[0], False, t, lineage)
    new = (plate,) + node.parents
    lp = _checked_lead(est, "extend (its gradient function l_t)", lp, new, t, raw, sample)
    if node.steps_in_place and (lineage.parents or plate.size != prev.size or lp.shape != log[0][1].shape):
        node.steps_in_place = False
    log.append((new, lp))
    node.plate, node.step = plate, t
    node.sample = sample
    if not est.causal_credit:
        node.weight_values = None
    if not out.is_inference():
        node.handed.append((out, out._version))
    value = PlateTensor._wrap(out, new)
    draws.append(StepDraw(sample, raw, distribution, value, node.finished))
    return value
