"""The graph context: stochastic nodes, data plates and costs of one stochastic computation graph.

Each thread has a default graph; ``with storch.Graph():`` makes an isolated one. A graph lives
for one step (one surrogate loss); estimators, which hold state across steps, live outside it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Optional

import torch

from ._errors import CostError, PlateError
from ._plates import Plate, PlateTensor, plates_of, raw_of

if TYPE_CHECKING:
    from ._estimator import Estimator

__all__ = ["Graph", "Node", "current_graph", "add_cost", "denote_independent", "reset"]


class Node:
    """One stochastic node (one partition of the paper, section 3.2) in a graph.

    Attributes:
        estimator: the estimator that sampled it.
        distribution: the raw distribution (parent plates lead its batch shape).
        parents: plates of the distribution's parameters (data plates, upstream samples).
        plate: the node's own sample plate (set once the proposal is drawn).
        sample: raw samples, shape ``(plate, *parents, *batch, *event)``.
        gradient_values: l(x) evaluated on the samples (the result of the estimator's
            ``gradient_function``), shape broadcastable to ``(plate, *parents)``.
        weight_values: w(x) evaluated on the samples (the result of ``weighting_function``),
            shape broadcastable to ``(plate, *parents)``.
        value: the PlateTensor handed to user code.
        state: the estimator's typed per-node record (an instance of its ``State`` dataclass,
            created empty before ``proposal``; ``None`` if the estimator declares none). Its
            components pass values to each other (noise, relaxed samples, ...) through its fields.
        inputs: extra inputs given at the call, ``est(distribution, inputs=h)`` (``None`` if none):
            what a learned baseline may condition on besides the distribution (NVIL's observation).
        frames: the :class:`storch.CostFrame` the surrogate built for this node, by cost name (filled
            by ``storch.surrogate_loss`` for estimators with a control variate; what
            ``update_parameters`` trains on).
        steps: the samples of the later steps of a partition, in call order.
        context: an untyped dict for estimators that declare no ``State`` (kept for them; new
            estimators declare a ``State`` dataclass instead).
        index: topological position in the graph.
    """

    def __init__(self, estimator: "Estimator", distribution, parents: tuple[Plate, ...], original=None,
                 inputs: Any = None):
        self.estimator = estimator
        self.distribution = distribution
        self.original = original
        self.parents = parents
        self.plate: Optional[Plate] = None
        self.sample: Optional[torch.Tensor] = None
        self.gradient_values: Any = None
        self.weight_values: Any = None
        self.value: Optional[PlateTensor] = None
        state_type = getattr(estimator, "State", None)
        self.state: Any = state_type() if state_type is not None else None
        self.inputs = inputs
        self.frames: dict = {}
        self.steps: list = []
        self.context: dict = {}
        self.index = -1

    # The names the surrogate used first (they collided with the estimator's methods of the same
    # names); kept as aliases of gradient_values / weight_values for code written against them.
    @property
    def gradient_function(self) -> Any:
        """Alias of :attr:`gradient_values`."""
        return self.gradient_values

    @gradient_function.setter
    def gradient_function(self, value: Any) -> None:
        self.gradient_values = value

    @property
    def weights(self) -> Any:
        """Alias of :attr:`weight_values`."""
        return self.weight_values

    @weights.setter
    def weights(self, value: Any) -> None:
        self.weight_values = value

    @property
    def plates(self) -> tuple[Plate, ...]:
        """The node's plates: its own plate first, then its parents'."""
        return (self.plate,) + self.parents

    @property
    def n(self) -> int:
        return self.plate.size

    @property
    def batch_ndims(self) -> int:
        """Number of the distribution's own batch dims (those sampled jointly by this node)."""
        return len(self.distribution.batch_shape) - len(self.parents)

    def log_prob(self, value: torch.Tensor, distribution=None) -> torch.Tensor:
        """Log-probability of raw ``value`` summed over the node's own batch dims."""
        lp = (distribution or self.distribution).log_prob(value)
        k = self.batch_ndims
        return lp.sum(tuple(range(-k, 0))) if k > 0 else lp

    def __repr__(self) -> str:
        name = self.plate.name if self.plate else "?"
        return f"Node({self.estimator.name!r}, plate={name!r}, parents={[p.name for p in self.parents]})"


class Graph:
    """A stochastic computation graph; usable as a context manager.

    Example:
        >>> with storch.Graph():
        ...     z = storch.estimator("score", plate="z", n_samples=4)(Bernoulli(logits=theta))
        ...     storch.add_cost((z - 0.45) ** 2)
        ...     loss = storch.surrogate_loss()
    """

    def __init__(self) -> None:
        self.nodes: list[Node] = []
        self.costs: list[tuple[str, Any]] = []
        self.plates: dict[str, Any] = {}  # name -> Node or Plate (data plate)

    def __enter__(self) -> "Graph":
        _stack().append(self)
        return self

    def __exit__(self, *exc) -> None:
        stack = _stack()
        if stack and stack[-1] is self:
            stack.pop()
        if exc[0] is not None:
            self.reset()

    def reset(self) -> None:
        self.nodes.clear()
        self.costs.clear()
        self.plates.clear()

    def claim_plate(self, name: str, owner) -> None:
        if name in self.plates:
            raise PlateError(
                f"plate name {name!r} is already used in this graph (by {self.plates[name]!r}); give "
                "each stochastic node and data plate its own name, and start each step with a new "
                "graph (storch.backward() and storch.reset() clear the default graph)"
            )
        self.plates[name] = owner

    def add_node(self, node: Node) -> None:
        self.claim_plate(node.plate.name, node)
        node.index = len(self.nodes)
        self.nodes.append(node)

    def partition_of(self, estimator) -> Optional[Node]:
        """The node an estimator already sampled in this graph (its partition), if any."""
        for node in self.nodes:
            if node.estimator is estimator:
                return node
        return None

    def node_of(self, plate_name: str) -> Optional[Node]:
        owner = self.plates.get(plate_name)
        return owner if isinstance(owner, Node) else None

    def add_cost(self, cost, name: Optional[str] = None) -> None:
        if not isinstance(cost, torch.Tensor):
            raise CostError(f"a cost must be a tensor, got {type(cost).__name__}")
        if cost.dim() != 0:
            raise CostError(
                f"cost {name or len(self.costs)!r} has per-sample shape {tuple(cost.shape)}; a cost must "
                "be one number per sample: reduce its event dims first (e.g. `.sum(-1)`), or use "
                "storch.denote_independent for dims that are independent data points"
            )
        for p in plates_of(cost):
            if p.name not in self.plates:
                raise CostError(
                    f"cost {name or len(self.costs)!r} has plate {p.name!r}, which is not part of the current "
                    "graph; was it computed in an earlier step?"
                )
        if not raw_of(cost).is_floating_point():
            raise CostError("a cost must be a floating point tensor")
        self.costs.append((name or f"cost{len(self.costs)}", cost))

    def denote_independent(self, tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor:
        if type(tensor) is PlateTensor:
            n = len(tensor.plates)
            k = tensor.tensor.dim() - n
            d = dim + n if dim >= 0 else k + dim + n
            raw, parents = tensor.tensor.movedim(d, 0), tensor.plates
        else:
            if not -tensor.dim() <= dim < tensor.dim():
                raise PlateError(f"dim {dim} is out of range for a tensor of shape {tuple(tensor.shape)}")
            raw, parents = tensor.movedim(dim, 0), ()
        p = Plate(plate, raw.shape[0], True)
        self.claim_plate(plate, p)
        return PlateTensor._wrap(raw, (p,) + parents)


_local = threading.local()


def _stack() -> list:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = [Graph()]  # the thread's default graph
    return s


def current_graph() -> Graph:
    """The innermost active ``storch.Graph`` of this thread (or its default graph)."""
    return _stack()[-1]


def add_cost(cost: torch.Tensor, name: Optional[str] = None) -> None:
    """Register a cost (one number per sample) in the current graph."""
    current_graph().add_cost(cost, name)


def denote_independent(tensor: torch.Tensor, dim: int, plate: str) -> PlateTensor:
    """Declare ``dim`` of ``tensor`` an independent plate (data points; reduced by the mean)."""
    return current_graph().denote_independent(tensor, dim, plate)


def reset() -> None:
    """Clear the current graph (its nodes, plates and costs)."""
    current_graph().reset()
