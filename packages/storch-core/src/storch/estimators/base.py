"""The estimator protocol: the four components of the paper (section 3.2) and their metadata.

An estimator 〈q, w, l, a〉 is bound to one stochastic node (its plate):

- ``proposal(node)``: draw the set of samples X (the plate), shape ``(N, *parents, *batch, *event)``;
- ``weighting_function(node)``: w(x) >= 0 per sample, may carry gradient;
- ``gradient_function(node)``: l(x) per sample (log-probability for score functions);
- ``control_variate(node, cost)``: a(x<i, X), zero in expectation at every declared order.

Call order (one graph = one step):

1. ``est(distribution, inputs=None)``: ``check_distribution``; a :class:`storch.Node` is made with
   ``node.state = est.State()`` (the estimator's typed per-node record, if it declares one) and
   ``node.inputs``; then ``proposal(node)`` -> ``node.sample`` (and the plate);
   ``gradient_function(node)`` -> ``node.gradient_values``; ``weighting_function(node)`` ->
   ``node.weight_values``; ``output(node)`` -> the value user code sees.
2. ``storch.surrogate_loss(order)``: per cost upstream of the node, ``control_variate(node, frame)``
   with the :class:`CostFrame` of that cost (innermost node first); the frame is kept in
   ``node.frames[cost_name]``.
3. ``storch.backward()``: the first-order surrogate is backpropagated, then
   ``update_parameters(nodes, loss)`` runs once per estimator whose ``has_update`` is true, with
   its nodes of this graph (their ``frames`` filled) and the surrogate loss (graph still alive).

The components are pure given their inputs and random numbers: every change of the estimator's
own state (moving averages, learned baselines and control variates, their optimizers) happens in
``update_parameters`` only, so an evaluation pass (``surrogate_loss`` without ``backward``)
changes nothing. Subclasses override only what differs. Capabilities are class attributes,
checked at registration (``storch.registry``); an instance whose options change a capability
(e.g. ``unordered_set`` without its baseline) sets it on itself, and :meth:`Estimator.info`,
``storch.OrderError`` and the surrogate read the instance's value.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import numbers
import sys
import types
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Generic, Optional, TypeVar

import torch
from torch.distributions import (Bernoulli, Categorical, Distribution, Independent, OneHotCategorical,
                                 TransformedDistribution)

from ..cost import CostFrame, _lead, _widened, magic_box
from ..distributions import (
    base_distribution,
    check_enumeration,
    holds_grad,
    raw_log_prob,
    raw_sample,
    rekey_transform_cache,
    rsample_max_order,
    rsample_params,
    straight_through_rsample,
    strict_support,
    unwrap_distribution,
)
from ..distributions.precision import precision_checked
from ..distributions.support import _STRICT
from ..distributions.rsample_kinks import RsampleComparisons
from ..distributions.unwrap import _as_raw
from .._stacklevel import user_stacklevel
from ..eager import (_compiler, _jit_tracing, eager_only, ignored_by_script, refuse_foreign_trace,
                     scripted_estimator_message)
from ..errors import (IndependentStepWarning, NonFiniteParameterError, OptionError, PlateError, StorchError,
                      UnsupportedDistributionError)
from ..generators import drawing_with
from .. import options
from ..graph import _stack, current_graph, is_tracing
from ..node import Node
from ..plates.integer_reads import MARKS, marked_parameter
from ..plates.tensor import MAX_DIMS, Lineage, Plate, PlateTensor, align, too_many_dims_message
from ..score_conditions import KINK_FREE, moving_support, support_is_fixed
from .catalog import EstimatorInfo, available, installed_classes, supporting_estimators
from .checks import (_check_sample_entries, _checked_lead, check_in_frame, check_precision, note_compared, note_rsample,
                     warn_precision)
from .messages import (_no_update_message, _nonfinite_parameters, _output_shape_message, _plate_tensor_draw_message,
                       _sample_dtype_message, _sample_shape_message, _under_jacfwd, updating_message)
from .step_state import step_baseline
from .watch import _CATEGORIES, _both, _compare_watch, _threshold_watch, is_pathwise

if sys.version_info >= (3, 10):
    from typing import Concatenate, ParamSpec
else:  # (a dependency of torch; storch-core requires it on 3.9)
    from typing_extensions import Concatenate, ParamSpec

__all__ = ["Estimator", "CostFrame", "magic_box"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


class _instance_or_class(Generic[_P, _R]):
    """A method bound to the instance when called on one, else to the class (capability checks)."""

    def __init__(self, func: Callable[Concatenate[Any, _P], _R]) -> None:
        self.__func__ = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, cls: Any = None) -> Callable[_P, _R]:
        return types.MethodType(self.__func__, cls if obj is None else obj)


class Estimator(torch.nn.Module):
    """Base class of gradient estimators: sampling with replacement, score function, no baseline.

    Class attributes (capabilities):
        name: the registry name.
        aliases: other registry names.
        max_order: highest derivative order for which it is unbiased (``math.inf`` = any). A node's
            distribution may lower it for that node: :meth:`max_order_for`.
        biased: True if it estimates a different (relaxed / finite-difference) objective.
        higher_order_options: in words, the options that raise ``max_order`` (``"baseline=False: every
            order"``), for the OrderError that a too-high order raises; empty when none does.
        distributions: supported distribution types (``None``: any).
        score_function: whether the gradient function is the score log p(x) of the node's distribution
            (``score``, ``importance``, LAX). Such an estimator refuses a distribution whose support moves
            with a parameter that requires grad (:func:`storch.extending.moving_support`: its gradient
            misses the boundary term), and ``storch.surrogate_loss(order >= 2)`` refuses a node whose log p
            has a kink in the parameters (Laplace's |x - loc|: ``storch.OrderError``). ``None`` (the
            default): true when ``gradient_function`` is the base class's (log p), and for an overridden
            one whose values are ``node.log_prob(sample)`` where not 0 (compared once per class and
            distribution type, for types whose log p may have a kink or whose support may move). Set
            it to True for a log p computed in another form.
        jump_free: whether the estimator differentiates the cost through the sample it hands out and needs
            that cost continuous there (REBAR and RELAX's relaxed-cost term η f(σ_λ(z))): a comparison (or
            argmax, a bool or integer cast) of a value that carries the sample's gradient, outside the
            autograd graph, is recorded on the node (``Node.thresholded``), and
            ``storch.surrogate_loss(order >= 1)`` refuses the costs that carry the node's plate
            (``storch.OrderError``); the indices of max / topk / sort of such a value are marked, and a cost
            computed from them is refused (its values are accepted). Comparisons in ``torch.distributions``'
            argument and support checks are not counted (their result decides only whether to raise). False by default: an estimator that
            evaluates the cost at a hard or detached sample only (ARM, LAX) may see it thresholded.
        pathwise: the estimator differentiates the cost through the value it hands out, drawn without torch's
            ``rsample`` (a relaxation: ``gumbel_softmax``, whose derivatives at every order are those of the
            relaxed objective E[f(relax(θ, noise))]). It gets the checks of a ``requires_rsample`` estimator (which
            is pathwise whatever this says: ``storch.estimators.watch.is_pathwise``): the path from the sample to each cost is walked
            for kinks and jumps (``storch.surrogate_loss(order >= 2)`` refuses a kink such as ReLU, abs, clamp,
            order 1 a jump such as round), and a comparison in user code of a value that reaches the sample (the
            mask of ``torch.where(z > c, z - c, 0)``) is recorded on the node (``Node.compared``) and refused from
            order 2: autograd misses the delta at the kink, so those derivatives would be silently biased for the
            estimator's own objective. False by default (straight-through, whose gradient is no derivative of an
            objective, keeps it False).
        requires_rsample / requires_enumerate_support: capability requirements. An estimator with
            ``requires_enumerate_support`` gets its distribution through
            ``storch.extending.strict_support`` (``node.distribution`` and a partition step's): values of
            probability exactly 0 given by ``probs`` have log p = -inf, as with ``-inf`` logits, so an
            estimator that reads the support's log-probabilities never takes them for possible values.
        requires_expand: a capability requirement: the distribution implements ``expand`` (vimco makes its K
            draws with it); a distribution without it (torch's default ``Distribution.expand`` raises
            ``NotImplementedError``) is not supported, so the estimator is left out of the lists of estimators
            that support it.
        has_update: ``storch.backward()`` runs :meth:`update_parameters` (learned or running parts);
            so does ``surrogate_loss().backward()``, after its backward pass. An instance that has it
            but neither overrides ``update_parameters`` nor sets ``replays_update`` would update nothing:
            refused at its first call (the class attribute alone may be the registered name's capability
            that an instance turns off for its options, as ``sum_and_sample`` without ``buffer=``).
            A surrogate of the step built after that update reads :meth:`baseline` as it was before it
            (``storch.estimators.step_state``: kept when the update runs); state read elsewhere in the surrogate
            (an overridden :meth:`control_variate`) must not change in the update, or the step's later
            surrogates read this step's samples through it (read it when the node is sampled, or through
            :meth:`baseline`; or set ``update_uses_loss_graph``: ``surrogate_loss().backward()`` is then refused).
        update_uses_loss_graph: whether :meth:`update_parameters` differentiates ``loss`` again.
            ``True`` (a learned control variate): ``storch.backward()`` keeps the loss's graph for
            the update, and ``surrogate_loss().backward()``, which frees that graph, refuses it.
            ``False``: the update reads the step's tensors as values only, so ``storch.backward()``
            frees the graph in its backward pass (peak memory), whether or not ``storch.compile``
            can replay the update (e.g. ``sum_and_sample`` with ``buffer=``, whose buffer is Python
            per data point). ``None`` (the default: not said): the graph is kept, unless the update
            replays from detached tensors (``replays_update``).
        replays_update: ``storch.compile`` can replay a step with this estimator although it has an
            update: the update needs only detached tensors of the step (:meth:`update_inputs`,
            which the compiled program returns as extra outputs; :meth:`update_from` applies them
            when the compiled step's loss is backpropagated), and the state its components read is
            the tensors :meth:`state_tensors` lists (passed to the compiled program at every call).
            E.g. ``score`` with ``baseline="moving_average"``. With ``update_uses_loss_graph`` too
            (relax, rebar, lax): ``update_inputs`` keep their graph and :meth:`loss_graph_values`
            differentiates the loss after each call of a step replayed with ``backend=None`` (the
            only backend that can: a compiled program is one autograd node). Without those methods:
            a ``StorchError`` at registration or first instantiation (a class attribute), or where an
            instance sets the flag (:func:`replay_problem`).
        State: the dataclass of the per-node record ``node.state`` (``None``: no record).
        supports_partitions: whether calling one instance several times in a graph (a loop) makes
            one partition (paper, section 3.2; docs/partitions.md). A later step is made by
            :meth:`extend` where the class overrides a partition hook (``extend``,
            ``step_gradient_function``, ``draw``), else, where it overrides components, from its own
            ``proposal``, ``gradient_function`` and ``output`` (:meth:`_components_step`). With a hook,
            each overridden component needs its hook overridden in the same class or a subclass
            (``gradient_function``: ``step_gradient_function`` or ``extend``; ``proposal``: ``draw`` or
            ``extend``; ``output`` and ``weighting_function``: ``extend``), else the second call in a
            graph (step 1) is refused (:func:`_partition_path`).
        causal_credit: for partitions: a cost computed at step t is credited to steps <= t only
            (True: weights are the same at every step, e.g. sampling with replacement); False:
            costs are moved to the last step and credited to the whole sequence (sampling without
            replacement, whose weights belong to the final set of sequences).
        eos: the end-of-sequence value of a partition (an index into the support), or ``None``.
        cost_hint: a sentence added to the error of a cost that is not one number per sample when
            the cost depends on a node of this estimator (``""``: none); e.g. vimco's, whose samples
            carry the K draws as a per-sample dim that only ``est.bound(log_w)`` reduces.
        partition_hint: a sentence added to the refusal of a second call (a partition) of an estimator
            that does not support partitions (``""``: none); e.g. vimco's recipe for a bound over a sequence.
        partition_options: what a partition of this estimator needs, named where it is offered as an
            alternative for a partition (``""``: nothing); e.g. sum_and_sample's ``buffer=`` and one token per call.

    Args:
        plate: name of the node's sample plate.
        n_samples: number of samples (the plate size for sampling with replacement).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    plate: str
    n_samples: int  # (both set by the constructor: typed here, not Any through __getattr__ below)
    #: the updates of a learned part skipped because their loss or gradients were not finite
    #: (:func:`storch.extending.optimizer_step`); 0 for an estimator that learns nothing
    skipped_updates: int = 0
    max_order: float = math.inf  # (these four: an instance may set them from its options)
    biased: ClassVar[bool] = False
    higher_order_options: ClassVar[str] = ""
    distributions: ClassVar[Optional[tuple[type, ...]]] = None
    score_function: ClassVar[Optional[bool]] = None
    jump_free: bool = False
    # storch.estimator's count of the nodes a stateful instance drew (storch.registry._note_created), or None
    _nodes_drawn: Optional[list] = None
    requires_rsample: ClassVar[bool] = False
    pathwise: ClassVar[bool] = False
    requires_enumerate_support: ClassVar[bool] = False
    requires_expand: ClassVar[bool] = False
    has_update: bool = False
    update_uses_loss_graph: Optional[bool] = None
    replays_update: bool = False
    supports_partitions: ClassVar[bool] = False
    causal_credit: ClassVar[bool] = True
    eos: Optional[int] = None
    cost_hint: ClassVar[str] = ""
    partition_hint: ClassVar[str] = ""
    partition_options: ClassVar[str] = ""
    State: ClassVar[Optional[type]] = None
    """The typed per-node record (a dataclass whose fields all have defaults); ``node.state`` is a
    fresh instance of it for every node, created before ``proposal``."""

    if TYPE_CHECKING:
        # for type checkers only (torch.nn.Module's own lookup runs at runtime): the attributes of an
        # estimator made by name (storch.estimator returns an Estimator), such as gumbel_softmax's
        # ``step`` or score's ``moving_averages``, are Any rather than Module.__getattr__'s
        # ``Tensor | Module``; the attributes declared here keep their types
        def __getattr__(self, name: str) -> Any: ...

    def __init__(self, plate: str, n_samples: int = 1) -> None:
        super().__init__()
        self._created = next(_CREATED)
        cls = type(self)
        if cls not in _WELL_FORMED:  # once per class: the registry checks it too, but a class may be used directly
            problem = capability_problem(cls)
            if problem is not None:
                raise StorchError(f"estimator class {cls.__qualname__} ({cls.name or 'no name'}) has {problem}")
            _WELL_FORMED.add(cls)
        if not isinstance(plate, str) or not plate:
            raise OptionError(f"plate must be a non-empty string, got {plate!r}")
        self.plate = plate
        self.n_samples = self.check_option("n_samples", n_samples)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_marks_construction", False):
            cls.__init__ = _marking_construction(init)  # type: ignore[method-assign]
        for hook in _DECLARED_OPTIONS:
            if _defined_before(cls, "_" + hook, hook):
                setattr(cls, hook, _declared_under_private_name(hook))

    # -- options set after construction (``est.temperature = 0.1``) --------------------------------

    #: the options fixed at construction (read only there, or turned into state), each with what setting it
    #: afterwards would leave wrong: ``est.<name> = v`` on a constructed estimator then raises
    #: :class:`storch.OptionError` (create a new estimator instead). A name may be any attribute, not only a
    #: constructor parameter (``"n_samples"`` for an estimator whose constructor computes it from its own
    #: options). Options whose name is a method of the class (``score``'s ``baseline``) are fixed too; every other
    #: constructor option, and the base's ``plate`` and ``n_samples``, set on a constructed estimator goes through
    #: :meth:`check_option`.
    fixed_options: ClassVar[dict[str, str]] = {}

    def check_option(self, name: str, value: Any) -> Any:
        """The value to keep for option ``name`` (checked as the constructor checks it), or raise
        :class:`storch.OptionError`. Called by the constructor and for ``est.<name> = value`` on a constructed
        estimator (an option not in :attr:`fixed_options`); a subclass checks its own options and calls
        ``super().check_option(name, value)`` for the others."""
        if name == "n_samples":
            return options.integer(self.name, "n_samples", value, minimum=1,
                                   what="an int >= 1 (the number of samples)", hint="; pass an int such as n_samples=4")
        if name == "plate" and (not isinstance(value, str) or not value):
            raise OptionError(f"plate must be a non-empty string, got {value!r}")
        return value

    # -- the node call -----------------------------------------------------------------------

    def forward(self, distribution: Distribution, inputs: Any = None) -> PlateTensor:
        """Sample the node for ``distribution`` (built from one-sample code) in the current graph.

        Args:
            distribution: the node's distribution, written for one sample.
            inputs: extra inputs the estimator's components may read as ``node.inputs`` (for
                example the observation an input-dependent baseline conditions on: NVIL's x). A
                PlateTensor's plates must be among the distribution's plates.
        """
        return _draw_node(self, current_graph(), distribution, inputs)

    def _storch_forward(self, graph, distribution: Distribution, inputs: Any, plain: bool = False) -> PlateTensor:
        """:meth:`forward` in ``graph``, the current graph (``Estimator.__call__`` has it at hand). Called through
        the module-level ``_draw_node``, so a subclass's own method of this name is never called in its place
        (review r-twentyone: a subclass helper named ``_forward`` was). ``plain``: called by ``Estimator.__call__``'s
        lean path (no hooks, generator, overriding forward, compiled module or jit trace), where a plain node may
        take :func:`_plain_node`."""
        if _jit_tracing() or _compiler._is_exporting_flag:
            refuse_foreign_trace(f"estimator {self.name!r} (plate {self.plate!r})")
        if self.has_update and not self.replays_update:  # (False on the common path: one attribute read)
            if type(self).update_parameters is _BASE_UPDATE:
                raise StorchError(_no_update_message(self))
            if is_tracing():  # before its components run
                raise StorchError(updating_message(self))
        node = graph.partition_of(self)
        if isinstance(distribution, Distribution):
            if node is None:
                # the common case (a distribution built from plate tensors that share their plates):
                # its raw copy, and its plates checked against the graph (what Graph.check_call
                # does), in one pass over the distribution's attributes
                same = _as_raw(distribution, ())
                if same is not None:
                    raw, parents = same
                    if not graph.owns(parents):
                        graph.check_call(self, distribution)  # raises the error that says what is wrong
                    if plain:
                        return _first_node(self, graph, raw, parents, distribution, inputs)
                    return self._sample_node(graph, raw, parents, distribution, inputs)
            else:
                # a partition step whose parameters are plate tensors on exactly the partition's
                # plates (computed from its last step: a policy's episode): the raw copy is what
                # unwrap_distribution(within=node.plates) builds, and Graph.owns is the check of
                # check_call that passes (a plate of this graph; plates, so not a stray new step)
                # (the plates of the last step's value, as the step log holds them: tensors computed
                # from it carry that very tuple, so _as_raw compares them by identity)
                log = node.step_log
                same = _as_raw(distribution, log[-1][0] if log else node.plates)
                if same is not None and graph.owns(same[1]):
                    if plain and inputs is None:
                        # a plain step (:func:`_plain_step`): decided per (estimator, distribution type) with the
                        # node's plain decision, with the per-call conditions of _first_node and a partition
                        # already started (its log and path set by its step 1 on the general path)
                        known = self.__dict__.get("_storch_plain")
                        if (known is not None and known.get(type(same[0])) and log is not None
                                and node.step_inputs is None and same[1][1:] == node.parents
                                and _STEP_PATH.get(type(self)) is _BY_EXTEND and self.supports_partitions
                                and not MARKS and _grad_enabled() and not is_tracing()):
                            return _plain_step(self, node, distribution, same[0], same[1])
                    return self._extend_partition(graph, node, distribution, same, inputs)
        own = graph.check_call(self, distribution)
        if node is not None and not graph.nodes:  # check_call ended an evaluation step (Graph._ends_evaluation)
            node = None
        if node is not None:
            return self._extend_partition(graph, node, distribution, None, inputs, own)
        raw, parents = unwrap_distribution(distribution)
        if plain:
            return _first_node(self, graph, raw, parents, distribution, inputs)
        return self._sample_node(graph, raw, parents, distribution, inputs)

    def _check_enumeration(self, raw: Distribution) -> None:
        """:func:`~storch.distributions.check_enumeration`, naming this estimator (a user's class only)."""
        try:
            check_enumeration(raw)
        except UnsupportedDistributionError as e:
            raise UnsupportedDistributionError(
                f"estimator {self.name or type(self).__qualname__!r} (plate {self.plate!r}): {e}") from e

    def _sample_node(self, graph, raw: Distribution, parents: tuple[Plate, ...], distribution: Distribution,
                     inputs: Any) -> PlateTensor:
        """The first call of this estimator in ``graph``: a new node for the raw distribution ``raw``. (A check
        added here must be added to :func:`_is_plain`'s conditions, or to :func:`_plain_node`, which leaves out
        the branches that are no-ops for a plain node.)"""
        self.check_distribution(raw)
        if self.requires_enumerate_support:  # probabilities of exactly 0 (probs=) are impossible values
            self._check_enumeration(raw)
            raw = strict_support(raw, is_tracing())
        own = raw.batch_shape + raw.event_shape  # (torch.Size: parents, own batch, event)
        ndims = 1 + len(own)  # the sample: plate, batch, event
        if ndims > MAX_DIMS:
            raise PlateError(f"estimator {self.name!r} (plate {self.plate!r}): " + too_many_dims_message(ndims))
        if inputs is not None:
            self.check_inputs(inputs, parents, 0)
        node = Node(self, raw, parents, original=distribution, inputs=inputs)
        if MARKS:  # (an integer value read from a pathwise sample is live: its parameters may carry it)
            _note_integer_parameter(node, distribution, 0)
        drawn = self._nodes_drawn
        if drawn is not None:  # (storch.estimator's record of a stateful estimator: storch.registry._note_created)
            drawn[0] += 1
        if not torch.is_grad_enabled():
            _sampled_without_grad(node, distribution, 0)
        if _lowers_order(type(self)):  # storch.surrogate_loss(order) checks it (OrderError)
            node.max_order = self.max_order_for(raw)
        _check_sample_entries(self, raw, parents)
        # a distribution whose rsample storch looks into (a user's class or transform): its parameters before the
        # draw (what the rsample keeps in it, a caching transform's last value, is no parameter); torch's smooth
        # classes: one dict lookup
        params = rsample_params(raw) if self.requires_rsample else None
        sample = _watched_draw(node, raw, params, self.proposal, node)
        if type(sample) is PlateTensor:
            raise UnsupportedDistributionError(_plate_tensor_draw_message(self, distribution, "proposal"))
        # one tuple comparison (a wrong shape would silently move the plate); dims after them may hold a
        # representation of the value (a relaxation's one-hot vector for a Categorical)
        if sample.shape[1:len(own) + 1] != own:
            raise StorchError(_sample_shape_message(self, "proposal", sample.shape, own))
        if params is not None and not node.rsample_noted:  # a kink or jump inside the distribution's rsample
            note_rsample(node, sample, raw, params)  # lowers the node's order (unless the proposal noted its rsample)
        if precision_checked(raw) is not None:  # (one dict lookup for other classes)
            self._check_draw_precision(raw, sample)
        plate, plates = _add_scored_node(self, graph, node, raw, parents, sample, own)
        if not self.uniform_weights:  # uniform ones (1/N) are built only if read (Node.weight_values)
            node.weight_values = _widened(_checked_lead(self, "weighting_function", self.weighting_function(node),
                                                        plates, 0, raw, sample))
        if type(self).evaluation_from is not Estimator.evaluation_from:
            plate.lineage.evaluation_from = self.evaluation_from(node)  # (read by a user's register_hook)
        if (self.score_function is None and not _is_score_function(type(self))
                and (type(raw) not in KINK_FREE or not support_is_fixed(type(raw)))):
            _detect_log_p_gradient(self, node, raw)
        if self.eos is not None:
            node.finished = self.is_eos(raw, sample, len(parents))
        out = self.output(node)
        lead = len(plates)  # the value's plate dims; the dims after them may hold a representation (a one-hot vector)
        if out.shape[:lead] != sample.shape[:lead]:  # (a shape that broadcasts would move the plate dims of the value)
            raise StorchError(_output_shape_message(self, out, sample, lead))
        if not out.is_inference():  # (torch.inference_mode(): no version counter, no backward either)
            node.handed.append((out, out._version))
        if out.requires_grad and (self.jump_free or isinstance(base_distribution(raw), _CATEGORIES)):
            # a relaxed / straight-through one-hot value of a category: torch's (OneHot)Categorical.log_prob of it
            # reads an argmax (or .long() casts) of it, a jump the gradient misses (and a wrong value for
            # Categorical): refused by storch.surrogate_loss whichever estimator hands it out
            plate.lineage.watch = _threshold_watch(node, self.jump_free)
            if is_pathwise(self):  # (gumbel_softmax of a category): its comparisons in user code too
                plate.lineage.watch = _both(plate.lineage.watch, _compare_watch(node))
        elif out.requires_grad and is_pathwise(self):
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

    def _extend_partition(self, graph, node: Node, distribution: Distribution,
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

        ``unwrapped``: ``(raw, plates)`` already built by :meth:`forward` (``plates`` are the
        partition's plates at its last step, checked against the graph), or ``None``. ``inputs``:
        the step's ``inputs=`` (checked by :meth:`check_inputs`, as at the first step), kept in
        ``node.step_inputs``; ``node.inputs`` becomes them. ``own``: the plates of the plate tensors
        ``distribution`` holds (``Graph.check_call``), or ``None`` where ``unwrapped`` says they are the
        partition's plates at its last step: a step that carries none of the partition's plates (depends on
        no earlier step) and lacks some of its parent plates gets an :class:`IndependentStepWarning`.

        (A per-step check added here must be added to :func:`_plain_step` too, or to the conditions under which
        :meth:`forward` takes it: it leaves out the checks that are no-ops for a plain node's later steps.)
        """
        if not self.supports_partitions:
            raise PlateError(
                f"estimator {self.name!r} (plate {self.plate!r}) was already used in this graph. Calling one "
                "estimator several times makes its calls one partition (a sequence with one plate), which "
                f"{self.name!r} does not support. Create one estimator per stochastic node, or start each "
                "step with a new graph (storch.backward() / storch.reset())"
                + (f". {self.partition_hint}" if self.partition_hint else "")
            )
        how = _STEP_PATH.get(type(self))  # (one dict lookup per step: the class's path, computed at its first step 1)
        if how is None:
            how = _partition_path(type(self))
        if how.__class__ is str:  # components its partition hooks were not written for: refused where it matters
            raise StorchError(
                f"estimator {self.name or type(self).__qualname__!r} (plate {self.plate!r}) is called again in this "
                f"graph (step {node.step + 1} of its partition), but {how}")
        if unwrapped is None:
            raw, plates = unwrap_distribution(distribution, within=node.plates)
        else:
            raw, plates = unwrapped
        self.check_distribution(raw)
        if self.requires_enumerate_support:
            if type(raw) is not type(node.distribution):  # (read once per node and class)
                self._check_enumeration(raw)
            raw = strict_support(raw, is_tracing())
        if _lowers_order(type(self)):  # the partition's order: the lowest of its steps'
            node.max_order = min(node.max_order, self.max_order_for(raw))
        parents = plates[1:]
        t = node.step + 1
        if MARKS and node.integer_parameter is None:
            _note_integer_parameter(node, distribution, t)
        if self.eos is not None:
            _check_eos_step(self, node, raw, t)
        if not torch.is_grad_enabled():
            _sampled_without_grad(node, distribution, t)
        if inputs is not None:
            self.check_inputs(inputs, plates, t)
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
                    q, e = self.plate, p.name
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
            _warn_independent_step(self, node, own, t)
        log = node.step_log
        if log is None:
            log = node.step_log = [(node.plates, node.gradient_values)]
            node._history = [log[0]]
            # step 0's draw, for node.at(0): the node itself goes on to hold the last step's sample
            node.step_draws = [(node.sample, node.distribution, node.original, node.value, node.finished)]
        params = rsample_params(raw) if self.requires_rsample else None
        if params is not None:
            node.rsample_noted = False  # (set again where the step's draw notes its own rsample)
        if how is _BY_COMPONENTS:  # (never for a first-party estimator)
            sample, lp, out = self._components_step(node, raw, plates, t)
        else:
            made = _watched_draw(node, raw, params, self.extend, node, raw, plates)
            sample, lp, out = _extended(self, made, plates, t, how)
        _check_step_sample(self, sample, raw, distribution, t)
        if precision_checked(raw) is not None:  # (as at the first step)
            self._check_draw_precision(raw, sample)
        if params is not None and not node.rsample_noted:  # (as at the first step: each step's rsample, its
            note_rsample(node, sample, raw, params)  # parameters taken before it)
        prev = node.plate
        plate = Plate(prev.name, sample.shape[0], False, t, prev.lineage)
        new = (plate,) + parents
        lp = _checked_lead(self, "extend (its gradient function l_t)", lp, new, t, raw, sample)
        if node.steps_in_place and (prev.lineage.parents or plate.size != prev.size or parents != node.parents
                                    or lp.shape != log[0][1].shape):
            node.steps_in_place = False  # L_t re-indexed step by step (Node.history)
        # L_t = L_{t-1} + l_t is computed when read (Node.history, gradient_values); the stacked
        # surrogate of the partition's costs takes one cumulative sum over the logged l_t instead
        # (the log's last plates are the plates of the value returned below: Estimator.forward
        # matches the next step's distribution against them)
        log.append((new, lp))
        w = node._weight_values
        if w is not None and self.causal_credit and parents != node.parents:
            # weights kept from step 0 (not uniform, e.g. score's greedy entry): the plates grew (a data
            # plate joined), so give them this step's plate dims, as the gradient function has
            node._weight_values = align(_lead(w, len(node.plates)), node.plates, new)
        node.plate, node.parents, node.step = plate, parents, t
        node.sample = sample
        if not self.causal_credit:
            node.weight_values = None  # per whole sequence: computed at the last step, by the surrogate
        if not out.is_inference():
            node.handed.append((out, out._version))
        if out.requires_grad and is_pathwise(self) and prev.lineage.watch is None:
            prev.lineage.watch = _compare_watch(node)  # (the first step's sample had no gradient: see _sample_node)
        value = PlateTensor._wrap(out, new)
        # the step's own draw for node.at(t) (references, no copies): what a control variate of a cost
        # at step t reads (node.sample, node.distribution of step t)
        node.step_draws.append((sample, raw, distribution, value, node.finished))
        if isinstance(raw, _MAY_CACHE):  # (as above)
            _keep_preimages(node, rekey_transform_cache(raw, out, value, lambda r: PlateTensor._wrap(r, new),
                                                        distribution))
        return value

    def _components_step(self, node: Node, raw: Distribution, plates: tuple[Plate, ...],
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
        name = self.name or type(self).__qualname__
        if not self.uniform_weights:
            raise StorchError(
                f"estimator {name!r} (plate {self.plate!r}) overrides weighting_function and is called again in "
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
        grid = self.proposal(view)
        full = raw._batch_shape + raw._event_shape  # (the prefix plate, the parents, the own batch, the event)
        if grid.shape[1:len(full) + 1] != full:
            raise StorchError(_sample_shape_message(self, "proposal", grid.shape, full, t))
        m, n = grid.shape[0], plates[0].size
        if m != n:
            raise StorchError(
                f"estimator {name!r} (plate {self.plate!r}): at step {t} of its partition, proposal drew {m} entries "
                f"per prefix but the partition has {n}: storch continues prefix i with entry i of its draws "
                "(sampling with replacement), which needs as many entries as at the step before. Override "
                "extend(node, distribution, plates) to draw step t yourself (docs/partitions.md, 'For estimator "
                "authors')")
        view.plate, view.sample = Plate(self.plate, m, False, t, Lineage()), grid
        l = _widened(_checked_lead(self, "gradient_function", self.gradient_function(view), view.plates, t, raw, grid))
        view.gradient_values = l
        out = self.output(view)
        if out.shape[:2] != grid.shape[:2]:  # (the step's plate and the prefix plate: the diagonal's two dims)
            raise StorchError(_output_shape_message(self, out, grid, 2, f"output (at step {t} of its partition)"))
        i = torch.arange(n, device=grid.device)
        sample, out = grid[i, i], out[i, i]  # entry i of prefix i's draws
        lp = l.expand((m, n) + l.shape[2:])[i, i]
        if self.eos is not None:
            if type(self).output is not Estimator.output:
                raise StorchError(
                    f"estimator {name!r} (plate {self.plate!r}) overrides output and has eos={self.eos}: a finished "
                    "sequence draws eos again, which its output would have to show. Override extend(node, "
                    "distribution, plates) and return the masked step (docs/partitions.md, 'For estimator authors')")
            sample, lp = self.mask_after_eos(node, raw, sample, lp, plates)
            out = sample
        return sample, lp, out

    def check_inputs(self, inputs: Any, plates: tuple[Plate, ...], step: int) -> None:
        """Check the ``inputs=`` of a call (every call: the first step of a node and every later step
        of a partition) before the node is sampled; raise a storch error that says what is wrong.

        Args:
            inputs: what the call got as ``inputs=`` (not ``None``).
            plates: the plates the step's distribution has (for a later step: the partition's plate
                at the step before, then the step's parent plates).
            step: the step of the call (0 for the first call).

        The default: a PlateTensor's plates must be among ``plates`` (a node's inputs may depend only
        on what its distribution depends on). An estimator that reads ``node.inputs`` may check more
        (their type; whether they may depend on the sequence's own samples).
        """
        if type(inputs) is PlateTensor:
            own = inputs._plates
            if own is plates or own == plates:  # (the common case, an input on the distribution's plates: no sets)
                return
            names = {p.name for p in plates}
            extra = [p.name for p in inputs.plates if p.name not in names]
            if extra:
                where = "" if not step else f" at step {step} of its partition"
                raise PlateError(
                    f"estimator {self.name!r} (plate {self.plate!r}){where}: inputs have plates {extra} that the "
                    f"distribution does not have ({[p.name for p in plates]}); a node's inputs may depend only "
                    "on what its distribution depends on (its data plates and upstream samples)")

    def extend(self, node: Node, distribution: Distribution, plates: tuple[Plate, ...]) -> tuple[torch.Tensor, ...]:
        """Proposal and gradient function of step t = ``node.step + 1`` of a partition.

        Args:
            node: the partition, as of step t-1 (``node.plate`` is its plate at t-1).
            distribution: the raw distribution of step t; its batch dims lead with ``plates``.
            plates: the partition's plate at step t-1, then the step's parent plates.

        Returns:
            ``(sample, l_t)`` or ``(sample, l_t, output)``: one sample per entry of step t, shape
            ``(size_t, *parents, *batch, *event)``, its log-probability (gradient function of the
            step), shape ``(size_t, *parents)``, and optionally the value handed to user code, of the
            sample's shape (what :meth:`output` is at the first step; without it the sample is
            handed out). An estimator that overrides ``output`` must return it: a 2-tuple is then
            refused. Here (sampling with replacement) entry i continues entry i. An estimator that
            selects which prefixes survive records entry i's parent with
            ``node.plate.lineage.set_parents(node.step + 1, index, plates[1:])``.

        An override must make the step with the estimator's components: a component overridden in
        a subclass of the class that wrote ``extend`` (and, for ``gradient_function``, of the one
        that wrote ``step_gradient_function``; for ``proposal``, ``draw``) is refused at step 1.
        """
        sample = self.draw(distribution, ())
        lp = self.step_gradient_function(node, distribution, sample, plates)
        if self.eos is not None:
            sample, lp = self.mask_after_eos(node, distribution, sample, lp, plates)
        return sample, lp

    def draw(self, distribution: Distribution, shape: tuple) -> torch.Tensor:
        """``shape`` samples of ``distribution``: ``rsample`` if the estimator requires it, else ``sample``."""
        if self.requires_rsample:
            return distribution.rsample(shape)
        return raw_sample(distribution, shape)  # (a raw Bernoulli: torch.bernoulli, without torch's Python)

    def step_gradient_function(self, node: Node, distribution: Distribution, sample: torch.Tensor,
                               plates: tuple) -> torch.Tensor:
        """l of one partition step: its log-probability summed over its own batch dims."""
        lp = raw_log_prob(distribution, sample)  # (a raw Bernoulli: torch's kernel, without broadcast_all)
        k = lp.dim() - len(plates)
        return lp if k <= 0 else lp.sum(-1) if k == 1 else lp.sum(tuple(range(-k, 0)))  # (as Node.log_prob)

    # -- variable length: the end-of-sequence value ---------------------------------------------

    def eos_value(self, d: Distribution, n_plates: int) -> torch.Tensor:
        """The end-of-sequence value (``support[self.eos]``) of a partition step's distribution ``d``."""
        if len(d.batch_shape) != n_plates:
            raise OptionError(
                f"{self.name}: eos={self.eos} needs one token per step, but the distribution of plate "
                f"{self.plate!r} has per-sample batch shape {tuple(d.batch_shape[n_plates:])}")
        if not d.has_enumerate_support:
            raise OptionError(f"{self.name}: eos needs a distribution with a finite support (a token), "
                              f"got {type(d).__name__}")
        support = d.enumerate_support(expand=False)
        if not 0 <= self.eos < support.shape[0]:
            raise OptionError(f"{self.name}: eos={self.eos} is not an index into the {support.shape[0]} "
                              "values of the support")
        return support[self.eos].reshape(d.event_shape)

    def is_eos(self, d: Distribution, sample: torch.Tensor, n_plates: int) -> torch.Tensor:
        """Whether each sample is the end-of-sequence value; shape ``(plates...)``."""
        eq = sample == self.eos_value(d, n_plates)
        k = len(d.event_shape)
        return eq.all(-1) if k == 1 else (eq.flatten(-k).all(-1) if k else eq)

    def mask_after_eos(self, node: Node, d: Distribution, sample: torch.Tensor, lp: torch.Tensor,
                       plates: tuple[Plate, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Finished sequences (eos drawn at an earlier step) draw eos again with log-probability 0,
        so they stop contributing to the gradient function and keep their value (sampling with
        replacement: entry i of step t continues entry i of step t-1)."""
        if node.finished is None:  # (eos set on the estimator after the partition's first step: r-27)
            raise OptionError(
                f"estimator {self.name or type(self).__qualname__!r} (plate {self.plate!r}): eos was set after its "
                f"partition began (this is step {node.step + 1}): the earlier steps did not record which entries "
                "drew eos, so the later ones cannot tell finished sequences. Give eos when building the estimator "
                "(storch.estimator(..., eos=...)) or set it before the episode's first step")
        prev_plates = (node.plate,) + node.parents
        done = align(node.finished, prev_plates, plates)
        eos = self.eos_value(d, len(plates))
        mask = done.reshape(done.shape + (1,) * (sample.dim() - done.dim()))
        sample = torch.where(mask, eos.to(sample.dtype).expand_as(sample), sample)
        lp = torch.where(done, torch.zeros_like(lp), lp)
        node.finished = done | self.is_eos(d, sample, len(plates))
        return sample, lp

    @_instance_or_class
    def supports(cls, distribution: Distribution) -> bool:
        """Whether this estimator's capabilities accept ``distribution`` (the one capability check).

        ``distributions`` is matched against the distribution under one ``Independent`` wrapper
        (:func:`storch.extending.base_distribution`; a ``LogNormal`` is not a ``Normal``),
        ``requires_rsample`` and ``requires_enumerate_support`` against ``distribution`` itself; an
        estimator whose gradient function is the score (``score_function``) accepts no distribution whose
        support moves with a parameter that requires grad (:func:`storch.extending.moving_support`).
        The factory (:meth:`check_distribution`), the registry's list of supporting estimators and
        the benchmarks' roster all ask this method. Called on an instance it reads the instance's
        capabilities (an option may change one), on a class the class defaults.

        A class that overrides :meth:`check_distribution` (refusing more than these attributes say) is
        asked too, where they accept ``distribution``: ``supports`` is False where ``check_distribution``
        raises, so the lists of supporting estimators agree with what the factory accepts without a
        ``supports`` override. On a class it asks an instance built with the default options (none is
        built where the constructor needs arguments; torch's random state is restored after it); the
        lists ask only when building an error message, the roster once per model.
        """
        if not _meets_requirements(cls, distribution):
            return False
        if _is_score_function(cls) and moving_support(distribution):
            return False
        return _accepted_by_check(cls, distribution)

    @_instance_or_class
    def requirements(cls) -> list[str]:
        """What :meth:`supports` asks of a distribution, in words (empty: any distribution)."""
        need = []
        if cls.distributions is not None:
            need.append("one of " + ", ".join(t.__name__ for t in cls.distributions))
        if cls.requires_rsample:
            need.append("a distribution with rsample (has_rsample=True) that reparameterises its samples "
                        "(not OneHotCategoricalStraightThrough's straight-through rsample)")
        if cls.requires_enumerate_support:
            need.append("a distribution whose finite support torch can enumerate (has_enumerate_support=True: "
                        "Bernoulli, Categorical, OneHotCategorical, Binomial; torch does not enumerate a Multinomial's "
                        "support, which is finite too)")
        if cls.requires_expand:
            need.append("a distribution that implements expand (torch's default Distribution.expand raises "
                        "NotImplementedError)")
        return need

    def _check_draw_precision(self, raw: Distribution, sample: torch.Tensor) -> None:
        """A draw of a distribution whose precision storch checks (at the first step and each partition step):
        a score function is refused where the draw sits at the float spacing (a Beta's at 1, a Normal's scale
        below eps·|loc|); a pathwise draw of a Beta / Kumaraswamy / Dirichlet gets a PrecisionWarning (exact for
        a bounded cost, biased for log(1 - x))."""
        if _is_score_function(self):
            check_precision(self, raw, sample)
        elif self.requires_rsample:
            warn_precision(self, raw, sample, _user_stacklevel)

    def max_order_for(self, distribution: Distribution) -> float:
        """The highest derivative order for which this estimator is unbiased on a node of ``distribution``.

        ``max_order`` is what the estimator proves in general; a distribution may allow less. The
        default lowers it for estimators with ``requires_rsample`` (their derivatives go through the
        sample) to :func:`storch.extending.rsample_max_order`: 1 for torch's gamma family (Gamma, Beta,
        Dirichlet, StudentT, ...), whose ``rsample`` has no second derivative. Override it (and call
        ``super()``) when your estimator's unbiasedness depends on the distribution in another way.

        Called with the raw distribution (plates leading its batch shape) when a node is made, and at
        every step of a partition (the partition keeps the lowest); ``storch.surrogate_loss(order)``
        raises ``storch.OrderError`` for a node whose order is below ``order``. An estimator that
        neither overrides it nor has ``requires_rsample`` is not asked (``max_order`` holds).
        """
        if self.requires_rsample:
            return min(self.max_order, rsample_max_order(distribution))
        return self.max_order

    def check_distribution(self, d: Distribution) -> None:
        """Raise :class:`UnsupportedDistributionError` if this estimator cannot handle ``d``."""
        fixed = self.__dict__.get("_storch_fixed_support_ok")
        if fixed is not None and type(d) in fixed:
            return  # accepted before: a type whose class fixes its support (no moving support possible)
        plain = (self.distributions is None and not self.requires_rsample and not self.requires_enumerate_support
                 and not self.requires_expand and _base_supports(type(self)))
        score = _is_score_function(self)
        if plain and not score:
            return  # the base class's supports() accepts every distribution
        moved = moving_support(d) if score else ()  # (one dict lookup for a type that fixes its support)
        if not plain and not _supports_unconsulted(self, d) and not (
                moved and _base_supports(type(self)) and _meets_requirements(self, d)):
            raise UnsupportedDistributionError(self._unsupported_message(d))
        if moved:
            raise UnsupportedDistributionError(self._moving_support_message(d, moved))
        if plain and support_is_fixed(type(d)):  # the same answer for every instance of the type
            if fixed is None:
                fixed = self.__dict__["_storch_fixed_support_ok"] = set()
            fixed.add(type(d))

    def _moving_support_message(self, d: Distribution, moved: Any) -> str:
        name = type(d).__name__
        which = ", ".join(moved)
        instead = (f"Use 'reparameterization' for this node ({name} has rsample: the pathwise gradient moves the "
                   "samples with the support)" if d.has_rsample else
                   f"Give {name} an rsample and use 'reparameterization' for this node (the pathwise gradient "
                   "moves the samples with the support)")
        return (f"estimator {self.name or type(self).__qualname__!r} (plate {self.plate!r}) does not support {name} "
                f"with {which} requiring "
                f"grad: the support of {name} depends on {which}, and this estimator's gradient function is the "
                "score log p(x). ∇E_p[f] = E_p[f ∇log p] holds only for a support that does not move with the "
                "parameters; a moving one adds a boundary term (f at the bound times the density there) that no "
                f"sample's log p sees, so the estimate would be biased. {instead}, or detach {which} if the "
                "support is not to be learned")

    def _unsupported_message(self, d: Distribution) -> str:
        others = [n for n in supporting_estimators(d) if n != self.name]
        hint = f" Estimators that support it: {', '.join(others)}." if others else ""
        if (isinstance(d, Independent) and not d.has_enumerate_support and d.base_dist.has_enumerate_support
                and self.supports(d.base_dist)):
            # torch's Independent does not enumerate; storch needs no Independent to treat dims jointly (a hint
            # only where this estimator takes the base: arm refuses an Independent(Categorical) and the Categorical)
            hint = (f" This is an Independent of a {type(d.base_dist).__name__}, which has a finite support: pass "
                    f"the {type(d.base_dist).__name__} itself. storch samples and scores the batch dims of a node's "
                    "distribution jointly (one log-probability per sample, summed over them), so the wrapper is not "
                    "needed." + hint)
        inner = d
        while isinstance(inner, Independent):
            inner = inner.base_dist
        if (isinstance(d, Independent) and isinstance(d.base_dist, Independent) and self.distributions is not None
                and isinstance(inner, self.distributions)):
            hint = (f" This is an Independent of an Independent of a {type(inner).__name__}, which it supports: it looks "
                    f"under one Independent only. Wrap once, Independent({type(inner).__name__}(...), n) with n the "
                    f"reinterpreted dims of both, or pass the {type(inner).__name__} itself (storch scores a node's "
                    "batch dims jointly)." + hint)
        if self.requires_rsample and d.has_rsample and straight_through_rsample(d):
            hint = (" OneHotCategoricalStraightThrough's rsample is the straight-through estimator (a hard sample "
                    "with the derivative of probs), not a reparameterisation, so a pathwise gradient through it is "
                    "biased. For an unbiased gradient use a OneHotCategorical with score, rebar or relax; for the "
                    "straight-through estimator itself, 'gumbel_straight_through'." + hint)
        return (f"estimator {self.name!r} does not support {type(d).__name__}; it needs "
                f"{' and '.join(self.requirements())}.{hint}")

    @property
    def uniform_weights(self) -> bool:
        """Whether w = 1/N on every entry of the plate (the surrogate then reduces it by its mean).

        True when ``weighting_function`` is the base class's; an estimator that overrides it but
        still weighs uniformly for some options may override this property too.
        """
        return type(self).weighting_function is Estimator.weighting_function

    def evaluation_from(self, node: Node) -> Optional[int]:
        """The index of the first entry of the node's plate that is the estimator's own evaluation point
        rather than a sample it hands out for the estimate (REBAR's and RELAX's relaxed inputs σ_λ(z), σ_λ(z̃)
        after the n hard samples, read by the control variate); ``None`` (the default): every entry is a
        sample. Asked once, after ``weighting_function``, at the node's first step. A user's gradient hook
        (``register_hook`` on a plate tensor) changes only the entries before it: the gradient of the others
        passes through unchanged, so that the control variate's pathwise part (through them) stays the
        derivative of its value (read from ``cost.live()``) and the control variate zero-mean."""
        return None

    # -- the four components (paper, section 3.2) --------------------------------------------

    def proposal(self, node: Node) -> torch.Tensor:
        """q(X | x<i): ``n_samples`` i.i.d. samples from p (appendix D.2.1)."""
        # (a raw Bernoulli: torch.bernoulli as torch's sample calls it, without its lazy probs, grad modes and
        # shape helpers; the same random numbers and values; anything else: node.distribution.sample)
        return raw_sample(node.distribution, (self.n_samples,))

    def weighting_function(self, node: Node) -> torch.Tensor:
        """w(x) = 1/N for each of N samples (appendix D.2.1)."""
        return torch.full((node.n,), 1.0 / node.n, dtype=_float_dtype(node), device=node.sample.device)

    def gradient_function(self, node: Node) -> torch.Tensor:
        """l(x) = log p(x | x<i), summed over the node's own batch dims (score function)."""
        return node.log_prob(node.sample)

    def control_variate(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        """a(x<i, X) = (1 - MagicBox(l)) b (Theorem 2 with a baseline b; appendix C)."""
        b = step_baseline(self, node, cost)  # (as before the step's update, where it has one)
        if b is None:
            return None
        if type(b) is not torch.Tensor or (b.shape != cost.tensor.shape and b.dim()):  # (a scalar: no call)
            check_in_frame(self, "baseline", b, cost)
        # b must not carry gradient: appendix D.2.1, condition on the baseline
        return (1.0 - magic_box(cost.align(node.gradient_values))) * b.detach()

    def baseline(self, node: Node, cost: CostFrame) -> Optional[torch.Tensor]:
        """b(x<i, X \\ {x}); ``None`` for no baseline."""
        return None

    def has_control_variate(self) -> bool:
        """Whether ``control_variate`` may return something (it or ``baseline`` is overridden)."""
        cls = type(self)
        return cls.control_variate is not Estimator.control_variate or cls.baseline is not Estimator.baseline

    def control_variate_stacks(self) -> bool:
        """Whether ``control_variate`` gives each cost's result when the costs of several steps of a
        partition are stacked along an extra independent plate of the frame (it reads only
        ``cost.tensor`` and the node's tensors, not ``cost.name`` or the step). Lets the surrogate
        reduce the per-step costs of a long episode in one pass; default: only without one."""
        return not self.has_control_variate()

    def output(self, node: Node) -> torch.Tensor:
        """The raw value handed to user code (the sample; relaxations return a relaxed sample)."""
        return node.sample

    def update_parameters(self, nodes: list[Node], loss: torch.Tensor) -> None:
        """Update the estimator's own state; the only place where it changes.

        Run by ``storch.backward()`` when ``has_update`` is true, once per step, after the
        first-order surrogate ``loss`` has been backpropagated. Its graph is kept alive for this
        call (so ``torch.autograd.grad(loss, ..., create_graph=True)`` works), except when every
        updating estimator of the step says it reads the step's tensors as values only
        (``update_uses_loss_graph = False``, or ``replays_update`` without ``update_uses_loss_graph``
        set): then the backward pass frees it, as
        ``surrogate_loss().backward()`` always does (which is why that pattern refuses estimators
        with ``update_uses_loss_graph``).

        Args:
            nodes: this estimator's nodes in the graph, in topological order. ``node.frames`` maps
                each cost name to the :class:`CostFrame` its control variate received:
                ``frame.tensor`` holds the (detached) cost estimates a baseline regresses on,
                ``frame.live()`` the same with their graph. ``node.inputs`` and ``node.state``
                are as the components left them.
            loss: the first-order surrogate loss of the graph.

        The default, for an estimator with ``replays_update``: ``update_from(update_inputs(nodes))``
        (the update a compiled step replays, so eager and compiled steps share its code).
        """
        if self.replays_update:
            inputs = self.update_inputs(nodes)
            self.update_from(self.loss_graph_values(loss, inputs) if self.update_uses_loss_graph else inputs)

    # -- an update that storch.compile replays (replays_update) ----------------------------------

    def update_inputs(self, nodes: list[Node]) -> Any:
        """What the update needs from this step: detached tensors (a dict, list or tuple of them).

        With ``replays_update``: called where the surrogate loss is built (``node.frames`` filled),
        eagerly by :meth:`update_parameters` and, while ``storch.compile`` records a step, inside the
        trace, so the compiled program returns these tensors from every call. Only torch operations
        on the step's tensors: no ``.item()``, no reads of state that :meth:`state_tensors` does not list.
        """
        raise NotImplementedError(
            f"estimator {self.name!r} sets replays_update but does not implement update_inputs(nodes)")

    def loss_graph_values(self, loss: torch.Tensor, inputs: Any) -> Any:
        """For an update that differentiates the loss again (``replays_update`` with
        ``update_uses_loss_graph``, e.g. a control variate trained on the gradient's variance): what
        :meth:`update_from` needs (detached), computed from ``loss`` and :meth:`update_inputs`' tensors,
        which then keep their graph. Called while the loss's graph exists: eagerly by
        :meth:`update_parameters`, and by ``storch.compile(step, backend=None)`` right after each
        replayed call (whose operations are in autograd's graph; a compiled program is one autograd
        node, so other backends refuse such an estimator). ``update_from`` runs later, on ``.backward()``.
        """
        raise NotImplementedError(
            f"estimator {self.name!r} sets replays_update and update_uses_loss_graph but does not implement "
            "loss_graph_values(loss, inputs)")

    def update_from(self, inputs: Any) -> None:
        """Apply the update from :meth:`update_inputs`' tensors (of the eager step, or of a compiled
        step's replay); run once per step, when its loss is backpropagated (``.backward()``, not
        ``torch.autograd.grad``). The only place where the state changes; it may replace the state's
        tensors by new ones (a compiled step reads :meth:`state_tensors` at every call)."""
        raise NotImplementedError(
            f"estimator {self.name!r} sets replays_update but does not implement update_from(inputs)")

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the estimator's state that its components read (e.g. moving averages by cost).

        A step compiled by ``storch.compile`` passes their current values to its program at every call
        (a state tensor is never baked into the trace), and traces again when the keys, shapes, dtypes
        or devices change (e.g. the first average appears). Default: none.
        """
        return {}

    # -- what the state means and how it evolves (checkpoints, torch.distributed) ------------------

    def state_options(self) -> dict[str, Any]:
        """The options that give the estimator's state its meaning, ``{name: value}``: ``score``'s baseline kind
        (its moving averages or learned baseline are that kind's state), RELAX's control variate form, MAPO's
        buffer size. Default: none.

        Under ``torch.distributed`` storch checks before each of the estimator's collectives
        (``storch.distributed.all_reduce_mean`` and friends, with ``owner=self``) that every rank runs the same
        estimator class with the same :meth:`state_options` and :meth:`evolution_options`: ranks that differ raise
        :class:`storch.StorchError` on every rank, naming each rank's options, instead of one rank waiting in a
        collective the others never run, or their states drifting apart silently. Pass them to
        ``storch.extending.state_record(self, **self.state_options())`` in ``get_extra_state()`` too, so that a
        checkpoint saved with other such options is refused. Values must print (``repr``) the same in every
        process: numbers, strings, tuples of them (not an object or a callable: name its kind instead).
        """
        return {}

    def evolution_options(self) -> dict[str, Any]:
        """The options that change how the state evolves in :meth:`update_parameters`, ``{name: value}``: a
        running mean's ``decay``, a learned part's ``lr``, and ``update`` where an option can switch the update
        off. Not part of a checkpoint's record (a resumed run may go on with another decay or lr); checked across
        ranks with :meth:`state_options` (ranks with another decay would hold different averages from the first
        update on). Default: none.

        ``{"update": False}``: this instance never updates its state (built so, ``has_update`` False): where
        another rank's instance updates, that rank waits in the update's collective; storch has this one join
        the check there instead (once, in ``storch.backward()`` or ``surrogate_loss().backward()``), so every
        rank raises. Return ``{"update": False}`` without decay or lr then (they act on no state, so ranks that all
        skip the update agree whatever theirs; a fixed value that says why may go with it). An estimator without
        state returns ``{}`` (it runs no collective).
        """
        return {}

    # -- metadata ------------------------------------------------------------------------------

    def info(self) -> "EstimatorInfo":
        """What this instance can do, with its options: its own ``max_order`` and ``biased``.

        ``storch.available_estimators()`` reports the class defaults; an option may change a
        capability (``unordered_set(baseline=False)`` is unbiased at any order).
        """
        reg = available().get(self.name)
        return EstimatorInfo(self.name, reg.package if reg else "", reg.family if reg else "",
                             self.max_order, self.biased, self.describe())

    @classmethod
    def describe(cls) -> str:
        """The first line of the class docstring: the one-line description the registry lists."""
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def options(cls) -> list[str]:
        """Names of the constructor's own options (besides ``plate``). Those of a base that a constructor taking
        ``**kwargs`` may forward to are not listed: its signature cannot tell a forwarded one from one it sets
        itself (``super().__init__(plate, n_samples=2 * pairs, **kwargs)``) or keeps (review r-28); the registry
        and the errors still offer them (``_offered_options``)."""
        params = inspect.signature(cls.__init__).parameters
        return [p for p in params if p not in ("self", "plate") and params[p].kind not in (
            inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]

    def extra_repr(self) -> str:
        return f"plate={self.plate!r}, n_samples={self.n_samples}"

    # the values last set of this instance's constructor options (``est.temperature = 0.1``, ``est.n_samples =
    # 16``), as a sorted tuple of (name, value) (a value that is not a plain number or string: by identity):
    # ``storch.compile`` keys its traces by it, since a trace fixes the options' values; setting an option to the
    # value it has keeps the key, and switching between two values selects the trace of each
    _options_key: tuple = ()

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _PLAIN_KEEPS:  # (any other attribute may change what _is_plain decided)
            self.__dict__.pop("_storch_plain", None)
            if self.__dict__.get("_constructed") and name[:1] != "_" and name not in _option_names(type(self)):
                _check_new_attribute(self, name)  # a misspelled option (est.temprature = 0.1) is not ignored
        if (self.__dict__.get("_constructed") and name in _option_names(type(self))
                and not (type(value) is torch.nn.Parameter and name in self.__dict__.get("_parameters", ()))):
            # an option set on a constructed estimator: as the constructor takes it, or refused where the
            # estimator read it only at construction (a silently ignored option, a method shadowed by a string);
            # not the parameter of that name replaced by torch (load_state_dict(sd, assign=True): relax's eta)
            why = _fixed_options(type(self)).get(name)
            if why is not None:
                raise OptionError(_fixed_option_message(self, name, value, why))
            value = self.check_option(name, value)
        super().__setattr__(name, value)
        if name in _REPLAY_FLAGS and value:  # an instance that turns on replays_update for its options
            problem = replay_problem(self)
            if problem is not None:
                raise StorchError(f"estimator {type(self).__qualname__} ({self.name or 'no name'}) has {problem}")
        if name in _option_names(type(self)):
            # a number (numpy's too) or string by value; anything else by identity, holding it: a key of a freed
            # object's id could be taken by a new one and select the old trace (found by review)
            key = value if value is None or isinstance(value, (numbers.Number, str)) else _ByIdentity(value)
            options = dict(self._options_key)
            options[name] = key
            object.__setattr__(self, "_options_key", tuple(sorted(options.items())))

    def __prepare_scriptable__(self) -> "Estimator":
        """Refuse ``torch.jit.script`` of a module that holds this estimator (torch calls this hook on every
        submodule before scripting): TorchScript cannot compile storch's Python (it failed on the first
        property it met, naming neither storch nor what to do), and a scripted step would skip storch's checks and
        updates as a traced one would. Script or export the plain modules instead. A holder that names the
        estimator in ``__jit_ignored_attributes__`` is not refused: TorchScript leaves such an attribute alone."""
        if ignored_by_script(self):
            return self
        raise StorchError(scripted_estimator_message(
            f"estimator {self.name or type(self).__qualname__!r} (plate {self.plate!r})"))

    # -- graph identity (issue 11) -------------------------------------------------------------

    @eager_only
    def __call__(self, distribution: Distribution, *args, **kwargs) -> PlateTensor:
        # Graph identity (issue 11): the distribution's plate tensors must belong to the current
        # graph (Estimator.forward checks it, with Graph.check_call), and an exception while sampling
        # discards the step, so it never leaks into the next.
        if _graph_task_id() != -1:  # (one C call: -1 outside a backward pass)
            raise StorchError(_in_backward_message(self))
        graph = _stack()[-1]  # (current_graph() without its call)
        try:
            if graph.generator is None and type(self).forward is _FORWARD:  # the lean path
                if not args and (not kwargs or len(kwargs) == 1 and "inputs" in kwargs) and _no_module_hooks(self):
                    # what nn.Module.__call__ then does (forward), without its two calls and forward's
                    # second look-up of the current graph
                    return _draw_node(self, graph, distribution, kwargs["inputs"] if kwargs else None, True)
                if args or kwargs:
                    _check_call_arguments(self, args, kwargs)
                return super().__call__(distribution, *args, **kwargs)
            if args or kwargs:
                _check_call_arguments(self, args, kwargs)
            graph.check_call(self, distribution)  # before an overriding forward runs
            with drawing_with(graph.generator):  # storch.Graph(generator=g): the node's draws use g
                return super().__call__(distribution, *args, **kwargs)
        except BaseException as e:
            graph.discard(e)  # what graph.guard() does
            bad = _nonfinite_parameters(distribution) if isinstance(e, Exception) and not isinstance(
                e, StorchError) else None
            if bad:  # torch's own error (e.g. "Expected p_in >= 0 && p_in <= 1") does not say why
                raise NonFiniteParameterError(
                    f"estimator {self.name!r} (plate {self.plate!r}) could not sample: the distribution's "
                    f"{', '.join(repr(b) for b in bad)} hold NaN or infinite values (the model's outputs diverged, "
                    "or its inputs hold NaN); keep torch's argument validation on to catch it where the "
                    f"distribution is built. ({type(e).__name__}: {e})") from e
            if isinstance(e, RuntimeError) and "randomness error mode" in str(e):
                # torch's default randomness="error" refuses any random draw under vmap: the cause is the mode
                # (the estimator's draws), not storch reading its samples
                # (torch.autograd.functional's forward mode runs torch's older vmap: the branch below)
                if _under_jacfwd():
                    # jacfwd's columns are one function's derivatives: they share its draw (randomness='different'
                    # fails for samplers that fill a new tensor in place, Normal's rsample: review r-35)
                    raise StorchError(
                        f"estimator {self.name!r} (plate {self.plate!r}) draws random samples inside torch.func.jacfwd "
                        "/ torch.func.hessian (jacfwd's columns are a vmap), whose default randomness='error' refuses "
                        f"any random draw. For first derivatives use {_JACFWD}; torch.func.hessian takes no randomness "
                        "option: for second derivatives use torch.func.jacrev(torch.func.jacrev(f)) or "
                        "torch.autograd.functional.hessian(f, x) "
                        f"(torch said: {str(e)[:200]})") from e
                raise StorchError(
                    f"estimator {self.name!r} (plate {self.plate!r}) draws random samples inside torch.func.vmap, "
                    f"whose default randomness='error' refuses any random draw. Pass {_VMAP_RANDOMNESS}; for first "
                    f"derivatives in forward mode, {_JACFWD}; for second derivatives use "
                    "torch.func.jacrev(torch.func.jacrev(f)) or torch.autograd.functional.hessian(f, x) "
                    f"(torch said: {str(e)[:200]})") from e
            if isinstance(e, RuntimeError) and "different inplace randomness on an unbatched tensor" in str(e):
                # the draw itself: torch's rsample of some distributions (Normal, Laplace, ...) fills a new tensor
                # of the sample's shape in place (normal_, uniform_), which vmap(randomness="different") cannot
                # make different per member; nothing of storch reads a sample here
                raise StorchError(_vmap_draw_message(
                    self, distribution, "different", "torch's sampler for it fills a new tensor with random numbers "
                    "in place, which vmap can only do with one draw for every vmapped member", "randomness='same' (the "
                    "members share the draws: their per-member results are then correlated)", e)) from e
            if isinstance(e, RuntimeError) and "same randomness with a batched tensor input" in str(e):
                # the draw itself: torch's samplers that read their parameters (bernoulli, multinomial, normal with
                # a tensor loc, poisson) have no "same" randomness for parameters that differ per member; torch
                # said only "... Please file an issue with functorch"
                raise StorchError(_vmap_draw_message(
                    self, distribution, "same", "with parameters that differ between the vmapped members: torch's "
                    "sampler for it cannot share one draw between members whose distributions differ",
                    "randomness='different' (each member draws its own samples: unbiased per-member results, e.g. "
                    "torch.func.vmap(torch.func.grad(step), randomness='different'))", e)) from e
            if isinstance(e, RuntimeError) and "support calling random operations inside of vmap" in str(e):
                # torch's older vmap (torch._vmap_internals), which torch.autograd.functional runs f under with
                # vectorize=True and a forward-mode strategy: it refuses every random draw and has no randomness option
                raise StorchError(
                    f"estimator {self.name!r} (plate {self.plate!r}) draws random samples inside "
                    "torch.autograd.functional.jacobian / hessian with vectorize=True and strategy='forward-mode' "
                    "(hessian: outer_jacobian_strategy='forward-mode'), which runs the function under torch's older "
                    "vmap: it refuses any random draw and takes no randomness option (and forward mode needs "
                    "vectorize=True). Use the reverse-mode strategy (the default, vectorized or not), or for "
                    f"forward-mode first derivatives {_JACFWD} (torch said: "
                    f"{str(e)[:200]})") from e
            if isinstance(e, RuntimeError) and str(e).startswith("vmap:") and _under_jacfwd():
                raise StorchError(
                    f"estimator {self.name!r} (plate {self.plate!r}) cannot run inside torch.func.jacfwd or "
                    "torch.func.hessian (which is jacfwd(jacrev(f))): jacfwd computes its columns with "
                    "torch.func.vmap, which refuses the estimator's random draws (and reading the values of its "
                    "samples or probabilities). For second derivatives use torch.func.jacrev(torch.func.jacrev(f)), "
                    "torch.func.jacrev(torch.func.grad(f)) or torch.autograd.functional.hessian(f, x); for a "
                    f"forward-mode product, torch.func.jvp (torch said: {str(e)[:200]})") from e
            if isinstance(e, RuntimeError) and str(e).startswith("vmap:"):
                raise StorchError(
                    f"estimator {self.name!r} (plate {self.plate!r}) cannot run inside torch.func.vmap: it reads "
                    "the values of its samples or probabilities to decide what to compute (.item(), bool(); e.g. "
                    "which values are possible), or builds a learned part on its first call, and vmap allows "
                    "neither. Run the vmapped members in a Python loop, or build the learned part with one step "
                    f"outside vmap first (torch said: {str(e)[:200]})") from e
            raise


# what makes torch.func.jacfwd of a step draw: its columns (one per input direction) share the draw, so it computes
# the Jacobian of one estimate, equal to torch.autograd.functional.jacobian's on the same draws; randomness='different'
# (a draw per column) fails for samplers that fill a new tensor in place (Normal's rsample)
_JACFWD = ("torch.func.jacfwd(f, randomness='same') (its columns then differentiate one draw: the Jacobian of one "
           "estimate, as torch.autograd.functional.jacobian(f, x) computes it)")

_WELL_FORMED: "weakref.WeakSet[type]" = weakref.WeakSet()


# the estimators' creation order (Estimator._created): storch.compile tells an estimator made anew at every call of
# the step it traces (one with state: from scratch at every eager call, but replayed as the traced instance) by it,
# as one created again in the eager run after the trace (its replay check)
_CREATED = itertools.count()


def created_after(mark: int, est: "Estimator") -> bool:
    """Whether ``est`` was created after :func:`creation_mark` returned ``mark``."""
    return getattr(est, "_created", -1) > mark


def creation_mark() -> int:
    """A mark in the estimators' creation order (see :func:`created_after`)."""
    return next(_CREATED)
_OPTION_NAMES: "weakref.WeakKeyDictionary[type, frozenset]" = weakref.WeakKeyDictionary()
_FIXED: "weakref.WeakKeyDictionary[type, dict]" = weakref.WeakKeyDictionary()
_BASE_OPTIONS = frozenset({"plate", "n_samples"})


def _option_names(cls: type) -> frozenset:
    """The attributes whose setting after construction ``Estimator.__setattr__`` checks: the constructor's
    options, the base's own options (``plate``, ``n_samples``: a subclass whose constructor computes
    ``n_samples`` from its own options still has it), and every name in ``cls.fixed_options``."""
    names = _OPTION_NAMES.get(cls)
    if names is None:
        names = _OPTION_NAMES[cls] = frozenset(_offered_options(cls)) | _BASE_OPTIONS | frozenset(cls.fixed_options)
    return names


def _fixed_options(cls: type) -> dict:
    """``cls.fixed_options``, and the options whose name is a method or property without a setter of the class
    (an instance attribute of that name would shadow it: ``score``'s ``baseline`` method)."""
    fixed = _FIXED.get(cls)
    if fixed is None:
        fixed = {}
        for name in _option_names(cls):
            member = inspect.getattr_static(cls, name, None)
            if isinstance(member, (types.FunctionType, staticmethod, classmethod, _instance_or_class)) or (
                    isinstance(member, property) and member.fset is None):
                fixed[name] = (f"`{name}` is also the name of the estimator's method, which the attribute would "
                               "shadow, and the option is read only at construction")
        fixed.update(cls.fixed_options)
        _FIXED[cls] = fixed
    return fixed


def unknown_option_message(cls: type, key: str, who: str) -> str:
    """What ``cls(plate, **{key: ...})`` (``storch.estimator(name, plate, ...)``) says of an option ``cls`` does
    not take: the class's own hint (``unknown_option_hints``) or "Did you mean" the closest option, and its
    options (a constructor's that takes ``**kwargs``: its base's too. One a subclass passes its base itself is
    offered as well: the constructor cannot tell it from one it defaults with ``kwargs.setdefault``, which can be
    given (review r-29); giving the first gets the collision's own OptionError.) ``who``: the estimator as the
    message names it."""
    accepted = _offered_options(cls)
    told = cls.__dict__.get("unknown_option_hints", {}).get(key)  # the class's own words (not a subclass's)
    close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
    hint = told.strip() if told else f"Did you mean {close[0]!r}?" if close else ""
    if hint and not hint.endswith((".", "?", "!")):
        hint += "."  # a hint is one or more sentences: storch adds the punctuation around it
    return f"{who} has no option {key!r}.{' ' + hint if hint else ''} Its options are: {', '.join(accepted) or 'none'}"


# how close (difflib's ratio) a new attribute's name must be to an option's for ``est.<name> = v`` on a constructed
# estimator to be refused as a misspelled option: closer than the registry's 0.6 for an unknown option, since an
# estimator may set attributes of its own after construction (``temprature``, ``n_sample``: 0.95 and 0.94)
_MISSPELLED = 0.8


def _check_new_attribute(est: Estimator, name: str) -> None:
    """Raise :class:`storch.OptionError` for ``est.<name> = ...`` on a constructed estimator where ``name`` is no
    attribute of it yet and is close to one of its options (``est.temprature = 0.1``, which would otherwise be
    silently ignored: the estimator reads ``temperature``). A public name far from every option stays allowed (an
    estimator's own new attribute), and so does every private one."""
    d = est.__dict__
    if name in d or name in d.get("_parameters", ()) or name in d.get("_buffers", ()) or name in d.get(
            "_modules", ()) or hasattr(type(est), name):
        return
    cls = type(est)
    close = difflib.get_close_matches(name, sorted(_option_names(cls)), n=1, cutoff=_MISSPELLED)
    if close and not _set_by_its_own_method(est):
        raise OptionError(
            f"{est.name or cls.__qualname__}: est.{name} = ... sets no option: the estimator has no option or "
            f"attribute {name!r}, and storch reads {close[0]!r}, not {name!r}. Did you mean {close[0]!r}? Its "
            f"options are: {', '.join(sorted(_option_names(cls) - set(_fixed_options(cls))))}. To keep a value "
            f"of your own on the estimator, set it in one of its methods (an estimator's own attributes are "
            f"its business) or name it `_{name}`")


def _set_by_its_own_method(est: Estimator) -> bool:
    """Whether ``est.<name> = ...`` runs in a method of ``est`` itself (``self.samples = ...`` in an author's
    ``update_parameters`` or ``anneal()``; review r-26): an estimator's own attributes are not misspelled options.
    Looked up only for a new name close to an option (frames: Estimator.__setattr__, _check_new_attribute)."""
    frame: Any = sys._getframe(2)  # Estimator.__setattr__ (or a subclass's, which called it)
    while frame is not None and frame.f_code.co_name == "__setattr__":
        frame = frame.f_back
    return frame is not None and frame.f_locals.get("self") is est


def _fixed_option_message(est: Estimator, name: str, value: Any, why: str) -> str:
    try:
        shown = repr(value)
    except Exception:  # (a value whose repr fails)
        shown = f"<{type(value).__name__}>"
    cls = type(est)
    made = (f"storch.estimator({est.name!r}, plate={est.plate!r}, ...," if est.name and installed_classes().get(est.name) is cls
            else f"{cls.__qualname__}(plate={est.plate!r}, ...,")
    if name in _offered_options(cls):  # (a base's, through **kwargs: see unknown_option_message)
        advice = f"Create a new estimator with the option instead: {made} {name}={shown[:80]})"
    else:  # (not a constructor option: n_samples computed from the estimator's own options, an attribute)
        advice = (f"Create a new estimator instead: {made[:-1]}) (its constructor sets `{name}` from its options: "
                  f"{', '.join(cls.options()) or 'none'})")
    return (f"{est.name or cls.__qualname__}: est.{name} = {shown[:80]} after construction is not supported: "
            f"{why}. {advice}")



# which randomness of torch.func.vmap runs an estimator's draw (tests/core/test_vmap_randomness.py): it depends on
# torch's sampler, not on storch. A sampler that takes the distribution's parameters (torch.bernoulli, multinomial,
# torch.normal(loc, scale)) draws per member, and "same" has no draw for parameters that differ per member; Normal's
# rsample fills torch.empty(shape).normal_() in place, which vmap does only once for every member (review of round 12)
_VMAP_RANDOMNESS = (
    "randomness='different' (each vmapped member draws its own samples: unbiased, independent per-member results, e.g. "
    "torch.func.vmap(torch.func.grad(step), randomness='different')) for a draw by a sampler that takes the "
    "distribution's parameters (sample() of Bernoulli, Categorical, Normal: a score-function estimator's draws); "
    "a sampler that fills a new tensor in place (Normal's rsample: a reparameterized draw) runs only with "
    "randomness='same' (the members share the noise: each member's result unbiased, the members' correlated), which "
    "in turn refuses a sampler of the first kind whose parameters differ between the members")


def _vmap_draw_message(est: Estimator, distribution: Any, randomness: str, why: str, use: str, e: Exception) -> str:
    """What an estimator says when torch cannot draw from ``distribution`` inside
    ``torch.func.vmap(randomness=randomness)``: ``why`` (torch's sampler), ``use`` (the other randomness), and the
    two ways around vmap."""
    return (f"estimator {est.name!r} (plate {est.plate!r}) cannot draw from {type(distribution).__name__} inside "
            f"torch.func.vmap(randomness={randomness!r}){':' if randomness == 'different' else ''} {why}. Use {use}, "
            "or give the members a plate instead of vmap (storch.denote_independent(x, dim, 'data'): one independent "
            "draw per data point, vectorised), or run the members in a Python loop "
            f"(torch said: {str(e)[:200]})")


_FORWARDS: "weakref.WeakKeyDictionary[type, Optional[type]]" = weakref.WeakKeyDictionary()


def _forwarded_to(cls: type) -> Optional[type]:
    """The estimator class whose constructor ``cls``'s ``**kwargs`` go to (the next class in ``cls``'s MRO after
    the one that defines its ``__init__``), or ``None`` where that constructor takes no ``**kwargs``."""
    if cls in _FORWARDS:
        return _FORWARDS[cls]
    base = None
    try:
        params = inspect.signature(cls.__init__).parameters.values()
    except (TypeError, ValueError):
        params = ()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        mro = cls.__mro__
        definer = next(i for i, k in enumerate(mro) if "__init__" in k.__dict__)
        base = next((k for k in mro[definer + 1:] if issubclass(k, Estimator)), None)
    _FORWARDS[cls] = base
    return base


def takes_more_options(cls: type) -> bool:
    """Whether ``cls``'s constructor takes ``**kwargs``: options besides those :meth:`Estimator.options` lists
    may be its own (popped before it forwards the rest), so only its construction can refuse a keyword."""
    return _forwarded_to(cls) is not None


def _offered_options(cls: type) -> list[str]:
    """:meth:`Estimator.options`, then those of the base a constructor taking ``**kwargs`` may forward them to: what
    "Did you mean" offers and ``est.<option> = v`` checks. Not all of them need work (a subclass may set one
    itself, or keep its ``**kwargs``): its construction tells (``_marking_construction``, :func:`kept_option`)."""
    names = cls.options()
    base = _forwarded_to(cls)
    return names + [p for p in _offered_options(base) if p not in names] if base is not None else names


def _unknown_keywords(init: Callable, kwargs: dict) -> list:
    """The keywords of ``kwargs`` that ``init`` takes no parameter for (none where it takes ``**kwargs``)."""
    try:
        params = inspect.signature(init).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [k for k in kwargs if k not in params or params[k].kind is inspect.Parameter.POSITIONAL_ONLY]


def _parameter_names(init: Callable) -> tuple[tuple, frozenset, bool]:
    """The parameters of ``init`` an argument fills by position (after ``self``), those a keyword argument can
    name (not its ``**kwargs``), and whether it takes ``**kwargs``."""
    try:
        params = list(inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        return (), frozenset(), False
    kinds = inspect.Parameter
    return (tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))[1:],
            frozenset(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)),
            any(p.kind is kinds.VAR_KEYWORD for p in params))


def _who(cls: type) -> str:
    return f"{cls.__qualname__} (estimator {cls.name!r})" if cls.name else cls.__qualname__


def _collided_option(cls: type, named: frozenset, kwargs: dict, error: TypeError) -> Optional[str]:
    """The option the user gave through ``**kwargs`` that the constructor also passes its base itself: Python's
    "got multiple values for keyword argument" at ``super().__init__(plate, n_samples=2 * pairs, **kwargs)``
    (review r-28: ``Pairs('z', n_samples=3)``), or "... for argument" where it passes it by position
    (``super().__init__(plate, 2 * pairs, **kwargs)``: review r-30, a bare TypeError, also from the kit's probe)."""
    base = _forwarded_to(cls)
    if base is None:
        return None
    offered, said = _offered_options(base), str(error)
    return next((k for k in kwargs if k not in named and k in offered
                 and any(f"multiple values for {by}argument {k!r}" in said for by in ("keyword ", ""))), None)


def kept_option(est: Estimator, options: dict) -> Optional[str]:
    """What refuses the first of ``options`` (given to ``type(est)``'s constructor) that is an option of the base
    its ``**kwargs`` may forward to yet reached no constructor: kept by the subclass (``def __init__(self, plate,
    n_samples=1, **net_kwargs)`` given ``baseline=``), so the estimator would run without it (review r-28).
    ``None`` where there is none; a keyword no base takes is the subclass's own (popped) and left to it. (One the
    subclass pops and handles itself is refused too: it cannot be told from a kept one; naming it as a parameter
    of the constructor makes it one of ``options()``.) Asked when the outermost constructor returns, so direct
    construction (``Keeps("z", baseline=...)``) refuses it as ``storch.estimator`` does."""
    cls = type(est)
    base = _forwarded_to(cls)
    forwarded = est.__dict__.get("_forwarded_options")
    if base is None or forwarded is None:
        return None
    own, offered = cls.options(), _offered_options(base)
    key = next((k for k in options if k not in own and k in offered and k not in forwarded), None)
    if key is None:
        return None
    return (f"{_who(cls)} has no option {key!r}: its constructor takes it in its **kwargs but passes it to no "
            f"estimator's constructor ({base.__qualname__}'s takes {key!r}), so it would be ignored. Its options "
            f"are: {', '.join(own) or 'none'}")


# the hooks that declare an estimator's options to the ranks' check and checkpoints (Estimator.state_options,
# Estimator.evolution_options); first-party estimators declared them as _state_options / _evolution_options before
_DECLARED_OPTIONS = ("state_options", "evolution_options")


def _defined_before(cls: type, private: str, public: str) -> bool:
    """Whether ``cls``'s method resolution order finds ``private`` in a class before (more derived than) the first
    that defines ``public``: the class itself, or a mixin that is no estimator (``class Mine(OptionsMixin, Score)``),
    whose ``__init_subclass__`` is not Estimator's. A class that defines both keeps its public hook."""
    mro = cls.__mro__
    at = {name: next((i for i, c in enumerate(mro) if name in c.__dict__), len(mro)) for name in (private, public)}
    return at[private] < at[public]


def _declared_under_private_name(hook: str) -> Callable[[Any], dict]:
    """The ``hook`` of a class that declares its options under the private name of before (``_state_options``,
    ``_evolution_options``; a third party may have copied it): what that method returns. Set on the class that
    defines the private name, so that it overrides a base class's public hook too (a subclass of ``Score`` that
    overrode ``Score._evolution_options`` was read at Score's, its own options silently left out of the check)."""
    private = "_" + hook

    def declared(self) -> dict:
        return dict(getattr(self, private)())

    declared.__name__ = declared.__qualname__ = hook
    declared.__doc__ = f"What ``{private}()`` declares (the private name of before)."
    return declared


def _marking_construction(init: Callable) -> Callable:
    """``init`` that marks the instance constructed when the outermost ``__init__`` returns (options set later
    go through ``Estimator.__setattr__``'s checks; those the constructors set are theirs to check). Where the
    outermost constructor takes ``**kwargs``, the options that the constructors it forwards them to receive (by name
    or position) from their caller are recorded (not what a base passes its own base): ``_forwarded_options``, the
    user's that reached one (:func:`kept_option` refuses the others)."""
    names: list = []  # [_parameter_names(init)], at the first call that needs them

    def parameter_names() -> tuple[tuple, frozenset, bool]:
        if not names:
            names.append(_parameter_names(init))
        return names[0]

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        depth = self.__dict__.get("_init_depth", 0)
        received = self.__dict__.get("_init_received")
        recording = self.__dict__.get("_init_recording", False)  # (whether the caller forwards its **kwargs here)
        if depth == 0:
            received = set() if _forwarded_to(type(self)) is not None else None
            object.__setattr__(self, "_init_received", received)
        elif received is not None and recording:
            positional, named, _ = parameter_names()
            received.update(positional[:len(args)])
            received.update(k for k in kwargs if k in named)
        if received is not None:
            object.__setattr__(self, "_init_recording", parameter_names()[2])
        object.__setattr__(self, "_init_depth", depth + 1)
        try:
            init(self, *args, **kwargs)
        except TypeError as e:
            unknown = _unknown_keywords(init, kwargs) if kwargs else ()
            if unknown and depth > 0:
                # a base's constructor that a subclass's **kwargs forwarded a keyword to: marked, so that the
                # outermost constructor can tell this TypeError from any other one raised in its body
                e._storch_unknown_keyword = unknown[0]  # type: ignore[attr-defined]
            elif depth == 0 and not unknown and kwargs:
                key = getattr(e, "_storch_unknown_keyword", None)
                named = parameter_names()[1]
                if key in kwargs and key not in named:  # (the user's keyword, through **kwargs)
                    unknown = [key]
                elif (key := _collided_option(type(self), named, kwargs, e)) is not None:
                    cls, base = type(self), _forwarded_to(type(self))
                    raise OptionError(
                        f"{_who(cls)} has no option {key!r} to give: its constructor sets {key!r} itself when it "
                        f"calls {getattr(base, '__qualname__', 'its base')}'s (from its options: "
                        f"{', '.join(cls.options()) or 'none'}). Leave {key!r} out, or set it through those options"
                    ) from None
            if unknown and depth == 0:  # Score("z", n_samplez=3): the registry's words, not Python's bare TypeError
                raise OptionError(unknown_option_message(type(self), unknown[0], _who(type(self)))) from None
            raise
        finally:
            object.__setattr__(self, "_init_depth", depth)
            if depth == 0:
                del self.__dict__["_init_received"]
                self.__dict__.pop("_init_recording", None)
            elif received is not None:
                object.__setattr__(self, "_init_recording", recording)
        if depth == 0:
            if received is not None:
                object.__setattr__(self, "_forwarded_options", frozenset(received & kwargs.keys()))
                kept = kept_option(self, kwargs)  # (a base's option the user gave that reached no constructor)
                if kept is not None:
                    raise OptionError(kept)
            object.__setattr__(self, "_constructed", True)

    __init__._marks_construction = True  # type: ignore[attr-defined]
    return __init__


Estimator.__init__ = _marking_construction(Estimator.__init__)  # type: ignore[method-assign]


class _ByIdentity:
    """An option value in ``Estimator._options_key`` compared by identity (a callable schedule, a tensor), held."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return type(other) is _ByIdentity and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


_BASE_UPDATE = Estimator.update_parameters


_REPLAY_FLAGS = ("replays_update", "update_uses_loss_graph")


def replay_problem(est: Any) -> Optional[str]:
    """What an estimator class or instance that sets ``replays_update`` lacks, or ``None``: ``update_inputs`` and
    ``update_from`` (and ``loss_graph_values`` with ``update_uses_loss_graph = True``), which the default
    ``update_parameters`` and ``storch.compile``'s replay call. Without this check the base class's
    ``NotImplementedError`` came at the first update, after the step's backward pass."""
    if est.replays_update is not True:  # (a class may also hold a property an instance computes)
        return None
    cls = est if isinstance(est, type) else type(est)
    missing = [sig for attr, sig in (("update_inputs", "update_inputs(nodes)"), ("update_from", "update_from(inputs)"))
               if getattr(cls, attr) is getattr(Estimator, attr)]
    if est.update_uses_loss_graph is True and cls.loss_graph_values is Estimator.loss_graph_values:
        missing.append("loss_graph_values(loss, inputs) (it sets update_uses_loss_graph = True)")
    if not missing:
        return None
    return (f"replays_update = True but does not implement {' and '.join(missing)}: storch.backward() (whose "
            "default update_parameters is update_from(update_inputs(nodes))) and storch.compile's replay call "
            f"them. Implement {'them' if len(missing) > 1 else 'it'} (docs/writing-an-estimator.md, 'An update that "
            "storch.compile replays'), or leave replays_update False (an update that storch.compile cannot replay: "
            "override update_parameters instead)")


def capability_problem(cls: type) -> Optional[str]:
    """What is wrong with the capability attributes ``distributions``, ``State`` and ``replays_update`` of an
    estimator class, or ``None``: checked at registration and when the class is first instantiated, so that a
    malformed attribute is a named error there, not a ``TypeError`` (or ``NotImplementedError``) deep in a
    later call."""
    replay = replay_problem(cls)
    if replay is not None:
        return replay
    d = cls.distributions
    if d is not None and not (isinstance(d, tuple) and all(isinstance(t, type) for t in d)):
        example = d.__name__ if isinstance(d, type) else "Bernoulli"
        return (f"distributions={d!r}; use None (any) or a tuple of distribution classes, "
                f"e.g. distributions = ({example},)")
    state = cls.State
    if state is None:
        return None
    if not (isinstance(state, type) and dataclasses.is_dataclass(state)):
        return f"State={state!r}; use None or a dataclass whose fields all have defaults"
    missing = [f.name for f in dataclasses.fields(state) if f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        # node.state = State() is created for every node before proposal, with no arguments
        return (f"State={state.__qualname__} whose field(s) {', '.join(missing)} have no default; every field of "
                "State needs one (node.state = State() is made for each node before proposal fills it), "
                "e.g. `kappa: Optional[torch.Tensor] = None`")
    return None


# The partition hooks: what a later step of a partition calls (Estimator.extend draws with draw and scores with
# step_gradient_function), each with the components it stands in for at a later step. The base class's hooks are
# written for its own components (a draw from p, l = log p, the sample handed out); an estimator that overrides
# components and no hook has its later steps made from its components (Estimator._components_step)
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


# the distributions whose transforms may hold a cache of the sample (rekey_transform_cache)
_MAY_CACHE = (TransformedDistribution, Independent)


def _keep_preimages(node: Node, preimages: list) -> None:
    """Record the cached pre-images of a handed-out sample that require grad (the pre-tanh sample u of
    a = tanh(u)): ``log_prob(a)`` is computed from them, so a cost made of it (SAC's entropy term) reaches
    u, not a; the surrogate's check that a pathwise node's cost reaches its sample accepts them too."""
    grad = tuple(x for x in preimages if x.requires_grad)
    if grad:
        node.preimages = node.preimages + grad


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
    branch of :meth:`Estimator._sample_node` that :func:`_plain_node` leaves out is a no-op for any instance of the
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
    :meth:`Estimator._sample_node`, after which the type is decided (check_distribution has then cached what it
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
    value = est._sample_node(graph, raw, parents, distribution, inputs)
    if ok is None:
        if known is None:
            known = est.__dict__["_storch_plain"] = {}
        known[kind] = _is_plain(est, raw)
    return value


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
    """:meth:`Estimator._extend_partition` of a plain step (issue 19: a policy's episode, one call per step): step t
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


def _add_scored_node(est: Estimator, graph, node: Node, raw: Distribution, parents: tuple[Plate, ...],
                     sample: torch.Tensor, own: tuple) -> tuple[Plate, tuple[Plate, ...]]:
    """A node's first step once its sample is drawn and checked (:meth:`Estimator._sample_node` and
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
    """:meth:`Estimator._sample_node` of a plain node (:func:`_is_plain`; issue 19): the same node, value and
    errors, without the checks that are decided per (estimator, distribution type) and come out as no-ops (~20
    statements and calls a node: the step's Python runs cold, so the code it runs matters, not only each call)."""
    own = raw._batch_shape + raw._event_shape  # (a torch class, _is_plain: what its two shape properties return)
    if len(own) + 1 > MAX_DIMS:
        raise PlateError(f"estimator {est.name!r} (plate {est.plate!r}): " + too_many_dims_message(len(own) + 1))
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
        "(docs/partitions.md)"), stacklevel=_user_stacklevel())


_user_stacklevel = user_stacklevel  # (storch._stacklevel: the first frame outside storch and torch)


_graph_task_id = torch._C._current_graph_task_id


def _in_backward_message(est: "Estimator") -> str:
    return (
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) was called during a backward pass. "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) runs the checkpointed function again during "
        "backward to recompute what it saved, and an estimator called there would sample anew: a new node or "
        "partition step whose samples are not the ones the costs were computed from. Checkpoint the networks, not "
        "the sampling: checkpoint the module that computes the distribution's parameters "
        "(`logits = checkpoint(enc, x, use_reentrant=False)`) and call the estimator outside the checkpointed "
        "function (the same holds for an estimator called from a tensor hook or a custom Function's backward)")


_FORWARD = Estimator.forward
_draw_node = Estimator._storch_forward  # (not self._storch_forward: a subclass may define that name)
_module = sys.modules[torch.nn.Module.__module__]  # torch.nn.modules.module: the global module hooks it keeps
_get_tracing_state = torch._C._get_tracing_state
_grad_enabled = torch.is_grad_enabled


# per estimator class: (whether its forward takes a positional argument after the distribution, the keywords it
# takes, or None for any): read by _check_call_arguments, on the calls that pass more than inputs=
_CALL_SIGNATURES: "weakref.WeakKeyDictionary[type, tuple[bool, Optional[frozenset]]]" = weakref.WeakKeyDictionary()


def _call_signature(cls: type) -> tuple[bool, Optional[frozenset]]:
    """What ``cls``'s ``forward`` takes after the distribution: positional arguments (a first parameter not named
    ``inputs``, or ``*args``: a user's forward that reads them itself), and its keywords (``None``: ``**kwargs``)."""
    known = _CALL_SIGNATURES.get(cls)
    if known is None:
        after_self = list(inspect.signature(cls.forward).parameters.values())[1:]
        # (after the distribution; a forward(self, *args, **kwargs) wrapper takes the distribution in *args)
        params = after_self if after_self and after_self[0].kind is inspect.Parameter.VAR_POSITIONAL else after_self[1:]
        positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params) or bool(params) and (
            params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
            and params[0].name != "inputs")
        keywords = None if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params) else frozenset(
            p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY))
        known = _CALL_SIGNATURES[cls] = (positional, keywords)
    return known


