"""Refusing to differentiate a surrogate more times than its order allows (the bottom of the package).

A term whose higher derivatives would be biased is hooked (:mod:`storch.conditions.order_guard`): ``_refuse_twice`` for the
order-1 surrogate differentiated again, ``_refuse_beyond`` for an (n+1)-th derivative of the order-n surrogate;
under torch.func, whose hooks cannot tell, the transforms are counted when the surrogate is built
(``_check_mixed``); and the advice a refusal gives (``_again``). Imports nothing else of the package.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..conditions.order_guard import (FORWARD_OVER_REVERSE, FUNCTORCH_OVER_OUTER, CountedRefusal, differentiating_transforms,
                            forward_level_open, has_tangent, is_differentiated, outer_requires_grad,
                            refuse_create_graph, unbatched)
from ..errors import OrderError
from ..graph import is_tracing, tracing_recorder


def _batched(t) -> bool:
    return isinstance(t, torch.Tensor) and torch._C._functorch.is_batchedtensor(t)


def _refuse_twice(tensor, message, order: int = 1) -> None:
    """Refuse a second differentiation of the order-1 surrogate through ``tensor`` (:mod:`storch.conditions.order_guard`):
    a hook, or under torch.func (whose hooks cannot tell) an OrderError now if two transforms differentiate, or
    one does and the term takes part in the autograd outside it (a gradient of the transform's result, e.g. of
    a torch.func.jvp tangent or a torch.func.grad, is a second derivative). ``order`` >= 2: an (order + 1)-th
    differentiation of the order-``order`` surrogate (:func:`_refuse_beyond`)."""
    if order >= 2:
        _refuse_beyond(tensor, message, order)
        return
    recorder = tracing_recorder() if is_tracing() else None
    if recorder is not None:
        # a compiled step's replays do not run the traced step's hooks: storch.compile hooks each replay's
        # outputs with the refusal its recorder keeps (CompiledStep.eager, without a recorder, hooks as here)
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            recorder.refuse(message)
        return
    nested = differentiating_transforms()
    if nested >= 2:
        raise OrderError(message())
    if nested == 1:
        if not isinstance(tensor, torch.Tensor) or not is_differentiated(tensor):
            return
        if outer_requires_grad(tensor):
            # the transform's result requires grad outside it: a gradient of it (of a jvp's tangent, a grad) is
            # a second derivative through this term that no hook sees (hooks here run with grad mode on)
            raise OrderError(message() + FUNCTORCH_OVER_OUTER)
        _PENDING.mixed.append(message)  # the surrogate checks whether its loss takes part outside (_check_mixed)
        return
    if not nested:
        # under torch.func.vmap (no differentiating transform) the batched tensor reports requires_grad=False:
        # hook the tensor it batches, which a backward pass outside vmap (create_graph=True: a Hessian of
        # vmap(f)) reaches; a plain backward pass through it runs the hook with grad mode off, as eagerly
        tensor = unbatched(tensor)
        if forward_level_open() and isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            if has_tangent(tensor):
                # differentiated in both modes at once: a backward pass through it gives its gradient a tangent
                # (forward-over-reverse); a gradient of its tangent reaches no hook (reverse-over-forward)
                raise OrderError(message() + FORWARD_OVER_REVERSE)
            _PENDING.mixed.append(message)  # the surrogate checks whether its loss carries a tangent (_check_mixed)
        refuse_create_graph(tensor, message)


def _refuse_beyond(tensor, message, order: int) -> None:
    """Refuse an (order + 1)-th differentiation of the order-``order`` surrogate through ``tensor``: a hook that
    counts the create_graph passes (storch.conditions.order_guard._Count), kept alive with the loss (_keep_counted). Under
    torch.func, whose hooks run with grad mode on and cannot count, the transforms are counted when the surrogate
    is built: more than ``order`` refused, and so is a term that takes part in the autograd outside them (the
    passes there are not counted: a conservative refusal); under forward mode (a tangent), likewise."""
    refusal = CountedRefusal(message, order)
    recorder = tracing_recorder() if is_tracing() else None
    if recorder is not None:
        if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            recorder.refuse(refusal)  # (storch.compile hooks each replay's outputs with the counting hook)
        return
    nested = differentiating_transforms()
    if nested > order:
        raise OrderError(message())
    if nested:
        if isinstance(tensor, torch.Tensor) and is_differentiated(tensor) and outer_requires_grad(tensor):
            raise OrderError(message() + FUNCTORCH_OVER_OUTER.replace("order-1", f"order-{order}"))
        return
    tensor = unbatched(tensor)
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return
    if forward_level_open() and has_tangent(tensor):
        raise OrderError(message() + FORWARD_OVER_REVERSE.replace("order-1", f"order-{order}"))
    _PENDING.counted.append(tensor)
    refuse_create_graph(tensor, refusal)


def _keep_counted(loss: torch.Tensor) -> None:
    """The counting hooks hold their tensors weakly (a hook on a tensor's autograd node that held the tensor would
    be a cycle autograd never frees): keep the hooked tensors of this build alive as long as the loss's autograd
    node, in its metadata (no cycle: the hooked tensors are upstream of it). Not as long as the Python tensor: a
    loss used in an expression (``surrogate_loss(order=2) + reg``, ``hessian(lambda m: 0.5 * f(m), mu)``) is a
    temporary whose node lives on in the result's graph (a review found those refused as "freed")."""
    counted = _PENDING.counted
    if counted:
        keep = list(counted)
        node = loss.grad_fn
        if node is not None:
            node.metadata.setdefault("storch_counted", []).extend(keep)
        else:  # (no graph of its own: a vmapped loss) as long as the tensor
            weakref.finalize(loss, list.clear, keep)
        counted.clear()


