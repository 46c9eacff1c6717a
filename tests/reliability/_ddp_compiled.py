"""The parts of test_ddp_compiled.py: a per-rank worker (run by torch.multiprocessing.spawn, without DDP: only
storch's own collectives) whose step is compiled by ``storch.compile(backend=None)`` and whose rank 1 built its
estimator with ``update=False`` while rank 0 updates. Each replayed call's ``.backward()`` runs the updates; the
skipping rank must join the ranks' check there, as the eager ``storch.backward()`` and
``surrogate_loss().backward()`` have it do (before, the compile recorder kept only the updating estimators: rank 0
waited in its update's collective). Each case records, per rank, the error it raised (type and message) or what it
computed; the group's timeout (10 s) turns a hang into an error, so no case waits forever."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

import storch
from _ddp import Model, shard
from _gloo import outcome, rank_process


def _compiled_steps(model, x, steps: int = 2) -> None:
    @storch.compile(backend=None)
    def step(x):
        with storch.Graph():
            return model(x)

    for _ in range(steps):
        step(x).backward()


class TwoSurrogates(torch.nn.Module):
    """A step that builds a surrogate after its first estimator (``a``, update=False) and returns the one built after
    its second (``b``): in one process the first records no update, and a compiled step records the second's."""

    def __init__(self, b_updates: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc_a, self.enc_b = torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)
        self.a = storch.estimator("score", plate="za", n_samples=2, baseline="moving_average", update=False)
        self.b = storch.estimator("score", plate="zb", n_samples=2, baseline="moving_average", update=b_updates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = storch.denote_independent(x, 0, "data")
        za = self.a(Bernoulli(logits=self.enc_a(x)))
        storch.add_cost(F.binary_cross_entropy_with_logits(za, x[..., :4], reduction="none").sum(), name="a")
        storch.surrogate_loss()  # (a first surrogate: its estimators skip their updates)
        zb = self.b(Bernoulli(logits=self.enc_b(x)))
        storch.add_cost(F.binary_cross_entropy_with_logits(zb, x[..., 2:], reduction="none").sum(), name="b")
        return storch.surrogate_loss()


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    with rank_process(rank, world, port, outdir, timeout=10) as out:
        x = shard(world, rank)
        torch.manual_seed(10 + rank)
        ma = {"n_samples": 2, "baseline": "moving_average"}
        # update=False on rank 1: a moving average (its step has no estimator state to replay, only the skipped
        # update: the program gets the probe for it) ...
        out["update_ma"] = outcome(lambda: _compiled_steps(Model("score", {**ma, "update": rank == 0}), x))
        dist.barrier()
        # ... and RELAX (its step replays the control variate's state on both ranks), both networks built eagerly first
        # on every rank (a broadcast: the same collectives on every rank)
        relaxes = [Model("relax", {}), Model("relax", {"update": False})]
        for m in relaxes:
            with storch.Graph():
                m(x)
        out["update_relax"] = outcome(lambda: _compiled_steps(relaxes[rank], x))
        dist.barrier()
        # update=False on every rank: no error (one check, at the first call's backward), and no average is kept
        model = Model("score", {**ma, "update": False})
        out["update_none"] = outcome(lambda: (_compiled_steps(model, x, 3), dict(model.est.moving_averages))[1])
        dist.barrier()
        # a step with two surrogates, the first after an update=False estimator only: the same on every rank (no
        # error: the returned surrogate updates b, and a joins the check there) ...
        two = TwoSurrogates(b_updates=True)
        out["two_surrogates"] = outcome(lambda: (_compiled_steps(two, x), dict(two.b.moving_averages))[1])
        dist.barrier()
        # ... and with b's update=False on rank 1 (the returned surrogate's skipped updates join the check)
        out["two_surrogates_update_b"] = outcome(lambda: _compiled_steps(TwoSurrogates(b_updates=rank == 0), x))
        dist.barrier()
