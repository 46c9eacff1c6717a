"""``storch-compare ops``: the cost of single torch calls on plate tensors, against the raw call.

Every torch call on a :class:`storch.PlateTensor` goes through storch's dispatcher, which lines the
plates up and wraps the result. For most functions that costs the wrapper subclass's floor
(about 2-3 us on a CPU: ``__torch_function__``, one ``_make_wrapper_subclass``); a function whose
treatment takes a general path (alignment, ``vmap``, a per-sample loop) costs more, and in a model
that calls it every step that is the step's overhead. This table times each common call on plate
tensors (plates ``z=8, data=4``) and the same computation written on the raw batched tensors by
hand, checks that both give the same values, and marks the calls whose extra cost is above
``--threshold`` (the audit that found einsum and the default-p ``norm`` running through ``vmap``,
issue 19).

    storch-compare ops                      # CPU, every case
    storch-compare ops --device cuda        # on a GPU (wall clock, synchronised per block; or auto)
    storch-compare ops --cases "gather,norm(dim=-1)"  # a subset (names as in the table)

Columns: ``storch us`` and ``raw us`` (the fastest of alternating ~5 ms blocks of calls, timed as
``storch-compare overhead`` times its rows: ``overhead.time_pair``), ``extra us`` (the
difference), ``same`` (the storch result's raw tensor equals the hand-written result), ``slow``
(extra above the threshold).
"""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

import storch
from storch import PlateTensor

__all__ = ["CASES", "Case", "run_ops", "run_cli"]

Z, D = 8, 4


class Case(NamedTuple):
    """One torch call: ``plate(ns)`` on plate tensors, ``raw(ns)`` the same on the raw tensors by hand."""

    name: str
    plate: Callable
    raw: Callable


def _inputs(device: torch.device) -> dict:
    """Plate tensors on plates (z=8, data=4) and their raw tensors, plus plain operands."""
    g = torch.Generator().manual_seed(0)
    z, d = storch.Plate("z", Z), storch.Plate("data", D)

    def both(raw):
        raw = raw.to(device)
        return PlateTensor(raw, (z, d)), raw

    ns = {}
    ns["x"], ns["xr"] = both(torch.randn(Z, D, 6, 5, generator=g))  # per sample (6, 5)
    ns["v"], ns["vr"] = both(torch.randn(Z, D, 5, generator=g))  # per sample (5,)
    ns["c"], ns["cr"] = both(torch.randn(Z, D, 5, generator=g))  # class scores
    ns["i"], ns["ir"] = both(torch.randint(0, 5, (Z, D, 6), generator=g))  # indices < 5
    ns["t"], ns["tr"] = both(torch.randint(0, 5, (Z, D), generator=g))  # one class per sample
    ns["m"], ns["mr"] = ns["x"] > 0, ns["xr"] > 0
    data = torch.rand(D, 6, 5, generator=g).to(device)
    ns["y"], ns["yr"] = PlateTensor(data, (d,)), data  # an observation on the data plate only
    for name, shape in (("W", (5, 7)), ("w", (5,)), ("row", (5,)), ("mat", (6, 5))):
        ns[name] = torch.randn(*shape, generator=g).to(device)
    ns["lin"] = torch.nn.Linear(5, 7).to(device)
    ns["emb"] = torch.nn.Embedding(5, 3).to(device)
    ns["ar_z"] = torch.arange(Z, device=device).view(Z, 1, 1)
    ns["ar_d"] = torch.arange(D, device=device).view(1, D, 1)
    return ns


def _c(name: str, plate: Callable, raw: Callable) -> Case:
    return Case(name, plate, raw)


