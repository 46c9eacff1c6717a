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

Forward mode (``torch.autograd.forward_ad``) together with reverse mode: a backward pass whose inputs
carry forward tangents gives its gradients tangents, the second derivatives (forward-over-reverse
Hessian-vector products), with grad mode off; a gradient of a tangent (reverse-over-forward) passes no
hook. ``storch.surrogate.refusals._refuse_twice`` refuses at once a hooked tensor that both requires grad and carries
a tangent, and an order-1 surrogate whose loss does; the hook refuses a pass whose incoming gradient carries
a tangent, and every pass through a tensor that carried one when it was hooked.

One ``torch.func`` transform that differentiates (``grad``, ``vjp``, ``jacrev``, ``jvp``) whose inputs, or
tensors it captures, require grad in the autograd outside it: its result (the gradient, the jvp's tangent)
requires grad there, and a ``torch.autograd.grad`` / ``.backward`` of it is a second derivative (reverse
over the transform) that passes no hook (the transform's own pass runs its hooks with grad mode on, so they
are not registered there). :func:`outer_requires_grad` reads, under the transform's wrappers, whether a term
takes part in that outer autograd; ``storch.surrogate.refusals._refuse_twice`` refuses such a term when the surrogate
is built (:data:`FUNCTORCH_OVER_OUTER` says what to do), and the surrogate refuses a loss that does where a
differentiated order-1 term was found (a mixed second derivative through a detached cost).

An order-n surrogate (n >= 2) differentiated more than n times: where ``surrogate_loss(order=n+1)`` would refuse a
term (an estimator or node with max_order n, an operation whose derivative of order n jumps on a pathwise path,
a log p whose derivative of order n jumps), the (n+1)-th derivative through it is biased. Its tensors are hooked
with :class:`_Count`, which counts the passes: a create_graph pass that reaches the hooked tensor returns its
gradient through :class:`_Depth` (depth 1), anchored on the hooked tensor so that the next pass, which
differentiates that gradient in the parameters, runs ``_Depth``'s backward whether or not the gradient itself
carries a graph; there, at depth d, the pass is the (d+1)-th: a create_graph one is refused at d + 1 = n, and
below that hands the anchor a zero gradient through a ``_Depth`` of depth d + 1. A tensor reached in a later pass
again (a saved input of a backward) is marked at depth 1 there: a depth is never more than the pass's number, and
the chain of exact depths reaches every pass that differentiates through the hooked tensor. A plain backward pass
(grad mode off) marks nothing: its cost is the hook's grad-mode read, as at order 1.

``torch.func.vmap`` (no differentiating transform): a batched tensor reports ``requires_grad=False`` and has no
``grad_fn`` although the tensor it batches takes part in the autograd outside vmap, which a Hessian of the
vmapped function differentiates twice: the refusal is hooked on, and the kink walk reads, that tensor
(:func:`unbatched`).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as _fwAD

from ..errors import OrderError

__all__ = ["estimator_create_graph", "estimator_own_pass", "in_estimator_own_pass", "refuse_create_graph", "differentiating_transforms", "is_differentiated",
           "has_tangent", "forward_level_open", "outer_requires_grad", "FORWARD_OVER_REVERSE",
           "FUNCTORCH_OVER_OUTER", "unbatched", "CountedRefusal", "keep_counted_view"]

_graph_task_id = torch._C._current_graph_task_id  # -1 outside a backward pass


class _PassScope:
    """Which autograd passes are an estimator's own (one scope for :func:`estimator_create_graph`, one for
    :func:`estimator_own_pass`), never a process-wide switch: another thread's pass, while one thread is in
    such a block, is the user's and runs its hooks and refusals as always.

    A pass is the scope's when the thread that runs the hook is inside the block (a CPU backward runs its
    hooks in the thread that started it), or when it is an autograd graph task that a block marked: the
    block's marker (``own(t)``) passes its outputs through :class:`_Mark`, whose backward runs first in a
    pass from them and records the pass's graph task id; the hooks a CUDA backward runs in the autograd
    engine's device threads read that id (``torch._C._current_graph_task_id()``)."""

    __slots__ = ("local", "tasks", "kind", "blocks")

    def __init__(self, kind: str) -> None:
        self.local = threading.local()
        self.tasks: dict[int, int] = {}  # graph task id -> how many open blocks marked it
        self.kind = kind
        self.blocks = [0]  # open blocks in all threads (only for the hint of a refusal: never a switch)

    def active(self) -> bool:
        if getattr(self.local, "depth", 0):
            return True
        return bool(self.tasks) and _graph_task_id() in self.tasks

    @contextlib.contextmanager
    def block(self) -> Iterator["_Marker"]:
        marker = _Marker(self)
        self.local.depth = getattr(self.local, "depth", 0) + 1
        self.blocks[0] += 1
        try:
            yield marker
        finally:
            self.blocks[0] -= 1
            self.local.depth -= 1
            marker.close()

    def hint(self) -> str:
        """What a refusal adds while a block is open in some thread (a pass it does not cover is refused)."""
        if not self.blocks[0]:
            return ""
        return (f". (A `with storch.extending.{self.kind}():` block is open, but this pass is not its own: it was "
                "started by another thread, or its hooks run in the autograd engine's threads (a CUDA backward). An "
                f"estimator's own pass starts from outputs marked with the block's marker: `with {self.kind}() as "
                "own: torch.autograd.grad(own(loss), ..., create_graph=True)`)")


class _Marker:
    """``own(t)``: ``t`` (a tensor, or a list / tuple of them) unchanged in value, marked so that every
    autograd pass from it while the block is open is the block's, in whichever thread the engine runs it."""

    __slots__ = ("scope", "recorded", "open")

    def __init__(self, scope: _PassScope) -> None:
        self.scope = scope
        self.recorded: list[int] = []
        self.open = True

    def __call__(self, t: Any) -> Any:
        if isinstance(t, (list, tuple)):
            return type(t)(self(x) for x in t)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            return _Mark.apply(t, self)
        return t

    def record(self) -> None:
        task = _graph_task_id()
        if self.open and task >= 0:
            tasks = self.scope.tasks
            tasks[task] = tasks.get(task, 0) + 1
            self.recorded.append(task)

    def close(self) -> None:
        self.open = False
        tasks = self.scope.tasks
        for task in self.recorded:
            left = tasks.get(task, 0) - 1
            if left > 0:
                tasks[task] = left
            else:
                tasks.pop(task, None)
        self.recorded.clear()


class _Mark(torch.autograd.Function):
    """The identity; its backward (the first node a pass from its output runs) records the pass as the
    marker's block's own."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, marker: _Marker):
        ctx.marker = marker
        return t.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.marker.record()
        return grad, None


_OWN = _PassScope("estimator_create_graph")
_OWN_PASS = _PassScope("estimator_own_pass")


def estimator_create_graph() -> contextlib.AbstractContextManager[_Marker]:
    """The ``create_graph=True`` passes in this block are an estimator's own (training its learned parts on
    the variance of the gradient, in ``update_parameters``), not a user's higher derivative of an order-1
    surrogate: the order-1 surrogate's refusal (see :func:`storch.surrogate_loss`) lets them through.

    A user's pass may run in it too when what is differentiated afterwards depends on the first derivative
    only linearly through the storch term (GradNorm differentiates ‖w ∇L‖ in the loss weight w;
    learning-to-reweight, in per-example weights): no second derivative of the surrogate is taken, so the
    order-1 estimators and kinks it would refuse are unbiased there.

    Only this thread's passes are let through (another thread's create_graph pass is refused as always), and
    of those the passes that run their hooks in this thread: a CPU backward does. A CUDA backward runs them in
    the autograd engine's device threads: mark the outputs the pass starts from with the block's marker,
    ``with estimator_create_graph() as own: torch.autograd.grad(own(loss), ..., create_graph=True)`` (``own``
    returns its tensor, or list of tensors, unchanged in value; a pass from a marked output while the block is
    open is its own in any thread). An unmarked CUDA pass is refused (``storch.OrderError``), never let
    through silently."""
    return _OWN.block()


def estimator_own_pass() -> contextlib.AbstractContextManager[_Marker]:
    """The autograd passes in this block differentiate an estimator's own objective, not the loss: the gradient
    of Σ ĝ² in the control variate's parameters φ (RELAX, REBAR, LAX's variance-minimising update), or a control
    variate's own derivative of the cost (MuProp's ∇f(x̄) at an evaluation-only entry). A user's
    gradient hook on a plate tensor (``register_hook``) is not run in them: it changes the loss's gradient, and
    what flows through the hooked tensor here is ∂(Σ ĝ²)/∂(tensor). (It runs in the loss's backward pass, and
    in the update's ``torch.autograd.grad(loss, ..., create_graph=True)`` that computes ĝ, so that the control
    variate is trained on the variance of the gradient the parameters get.)

    Only this thread's passes are affected: another thread's backward pass meanwhile runs the user's hooks as
    always. A CPU backward runs its hooks in the thread that started it; a CUDA backward runs them in the
    autograd engine's device threads, so mark the objective the pass starts from with the block's marker:
    ``with estimator_own_pass() as own: torch.autograd.grad(own(objective), params)`` (``own`` returns its
    tensor, or list of tensors, unchanged in value). In an unmarked CUDA pass the user's hooks run."""
    return _OWN_PASS.block()


