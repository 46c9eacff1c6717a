"""The parts of test_ddp_frozen.py: a per-rank worker (run by torch.multiprocessing.spawn, two gloo processes, without
DDP: only storch's own collectives) whose ranks freeze (``requires_grad=False``) different parameters of what an
estimator trains, or whose step trains nothing on one rank. Each used to leave one rank out of the ranks' check while
the others waited in it. Each case records, per rank, the error it raised (type and message) or what it computed; the
group's timeout (10 s) turns a hang into an error, so no case waits forever."""

from __future__ import annotations

import copy
from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Normal

import storch
from _ddp import Model, run_steps, shard
from _gloo import outcome, rank_process


class TwoParameters(torch.nn.Module):
    """A user's baseline module with two learned numbers of one shape (b = a + c)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(()))
        self.c = torch.nn.Parameter(torch.zeros(()))

    def forward(self, node, cost):
        return self.a + self.c


def latent(model: Model, h) -> torch.distributions.Distribution:
    """The latent of ``model``'s step: Bernoulli, or for LAX (which needs rsample) a Normal."""
    return Normal(h, 1.0) if model.est.name == "lax" else Bernoulli(logits=h)


class LaxModel(Model):
    """:class:`_ddp.Model` with LAX on a Normal latent (LAX needs a distribution with rsample)."""

    def __init__(self, options: dict) -> None:
        super().__init__("lax", options)

    def forward(self, x: torch.Tensor):
        x = storch.denote_independent(x, 0, "data")
        z = self.est(latent(self, self.enc(x)))
        storch.add_cost(F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(), name="rec")
        return storch.surrogate_loss()


def model_of(name: str, options: dict) -> Model:
    return LaxModel(options) if name == "lax" else Model(name, options)


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.requires_grad_(False)


def step(model: Model, x: torch.Tensor, g: torch.Generator, credit: bool = True) -> None:
    """One step of ``model`` whose cost credits the estimator's node or not (``credit=False``: trains nothing)."""
    with storch.Graph(generator=g):
        xs = storch.denote_independent(x, 0, "data")
        z = model.est(latent(model, model.enc(xs)))
        storch.add_cost(F.binary_cross_entropy_with_logits(model.dec(z), xs, reduction="none").sum(), name="rec",
                        credit=credit)
        storch.backward()


