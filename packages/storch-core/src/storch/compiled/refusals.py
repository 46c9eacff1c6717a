"""What a compiled step may not do, and how it is told: the step's name in every message, the refusal of a
second differentiation hooked on a replayed call's outputs (and the message of a compiler backend's, whose
program cannot be differentiated twice), the refusal of an update that needs autograd's graph under a
compiler, of a backward pass run inside the trace (naming the estimator component that ran it), and of a
call of a DistributedDataParallel (or FSDP) module or of a module with a backward hook inside the trace, and the
messages of an optimizer's step, a gradient's read or write or a tensor's gradient hook in the trace, and of an
estimator with state created inside the step.

The bottom of :mod:`storch.compiled`: it imports nothing of the package."""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any, Callable, Optional

import torch

from ..errors import StorchError
from ..estimators.base import Estimator
from ..conditions.order_guard import CountedRefusal, keep_counted_view, refuse_create_graph
from ..conditions.smoothness import inspecting_saved


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def _replay_only_message(est) -> str:
    return (f"storch.compile can replay estimator {est.name!r} (plate {est.plate!r}) only without a compiler: its "
            "update differentiates the loss again (e.g. a control variate trained on the gradient's variance), "
            "which needs the program's operations in autograd's graph, and a compiled program is one autograd "
            "node. Use storch.compile(step, backend=None), or run the step eagerly")


class _CompiledRefusal:
    """The refusal hooked on every output of a compiler backend's program (see :func:`_compiled_twice_message`):
    called, its message; ``check``, for inductor, the refusal of a batched backward pass (:func:`_batched_check`),
    run in the same hook (storch.conditions.order_guard's ``check``)."""

    __slots__ = ("message", "check")

    def __init__(self, message: Callable[[], str], check: Optional[Callable[[torch.Tensor], None]]) -> None:
        self.message = message
        self.check = check

    def __call__(self) -> str:
        return self.message()


def _batched_backward_message(fn) -> str:
    return (f"{_name(fn)}, compiled by storch.compile with inductor, is differentiated with batched gradients (a "
            "vmapped backward pass: torch.autograd.functional.jacobian(..., vectorize=True), "
            "torch.autograd.grad(..., is_grads_batched=True), torch.func.vmap over torch.autograd.grad): inductor's "
            "compiled backward runs on plain tensors, not on vmap's batched ones (torch's \"Cannot access data "
            "pointer of Tensor that doesn't have storage\"). Pass vectorize=False (or is_grads_batched=False: a "
            "backward pass per row of the Jacobian), or use storch.compile(step, backend=None), whose replay runs the "
            "traced operations through autograd (vectorized there), or run the step eagerly")


def _batched_check(fn) -> Callable[[torch.Tensor], None]:
    """The check of a gradient reaching an output of an inductor program: a batched one (torch's legacy vmap of
    ``jacobian(vectorize=True)`` and ``is_grads_batched``, or torch.func.vmap's) is refused, before inductor's
    backward fails on it with a raw RuntimeError. (backend=None runs the backward as torch operations, which vmap
    batches: the Jacobian is eager's; so does aot_eager, for torch's legacy vmap only.)"""
    functorch = torch._C._functorch

    def check(grad: Optional[torch.Tensor]) -> None:
        # (None: an output whose gradient autograd left undefined, e.g. an annealed step's output the loss does not use)
        if grad is not None and (functorch.is_legacy_batchedtensor(grad) or functorch.is_batchedtensor(grad)):
            raise StorchError(_batched_backward_message(fn))
    return check


