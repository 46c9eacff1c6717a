"""storch's Python runs eagerly, also inside a function given to ``torch.compile``.

dynamo cannot build a tensor wrapper subclass inside a graph, so it cannot trace plate tensors;
worse, when it compiles fragments of storch's dispatcher between graph breaks, its guards do not
see everything those fragments depend on, and a later call reused a fragment for plates it was not
traced for (a silently wrong value, issue 19: a categorical VAE's KL came out per latent instead of
per sample). So storch's entry points (every torch call on a plate tensor, graph and cost
bookkeeping, estimator calls, the surrogate, and the public functions on plate tensors: the constructor,
``.tensor``, ``aligned``, ``ancestor_index``, ``padding``) are marked :func:`eager_only`: inside
``torch.compile`` each is a graph break and runs exactly as it does eagerly, nested calls included.
To compile a storch step into one graph, use :func:`storch.compile`, which traces storch's plate
program into plain torch first.

:func:`eager_only` does what ``torch.compiler.disable`` does (dynamo does not inline a function
marked ``_torchdynamo_disable``; while it runs, no frame is handed to dynamo), without importing
``torch._dynamo`` with storch and at a fraction of its per-call cost (0.5-1 us). The dispatcher,
called once per torch call on a plate tensor, does it inline (:func:`mark_eager_only` and one
``set_eval_frame(None)`` call, no measurable cost). No torch setting is changed.
"""

from __future__ import annotations

import functools
import sys
import types
from typing import Callable, TypeVar

import torch

from ..errors import StorchError

__all__ = ["eager_only", "mark_eager_only", "set_eval_frame"]

F = TypeVar("F", bound=Callable)

REASON = ("storch's plate tensors cannot be traced by dynamo, so storch runs eagerly inside torch.compile; "
          "compile the whole step with storch.compile(step) for one graph without breaks")

_dynamo_c = getattr(getattr(torch._C, "_dynamo", None), "eval_frame", None)
_set_eval_frame = getattr(_dynamo_c, "set_eval_frame", None)


def _no_dynamo(callback):
    return None


# ``set_eval_frame(None)`` stops handing frames to dynamo and returns the callback that was
# active (None outside torch.compile); the hot path (the dispatcher) calls it inline
set_eval_frame = _set_eval_frame if _set_eval_frame is not None else _no_dynamo


def mark_eager_only(fn: F) -> F:
    """Mark ``fn`` so that dynamo does not inline it (a graph break); ``fn`` itself must suspend
    dynamo while it runs (``prior = set_eval_frame(None)``, restored when ``prior`` is not None),
    as the dispatcher does inline to save a call per torch function."""
    fn._torchdynamo_disable = True  # type: ignore[attr-defined]
    fn._torchdynamo_disable_msg = REASON  # type: ignore[attr-defined]
    return fn


def eager_only(fn: F) -> F:
    """``fn``, run eagerly when code compiled by ``torch.compile`` calls it (a graph break there)."""
    if _set_eval_frame is None:  # a torch without dynamo
        return fn
    set_eval_frame = _set_eval_frame

    @functools.wraps(fn)
    def eager(*args, **kwargs):
        prior = set_eval_frame(None)
        if prior is None:  # not under torch.compile: nothing to restore
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            set_eval_frame(prior)

    eager._torchdynamo_disable = True  # what dynamo checks before inlining a call
    eager._torchdynamo_disable_msg = REASON
    return eager  # type: ignore[return-value]


# -- torch's own tracers ------------------------------------------------------------------------
#
# torch.jit.trace records the torch operations of one call and replays them; torch.export (non-strict, its
# default) traces them with fake tensors. Neither runs storch's Python at a later call: a traced step skipped
# the estimators' state updates (a moving average never changed) and the finiteness check of the costs (a NaN
# cost's gradient passed), and export failed inside storch's validation with a torch error. So storch's entry
# points that every step passes (a ``storch.Graph`` block's entry, ``storch.denote_independent``, an estimator
# call) refuse to run under them: one C call (``torch._C._is_tracing``) and one module attribute read.