def in_estimator_own_pass() -> bool:
    """Whether the running autograd pass (or this thread, outside one) is in an :func:`estimator_own_pass`
    block: a pass this thread started in the block, or one from an output its marker marked."""
    return _OWN_PASS.active()


def forward_level_open() -> bool:
    """Whether a forward-AD level is open (``torch.autograd.forward_ad.dual_level``, ``torch.func.jvp``)."""
    return _fwAD._current_level >= 0


def has_tangent(t: torch.Tensor) -> bool:
    """Whether ``t`` carries a forward-mode tangent (a dual tensor of ``torch.autograd.forward_ad``, an input
    of ``torch.func.jvp`` / ``jacfwd`` or a tensor computed from one), looking through ``torch.func.vmap``'s
    batching. ``False`` at once (one attribute read) where no forward-AD level is open."""
    if _fwAD._current_level < 0:  # torch.func.jvp opens one too
        return False
    return _fwAD.unpack_dual(unbatched(t)).tangent is not None  # unpack_dual has no batching rule


def unbatched(t: Any) -> Any:
    """``t`` under ``torch.func.vmap``'s batching (itself outside vmap, or where it is no tensor). Inside vmap
    a batched tensor reports ``requires_grad=False`` and has no ``grad_fn`` even where the tensor it batches
    takes part in the autograd outside vmap (``vmap(f)(mu)`` of a ``mu`` that requires grad): that tensor is
    the one a backward pass outside vmap reaches, so it is the one to hook and to walk."""
    if isinstance(t, torch.Tensor):
        functorch = torch._C._functorch
        while functorch.is_batchedtensor(t):
            t = functorch.get_unwrapped(t)
    return t