def _check_call_arguments(est: Estimator, args: tuple, kwargs: dict) -> None:
    """Refuse a positional argument after the distribution (``est(d, x)``: taken for ``inputs``, which only an
    input-dependent baseline or network reads, so an observed value meant as Pyro's ``obs=`` would be silently
    ignored and the node sampled) and a keyword the estimator's ``forward`` does not take (``obs=``)."""
    if "forward" in est.__dict__:  # a forward set on the instance reads its own arguments (review r-25)
        return
    positional, keywords = _call_signature(type(est))
    unknown = [] if keywords is None else [k for k in kwargs if k not in keywords]
    if (not args or positional) and not unknown:
        return
    what = (f"{len(args)} positional argument{'s' if len(args) > 1 else ''} after the distribution" if args and not
            positional else "keyword" + ("s " if len(unknown) > 1 else " ") + ", ".join(f"{k}=" for k in unknown))
    takes = ", ".join(f"{k}=" for k in sorted(keywords)) if keywords is not None else ""
    inputs = ("Extra inputs that the estimator's components read as node.inputs (a learned or callable baseline's "
              "features, NVIL's x; relax's network) go as a keyword: est(d, inputs=x). " if keywords is None or
              "inputs" in keywords else "")
    raise OptionError(
        f"estimator {est.name or type(est).__qualname__!r} (plate {est.plate!r}) was called with {what}; it takes "
        f"the distribution{' and the keyword ' + takes if takes else ''} only. {inputs}An OBSERVED value (Pyro's "
        "pyro.sample(..., obs=x)) is not an estimator call: nothing is sampled for it, its log-likelihood is a "
        "cost: storch.add_cost(-d.log_prob(x_obs), name='likelihood') (docs/coming-from-pyro.md)")