def _compiled_twice_message(fn, eager: Optional[Callable[[], str]], inductor: bool = False) -> _CompiledRefusal:
    """The refusal hooked on every output of a compiler backend's program (see :func:`_refuse_twice`): torch's
    compiled program is one autograd node that cannot be differentiated twice, and
    ``torch.autograd.functional.hessian`` of it gave zeros silently (its second pass found no graph; a
    grad-of-grad and ``hvp`` raised torch's "does not currently support double backward"). ``eager``: the
    traced step's own refusal (an order-1 estimator, a kink), which ``backend=None`` keeps."""
    def message() -> str:
        text = (f"{_name(fn)}, compiled by storch.compile with a compiler backend, is differentiated again (a backward "
                "pass with create_graph=True: torch.autograd.grad(..., create_graph=True), "
                "torch.autograd.functional.hessian / hvp / vhp / jacobian(create_graph=True)): torch's compiled "
                "programs cannot be differentiated twice (torch.autograd.functional.hessian returns zeros). For "
                "higher derivatives use storch.compile(step, backend=None), whose replay runs the traced operations "
                "through autograd (return storch.surrogate_loss(order=n) from the step for derivatives of order n), "
                "or run the step eagerly")
        return text if eager is None else f"{text}. Besides, {eager()}"
    return _CompiledRefusal(message, _batched_check(fn) if inductor else None)


class CompilerError(StorchError, RuntimeError):
    """torch's compiler (dynamo, AOT autograd, inductor, a custom backend) failed on the program storch traced from a
    step: a StorchError that still is a RuntimeError (torch's errors were), raised from torch's."""


def _compiler_failure(exc: BaseException, fn, backend: Any) -> Optional[CompilerError]:
    """storch's error for a failure of the compiler backend on the traced program, or None (not one).

    torch raises the compiler's failures as exceptions of ``torch._dynamo`` or ``torch._inductor``, and what it says
    first can hide what happened: a RuntimeError of a kernel while dynamo traced the program ("view size is not
    compatible with input tensor's size and stride", from an index whose raw sample was a transposed view) came
    out as dynamo's "Attempt to trace generator", re-raised with the RuntimeError's context suppressed (Python's
    traceback did not show it). The error names the
    step and the backend, says the failure is the compiler's on a plain torch program (storch's checks passed:
    the trace and its replay ran), gives each exception of the chain, and what to do: ``backend=None`` (the
    program run as recorded, no compiler), another backend, or the eager step. ``InvalidBackend`` (a backend name
    torch does not know) is left as torch says it."""
    module = type(exc).__module__
    if not module.startswith(("torch._dynamo", "torch._inductor")) or type(exc).__name__ == "InvalidBackend":
        return None
    chain, seen = [], set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen and len(chain) < 4:
        seen.add(id(e))
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        kind = type(e).__qualname__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__qualname__}"
        chain.append(f"{kind}: {first}")
        e = e.__cause__ or e.__context__  # (the context too where torch suppressed it: dynamo re-raises `from None`)
    said = (chain[0] + "".join(f"; caused by {c}" for c in chain[1:])).rstrip(".")
    if "view size is not compatible" in said:  # (the compiler predicted another layout than the kernel gave)
        said += (" (a view of a tensor whose strides the compiler predicted otherwise: an index or a value with a "
                 "transposed layout, e.g. taken from `.t()` or `.mT`; `.contiguous()` it before indexing)")
    short = getattr(fn, "__name__", None) or "step"
    return CompilerError(
        f"storch.compile({_name(fn)}, backend={backend!r}): torch's compiler failed on the program storch traced from "
        f"{_name(fn)} (plain torch operations, which ran as recorded in storch's replay check: "
        f"storch.compile(...).graph_module(*args) shows them), so it is this backend that cannot compile the step, "
        f"not storch that refuses it. torch said: {said}. Use storch.compile({short}, backend=None), which runs "
        "the traced program as recorded without a compiler (storch's per-call cost gone, torch's eager kernels), or "
        "another backend (the default, 'inductor'; 'aot_eager' runs eager kernels on the layouts the compiler "
        "predicted), or call the step eagerly")


def _refuse_twice(outs, message: Callable[[], str]) -> Any:
    """Hook a replayed call's outputs (the surrogate loss) with the traced step's refusal of a second
    differentiation (storch.conditions.order_guard): a backward pass with ``create_graph=True`` through them raises
    storch's OrderError, as the eager step's hooks on the terms inside do (outside
    ``estimator_create_graph``). With a compiler backend the program is one autograd node whose outputs
    cannot be differentiated twice anyway (torch said only that a tensor "appears to not have been used
    in the graph"), so the error says what was wrong there too."""
    if not isinstance(message, CountedRefusal):
        check = message.check if isinstance(message, _CompiledRefusal) else None
        for o in outs:
            if o.grad_fn is not None:  # (an input returned as it is holds no term: hooked, it got a hook per call)
                refuse_create_graph(o, message, check=check)
        return outs
    # an order-n refusal (n >= 2) counts the passes with a hook that holds its tensor weakly: the caller gets a
    # view of each hooked output whose autograd node keeps it (a result used in an expression, `step(x) + reg`,
    # would free it otherwise; a review found that refused)
    views: dict[int, Any] = {}  # (one view per output tensor: a step returning (loss, loss) keeps the identity)
    return [views[id(o)] if id(o) in views else views.setdefault(id(o), keep_counted_view(o, message)) for o in outs]