def state(est) -> dict:
    """The estimator's parameters, Adam's moments and update count."""
    out = {name: p.detach().clone() for name, p in est.named_parameters()}
    opt = est._optimizer
    if opt is not None:
        for i, s in enumerate(opt.state.values()):
            out.update({f"adam{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    out["update_steps"] = torch.tensor(est.update_steps)
    return out


def worker(rank: int, world: int, port: int, outdir: str, only: Optional[Iterable[str]] = None) -> None:
    """Every case (or those named in ``only``: a case that hangs kills the group, and the cases after it)."""
    import torch.distributed as dist

    with rank_process(rank, world, port, outdir, timeout=10) as out:
        x = shard(world, rank)
        g = torch.Generator().manual_seed(10 + rank)
        for case in CASES:
            if only is None or case.__name__ in only:
                out.update(case(rank, x, g))
                dist.barrier()


def relaxed_frozen_on_rank_1(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """The relaxed family: every parameter of the control variate frozen on rank 1 alone, after one step (RELAX: its
    network built) or before the first (REBAR: η and λ); before, rank 1's loss_graph_values returned () and its
    update_from returned before the ranks' check, where rank 0 waited. LAX (its default network, built at the first
    step) shares that update (VarianceTrained)."""
    import torch.distributed as dist

    out = {}
    for key, name, before in (("relax_all", "relax", 1), ("rebar_all_first", "rebar", 0), ("lax_all", "lax", 1)):
        model = model_of(name, {})

        def frozen_on_rank_1() -> None:
            with storch.Graph(generator=g):
                model(x)  # (builds a lazily built network: it is broadcast here, on every rank)
            run_steps(model, x, g, before)
            model.est.requires_grad_(rank == 0)
            run_steps(model, x, g, 1)

        out[key] = outcome(frozen_on_rank_1)
        dist.barrier()
    return out


def relaxed_frozen_apart(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """REBAR with one of its two parameters (of one shape) frozen, another on each rank: before, no error, and the
    ranks stepped different parameters."""
    model = Model("rebar", {})

    def one_each() -> dict:
        getattr(model.est, ("eta", "log_temperature")[rank]).requires_grad_(False)
        run_steps(model, x, g, 1)
        return state(model.est)

    return {"rebar_some": outcome(one_each)}


def relaxed_frozen_everywhere(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """Every parameter of REBAR's frozen on every rank: no error, nothing changes."""
    model = Model("rebar", {})
    frozen(model.est)
    return {"rebar_all_everywhere": outcome(lambda: (run_steps(model, x, g, 2), state(model.est))[1])}


def relaxed_uncredited_on_rank_1(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """One rank's step trains nothing (its cost with credit=False): it adds zeros to the ranks' mean, as data points
    of the global batch that no credited cost reaches would; before, rank 1 returned before the ranks' check. With
    the step of rank 0's alone, unsynchronised, from the same state and draws."""
    out = {}
    for name in ("relax", "lax"):
        model = model_of(name, {})
        run_steps(model, x, g, 1)
        local = copy.deepcopy(model)
        storch.distributed.synchronize(local, enabled=False)
        g_local = torch.Generator()
        g_local.set_state(g.get_state())
        out[f"{name}_uncredited_before"] = state(model.est)
        out[f"{name}_uncredited"] = outcome(lambda: (step(model, x, g, credit=rank == 0), state(model.est))[1])
        step(local, x, g_local, credit=rank == 0)
        out[f"{name}_uncredited_local"] = state(local.est)
    return out


def relaxed_uncredited_everywhere(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """Every rank's step trains nothing: no error, no step (as in one process)."""
    model = Model("relax", {})
    run_steps(model, x, g, 1)
    before = state(model.est)
    return {"relax_uncredited_everywhere": outcome(lambda: (step(model, x, g, credit=False), state(model.est))[1]),
            "relax_uncredited_everywhere_before": before}


def score_frozen_built_on_rank_1(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """score: a baseline= module frozen at construction on rank 1 alone (has_update False: it joined no check), with
    update=True there or update=False (its evolution_options were {} either way)."""
    import torch.distributed as dist

    out = {}
    for key, update in (("score_frozen_built", True), ("score_frozen_built_no_update", rank == 0)):
        model = Model("score", {"n_samples": 2, "lr": 0.05, "update": update,
                                "baseline": frozen(TwoParameters()) if rank == 1 else TwoParameters()})
        out[key] = outcome(lambda: run_steps(model, x, g, 2))
        dist.barrier()
    return out


def score_frozen_built_everywhere(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """score: a baseline= module frozen at construction on every rank: no error, the baseline unchanged."""
    model = Model("score", {"n_samples": 2, "lr": 0.05, "baseline": frozen(TwoParameters())})
    return {"score_frozen_built_everywhere": outcome(
        lambda: (run_steps(model, x, g, 2), {n: p.detach().clone() for n, p in model.est.named_parameters()})[1])}


def score_frozen_apart(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """score: ranks that freeze different parameters of the baseline, one of two of the same shape each (the ranks'
    check names them since f-ddp4; before, no error, and each rank trained another parameter)."""
    model = Model("score", {"n_samples": 2, "lr": 0.05, "baseline": TwoParameters()})

    def other_halves() -> dict:
        getattr(model.est.baseline_fn, "ac"[rank]).requires_grad_(False)
        run_steps(model, x, g, 1)
        return {n: p.detach().clone() for n, p in model.est.named_parameters()}

    return {"score_some": outcome(other_halves)}


def score_uncredited_on_rank_1(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """score's estimators with state, a step whose cost has credit=False on rank 1 alone: no early return there (the
    moving average averages over the ranks that have the cost; NVIL's regression adds zeros): no error, and the
    ranks hold the same state."""
    import torch.distributed as dist

    out = {}
    for baseline in ("moving_average", "learned"):
        model = Model("score", {"n_samples": 2, "baseline": baseline, "hidden": 4, "lr": 0.05})

        def uncredited() -> bool:
            run_steps(model, x, g, 1)
            step(model, x, g, credit=rank == 0)
            est = model.est
            tensors = [v for _, v in sorted(est.moving_averages.items())] + [p.detach() for p in est.parameters()]
            return storch.distributed.ranks_agree(tensors, est)

        out[f"score_uncredited_{baseline}"] = outcome(uncredited)
        dist.barrier()
    return out


def two_costs(model: Model, x: torch.Tensor, g: torch.Generator, credit_b: bool = True) -> None:
    """One step with two costs, ``"rec"`` (credited) and ``"b"`` (credited or not), each with its own NVIL head."""
    with storch.Graph(generator=g):
        xs = storch.denote_independent(x, 0, "data")
        z = model.est(Bernoulli(logits=model.enc(xs)))
        bce = F.binary_cross_entropy_with_logits(model.dec(z), xs, reduction="none")
        storch.add_cost(bce.sum(), name="rec")
        storch.add_cost(bce[..., :3].sum() * 2, name="b", credit=credit_b)
        storch.backward()


def nvil_state(est) -> dict:
    """NVIL's state by name: ψ, Adam's first moments (``exp_avg.<parameter>``: linear in the gradient stepped along),
    the running means c (``c.<cost>``) and the update count."""
    out = {name: p.detach().clone() for name, p in est.named_parameters()}
    for name, p in est.named_parameters():
        if p in est._optimizer.state:
            out[f"exp_avg.{name}"] = est._optimizer.state[p]["exp_avg"].clone()
    out.update({f"c.{k}": v.clone() for k, v in est.moving_averages.items()})
    out["update_steps"] = torch.tensor(est.update_steps)
    return out


def score_nvil_uncredited(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """NVIL's regression where rank 1's step credits a head on none of its data points: its only cost with
    credit=False (``one``), or the second of two costs (``two``: head "rec" trained on both ranks, head "b" on rank 0
    alone). Each rank records its state before, after the synchronised step, and after the same step taken alone
    (synchronisation off, from the same state and draws). The global batch's regression loss of a head is a mean over
    its credited data points: with equal shards, the mean of the ranks' gradients over the ranks that have some."""
    out = {}
    for key in ("one", "two"):
        model = Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05})
        with storch.Graph(generator=g):
            model(x)  # (builds head "rec", broadcast from rank 0)
        if key == "one":
            run_steps(model, x, g, 1)
            taken = lambda m, gen: step(m, x, gen, credit=rank == 0)  # noqa: E731
        else:
            two_costs(model, x, g)  # (builds head "b", broadcast from rank 0)
            taken = lambda m, gen: two_costs(m, x, gen, credit_b=rank == 0)  # noqa: E731
        local = copy.deepcopy(model)
        storch.distributed.synchronize(local, enabled=False)
        g_local = torch.Generator()
        g_local.set_state(g.get_state())
        out[f"nvil_uncredited_{key}_before"] = nvil_state(model.est)
        out[f"nvil_uncredited_{key}"] = outcome(lambda: (taken(model, g), nvil_state(model.est))[1])
        taken(local, g_local)
        out[f"nvil_uncredited_{key}_local"] = nvil_state(local.est)
    return out


def score_frozen_built_and_no_update(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """score: a baseline= module frozen at construction on rank 0 (update=True: never trained), update=False on rank 1
    (not frozen): neither rank's update runs (before, refused: their evolution options differed in the note that
    says the module was frozen at construction, which acts on nothing where no rank updates)."""
    model = Model("score", {"n_samples": 2, "lr": 0.05, "update": rank == 0,
                            "baseline": frozen(TwoParameters()) if rank == 0 else TwoParameters()})
    return {"score_frozen_built_and_no_update": outcome(
        lambda: (run_steps(model, x, g, 2), {n: p.detach().clone() for n, p in model.est.named_parameters()})[1])}


CASES = (relaxed_frozen_on_rank_1, relaxed_frozen_apart, relaxed_frozen_everywhere, relaxed_uncredited_on_rank_1,
         relaxed_uncredited_everywhere, score_frozen_built_on_rank_1, score_frozen_built_everywhere,
         score_frozen_apart, score_uncredited_on_rank_1, score_nvil_uncredited, score_frozen_built_and_no_update)
