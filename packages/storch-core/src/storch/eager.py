"""storch's Python runs eagerly, also inside a function given to ``torch.compile``.

dynamo cannot build a tensor wrapper subclass inside a graph, so it cannot trace plate tensors;
worse, when it compiles fragments of storch's dispatcher between graph breaks, its guards do not
see everything those fragments depend on, and a later call reused a fragment for plates it was not
traced for (a silently wrong value, issue 19: a categorical VAE's KL came out per latent instead of
per sample). So storch's entry points (every torch call on a plate tensor, graph and cost
bookkeeping, estimator calls, the surrogate) are marked :func:`eager_only`: inside
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
from typing import Callable, TypeVar

import torch

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