def _func_transform_message(fn, component: Optional[str] = None) -> str:
    """The refusal of a ``torch.func`` transform (grad, vjp, jacrev, hessian...) run inside the trace: torch
    refuses it under the trace's saved-tensor hooks (:func:`_no_backward_in_trace`) with a RuntimeError that
    names neither the step nor the component, nor what to do."""
    where = component if component is not None else "the step"
    todo = ("compute that derivative in closed form (with torch operations only: storch.compile traces those), "
            "e.g. the score x - sigmoid(logits) of a Bernoulli, or run this step eagerly (without storch.compile)"
            if component is not None else
            "return the loss and differentiate the compiled step's result outside it, or run this step eagerly "
            "(without storch.compile)")
    return (f"storch.compile cannot trace {_name(fn)}: {where} calls a torch.func transform that differentiates "
            "backwards (torch.func.grad, vjp, jacrev or hessian) inside the step. storch.compile "
            "records the step's forward program and refuses a differentiation inside it (torch.autograd.grad, "
            ".backward(), torch.func), whose saved tensors would be fixed to the first call's values. To compile "
            f"this step, {todo}.")


# how the refusal below names a torch.func transform opened inside the step (by its functorch interpreter's kind)
_TRANSFORM_NAMES = {"Vmap": "torch.func.vmap (or torch.vmap, or jacfwd or hessian, which run under it)",
                    "Jvp": "torch.func.jvp (or jacfwd, linearize)", "Grad": "torch.func.grad (or vjp, jacrev)",
                    "Functionalize": "torch.func.functionalize"}


def _transform_in_step_message(fn, kind: str) -> str:
    """The refusal of a ``torch.func`` transform opened inside the step (seen by :class:`_TraceMode` at the first
    torch call under it). ``make_fx(pre_dispatch=True)`` records above functorch: under the transform it sees
    the transform's wrappers (vmap's batched tensors), not tensors of the program, and bakes them in as
    constants cut off from the step's arguments. That was refused only by the check that the program captures
    no tensor requiring grad, as "a tensor ... that is neither an argument nor an nn.Parameter" (a reviewer found
    it misleading: the tensor came from an argument), and where nothing required grad the replay check failed
    with functorch's "your tensor may have escaped" error."""
    name = _TRANSFORM_NAMES.get(kind, f"a torch.func transform ({kind})")
    return (f"storch.compile cannot trace {_name(fn)}: it calls {name} inside the step. storch.compile's trace "
            "records the step's torch operations above torch.func's transforms, so it cannot see through one: the "
            "transform's inputs and results would be fixed into the program as the traced call's values, cut off "
            "from the step's arguments and parameters (no gradient would reach them). Write that part without the "
            "transform (torch operations broadcast over leading dims: call the function on the whole batch, or "
            "loop over the entries and torch.stack the results; a derivative in closed form with torch "
            "operations), or run this step eagerly (without storch.compile). storch's own plate operations "
            "need no torch.func: they are compiled as usual")


