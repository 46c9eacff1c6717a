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

import inspect
import math
import numbers
import weakref
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch
from torch.distributions import Distribution, Independent

from ..graph.cost_frame import CostFrame, magic_box
from ..distributions import (check_enumeration, raw_log_prob, raw_sample, rsample_max_order, straight_through_rsample,
                             undifferentiable_rsample, unwrap_distribution)
from ..distributions.rsample import UNDIFFERENTIABLE_RSAMPLE_NOTE
from ..distributions.unwrap import _as_raw
from ..runtime.eager import (_compiler, _jit_tracing, eager_only, ignored_by_script, refuse_foreign_trace,
                     scripted_estimator_message)
from .._util.stacklevel import skip_methods_of, user_stacklevel
from ..errors import OptionError, PlateError, StorchError, UnsupportedDistributionError
from ..runtime.generators import drawing_with
from . import validators
from ..graph import _stack, current_graph, is_tracing
from ..graph.node import Node
from ..plates.integer_reads import MARKS
from ..plates.tensor import Plate, PlateTensor, align
from ..conditions.score import moving_support, support_is_fixed
from .catalog import EstimatorInfo, available, supporting_estimators
from .checks import check_in_frame, check_precision, warn_precision
from .messages import _could_enumerate, _no_update_message, updating_message
from .step_state import step_baseline
from .capabilities import (_REPLAY_FLAGS, _accepted_by_check, _base_supports, _instance_or_class, _is_score_function,
                           _meets_requirements, _supports_unconsulted, capability_problem, replay_problem)
from .construction import (_ByIdentity, _CREATED, _DECLARED_OPTIONS, _check_new_attribute,
                           _declared_under_private_name, _defined_before, _fixed_option_message, _fixed_options,
                           _marking_construction, _option_names)
from .calls import _call_failed, _check_call_arguments, _graph_task_id, _in_backward_message, _no_module_hooks
from .first_steps import _PLAIN_KEEPS, _first_node, _float_dtype, _grad_enabled, _sample_node
from .partition_paths import _BY_EXTEND, _STEP_PATH
from .partition_steps import _extend_partition, _plain_step
from . import capabilities, construction, first_steps, partition_paths, partition_steps

