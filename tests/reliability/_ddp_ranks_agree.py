"""The parts of test_ddp_ranks_agree.py: a per-rank worker (run by torch.multiprocessing.spawn, two gloo processes)
that asks ``storch.distributed.ranks_agree`` about tensors the ranks hold equal or not, where a comparison in float64
is not exact: NaN, and int64 values above 2**53. Each case records, per rank, its answer or the error it raised; the
group's timeout (10 s) turns a hang into an error."""

from __future__ import annotations

import torch

import storch
from _gloo import outcome, rank_process

BIG = 2 ** 60  # int64 values this large are 2**7 apart in float64: BIG and BIG + 1 read as equal there


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    with rank_process(rank, world, port, outdir, timeout=10) as out:
        nan = torch.tensor([1.0, float("nan"), 3.0])
        cases = {
            "nan_equal": [nan, torch.arange(3)],  # the same bits on every rank
            "nan_other": [torch.tensor([1.0, float("nan"), 3.0 + rank])],  # the NaN agrees, another value does not
            "int64_equal": [torch.tensor([BIG + 1, -BIG - 3])],
            "int64_last_bit": [torch.tensor([BIG + rank])],  # BIG and BIG + 1
            "float_equal": [torch.linspace(0, 1, 5), torch.ones(2, 2, dtype=torch.float16)],
            "float_other": [torch.linspace(0, 1, 5) + rank * 1e-7],
            "shape_other": [torch.zeros(2 + rank)],  # (a flat min/max all_reduce of other sizes aborted in gloo)
        }
        for key, tensors in cases.items():
            out[key] = outcome(lambda: storch.distributed.ranks_agree(tensors))
