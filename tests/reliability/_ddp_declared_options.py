"""The parts of test_ddp_declared_options.py: a per-rank worker (run by torch.multiprocessing.spawn, without DDP:
only storch's own collectives) for the ranks' check of an estimator's declared options.

- A third party's estimator with state (a running-mean baseline, averaged over the ranks with
  ``storch.distributed.all_reduce_mean``) declares through the public hooks ``state_options()`` and
  ``evolution_options()`` what gives its state its meaning and what changes how it evolves: ranks that differ in
  them raise on every rank, naming the option (before the hooks were public, only first-party estimators had
  them: the ranks' averages drifted apart silently, and a rank with ``update=False`` left the others waiting).
- An estimator built with ``update=False`` that joined the check once, then copied (``copy.deepcopy``: a target
  network, an EMA copy of the model; ``pickle``): the copy joins the check again (before, it carried the flag that
  said "checked", skipped the check, and the other rank waited in its update's collective).

Each case records, per rank, the error it raised (type and message) or what it computed; the group's timeout (20 s)
turns a hang into an error, so no case waits forever."""

from __future__ import annotations

import copy
import pickle

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

import storch
from _ddp import Model, run_steps, shard
from _gloo import outcome, rank_process


class RunningMeanScore(storch.Estimator):
    """A third party's score function whose baseline is a running mean of the step's mean cost (its state).

    Written with public storch names only, as a plugin would be. ``target``: which costs the mean follows (a
    state option: a mean of other costs means something else); ``decay`` and ``update``: how it evolves."""

    def __init__(self, plate: str, n_samples: int = 2, decay: float = 0.9, target: str = "total",
                 update: bool = True) -> None:
        super().__init__(plate, n_samples)
        self.decay, self.target, self.update = decay, target, update
        self.has_update = update
        self.register_buffer("mean", torch.zeros(()))

    def baseline(self, node, cost):
        return self.mean if self.target in ("total", cost.name) else None

    def update_parameters(self, nodes, loss) -> None:
        costs = [frame.tensor.mean() for node in nodes for name, frame in node.frames.items()
                 if self.target in ("total", name)]
        mean = storch.distributed.all_reduce_mean(torch.stack(costs).mean().detach(), owner=self, what="mean costs")
        self.mean.mul_(self.decay).add_((1 - self.decay) * mean)

    def state_options(self) -> dict:
        return {"target": self.target}

    def evolution_options(self) -> dict:
        return {"decay": self.decay, "update": True} if self.update else {"update": False}


class ThirdPartyModel(torch.nn.Module):
    """:class:`_ddp.Model` with a :class:`RunningMeanScore` estimator."""

    def __init__(self, **options) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initialisation in every process
        self.enc, self.dec = torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)
        self.est = RunningMeanScore("z", **options)

    def forward(self, x: torch.Tensor) -> None:
        x = storch.denote_independent(x, 0, "data")
        z = self.est(Bernoulli(logits=self.enc(x)))
        storch.add_cost(F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(), name="rec")


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    with rank_process(rank, world, port, outdir, timeout=20) as out:
        x = shard(world, rank)
        g = torch.Generator().manual_seed(10 + rank)
        # the same options on every rank: no error, and the ranks hold the same running mean
        model = ThirdPartyModel()
        out["same"] = outcome(lambda: (run_steps(model, x, g), float(model.est.mean),
                                        storch.distributed.ranks_agree([model.est.mean], model.est))[1:])
        dist.barrier()
        # an option that changes how the state evolves (decay), and one that gives it its meaning (target)
        out["decay"] = outcome(lambda: run_steps(ThirdPartyModel(decay=0.9 if rank == 0 else 0.5), x, g))
        dist.barrier()
        out["target"] = outcome(lambda: run_steps(ThirdPartyModel(target="total" if rank == 0 else "rec"), x, g))
        dist.barrier()
        # update=False on rank 1 only: it joins the check where its update would run (before: a hang)
        out["update"] = outcome(lambda: run_steps(ThirdPartyModel(update=rank == 0), x, g))
        dist.barrier()
        # copies of an estimator built with update=False that joined the check (every rank has it: no error), then
        # copied on rank 1, while rank 0 builds one that updates: the copy joins the check again (before: it
        # carried the flag, skipped the check, and rank 0 waited in its update's collective)
        ma = {"n_samples": 2, "baseline": "moving_average"}
        for case, copied in (("deepcopy", copy.deepcopy), ("pickle", lambda m: pickle.loads(pickle.dumps(m)))):
            skipping = Model("score", {**ma, "update": False})
            out[f"{case}_checked"] = outcome(lambda: run_steps(skipping, x, g, 1))
            dist.barrier()
            other = Model("score", ma) if rank == 0 else copied(skipping)
            out[case] = outcome(lambda: run_steps(other, x, g, 1))
            dist.barrier()
