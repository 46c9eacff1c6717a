"""A node's control variate in a cost's term (line 11 of Algorithm 1; Theorem 2): the estimator's own, and the base
class's ``(1 - MagicBox(l)) ⊥b`` of a baseline b, which the terms build without asking the estimator for it.

``_BASE_CONTROL_VARIATE`` is the base class's method (an estimator that does not override it has a baseline, or
none), ``_with_control_variate`` adds an estimator's own (its layout checked, refused where biased at the order),
``_baseline_term`` the base class's of a cost's innermost node, reusing the cost's MagicBox(L_k).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..graph.cost_frame import CostFrame, magic_box
from ..estimators.base import Estimator
from ..estimators.checks import check_in_frame
from ..estimators.step_state import step_baseline
from ..graph.node import Node
from .order import _guard_control_variate


def _has_control_variate(est) -> bool:
    return est.has_control_variate()


_BASE_CONTROL_VARIATE = Estimator.control_variate


def _with_control_variate(inner: torch.Tensor, est, node: Node, frame: CostFrame, order: int,
                          guarded: Optional[Node] = None) -> torch.Tensor:
    """``inner`` plus the estimator's own control variate (line 11) of ``node`` at ``frame``, its layout checked
    for an estimator author and refused where differentiating it would be biased at ``order`` (for the node
    ``guarded``: the partition's node where ``node`` is its stacked steps)."""
    a = est.control_variate(node, frame)  # line 11
    if a is not None and (type(a) is not torch.Tensor or (a.shape != frame.tensor.shape and a.dim())):
        check_in_frame(est, "control_variate", a, frame)
    _guard_control_variate(a, node if guarded is None else guarded, order)
    return inner if a is None else inner + a


def _baseline_term(inner: torch.Tensor, est, node: Node, frame: CostFrame, box: torch.Tensor,
                   prefix: Optional[torch.Tensor], outer: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``inner`` plus the base class's control variate of the innermost node, MagicBox(L_{k-1}) ·
    (1 - MagicBox(l_k)) ⊥b = (MagicBox(L_{k-1}) - MagicBox(L_k)) ⊥b (a product of MagicBoxes is the
    MagicBox of the sum), with MagicBox(L_k) the cost's own ``box``: the same values and derivatives
    at every order, without computing that MagicBox a second time. ``outer``: MagicBox(L_{k-1}) where the
    surrogate has it already (L_{k-1} = l of one node: the box that node's own control variate reads)."""
    b = step_baseline(est, node, frame)
    if b is None:
        return inner
    if type(b) is not torch.Tensor or (b.shape != frame.tensor.shape and b.dim()):  # (a scalar: no call)
        check_in_frame(est, "baseline", b, frame)
    if outer is None:
        outer = 1.0 if prefix is None else magic_box(prefix)
    return inner + (outer - box) * b.detach()


def _base_control_variate(est, node: Node, frame: CostFrame, box: torch.Tensor) -> Optional[torch.Tensor]:
    """``Estimator.control_variate`` (the base class's (1 - MagicBox(l)) ⊥b) with MagicBox(l) at the frame's
    plates given: the box the surrogate shares with the next node's term, whose MagicBox(L_{k-1}) is the same
    function of the same tensor (two nodes, the second in the first's plate, each with a baseline: one MagicBox
    of l_1 where there were two; the same ops otherwise, so the same values, and the same gradients up to the
    order in which l_1's uses are summed: the last bit in float32)."""
    b = step_baseline(est, node, frame)  # (as before the step's update, where it has one)
    if b is None:
        return None
    if type(b) is not torch.Tensor or (b.shape != frame.tensor.shape and b.dim()):  # (a scalar: no call)
        check_in_frame(est, "baseline", b, frame)
    return (1.0 - box) * b.detach()  # b must not carry gradient: appendix D.2.1
