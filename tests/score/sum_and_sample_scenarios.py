"""Seeded runs of ``sum_and_sample`` / ``mapo`` whose values are compared seed for seed across
refactorings (tests/score/test_sum_and_sample_split.py).

Each scenario builds the estimator through ``storch.estimator`` (the public API only), runs a few
seeded graphs and returns what an estimate is made of: the samples, the surrogate's first and
second derivatives, ``storch.cost_estimates()``, and for sequences the buffer after every
``storch.backward()`` and the ``state_dict``. ``sum_and_sample_reference.json`` holds the values
the estimator gave before it was split into a one-step and a sequence class (written by
``python tests/score/sum_and_sample_scenarios.py --write`` at the commit named in the file).

The scenarios avoid the beam path with ``n_enumerate=1``, whose draws may change for speed
(a different but equally exact sampler for one memory value).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch

REFERENCE = Path(__file__).with_name("sum_and_sample_reference.json")


def _plain(t: Any) -> Any:
    if isinstance(t, storch.PlateTensor):
        t = t.tensor
    if isinstance(t, torch.Tensor):
        return {"dtype": str(t.dtype), "shape": list(t.shape), "values": t.detach().reshape(-1).tolist()}
    if isinstance(t, dict):
        return {str(k): _plain(v) for k, v in sorted(t.items(), key=lambda kv: str(kv[0]))}
    if isinstance(t, (list, tuple)):
        return [_plain(v) for v in t]
    return t


def _derivatives(loss: torch.Tensor, th: torch.Tensor) -> dict:
    g, = torch.autograd.grad(loss, th, create_graph=True)
    # a second derivative: d/dθ Σ_i i·g_i (Σ_i g_i alone vanishes for logits: softmax is shift-invariant)
    h, = torch.autograd.grad((g * torch.arange(1, g.numel() + 1, dtype=g.dtype)).sum(), th, retain_graph=True)
    return {"loss": loss.detach(), "grad": g.detach(), "grad2": h.detach()}


# -- one step ------------------------------------------------------------------------------------

C5 = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.5], dtype=torch.float64)


def _one_step(options: dict, one_hot: bool = False, data: int = 0, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    est = storch.estimator("sum_and_sample", plate="z", **options)
    th = torch.linspace(-1.0, 1.0, 5, dtype=torch.float64).requires_grad_(True)
    out: dict = {}
    with storch.Graph():
        logits = th if not data else storch.denote_independent(
            th * torch.linspace(0.5, 1.5, data, dtype=torch.float64).unsqueeze(-1), 0, "data")
        if one_hot:
            z = est(OneHotCategorical(logits=logits))
            storch.add_cost(z @ C5, name="c")
        else:
            z = est(Categorical(logits=logits))
            storch.add_cost(F.one_hot(z, 5).to(torch.float64) @ C5, name="c")
        out["sample"] = z
        out.update(_derivatives(storch.surrogate_loss(order=2), th))
        out["cost_estimates"] = storch.cost_estimates()
    out["state_dict"] = {k: v for k, v in est.state_dict().items()}
    return out


def _bits(options: dict, seed: int = 0) -> dict:
    """12 Bernoullis with budget 64: the memory by beam search, samples outside it (beyond budget)."""
    torch.manual_seed(seed)
    est = storch.estimator("sum_and_sample", plate="z", budget=64, **options)
    th = torch.linspace(-1.5, 1.5, 12, dtype=torch.float64).requires_grad_(True)
    coef = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64)
    out: dict = {}
    with storch.Graph():
        b = est(Bernoulli(logits=th))
        storch.add_cost(((b * coef).sum(-1) - 3.0) ** 2, name="c")
        out["sample"] = b
        out.update(_derivatives(storch.surrogate_loss(order=2), th))
    return out


# -- sequences (buffer=) ---------------------------------------------------------------------------

_g = torch.Generator().manual_seed(0)
SEQ_THETA = torch.randn(21, generator=_g, dtype=torch.float64) * 0.8
SEQ_COST = torch.randn(27, generator=_g, dtype=torch.float64)
STEP_COST = torch.randn(3, generator=_g, dtype=torch.float64)


def _sequence_graph(est, th, keys, one_hot: bool, per_step: bool) -> list:
    lg0, lg1, lg2 = th[..., 0:3], th[..., 3:12].reshape(th.shape[:-1] + (3, 3)), th[..., 12:21].reshape(
        th.shape[:-1] + (3, 3))
    call = {} if keys is None else {"memory_key": keys}
    if one_hot:
        x0 = est(OneHotCategorical(logits=lg0), **call)
        x1 = est(OneHotCategorical(logits=(x0.unsqueeze(-2) @ lg1).squeeze(-2)))
        x2 = est(OneHotCategorical(logits=(x1.unsqueeze(-2) @ lg2).squeeze(-2)))
        idx = torch.arange(3, dtype=torch.float64)
        i0, i1, i2 = ((x @ idx).long() for x in (x0, x1, x2))
    else:
        x0 = est(Categorical(logits=lg0), **call)
        x1 = est(Categorical(logits=(F.one_hot(x0, 3).to(th.dtype).unsqueeze(-2) @ lg1).squeeze(-2)))
        x2 = est(Categorical(logits=(F.one_hot(x1, 3).to(th.dtype).unsqueeze(-2) @ lg2).squeeze(-2)))
        i0, i1, i2 = x0, x1, x2
    if per_step:
        storch.add_cost(F.one_hot(i0, 3).to(th.dtype) @ STEP_COST, name="step0")
    storch.add_cost(F.one_hot(i0 * 9 + i1 * 3 + i2, 27).to(th.dtype) @ SEQ_COST, name="c")
    return [x0, x1, x2]


def _sequences(options: dict, graphs: int = 3, data: int = 0, keys=None, one_hot: bool = False,
               per_step: bool = False, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    est = storch.estimator("mapo", plate="seq", **options)
    base = SEQ_THETA.clone().requires_grad_(True)
    runs = []
    for i in range(graphs):
        with storch.Graph():
            th = base if not data else storch.denote_independent(
                base * torch.linspace(0.5, 1.5, data, dtype=torch.float64).unsqueeze(-1), 0, "data")
            toks = _sequence_graph(est, th, None if keys is None else torch.tensor(keys[i % len(keys)]),
                                   one_hot, per_step)
            run = {"tokens": toks}
            run.update(_derivatives(storch.surrogate_loss(order=2), base))
            run["cost_estimates"] = storch.cost_estimates()
            storch.backward()
        run["buffer"] = _buffer(est)
        runs.append(run)
    fresh = storch.estimator("mapo", plate="seq", **options)
    fresh.load_state_dict(est.state_dict())
    return {"runs": runs, "reloaded": _buffer(fresh)}


def _buffer(est) -> dict:
    """The buffer in the estimator's extra state, without the record of who saved it and whether a key came again
    (written since the reference values: storch.extending.state_record; the fresh-keys warning's flag)."""
    return {k: v for k, v in est.state_dict()["_extra_state"].items() if k not in ("saved_by", "met_again")}


MEMORY_2 = torch.tensor([[1, 2, 0], [2, 2, 2]])

SCENARIOS: dict[str, Callable[[], dict]] = {
    "top2": lambda: _one_step(dict(n_enumerate=2, n_samples=3)),
    "top2-loo-data": lambda: _one_step(dict(n_enumerate=2, n_samples=3, baseline="leave_one_out"), data=3),
    "batch_average-alias": lambda: _one_step(dict(n_enumerate=1, n_samples=2, baseline="batch_average")),
    "memory-tensor-one-hot": lambda: _one_step(dict(memory=torch.eye(5)[[0, 4]], n_samples=3), one_hot=True),
    "memory-callable": lambda: _one_step(dict(
        memory=lambda d: d.logits.argsort(-1, descending=True)[..., :2].movedim(-1, 0), n_samples=2,
        baseline="leave_one_out"), data=2),
    "memory-repeated": lambda: _one_step(dict(memory=torch.tensor([3, 3, 0]), n_samples=2)),
    "everything": lambda: _one_step(dict(n_enumerate=5, n_samples=2)),
    "bits-beam-top3": lambda: _bits(dict(n_enumerate=3, n_samples=3)),
    "bits-beam-loo": lambda: _bits(dict(n_enumerate=2, n_samples=3, baseline="leave_one_out")),
    "bits-beam-memory": lambda: _bits(dict(
        memory=(torch.rand(4, 12, generator=torch.Generator().manual_seed(0)) > 0.5).double(), n_samples=2)),
    "seq-learned": lambda: _sequences(dict(buffer=3, n_samples=3)),
    "seq-loo-eos": lambda: _sequences(dict(buffer=3, n_samples=3, baseline="leave_one_out", eos=0), per_step=True),
    "seq-seeded-tensor": lambda: _sequences(dict(buffer=3, n_samples=2, memory=torch.tensor(
        [[1, 2, 0], [2, 2, 2], [1, 2, 0]]), baseline="leave_one_out")),
    "seq-importance-slot": lambda: _sequences(dict(buffer=5, n_enumerate=2, n_samples=3), graphs=4),
    "seq-data-keys-dict": lambda: _sequences(dict(buffer=2, n_samples=2, memory={7: MEMORY_2[:1], 3: MEMORY_2[1:]}),
                                             data=2, keys=[[7, 3], [3, 7]]),
    "seq-callable-one-hot": lambda: _sequences(dict(buffer=2, n_samples=3, memory=lambda key: MEMORY_2[key % 2:]),
                                               data=2, keys=[[0, 1]], one_hot=True),
}


def run(name: str) -> Any:
    """The scenario's values as plain JSON data (float64 by default while it runs)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        storch.reset()
        return json.loads(json.dumps(_plain(SCENARIOS[name]())))
    finally:
        storch.reset()
        torch.set_default_dtype(old)


def write() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "packages"], capture_output=True, text=True,
                           check=True).stdout.strip()
    data = {"generated_at": commit + (" (with uncommitted changes under packages/)" if dirty else ""),
            "torch": torch.__version__, "scenarios": {name: run(name) for name in SCENARIOS}}
    REFERENCE.write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n", encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        raise SystemExit("usage: python tests/score/sum_and_sample_scenarios.py --write")
    write()
