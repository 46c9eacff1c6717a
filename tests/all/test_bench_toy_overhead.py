"""storch-compare toy and overhead: smoke runs with tiny sizes; the hand-written references."""

import csv
import math

import torch

from storch_bench.cli import main
from storch_bench.handwritten import gumbel_topk_bernoulli, unordered_set_surrogate
from storch_bench.overhead import measure


def test_toy_smoke(tmp_path):
    out = tmp_path / "toy"
    assert main(["toy", "--estimators", "expect@1,score@1,gumbel_softmax@1", "--replicates", "200",
                 "--timing-reps", "2", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "toy.csv")))
    by = {(r["problem"], r["estimator"]): r for r in rows}
    assert {p for p, _ in by} == {"rebar t=0.45", "rebar t=0.499", "categorical K=10"}
    exact = by[("rebar t=0.45", "expect@1")]
    assert float(exact["max abs bias"]) < 1e-12 and float(exact["variance"]) < 1e-20
    assert float(by[("categorical K=10", "score@1")]["variance"]) > 0
    assert (out / "toy.md").read_text().count("|") > 20


def test_toy_exact_gradient_matches_closed_form():
    from storch_bench.toy import PROBLEMS

    value, grad = PROBLEMS["rebar045"]().exact()
    s = torch.sigmoid(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(grad, s * (1 - s) * (1 - 2 * 0.45))
    assert math.isclose(value, float((s * 0.55**2 + (1 - s) * 0.45**2).sum()))


def test_overhead_smoke_and_same_gradients(tmp_path):
    for problem in ("toy", "vae"):
        row = measure(problem, "loo", batch=3, n=4, min_time=0.01)
        assert row.same_grad == "yes", (problem, row)
        assert row.storch_us > 0 and row.torch_us > 0 and row.storch_mb >= 0
    assert measure("toy", "loo", batch=1, n=1).note.startswith("needs n >= 2")
    out = tmp_path / "ovh"
    assert main(["overhead", "--problems", "toy", "--configs", "score,gumbel_softmax", "--batch-sizes", "2",
                 "--n-samples", "2", "--min-time", "0.01", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "overhead.csv")))
    assert len(rows) == 2 and all(float(r["time ratio"]) > 0 for r in rows)


def test_handwritten_unordered_set_is_unbiased():
    # the reference estimator against the exact gradient of REBAR's toy (z-test, 4 standard errors)
    torch.manual_seed(0)
    r, t = 4000, 0.45
    theta = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    th = theta.expand(r, 3).clone().requires_grad_(True)
    z, logp = gumbel_topk_bernoulli(th, 3)
    assert all(len({tuple(s.tolist()) for s in z[:, i]}) == 3 for i in range(20))  # distinct
    loss = unordered_set_surrogate(logp, ((z - t) ** 2).sum(-1), points=200)
    g = torch.autograd.grad(loss, th)[0] * r
    s = torch.sigmoid(theta)
    z_score = (g.mean(0) - s * (1 - s) * (1 - 2 * t)) / (g.std(0) / r**0.5)
    assert z_score.abs().max() < 4, z_score