__all__ = ["Estimator", "CostFrame", "magic_box"]


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
        deterministic_proposal: the proposal q draws nothing: the values handed out are a function of the node's
            distribution alone (``expect``: every value of the support), so parent entries of equal values give
            equal values. An estimator upstream may rely on it: rebar's and relax's ``plain_direct_gradient`` treat
            a cost read through such a node as a deterministic function of their sample. False by default.
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
            instance sets the flag (:func:`~storch.estimators.capabilities.replay_problem`).
        State: the dataclass of the per-node record ``node.state`` (``None``: no record).
        supports_partitions: whether calling one instance several times in a graph (a loop) makes
            one partition (paper, section 3.2; docs/partitions.md). A later step is made by
            :meth:`extend` where the class overrides a partition hook (``extend``,
            ``step_gradient_function``, ``draw``), else, where it overrides components, from its own
            ``proposal``, ``gradient_function`` and ``output``
            (:func:`~storch.estimators.partition_steps._components_step`). With a hook, each overridden
            component needs its hook overridden in the same class or a subclass (``gradient_function``:
            ``step_gradient_function`` or ``extend``; ``proposal``: ``draw`` or ``extend``; ``output`` and
            ``weighting_function``: ``extend``), else the second call in a graph (step 1) is refused
            (:func:`~storch.estimators.partition_paths._partition_path`).
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
    deterministic_proposal: ClassVar[bool] = False
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
            return validators.integer(self.name, "n_samples", value, minimum=1,
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
        take :func:`~storch.estimators.first_steps._plain_node`."""
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
                    return _sample_node(self, graph, raw, parents, distribution, inputs)
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
                        # a plain step (partition_steps._plain_step): decided per (estimator, distribution type)
                        # with the node's plain decision, with the per-call conditions of _first_node and a partition
                        # already started (its log and path set by its step 1 on the general path)
                        known = self.__dict__.get("_storch_plain")
                        if (known is not None and known.get(type(same[0])) and log is not None
                                and node.step_inputs is None and same[1][1:] == node.parents
                                and _STEP_PATH.get(type(self)) is _BY_EXTEND and self.supports_partitions
                                and not MARKS and _grad_enabled() and not is_tracing()):
                            return _plain_step(self, node, distribution, same[0], same[1])
                    return _extend_partition(self, graph, node, distribution, same, inputs)
        own = graph.check_call(self, distribution)
        if node is not None and not graph.nodes:  # check_call ended an evaluation step (Graph._ends_evaluation)
            node = None
        if node is not None:
            return _extend_partition(self, graph, node, distribution, None, inputs, own)
        raw, parents = unwrap_distribution(distribution)
        if plain:
            return _first_node(self, graph, raw, parents, distribution, inputs)
        return _sample_node(self, graph, raw, parents, distribution, inputs)

    def _check_enumeration(self, raw: Distribution) -> None:
        """:func:`~storch.distributions.check_enumeration`, naming this estimator (a user's class only)."""
        try:
            check_enumeration(raw)
        except UnsupportedDistributionError as e:
            raise UnsupportedDistributionError(
                f"estimator {self.name or type(self).__qualname__!r} (plate {self.plate!r}): {e}") from e

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
                        "(not OneHotCategoricalStraightThrough's straight-through rsample, nor torch's Wishart.rsample, "
                        "which autograd cannot differentiate)")
        if cls.requires_enumerate_support:
            need.append("a distribution whose finite support torch can enumerate (has_enumerate_support=True: "
                        "Bernoulli, Categorical, OneHotCategorical, Binomial; torch does not enumerate a Multinomial's "
                        "support, which is finite too)")
        if cls.requires_expand:
            need.append("a distribution that implements expand (torch's default Distribution.expand raises "
                        "NotImplementedError, and so does a torch class's expand inherited by a subclass with an "
                        "__init__ of its own: define expand there, or build the torch class itself)")
        return need

    def _check_draw_precision(self, raw: Distribution, sample: torch.Tensor) -> None:
        """A draw of a distribution whose precision storch checks (at the first step and each partition step):
        a score function is refused where the draw sits at the float spacing (a Beta's at 1, a Normal's scale
        below eps·|loc|); a pathwise draw of a Beta / Kumaraswamy / Dirichlet gets a PrecisionWarning (exact for
        a bounded cost, biased for log(1 - x))."""
        if _is_score_function(self):
            check_precision(self, raw, sample)
        elif self.requires_rsample:
            warn_precision(self, raw, sample, user_stacklevel)

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
                    "straight-through estimator itself, 'straight_through' on it (the same hard sample and "
                    "derivative of probs, declared biased), or 'gumbel_straight_through' (a Gumbel-softmax "
                    "sample's derivative)." + hint)
        if self.requires_rsample and d.has_rsample and undifferentiable_rsample(d):
            hint = f" {UNDIFFERENTIABLE_RSAMPLE_NOTE}." + hint
        if self.requires_enumerate_support and not d.has_enumerate_support and _could_enumerate(d):
            # the requirement names torch's classes: a user's class (permutations, a grid) can enumerate too
            hint = (f" {type(d).__name__} is a class of your own: set has_enumerate_support = True and define "
                    "enumerate_support(expand=True), which returns every value, shape (K, *batch_shape, *event_shape) "
                    "(docs/your-own-distribution.md)." + hint)
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

    def padding(self, node: Node) -> Optional[torch.Tensor]:
        """Which entries of the node's plate are padding, bool, shape ``(N, *parents)`` (the sizes of ``node.plates``;
        trailing dims may be left out and any may be 1, as a gradient function's; for a partition: of the sequences
        as its last step left them); ``None`` (the default): none is. Another dtype or shape is refused.

        Padding is an entry that is not a member of the estimator's sample: where an entry of the parents has fewer
        possible values than the plate has entries (a ``-inf`` mask, finished sequences), an estimator that draws
        distinct values (``unordered_set``, ``expect``, ``sum_and_sample``'s memory) fills the rest with repeats of
        a possible value at weight 0 and l = 0 (``importance`` replaces a draw p cannot produce likewise, ``mvd`` fills an
        inactive part's slots). Storch's estimate leaves them out; a user's loss of the whole set
        (minimum risk training's Q ∝ p^α over the plate, a ranking loss) reads them through
        :func:`storch.padding`, which calls this after the node's last step. Entries that are drawn but get weight
        0 (``sum_and_sample``'s rejected samples, ``score(baseline="greedy")``'s greedy entry) are not padding."""
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
            _call_failed(self, distribution, e)  # storch's explanation of torch's error, where it has one
            raise


_WELL_FORMED: "weakref.WeakSet[type]" = weakref.WeakSet()

# the helper modules below this one read the class itself at call time (the base class's methods, which a subclass's
# are compared with): they cannot import it (no import circles), so it is bound in them here, once
for _helper in (capabilities, construction, first_steps, partition_paths, partition_steps):
    _helper.Estimator = Estimator  # type: ignore[attr-defined]

Estimator.__init__ = _marking_construction(Estimator.__init__)  # type: ignore[method-assign]


_BASE_UPDATE = Estimator.update_parameters


_FORWARD = Estimator.forward
_draw_node = Estimator._storch_forward  # (not self._storch_forward: a subclass may define that name)
skip_methods_of(Estimator)  # a warning issued under an estimator's method points past its family's code
