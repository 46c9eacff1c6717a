"""The DDP test's parts: the model, the per-rank worker (run by torch.multiprocessing.spawn) and
the single-process reference that draws exactly the ranks' samples.

Each rank trains on its shard of the batch inside ``storch.Graph(generator=g_rank)``. The
single-process reference trains on the whole batch in one graph, under :class:`ShardedRandom`,
a TorchFunctionMode that draws every random tensor whose dim 1 is the data plate shard by shard,
each shard from its rank's generator, and replays every other draw (a lazily built network's
initialisation) on every rank's generator, keeping rank 0's result, as the ranks do (each
builds the network, then rank 0's is broadcast).

The other DDP tests' workers share its model, data (:func:`shard`; ``_ddp_mapo`` keys into :func:`data`) and
:func:`run_steps`, and their test modules :func:`assert_refused_on_every_rank`; the process harness (spawn, process group, record) is in ``_gloo``."""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli
from torch.overrides import TorchFunctionMode

import storch
from storch.runtime.generators import RANDOM_FUNCTIONS

from _gloo import rank_process


SCENARIOS = {
    "score_loo": ("score", {"n_samples": 3, "baseline": "leave_one_out"}, False),
    "score_ma": ("score", {"n_samples": 2, "baseline": "moving_average"}, True),  # find_unused_parameters
    "relax": ("relax", {}, False),
    # NVIL: lazily built heads (broadcast from rank 0) and their regression (gradients averaged)
    "score_learned": ("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05}, False),
    # a user's trainable module: the same regression (its parameters get no model gradient, so DDP must be
    # told they are unused)
    "score_module": ("score", {"n_samples": 2, "baseline": "module", "lr": 0.05}, True),
}
STEPS = 5
SHARD = 4


class Model(torch.nn.Module):
    """A small Bernoulli VAE (the data are binary vectors); the estimator is a submodule."""

    def __init__(self, name: str, options: dict, return_loss: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same initialisation in every process
        self.enc, self.dec = torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)
        if options.get("baseline") == "module":
            options = {**options, "baseline": ScalarBaseline()}
        self.est = storch.estimator(name, plate="z", **options)
        self.return_loss = return_loss

    def forward(self, x: torch.Tensor):
        x = storch.denote_independent(x, 0, "data")
        z = self.est(Bernoulli(logits=self.enc(x)))
        storch.add_cost(F.binary_cross_entropy_with_logits(self.dec(z), x, reduction="none").sum(), name="rec")
        # returned so that DDP(find_unused_parameters=True) sees what the loss depends on
        return storch.surrogate_loss() if self.return_loss else None


class ScalarBaseline(torch.nn.Module):
    """A user's trainable baseline module: one learned number (regressed on the cost by the estimator)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, node, cost):
        return self.b


class Episode(torch.nn.Module):
    """A partition of ``T`` Bernoulli steps with a moving-average baseline (one average per step)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(1, 1)
        self.est = storch.estimator("score", plate="ep", n_samples=2, baseline="moving_average")

    def forward(self, T: int):
        s = torch.zeros(1)
        for _ in range(T):
            a = self.est(Bernoulli(logits=self.lin(s).squeeze(-1)))
            s = s + a
            storch.add_cost(-a, name="r")
        return storch.surrogate_loss()


def episodes(model, T: int, rank: int) -> dict:
    """Three episodes of length ``T`` (the policy is not stepped: the same draws with and without sync)."""
    g = torch.Generator().manual_seed(7 + rank)
    for _ in range(3):
        with storch.Graph(generator=g):
            model(T)
            storch.backward()
    est = model.module.est if hasattr(model, "module") else model.est
    return {k: v.clone() for k, v in est.moving_averages.items()}


def data(world: int) -> torch.Tensor:
    return (torch.rand(world * SHARD, 6, generator=torch.Generator().manual_seed(3)) > 0.5).float()


def shard(world: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s ``SHARD`` data points of :func:`data`."""
    return data(world)[rank * SHARD:(rank + 1) * SHARD]


def assert_refused_on_every_rank(ranks: list[dict], case: str, first: str, second: str) -> None:
    """Every rank recorded (``_gloo.outcome``) for ``case`` the StorchError of ranks that use different estimators,
    naming what rank 0 ran (``first``) and what rank 1 ran (``second``)."""
    for r in range(len(ranks)):
        kind, message = ranks[r][case]
        assert kind == "StorchError", (r, kind, message)
        assert "the ranks use different estimators" in message.lower(), message
        assert f"rank 0: {first}" in message and f"rank 1: {second}" in message, message


def run_steps(model, x: torch.Tensor, g: torch.Generator, n: int = 2) -> None:
    """``n`` steps of ``model`` on ``x`` (no optimizer: only the estimators' updates and collectives run)."""
    for _ in range(n):
        with storch.Graph(generator=g):
            model(x)
            storch.backward()


def estimator_state(model: Model) -> list[torch.Tensor]:
    est = model.est
    # Adam's moments: exp_avg is linear in the gradients the update stepped along (the parameters alone are
    # not: Adam divides the scale out, so a gradient off by a factor would not show in them)
    opt = [] if est._optimizer is None else [
        v.clone() for s in est._optimizer.state.values() for _, v in sorted(s.items()) if torch.is_tensor(v)]
    if est.name == "score":
        # the moving averages (NVIL's c), a learned baseline's parameters and its Adam moments
        return ([v.clone() for _, v in sorted(est.moving_averages.items())]
                + [p.detach().clone() for p in est.parameters()] + opt)
    # relax: λ, η, the residual network's ρ, and Adam's moments
    return [p.detach().clone() for p in est.parameters()] + opt


def train(model, x: torch.Tensor, generator_or_mode, steps: int = STEPS) -> list[list[torch.Tensor]]:
    """``steps`` SGD steps; the model gradients of every step."""
    inner = model.module if hasattr(model, "module") else model
    params = [*inner.enc.parameters(), *inner.dec.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    grads = []
    for _ in range(steps):
        if isinstance(generator_or_mode, torch.Generator):
            with storch.Graph(generator=generator_or_mode):
                model(x)
                storch.backward()
        else:
            with generator_or_mode, storch.Graph():
                model(x)
                storch.backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad()
    return grads


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    with rank_process(rank, world, port, outdir) as out:
        x = shard(world, rank)
        for key, (name, options, unused) in SCENARIOS.items():
            ddp = DDP(Model(name, options), find_unused_parameters=unused)
            grads = train(ddp, x, torch.Generator().manual_seed(100 + rank))
            state = estimator_state(ddp.module)
            out[key] = {"grads": grads, "state": state,
                        "agree": storch.distributed.ranks_agree(state, ddp.module.est)}
        out["world_size"] = storch.distributed.world_size(ddp.module.est)
        # synchronisation switched off (single-rank use): each rank keeps its own moving average
        local = Model("score", {"n_samples": 2, "baseline": "moving_average"})
        storch.distributed.synchronize(local, enabled=False)
        train(DDP(local), x, torch.Generator().manual_seed(100 + rank))
        out["local_world_size"] = storch.distributed.world_size(local.est)
        out["local"] = {"state": estimator_state(local), "agree": storch.distributed.ranks_agree(estimator_state(local))}
        # episodes of different lengths per rank (rank 0: T=3, rank 1: T=5): moving averages per step r@t
        T = 3 + 2 * rank
        out["lengths"] = {"synced": episodes(DDP(Episode()), T, rank)}
        local = Episode()
        storch.distributed.synchronize(local, enabled=False)
        out["lengths"]["local"] = episodes(local, T, rank)
        out["lengths"]["agree"] = storch.distributed.ranks_agree(
            [v for _, v in sorted(out["lengths"]["synced"].items())])
        # ranks that would average values of different sizes: a StorchError on every rank, no abort
        try:
            storch.distributed.all_reduce_mean([torch.zeros(1 + rank)])
            out["mismatch"] = None
        except storch.StorchError as e:
            out["mismatch"] = str(e)
        # a DDP-wrapped submodule returning plate tensors with find_unused_parameters=True: DDP's own
        # autograd.Function (_DDPSink) runs on them; the error names this case and the documented pattern
        torch.manual_seed(0)
        enc, dec = torch.nn.Linear(6, 4), torch.nn.Linear(4, 6)
        est = storch.estimator("score", plate="z", n_samples=2, baseline="leave_one_out")
        ddec = DDP(dec, find_unused_parameters=True)
        try:
            with storch.Graph():
                xs = storch.denote_independent(x, 0, "data")
                z = est(Bernoulli(logits=enc(xs)))
                storch.add_cost(F.binary_cross_entropy_with_logits(ddec(z), xs, reduction="none").sum())
                storch.backward()
            out["sink"] = None
        except storch.PlateError as e:
            out["sink"] = str(e)
        del ddec
        gc.collect()
        dist.barrier()
        # misuse: find_unused_parameters=True with a forward that does not return the loss
        ddp = DDP(Model("score", {"n_samples": 2}, return_loss=False), find_unused_parameters=True)
        try:
            with storch.Graph():
                ddp(x)
                storch.backward()
            out["misuse"] = None
        except storch.StorchError as e:
            out["misuse"] = str(e)
        out["compiled"] = compiled(x, rank, world)
        import _ddp_mapo  # (imported here: it reads this module's data)

        out["mapo"] = _ddp_mapo.worker(rank, world)
        del ddp, local  # (DDP's reducers go before the group does: _gloo.rank_process)


def compiled(x: torch.Tensor, rank: int, world: int) -> dict:
    """storch.compile and DDP. A step that calls the DDP module is refused at its trace, for every backend (the
    replay of the traced program never ran DDP's forward, which arms its reducer: from the second call on each
    rank kept its own gradient, silently). The route the refusal recommends: a compiled step that calls
    ``ddp.module``, its gradients averaged after ``loss.backward()``; against the eager DDP step from the same
    seeds (the same samples: the replay draws from torch's generator as eagerly) and a moving average kept in
    sync by the replayed update."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    name, options, _ = SCENARIOS["score_ma"]
    out: dict = {"refused": {}}
    for backend in (None, "aot_eager"):
        ddp = DDP(Model(name, options))
        step = storch.compile(lambda xx: ddp(xx), backend=backend)
        try:
            with storch.Graph():
                step(x)
            out["refused"][backend] = None
        except Exception as e:  # (before the fix: dynamo's Unsupported with aot_eager)
            out["refused"][backend] = (type(e).__name__, isinstance(e, storch.StorchError), str(e))
        ddp = step = None
    eager, ddp = DDP(Model(name, options)), DDP(Model(name, options))
    model = ddp.module

    @storch.compile(backend=None)
    def step(xx):
        with storch.Graph():
            return model(xx)

    params = [[*m.module.enc.parameters(), *m.module.dec.parameters()] for m in (ddp, eager)]
    opts = [torch.optim.SGD(ps, lr=0.1) for ps in params]
    out["grads"], out["eager_grads"] = [], []
    for i in range(STEPS):
        torch.manual_seed(1000 * i + rank)
        step(x).backward()
        for p in params[0]:
            dist.all_reduce(p.grad)
            p.grad /= world
        torch.manual_seed(1000 * i + rank)
        with storch.Graph():
            eager(x)
            storch.backward()
        out["grads"].append([p.grad.clone() for p in params[0]])
        out["eager_grads"].append([p.grad.clone() for p in params[1]])
        for opt in opts:
            opt.step()
            opt.zero_grad()
    out["state"], out["eager_state"] = estimator_state(model), estimator_state(eager.module)
    out["agree"] = storch.distributed.ranks_agree(out["state"], model.est)
    eager = ddp = None
    gc.collect()
    return out


class ShardedRandom(TorchFunctionMode):
    """Draw as ``len(generators)`` ranks with shards of ``shard`` data points would (see module doc)."""

    def __init__(self, generators: list[torch.Generator], shard: int) -> None:
        super().__init__()
        self.generators, self.shard = generators, shard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func not in RANDOM_FUNCTIONS or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        world, b = len(self.generators), self.shard
        if func is torch.bernoulli and args[0].dim() >= 2 and args[0].shape[1] == world * b:
            p = args[0]
            return torch.cat([torch.bernoulli(p.narrow(1, r * b, b), generator=g)
                              for r, g in enumerate(self.generators)], 1)
        if func in (torch.rand, torch.randn):
            size = tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)) else args
            if len(size) >= 2 and size[1] == world * b:
                return torch.cat([func((size[0], b, *size[2:]), generator=g, **kwargs)
                                  for g in self.generators], 1)
        if getattr(func, "__name__", "").endswith("_"):
            # an in-place draw without a data dim (a network's initialisation): every rank draws it
            for g in self.generators[1:]:
                if args:
                    func(args[0].detach().clone(), *args[1:], **{**kwargs, "generator": g})
                else:  # torch.nn.init passes its tensor by keyword
                    func(**{**kwargs, "tensor": kwargs["tensor"].detach().clone(), "generator": g})
            return func(*args, **{**kwargs, "generator": self.generators[0]})
        raise NotImplementedError(f"ShardedRandom does not know how to shard {func}")


def reference(key: str, world: int) -> dict:
    name, options, _ = SCENARIOS[key]
    model = Model(name, options)
    mode = ShardedRandom([torch.Generator().manual_seed(100 + r) for r in range(world)], SHARD)
    grads = train(model, data(world), mode)
    return {"grads": grads, "state": estimator_state(model)}
