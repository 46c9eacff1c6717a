"""storch under ``torch.distributed`` (DistributedDataParallel and friends).

Estimator state that must agree across processes is kept in sync by the estimators themselves,
at the one place where it changes:

- running statistics (the ``score`` estimator's moving-average baselines) are averaged over
  the ranks before they are committed, so every rank holds the average of the global batch;
- learned control variates (``relax``, ``rebar``, ``lax``) average their variance gradient over
  the ranks before their optimizer step (as DDP averages model gradients), and a lazily built
  network is broadcast from rank 0 when it is built, so their parameters stay identical.

This happens automatically when ``torch.distributed`` is initialised with more than one
process. It is a collective operation: every rank must run the same steps (as under DDP). To
use an estimator on one rank only (evaluation on rank 0, for example), switch it off for that
model with :func:`synchronize` ``(model, enabled=False)``, or pass another process group.

DDP and ``find_unused_parameters=True``: DDP looks for the parameters the loss depends on by
walking back from the *outputs of the wrapped module's forward*. In storch the loss is built
from the registered costs, so the forward must return it: end the forward with
``return storch.surrogate_loss()`` and call ``storch.backward()`` after it (it rebuilds the same
surrogate; the estimators' state changes once). Otherwise DDP marks every parameter unused and
backward fails; ``storch.backward()`` turns that failure into a :class:`storch.StorchError`
that says this. With the default ``find_unused_parameters=False`` nothing is needed.

Example (``examples/distributed/train_ddp.py`` is a complete script)::

    model = DDP(VAE(estimator="relax"))          # the estimator is a submodule of the model
    for x in loader:
        model(x)                                 # registers the costs in the default graph
        storch.backward()                        # backward, estimator updates (in sync), reset
        optimizer.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import functools
from typing import Any, Union

import torch

__all__ = ["is_active", "synchronize", "all_reduce_mean", "broadcast_", "ranks_agree"]

_UNSET = object()


@functools.cache
def _dist():
    """torch.distributed, or None where it is not built in (looked up once: every update asks)."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _group_of(owner: Any) -> Any:
    """The process group ``owner`` (an estimator) synchronises over; None: world; False: off."""
    return getattr(owner, "_storch_process_group", None) if owner is not None else None


def is_active(owner: Any = None) -> bool:
    """Whether state of ``owner`` (an estimator, or None for the default) is synchronised now."""
    dist = _dist()
    if dist is None or not dist.is_initialized():
        return False  # checked first: the common, single-process case costs no attribute look-up
    group = _group_of(owner)
    if group is False:
        return False
    return dist.get_world_size(group) > 1


def synchronize(module: torch.nn.Module, enabled: bool = True, group: Any = None) -> None:
    """Set how every storch estimator inside ``module`` keeps its state in sync.

    Args:
        module: a model (or an estimator) holding storch estimators as submodules.
        enabled: False: each process keeps its own state (no collectives; for single-rank
            evaluation). True (the default of every estimator): average over ``group``.
        group: the ``torch.distributed`` process group (None: the default world group).
    """
    from .estimators.base import Estimator

    for m in module.modules():
        if isinstance(m, Estimator):
            m._storch_process_group = group if enabled else False


def all_reduce_mean(values: Union[dict, list, torch.Tensor], owner: Any = None) -> Union[dict, list, torch.Tensor]:
    """The mean of ``values`` over the ranks (a dict or list of tensors, or one tensor).

    Without an active process group the values are returned unchanged. Every rank must call it
    with the same keys, shapes and dtypes. One collective per dtype and device.
    """
    if not is_active(owner):
        return values
    dist = _dist()
    group = _group_of(owner)
    if isinstance(values, torch.Tensor):
        return all_reduce_mean([values], owner)[0]
    items = list(values.items()) if isinstance(values, dict) else list(enumerate(values))
    out: dict = {}
    by_kind: dict = {}
    for key, v in items:
        by_kind.setdefault((v.dtype, v.device), []).append((key, v))
    world = dist.get_world_size(group)
    for (dtype, device), group_items in sorted(by_kind.items(), key=lambda kv: str(kv[0])):
        flat = torch.cat([v.detach().reshape(-1) for _, v in group_items])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat = flat / world
        offset = 0
        for key, v in group_items:
            out[key] = flat[offset:offset + v.numel()].reshape(v.shape)
            offset += v.numel()
    if isinstance(values, dict):
        return {key: out[key] for key, _ in items}
    return [out[i] for i, _ in items]


def broadcast_(tensors: list[torch.Tensor], owner: Any = None, src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (no-op without a process group)."""
    if not is_active(owner):
        return
    dist = _dist()
    group = _group_of(owner)
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=src, group=group)


def ranks_agree(tensors: list[torch.Tensor], owner: Any = None) -> bool:
    """Whether every rank holds bitwise the same ``tensors`` (a check for tests and debugging)."""
    if not is_active(owner):
        return True
    dist = _dist()
    group = _group_of(owner)
    flat = torch.cat([t.detach().reshape(-1).double() for t in tensors]) if tensors else torch.zeros(1)
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    return bool(torch.equal(lo, hi))