class _Pending(threading.local):
    """Per thread (graphs are per thread): the refusals hooked while this thread's surrogate is built with a
    forward-AD level open, or found under one torch.func transform. One list for the process let a surrogate built in another thread meanwhile clear
    this build's refusals, and its forward-over-reverse second derivative went through."""

    def __init__(self) -> None:
        self.mixed: list = []
        self.counted: list = []  # the tensors hooked by _refuse_beyond in this build (see _keep_counted)


_PENDING = _Pending()


def _check_mixed(loss: torch.Tensor) -> None:
    """A loss that requires grad and carries a forward tangent is differentiated in both modes at once: a
    backward pass gives its gradients tangents that are second derivatives (the mixed ones through a hooked
    term whose own tangent is 0 too: a cost's tangent under an order-1 node's detached cost), and a gradient
    of its tangent passes no hook. Where an order-1 refusal was hooked, refuse now. Under one torch.func
    transform, likewise a loss that requires grad in the autograd outside it (see :func:`_refuse_twice`)."""
    mixed = _PENDING.mixed
    try:
        if not mixed:
            return
        if differentiating_transforms() == 1:
            # under one torch.func transform: a loss that requires grad outside it (a cost's parameter) makes the
            # outer gradient of the transform's result a mixed second derivative through the hooked terms
            if outer_requires_grad(loss):
                raise OrderError(mixed[0]() + FUNCTORCH_OVER_OUTER)
        elif loss.requires_grad and has_tangent(loss):
            raise OrderError(mixed[0]() + FORWARD_OVER_REVERSE)
    finally:
        mixed.clear()


_AGAIN = ("differentiating the order-1 surrogate (storch.surrogate_loss(), storch.backward()) again, after a "
          "backward pass with create_graph=True (torch.autograd.grad(..., create_graph=True), "
          "torch.autograd.functional.hessian / hvp, loss.backward(create_graph=True), nested torch.func "
          "transforms), may give a silently biased higher derivative. For derivatives of order n build "
          "storch.surrogate_loss(order=n), which checks every node and names the estimators unbiased at that "
          "order; if create_graph=True was incidental (only the first derivative is used), pass "
          "create_graph=False or detach the first derivative; if what is differentiated afterwards depends on "
          "the first derivative only linearly through this term (GradNorm's loss weights, learning-to-reweight's "
          "example weights: no second derivative of the storch term is taken), or it is an estimator's own update "
          "(training a learned part on the gradient's variance), run the create_graph pass inside "
          "`with storch.extending.estimator_create_graph():`. torch.autograd.functional.jvp computes its first "
          "derivative this way (a create_graph=True backward pass, then a second one w.r.t. its dummy "
          "grad_outputs), which the guard cannot tell from a second derivative at the first pass: use "
          "torch.func.jvp(f, (x.detach(),), (v,)) (forward mode) for a Jacobian-vector product")


def _again(order: int) -> str:
    """What to do instead of differentiating the order-``order`` surrogate more than ``order`` times."""
    if order < 2:
        return _AGAIN
    return (f"differentiating the order-{order} surrogate (storch.surrogate_loss(order={order})) more than {order} "
            f"times (a backward pass with create_graph=True after {order - 1} such pass(es): "
            "torch.autograd.grad(..., create_graph=True), loss.backward(create_graph=True), "
            f"torch.autograd.functional.hessian of a derivative, nested torch.func transforms) gives a silently "
            f"biased derivative of order {order + 1}. For derivatives of order k build storch.surrogate_loss(order=k) "
            "with k the number of derivatives you take, which checks every node and names the estimators unbiased at "
            f"that order (here it refuses order {order + 1}); if the last create_graph=True was incidental (only the "
            f"derivative of order {order} is used), pass create_graph=False or detach it. "
            "torch.autograd.functional.hvp (and hessian(..., create_graph=True)) build an order-2 product with such a "
            "pass: use torch.autograd.functional.vhp (the Hessian is symmetric) or hessian(...) @ v instead")