def _no_module_hooks(est: Estimator) -> bool:
    """Whether ``nn.Module.__call__`` would call the class's ``forward`` directly (its own fast path): no
    ``forward`` set on the instance, the estimator is not compiled (``est.compile()``; torch >= 2.2), torch.jit is not tracing,
    and neither the estimator nor any module globally has forward or backward hooks (``register_forward_hook``,
    ``register_module_forward_hook``, ...). Otherwise the call goes through ``nn.Module.__call__``, which runs
    them."""
    return not ("forward" in est.__dict__ or getattr(est, "_compiled_call_impl", None) is not None or est._forward_hooks
                or est._forward_pre_hooks or est._backward_hooks or est._backward_pre_hooks
                or _module._global_forward_hooks
                or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks or _get_tracing_state())


_SUPPORTS = Estimator.__dict__["supports"]
_BASE_SUPPORTS: dict[type, bool] = {}
_LOWERS_ORDER: dict[type, bool] = {}


_SCORE_FUNCTION: dict[type, bool] = {}


def _is_score_function(est) -> bool:
    """``score_function`` of an estimator (instance or class); where it is ``None``, whether its gradient
    function is the base class's log p (cached per class)."""
    v = est.score_function
    if v is None:
        cls = est if isinstance(est, type) else type(est)
        v = _SCORE_FUNCTION.get(cls)
        if v is None:
            v = _SCORE_FUNCTION[cls] = cls.gradient_function is Estimator.gradient_function
    return v


