"""The MAPO part of the DDP test (run inside ``_ddp.worker``, on its :func:`_ddp.data`): ``sum_and_sample`` with ``buffer=`` keeps per data
point (key) the best sequences found so far; the sampler deals the keys to the ranks anew at every step (as
``DistributedSampler(shuffle=True)`` does per epoch), so a key's memory must be on whichever rank gets it.

The one-process reference runs each step as the ranks do, one graph per shard with that rank's generator, and
averages the gradients: the shards hold different keys, so a shard's graph never reads a buffer entry the other
shard's graph of the same step wrote, and the reference draws exactly the ranks' samples."""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from torch.distributions import Categorical

import storch
from _ddp import SHARD, data

STEPS, SAVE_AT = 5, 3
# seeds every key's buffer at its first step; longer than the episodes (3 tokens), it is never a whole sequence of
# the graph, so never offered: a rank that meets a key first in another rank's offers must seed it itself
MEMORY = torch.tensor([[2, 2, 2, 2]])


class Seq(torch.nn.Module):
    """Three tokens of vocabulary 3 per data point; the cost of a sequence depends on the data point."""

    def __init__(self, buffer: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Linear(6, 3)
        self.W = torch.nn.Parameter(torch.randn(3, 3))
        self.register_buffer("C", torch.randn(6, 27))
        self.est = storch.estimator("sum_and_sample", plate="seq", buffer=buffer, n_samples=2, memory=MEMORY,
                                    baseline="leave_one_out")

    def forward(self, x: torch.Tensor, keys: torch.Tensor):
        xs = storch.denote_independent(x, 0, "data")
        h = self.enc(xs)
        x0 = self.est(Categorical(logits=h), memory_key=keys)
        x1 = self.est(Categorical(logits=h + F.one_hot(x0, 3).float() @ self.W))
        x2 = self.est(Categorical(logits=h + F.one_hot(x1, 3).float() @ self.W))
        storch.add_cost((F.one_hot(x0 * 9 + x1 * 3 + x2, 27).float() * (xs @ self.C)).sum(-1))
        return storch.surrogate_loss()


def keys_of(step: int, rank: int, world: int) -> torch.Tensor:
    """The keys (data indices) dealt to ``rank`` at ``step``: a new permutation every step."""
    perm = torch.randperm(world * SHARD, generator=torch.Generator().manual_seed(50 + step))
    return perm[rank * SHARD:(rank + 1) * SHARD]


def train(model, ranks: list[int], world: int, steps: range, generators: list) -> tuple[list, list]:
    """SGD steps; per step, one graph per rank in ``ranks`` (one: a DDP rank; all: the one-process reference),
    the gradients averaged over them. Returns the gradients and the buffer (``_extra_state``) after each step."""
    inner = model.module if hasattr(model, "module") else model
    params = [inner.enc.weight, inner.enc.bias, inner.W]
    opt = torch.optim.SGD(params, lr=0.1)
    x = data(world)
    grads, buffers = [], []
    for s in steps:
        for rank, g in zip(ranks, generators):
            keys = keys_of(s, rank, world)
            with storch.Graph(generator=g):
                model(x[keys], keys)
                storch.backward()
        for p in params:  # the mean over the graphs (DDP's average over the ranks)
            p.grad /= len(ranks)
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
        buffers.append(inner.est.state_dict()["_extra_state"]["entries"])
    return grads, buffers


def worker(rank: int, world: int) -> dict:
    """DDP with the ranks' buffers after each step; then a checkpoint saved on rank 0 after ``SAVE_AT`` steps,
    loaded on every rank, and the remaining steps from there (with the generator where it was)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(100 + rank)
    grads, buffers = train(DDP(Seq()), [rank], world, range(STEPS), [g])
    g = torch.Generator().manual_seed(100 + rank)
    ddp = DDP(Seq())
    train(ddp, [rank], world, range(SAVE_AT), [g])
    saved = io.BytesIO()
    torch.save(ddp.module.state_dict(), saved)
    blob = [saved.getvalue()]
    dist.broadcast_object_list(blob, src=0)
    resumed = DDP(Seq())
    resumed.module.load_state_dict(torch.load(io.BytesIO(blob[0]), weights_only=False))
    resumed_grads, resumed_buffers = train(resumed, [rank], world, range(SAVE_AT, STEPS), [g])
    return {"grads": grads, "buffers": buffers, "resumed_grads": resumed_grads, "resumed_buffers": resumed_buffers}


def reference(world: int) -> tuple[list, list]:
    return train(Seq(), list(range(world)), world, range(STEPS),
                 [torch.Generator().manual_seed(100 + r) for r in range(world)])
