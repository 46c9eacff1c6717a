"""A cache for functions that build constant tensors (index tables), safe under torch.func transforms."""

from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def table_cache(maxsize: Optional[int] = 128) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` for a function of hashable arguments that returns constant tensors
    (index tables), bypassed inside a torch.func transform (``grad``, ``jacrev``, ``vmap``, ``jvp``), and
    made outside inference mode.

    A tensor made inside a transform belongs to that transform's level: kept in a plain ``lru_cache`` and
    returned to a later call at another level (``jacrev(jacrev(f))`` called twice), it fails PyTorch's
    internal assert ``level <= current_level`` ("escaped?"). Inside a transform the function is called
    afresh; outside, the cached tensors are plain and every level can read them.

    A tensor made under ``torch.inference_mode()`` is an inference tensor: kept and returned to a later
    step that autograd records, every operation that saves it for backward raises "Inference tensors
    cannot be saved for backward" (an evaluation pass under ``inference_mode`` broke every later training
    step of ``expect`` and ``unordered_set`` on a Categorical, and ``storch.compile(backend="aot_eager")``
    of any step reading the table). Under inference mode the function is called with it switched off, so
    the table it makes, kept or not, is a normal tensor (which inference mode reads as well).

    Example:
        >>> @table_cache(maxsize=64)
        ... def pairs(k: int) -> torch.Tensor:
        ...     return torch.combinations(torch.arange(k))
    """

    def wrap(fn: F) -> F:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if torch._C._functorch.maybe_current_level() is not None:
                return fn(*args, **kwargs)
            if torch.is_inference_mode_enabled():
                with torch.inference_mode(False):
                    return cached(*args, **kwargs)
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap
