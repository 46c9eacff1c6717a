"""A cache for functions that build constant tensors (index tables), safe under torch.func transforms."""

from __future__ import annotations

import functools
from typing import Callable, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def table_cache(maxsize: Optional[int] = 128) -> Callable[[F], F]:
    """``functools.lru_cache(maxsize)`` for a function of hashable arguments that returns constant tensors
    (index tables), bypassed inside a torch.func transform (``grad``, ``jacrev``, ``vmap``, ``jvp``).

    A tensor made inside a transform belongs to that transform's level: kept in a plain ``lru_cache`` and
    returned to a later call at another level (``jacrev(jacrev(f))`` called twice), it fails PyTorch's
    internal assert ``level <= current_level`` ("escaped?"). Inside a transform the function is called
    afresh; outside, the cached tensors are plain and every level can read them.

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
            return cached(*args, **kwargs)

        call.cache_clear = cached.cache_clear  # type: ignore[attr-defined]
        return call  # type: ignore[return-value]

    return wrap