def is_differentiated(t: torch.Tensor) -> bool:
    """Whether ``t`` is being differentiated: it requires grad (reverse mode, ``torch.func.grad`` /
    ``vjp`` / ``jacrev``) or carries a forward-mode tangent (``torch.autograd.forward_ad``,
    ``torch.func.jvp`` / ``jacfwd``, whose inputs do not require grad). The test to use where a term is
    built or a check runs only for differentiated tensors: ``requires_grad`` alone reads a forward-mode
    input as a constant. The cost of a reverse-mode call is the ``requires_grad`` read."""
    return t.requires_grad or has_tangent(t)


class _Refuse:
    """A tensor hook that raises OrderError in a backward pass that builds a graph (``create_graph=True``)
    or whose gradients carry forward tangents (forward-over-reverse; ``always``: the hooked tensor carried a
    tangent, so every backward pass through it does). The message is built only when it is raised (the
    hook is registered at every step). ``check``: called last with the gradient (storch.compile's refusal of a
    batched backward pass through an inductor program, in the same hook: one hook per output and call)."""

    __slots__ = ("message", "always", "check")

    def __init__(self, message: Callable[[], str], always: bool = False,
                 check: Optional[Callable[[torch.Tensor], None]] = None) -> None:
        self.message = message
        self.always = always
        self.check = check

    def __call__(self, grad: torch.Tensor) -> None:
        if _OWN.active():
            return
        if torch.is_grad_enabled():
            raise OrderError(self.message() + _OWN.hint())
        if (self.always and _fwAD._current_level >= 0) or has_tangent(grad):
            raise OrderError(self.message() + FORWARD_OVER_REVERSE)
        if self.check is not None:
            self.check(grad)


