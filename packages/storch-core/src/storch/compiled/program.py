"""The traced program: its record (:class:`_Trace`), the rewrites that keep every value (identity views
dropped, elementwise functions run on the folded batch), compiled (inductor directly, or ``torch.compile``) or,
with ``backend=None``, replayed as recorded (:func:`_direct_calls`), and run."""

from __future__ import annotations

import builtins
import contextlib
import functools
import sys
import threading
from typing import Callable

import torch


class _Trace:
    """One traced and compiled program. Its inputs: the step's tensor arguments, the update probe (if
    ``probe``: its dtype and device), the estimators' state tensors; its outputs: the step's ``n_out``
    tensors (``spec``; ``single``: one tensor), then (with a probe) the surrogate loss without it and
    the tensors of each of ``updates``' ``update_inputs`` (``(estimator, spec, leaves)``: its
    flattened leaves, ``None`` where a tensor output goes).
    ``estimators``: those whose state the program reads, ``sig`` its structure when traced."""

    __slots__ = ("gm", "program", "spec", "single", "n_out", "checked", "probe", "updates", "estimators", "sig", "live_loss",
                 "refusal", "guard")


def _compile_graph(gm: torch.fx.GraphModule, tensors: list, options: dict):
    """The traced program, compiled: by inductor directly for the default backend (no dynamo frame
    and guards: :class:`CompiledStep` keys its cache on the arguments itself, and dynamo's call
    overhead on a GraphModule was ~25 us per call, a third of a small compiled step), by
    ``torch.compile(fullgraph=True)`` for any other backend (``"aot_eager"``, a custom one); with
    ``backend=None`` not at all: the traced GraphModule itself runs (its plain torch calls, in Python)."""
    if options.get("backend") is None:
        return _direct_calls(gm)
    if _compiled_by_inductor(options):
        import torch._inductor as inductor

        config = dict(inductor.list_mode_options(options["mode"])) if options.get("mode") else {}
        config.setdefault(_RANDOM, True)  # (see _RANDOM)
        config.update(options.get("options") or {})
        return inductor.compile(gm, list(tensors), options=config)
    if options.get("backend") == "inductor" and not options.get("mode"):
        options = {**options, "options": {_RANDOM: True, **(options.get("options") or {})}}
    return torch.compile(gm, fullgraph=True, **options)


# inductor's own random number generation (torch 2.13, CPU) gave two `aten.normal` draws of one shape in a program
# the SAME noise (the two steps of a Gaussian policy's episode: a silently biased gradient, |z| 10 to 22, found by
# porting REINFORCE on an LQR); with fallback_random it calls torch's generator, as eagerly (the draws are then
# eager's for a seed, except a float64 torch.bernoulli, which inductor draws otherwise even so: same distribution,
# other values; backend=None replays eager's draws exactly: docs/performance.md). A user's options={"fallback_random": False} still decides (with mode= and dynamic=True,
# torch.compile takes no options: patch torch._inductor.config.fallback_random yourself there)
_RANDOM = "fallback_random"


def _compiled_by_inductor(options: dict) -> bool:
    return options.get("backend") == "inductor" and not options.get("dynamic")


def _direct_calls(gm: torch.fx.GraphModule) -> Callable:
    """The traced program as a plain function (``backend=None``): ``gm``'s generated code, with each
    ``torch.ops.<ns>.<op>.<overload>(...)`` call made to the overload's C++ entry point
    (``OpOverload._op``, which ``OpOverload.__call__`` forwards to) and without ``nn.Module.__call__``:
    the same operations with the same arguments, ~0.4 us less per operation (38 in the VAE step's
    program, 261 in the GRU decoder's). ``gm`` itself (``CompiledStep.graph_module``) is unchanged."""
    from torch.fx.node import _get_qualified_name

    code = gm.graph.python_code(root_module="self")
    src, namespace = code.src, dict(code.globals)
    aliases = {}
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
            call = _get_qualified_name(target) + "("
            if call not in aliases and call in src:
                name = aliases[call] = f"_storch_op_{len(aliases)}"
                namespace[name] = target._op
    for call, name in aliases.items():
        src = src.replace(call, name + "(")
    exec(builtins.compile(src, f"<storch.compile replay of {gm.__class__.__name__}>", "exec"), namespace)
    return functools.partial(namespace["forward"], gm)


# held while a step is traced (a first call, a new signature, a retrace; never a replay): make_fx's proxy mode and
# torch's pre-dispatch mode stack are process-wide, so two threads tracing their steps at once failed in torch
# ("ProxyTorchDispatchMode slot already occupied", "Trying to pop empty mode stack"); reentrant only so that a
# nested call raises storch's own refusal instead of deadlocking (a compiled step called inside another's trace is
# refused). Once torch._dynamo is imported, a trace also holds its compile lock (taken first), which torch.compile
# holds while it compiles a frame (its backend traces with make_fx too: a compiler backend's first call in one
# thread while another traced failed with an InternalTorchDynamoError). Left (review r-twentythree): a trace begun
# before torch._dynamo is imported holds only this lock, so a torch.compile in another thread during it can run
# beside it
_TRACING = threading.RLock()


