"""LOLA-DiCE on the iterated prisoner's dilemma, with storch (examples/lola).

    python examples/lola/lola_dice.py                 # 200 iterations, seeds 0,1,2 (a few minutes, 1 thread)
    python examples/lola/lola_dice.py --seeds 0 --iterations 100 --implementations storch,torch

Trains LOLA-DiCE agents (with and without the second-order baseline) and naive learners, and
writes ``results/ipd.md`` (final average reward per step; variance of the second-order gradient
estimate with and without the baseline), ``results/ipd.csv`` and ``results/ipd.png``. The code is
in the benchmarks package (``pip install -e benchmarks``): the storch rollout is
``storch_bench.ipd.StorchDice``, the hand-written DiCE reference ``storch_bench.ipd.TorchDice``, the
LOLA step ``storch_bench.lola.lola_gradient``; see README.md here.
"""

import sys
from pathlib import Path

from storch_bench.cli import main

if __name__ == "__main__":
    defaults = ["ipd", "--iterations", "200", "--seeds", "0,1,2", "--variance-reps", "64",
                "--out", str(Path(__file__).resolve().parent / "results")]
    sys.exit(main(defaults + sys.argv[1:]))  # later options override the defaults
