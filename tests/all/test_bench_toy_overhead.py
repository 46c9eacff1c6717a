"""storch-compare toy and overhead: smoke runs with tiny sizes; the hand-written references."""

import csv
import math

import pytest
import torch

from storch_bench.cli import main
from storch_bench.handwritten import gumbel_topk_bernoulli, unordered_set_surrogate
from storch_bench.overhead import Row, measure
from storch_bench.overhead_ipd import add_replay_columns, replay_pair


def test_toy_smoke(tmp_path):
    out = tmp_path / "toy"
    assert main(["toy", "--estimators", "expect@1,score@1,gumbel_softmax@1", "--replicates", "500",
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


def test_overhead_device_selection():
    from storch_bench.overhead import select_device

    assert select_device("cpu", cuda_available=False) == torch.device("cpu")
    assert select_device("auto", cuda_available=False) == torch.device("cpu")
    assert select_device("auto", cuda_available=True) == torch.device("cuda")
    assert select_device("cuda:1", cuda_available=True) == torch.device("cuda", 1)
    for bad, message in (("cuda", "CUDA is not available"), ("gpu0", "is not a device"), ("meta", "only cpu and cuda")):
        try:
            select_device(bad, cuda_available=False)
        except ValueError as e:
            assert message in str(e), e
        else:
            raise AssertionError(f"--device {bad} was accepted")


def test_overhead_device_path_and_storch_only_rows(tmp_path):
    # the device-moving code path (models, data, estimator, synchronisation, memory) on the CPU;
    # --device cuda runs the same code with torch.device("cuda")
    row = measure("vae", "loo", batch=2, n=3, min_time=0.01, device=torch.device("cpu"))
    assert row.same_grad == "yes" and row.storch_us > 0
    row = measure("toy", "sum_and_sample", batch=2, n=3, min_time=0.01, device="cpu")
    assert row.storch_us > 0 and math.isnan(row.torch_us) and row.note == "no hand-written version"
    out = tmp_path / "dev"
    assert main(["overhead", "--problems", "toy", "--configs", "sum_and_sample", "--batch-sizes", "2",
                 "--n-samples", "3", "--min-time", "0.01", "--device", "auto", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "overhead.csv")))
    assert [r["estimator"] for r in rows] == ["sum_and_sample"] and float(rows[0]["vs loo"]) > 0
    if not torch.cuda.is_available():
        assert main(["overhead", "--device", "cuda", "--out", str(out)]) == 2  # a clear message, no traceback


def test_overhead_compile_columns(tmp_path):
    # the --compile plumbing (storch.compile vs torch.compile of the losses, graph breaks counted); the
    # "eager" backend keeps it fast here, the CLI's default is inductor
    row = measure("toy", "score", batch=2, n=2, min_time=0.01, compile=True, backend="eager")
    assert "compile failed" not in row.note, row.note
    assert row.compiled_storch_us > 0 and row.compiled_torch_us > 0 and row.graph_breaks == 0  # storch.compile: one graph
    out = tmp_path / "cmp"
    assert main(["overhead", "--problems", "toy", "--configs", "score", "--batch-sizes", "1", "--n-samples", "2",
                 "--min-time", "0.01", "--compile", "--backend", "eager", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "overhead.csv")))
    assert float(rows[0]["compiled ratio"]) > 0 and rows[0]["graph breaks"] != ""


def test_ops_table_compares_equal_computations(tmp_path, capsys):
    """``storch-compare ops``: every case's hand-written raw call computes what the plate call does
    (the table's premise), the table is written, and an unknown case name is refused."""
    from storch_bench.ops import CASES

    assert main(["ops", "--min-time", "0.002", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "ops.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["case"] for r in rows} == {c.name for c in CASES}
    assert all(r["same"] == "yes" for r in rows), [r["case"] for r in rows if r["same"] != "yes"]
    assert all(float(r["storch us"]) > 0 and float(r["raw us"]) > 0 for r in rows)
    assert (tmp_path / "ops.md").read_text().startswith("| case |")
    assert not [c.name for c in CASES if "," in c.name]  # --cases splits on commas: every case selectable
    with pytest.raises(SystemExit) as e:  # a usage error before any timing
        main(["ops", "--cases", "no such op", "--out", str(tmp_path)])
    assert e.value.code == 2 and "argument --cases: unknown 'no such op'; choose from x + 1, " in capsys.readouterr().err
    if not torch.cuda.is_available():  # a clear message and exit status 2, not a traceback
        assert main(["ops", "--device", "cuda", "--out", str(tmp_path)]) == 2


def test_ipd_reinforce_replay_columns():
    # --replay for the episode rows: the REINFORCE loss of a 5-step episode batch traced once and
    # replayed; its gradient is eager storch's from the same seed, and the row gets both timings
    with_storch, by_hand, eager = replay_pair("loo", 5)
    torch.manual_seed(4)
    g_replay = with_storch()
    torch.manual_seed(4)
    assert torch.allclose(g_replay, eager(), rtol=1e-5, atol=1e-6)
    assert by_hand().shape == g_replay.shape
    row = Row("ipd reinforce T=5", "loo", 1, 128)
    add_replay_columns(row, "loo", 5, 0.005)
    assert "replay failed" not in row.note, row.note
    assert row.replay_same_grad == "yes" and row.replayed_storch_us > 0 and row.replay_torch_us > 0
