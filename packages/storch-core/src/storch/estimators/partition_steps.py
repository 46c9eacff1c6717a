"""A partition's later steps (paper, section 3.2: calling one estimator several times in a graph): how a class's
step t is made (:func:`_partition_path`: by ``extend`` or by its components), the general step
(:func:`_extend_partition`), the plain step (issue 19: :func:`_plain_step`), and the checks of a step (its
sample, ``eos=``, a step independent of the earlier ones)."""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, OneHotCategorical

from ..graph.cost_frame import _lead, _widened
from ..distributions import rekey_transform_cache, rsample_params, strict_support, unwrap_distribution
from ..distributions.precision import precision_checked
from ..distributions.support import _STRICT
from .._util.stacklevel import user_stacklevel
from ..errors import IndependentStepWarning, OptionError, PlateError, StorchError, UnsupportedDistributionError
from ..graph import is_tracing
from ..graph.node import Node
from ..plates.integer_reads import MARKS
from ..plates.tensor import Lineage, Plate, PlateTensor, align
from .checks import _checked_lead, note_rsample
from .messages import _output_shape_message, _plate_tensor_draw_message, _sample_shape_message
from .watch import _compare_watch, is_pathwise
from .capabilities import _lowers_order
from .nodes import _MAY_CACHE, _keep_preimages, _note_integer_parameter, _sampled_without_grad, _watched_draw

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
        raise PlateError(
            f"estimator {est.name!r} (plate {est.plate!r}) was already used in this graph. Calling one "
            "estimator several times makes its calls one partition (a sequence with one plate), which "
            f"{est.name!r} does not support. Create one estimator per stochastic node, or start each "
            "step with a new graph (storch.backward() / storch.reset())"
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
        node.step_draws = [(node.sample, node.distribution, node.original, node.value, node.finished)]
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
    # at step t reads (node.sample, node.distribution of step t)
    node.step_draws.append((sample, raw, distribution, value, node.finished))
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


# The partition hooks: what a later step of a partition calls (Estimator.extend draws with draw and scores with
# step_gradient_function), each with the components it stands in for at a later step. The base class's hooks are
# written for its own components (a draw from p, l = log p, the sample handed out); an estimator that overrides
# components and no hook has its later steps made from its components (_components_step)
_PARTITION_HOOKS = ("extend", "step_gradient_function", "draw")
_HOOKS_OF = {"gradient_function": ("step_gradient_function", "extend"), "proposal": ("draw", "extend"),
             "output": ("extend",), "weighting_function": ("extend",)}
_DOES = {"gradient_function": "scored", "proposal": "drawn", "output": "handed out", "weighting_function": "weighted"}
# how a later step of a class is made (per class, computed at its first step 1): by extend; by extend, which must
# return the output (the class overrides output); by its components; or a str: why it is refused
_BY_EXTEND, _BY_EXTEND_OUTPUT, _BY_COMPONENTS = 0, 1, 2
_STEP_PATH: dict[type, Any] = {}


def _depth(cls: type, name: str) -> int:
    """The position in ``cls.__mro__`` of the class that defines ``name`` (smaller: more derived)."""
    return next(i for i, k in enumerate(cls.__mro__) if name in k.__dict__)


def _partition_path(cls: type) -> Any:
    """How a later step of a partition of ``cls`` is made (cached in ``_STEP_PATH``): ``_BY_COMPONENTS`` if it
    overrides no partition hook (below :class:`Estimator`); else by ``extend`` (``_BY_EXTEND_OUTPUT`` if it
    overrides ``output``, which extend must then return), provided every component it overrides at MRO depth d
    has one of its hooks (``_HOOKS_OF``) overridden at depth <= d (the same class or a subclass: written with the
    component in view); else a str, the end of the message that refuses step 1 (a silently wrong step: e.g. a
    class overriding draw and gradient_function together got l_t = log p from the base step_gradient_function).
    Checked at step 1, not at the class: a subclass used only for single nodes is fine."""
    base = cls.__mro__.index(Estimator)
    depth = {n: _depth(cls, n) for n in _PARTITION_HOOKS + tuple(_HOOKS_OF)}
    if all(depth[h] >= base for h in _PARTITION_HOOKS):
        how = _BY_COMPONENTS if any(depth[c] < base for c in _HOOKS_OF) else _BY_EXTEND
    else:
        late = [c for c, hooks in _HOOKS_OF.items() if depth[c] < base and min(depth[h] for h in hooks) > depth[c]]
        if late:
            def where(n):
                return f"{cls.__mro__[depth[n]].__qualname__}.{n}"

            def owner(c):
                k = cls.__mro__[depth[c]].__qualname__
                return k if k == cls.__qualname__ else f"{cls.__qualname__} (in {k})"
            parts = "; and ".join(
                f"{owner(c)} overrides {c} without {' or '.join(_HOOKS_OF[c])} in that class or a subclass: a "
                f"later step would be {_DOES[c]} by {' / '.join(where(h) for h in _HOOKS_OF[c])}, written without "
                f"it, not by {c}" for c in late)
            how = (f"{parts}. storch cannot tell whether step t >= 1 made that way is what your components would "
                   "make (where they differ, a silently wrong gradient or value). Override extend(node, "
                   "distribution, plates) in that class or a subclass, returning step t's (sample, l_t), or "
                   "(sample, l_t, output) where output is overridden, made with your components (or override "
                   "step_gradient_function(node, distribution, sample, plates) if only the gradient function "
                   "differs, draw(distribution, shape) if only the proposal does); where the base class's hook is "
                   "right for your component (a proposal of n i.i.d. draws from p, as Estimator.draw makes them: "
                   "rsample with requires_rsample, else sample), say so in the class: `draw = storch.Estimator.draw`. "
                   "Or set supports_partitions = False, or create one estimator per stochastic node "
                   "(docs/partitions.md, 'For estimator authors')")
        else:
            how = _BY_EXTEND_OUTPUT if depth["output"] < base else _BY_EXTEND
    _STEP_PATH[cls] = how
    return how


_STRICT_BASES = {strict: base for base, strict in _STRICT.items()}  # storch's strict copies -> the user's class


def _eos_support(d: Distribution) -> tuple:
    """What ``eos=`` reads of a step's distribution: its class (the user's: a saturated Bernoulli that
    storch.extending.strict_support copied is still a Bernoulli), event shape and number of values (of a
    Categorical / OneHotCategorical read from its parameters: enumerating a OneHotCategorical's support builds
    eye(K), K x K per step; review r-eighteen)."""
    kind = _STRICT_BASES.get(type(d), type(d))
    if isinstance(d, Categorical):
        n = d._num_events
    elif isinstance(d, OneHotCategorical):
        n = d._categorical._num_events
    elif isinstance(d, Bernoulli):
        n = 2
    else:
        n = d.enumerate_support(expand=False).shape[0] if d.has_enumerate_support else None
    return kind, tuple(d.event_shape), n


def _describe_support(d: Distribution) -> str:
    kind, event, n = _eos_support(d)
    values = "no finite support" if n is None else f"{n} values"
    return f"{kind.__name__} ({values}, event shape {event})"


def _check_eos_step(est: Estimator, node: Node, raw: Distribution, t: int) -> None:
    """Refuse step t of a partition with ``eos=`` whose distribution has another support than its first
    step's (another class, event shape or number of values): eos applies to every step, so such a step
    (an environment transition drawn by the policy's estimator) would be forced to the value at index
    ``eos`` once a sequence ended, even where it has probability 0, and drawing that value would end the
    sequence (found by porting an RL loop with a stopping action). A step with the same support cannot
    be told apart from a token of the sequence (docs/partitions.md, 'Variable length: eos=')."""
    first = node.distribution
    if _eos_support(raw) == _eos_support(first):
        return
    name = est.name or type(est).__qualname__
    raise OptionError(
        f"estimator {name!r} (plate {est.plate!r}) has eos={est.eos}, and step {t} of its partition draws from "
        f"{_describe_support(raw)}, its first step from {_describe_support(first)}. eos= ends the whole "
        f"sequence: once an entry drew the value at index {est.eos}, EVERY later step of the partition draws "
        f"that value again with log-probability 0, whatever its distribution, and any step that draws it ends "
        "the sequence. A step of another kind, such as an environment transition drawn by the policy's estimator "
        "(docs/partitions.md, 'Stochastic environments and options', option 2), would be forced to that value "
        "(even where it has probability 0) and would end episodes. With eos=, draw environment transitions with "
        "plain torch, s = Categorical(probs=P[s, a]).sample() (option 1), or by an estimator created anew per "
        "segment (option 3); or leave out eos= and mask the costs of finished episodes yourself "
        "(docs/partitions.md, 'Variable length: eos=')")


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


def _check_step_sample(est: "Estimator", sample: Any, raw: Any, distribution: Any, t: int) -> None:
    """A partition step's draw: a raw tensor (not a plate tensor) with the step distribution's own shape after the
    leading plate dim."""
    if type(sample) is PlateTensor:
        raise UnsupportedDistributionError(_plate_tensor_draw_message(est, distribution, f"extend (step {t})"))
    # (raw's first dim: the partition's plate at step t-1; every torch Distribution sets these two in __init__)
    own = raw._batch_shape[1:] + raw._event_shape
    if sample.shape[1:len(own) + 1] != own:
        raise StorchError(_sample_shape_message(est, "extend", sample.shape, own, t))


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
    draws.append((sample, raw, distribution, value, node.finished))
    return value


def _warn_independent_step(est: Estimator, node: Node, own: tuple[Plate, ...], step: int) -> None:
    """Warn (once per partition) when step ``step`` of ``node``'s partition draws from a distribution that
    carries none of the partition's plates (it depends on no earlier step's sample) and lacks parent plates
    the partition already has (it is drawn for every entry of them): the signature of two independent
    branches of a model sharing one estimator (found by porting M2: the labelled z, drawn after the
    unlabelled one by the same estimator, got the unlabelled data's and the labels' plates, 12x the work).
    A sequence whose steps do not depend on each other but share their plates (i.i.d. pulls of a bandit,
    a gate per block, actions given one option) lacks none and is not reported. One pass over plates."""
    q = est.plate
    names = set()
    for o in own:
        if o.name == q:  # (any step of the partition): the step depends on an earlier one
            return
        names.add(o.name)
    missing = [p for p in node.parents if p.name not in names]
    size = 1
    for p in missing:
        size *= p.size
    if size <= 1:
        return
    node.branch_warned = True
    have = ", ".join(repr(o.name) for o in own) or "none"
    extra = ", ".join(f"{p.name!r} (size {p.size})" for p in missing)
    warnings.warn(IndependentStepWarning(
        f"estimator {est.name or type(est).__qualname__!r} (plate {q!r}) is called again in this graph (step {step} "
        "of its partition: calling one estimator several times in a graph makes its calls ONE partition, a "
        f"sequence), but this call's distribution depends on no earlier call (its plates: {have}; none is {q!r}) "
        f"and lacks the plates {extra} of the earlier calls: it is drawn for every entry of them, {size}x the "
        "samples it needs (gradients stay unbiased). If the calls are independent branches of your model (e.g. "
        "the labelled and the unlabelled data of a semi-supervised VAE), create one estimator per branch, "
        f"storch.estimator(...) for each, with plates of their own (plate='{q}_a', plate='{q}_b'). If a sequence is "
        "meant, silence this with warnings.filterwarnings('ignore', category=storch.IndependentStepWarning) "
        "(docs/partitions.md)"), stacklevel=user_stacklevel())
