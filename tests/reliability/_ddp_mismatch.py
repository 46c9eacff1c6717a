"""The parts of test_ddp_mismatch.py: a per-rank worker (run by torch.multiprocessing.spawn, without DDP: only
storch's own collectives) whose ranks disagree in ways that used to leave one rank waiting forever in a
collective the others never ran. Each case records, per rank, the error it raised (type and message) or
what it computed; the group's timeout (20 s) turns a hang into an error, so no case waits forever."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

import storch
import _ddp_mapo
from _ddp import Episode, Model, ScalarBaseline, run_steps, shard
from _gloo import outcome, rank_process


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    with rank_process(rank, world, port, outdir, timeout=20) as out:
        x = shard(world, rank)
        g = torch.Generator().manual_seed(10 + rank)
        # different estimators: rank 0 a moving average, rank 1 NVIL (a lazily built network, broadcast, then
        # a moving average and the regression's gradients): used to hang in NVIL's collectives on one rank
        ma = {"n_samples": 2, "baseline": "moving_average"}
        other = {"n_samples": 2, "baseline": "learned", "hidden": 4} if rank == 1 else ma
        out["nvil"] = outcome(lambda: run_steps(Model("score", other), x, g))
        dist.barrier()
        # the same, once the network is built (NVIL's first collective is its moving average's)
        models = [Model("score", ma), Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4})]
        out["nvil_built"] = outcome(lambda: (run_steps(models[1], x, g, 1), run_steps(models[rank], x, g)))
        dist.barrier()
        # a score estimator on one rank, RELAX on the other
        out["relax"] = outcome(lambda: run_steps(Model("score", ma) if rank == 0 else Model("relax", {}), x, g))
        dist.barrier()
        # MAPO buffers of different sizes (rank 0 keeps 2 sequences per key, rank 1 keeps 3): each rank would keep
        # another buffer from the same gathered offers
        out["mapo_buffer"] = outcome(lambda: _ddp_mapo.train(_ddp_mapo.Seq(buffer=2 + rank), [rank], world, range(1), [g]))
        dist.barrier()
        # options that change how the state evolves (before: no error, the ranks' states drifted apart silently):
        # a moving average's decay, NVIL's lr (its network's broadcast is the first collective), RELAX's lr
        out["decay"] = outcome(lambda: run_steps(Model("score", {**ma, "decay": 0.9 if rank == 0 else 0.5}), x, g))
        dist.barrier()
        learned = {"n_samples": 2, "baseline": "learned", "hidden": 4}
        out["nvil_lr"] = outcome(lambda: run_steps(Model("score", {**learned, "lr": 0.01 * (rank + 1)}), x, g))
        dist.barrier()
        out["relax_lr"] = outcome(lambda: run_steps(Model("relax", {"lr": 0.01 * (rank + 1)}), x, g))
        dist.barrier()
        # update=False on rank 1 only (before: rank 0 waited in its moving average's collective, a hang), for a
        # moving average and for RELAX once its network is built (its first collective is then its update's)
        out["update_ma"] = outcome(lambda: run_steps(Model("score", {**ma, "update": rank == 0}), x, g))
        dist.barrier()
        relaxes = [Model("relax", {}), Model("relax", {"update": False})]
        for m in relaxes:  # builds both networks (broadcast: the same collective on every rank)
            with storch.Graph(generator=g):
                m(x)
        out["update_relax"] = outcome(lambda: run_steps(relaxes[rank], x, g))
        dist.barrier()
        # the same through storch.surrogate_loss().backward() (review r-30: its update probe ran only the updates, so
        # rank 0 waited in its moving average's collective), order 1 (the one-node loss) and order 2 (the general one)
        for order in (1, 2):
            model = Model("score", {**ma, "update": rank == 0}, return_loss=False)

            def surrogate_backward() -> None:
                for _ in range(2):
                    with storch.Graph(generator=g):
                        model(x)
                        storch.surrogate_loss(order=order).backward()

            out[f"update_ma_surrogate{order}"] = outcome(surrogate_backward)
            dist.barrier()
        # the baseline= module (or NVIL's heads) frozen on rank 1 alone (requires_grad False), before the first step or
        # after one: before, rank 1 returned from the regression before the ranks' check and rank 0 waited in it
        for key, options, before in (("frozen_module_first", {"baseline": "module"}, 0),
                                     ("frozen_module", {"baseline": "module"}, 1),
                                     ("frozen_nvil", learned, 1)):
            model = Model("score", {"n_samples": 2, "lr": 0.05, **options})

            def frozen_on_rank_1() -> None:
                run_steps(model, x, g, before)
                model.est.baseline_fn.requires_grad_(rank == 0)
                run_steps(model, x, g, 1)

            out[key] = outcome(frozen_on_rank_1)
            dist.barrier()
        # frozen on every rank: no error, and the baseline stays as it was
        model = Model("score", {"n_samples": 2, "lr": 0.05, "baseline": "module"})
        model.est.baseline_fn.requires_grad_(False)
        out["frozen_everywhere"] = outcome(lambda: (run_steps(model, x, g), float(model.est.baseline_fn.b))[1])
        dist.barrier()
        # update=False on every rank, the module frozen on rank 1 alone: no rank updates, so no error (before: rank 1
        # declared no options and never joined the check of a skipped update that rank 0 waited in); and a module
        # frozen at construction on rank 1 alone, which never updates (before: rank 0 waited in its update's check)
        model = Model("score", {"n_samples": 2, "lr": 0.05, "baseline": "module", "update": False})
        model.est.baseline_fn.requires_grad_(rank == 0)
        out["frozen_update_none"] = outcome(lambda: run_steps(model, x, g, 1))
        dist.barrier()
        model = Model("score", {"n_samples": 2, "lr": 0.05, "baseline": ScalarBaseline().requires_grad_(rank == 0)})
        out["frozen_at_construction"] = outcome(lambda: run_steps(model, x, g, 1))
        dist.barrier()
        # update=False on every rank: no error (one check, on the first step), and the averages stay unset
        model = Model("score", {**ma, "update": False})
        out["update_none"] = outcome(lambda: (run_steps(model, x, g), dict(model.est.moving_averages))[1])
        dist.barrier()
        # ... whatever their decay or lr (no state evolves)
        model = Model("score", {**ma, "update": False, "decay": 0.9 - 0.4 * rank})
        out["update_none_decay"] = outcome(lambda: (run_steps(model, x, g), dict(model.est.moving_averages))[1])
        dist.barrier()
        model = Model("relax", {"update": False, "lr": 0.01 * (rank + 1)})
        out["update_none_relax_lr"] = outcome(lambda: (run_steps(model, x, g), {})[1])
        dist.barrier()
        # an episode with no steps on rank 1 (T=3 on rank 0), first after two full episodes, then at the first step
        for key, first in (("no_costs", 2), ("no_costs_first", 0)):
            ep = Episode()
            out[key] = outcome(lambda: (run_steps(ep, 3, g, first), run_steps(ep, 3 if rank == 0 else 0, g, 1)))
            dist.barrier()
        # no rank has costs: each raises the one-process error (nobody waits)
        out["no_costs_all"] = outcome(lambda: run_steps(Episode(), 0, g, 1))
        dist.barrier()
        # single-rank use (synchronisation off): a step without costs on rank 0 alone raises there at once (its
        # estimators take part in no collective, so it joins none)
        if rank == 0:
            local = Model("score", ma)
            storch.distributed.synchronize(local, enabled=False)

            def uncosted() -> None:
                with storch.Graph(generator=g):
                    local.est(Bernoulli(logits=local.enc(storch.denote_independent(x, 0, "data"))))
                    storch.backward()

            out["no_costs_local"] = outcome(uncosted)
        dist.barrier()
        # an empty shard on rank 1
        model = Model("score", ma)
        out["empty"] = outcome(lambda: (run_steps(model, x, g, 1), run_steps(model, x if rank == 0 else x[:0], g, 1)))
        dist.barrier()
        # evaluation under no_grad with an empty shard on rank 1: no rank is in a collective, so rank 1 raises the
        # one-process error at once and rank 0 finishes its evaluation (joining a check there would wait forever)
        model = Model("score", ma)

        def evaluate() -> float:
            with torch.no_grad(), storch.Graph(generator=g):
                xs = storch.denote_independent(x if rank == 0 else x[:0], 0, "data")
                z = model.est(Bernoulli(logits=model.enc(xs)))
                storch.add_cost(F.binary_cross_entropy_with_logits(model.dec(z), xs, reduction="none").sum(),
                                name="rec")
                return float(storch.cost_estimates()["rec"].mean())

        out["empty_eval"] = outcome(evaluate)
        dist.barrier()
        # different cost names: not an error, each name averaged over the ranks that have it
        model = Model("score", ma)

        def named() -> dict:
            for _ in range(2):
                with storch.Graph(generator=g):
                    xs = storch.denote_independent(x, 0, "data")
                    z = model.est(Bernoulli(logits=model.enc(xs)))
                    cost = F.binary_cross_entropy_with_logits(model.dec(z), xs, reduction="none").sum()
                    storch.add_cost(cost, name="rec" if rank == 0 else "other")
                    storch.backward()
            return {k: v.clone() for k, v in model.est.moving_averages.items()}

        out["names"] = outcome(named)
        # afterwards the ranks still agree on what they run: one more synchronised step of both
        out["after"] = outcome(lambda: (run_steps(model, x, g, 1), storch.distributed.ranks_agree(
            [v for _, v in sorted(model.est.moving_averages.items())], model.est))[1])
