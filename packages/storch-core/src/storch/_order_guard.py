"""The order-1 surrogate differentiated twice: refused where it would be biased.

``storch.surrogate_loss()`` (order 1) is the any-order form of Eq. 2, so a score function or ``expect``
differentiated twice from it is still unbiased. An estimator unbiased only at order 1 (ARM, DisARM, GO,
MVD, SPSA, the unordered set with its baseline) or a pathwise node whose cost has a kink on the path from
its sample is not: differentiating its term again gives a silently biased higher derivative (a Hessian of
0 for a ReLU). ``surrogate_loss(order=2)`` refuses those when it is built; the order-1 surrogate does not
know whether it will be differentiated again, so it marks the tensors through which such a node's
gradient flows with a hook. A backward pass run with ``create_graph=True`` runs hooks with grad mode on
(a plain backward with it off): the hook refuses exactly the passes that build a graph to differentiate
again. Under a ``torch.func`` transform (whose hooks always run with grad mode on), the nesting of
differentiating transforms is read when the surrogate is built instead.

An estimator's own update that differentiates the loss with ``create_graph=True`` (RELAX's, LAX's and
REBAR's variance training of their control variate) runs inside :func:`estimator_create_graph`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from .errors import OrderError

__all__ = ["estimator_create_graph", "refuse_create_graph", "differentiating_transforms"]

# a depth, not a thread-local: the autograd engine runs the hooks of a CUDA backward in its own threads
_OWN = [0]


@contextlib.contextmanager
def estimator_create_graph() -> Iterator[None]:
    """The ``create_graph=True`` passes in this block are an estimator's own (training its learned parts on
    the variance of the gradient, in ``update_parameters``), not a user's higher derivative of an order-1
    surrogate: the order-1 surrogate's refusal (see :func:`storch.surrogate_loss`) lets them through.

    A user's pass may run in it too when what is differentiated afterwards depends on the first derivative
    only linearly through the storch term (GradNorm differentiates ‖w ∇L‖ in the loss weight w;
    learning-to-reweight, in per-example weights): no second derivative of the surrogate is taken, so the
    order-1 estimators and kinks it would refuse are unbiased there."""
    _OWN[0] += 1
    try:
        yield
    finally:
        _OWN[0] -= 1


class _Refuse:
    """A tensor hook that raises OrderError in a backward pass that builds a graph (``create_graph=True``).
    The message is built only when it is raised (the hook is registered at every step)."""

    __slots__ = ("message",)

    def __init__(self, message: Callable[[], str]) -> None:
        self.message = message

    def __call__(self, grad: torch.Tensor) -> None:
        if torch.is_grad_enabled() and not _OWN[0]:
            raise OrderError(self.message())


def refuse_create_graph(tensor, message: Callable[[], str]) -> None:
    """Hook ``tensor`` (if it carries gradient) to raise ``OrderError(message())`` when a backward pass with
    ``create_graph=True`` reaches it."""
    if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
        tensor.register_hook(_Refuse(message))


def differentiating_transforms() -> int:
    """How many ``torch.func`` transforms that differentiate (grad, vjp/jacrev, jvp/jacfwd) are active
    (0 outside torch.func)."""
    if torch._C._functorch.maybe_current_level() is None:
        return 0
    stack = torch._C._functorch.get_interpreter_stack() or []
    kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return sum(1 for i in stack if i.key() in kinds)