def _dual_level_in_step_message(fn) -> str:
    """The refusal of forward mode opened inside the step without torch.func (``with
    torch.autograd.forward_ad.dual_level(): make_dual ... unpack_dual``; seen by :class:`_TraceMode` at the first
    torch call in the level): the trace records ``make_dual`` and ``unpack_dual`` with the level's index, not the
    level's opening and closing, so the replay check ran a program whose level did not exist and torch raised its
    raw "Trying to access a forward AD level with an invalid index" (both backends)."""
    return (f"storch.compile cannot trace {_name(fn)}: it opens torch.autograd.forward_ad.dual_level inside the step "
            "(forward mode: make_dual, unpack_dual). A trace records the step's torch operations, not the dual level "
            "opened around them, so the program would make duals at a level that does not exist when it runs (torch's "
            "\"invalid forward AD level\" at every call). Compute that derivative outside the compiled step (run the "
            "forward-mode part eagerly and pass its tangent to the compiled step as a tensor argument), or in closed "
            "form with torch operations (e.g. the derivative of sin(x) along v as cos(x) * v), or run this step "
            "eagerly (without storch.compile)")


def _transform_around_step_message(fn) -> str:
    """The refusal of a compiled step called inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``... around
    it; checked at every call, one C call: :meth:`CompiledStep.__call__`). The trace would see the transform's
    wrappers, not the arguments, and a replay runs a program whose storch hooks (the refused second
    differentiation, the finite check, the replayed estimator update) are plain autograd: torch.func.grad around a
    first call was refused with the message for a transform *inside* the step, and vmap around any call failed in the
    replay check with torch's raw "vmap over torch.allclose isn't supported yet". Forward mode opened without
    torch.func (``torch.autograd.forward_ad.dual_level``, no functorch level) is refused too: with inductor a replay
    returned a result without the dual argument's tangent (unpack_dual(...).tangent None), silently."""
    stack = torch._C._functorch.get_interpreter_stack() or []
    kind = stack[-1].key().name if stack else "unknown"  # the innermost transform: the one the step is called in
    name = (_TRANSFORM_NAMES.get(kind, f"a torch.func transform ({kind})") if stack else
            "torch.autograd.forward_ad.dual_level (forward mode: make_dual)")
    return (f"storch.compile cannot run {_name(fn)} under {name}: the transform is around the compiled step (the "
            "compiled step is called inside it). A compiled step replays a program traced on plain tensors, with "
            "storch's checks and estimator updates hooked onto its results by autograd; under a transform its "
            "trace and replays would see the transform's wrapped tensors, not the step's arguments. Call the step "
            "eagerly under the transform (the uncompiled function, the compiled step's `.fn`: storch runs under "
            "torch.func transforms eagerly), or differentiate the compiled step's result with torch.autograd "
            "outside the transform (`loss = compiled(x)`, then `loss.backward()` or `torch.autograd.grad(loss, "
            "inputs)`); for a batch, pass it whole instead of vmapping the step, its batch dim named as a plate "
            "(`storch.denote_independent(x, 0, \"data\")`)")


def _backward_message(fn, component: Optional[str] = None) -> str:
    if component is not None:
        # the backward pass runs inside an estimator's component, not in the user's code
        return (f"storch.compile cannot trace {_name(fn)}: {component} differentiates (torch.autograd.grad or "
                ".backward()) inside the step. The trace records the forward program only; the saved tensors that "
                "backward pass reads would be fixed to the first call's values, so an estimator component that "
                "differentiates cannot be compiled. Run this step eagerly (without storch.compile), or use an "
                "estimator whose components compute that derivative without autograd.")
    return (f"storch.compile cannot trace {_name(fn)}: it differentiates inside the step (torch.autograd.grad or "
            ".backward() on something the step computed: a gradient penalty, a lookahead step, a learned control "
            "variate's update). The trace records the forward program only; the saved tensors that backward pass "
            "reads would be fixed to the first call's values. Return the loss and differentiate the compiled "
            "step's result outside it, or run this step eagerly.")


def _estimator_component(frame) -> Optional[str]:
    """The innermost estimator method on the stack from ``frame`` outwards, described
    (``"the control_variate of estimator 'x' (X)"``), or ``None`` when no estimator code is running."""
    while frame is not None:
        est = frame.f_locals.get("self")
        if isinstance(est, Estimator):
            return f"the {frame.f_code.co_name} of estimator {est.name!r} ({type(est).__qualname__})"
        frame = frame.f_back
    return None


