"""The parts of test_ddp_subgroup.py: a per-rank worker (run by torch.multiprocessing.spawn, three gloo processes,
without DDP) whose ranks 1 and 2 synchronise their estimators over the group [1, 2]
(``storch.distributed.synchronize(model, group=g)``), which leaves out the world's rank 0, as each data-parallel
replica group but the first does. storch's broadcasts (REBAR's trained parameters at its first update, NVIL's heads
when built) take rank 0 of that group as their source: before, torch was given the world's rank 0 and refused
("Global rank 0 is not part of group"). Each case records, per rank, the error it raised or the estimator's
parameters after one step; the group's timeout (10 s) turns a hang into an error."""

from __future__ import annotations

import torch

import storch
from _ddp import Model, shard
from _ddp_initial_values import _trained
from _gloo import outcome, rank_process


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    with rank_process(rank, world, port, outdir, timeout=10) as out:
        group = dist.new_group([1, 2])  # (every rank creates every group)
        if rank in (1, 2):
            x = shard(world, rank)
            g = torch.Generator().manual_seed(10 + rank)
            for case, name, options in [("rebar", "rebar", {"temperature": (0.5, 0.3)[rank - 1]}),
                                        ("nvil", "score", {"n_samples": 2, "baseline": "learned", "hidden": 4})]:
                model = Model(name, options)
                storch.distributed.synchronize(model, group=group)
                out[case] = outcome(lambda: _trained(model, x, g))