# (estimator class, distribution type) -> whether the class's overridden gradient function returns log p(x)
# for that type: decided at the first node of a type whose log p may have a kink or whose support may move,
# for a class that leaves score_function None (the default guesses from the method, not from its values)
_LOG_P_GRADIENT: dict[tuple[type, type], bool] = {}


def _detect_log_p_gradient(est: Estimator, node: Node, raw: Distribution) -> None:
    """An overridden gradient function that returns ``node.log_prob(sample)`` (a masking / eos variant
    written out: equal where it is nonzero) is a score function although ``score_function`` was not
    set: the refusals of a score function apply to it (a moving support: refused here; a kink of log p
    at order >= 2: :func:`_is_score_node` tells the surrogate). One ``log_prob`` and one comparison per
    (class, distribution type), eager only, once the parameters require grad; then a dict lookup."""
    key = (type(est), type(raw))
    found = _LOG_P_GRADIENT.get(key)
    if found is None:
        g = node.gradient_values
        if (is_tracing() or not isinstance(g, torch.Tensor) or g.is_meta
                or torch._C._functorch.is_batchedtensor(g)):
            return  # (decided at an eager call with values)
        if not (g.requires_grad and holds_grad(raw)):
            return  # nothing to tell (frozen parameters, or no gradient through l at all): ask again later
        try:
            with torch.no_grad():
                lp = node.log_prob(node.sample)
        except (ValueError, RuntimeError, NotImplementedError):  # samples outside the support (relaxed): not log p
            lp = None
        g = g.detach()
        nonzero = g != 0
        if lp is not None and g.shape == lp.shape and not bool(nonzero.any()):
            return  # every value masked to 0: nothing to compare, no verdict (cached, it would stick): ask again later
        # in l's dtype: a float16 / bfloat16 node's l is widened to float32 (cost._widened), its log p is not
        found = lp is not None and g.shape == lp.shape and torch.allclose(g[nonzero], lp[nonzero].to(g.dtype))
        _LOG_P_GRADIENT[key] = found
    if found:
        moved = moving_support(raw)
        if moved:
            raise UnsupportedDistributionError(
                est._moving_support_message(raw, moved) + f". ({type(est).__qualname__} leaves score_function unset, "
                "but its gradient_function returns log p(x): storch takes it for a score function. Set "
                "score_function = True to say so, or score_function = False if the estimator accounts for the "
                "boundary term itself)")


