"""The graph context: ``storch.Graph`` (a step's nodes, data plates and costs, entered with ``with``), the thread's
graphs (its default graph and the open ones: ``current_graph``) and the entry points that act on the current graph
(``add_cost``, ``denote_independent``, ``reset``), and what ``storch.compile`` hooks into them.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence, Union, overload

import torch

from ..runtime.eager import _compiler, _jit_tracing, eager_only, mark_eager_only, refuse_foreign_trace, set_eval_frame
from ..errors import StorchError
from ..runtime.generators import pop_generator, push_generator
from .node import Node
from ..plates.tensor import PlateTensor
from .costs import _Costs
from .data_plates import _DataPlates
from .steps import _StepGuard


class Graph(_DataPlates, _Costs):
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
    # once per step; storch.runtime.eager.mark_eager_only)
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

    def add_node(self, node: Node) -> None:
        """Register a stochastic node (claims its plate, gives it its index); estimators call this."""
        self.claim_plate(node.plate.name, node)
        node.index = len(self.nodes)
        self.nodes.append(node)
        traced = _local.__dict__.get("traced")
        if traced is not None:  # storch.compile is tracing this thread's step
            traced.append(node)


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
