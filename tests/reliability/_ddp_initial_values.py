"""The parts of test_ddp_initial_values.py: a per-rank worker (run by torch.multiprocessing.spawn, without DDP: only
storch's own collectives) whose ranks build REBAR / RELAX with other initial values of what the update trains: another
``temperature=`` or ``eta=``, or a ``network=`` initialised from a per-rank seed. The update averages φ's gradient
over the ranks, never φ: before, the ranks trained on from their own values without error (log λ -0.68 and -0.50
after 3 steps); now every rank starts from rank 0's at the first update, as DDP does for a module's parameters.
Each case records, per rank, the error it raised (type and message) or the estimator's parameters after one step;
the group's timeout (10 s) turns a hang into an error, so no case waits forever. The same for score's NVIL heads
built while ``storch.distributed.synchronize`` was off (broadcast when built only while on)."""

from __future__ import annotations

import torch

import storch
from _ddp import Model, ScalarBaseline, run_steps, shard
from _gloo import outcome, rank_process


def _trained(model, x, g) -> dict:
    run_steps(model, x, g, 1)
    return {name: p.detach().clone() for name, p in model.est.named_parameters()}


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    with rank_process(rank, world, port, outdir, timeout=10) as out:
        x = shard(world, rank)
        g = torch.Generator().manual_seed(10 + rank)
        out["rebar_temperature"] = outcome(lambda: _trained(Model("rebar", {"temperature": (0.5, 0.3)[rank]}), x, g))
        dist.barrier()
        out["relax_eta"] = outcome(lambda: _trained(Model("relax", {"eta": (1.0, 2.0)[rank]}), x, g))
        dist.barrier()
        torch.manual_seed(20 + rank)  # a per-rank seed: each rank's network starts elsewhere
        network = torch.nn.Linear(4, 1)
        out["relax_network"] = outcome(lambda: _trained(Model("relax", {"network": network}), x, g))
        dist.barrier()
        # score's baseline= module of the user's (outside DDP), initialised per rank: the same drift
        baseline = ScalarBaseline()
        with torch.no_grad():
            baseline.b.fill_(float(rank))
        out["score_module"] = outcome(
            lambda: _trained(Model("score", {"n_samples": 2, "baseline": baseline, "lr": 0.05}), x, g))
        dist.barrier()
        # NVIL's heads built while synchronisation was off (from each rank's generator: not broadcast then), trained
        # once it is on: before, the ranks trained on from their own heads
        model = Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05})
        storch.distributed.synchronize(model, enabled=False)
        with storch.Graph(generator=g):
            model(x)
        out["score_nvil_built"] = {name: p.detach().clone() for name, p in model.est.named_parameters()}
        storch.distributed.synchronize(model)
        out["score_nvil_unsynchronised"] = outcome(lambda: _trained(model, x, g))
        dist.barrier()
