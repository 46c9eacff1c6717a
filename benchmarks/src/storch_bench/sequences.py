"""Sequence estimators on a GRU decoder under a non-differentiable reward (``storch-compare sequences``).

A small GRU decoder, conditioned on the index of a target string, generates tokens one at a
time until an end token; the cost is the edit distance (Levenshtein) between the generated string
and the target, i.e. the reward is its negative. The same model code runs for every estimator:
only the ``storch.estimator(...)`` line changes (``SPECS``), at the same number of sequences per
target and step (``k``):

- ``score`` with the leave-one-out baseline: k i.i.d. sequences;
- ``unordered_set``: k distinct sequences by stochastic beam search (needs partitions support);
- ``sum_and_sample`` (MAPO): a buffer of the k/2 best sequences found so far, summed exactly, plus
  k/2 sampled sequences outside it, with the leave-one-out baseline.

Writes ``sequences.md`` (final reward, time per training step, peak memory), ``sequences.csv``
(curves) and ``sequences.png`` (reward curves).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.distributions import Categorical

import storch

from .measure import peak_memory, seed_everything
from .report import header

__all__ = ["TARGETS", "Decoder", "edit_distance", "SeqConfig", "SeqResult", "run_sequences", "estimator_for", "SPECS"]

ALPHABET = "abcdef"
EOS = 0  # token 0 ends a string; letters are 1..6
TARGETS = ("abc", "bad", "cafe", "deaf", "face", "bead", "ace", "fed")


def encode(s: str) -> list[int]:
    return [ALPHABET.index(ch) + 1 for ch in s]


def decode(tokens) -> str:
    out = []
    for t in tokens:
        if int(t) == EOS:
            break
        out.append(ALPHABET[int(t) - 1])
    return "".join(out)


class GRUCell(nn.Module):
    """A GRU cell (Cho et al., 2014) from two linear maps, as ``nn.GRUCell`` computes it."""

    def __init__(self, size: int, hidden: int) -> None:
        super().__init__()
        self.x = nn.Linear(size, 3 * hidden)
        self.h = nn.Linear(hidden, 3 * hidden)

    def forward(self, x, h):
        xr, xz, xn = self.x(x).chunk(3, -1)
        hr, hz, hn = self.h(h).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        return (1 - z) * n + z * h


class Decoder(nn.Module):
    """GRU decoder: the target's index gives the initial state; each step embeds the last token."""

    def __init__(self, n_targets: int, vocab: int = len(ALPHABET) + 1, hidden: int = 32) -> None:
        super().__init__()
        self.start = nn.Embedding(n_targets, hidden)
        self.embed = nn.Embedding(vocab + 1, hidden)  # + a start token
        self.cell = GRUCell(hidden, hidden)
        self.head = nn.Linear(hidden, vocab)
        self.vocab = vocab

    def forward(self, ids, est, length: int):
        """One-sample code: sample ``length`` tokens with estimator ``est`` (one call per token)."""
        h = self.start(ids)
        tok = torch.full_like(ids, self.vocab)  # the start token
        tokens = []
        # MAPO's buffer remembers sequences per data point: its first call names them (the target ids)
        key = {"memory_key": ids} if getattr(est, "buffer", None) is not None else {}
        for t in range(length):
            h = self.cell(self.embed(tok), h)
            tok = est(Categorical(logits=self.head(h)), **(key if t == 0 else {}))
            tokens.append(tok)
        return tokens


def edit_distance(tokens: list, target, target_len, eos: int = EOS):
    """Levenshtein distance between ``tokens`` (up to the first ``eos``) and ``target[:target_len]``.

    One-sample code (works on plate tensors): ``tokens`` is a list of scalar token tensors, ``target``
    a (L,) tensor padded after ``target_len``. Row recurrence with a cumulative minimum: with
    a_j = min(prev_j + 1, prev_{j-1} + [g != t_j]), cur_j = j + min_{k<=j} (a_k - k).
    """
    length = target.shape[-1]
    j = torch.arange(length + 1, dtype=torch.float32)
    prev = j.clone() + 0 * target[..., :1].float()  # row 0: distance to the target prefix
    alive = None
    for g in tokens:
        alive = (g != eos) if alive is None else alive & (g != eos)
        sub = (g.unsqueeze(-1) != target).float()  # (L,)
        diag = prev[..., :-1] + sub
        a = torch.cat([prev[..., :1] + 1, torch.minimum(prev[..., 1:] + 1, diag)], -1)
        cur = torch.cummin(a - j, -1).values + j
        prev = torch.where(alive.unsqueeze(-1), cur, prev)  # after the end token: unchanged
    pick = (torch.arange(length + 1) == target_len.unsqueeze(-1)).float()
    return (prev * pick).sum(-1)