def _traceback_component(tb) -> Optional[str]:
    """The innermost estimator method among a traceback's frames, described as by
    :func:`_estimator_component`. The frames are read from the traceback, innermost first, not through
    ``f_back``: a frame that has returned (a context manager's ``__enter__`` that raised) has no ``f_back``."""
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        est = frame.f_locals.get("self")
        if isinstance(est, Estimator):
            return f"the {frame.f_code.co_name} of estimator {est.name!r} ({type(est).__qualname__})"
    return None


# the functions that read a Binomial's total_count as a Python number to enumerate its support: torch's
# enumerate_support, and storch's check that the count is one number (unordered_set's, sum_and_sample's) and its
# support of a count per entry (expect's): named by their code (their argument is `self` or `d`)
_READS_TOTAL_COUNT = frozenset(("enumerate_support", "_count_varies", "enumeration_support"))


def _binomial_support_message(fn, tb) -> Optional[str]:
    """The refusal of a trace that failed where a Binomial's support was enumerated (``storch.expect``,
    ``unordered_set`` or ``sum_and_sample`` on a Binomial node), or ``None`` where no frame of the traceback is
    one: torch sizes the support 0..n by reading ``total_count`` as a Python number, which the generic "reads a
    tensor's value" refusal does not explain (found by a tester)."""
    frames, t = [], tb
    while t is not None:
        frames.append(t.tb_frame)
        t = t.tb_next
    if not any(f.f_code.co_name in _READS_TOTAL_COUNT
               and isinstance(f.f_locals.get("self", f.f_locals.get("d")), torch.distributions.Binomial) for f in frames):
        return None
    who = _traceback_component(tb) or "an estimator"
    return (f"storch.compile cannot trace {_name(fn)}: {who} enumerates a Binomial node's support 0..n, which needs "
            "the total_count as a Python number (torch's Binomial.enumerate_support reads `int(total_count.max())`), "
            "and a trace cannot read a number from a tensor; backend=None traces the step too and fails alike. Run this step eagerly (call the step itself, not "
            "storch.compile(step)), or enumerate a Categorical over 0..n with the Binomial's probabilities, which "
            "traces: `k = torch.arange(n + 1.0)`, `logits = Binomial(n, probs=p).log_prob(k.view(-1, *[1] * "
            "p.dim())).movedim(0, -1)`, `z = est(Categorical(logits=logits)).to(p.dtype)` (z is the count, with "
            "the Binomial's law)")


def _no_backward_in_trace(fn):
    """Saved-tensor hooks for the trace: a backward pass run inside the step unpacks tensors that autograd
    saved in the forward pass, which ``make_fx(pre_dispatch=True)`` cannot connect to the program (they
    would become constants of the first call, or lose their graph): it is refused where it happens."""
    tracing_thread = threading.get_ident()  # autograd may run the hook on a device thread: read this one's stack

    def unpack(saved):
        if inspecting_saved():  # storch's smoothness walk reads a saved tensor's dtype or shape: no backward
            return saved
        raise StorchError(_backward_message(fn, _estimator_component(sys._current_frames().get(tracing_thread))))

    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack)


def _data_parallel_classes() -> tuple:
    """The wrappers whose forward sets up their gradient synchronisation outside the torch program: DDP, and the
    FSDP classes where ``torch.distributed.fsdp`` was imported (an FSDP module exists only then: nothing is
    imported here)."""
    classes: tuple = (torch.nn.parallel.DistributedDataParallel,)
    fsdp = sys.modules.get("torch.distributed.fsdp")
    for name in ("FullyShardedDataParallel", "FSDPModule"):
        cls = getattr(fsdp, name, None)
        if isinstance(cls, type):
            classes += (cls,)
    return classes


def _data_parallel_message(fn, module) -> str:
    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return (f"storch.compile cannot trace {_name(fn)}: it calls a DistributedDataParallel module, which "
                "averages the gradients over the ranks through hooks its forward arms at every call (DDP's reducer), "
                "outside the torch program. The trace records the wrapped module's operations only, so from the "
                "second call on the replayed gradients would not be averaged (each rank would train on its own "
                "gradient, silently), and a compiler backend cannot trace that forward at all. Call the wrapped "
                "module in the step (`ddp.module(x)`: DDP's constructor gave every rank the same parameters) and "
                "average the gradients yourself after `loss.backward()`: `for p in params: "
                "torch.distributed.all_reduce(p.grad); p.grad /= world_size` (storch's estimators keep their own "
                "state in sync, as eagerly); or run this step eagerly, without storch.compile")
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    kind = ("FullyShardedDataParallel module" if isinstance(fsdp1, type) and isinstance(module, fsdp1)
            else f"module sharded by fully_shard ({type(module).__name__})")
    return (f"storch.compile cannot trace {_name(fn)}: it calls a {kind}, which gathers its sharded parameters "
            "and reduces the gradients over the ranks in hooks around its forward and backward, outside the torch "
            "program that a trace records. Run this step eagerly, without storch.compile")