FORWARD_OVER_REVERSE = (". Here the order-1 surrogate is differentiated in reverse mode over forward-mode tangents (a "
            "torch.autograd.forward_ad dual that requires grad, or a backward pass inside torch.func.jvp): the "
            "tangents of its gradients are second derivatives (forward-over-reverse), and a gradient of a tangent is "
            "one too. For first derivatives differentiate in one mode only: hand the other the primal "
            "(torch.autograd.forward_ad.unpack_dual(x).primal) or a detached tensor")


FUNCTORCH_OVER_OUTER = (". Here the order-1 surrogate is built inside a torch.func transform that differentiates "
            "(torch.func.jvp, grad, vjp, jacrev) whose inputs, or tensors it captures, require grad outside it "
            "(e.g. the parameters of an nn.Module passed through torch.func.functional_call): the transform's result "
            "(the jvp's tangent, the gradient) requires grad too, and torch.autograd.grad / .backward of it is a "
            "second derivative (reverse mode over the transform) that nothing would refuse. For a first derivative "
            "pass detached tensors to the transform: torch.func.jvp(f, (p.detach(),), (v,)), "
            "torch.func.grad(f)(p.detach()), {k: v.detach() for k, v in model.named_parameters()} with "
            "torch.func.functional_call; for a second derivative build storch.surrogate_loss(order=2) and nest "
            "torch.func transforms (torch.func.jacrev(torch.func.grad(f)))")


def outer_requires_grad(t: torch.Tensor) -> bool:
    """Whether ``t``, computed under ``torch.func`` transforms, takes part in the autograd outside them: the
    tensor under all its functorch wrappers (grad / jvp levels, vmap batching) requires grad (which it does
    only where grad mode is on outside: a transform runs the levels below it in their own grad mode)."""
    return unwrapped(t).requires_grad


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """``t`` under all its functorch wrappers (grad / jvp levels, vmap batching): the tensor of the autograd
    outside the transforms (``t`` itself outside them)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t) or functorch.is_batchedtensor(t):
        t = functorch.get_unwrapped(t)
    return t


class CountedRefusal:
    """The refusal of an order-``order`` surrogate (``order`` >= 2) differentiated more than ``order`` times: its
    message (called when raised) and the number of derivatives allowed. storch.compile's recorder keeps it as
    the refusal of a traced step, so that each replay's outputs are hooked with the counting hook."""

    __slots__ = ("message", "order")

    def __init__(self, message: Callable[[], str], order: int) -> None:
        self.message = message
        self.order = order

    def __call__(self) -> str:
        return self.message()


_UNCOUNTED = (". Here a backward pass with create_graph=True reached a term of the surrogate after the surrogate "
              "loss itself was freed: storch counts the derivatives taken of it with the tensors of its step, which "
              "live as long as the loss. Keep the tensor returned by storch.surrogate_loss(order=n) alive while you "
              "differentiate it")