def _dynamo_lock():
    """torch.compile's compile lock, or None while torch._dynamo is not imported (nothing compiles then; importing it
    costs ~1 s, which a ``backend=None`` step need not pay)."""
    frames = sys.modules.get("torch._dynamo.convert_frame")
    return getattr(frames, "compile_lock", None)


_NESTED_FX = "symbolically trace a dynamo-optimized function"


def _run(program: Callable, tensors, grad: bool):
    """Run a traced program. The trace records storch's grad-mode switches as they happened: a call
    that raises inside one (a check the replayed program makes, e.g. storch.extending.assume) would
    leave the caller's grad mode switched, so it is restored on the way out.

    A ``torch.compile`` program (a backend other than inductor and None) refuses to run, before it runs anything,
    while FX traces in any thread (torch's flag is process-wide): a replay while another thread traces its step is
    run again once that trace is over, under the trace lock (only then: a replay takes no lock)."""
    try:
        return program(*tensors)
    except RuntimeError as e:
        if _NESTED_FX not in str(e):
            torch._C._set_grad_enabled(grad)
            raise
    except BaseException:
        torch._C._set_grad_enabled(grad)
        raise
    dynamo = _dynamo_lock()
    with dynamo if dynamo is not None else contextlib.nullcontext(), _TRACING:
        try:  # (once: FX tracing in this thread, e.g. torch.fx.symbolic_trace of a caller, raises as before)
            return program(*tensors)
        except BaseException:
            torch._C._set_grad_enabled(grad)
            raise


def _drop_identity_views(gm: torch.fx.GraphModule) -> None:
    """Remove views that change nothing (``expand`` to the same shape, ``movedim(x, d, d)``) from the
    trace: storch's alignment emits them where plates already line up, and inductor treats an
    ``expand`` as a layout constraint (it copied the channels-last output of a convolution that
    the next convolution would read as it is). Also ``to(x, dtype)`` to ``x``'s own dtype (no copy, no
    memory format): torch returns ``x`` itself, and ``Categorical.log_prob``'s ``value.long()`` of a drawn
    sample records one per call; through ``OpOverload._op`` each still cost ~5 us in a ``backend=None``
    replay (149 in a 50-step particle filter's program)."""
    aten = torch.ops.aten
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node):
            continue
        same = False
        if node.target is aten.expand.default:
            a, b = src.meta.get("val"), node.meta.get("val")
            same = a is not None and b is not None and tuple(a.shape) == tuple(b.shape)
        elif node.target is aten.movedim.int:
            same = node.args[1] == node.args[2]
        elif node.target is aten.to.dtype and len(node.args) == 2 and not node.kwargs:
            a = src.meta.get("val")
            same = isinstance(a, torch.Tensor) and a.dtype == node.args[1]
        if same:
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _fold_batch_views(gm: torch.fx.GraphModule) -> None:
    """Let elementwise functions between two batch-first calls run on the folded batch.

    storch runs a convolution with every plate folded into its batch dim and unfolds the result
    (``unflatten(out, 0, plates)``); an activation then runs on the unfolded view and the next
    convolution folds it again (``flatten(0, k)``). Eagerly these are free views; inductor,
    however, gives the activation's 5-dim output its own (contiguous) layout and copies it back to
    the channels-last layout the next convolution wants. Moving the ``unflatten`` after
    single-tensor elementwise ops and cancelling ``flatten(unflatten(x))`` gives the graph a
    hand-written batched step has. Only rewrites that keep every value the same."""
    aten = torch.ops.aten
    pointwise = torch.Tag.pointwise
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if node.target is aten.flatten.using_ints:
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.target is aten.unflatten.int and src.args[1] == 0
                    and tuple(node.args[1:]) == (0, len(src.args[2]) - 1)):
                node.replace_all_uses_with(src.args[0])
                gm.graph.erase_node(node)
                changed = True
            continue
        if pointwise not in node.target.tags or node.kwargs or node.target._schema.is_mutable:
            continue
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(tensors) != 1 or node.args[0] is not tensors[0]:
            continue
        src = tensors[0]
        if src.target is not aten.unflatten.int or src.args[1] != 0:
            continue
        with gm.graph.inserting_before(node):
            inner = gm.graph.call_function(node.target, (src.args[0], *node.args[1:]))
            outer = gm.graph.call_function(aten.unflatten.int, (inner, 0, src.args[2]))
        node.replace_all_uses_with(outer)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
