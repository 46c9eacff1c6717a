"""The parts of test_ddp_initial_values.py: a per-rank worker (run by torch.multiprocessing.spawn, without DDP: only
storch's own collectives) whose ranks build REBAR / RELAX with other initial values of what the update trains: another
``temperature=`` or ``eta=``, or a ``network=`` initialised from a per-rank seed. The update averages φ's gradient
over the ranks, never φ: before, the ranks trained on from their own values without error (log λ -0.68 and -0.50
after 3 steps); now every rank starts from rank 0's at the first update, as DDP does for a module's parameters.
Each case records, per rank, the error it raised (type and message) or the estimator's parameters after one step;
the group's timeout (10 s) turns a hang into an error, so no case waits forever. The same for score's NVIL heads
built while ``storch.distributed.synchronize`` was off (broadcast when built only while on), before the first
synchronised update or after it (a head for a new cost)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli

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
        # plain_direct_gradient on rank 0 only: in neither state_options() nor evolution_options() (φ's step is the
        # ranks' mean, so their φ stays one; each rank's estimate is unbiased)
        out["rebar_plain_direct"] = outcome(
            lambda: _trained(Model("rebar", {"plain_direct_gradient": (True, False)[rank]}), x, g))
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
        out.update(late_head(rank, x, g))
        dist.barrier()
        out.update(heads_met_apart(rank, x, g))
        dist.barrier()


def _two_costs(model, x: torch.Tensor, g: torch.Generator, backward: bool = True) -> None:
    """A step with the costs "rec" and "extra" (each with its own NVIL head); without ``backward``: its surrogate only
    (an evaluation that builds the heads and updates nothing)."""
    with storch.Graph(generator=g):
        xs = storch.denote_independent(x, 0, "data")
        z = model.est(Bernoulli(logits=model.enc(xs)))
        bce = F.binary_cross_entropy_with_logits(model.dec(z), xs, reduction="none")
        storch.add_cost(bce.sum(), name="rec")
        storch.add_cost(bce[..., :3].sum() * 2, name="extra")
        if backward:
            storch.backward()
        else:
            storch.surrogate_loss()


def late_head(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """NVIL's head for a new cost built while synchronisation is off, after the first synchronised update (an evaluation
    on every rank with an extra cost): before, broadcast_once_ had run for the estimator, so the head stayed each rank's
    own and the ranks trained apart silently. The broadcasts of trained parameters are counted at each later update
    (a spy on storch.distributed.broadcast_): one for the new head's 4 tensors, then none (no collective per step)."""
    import storch.distributed as sd

    model = Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05})
    run_steps(model, x, g, 1)  # head "rec": built and broadcast, then the first synchronised update
    sd.synchronize(model, enabled=False)
    _two_costs(model, x, g, backward=False)  # builds head "extra" from each rank's generator, not broadcast
    sd.synchronize(model)
    est = model.est
    out = {"late_head_built": {n: p.detach().clone() for n, p in est.named_parameters() if ".cost_extra." in n}}
    counted, broadcast = [], sd.broadcast_

    def spy(tensors, owner=None, src=0, what="a built network's parameters"):
        counted[-1].append((len(tensors), what))
        return broadcast(tensors, owner, src, what)

    def trained() -> list:
        sd.broadcast_ = spy
        try:
            for _ in range(2):
                counted.append([])
                _two_costs(model, x, g)
        finally:
            sd.broadcast_ = broadcast
        opt = est._optimizer
        moments = [v for p in est.parameters() for _, v in sorted(opt.state[p].items()) if torch.is_tensor(v)]
        return [sd.ranks_agree([p.detach() for p in est.parameters()] + moments, est), counted]

    out["late_head"] = outcome(trained)
    return out



def _costs(model, x: torch.Tensor, g: torch.Generator, names: tuple, backward: bool = True) -> None:
    """A step with a cost of each of ``names`` (each with its own NVIL head, of one shape)."""
    with storch.Graph(generator=g):
        xs = storch.denote_independent(x, 0, "data")
        z = model.est(Bernoulli(logits=model.enc(xs)))
        bce = F.binary_cross_entropy_with_logits(model.dec(z), xs, reduction="none")
        for k, name in enumerate(names):
            storch.add_cost(bce[..., k:].sum(), name=name)
        if backward:
            storch.backward()
        else:
            storch.surrogate_loss()


def heads_met_apart(rank: int, x: torch.Tensor, g: torch.Generator) -> dict:
    """NVIL's heads are kept in the order each rank first met their costs. ``apart_order``: built while
    synchronisation is off, "a" then "b" on rank 0 and "b" then "a" on rank 1, then two synchronised updates: before,
    broadcast_once_ and the gradients' mean went by position, so rank 1's head "b" was set to rank 0's "a" and averaged
    with it (no error; the ranks held different heads by name). ``apart_costs``: while synchronised, rank 0's first
    step has cost "a" alone and rank 1's "b" alone (a terminal cost that differs): before, rank 1's head "b" was set
    to rank 0's "a" and their gradients averaged, silently; now every rank raises, naming each rank's head."""
    import storch.distributed as sd

    out = {}
    model = Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05})
    sd.synchronize(model, enabled=False)
    for names in ((("a",), ("b",)), (("b",), ("a",)))[rank]:
        _costs(model, x, g, names, backward=False)
    sd.synchronize(model)

    def trained() -> bool:
        for _ in range(2):
            _costs(model, x, g, ("a", "b"))
        named = sorted(model.est.named_parameters(), key=lambda item: item[0])
        return sd.ranks_agree([p.detach() for _, p in named], model.est)

    out["apart_order"] = outcome(trained)
    model = Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05})
    out["apart_costs"] = outcome(lambda: _costs(model, x, g, (("a",), ("b",))[rank]))
    model = Model("score", {"n_samples": 2, "baseline": "learned", "hidden": 4, "lr": 0.05})
    # the same costs, added in another order on each rank within the first step (each head is broadcast as built)
    out["order_in_step"] = outcome(lambda: _costs(model, x, g, (("a", "b"), ("b", "a"))[rank]))
    return out