_jit_tracing = torch._C._is_tracing
# (torch.compiler's export flag, read inline on the eager path; a torch without it, before 2.5, cannot be exporting
# through the path that sets it: a stand-in whose flag is always False)
_compiler = torch.compiler if hasattr(torch.compiler, "_is_exporting_flag") else types.SimpleNamespace(
    _is_exporting_flag=False)


def _exporting() -> bool:
    return bool(getattr(_compiler, "_is_exporting_flag", False))


def foreign_trace_message(where: str) -> str:
    tracer = "torch.export" if _exporting() else "torch.jit.trace"
    return f"{where} ran under {tracer}: " + _FOREIGN_TRACE


def scripted_estimator_message(what: str) -> str:
    """The refusal of ``torch.jit.script`` of a module that holds the estimator ``what`` (a submodule)."""
    return (f"torch.jit.script was given a module that holds {what} as a submodule: " + _FOREIGN_TRACE
            + ". A module whose scripted methods never call the estimator (it samples in Python methods of its own) "
            "scripts with the estimator's attribute named in its class's `__jit_ignored_attributes__`")


def ignored_by_script(module: torch.nn.Module) -> bool:
    """Whether ``torch.jit.script`` is preparing ``module`` as (part of) an attribute that a module above it names in
    ``__jit_ignored_attributes__``: TorchScript never compiles such an attribute (the holder's scripted methods do
    not use it: a model that keeps its estimator beside the plain modules it scripts), but torch's
    ``call_prepare_scriptable_func_impl`` calls ``__prepare_scriptable__`` on every submodule all the same, so the
    estimator's refusal there refused a model that scripted fine. Read from the frames of that function (one per
    module, the holder's above its submodule's: locals ``obj``, and ``k`` or ``name`` for the child); False where
    they are not found (another torch: the refusal stands). Called only by ``__prepare_scriptable__``."""
    prepare = getattr(getattr(torch.jit, "_script", None), "call_prepare_scriptable_func_impl", None)
    code = getattr(prepare, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    while frame is not None and frame.f_code is code:  # this module's call, then its holders' (direct recursion)
        holder = frame.f_back
        if holder is None or holder.f_code is not code:
            return False
        local = holder.f_locals
        key = local.get("k") if local.get("name") == "_modules" else local.get("name")
        if key is not None and key in getattr(local.get("obj"), "__jit_ignored_attributes__", ()):
            return True
        frame = holder
    return False


_FOREIGN_TRACE = (
    "torch.jit.trace, torch.jit.script and torch.export record the torch operations of one call and replay them "
    "without storch's Python, so the traced program would skip storch's per-step checks (a NaN cost, plates that "
    "do not match) and the estimators' state updates (moving-average baselines, learned baselines and control "
    "variates, temperature schedules) and train silently wrong. To compile a storch step use storch.compile(step), "
    "which traces storch's plate program into plain torch and replays these checks and updates (backend=None: no "
    "compiler); run the step eagerly otherwise. To deploy a trained model, export (or script) its plain modules, "
    "such as the decoder or the policy network, called on plain tensors, and draw or decode in plain torch "
    "(`q.sample()`, `q.mode`): see 'Export and deployment' in docs/evaluation.md")


def under_jit_trace() -> bool:
    """Whether torch.jit.trace is on the Python stack: for error paths only (a frame walk). Inside storch's
    dispatch of a traced op torch reports no tracing state (``torch._C._is_tracing()`` is False there), and the
    tracer's copy of its inputs runs before tracing starts, so its errors on plate tensors are told by the caller."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.replace("\\", "/").endswith("torch/jit/_trace.py"):
            return True
        frame = frame.f_back
    return False


def refuse_foreign_trace(where: str) -> None:
    """Raise storch's error when torch.jit.trace or torch.export is tracing (see :func:`foreign_trace_message`).
    Callers check ``_jit_tracing() or _compiler._is_exporting_flag`` inline first (the eager path's cost)."""
    raise StorchError(foreign_trace_message(where))
