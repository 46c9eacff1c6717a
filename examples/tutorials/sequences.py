"""Tutorial 3: sequences with the unordered set estimator and MAPO (sum_and_sample).

    python examples/tutorials/sequences.py                  # ~40 s on one CPU thread
    python examples/tutorials/sequences.py --steps 400      # the length of examples/sequences

A GRU decoder learns to spell 8 short strings (given the string's index) under a reward with no
gradient: minus the edit distance to the target. Every token is one call of the SAME estimator,
so a whole sequence is one stochastic node (a partition, docs/partitions.md). Three estimators at
4 sequences per target and step, the model code unchanged:

- ``score`` with the leave-one-out baseline: 4 i.i.d. sequences;
- ``unordered_set``: 4 distinct sequences (stochastic beam search), exact weights without
  replacement;
- ``sum_and_sample`` (MAPO): the 2 best sequences found so far (a buffer, summed exactly) plus
  2 sampled outside the buffer, with leave-one-out.

The decoder, the edit distance and the evaluation come from the benchmarks package
(``storch_bench.sequences``, used by examples/sequences). ``--out DIR`` saves the reward
curves as DIR/sequences.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import storch
from storch_bench.sequences import EOS, TARGETS, Decoder, SeqConfig, edit_distance, encode, evaluate


def targets() -> tuple[torch.Tensor, torch.Tensor]:
    """The target strings as padded token rows (8, 4) and their lengths (8,)."""
    rows = torch.zeros(len(TARGETS), max(map(len, TARGETS)), dtype=torch.long)
    for i, s in enumerate(TARGETS):
        rows[i, :len(s)] = torch.tensor(encode(s))
    return rows, torch.tensor([len(s) for s in TARGETS])


def make_estimator(name: str, k: int):
    """The one line that differs: ``k`` sequences per target and step."""
    if name == "score + leave-one-out":
        return storch.estimator("score", plate="seq", n_samples=k, baseline="leave_one_out")
    if name == "unordered_set":
        return storch.estimator("unordered_set", plate="seq", n_samples=k, eos=EOS)
    if name == "sum_and_sample (MAPO)":
        return storch.estimator("sum_and_sample", plate="seq", buffer=k // 2, n_samples=k - k // 2,
                                baseline="leave_one_out", eos=EOS)
    raise ValueError(name)


def train(name: str, steps: int, k: int, length: int = 5, seed: int = 0):
    torch.manual_seed(seed)
    model = Decoder(len(TARGETS))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    est = make_estimator(name, k)
    tgt, lens = targets()
    cfg = SeqConfig(length=length, eval_samples=32)
    data = torch.cat([torch.arange(len(TARGETS)).unsqueeze(-1), tgt, lens.unsqueeze(-1)], -1)
    curve, started = [], time.perf_counter()
    for step in range(steps + 1):
        if step % 25 == 0:
            curve.append((step, evaluate(model, cfg, tgt, lens, greedy=False)[0]))
        if step == steps:
            break
        row = storch.denote_independent(data, 0, "data")     # (index, target tokens, length)
        tokens = model(row[0], est, length)                   # one est(Categorical(...)) per token
        storch.add_cost(edit_distance(tokens, row[1:-1], row[-1]), name="edit distance")
        storch.backward()                                     # also updates MAPO's buffer
        optimizer.step()
        optimizer.zero_grad()
    seconds = time.perf_counter() - started
    _, strings = evaluate(model, cfg, tgt, lens, greedy=True)
    return curve, strings, 1000 * seconds / steps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--k", type=int, default=4, help="sequences per target and step")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{len(TARGETS)} targets {', '.join(TARGETS)}; {args.k} sequences per target and step, "
          f"{args.steps} steps\n")
    print("| estimator | reward at start | reward at end | greedy strings at end | ms/step |")
    print("|---|---|---|---|---|")
    curves = {}
    for name in ("score + leave-one-out", "unordered_set", "sum_and_sample (MAPO)"):
        curve, strings, ms = train(name, args.steps, args.k)
        curves[name] = curve
        print(f"| {name} | {curve[0][1]:.2f} | {curve[-1][1]:.2f} | {' '.join(strings)} | {ms:.0f} |")
    print("\n(reward: minus the mean edit distance of 32 fresh samples per target; 0 is perfect)")

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, curve in curves.items():
            ax.plot([s for s, _ in curve], [r for _, r in curve], label=name)
        ax.set_xlabel("training step")
        ax.set_ylabel("reward (- edit distance)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "sequences.png", dpi=90)


if __name__ == "__main__":
    main()