SPECS = {
    "score+loo": lambda k: storch.estimator("score", plate="seq", n_samples=k, baseline="leave_one_out"),
    "unordered_set": lambda k: storch.estimator("unordered_set", plate="seq", n_samples=k, eos=EOS),
    "sum_and_sample": lambda k: storch.estimator("sum_and_sample", plate="seq", buffer=k // 2, n_samples=k - k // 2,
                                                 baseline="leave_one_out", eos=EOS),
}


def estimator_for(name: str, k: int):
    return SPECS[name](k)


@dataclass
class SeqConfig:
    estimators: tuple[str, ...] = ("score+loo", "unordered_set", "sum_and_sample")
    k: int = 8
    steps: int = 400
    lr: float = 0.005
    hidden: int = 32
    length: int = 5  # generated tokens (targets have 3-4 letters + the end token)
    seed: int = 0
    seeds: tuple[int, ...] = ()  # several runs per estimator (default: just ``seed``)
    eval_every: int = 25
    variance_reps: int = 16  # gradient estimates for the variance (at the start and at the end); 0: skip
    eval_samples: int = 64
    targets: tuple[str, ...] = TARGETS
    measure_memory: bool = True


@dataclass
class SeqResult:
    name: str
    seed: int = 0
    steps: list[int] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)  # mean -edit distance of fresh samples
    greedy: list[float] = field(default_factory=list)  # mean -edit distance of the greedy strings
    ms_per_step: float = math.nan
    peak_mb: float = math.nan
    variance: list[float] = field(default_factory=list)  # gradient variance at the start and at the end
    note: str = ""
    strings: list[str] = field(default_factory=list)


def _targets(cfg: SeqConfig):
    length = max(len(t) for t in cfg.targets)
    tgt = torch.zeros(len(cfg.targets), length, dtype=torch.long)
    for i, s in enumerate(cfg.targets):
        tgt[i, :len(s)] = torch.tensor(encode(s))
    lens = torch.tensor([len(s) for s in cfg.targets])
    return tgt, lens


def training_step(model: Decoder, est, opt, cfg: SeqConfig, tgt, lens) -> float:
    """One step of the example: the same code for every estimator."""
    opt.zero_grad()
    # one data plate: each row is (target index, target tokens..., target length)
    data = torch.cat([torch.arange(len(cfg.targets)).unsqueeze(-1), tgt, lens.unsqueeze(-1)], -1)
    row = storch.denote_independent(data, 0, "data")
    ids, target, tlen = row[0], row[1:-1], row[-1]
    tokens = model(ids, est, cfg.length)
    storch.add_cost(edit_distance(tokens, target, tlen), name="edit_distance")
    value = storch.backward()
    opt.step()
    return float(value)


def gradient_variance(model: Decoder, est, cfg: SeqConfig, tgt, lens) -> float:
    """Trace of the covariance of ``cfg.variance_reps`` gradient estimates at the current parameters
    (surrogate_loss + autograd: no optimizer step, no estimator update)."""
    params = [p for p in model.parameters()]
    grads = []
    for _ in range(cfg.variance_reps):
        with storch.Graph():
            data = torch.cat([torch.arange(len(cfg.targets)).unsqueeze(-1), tgt, lens.unsqueeze(-1)], -1)
            row = storch.denote_independent(data, 0, "data")
            tokens = model(row[0], est, cfg.length)
            storch.add_cost(edit_distance(tokens, row[1:-1], row[-1]), name="edit_distance")
            g = torch.autograd.grad(storch.surrogate_loss(), params, allow_unused=True)
        grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                for x, p in zip(g, params)]))
    return float(torch.stack(grads).double().var(0).sum())