CASES = [
    # elementwise
    _c("x + 1", lambda n: n["x"] + 1.0, lambda n: n["xr"] + 1.0),
    _c("x * plain row", lambda n: n["x"] * n["row"], lambda n: n["xr"] * n["row"]),
    _c("x + x", lambda n: n["x"] + n["x"], lambda n: n["xr"] + n["xr"]),
    _c("x * y (data plate)", lambda n: n["x"] * n["y"], lambda n: n["xr"] * n["yr"]),
    _c("exp", lambda n: n["x"].exp(), lambda n: n["xr"].exp()),
    _c("relu", lambda n: F.relu(n["x"]), lambda n: F.relu(n["xr"])),
    _c("clamp", lambda n: n["x"].clamp(-1, 1), lambda n: n["xr"].clamp(-1, 1)),
    _c("where", lambda n: torch.where(n["m"], n["x"], 0.0), lambda n: torch.where(n["mr"], n["xr"], 0.0)),
    _c("masked_fill", lambda n: n["x"].masked_fill(n["m"], 0.0), lambda n: n["xr"].masked_fill(n["mr"], 0.0)),
    _c("x > 0", lambda n: n["x"] > 0, lambda n: n["xr"] > 0),
    _c("float()", lambda n: n["i"].float(), lambda n: n["ir"].float()),
    _c("dropout (eval)", lambda n: F.dropout(n["x"], 0.1, False), lambda n: F.dropout(n["xr"], 0.1, False)),
    # products
    _c("x @ W", lambda n: n["x"] @ n["W"], lambda n: n["xr"] @ n["W"]),
    _c("x @ w (vector)", lambda n: n["x"] @ n["w"], lambda n: n["xr"] @ n["w"]),
    _c("x @ x.mT", lambda n: n["x"] @ n["x"].mT, lambda n: n["xr"] @ n["xr"].mT),
    _c("linear", lambda n: n["lin"](n["x"]), lambda n: n["lin"](n["xr"])),
    _c("einsum ij jk->ik", lambda n: torch.einsum("ij,jk->ik", n["x"], n["W"]),
       lambda n: torch.einsum("...ij,jk->...ik", n["xr"], n["W"])),
    # reductions and normalisation
    _c("sum(-1)", lambda n: n["x"].sum(-1), lambda n: n["xr"].sum(-1)),
    _c("sum()", lambda n: n["x"].sum(), lambda n: n["xr"].sum((-2, -1))),
    _c("mean()", lambda n: n["x"].mean(), lambda n: n["xr"].mean((-2, -1))),
    _c("max(-1)", lambda n: n["x"].max(-1).values, lambda n: n["xr"].max(-1).values),
    _c("logsumexp(-1)", lambda n: n["x"].logsumexp(-1), lambda n: n["xr"].logsumexp(-1)),
    _c("softmax(-1)", lambda n: n["x"].softmax(-1), lambda n: n["xr"].softmax(-1)),
    _c("norm(dim=-1)", lambda n: n["x"].norm(dim=-1), lambda n: n["xr"].norm(dim=-1)),
    _c("linalg.vector_norm", lambda n: torch.linalg.vector_norm(n["x"]),
       lambda n: torch.linalg.vector_norm(n["xr"], dim=(-2, -1))),
    _c("layer_norm", lambda n: F.layer_norm(n["x"], (5,)), lambda n: F.layer_norm(n["xr"], (5,))),
    # shapes
    _c("view", lambda n: n["x"].view(30), lambda n: n["xr"].view(Z, D, 30)),
    _c("flatten", lambda n: n["x"].flatten(), lambda n: n["xr"].flatten(2)),
    _c("unsqueeze(0)", lambda n: n["x"].unsqueeze(0), lambda n: n["xr"].unsqueeze(2)),
    _c("transpose", lambda n: n["x"].transpose(0, 1), lambda n: n["xr"].transpose(2, 3)),
    _c("expand", lambda n: n["v"].expand(6, 5), lambda n: n["vr"].unsqueeze(2).expand(Z, D, 6, 5)),
    _c("cat", lambda n: torch.cat([n["x"], n["x"]], -1), lambda n: torch.cat([n["xr"], n["xr"]], -1)),
    _c("stack", lambda n: torch.stack([n["x"], n["x"]]), lambda n: torch.stack([n["xr"], n["xr"]], 2)),
    _c("chunk", lambda n: n["x"].chunk(2, -1)[0], lambda n: n["xr"].chunk(2, -1)[0]),
    _c("unbind", lambda n: n["x"].unbind(0)[0], lambda n: n["xr"].unbind(2)[0]),
    # indexing
    _c("x[0]", lambda n: n["x"][0], lambda n: n["xr"][:, :, 0]),
    _c("x[...1:] (last-dim slice)", lambda n: n["x"][..., 1:], lambda n: n["xr"][..., 1:]),
    _c("v[i] (sampled index)", lambda n: n["v"][n["i"]], lambda n: n["vr"][n["ar_z"], n["ar_d"], n["ir"]]),
    _c("gather", lambda n: n["x"].gather(-1, n["i"].unsqueeze(-1)), lambda n: n["xr"].gather(-1, n["ir"].unsqueeze(-1))),
    _c("embedding", lambda n: n["emb"](n["i"]), lambda n: n["emb"](n["ir"])),
    _c("one_hot", lambda n: F.one_hot(n["i"], 5), lambda n: F.one_hot(n["ir"], 5)),
    # losses
    _c("bce_with_logits vs y", lambda n: F.binary_cross_entropy_with_logits(n["x"], n["y"], reduction="none"),
       lambda n: F.binary_cross_entropy_with_logits(n["xr"], n["yr"].expand_as(n["xr"]), reduction="none")),
    _c("mse vs plain", lambda n: F.mse_loss(n["x"], n["mat"], reduction="none"),
       lambda n: F.mse_loss(n["xr"], n["mat"].expand_as(n["xr"]), reduction="none")),
    _c("cross_entropy", lambda n: F.cross_entropy(n["c"], n["t"]),
       lambda n: F.cross_entropy(n["cr"].reshape(-1, 5), n["tr"].reshape(-1), reduction="none").view(Z, D)),
]


