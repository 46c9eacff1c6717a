"""storch-compare at an equal budget of cost evaluations, and mean ± sd over seeds."""

from __future__ import annotations

import csv

from storch_bench.budget import aggregate, at_budget, evaluations, mean_sd
from storch_bench.cli import main
from storch_bench.roster import parse_specs, resolve
from storch_bench.vae import _latent_example


def test_evaluations_are_read_from_the_estimators_plates():
    d = _latent_example("categorical", requires_grad=True)
    runnable, _ = resolve(parse_specs("score@1,rebar@1,go@1,arm@1,score[baseline=greedy]@1,"
                                      "score[baseline=leave_one_out]@4"), d)
    counts = {spec.label: evaluations(spec, cls, d) for spec, cls in runnable}
    assert counts == {"score@1": (0, 1), "rebar@1": (0, 3), "go@1": (0, 21), "score[greedy]@1": (1, 1),
                      "score[loo]@4": (0, 1)}  # arm does not support one-hot latents
    chosen, notes = at_budget(runnable, d, 12)
    assert sorted(s.label for s, _ in chosen) == ["rebar@4", "score@12", "score[greedy]@11", "score[loo]@12"]
    assert [label for label, _ in notes] == ["go@1"]  # 21 evaluations per sample > 12


def test_mean_sd_and_aggregate():
    assert mean_sd([1.0, 3.0, float("nan")]) == (2.0, 2.0 ** 0.5)

    class R:
        def __init__(self, label, valid):
            self.model, self.label, self.valid, self.biased, self.max_order, self.note = "m", label, valid, False, 1, ""

    rows = aggregate([[R("a", 1.0), R("b", 5.0)], [R("a", 3.0)]], ["valid"])
    assert [(r["label"], r["seeds"], r["valid"]) for r in rows] == [("a", 2, (2.0, 2.0 ** 0.5)), ("b", 1, (5.0, 0.0))]


def test_budget_and_seeds_smoke(tmp_path, capsys):
    out = tmp_path / "r"
    code = main(["vae", "--estimators", "score@1,rebar@1", "--models", "bernoulli", "--epochs", "1",
                 "--max-train", "100", "--variance-reps", "2", "--checkpoints", "1", "--budget", "6",
                 "--seeds", "2", "--no-progress", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "at an equal budget of 6 cost evaluations" in text and "±" in text
    rows = list(csv.DictReader(open(out / "vae_budget.csv")))
    assert sorted(r["estimator"] for r in rows) == ["rebar@2", "score@6"] and all(r["seeds"] == "2" for r in rows)
    seeds = list(csv.DictReader(open(out / "vae_seeds.csv")))
    assert sorted({r["seed"] for r in seeds}) == ["0", "1"]
