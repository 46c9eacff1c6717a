"""The graph context: stochastic nodes, data plates and costs of one stochastic computation graph.

Each thread has a default graph; ``with storch.Graph():`` makes an isolated one. A graph lives
for one step (one surrogate loss); estimators, which hold state across steps, live outside it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union, overload

import torch
from torch.distributions import Distribution

from ._order_guard import is_differentiated, unbatched
from ._stacklevel import user_stacklevel
from .eager import _compiler, _jit_tracing, eager_only, mark_eager_only, refuse_foreign_trace, set_eval_frame
from .errors import ConstantCostWarning, CostError, PlateError, StorchError
from .generators import pop_generator, push_generator
from .node import Node
from .plates.integer_reads import MARKS, forget, record_of
from .plates.tensor import Lineage, Plate, PlateTensor, _release, new_plate_tensor, unpickled_message

if TYPE_CHECKING:
    from .estimators.base import Estimator

__all__ = ["Graph", "Node", "current_graph", "add_cost", "denote_independent", "reset"]


class Graph:
    """A stochastic computation graph; usable as a context manager.

    A graph is one step. It ends with ``storch.backward()`` or ``storch.reset()``, or at the end
    of its ``with`` block (an exception leaving the block discards the step). In the thread's
    default graph, which has no block, a storch call that raises (an estimator call,
    ``add_cost``, ``denote_independent``, ``surrogate_loss``) discards the step at once. So an
    exception never leaks a step's nodes into the next step. An evaluation step in the default graph (built
    under ``torch.no_grad()``, its costs read by ``storch.cost_estimates()``) needs no reset: the next step
    ends it (docs/evaluation.md). Plate tensors carry the identity of the graph that made
    their plates (:class:`storch.Lineage`); using one after its graph ended, or in another graph,
    raises a :class:`storch.PlateError` that says so. A graph belongs to the thread whose ``with`` block has it
    open: entering it from another thread meanwhile raises a :class:`storch.StorchError` (use one
    ``with storch.Graph():`` per thread).

    Args:
        generator: a ``torch.Generator`` for storch's random draws in this graph (the estimators'
            proposals and relaxation noise, lazily built networks), so that threads that train at
            the same time, each in its own graph, draw reproducible samples (the global generator
            is shared by all threads). Inside the ``with`` block, ``storch.current_generator()``
            returns it for your own draws. ``None``: torch's global generator.

    Example:
        >>> with storch.Graph():
        ...     z = storch.estimator("score", plate="z", n_samples=4)(Bernoulli(logits=theta))
        ...     storch.add_cost(((z - 0.45) ** 2).sum())
        ...     loss = storch.surrogate_loss()
    """

    def __init__(self, generator: Optional[torch.Generator] = None) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.nodes: list[Node] = []
        self.costs: list[tuple[str, Any]] = []
        self.plates: dict[str, Any] = {}  # name -> Node or Plate (data plate)
        self.generator = generator
        # {0: ident of the thread whose `with` block has this graph open} (claimed by one atomic setdefault, so of
        # two threads entering at once one is refused), and how deep that thread has entered it (re-entry nests:
        # _depth)
        self._open_in: dict[int, int] = {}
        self.no_credit: set[int] = set()  # ids of the costs added with credit=False (storch.add_cost)
        # id(cost) -> the record of its mark (storch.plates.integer_reads), for the costs computed from an integer
        # read from a pathwise sample, kept when the step's marks end (_close): a surrogate built after the `with`
        # block still refuses them (storch.surrogate.integer_reads._check_integer_reads)
        self.integer_costs: dict[int, tuple] = {}

    # Defaults of the immutable state: class attributes, set on the instance when they change (a graph per step
    # made them ten stores in every Graph())
    is_default = False  # the thread's default graph (set by _stack)
    _mode: Optional[bool] = None
    _finished = False
    _step_guard: Optional["_StepGuard"] = None  # (made when first asked: most steps never ask)
    _depth = 0
    loss_built = False  # surrogate_loss() was called in this step (for the messages below)
    # how many of the step's costs storch.cost_estimates() or storch.surrogate_loss() last read: an evaluation step
    # in the default graph whose costs were all read ends itself when the next one begins (_ends_evaluation)
    costs_read = 0
    last_end: Optional[str] = None  # how the last step with costs ended (for the messages below)
    # the step's update record (storch.surrogate.updates._updates_on_backward makes it at the step's first update
    # probe; reset drops it): non-empty once a backward pass queued the step's estimator updates, and shared
    # by every probe of the step, so they run once per step however many of its surrogates a pass reaches,
    # or passes reach. Dropped, never cleared: a probe of an ended step keeps its own
    step_updated: Optional[set] = None

    def __repr__(self) -> str:
        # active: the current graph of this thread (storch calls go to it); open: entered by a `with` block
        stack = getattr(_local, "stack", None)
        state = ("active" if stack and stack[-1] is self else "open" if self._depth > 0 else
                 "finished" if self._finished else "inactive")
        kind = "default graph, " if self.is_default else ""
        nodes = ", ".join(f"{n.plate.name if n.plate else '?'}: {n.estimator.name or type(n.estimator).__name__}"
                          for n in self.nodes[:8]) + (", ..." if len(self.nodes) > 8 else "")
        costs = [name for name, _ in self.costs[:8]] + (["..."] if len(self.costs) > 8 else [])
        return f"storch.Graph({kind}{state}, nodes=[{nodes}], costs={costs})"

    def __getstate__(self) -> dict:
        # a copy (copy.copy, copy.deepcopy, pickle) makes its own step guard when first asked (the original's refers
        # to the original: a copy of the default graph discarded the original's step; and its weak reference made
        # pickling fail only once a guard had been asked for), and is open in no `with` block: the original's
        # block (its thread and depth) is not the copy's, which would be refused in another thread and never closed
        state = self.__dict__.copy()
        state.pop("_step_guard", None)
        state.pop("_depth", None)
        state.pop("_mode", None)
        state["_open_in"] = {}
        return state

    # (__enter__ and __exit__ suspend dynamo themselves, as eager_only's wrapper would: a Python frame fewer each,
    # once per step; storch.eager.mark_eager_only)
    @mark_eager_only
    def __enter__(self) -> "Graph":
        prior = set_eval_frame(None)
        try:
            if _jit_tracing() or _compiler._is_exporting_flag:
                refuse_foreign_trace("a storch.Graph block")
            ident = _get_ident()
            if self._open_in.setdefault(0, ident) != ident:  # open in another thread (a dict call and a comparison)
                raise StorchError(_open_elsewhere_message(self._open_in.get(0)))
            self._depth += 1
            if self._finished:  # a graph object entered again starts a new step
                self.reset()
            self._finished = False
            stack = _local.__dict__.get("stack")  # (_stack() inline)
            (stack if stack is not None else _stack()).append(self)
            if self.generator is not None:
                push_generator(self.generator)  # storch.current_generator() in the block
                self._mode = True
            return self
        finally:
            if prior is not None:
                set_eval_frame(prior)

    @mark_eager_only
    def __exit__(self, *exc) -> None:
        prior = set_eval_frame(None)
        try:
            self._depth -= 1
            if self._depth <= 0:  # its outermost block in the owning thread: another thread may enter it now
                self._depth = 0
                self._open_in.clear()
            if self._mode is not None:
                self._mode = None
                pop_generator()
            stack = _local.__dict__.get("stack")
            if stack and stack[-1] is self:
                stack.pop()
            if exc[0] is not None:
                self.reset(f"discarded by an exception in its step ({exc[0].__name__})")
            else:
                self._close("finished (its `with storch.Graph():` block ended)")
            self._finished = True
        finally:
            if prior is not None:
                set_eval_frame(prior)

    @eager_only
    def reset(self, reason: str = "reset (storch.reset() or storch.backward())") -> None:
        """End the step: forget its nodes, plates and costs; its plate tensors become stale."""
        self._close(reason)
        if self.costs:
            self.last_end = reason
        self.loss_built = False
        if self.costs_read:
            self.costs_read = 0
        self.step_updated = None
        self.no_credit.clear()
        self.integer_costs.clear()
        self.nodes.clear()
        self.costs.clear()
        self.plates.clear()

    def guard(self) -> "_StepGuard":
        """A context manager that discards the step (:meth:`discard`) when its block raises, and re-raises.

        Every storch call that can fail during a step runs in it, so an error never leaks a step's
        nodes into the next one: ``with graph.guard(): ...``.
        """
        return self._guard

    @property
    def _guard(self) -> "_StepGuard":
        guard = self._step_guard
        if guard is None:
            guard = self._step_guard = _StepGuard(self)
        return guard

    def discard(self, error: BaseException) -> None:
        """A storch call in this graph raised ``error``: in the thread's default graph, end the step.

        The default graph has no ``with`` block that marks the end of a step, so a failed step
        is discarded at once (its plate tensors become stale). Inside ``with storch.Graph():``
        the caller may handle the error and go on with the step; the step is discarded when an
        exception leaves the block. torch's ``_StopRecomputationError`` is no error: non-reentrant
        checkpointing raises it to end a recomputation early during backward (storch code inside a
        checkpointed function sees it pass), and it discards nothing. ``storch.add_cost`` and estimator
        calls are refused during a backward pass, a recomputation included (a cost added there would
        be added again by each backward pass through the checkpoint): return the cost from the
        checkpointed function and add it outside; checkpoint the networks, not the sampling.
        """
        if self.is_default and not _is_recompute_stop(error):
            self.reset(f"discarded after an error in its step ({type(error).__name__})")

    def _close(self, reason: str) -> None:
        if MARKS:  # (integer values read from its pathwise samples: their marks end with the step)
            for _, cost in self.costs:  # (its costs' records stay with it: a surrogate built after the block)
                record = record_of(cost)
                if record is not None:
                    self.integer_costs[id(cost)] = record
            forget(self.nodes)
        for owner in self.plates.values():
            plate = owner.plate if isinstance(owner, Node) else owner  # (_lineage_of inline: a node or a data plate)
            lineage = plate.lineage if plate is not None else None
            if lineage is not None and lineage.closed is None:
                lineage.closed = reason
                _release(lineage)  # nothing of the step is held after it (the plate caches)

    def claim_plate(self, name: str, owner: Any) -> None:
        """Reserve the plate name ``name`` for ``owner`` (a node or a data plate); a name already in use raises ``storch.PlateError``."""
        if name in self.plates and not (getattr(owner, "parents", None) == ()
                                        and self._ends_evaluation(name, getattr(owner, "estimator", None))):
            raise PlateError(self._reused_name(name, owner))
        self.plates[name] = owner

    def _ends_evaluation(self, name: str, estimator: Any = None) -> bool:
        """A call in the thread's default graph begins a new step (claims the plate name ``name`` again, or calls
        ``estimator`` again on a distribution that depends on nothing of the step) after an evaluation step that
        was not ended: end that step here and return True.

        An evaluation loop without ``with storch.Graph():`` and without ``storch.reset()`` then runs every batch
        (it failed every second one: the first refusal discarded the step), and so does the training step after
        it. Only a step that has nothing left to give is ended so: it sampled nodes or added costs, all without
        grad (``torch.no_grad()``, ``torch.inference_mode()``: nothing for a backward pass or an estimator update),
        and ``storch.cost_estimates()`` or ``storch.surrogate_loss()`` read all its costs (a step that only
        sampled has none to read). Any other step is refused as before (a training step, a step of data plates
        only, costs not read): there a reused name may be a mistake in the step itself.
        """
        if not self.is_default or self.costs_read != len(self.costs) or not (self.nodes or self.costs):
            return False
        for _, cost in self.costs:
            if cost.requires_grad:
                return False
        for node in self.nodes:
            if node.no_grad_step is None or _node_holds_grad(node):
                return False
        if estimator is None:
            advice = ("If both calls were meant for one step (inputs and targets on one data plate), pass the tensors "
                      f"to ONE `storch.denote_independent((x, y), 0, {name!r})` call")
        else:  # (a data plate's one-call advice named the estimator's plate: wrong for a draw)
            advice = (f"If both draws of estimator {estimator.name!r} were meant for one step (a second step of its "
                      "partition), build that step inside `with storch.Graph():`: in the default graph an estimator "
                      "called again on a distribution that depends on nothing of the step begins a new step")
        self.reset(f"ended by the next step in the thread's default graph (plate name {name!r} was used again "
                   f"after an evaluation step, built without grad, whose costs were all read). {advice}")
        return True

    def _reused_name(self, name: str, owner: Any) -> str:
        """The message for a plate name claimed twice: what the graph knows of why, and what to do. (Where the
        user's calls came from is not recorded: a stack walk in every denote_independent cost ~4 us in a step.)"""
        old = self.plates[name]
        head = f"plate name {name!r} is already used in this graph (by {old!r})"
        if self.is_default and self.loss_built:
            # the step built its surrogate loss, and a claim follows: a new step after one that was not
            # ended (surrogate_loss().backward() does not end it), which this error has now discarded
            ran = " and backpropagated it" if self.step_updated else ""
            return (f"{head}: this call begins a new step, but the previous step in the thread's default graph "
                    f"built its surrogate loss (storch.surrogate_loss()){ran} and was never ended: "
                    "storch.surrogate_loss().backward() does not end a step. Call storch.backward() instead (it "
                    "backpropagates and ends the step), or storch.reset() after loss.backward(), or build each "
                    "step inside `with storch.Graph():`. storch has now discarded the unfinished step")
        if self.is_default:
            # a failed storch call discards the default graph's step (discard): the step's tensors are stale now
            new_step = ("If this call begins a new step (a loop, a rerun cell), the previous step in the thread's "
                        "default graph was never ended (an exception in your code interrupted it, or it was not ended "
                        "with storch.backward() or storch.reset()): call storch.reset() after catching such an "
                        "exception, or build each step inside `with storch.Graph():`, which discards a failed step "
                        "itself. storch has now discarded the step: start it again" + _evaluation_hint())
        else:
            new_step = ("If this call begins a new step (a loop inside the block), enter a new `with storch.Graph():` "
                        "block for each step: a block is one step")
        if isinstance(old, Plate) and isinstance(owner, Plate):
            # two data plates of one name: the tensors of one plate denoted in two calls, or a new step. Two names
            # would pair every entry of one with every entry of the other (docs/plates.md), not x[i] with y[i]
            return (f"{head}. If the two calls denote several tensors of the same data points (inputs and targets), "
                    f"pass them in ONE call: `x, y = storch.denote_independent((x, y), 0, {name!r})` pairs x[i] with "
                    "y[i]. A tensor of the same data points that exists only later (computed after the first call) "
                    "is put on the plate by wrapping its raw values: `y = storch.PlateTensor(raw_y, x.plates)` "
                    "(its leading dims: x's plates, each of the plate's size or 1; docs/plates.md). Give another name "
                    "only to a genuinely different data plate (two data plates pair every entry of one with every "
                    f"entry of the other). {new_step}"
                    + (_DATA_PLATE_OUTSIDE if self.is_default else ""))
        return (f"{head}; give each stochastic node and data plate its own name. {new_step}")

    def check_plates(self, plates: tuple[Plate, ...], what: str) -> None:
        """Raise :class:`PlateError` if a plate belongs to an ended graph or to another graph."""
        for p in plates:
            owner = self.plates.get(p.name)
            lineage = p.lineage
            if lineage is None:  # a plate built by hand: matched by name
                if owner is None:
                    raise PlateError(
                        f"{what} has plate {p.name!r}, which is not part of the current graph; was it "
                        "computed in an earlier step?")
                continue
            if owner is not None and _lineage_of(owner) is lineage:
                continue
            if lineage.unpickled:  # (a worker's batch: its copy may carry the worker's closed reason)
                raise PlateError(unpickled_message(what, p.name))
            if lineage.closed is not None:
                raise PlateError(
                    f"{what} has plate {p.name!r} from a graph that was {lineage.closed}: a stale tensor. "
                    "Compute every tensor of a step inside that step's graph (after storch.backward() "
                    "or storch.reset(), recompute it from its inputs, e.g. denote_independent the "
                    "next batch again)")
            raise PlateError(
                f"{what} has plate {p.name!r} of another graph (a graph that is still open, e.g. an "
                "enclosing `with storch.Graph():` block or another thread's graph); tensors cannot "
                "move between graphs" + (_DATA_PLATE_OUTSIDE if p.independent else ""))

    def owns(self, plates: tuple[Plate, ...]) -> bool:
        """Whether every plate of ``plates`` is one this graph made (the check of :meth:`check_plates`
        that passes, without building its message); ``False`` leaves the error to ``check_plates``."""
        get = self.plates.get
        for p in plates:
            owner = get(p.name)
            if owner is None or p.lineage is None:
                return False
            if (owner.plate if isinstance(owner, Node) else owner).lineage is not p.lineage:
                return False
        return True

    def check_call(self, estimator: Estimator, distribution: Distribution) -> tuple[Plate, ...]:
        """Checks before ``estimator(distribution)`` samples a node in this graph; returns the plates of
        the plate tensors the distribution holds (what it depends on).

        The distribution's plate tensors must belong to this graph. In the thread's default
        graph, a second call of one estimator (a partition step) must depend on something of
        this graph: otherwise it is the first call of a new step after an unfinished one (an
        exception in user code), and merging it into the old step would give a wrong gradient.
        """
        plates = _distribution_plates(distribution)
        what = f"the distribution passed to estimator {estimator.name!r} (plate {estimator.plate!r})"
        self.check_plates(plates, what)
        if (self.is_default and not plates and self.partition_of(estimator) is not None
                and not self._ends_evaluation(estimator.plate, estimator)):
            why = ("here the previous step built its surrogate loss but was not ended: storch.surrogate_loss() "
                   "(and its .backward()) does not end a step; end it with storch.backward() (backpropagates, "
                   "updates estimator state, resets), storch.reset(), or `with storch.Graph():` per step"
                   if self.loss_built else
                   "after catching an exception in your code, call storch.reset(), or use `with storch.Graph():` "
                   "per step" + _evaluation_hint())
            raise PlateError(
                f"estimator {estimator.name!r} (plate {estimator.plate!r}) was already called in the thread's "
                f"default graph, and {what} depends on nothing sampled in it. In the default graph storch cannot "
                "tell such a call from the first call of a new step after a step that did not finish, so it "
                "refuses, and has discarded the step. If the calls are steps of one partition that do not depend "
                "on each other (a gate per block, independent decisions), build each training step inside "
                "`with storch.Graph():` (there the block marks the step). If a previous step did not finish: "
                f"{why}")
        return plates

    def add_node(self, node: Node) -> None:
        """Register a stochastic node (claims its plate, gives it its index); estimators call this."""
        self.claim_plate(node.plate.name, node)
        node.index = len(self.nodes)
        self.nodes.append(node)
        traced = _local.__dict__.get("traced")
        if traced is not None:  # storch.compile is tracing this thread's step
            traced.append(node)

    def partition_of(self, estimator: Estimator) -> Optional[Node]:
        """The node an estimator already sampled in this graph (its partition), if any."""
        for node in self.nodes:
            if node.estimator is estimator:
                return node
        return None

    def node_of(self, plate_name: str) -> Optional[Node]:
        """The stochastic node whose sample plate is ``plate_name``, or None (a data plate, or unknown)."""
        owner = self.plates.get(plate_name)
        return owner if isinstance(owner, Node) else None

    @eager_only
    def add_cost(self, cost: torch.Tensor, name: Optional[str] = None, *, credit: bool = True) -> None:
        """Add a cost to this graph: :func:`storch.add_cost` on this graph instead of the current one."""
        with self._guard:
            self._add_cost(cost, name, credit)

    def _add_cost(self, cost, name: Optional[str], credit: bool = True) -> None:
        label = name if name is not None else len(self.costs)
        if _graph_task_id() != -1:  # (one C call: -1 outside a backward pass)
            raise CostError(_in_backward_message(label))
        if not isinstance(cost, torch.Tensor):
            raise CostError(
                f"cost {label!r} is a {type(cost).__name__}, not a tensor; pass the torch tensor computed "
                "from the samples (e.g. storch.add_cost(loss_tensor)), not a Python number or .item()")
        if type(cost) is PlateTensor:  # (raw_of, plates_of)
            raw, plates = cost._raw, cost._plates
        else:
            raw, plates = cost, ()
        if raw.dim() != len(plates):  # per-sample rank 0 (read from the raw tensor: no dispatch)
            raise CostError(self._shape_message(label, cost, raw, plates))
        if not raw.is_floating_point():
            raise CostError(f"cost {label!r} has dtype {cost.dtype}; a cost must be a floating point tensor "
                            "(e.g. `.float()`)")
        if not self.owns(plates):
            self.check_plates(plates, f"cost {label!r}")
        if credit is True and plates:
            self._check_node_plates(label, plates)
        # (one attribute read if it needs grad; a cost on a sample plate, which comes first, is no constant either:
        # a score-function cost such as the toy's, of samples that need no grad, skips the warning's call)
        if not raw.requires_grad and credit is True and (not plates or plates[0].independent) and (
                torch.is_grad_enabled()):
            self._warn_constant(raw, plates, label)
        if credit is not True:
            if credit is not False:
                raise CostError(f"cost {label!r}: credit must be True or False, got {credit!r}")
            self.no_credit.add(id(cost))
        elif self.step_updated and plates:  # (None on the common path: one attribute read)
            self._warn_late_cost(label, plates)
        self.costs.append((name or f"cost{len(self.costs)}", cost))

    def _check_node_plates(self, label, plates: tuple) -> None:
        """Refuse a cost that carries a node's sample plate but not every plate of that node's sample: a data
        plate (or an upstream node's sample plate) reduced by hand (``.tensor.sum(i)`` rewrapped with
        ``storch.PlateTensor``). The node's score term is per entry of all its plates, and such a cost has no
        entry per data point (or per upstream sample) to credit: the surrogate failed deep inside with a
        PlateError naming neither the cost nor the node (a porting test). A partition's node is left to the
        surrogate (its steps may have other plates)."""
        get = self.plates.get
        for p in plates:
            if p.independent:
                continue
            owner = get(p.name)
            if not isinstance(owner, Node) or owner.step_log is not None:
                continue
            for q in owner.parents:
                if q not in plates:  # (the same Plate objects, as a rule: found by identity) then by name
                    names = {r.name for r in plates}
                    missing = [r for r in owner.parents if r.name not in names]
                    if missing:
                        raise CostError(self._missing_plates_message(label, plates, owner, missing))
                    break

    def _missing_plates_message(self, label, plates: tuple, node: Node, missing: list) -> str:
        """The refusal of :meth:`_check_node_plates` (error path only)."""
        data = [q.name for q in missing if q.independent]
        samples = [q.name for q in missing if not q.independent]
        msg = (f"cost {label!r} has plates {tuple(q.name for q in plates)}: it carries the sample plate "
               f"{node.plate.name!r} of node {node.plate.name!r} (estimator {node.estimator.name!r}), whose samples "
               f"have the plates {tuple(q.name for q in node.plates)}, but not ")
        parts = []
        if data:
            parts.append(
                f"the data plate{'s' if len(data) > 1 else ''} {data}, reduced by hand (a sum or mean over its dim "
                "of .tensor, wrapped back with storch.PlateTensor). Each data point's sample is credited with its "
                "own entry's cost, and a cost reduced over the data points has none. Add the per-data-point cost "
                "instead (before the reduction): storch averages a data plate; for the sum over it, scale the "
                "per-entry cost by the plate's size (`size * cost`; nested data plates: J * n, see 'Minibatches of "
                "a larger data set, and nested data plates' in docs/plates.md). A cost that mixes data points "
                "(contrastive across the batch) is no per-data-point cost: keep the batch as a per-sample dim of "
                "the node (no data plate), see 'A cost that mixes data points' in docs/plates.md")
        if samples:
            owners = [f"{n!r} (of node {n!r})" for n in samples]
            parts.append(
                f"the sample plate{'s' if len(samples) > 1 else ''} {', '.join(owners)}, reduced by hand. A reduction "
                "over a node's samples is not a cost storch can credit: compute the cost from the plate tensors "
                "themselves, one value per sample; a multi-sample bound such as IWAE's is the cost of ONE sample that "
                "holds its K draws (est(dist.expand((K, *dist.batch_shape)))), reduced over that dim, or the 'vimco' "
                "estimator (docs/plates.md)")
        return msg + "; nor ".join(parts)

    def _warn_late_cost(self, label, plates: tuple) -> None:
        """A cost added after a backward pass of this step's surrogate ran the estimators' updates
        (``surrogate_loss().backward()``; ``step_updated``): they update once per step, so the state they keep per
        cost (a moving average, a learned baseline's regression) never sees this one (p-state). Warned here; where
        the cost has a baseline, the surrogate that reaches it refuses it (its baseline would read state trained on
        this step's samples: ``storch.estimators.step_state``, review r-24)."""
        names = {p.name for p in plates}
        late = sorted({f"{n.estimator.name!r} (plate {n.plate.name!r})" for n in self.nodes
                       if id(n.estimator) in self.step_updated and n.plate.name in names})
        if late:
            warnings.warn(
                f"cost {label!r} was added after a backward pass of this step's surrogate loss updated estimator "
                f"{', '.join(late)} (surrogate_loss().backward() runs each estimator's update once per step): its "
                "state (a moving average or learned baseline per cost) will not include this cost, in this step or "
                "any later one, and a later storch.backward() of the step updates nothing. Add every cost before "
                "the step's first backward pass (one surrogate_loss() of all of them, or storch.backward())",
                UserWarning, stacklevel=user_stacklevel())

    def _shape_message(self, label, cost: torch.Tensor, raw: torch.Tensor, plates: tuple) -> str:
        """A cost that is not one number per sample (error path only)."""
        hint = self._per_entry_hint(raw) if not plates else _data_plate_hint(cost, plates)
        # a black-box cost of several nodes wrapped on one node's plates: after the common advice (a forgotten
        # .sum(-1) whose event size equals another plate's size matches too: review r-twenty)
        after = self._other_plates_hint(cost, plates) if plates else ""
        return (f"cost {label!r} has per-sample shape {tuple(cost.shape)}; a cost must be one number per sample. "
                + (hint + "Otherwise: reduce" if hint else "Reduce") + " its event dims first (e.g. `.sum(-1)`), or "
                "use storch.denote_independent for dims that are independent data points"
                + (". " + after.rstrip(" ").rstrip(".") if after else "") + self._cost_hints(plates))

    def _warn_constant(self, raw: torch.Tensor, plates: tuple, label) -> None:
        """Warn (:class:`storch.ConstantCostWarning`) of a cost that carries no sample plate (a plain tensor, or
        data plates only) and needs no gradient while gradients are enabled: a constant, which contributes nothing
        to any gradient. A warning, not a refusal: a term constant by construction is harmless and common (the
        entropy of a Normal of fixed scale, a placeholder regulariser, a frozen module's weight decay: a review
        found them refused); the case it is for, a reward computed per sample outside torch then reduced
        (``r.sum()``) or put on a data plate, silently lost its credit (z = 320 in a porting test).
        Not warned: under torch.no_grad() (evaluation), with credit=False, a cost that needs grad."""
        if any(not p.independent for p in plates) or is_differentiated(unbatched(raw)):
            return  # a sample plate (score-function credit), or differentiated (under vmap / forward mode too)
        what = "a plain tensor" if not plates else f"only the data plates {tuple(p.name for p in plates)}"
        warnings.warn(ConstantCostWarning(
            f"cost {label!r} carries no sample plate ({what}) and needs no gradient (requires_grad is False while "
            "gradients are enabled): to storch it is a constant, which contributes nothing to any gradient. "
            + (self._per_entry_hint(raw) or "If it is a reward computed per sample outside torch (from z.tensor, in "
            "numpy), wrap it back on the sample's plates, `storch.PlateTensor(r, z.plates)` (the plate dims first, "
            "as in z.tensor), and a score-function estimator credits it to the node (the black-box recipe in "
            "docs/plates.md); reducing it (r.sum()) or putting it on a data plate (storch.denote_independent) cuts "
            "it from the samples. ")
            + "A term that is constant by construction (the entropy of a Normal of fixed scale) can be left out, "
            "or added with credit=False where it is meant only for the reported value; "
            "warnings.filterwarnings('ignore', category=storch.ConstantCostWarning) silences this"),
            stacklevel=user_stacklevel())

    def _per_entry_hint(self, raw: torch.Tensor) -> str:
        """Where ``raw``'s leading dims have the sizes of the plates of a live node's sample (a reward computed
        per sample outside torch, from z.tensor): the advice to wrap it back on them (error path only)."""
        for node in self.nodes:
            value = node.value
            if type(value) is not PlateTensor or not value._plates:
                continue
            vp = value._plates
            if raw.dim() >= len(vp) and tuple(raw.shape[:len(vp)]) == tuple(p.size for p in vp):
                names = tuple(p.name for p in vp)
                return (f"Its leading dims {tuple(raw.shape[:len(vp)])} have the sizes of the plates {names} of the "
                        f"sample of node {node.plate.name!r}: if it holds one value per entry of that sample (a reward "
                        "computed per sample outside torch, from z.tensor), wrap it back on them, "
                        "`storch.PlateTensor(r, z.plates)` with z that sample (the black-box recipe in docs/plates.md;"
                        " reducing it with .sum() or putting it on a data plate with storch.denote_independent would "
                        "cut it from the samples and drop its credit). ")
        return ""

    def _other_plates_hint(self, cost: torch.Tensor, plates: tuple) -> str:
        """Where the leading per-sample dims of ``cost`` have the sizes of live sample plates that ``plates`` lack
        (a black-box cost of two nodes wrapped on one node's plates): the advice to wrap it on the plates of a
        tensor that holds all of them (error path only)."""
        names = {p.name for p in plates}
        others = [node.plate for node in self.nodes if node.plate.name not in names]
        matched: list = []
        for size in tuple(cost.shape):
            plate = next((q for q in others if q.size == size and q not in matched), None)
            if plate is None:
                break
            matched.append(plate)
        if not matched:
            return ""
        return (f"Its leading dims {tuple(q.size for q in matched)} also have the sizes of the sample plates "
                f"{tuple(q.name for q in matched)}, which its plates {tuple(q.name for q in plates)} lack: if it is "
                "a black box computed outside torch from the .tensor of several nodes' samples "
                "(torch.stack([x, y], -1).tensor), wrap it on the plates of a tensor that holds all of them, `storch.PlateTensor(c, s.plates)` with s "
                "that tensor (e.g. s = torch.stack([x, y])), whose plates are in the order of its .tensor's dims (the "
                "black-box recipe for several nodes in docs/plates.md). ")

    def _cost_hints(self, plates: tuple) -> str:
        """The ``cost_hint`` of the estimators whose nodes a cost depends on (error path only)."""
        hints = []
        for p in plates:
            owner = self.plates.get(p.name)
            hint = getattr(getattr(owner, "estimator", None), "cost_hint", "")
            if hint and hint not in hints:
                hints.append(hint)
        return "".join(f". {h}" for h in hints)

    @overload
    def denote_independent(self, tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor: ...

    @overload
    def denote_independent(self, tensor: Sequence[torch.Tensor], dim: int, plate: str) -> tuple[PlateTensor, ...]: ...

    @eager_only
    def denote_independent(self, tensor: Union[torch.Tensor, Sequence[torch.Tensor]], dim: int,
                           plate: str) -> Union[PlateTensor, tuple[PlateTensor, ...]]:
        """Make ``dim`` of ``tensor`` an independent data plate of this graph: :func:`storch.denote_independent`."""
        with self._guard:
            if isinstance(tensor, (tuple, list)):
                return self._denote_several(tensor, dim, plate)
            return self._denote_independent(tensor, dim, plate)

    def _denote_independent(self, tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor:
        if _graph_task_id() != -1:  # (one C call: -1 outside a backward pass)
            raise PlateError(_denote_in_backward_message(plate))
        if not isinstance(tensor, torch.Tensor):
            raise PlateError(f"denote_independent needs a tensor, got {type(tensor).__name__}")
        if type(dim) is not int and (isinstance(dim, bool) or not isinstance(dim, int)):  # (an int: one call)
            raise PlateError(f"denote_independent: dim must be an int, got {dim!r}")
        if (type(plate) is not str and not isinstance(plate, str)) or not plate:
            raise PlateError(f"denote_independent: plate must be a non-empty string, got {plate!r}")
        if type(tensor) is PlateTensor:
            self.check_plates(tensor.plates, "the tensor passed to denote_independent")
            n = len(tensor.plates)
            k = tensor.tensor.dim() - n  # per-sample dims: `dim` counts among these only
            if k == 0:
                raise PlateError(_no_dim_message(f"a plate tensor of per-sample shape () (plates {tensor.plate_names})"))
            if not -k <= dim < k:
                raise PlateError(
                    f"dim {dim} is out of range for a plate tensor of per-sample shape {tuple(tensor.shape)} "
                    f"(plates {tensor.plate_names}); dim counts the per-sample dims only, in [{-k}, {k - 1}]")
            d = n + (dim if dim >= 0 else k + dim)
            raw, parents = tensor.tensor.movedim(d, 0), tensor.plates
        else:
            k = tensor.dim()
            if k == 0:
                raise PlateError(_no_dim_message("a 0-d tensor (shape ())"))
            if not -k <= dim < k:
                raise PlateError(f"dim {dim} is out of range for a tensor of shape {tuple(tensor.shape)}; "
                                 f"use a dim in [{-k}, {k - 1}]")
            # dim 0 (the usual batch dim) is already first: the tensor itself, no view (one
            # autograd node fewer, as by hand)
            raw, parents = (tensor if dim == 0 or dim == -k else tensor.movedim(dim, 0)), ()
        if raw.shape[0] == 0:
            from ._ranks import _announce_no_costs

            # under torch.distributed: every rank raises where the others are in storch's collectives
            others = _announce_no_costs()
            skip = ("Skip empty batches before the step" if others is None else
                    "Under torch.distributed, skipping the step on one rank hangs the others (in DDP's gradient "
                    "allreduce and the estimators' updates): give every rank data, with "
                    "DistributedSampler(drop_last=True) or by padding the shard"
                    + (f" (the ranks ran: {others}; every rank raised)" if others else ""))
            raise PlateError(
                f"denote_independent: plate {plate!r} would hold 0 data points (dim {dim} of a tensor of shape "
                f"{tuple(tensor.shape)} has size 0); the surrogate averages over the data points, and a mean over "
                f"none is undefined (NaN). {skip}; where the batch is split into "
                "sub-batches (labelled and unlabelled data points), skip that sub-batch's denote_independent and "
                "its costs (`if x_lab.shape[0] > 0:`), not the whole step")
        p = Plate(plate, raw.shape[0], True, 0, Lineage())
        if plate in self.plates:  # (claim_plate inline)
            if parents or not self._ends_evaluation(plate):
                raise PlateError(self._reused_name(plate, p))
        self.plates[plate] = p
        return new_plate_tensor(raw, (p,) + parents)

    def _denote_several(self, tensors, dim: int, plate: str):
        """Several tensors (inputs and targets) on ONE data plate: entry i of each belongs together."""
        if not tensors:
            raise PlateError("denote_independent got an empty sequence of tensors")
        sizes = []
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                raise PlateError(
                    f"denote_independent needs a tensor or a tuple of tensors (inputs and targets on one "
                    f"data plate), got a {type(tensors).__name__} holding a {type(t).__name__}; convert it "
                    "with torch.as_tensor first")
            k = t.dim()  # per-sample rank for a PlateTensor
            if k == 0:
                raise PlateError(_no_dim_message(f"a 0-d tensor (shape ()) in the {type(tensors).__name__}"))
            if not -k <= dim < k:
                raise PlateError(f"dim {dim} is out of range for a tensor of shape {tuple(t.shape)}")
            sizes.append(t.shape[dim])
        if len(set(sizes)) != 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise PlateError(
                f"the tensors put on data plate {plate!r} have sizes {sizes} along dim {dim} (shapes {shapes}); "
                "each data point needs one entry in every tensor (inputs and targets must have the same "
                "number of rows)"
            )
        first = self._denote_independent(tensors[0], dim, plate)
        p = first.plates[0]
        out = [first]
        for t in tensors[1:]:
            if type(t) is PlateTensor:
                self.check_plates(t.plates, "a tensor passed to denote_independent")
                n = len(t.plates)
                d = dim + n if dim >= 0 else t.tensor.dim() + dim
                if any(q.name == plate for q in t.plates):
                    raise PlateError(f"a tensor passed to denote_independent already has plate {plate!r}")
                out.append(PlateTensor._wrap(t.tensor.movedim(d, 0), (p,) + t.plates))
            else:
                out.append(PlateTensor._wrap(t.movedim(dim, 0), (p,)))
        return type(tensors)(out) if type(tensors) in (tuple, list) else tuple(out)


def _no_dim_message(what: str) -> str:
    return (
        f"denote_independent got {what}: it has no dim to denote as independent (a data plate indexes the data "
        "points along a dim). For one data point, unsqueeze it (tensor.unsqueeze(0): a data plate of size 1); a "
        "value shared by all data points (a scalar hyperparameter, a total) is not denoted: use it as it is")


def _evaluation_hint() -> str:
    """What a refused new step under ``torch.no_grad()`` needs (error path only; :meth:`Graph._ends_evaluation`
    said the previous step was no evaluation step it can end)."""
    if torch.is_grad_enabled():
        return ""
    return (". In an evaluation loop (under torch.no_grad() or torch.inference_mode()) storch ends the previous "
            "step itself only when it was built without grad and storch.cost_estimates() (or storch.surrogate_loss())"
            " read all its costs; otherwise end each batch with storch.reset() after reading its estimates, or "
            "build it inside `with storch.Graph():`")


def _node_holds_grad(node: Node) -> bool:
    """Whether a node's sample or gradient function (a partition's, of any step) requires grad: a step a backward
    pass could still differentiate (:meth:`Graph._ends_evaluation` ends only steps that hold none)."""
    values = [node.sample, node._gradient_values] + [log[1] for log in node.step_log or ()]
    return any(isinstance(v, torch.Tensor) and v.requires_grad for v in values)


def _is_recompute_stop(error: BaseException) -> bool:
    """Whether ``error`` is torch's ``_StopRecomputationError`` (torch.utils.checkpoint): control flow that ends a
    non-reentrant checkpoint's recomputation early during backward, not an error of the step."""
    t = type(error)
    return t.__name__ == "_StopRecomputationError" and t.__module__ == "torch.utils.checkpoint"


def _data_plate_hint(cost: torch.Tensor, plates: tuple) -> str:
    """Where a cost's per-sample dims start with the size of one of its data plates: a plain tensor of one value per
    data point (a weight ``w * c``) broadcast against the plate, which ``.sum(-1)`` would weight by ``w.sum()``
    (p-semi). Error path only."""
    data = [p for p in plates if p.independent and cost.dim() and p.size == cost.shape[0]]
    if not data:
        return ""
    name = data[0].name
    return (f"Its per-sample dims start with {cost.shape[0]}, the size of its data plate {name!r}: if it multiplies "
            f"a plain tensor of one value per data point (a weight w in w * c), every data point's cost became a "
            f"vector over all of them, and .sum(-1) would weight each point by w.sum(); put that tensor on the data "
            f"plate with the data (storch.denote_independent((x, w), 0, {name!r})). ")


class _StepGuard:
    """``with graph.guard():`` discard the graph's step if the block raises (the error propagates).

    The graph keeps its guard (one object per graph, not per call); the guard refers to the graph
    weakly, so the pair is no reference cycle and a finished graph, with its step's tensors, is
    freed by reference counting."""

    __slots__ = ("_graph",)

    def __init__(self, graph: Graph) -> None:
        self._graph = weakref.ref(graph)

    @property
    def graph(self) -> Optional[Graph]:
        return self._graph()

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            graph = self._graph()
            if graph is not None:
                graph.discard(exc)
        return False


def _distribution_plates(d, depth: int = 0) -> tuple[Plate, ...]:
    """The plates of the plate tensors a distribution holds (its parameters, base distributions)."""
    out: dict[str, Plate] = {}
    for v in vars(d).values():
        for item in (v if isinstance(v, (list, tuple)) else (v,)):
            if type(item) is PlateTensor:
                for p in item._plates:
                    out.setdefault(p.name, p)
            elif depth < 8 and isinstance(item, torch.distributions.Distribution):
                for p in _distribution_plates(item, depth + 1):
                    out.setdefault(p.name, p)
    return tuple(out.values())


def _lineage_of(owner) -> Optional[Lineage]:
    """The lineage of a plate owner (a Node's plate or a data Plate)."""
    plate = owner.plate if isinstance(owner, Node) else owner
    return plate.lineage if plate is not None else None


_local = threading.local()
_get_ident = threading.get_ident


def _open_elsewhere_message(owner: Optional[int]) -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    return (
        f"this storch.Graph is open in another thread ({names.get(owner, owner)!r}: its `with` block there has not "
        f"ended), and thread {threading.current_thread().name!r} entered it. A graph is one step of one thread: two "
        "threads in one graph would merge their steps (one thread's storch.backward() would backpropagate the other's "
        "costs and end its step). Use one `with storch.Graph():` per thread, a new graph for each step (e.g. "
        "`with storch.Graph(generator=g):` with one torch.Generator per thread for reproducible draws); the same "
        "Graph object may be entered again once its block in the other thread has ended")


def _stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        default = Graph()
        default.is_default = True
        s = _local.stack = [default]  # the thread's default graph
    return s


class tracing_nodes:
    """Context (used by ``storch.compile``): collect every node added in this thread into ``nodes``.

    ``recorder``: while ``storch.compile`` records a step, the callable that ``surrogate_loss`` hands
    a surrogate with estimator updates to (``recorder(loss, updating, skipping, keys)``, see :func:`tracing_recorder`)
    instead of attaching its eager update probe; ``None`` on the eager runs of the traced paths."""

    def __init__(self, nodes: list, recorder: Optional[Callable] = None) -> None:
        self.nodes = nodes
        self.recorder = recorder

    def __enter__(self):
        self.outer = _local.__dict__.get("traced"), _local.__dict__.get("recorder")
        _local.traced = self.nodes
        _local.recorder = self.recorder

    def __exit__(self, *exc) -> None:
        _local.traced, _local.recorder = self.outer


def tracing_recorder() -> Optional[Callable]:
    """The recorder of the step ``storch.compile`` is recording in this thread (see :class:`tracing_nodes`)."""
    return _local.__dict__.get("recorder")


def is_tracing() -> bool:
    """Whether ``storch.compile`` is tracing a step in this thread (or running it eagerly on the
    traced paths: its replay check, ``CompiledStep.eager``). Public as ``storch.extending.is_tracing``."""
    return _local.__dict__.get("traced") is not None


_graph_task_id = torch._C._current_graph_task_id


def _in_backward_message(label) -> str:
    return (
        f"storch.add_cost was called during a backward pass (cost {label!r}). "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) runs the checkpointed function again during "
        "backward to recompute what it saved, so a cost added there is added once more by every backward pass that "
        "goes through it (a gradient penalty with torch.autograd.grad(..., retain_graph=True) before "
        "storch.backward() counts it twice). Return the cost from the checkpointed function and add it outside "
        "(`cost = checkpoint(f, z, use_reentrant=False); storch.add_cost(cost, name=...)`); the same holds for "
        "storch.add_cost called from a tensor hook or a custom Function's backward")


def _denote_in_backward_message(plate) -> str:
    return (
        f"storch.denote_independent was called during a backward pass (plate {plate!r}). "
        "torch.utils.checkpoint.checkpoint(..., use_reentrant=False) runs the checkpointed function again during "
        "backward to recompute what it saved, and the data plate it declared in the forward pass is already in the "
        "graph. Declare the data plate before the checkpoint and pass the plate tensor in "
        "(`xs = storch.denote_independent(x, 0, 'data'); h = checkpoint(enc, xs, use_reentrant=False)`); the same "
        "holds for storch.denote_independent called from a tensor hook or a custom Function's backward")


# the likely cause of a data plate of another graph, or of one claimed again in a default graph: denote_independent
# called where no step is, in a DataLoader's collate_fn (each batch claims the plate again in the default graph of
# the process or thread that collates) or a Dataset
_DATA_PLATE_OUTSIDE = (
    ". If storch.denote_independent is called in a DataLoader's collate_fn or a Dataset's __getitem__ (or anywhere "
    "before the step), its data plate belongs to the graph current there, not to the step: call "
    "storch.denote_independent inside the step (inside the `with storch.Graph():` block or the step function), on "
    "the batch the loader returned, and let the loader return plain tensors")


def current_graph() -> Graph:
    """The innermost active ``storch.Graph`` of this thread (or its default graph)."""
    return _stack()[-1]


@mark_eager_only
def add_cost(cost: torch.Tensor, name: Optional[str] = None, *, credit: bool = True) -> None:
    """Register a cost (one number per sample) in the current graph.

    ``credit=False``: a loss that gives no credit to the samples it depends on. It is differentiated as
    written, per sample (no score-function term, no control variate), and reduced over the plates as a
    cost is (the estimators' weights, detached, then the mean over data points). For a loss that trains
    another part of the model on the samples, such as a critic's regression on the returns in
    actor-critic: added as an ordinary cost it would also send score-function gradient to the policy
    (correct for the sum of all costs, but not what a critic loss is for). It is left out of estimator
    state (baselines, buffers) and out of ``max_order`` checks; ``storch.cost_estimates()`` reports it.

    ``credit=False`` removes only the score-function credit: a path that autograd can differentiate is
    differentiated as written. A reparameterized (pathwise) sample, or a parameter the loss reads directly,
    still gets gradient through it: a critic's ``(V(s_t) - G_t) ** 2`` on states reached by reparameterized
    actions through differentiable dynamics trains the policy through ``s_t``. Detach the inputs
    (``V(s_t.detach())``) for a loss that must give the node no gradient at all.
    """
    prior = set_eval_frame(None)  # (eager_only's suspension of dynamo inline: a Python frame fewer per cost)
    try:
        stack = _local.__dict__.get("stack")  # (_stack() inline)
        graph = (stack if stack is not None else _stack())[-1]  # Graph.add_cost without eager_only's call
        try:  # what `with graph.guard():` does, without its two method calls per cost
            graph._add_cost(cost, name, credit)
        except BaseException as e:
            graph.discard(e)
            raise
    finally:
        if prior is not None:
            set_eval_frame(prior)


@overload
def denote_independent(tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor: ...


@overload
def denote_independent(tensor: Sequence[torch.Tensor], dim: int, plate: str) -> tuple[PlateTensor, ...]: ...


@mark_eager_only
def denote_independent(tensor: Union[torch.Tensor, Sequence[torch.Tensor]], dim: int,
                       plate: str) -> Union[PlateTensor, tuple[PlateTensor, ...]]:
    """Declare ``dim`` of ``tensor`` an independent plate (data points; reduced by the mean).

    Pass a tuple of tensors to put several of them (inputs and targets) on ONE data plate:
    ``x, y = storch.denote_independent((x, y), 0, "data")`` pairs ``x[i]`` with ``y[i]``. Their
    sizes along ``dim`` must agree. (Two calls with two plate names would instead pair every
    ``x`` with every ``y``; the same name twice is refused.)
    """
    prior = set_eval_frame(None)  # (eager_only's suspension of dynamo inline: a Python frame fewer per step)
    try:
        if _jit_tracing() or _compiler._is_exporting_flag:
            refuse_foreign_trace(f"storch.denote_independent (plate {plate!r})")
        stack = _local.__dict__.get("stack")  # (_stack() inline)
        graph = (stack if stack is not None else _stack())[-1]  # Graph.denote_independent without eager_only's call
        try:  # what `with graph.guard():` does, without its two method calls
            if isinstance(tensor, (tuple, list)):
                return graph._denote_several(tensor, dim, plate)
            return graph._denote_independent(tensor, dim, plate)
        except BaseException as e:
            graph.discard(e)
            raise
    finally:
        if prior is not None:
            set_eval_frame(prior)


@eager_only
def reset() -> None:
    """Clear the current graph (its nodes, plates and costs)."""
    current_graph().reset()
