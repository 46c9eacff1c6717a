"""Train the digits VAE with DistributedDataParallel and any storch estimator.

Run (CPU, gloo, two processes)::

    torchrun --nproc_per_node=2 examples/distributed/train_ddp.py --estimator relax
    torchrun --nproc_per_node=2 examples/distributed/train_ddp.py --estimator score --n-samples 4 \\
        --baseline moving_average --find-unused-parameters

Each process trains on its shard of every batch. DDP averages the model's gradients; the
estimator keeps its own state in sync (storch.distributed): moving-average baselines average
their statistics over the ranks, RELAX/REBAR/LAX average their variance gradient, and a lazily
built control-variate network is broadcast from rank 0. Every rank samples from its own
generator (``storch.Graph(generator=...)``), so the run is reproducible. At the end, rank 0
prints the validation -ELBO and whether the estimator state is identical on every rank.

Needs storch-core, the estimator family of the chosen estimator, and storch-benchmarks (the
VAE model and the bundled scikit-learn digits).
"""

from __future__ import annotations

import argparse
import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import storch
from storch_bench.data import load_binary_digits
from storch_bench.models import VAE, negative_elbo, storch_surrogate


class TrainingStep(torch.nn.Module):
    """What DDP wraps: the VAE and its estimator (a submodule, so its learned parts travel with it).

    ``forward`` builds the step's graph and returns the surrogate loss: DDP with
    ``find_unused_parameters=True`` finds the used parameters from the forward's outputs.
    """

    def __init__(self, vae: VAE, estimator: storch.Estimator) -> None:
        super().__init__()
        self.vae, self.estimator = vae, estimator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        storch_surrogate(self.vae, self.estimator, x)  # the one-sample model code, the costs
        return storch.surrogate_loss()


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--estimator", default="score")
    p.add_argument("--n-samples", type=int, default=None)
    p.add_argument("--baseline", default=None, help="score's baseline option")
    p.add_argument("--latent", choices=("bernoulli", "categorical"), default="bernoulli")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=50, help="global batch size (split over the ranks)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-train", type=int, default=None, help="use only the first N training points")
    p.add_argument("--find-unused-parameters", action="store_true")
    return p.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    try:
        train(args, dist.get_rank(), dist.get_world_size())
    finally:
        # DDP's reducer (held in reference cycles) must be gone before the group is destroyed, and
        # every rank done with its collectives before any rank tears the group down; otherwise gloo
        # may abort a process at exit ("terminate called without an active exception")
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def train(args: argparse.Namespace, rank: int, world: int) -> None:
    train_data, valid = load_binary_digits()
    if args.max_train:
        train_data = train_data[: args.max_train]
    options = {k: v for k, v in (("n_samples", args.n_samples), ("baseline", args.baseline)) if v is not None}
    torch.manual_seed(args.seed)  # the same initialisation everywhere (DDP also broadcasts it)
    model = TrainingStep(VAE(args.latent), storch.estimator(args.estimator, plate="z", **options))
    ddp = DDP(model, find_unused_parameters=args.find_unused_parameters)
    optimizer = torch.optim.Adam(model.vae.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(1000 * args.seed + rank)  # this rank's samples
    order = torch.Generator().manual_seed(args.seed)  # the same batch order on every rank
    shard = args.batch_size // world
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(train_data), generator=order)
        for i in range(0, len(train_data) - args.batch_size + 1, args.batch_size):
            batch = train_data[perm[i: i + args.batch_size]]
            x = batch[rank * shard: (rank + 1) * shard]  # this rank's shard
            with storch.Graph(generator=generator):
                ddp(x)
                storch.backward()  # backward (DDP averages gradients), estimator updates in sync
            optimizer.step()
            optimizer.zero_grad()
        if rank == 0:
            elbo = negative_elbo(model.vae, valid, torch.Generator().manual_seed(0))
            print(f"epoch {epoch}: validation -ELBO {elbo:.2f} nats", flush=True)
    state = [t.float() for t in model.estimator.state_dict().values() if isinstance(t, torch.Tensor)]
    state += [v.float() for v in getattr(model.estimator, "moving_averages", {}).values()]
    agree = storch.distributed.ranks_agree(state, model.estimator)
    params_agree = storch.distributed.ranks_agree(list(model.vae.parameters()))
    if rank == 0:
        print(f"{args.estimator} on {world} processes: estimator state identical on every rank: {agree}; "
              f"model parameters identical: {params_agree}", flush=True)


if __name__ == "__main__":
    main()