def _same(a, b) -> bool:
    a = a.tensor if isinstance(a, PlateTensor) else a
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        return False
    return bool(torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-6, equal_nan=True))


def run_ops(names=None, device: str = "cpu", min_time: float = 0.05, threshold: float = 5.0) -> list[list]:
    """Rows ``[case, storch us, raw us, extra us, same, slow]`` for every case (or those in ``names``)."""
    from .overhead import select_device, synchronizer, time_pair

    dev = select_device(device) if isinstance(device, str) else device  # a clear error without CUDA
    sync = synchronizer(dev)
    ns = _inputs(dev)
    cases = [c for c in CASES if names is None or c.name in names]
    if names is not None and len(cases) != len(set(names)):
        known = ", ".join(c.name for c in CASES)
        missing = sorted(set(names) - {c.name for c in cases})
        raise SystemExit(f"storch-compare ops: unknown case(s) {missing}; the cases are: {known}")
    rows = []
    with torch.no_grad():
        for c in cases:
            same = _same(c.plate(ns), c.raw(ns))
            ts, tr = (1e6 * t for t in time_pair(lambda: c.plate(ns), lambda: c.raw(ns), min_time, "wall", sync))
            rows.append([c.name, ts, tr, ts - tr, "yes" if same else "NO", "SLOW" if ts - tr > threshold else ""])
    return rows


HEADER = ["case", "storch us", "raw us", "extra us", "same", "slow"]


def run_cli(args: argparse.Namespace) -> int:
    from .report import markdown_table, text_table, write_csv

    import sys

    from .overhead import select_device

    names = [c.strip() for c in args.cases.split(",")] if args.cases else None
    try:
        device = select_device(args.device)
    except ValueError as e:
        print(f"storch-compare ops: {e}", file=sys.stderr)
        return 2
    rows = run_ops(names, device, args.min_time, args.threshold)
    rows.sort(key=lambda r: -r[3])
    print(text_table(HEADER, rows))
    setup = (f"device {args.device}; plates z={Z}, data={D}; no autograd; wall clock, fastest of alternating ~5 ms "
             f"blocks of calls ({5 * args.min_time:.2g} s per side, storch_bench.overhead.time_pair), "
             f"{args.threads} thread(s); slow: extra > {args.threshold:g} us")
    print(f"\n{setup}")
    (args.out / "ops.md").write_text(markdown_table(HEADER, rows) + f"\n\n{setup}\n")
    write_csv(args.out / "ops.csv", HEADER, rows)
    print(f"Wrote {args.out / 'ops.md'}, {args.out / 'ops.csv'}")
    return 1 if any(r[4] != "yes" for r in rows) else 0