_TRACE_HOOKS: set = set()  # the ids of the global hooks of :func:`_no_data_parallel_in_trace` now registered


def _no_data_parallel_in_trace(fn, called: Optional[dict] = None):
    """A global forward pre-hook of modules, registered for the trace only (removed after it) and active on the
    tracing thread only: a call of a DDP or FSDP module is refused (see :func:`_data_parallel_message`). The
    hook, not the modules the step reaches by name: a step that reaches ``ddp`` but calls ``ddp.module`` is
    fine, and a DDP held by a plain object is called all the same. A call of a module with a backward hook is
    refused there too (:func:`_module_hook_message`). Each module called is recorded in ``called`` (by id: the
    modules whose hooks the trace ran, which ``guards._guard`` checks at each call). The hook's id is in
    ``_TRACE_HOOKS`` while registered (a guard of another thread's step ignores it)."""
    classes = _data_parallel_classes()
    tracing_thread = threading.get_ident()

    def refuse(module, args):
        if threading.get_ident() != tracing_thread:
            return
        if called is not None:
            called[id(module)] = module
        if isinstance(module, classes):
            raise StorchError(_data_parallel_message(fn, module))
        hooks = _backward_hooks_of(module)
        if hooks:
            raise StorchError(_module_hook_message(fn, module, hooks))

    @contextlib.contextmanager
    def hooked():
        handle = torch.nn.modules.module.register_module_forward_pre_hook(refuse)
        _TRACE_HOOKS.add(handle.id)
        try:
            yield
        finally:
            handle.remove()
            _TRACE_HOOKS.discard(handle.id)

    return hooked()


def _backward_hooks_of(module) -> str:
    """The backward hooks a call of ``module`` would run, in the words of a message ('' if none): its own
    (``register_full_backward_hook``, ``register_full_backward_pre_hook``, the deprecated
    ``register_backward_hook``) and torch's global ones (``register_module_full_backward_hook``...)."""
    from torch.nn.modules import module as torch_module

    names = []
    own = getattr(module, "_backward_hooks", None) or {}
    full = getattr(module, "_is_full_backward_hook", None)
    if own and full is not False:
        names.append("register_full_backward_hook")
    if own and full is False:
        names.append("register_backward_hook")
    if getattr(module, "_backward_pre_hooks", None):
        names.append("register_full_backward_pre_hook")
    if getattr(torch_module, "_global_backward_hooks", None):
        names.append("register_module_full_backward_hook (global)")
    if getattr(torch_module, "_global_backward_pre_hooks", None):
        names.append("register_module_full_backward_pre_hook (global)")
    return ", ".join(names)


def _module_hook_message(fn, module, hooks: str) -> str:
    return (f"storch.compile cannot trace {_name(fn)}: it calls a module ({type(module).__name__}) with a backward "
            f"hook ({hooks}). torch runs a module's backward hooks from autograd nodes it attaches to the module's "
            "inputs and outputs at each call, outside the torch program that a trace records, so the replayed calls "
            "would skip the hook and give the unhooked gradients, silently. Remove the hook for the compiled step (to "
            "change the parameters' gradients, register a hook on each parameter once, outside the step: "
            "`p.register_hook(fn)`, or transform the gradients after `loss.backward()`), or run this step eagerly "
            "(without storch.compile). A module's forward hooks are fine: their torch operations are traced (and a forward "
            "hook added or removed later traces the step again)")