def _is_score_node(node: Node) -> bool:
    """Whether ``node``'s gradient function is the score log p: its estimator's ``score_function``, or
    (where that is unset) an overridden gradient function found to return log p (:func:`_detect_log_p_gradient`)."""
    est = node.estimator
    return _is_score_function(est) or (est.score_function is None
                                       and _LOG_P_GRADIENT.get((type(est), type(node.distribution)), False))


# the estimator classes whose check_distribution is running (Estimator.supports then does not ask it again)
_CHECKING: "contextvars.ContextVar[frozenset]" = contextvars.ContextVar("storch_checking_distribution",
                                                                      default=frozenset())


def _supports_unconsulted(est: "Estimator", d: Distribution) -> bool:
    """``est.supports(d)`` from inside ``est``'s check_distribution: the base supports does not ask the
    check again (no recursion, no second check per node)."""
    token = _CHECKING.set(_CHECKING.get() | {type(est)})
    try:
        return est.supports(d)
    finally:
        _CHECKING.reset(token)


# a class's ``_storch_default_instance`` (in its own __dict__): its instance with default options (None: its
# constructor needs arguments), for _accepted_by_check
_MISSING_INSTANCE = object()


def _accepted_by_check(est: Any, d: Distribution) -> bool:
    """Whether ``est``'s own :meth:`Estimator.check_distribution` (an override) accepts ``d``; True where the
    class does not override it, or while a check runs (its own, or another's asked here, whose refusal message
    lists supporting estimators too: that list, discarded, is not asked again, so the checks do not nest).
    ``est``: an instance, or a class (asked through an instance with default options; True where none can be
    built)."""
    owner = est if isinstance(est, type) else type(est)
    if owner.check_distribution is Estimator.check_distribution or _CHECKING.get():
        return True
    token = _CHECKING.set(_CHECKING.get() | {owner})
    try:
        with torch.random.fork_rng(devices=[]):  # a learned part built with default options draws its init
            if isinstance(est, type):
                est = owner.__dict__.get("_storch_default_instance", _MISSING_INSTANCE)
                if est is _MISSING_INSTANCE:
                    # built once per class (warnings.catch_warnings resets the warnings already shown once, and
                    # is not thread-safe: not at every query; review r-24)
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            est = owner(plate="supports")
                    except Exception:  # noqa: BLE001  (a constructor that needs arguments: the attributes decide)
                        est = None
                    # kept on the class (a WeakKeyDictionary's value, an instance, kept its key alive: review r-25)
                    type.__setattr__(owner, "_storch_default_instance", est)
                if est is None:
                    return True
            try:
                est.check_distribution(d)
            except Exception:  # noqa: BLE001  (the factory would raise it too: not supported)
                return False
            return True
    finally:
        _CHECKING.reset(token)


