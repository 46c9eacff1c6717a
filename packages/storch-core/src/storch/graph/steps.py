"""A graph's step and how it ends: ``storch.reset()`` / ``storch.backward()``, the end of its ``with`` block, an
exception (the step guard discards the thread's default graph's step at once), and, in the default graph, an
evaluation step ended by the next step (``_ends_evaluation``). The messages for a step that was not ended.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Optional

import torch

from ..runtime.eager import eager_only
from .node import Node
from ..plates.integer_reads import MARKS, forget, record_of
from ..plates.tensor import Plate, _release

if TYPE_CHECKING:
    from .context import Graph


class _Steps:
    """The life cycle of a :class:`~storch.graph.Graph`'s step: the first of the parts the graph is built from
    (:class:`~storch.graph.ownership._Ownership` on it, then the costs and the data plates)."""

    # the graph's attributes that its parts read (declared for readers and type checkers; set in Graph.__init__, or
    # Graph's class-level defaults)
    nodes: list[Node]
    costs: list[tuple[str, Any]]
    plates: dict[str, Any]
    no_credit: set[int]
    integer_costs: dict[int, tuple]
    is_default: bool
    loss_built: bool
    costs_read: int
    last_end: Optional[str]
    step_updated: Optional[set]
    _step_guard: Optional[_StepGuard]

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


# the task id of the backward pass running in this thread (-1 outside one): no cost or data plate is added there
_graph_task_id = torch._C._current_graph_task_id


# the likely cause of a data plate of another graph, or of one claimed again in a default graph: denote_independent
# called where no step is, in a DataLoader's collate_fn (each batch claims the plate again in the default graph of
# the process or thread that collates) or a Dataset
_DATA_PLATE_OUTSIDE = (
    ". If storch.denote_independent is called in a DataLoader's collate_fn or a Dataset's __getitem__ (or anywhere "
    "before the step), its data plate belongs to the graph current there, not to the step: call "
    "storch.denote_independent inside the step (inside the `with storch.Graph():` block or the step function), on "
    "the batch the loader returned, and let the loader return plain tensors")