def _tensor_hook_message(fn, method: str, on_plate: bool) -> str:
    what = ("a plate tensor the step computes (a sample, or a value computed from one)" if on_plate
            else "a tensor inside the step")
    return (f"storch.compile cannot trace {_name(fn)}: it registers a gradient hook (`{method}`) on {what}. A trace "
            "records the step's forward torch program, not hooks: the tensors it computes carry no autograd graph "
            "while traced (torch refuses the hook), and the replayed calls would not run a hook registered there; one "
            "on a parameter or an argument would be registered at the trace only, not at every call as eagerly. "
            "Register a hook on a parameter or an input once, outside the step (it runs at each backward pass "
            "through the compiled step's loss), or transform the gradients after `loss.backward()`; for a hook on "
            "a value the step computes (a plate tensor's hook: docs/plates.md), run this step eagerly (without "
            "storch.compile)")


_OUTSIDE = ("Step the optimizer and zero the gradients outside the compiled step: `loss = f(x); loss.backward(); "
            "opt.step(); opt.zero_grad()`")


def _optimizer_message(fn, method: str) -> str:
    return (f"storch.compile cannot trace {_name(fn)}: it calls {method}() inside the step. "
            "A trace records the step's torch program (what autograd differentiates), not the optimizer's update "
            "of the parameters from their .grad, so no replayed call would update them (silently: the first call "
            "had no gradients to apply, later calls never step). Step the optimizer outside the compiled step: "
            "`loss = f(x); loss.backward(); opt.step(); opt.zero_grad()`")


def _gradient_message(fn, what: str) -> str:
    """The refusal of a read or write of a tensor's ``.grad`` during the trace (:class:`_TraceMode`)."""
    return (f"storch.compile cannot trace {_name(fn)}: {what} inside the step (an optimizer's "
            "zero_grad(), model.zero_grad(), `p.grad = None`, clip_grad_norm_, an optimizer's update). A trace records the "
            "step's torch program, not what it does to the parameters' gradients: no replayed call would do it "
            "(zeroed only at the first call, the gradients would accumulate over the calls after it, silently). "
            + _OUTSIDE)


def _created_in_step_message(fn, est) -> str:
    return (f"storch.compile cannot trace {_name(fn)}: it creates estimator {est.name!r} (plate {est.plate!r}) inside "
            "the step, and that estimator keeps state from step to step (a moving average, a learned baseline or "
            "control variate, a temperature schedule, a buffer). Made anew at every call, it would start from scratch "
            "each time (eagerly its variance reduction never applies), while the compiled step would replay the "
            "traced instance. Create the estimator once, outside the step (in your module's __init__, or before the "
            "training loop), and call it in the step")


def _custom_function_message(fn, cls: type) -> str:
    """The refusal of a custom ``torch.autograd.Function`` on the path to the step's outputs (:func:`_check_custom_functions`)."""
    dirichlet = cls.__module__ == "torch.distributions.dirichlet"
    what = (f"torch's {cls.__name__} (the rsample of Dirichlet and Beta: an implicit reparameterisation with a backward "
            "of its own)" if dirichlet else f"the custom torch.autograd.Function {cls.__module__}.{cls.__qualname__}")
    advice = (" For a Dirichlet, draw Gammas and normalise them, which traces: `g = storch.estimator("
              "'reparameterization', plate=...)(Gamma(concentration, 1.0))`, `x = g / g.sum(-1, keepdim=True)` (the same "
              "distribution, an exact pathwise gradient; a Beta(a, b) is the first entry of a Dirichlet of (a, b))"
              if dirichlet else "")
    if cls.__module__ == "torch.utils.checkpoint":  # CheckpointFunction: use_reentrant=True (torch's default)
        advice = (" A reentrant checkpoint is such a Function (torch.utils.checkpoint.checkpoint with "
                  "use_reentrant=True, torch's default where it is not passed, in checkpoint_sequential too): pass "
                  "use_reentrant=False, which compiles with the exact gradient")
    return (f"storch.compile cannot trace {_name(fn)}: its result is differentiated through {what}. A trace records "
            "the operations of the Function's forward, not its backward: the compiled program would differentiate "
            "those operations as written (a wrong gradient, silently; or torch's 'derivative ... is not implemented' "
            "at backward). Run this step eagerly, or compute that value from differentiable torch operations."
            + advice)