def _meets_requirements(est, d: Distribution) -> bool:
    """The type requirements of :meth:`Estimator.supports` (``est``: an instance or a class)."""
    if est.distributions is not None and not isinstance(base_distribution(d), est.distributions):
        return False
    if est.requires_rsample and (not d.has_rsample or straight_through_rsample(d)):
        return False  # (a straight-through rsample is no pathwise derivative: a biased estimate)
    if est.requires_expand and not implements_expand(d):
        return False
    return not est.requires_enumerate_support or d.has_enumerate_support


def implements_expand(d: Distribution) -> bool:
    """Whether ``d.expand`` is implemented: its class (or, under torch's ``Independent`` and
    ``TransformedDistribution``, which expand their base, the base's) overrides ``Distribution.expand``."""
    while True:
        f = getattr(type(d), "expand", None)
        if f is None or f is Distribution.expand:
            return False
        if f is Independent.expand or f is TransformedDistribution.expand:
            d = d.base_dist
            continue
        return True


def _lowers_order(cls: type) -> bool:
    """Whether :meth:`Estimator.max_order_for` may lower ``cls``'s order for a distribution: it has
    ``requires_rsample`` or overrides the method (cached per class; the others are not asked)."""
    r = _LOWERS_ORDER.get(cls)
    if r is None:
        r = _LOWERS_ORDER[cls] = bool(cls.requires_rsample) or cls.max_order_for is not Estimator.max_order_for
    return r


def _base_supports(cls: type) -> bool:
    """Whether ``cls`` keeps the base class's :meth:`Estimator.supports` (cached per class)."""
    r = _BASE_SUPPORTS.get(cls)
    if r is None:
        r = _BASE_SUPPORTS[cls] = inspect.getattr_static(cls, "supports") is _SUPPORTS
    return r


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
    refuses the costs that reach the node (``storch.surrogate.pathwise._check_integer_reads``)."""
    found = marked_parameter(distribution)
    if found is not None:
        node.integer_parameter = (found[1], found[0], step)
