"""Sequence estimators on a GRU decoder under a non-differentiable reward (examples/sequences).

    python examples/sequences/train.py                       # 400 steps, k = 8, every estimator
    python examples/sequences/train.py --steps 100 --estimators score+loo,sum_and_sample

A small GRU decoder learns to spell 8 target strings (given the target's index); the reward is the
negative edit distance of the generated string (up to its end token) to the target, which has no
gradient. The model code is the same for every estimator; only the estimator line changes:

    est = storch.estimator("score", plate="seq", n_samples=8, baseline="leave_one_out")
    est = storch.estimator("unordered_set", plate="seq", n_samples=8, eos=0)
    est = storch.estimator("sum_and_sample", plate="seq", buffer=4, n_samples=4, baseline="leave_one_out", eos=0)

    tokens = model(ids, est, length)            # one est(Categorical(...)) call per token: one partition
    storch.add_cost(edit_distance(tokens, target, target_len))
    storch.backward()

Writes results/sequences.md (final rewards, time per step, peak memory), sequences.csv and
sequences.png (reward curves). The code is in the benchmarks package (``pip install -e benchmarks``):
``storch_bench.sequences`` (``Decoder``, ``edit_distance``, ``training_step``); ``storch-compare
sequences`` runs the same comparison.
"""

import sys
from pathlib import Path

from storch_bench.cli import main

if __name__ == "__main__":
    defaults = ["sequences", "--out", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(defaults + sys.argv[1:]))  # later options override the defaults
