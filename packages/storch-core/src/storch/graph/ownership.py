"""Plate ownership: the plate names a graph's nodes and data plates own, and which graph a plate tensor belongs to
(one of an ended graph, or of another graph, is refused: a stale tensor is never silently merged).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.distributions import Distribution

from ..errors import PlateError
from .node import Node
from ..plates.tensor import CARRY_ACROSS_STEPS, Lineage, Plate, PlateTensor, unpickled_message
from .steps import _DATA_PLATE_OUTSIDE, _evaluation_hint, _Steps

if TYPE_CHECKING:
    from ..estimators.base import Estimator


class _Ownership(_Steps):
    """A :class:`~storch.graph.Graph`'s plates and what they belong to (one of its parts, on its step's life cycle)."""

    def claim_plate(self, name: str, owner: Any) -> None:
        """Reserve the plate name ``name`` for ``owner`` (a node or a data plate); a name already in use raises ``storch.PlateError``."""
        if name in self.plates and not (getattr(owner, "parents", None) == ()
                                        and self._ends_evaluation(name, getattr(owner, "estimator", None))):
            raise PlateError(self._reused_name(name, owner))
        self.plates[name] = owner

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
                    "next batch again)" + CARRY_ACROSS_STEPS)
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