class _Count:
    """A tensor hook of an order-``order`` surrogate's term (``order`` >= 2): in a create_graph pass, the gradient
    through :class:`_Depth` at depth 1 (the pass is at least the first), anchored on the hooked tensor, held
    weakly (the hook lives on the tensor's autograd node: a strong reference would be a cycle autograd never
    frees; the surrogate keeps its terms alive as long as its loss)."""

    __slots__ = ("refusal", "anchor")

    def __init__(self, refusal: CountedRefusal, tensor: torch.Tensor) -> None:
        self.refusal = refusal
        self.anchor = weakref.ref(tensor)

    def __call__(self, grad: torch.Tensor):
        if _OWN.active() or not torch.is_grad_enabled():
            return None  # a plain pass (forward-over-reverse: one derivative more than the passes, <= 2 here)
        anchor = self.anchor()
        if anchor is None:
            raise OrderError(self.refusal() + _UNCOUNTED)
        return _Depth.apply(grad, anchor, 1, self.refusal)


class _Depth(torch.autograd.Function):
    """The identity on a gradient computed by the ``depth``-th create_graph pass through a hooked term, with an
    edge to the hooked tensor (``anchor``) that makes the next pass run this backward: that pass is at least the
    (depth + 1)-th. Differentiated with create_graph=True at depth + 1 = order it refuses; below, it hands the
    anchor a zero gradient through a ``_Depth`` one deeper, which the pass after it runs."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, anchor: torch.Tensor, depth: int, refusal: CountedRefusal):
        ctx.depth, ctx.refusal = depth, refusal
        ctx.save_for_backward(anchor)
        return grad.clone()  # (a new tensor: the engine may accumulate into what a hook returned)

    @staticmethod
    def backward(ctx, out: torch.Tensor):
        refusal, depth = ctx.refusal, ctx.depth
        grad = out if ctx.needs_input_grad[0] else None
        if _OWN.active():
            return grad, None, None, None
        building = torch.is_grad_enabled()
        if depth + 1 >= refusal.order:
            if building:
                raise OrderError(refusal() + _OWN.hint())
            if has_tangent(out):  # forward over this reverse pass: one derivative more
                raise OrderError(refusal() + FORWARD_OVER_REVERSE)
        if not building:
            return grad, None, None, None
        anchor, = ctx.saved_tensors
        zero = torch.zeros((), dtype=anchor.dtype, device=anchor.device).expand(anchor.shape)
        return grad, _Depth.apply(zero, anchor, depth + 1, refusal), None, None


def refuse_create_graph(tensor, message: Callable[[], str], order: int = 1,
                        check: Optional[Callable[[torch.Tensor], None]] = None) -> None:
    """Hook ``tensor`` (if it carries gradient) to raise ``OrderError(message())`` when a backward pass with
    ``create_graph=True``, or one over forward tangents, reaches it; for an order-``order`` surrogate
    (``order`` >= 2, or a :class:`CountedRefusal`), the ``order``-th create_graph pass through it (the one that
    builds the graph of an (order + 1)-th derivative). ``check`` (order 1 only): see :class:`_Refuse`."""
    if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
        if isinstance(message, CountedRefusal):
            order = message.order
        if order <= 1:
            tensor.register_hook(_Refuse(message, has_tangent(tensor), check))
        else:
            refusal = message if isinstance(message, CountedRefusal) else CountedRefusal(message, order)
            tensor.register_hook(_Count(refusal, tensor))


def differentiating_transforms() -> int:
    """How many ``torch.func`` transforms that differentiate (grad, vjp/jacrev, jvp/jacfwd) are active
    (0 outside torch.func)."""
    if torch._C._functorch.maybe_current_level() is None:
        return 0
    stack = torch._C._functorch.get_interpreter_stack() or []
    kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
    return sum(1 for i in stack if i.key() in kinds)


def keep_counted_view(tensor, refusal: CountedRefusal):
    """``tensor`` hooked with the counting refusal of an order-n surrogate (n >= 2), returned as a view whose
    autograd node holds it in its metadata: the hook holds its tensor weakly, and the view's node (downstream of
    ``tensor``: no cycle) lives as long as any result computed from it, also when the view itself is a temporary.
    A tensor that does not require grad is returned as it is."""
    if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
        return tensor
    refuse_create_graph(tensor, refusal)
    view = tensor.view_as(tensor)
    view.grad_fn.metadata["storch_counted"] = tensor
    return view