@torch.no_grad()
def evaluate(model: Decoder, cfg: SeqConfig, tgt, lens, greedy: bool) -> tuple[float, list[str]]:
    """Mean negative edit distance of fresh samples (or of the greedy strings), plain torch."""
    n = 1 if greedy else cfg.eval_samples
    ids = torch.arange(len(cfg.targets)).repeat(n)
    h = model.start(ids)
    tok = torch.full_like(ids, model.vocab)
    out = []
    for _ in range(cfg.length):
        h = model.cell(model.embed(tok), h)
        logits = model.head(h)
        tok = logits.argmax(-1) if greedy else Categorical(logits=logits).sample()
        out.append(tok)
    seq = torch.stack(out, -1)
    dist = edit_distance(list(seq.t()), tgt.repeat(n, 1), lens.repeat(n))
    strings = [decode(s) for s in seq[:len(cfg.targets)]]
    return -float(dist.mean()), strings


def run_one(name: str, cfg: SeqConfig, progress=None, seed: Optional[int] = None) -> SeqResult:
    seed = cfg.seed if seed is None else seed
    res = SeqResult(name, seed)
    tgt, lens = _targets(cfg)
    seed_everything(seed)
    model = Decoder(len(cfg.targets), hidden=cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    try:
        est = estimator_for(name, cfg.k)
    except (storch.OptionError, TypeError) as e:
        res.note = f"skipped: {type(e).__name__}: {e}"
        return res
    elapsed, timed = 0.0, 0
    try:
        if cfg.variance_reps:
            res.variance.append(gradient_variance(model, est, cfg, tgt, lens))
        for step in range(cfg.steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.steps:
                r, _ = evaluate(model, cfg, tgt, lens, greedy=False)
                g, res.strings = evaluate(model, cfg, tgt, lens, greedy=True)
                res.steps.append(step)
                res.reward.append(r)
                res.greedy.append(g)
            if step == cfg.steps:
                break
            t0 = time.perf_counter()
            training_step(model, est, opt, cfg, tgt, lens)
            if step >= 5:  # after warm-up
                elapsed += time.perf_counter() - t0
                timed += 1
            if progress is not None:
                progress(1)
    except (storch.StorchError, RuntimeError) as e:
        storch.reset()
        res.note = f"failed: {type(e).__name__}: {e}"
        return res
    res.ms_per_step = 1000 * elapsed / max(timed, 1)
    if cfg.variance_reps:
        res.variance.append(gradient_variance(model, est, cfg, tgt, lens))
    if cfg.measure_memory:
        res.peak_mb = peak_memory(lambda: training_step(model, est, opt, cfg, tgt, lens)) / 2 ** 20
    return res


def run_sequences(cfg: SeqConfig, progress: bool = True) -> list[SeqResult]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps * len(cfg.estimators) * len(cfg.seeds or (cfg.seed,)), desc="sequences",
                   leave=False)
    results = [run_one(name, cfg, bar.update if bar else None, seed) for seed in (cfg.seeds or (cfg.seed,))
               for name in cfg.estimators]
    if bar:
        bar.close()
    return results


def _stat(values: list[float]) -> str:
    t = torch.tensor(values, dtype=torch.float64)
    return f"{float(t.mean()):.2f}" + (f" ± {float(t.std()):.2f}" if len(values) > 1 else "")


def _by_name(results: list[SeqResult]) -> dict[str, list[SeqResult]]:
    out: dict[str, list[SeqResult]] = {}
    for r in results:
        out.setdefault(r.name, []).append(r)
    return out


def table(results: list[SeqResult], cfg: SeqConfig) -> str:
    groups = _by_name(results)
    ok = {n: [r for r in rs if not r.note] for n, rs in groups.items()}
    base = ok.get("score+loo")
    base_ms = float(torch.tensor([r.ms_per_step for r in base]).mean()) if base else math.nan
    if not base_ms:  # too few steps to time any (the first 5 are warm-up)
        base_ms = math.nan
    n_seeds = len(cfg.seeds or (cfg.seed,))
    rows = [f"| estimator (k = {cfg.k} sequences per target) | final reward, samples{' (mean ± sd over seeds)' if n_seeds > 1 else ''} | "
            "final reward, greedy | grad variance, start → end | ms/step | vs score+loo | peak MB |",
            "|---|---|---|---|---|---|---|"]
    for name, rs in groups.items():
        good = ok[name]
        if not good:
            rows.append(f"| {name} | {rs[0].note} | | | | | |")
            continue
        ms = float(torch.tensor([r.ms_per_step for r in good]).mean())
        peak = max(r.peak_mb for r in good)
        var = " → ".join(f"{float(torch.tensor(v).mean()):.3g}" for v in zip(*[r.variance for r in good])) or "-"
        rows.append(f"| {name} | {_stat([r.reward[-1] for r in good])} | {_stat([r.greedy[-1] for r in good])} | "
                    f"{var} | {ms:.1f} | {ms / base_ms:.2f}x | {peak:.2f} |")
    return "\n".join(rows)


def write(results: list[SeqResult], cfg: SeqConfig, out: Path, header: str = "") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "sequences.md"
    setup = (f"{len(cfg.targets)} target strings ({', '.join(cfg.targets)}), GRU hidden {cfg.hidden}, "
             f"{cfg.length} tokens (end token {EOS}), {cfg.steps} steps, Adam lr {cfg.lr}, seeds {list(cfg.seeds or (cfg.seed,))}; "
             f"reward = -edit distance, mean of {cfg.eval_samples} fresh samples per target (and of the greedy "
             "string); grad variance = trace of the covariance of the decoder's gradient over "
             f"{cfg.variance_reps} estimates at the initial and the final parameters (mean over seeds); ms/step after 5 warm-up steps; peak MB = torch CPU allocator peak of one step.")
    strings = "\n".join(f"- {r.name} (seed {r.seed}): {', '.join(r.strings)}" for r in results if r.strings)
    md.write_text(f"{header}\n{table(results, cfg)}\n\n{setup}\n\nGreedy strings at the end:\n{strings}\n")
    path_csv = out / "sequences.csv"
    with open(path_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["estimator", "seed", "step", "reward", "greedy_reward"])
        for r in results:
            for s, a, b in zip(r.steps, r.reward, r.greedy):
                w.writerow([r.name, r.seed, s, f"{a:.4f}", f"{b:.4f}"])
    png = out / "sequences.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in _by_name(results).items():
        rs = [r for r in rs if r.steps and not r.note]
        if not rs:
            continue
        curves = torch.tensor([r.reward for r in rs])
        line, = ax.plot(rs[0].steps, curves.mean(0).tolist(), label=name)
        if len(rs) > 1:  # the range over seeds
            ax.fill_between(rs[0].steps, curves.min(0).values.tolist(), curves.max(0).values.tolist(),
                            color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training step")
    ax.set_ylabel("reward (-edit distance), fresh samples")
    ax.set_title(f"GRU decoder, {cfg.k} sequences per target per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return [md, path_csv, png]


def run_cli(args) -> int:
    """``storch-compare sequences``."""
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else ()
    cfg = SeqConfig(k=args.k, steps=args.steps, seed=args.seed, seeds=seeds, lr=args.lr,
                    variance_reps=args.variance_reps)
    names = [s.strip() for s in (args.estimators or "auto").split(",") if s.strip()]
    if names and "auto" not in names:
        cfg.estimators = tuple(names)
        unknown = [s for s in cfg.estimators if s not in SPECS]
        if unknown:
            raise SystemExit(f"unknown sequence estimator(s) {unknown}; choose from {list(SPECS)}")
    results = run_sequences(cfg, progress=not args.no_progress)
    title = header("# Sequence estimators: GRU decoder, reward = -edit distance")
    paths = write(results, cfg, args.out, title)
    print(table(results, cfg))
    print("Wrote " + ", ".join(map(str, paths)))
    return 0
