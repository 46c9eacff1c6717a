"""The lowest layer of storch.distributed: torch.distributed looked up once, and the check that precedes
every storch collective (what each rank is about to run, and the values' layout), with which a step
that has no costs or no data joins the others' check (``storch.graph`` and ``storch.surrogate`` call it
where they refuse such a step; :mod:`storch.distributed` sits above them)."""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

__all__: list = []


@functools.cache
def _dist():
    """torch.distributed, or None where it is not built in (looked up once: every update asks)."""
    import torch.distributed as dist

    return dist if dist.is_available() else None


def _comm_device(group: Any) -> torch.device:
    """Where tensors of a collective of ``group`` live (nccl: the current CUDA device; else the CPU)."""
    if _dist().get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _fingerprint(obj: Any) -> int:
    """A 63-bit fingerprint of ``repr(obj)``, the same in every process (Python's hash() of a str is not)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "little") >> 1


_NO_COSTS = "a step with no costs or no data (no estimator updates)"


def _layouts_agree(layout: list, group: Any, collective: str = "") -> tuple[bool, bool]:
    """Whether every rank runs the same ``collective`` and passed the same ``layout`` (one all_reduce of
    two 63-bit fingerprints)."""
    op, fp = _fingerprint(collective), _fingerprint(layout)
    t = torch.tensor([op, -op, fp, -fp], dtype=torch.int64, device=_comm_device(group))
    dist = _dist()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    same_op = int(t[0]) == op and int(t[1]) == -op  # max == min == this rank's
    return same_op, same_op and int(t[2]) == fp and int(t[3]) == -fp


def _gather_collectives(collective: str, group: Any) -> str:
    """What each rank runs, "rank 0: ...; rank 1: ..." (every rank calls it: a collective)."""
    dist = _dist()
    names: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, collective, group=group)
    return "; ".join(f"rank {r}: {n}" for r, n in enumerate(names))


def _announce_no_costs(owners: tuple = ()) -> Optional[str]:
    """A step without costs (or with an empty data shard) under torch.distributed: the other ranks are (or
    will be) in their estimators' collectives, which this rank cannot join. Join their check with a
    collective of its own, so that every rank raises (the others: storch.distributed raises on seeing it)
    instead of waiting forever; the caller raises its own error.

    Returns None in one process (nothing is asked then); else what the ranks were running ("" where every
    rank is here, or inside a DistributedDataParallel forward, where nothing is joined: the other ranks
    wait in DDP's own gradient allreduce, which storch cannot join, and a collective of its own would meet
    DDP's there). ``owners``: the estimators the step called; where there are some and every one has its
    synchronisation switched off (``storch.distributed.synchronize(model, enabled=False)``: single-rank
    use) nothing is joined either, and None is returned; nor under ``torch.no_grad()`` (evaluation, where no
    rank takes part in an estimator's collective)."""
    dist = _dist()
    if dist is None or not dist.is_initialized() or dist.get_world_size() <= 1:
        return None
    if not torch.is_grad_enabled():  # evaluation: no rank runs an estimator update (storch.backward refuses
        return None  # no_grad), so nobody waits; joining here would leave this rank waiting instead
    if owners and all(getattr(o, "_storch_process_group", None) is False for o in owners):
        return None
    from torch.nn.parallel import DistributedDataParallel

    if getattr(DistributedDataParallel, "_active_ddp_module", None) is not None:
        return ""
    same_op, _ = _layouts_agree([], None, _NO_COSTS)
    return "" if same_op else _gather_collectives(_NO_COSTS, None)
