"""``torch.func.vmap`` for flat operands, without the reference cycles its pytree handling leaves (issue 19).

``torch.func.vmap`` flattens its inputs and outputs with ``torch.utils._pytree`` (``tree_flatten`` and
``TreeSpec.flatten_up_to``), whose recursive local helper functions hold themselves in their closure
cells: every vmapped call left 34 or more objects (one cycle of 7 per flatten) that only the cyclic
garbage collector frees, so a step that ran any function per plate entry (gather or
broadcast_tensors with a plate index, Categorical.log_prob of a plate value, ...) left garbage.
storch's operands are already flat (one tensor or None per operand) and its functions return a
tensor or a (nested) tuple of tensors (``rules.vmap`` strips the rest), so it needs none of that:
:func:`vmap` does what ``torch.func.vmap``'s ``_flat_vmap`` does with the same functorch
primitives (a vmap level, a batch dim added to each mapped operand, removed from each output, an
unbatched output expanded), and nothing else. It is not a patch: torch's vmap is untouched.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

try:  # (functorch's primitives, as torch.func.vmap's _flat_vmap imports them in torch 2.13)
    from torch._functorch.predispatch import (
        _add_batch_dim,
        _remove_batch_dim,
        _vmap_decrement_nesting,
        _vmap_increment_nesting,
        lazy_load_decompositions,
    )
except ImportError:  # (torch 2.7 and 2.8: the same primitives, as their _flat_vmap imports them)
    try:
        from torch._C._functorch import (
            _add_batch_dim,
            _remove_batch_dim,
            _vmap_decrement_nesting,
            _vmap_increment_nesting,
        )
        from torch._functorch.vmap import lazy_load_decompositions
    except ImportError:  # pragma: no cover  (another torch: torch.func.vmap itself, cycles and all)
        _add_batch_dim = None

__all__ = ["vmap"]


def vmap(func: Callable, in_dims: Sequence[Optional[int]], size: int, randomness: str) -> Callable:
    """``torch.func.vmap(func, in_dims=tuple(in_dims), randomness=randomness)`` for positional tensor
    (or ``None``-dimmed) operands, mapping ``size`` entries; every output is batched at dim 0. Where torch
    lacks the primitives (another version), ``torch.func.vmap`` itself."""
    if _add_batch_dim is None:  # pragma: no cover
        return torch.func.vmap(func, in_dims=tuple(in_dims), randomness=randomness)

    def run(*xs):
        lazy_load_decompositions()
        level = _vmap_increment_nesting(size, randomness)
        try:
            batched = [x if d is None else _add_batch_dim(x, d, level) for x, d in zip(xs, in_dims)]
            return _unbatch(func(*batched), level, size)
        finally:
            _vmap_decrement_nesting()

    return run


def _unbatch(out, level: int, size: int):
    if isinstance(out, torch.Tensor):
        return _remove_batch_dim(out, level, size, 0)
    if type(out) in (tuple, list):
        return type(out)(_unbatch(o, level, size) for o in out)
    if isinstance(out, tuple):  # a torch.return_types structseq
        return type(out)([_unbatch(o, level, size) for o in out])
    raise ValueError(f"vmap: the function must return tensors (or tuples of them), got {type(out).__name__}")
