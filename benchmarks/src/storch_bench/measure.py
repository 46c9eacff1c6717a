"""Measurements: peak CPU memory of a call, seeding, and the variance of a gradient estimator.

Peak memory comes from torch's own profiler (``torch.profiler`` with ``profile_memory=True``):
every allocation and free of torch's CPU allocator is an event; the running sum of the
events in time order gives the peak number of bytes held above what was held before the call.
(``tracemalloc`` does not see tensor storage, which torch allocates outside Python's allocator.)
Allocations made and freed inside one operator are netted at operator granularity.
"""

from __future__ import annotations

import contextlib
import os
import sys
import random
import warnings
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["peak_memory", "seed_everything", "gradient_variance"]


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and random (the demo's only sources of randomness)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


@contextlib.contextmanager
def _quiet_profiler():
    # the profiler's C++ side prints start/stop lines and allocator warnings on fd 2
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: Optional[torch.device] = None) -> int:
    """Peak bytes allocated by torch's CPU allocator during ``fn()`` (above the level before it);
    on a CUDA ``device``, by the CUDA caching allocator (``torch.cuda.max_memory_allocated``).

    On the CPU ``fn`` runs twice in one profiling session and the second call is measured: the profiler
    reports the free of a block only if it saw the block's allocation (a block allocated before profiling
    started is freed silently), so a single profiled call of a training step counted the previous step's
    gradients, freed by ``zero_grad`` and allocated again, as held twice (+87 KB on the VAE's step: most of
    a batch-1 row, and storch and the hand-written step unequally where only one side freed such blocks)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile, record_function

    with _quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # its blocks are seen allocated: their frees in the measured call count
        with record_function(_MARK):  # an empty range: the measured call's events start after it
            pass
        fn()
    events = prof.events()
    start = next(e.time_range.end for e in events if e.name == _MARK)
    current = peak = 0
    for e in sorted((e for e in events if e.time_range.start >= start and e.name != _MARK),
                    key=lambda e: e.time_range.start):
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return int(peak)


_MARK = "storch_bench::measured_call_follows"


def gradient_variance(grads: list[list[torch.Tensor]]) -> float:
    """Trace of the covariance of R gradient estimates (sum of per-coordinate variances).

    Args:
        grads: R estimates, each a list of tensors (one per parameter).
    """
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads])  # (R, P)
    return float(flat.double().var(0, unbiased=True).sum())
