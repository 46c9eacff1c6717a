"""examples/sequences and `storch-compare sequences`: the edit distance, a smoke run."""

import random

import torch

from storch_bench.cli import main
from storch_bench.sequences import EOS, edit_distance


def _levenshtein(a, b):
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_edit_distance_matches_the_textbook_recurrence():
    rng = random.Random(0)
    n, length, width = 300, 6, 5
    gen = [[rng.randrange(0, 4) for _ in range(length)] for _ in range(n)]  # token 0 ends a string
    tgt_len = [rng.randrange(0, width + 1) for _ in range(n)]
    tgt = [[rng.randrange(1, 4) for _ in range(k)] + [0] * (width - k) for k in tgt_len]
    got = edit_distance(list(torch.tensor(gen).t()), torch.tensor(tgt), torch.tensor(tgt_len))
    for i in range(n):
        g = gen[i][:gen[i].index(EOS)] if EOS in gen[i] else gen[i]
        assert got[i] == _levenshtein(g, tgt[i][:tgt_len[i]]), (gen[i], tgt[i], tgt_len[i])


def test_storch_compare_sequences_smoke(tmp_path, capsys):
    rc = main(["sequences", "--steps", "6", "--k", "4", "--estimators", "score+loo,sum_and_sample",
               "--no-progress", "--out", str(tmp_path), "--seeds", "0,1", "--variance-reps", "3"])
    assert rc == 0
    md = (tmp_path / "sequences.md").read_text()
    assert "score+loo" in md and "sum_and_sample" in md and "failed" not in md and "skipped" not in md
    assert (tmp_path / "sequences.png").stat().st_size > 0
    rows = (tmp_path / "sequences.csv").read_text().splitlines()
    assert rows[0] == "estimator,seed,step,reward,greedy_reward" and len(rows) > 8
    assert "±" in md and " → " in md
