"""storch_bench.compare_estimators / `storch-compare model`: which estimator for MY model?

Two small models with exact gradients (a Bernoulli model with a closed form; a categorical model
with a data plate, enumerated by hand) and the hard-attention example through the CLI.
"""

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from storch_bench import Spec, compare_estimators

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "which_estimator" / "hard_attention.py"
T = 0.45
QUIET = dict(measure_memory=False, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: a second OpenMP thread only waits for a core on a loaded machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bernoulli_model():
    theta = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64, requires_grad=True)

    def step(est):
        z = est(Bernoulli(logits=theta))
        storch.add_cost(((z - T) ** 2).sum(), name="f")
        return theta

    s = torch.sigmoid(theta.detach())
    return step, theta, s * (1 - s) * (1 - 2 * T)  # d/dθ E[(b - t)²] = σ'(θ)(1 - 2t)


def _plate_model():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    costs = torch.rand(6, 4, generator=gen, dtype=torch.float64)
    weight = torch.nn.Parameter(0.5 * torch.randn(3, 4, generator=gen, dtype=torch.float64))
    data = torch.cat([x, costs], 1)

    def step(est):
        row = storch.denote_independent(data, 0, "data")
        z = est(OneHotCategorical(logits=row[:3] @ weight))
        storch.add_cost((z * row[3:]).sum(), name="c")
        return [weight]

    w = weight.detach().clone().requires_grad_(True)
    exact = torch.autograd.grad((torch.softmax(x @ w, -1) * costs).sum(-1).mean(), w)[0].reshape(-1)
    return step, exact


class Boom(storch.Estimator):
    """An estimator that raises in its proposal."""

    name = "boom"

    def proposal(self, node):
        raise RuntimeError("boom\nsecond line of the message")


def _z_vs_exact(est: torch.Tensor, exact: torch.Tensor) -> float:
    se = est.std(0) / est.shape[0] ** 0.5
    return float(((est.mean(0) - exact).abs() / se).max())


def test_bernoulli_closed_form_variance_bias_and_reproducible_estimates():
    step, theta, exact = _bernoulli_model()
    n = 400
    c = compare_estimators(step, ["score@1", "score[baseline=leave_one_out]@4", "gumbel_softmax[temperature=2.0]@1",
                                  "expect@1"], estimates=n, warmup=2, seed=3, keep_estimates=True, **QUIET)
    assert c.reference == "expect@1" and c.reference_estimates == 1
    # warm-up ran storch.backward() 2 steps per estimator, yet the user's parameters are untouched
    assert theta.grad is None and theta.tolist() == [-1.0, 0.0, 1.0]
    torch.testing.assert_close(c.reference_mean, exact, rtol=1e-12, atol=1e-14)
    assert {r.label for r in c.rows} == {"score@1", "score[loo]@4", "gumbel_softmax[temperature=2.0]@1", "expect@1"}
    for r in c.rows:
        assert r.estimates.shape == (n, 3)
        by_hand = np.var(r.estimates.numpy(), axis=0, ddof=1).sum()  # trace of the covariance
        assert r.variance == pytest.approx(by_hand, rel=1e-10, abs=1e-30)
        assert r.ms_per_step > 0 and r.cost_evals >= 1
        assert r.efficiency == pytest.approx(r.variance * r.ms_per_step)
    # the estimates are what the documented protocol gives: manual_seed(seed), then one graph per estimate
    torch.manual_seed(3)
    est = storch.estimator("score", plate="z")
    hand = []
    for _ in range(n):
        with storch.Graph():
            step(est)
            hand.append(torch.autograd.grad(storch.surrogate_loss(), theta)[0])
    torch.testing.assert_close(c.row("score@1").estimates, torch.stack(hand), rtol=0, atol=0)
    score, loo, gumbel, exact_row = (c.row(s) for s in ("score@1", "score[baseline=leave_one_out]@4",
                                                        "gumbel_softmax[temperature=2.0]@1", "expect@1"))
    for r in (score, loo):
        assert r.bias_z < 4, r
        assert _z_vs_exact(r.estimates, exact) < 4  # unbiased against the closed form, too
        assert r.note == ""
    assert loo.variance < score.variance / 2
    assert gumbel.bias_z > 10 and gumbel.biased and gumbel.note == "biased by design", gumbel
    assert exact_row.variance == 0 and exact_row.bias_z == 0 and exact_row.cost_evals == 8
    assert c.rows[0].label == "expect@1"  # zero variance x time ranks first


def test_data_plate_model_error_row_skips_and_stochastic_reference():
    step, exact = _plate_model()
    n = 300
    c = compare_estimators(step, ["score@1", "unordered_set@3", "gumbel_softmax[temperature=2.0]@1",
                                  Spec("boom", 1, cls=Boom), "arm@1"],
                           estimates=n, warmup=2, reference="score[baseline=leave_one_out]@4",
                           reference_estimates=600, keep_estimates=True, **QUIET)
    assert c.reference == "score[loo]@4" and c.reference_estimates == 600
    assert c.distributions == ["OneHotCategorical(batch (), event (4,))"]
    boom = c.row("boom@1")
    assert boom.note == "error: RuntimeError: boom" and not boom.ok and boom.estimates is None
    assert c.rows[-1] is boom  # errors last
    assert dict(c.skipped)["arm@1"].startswith("supports Bernoulli")
    for label in ("score@1", "unordered_set@3"):
        r = c.row(label)
        by_hand = np.var(r.estimates.numpy(), axis=0, ddof=1).sum()
        assert r.variance == pytest.approx(by_hand, rel=1e-10)
        assert r.bias_z < 4, r
        assert _z_vs_exact(r.estimates, exact) < 4
    assert c.row("unordered_set@3").variance < c.row("score@1").variance
    assert c.row("unordered_set@3").cost_evals == 3
    gumbel = c.row("gumbel_softmax[temperature=2.0]@1")
    assert gumbel.bias_z > 6 and gumbel.note == "biased by design", gumbel


def test_order_two_skips_order_limited_and_biased_estimators():
    step, theta, _ = _bernoulli_model()
    c = compare_estimators(step, ["score[baseline=leave_one_out]@4", "unordered_set@4", "gumbel_softmax@1", "mvd@1"],
                           order=2, estimates=200, warmup=0, **QUIET)
    skipped = dict(c.skipped)
    assert skipped["unordered_set@4"].startswith("max_order=1") and skipped["mvd@1"].startswith("max_order=1")
    assert skipped["gumbel_softmax@1"].startswith("biased")
    assert [r.label for r in c.rows] == ["score[loo]@4"]
    # second derivative along a ±1 direction: the Hessian is diagonal, σ''(θ)(1 - 2t)
    s = torch.sigmoid(theta.detach())
    torch.testing.assert_close(c.reference_mean.abs(), (s * (1 - s) * (1 - 2 * s) * (1 - 2 * T)).abs())
    assert c.rows[0].bias_z < 4


def test_reference_falls_back_when_enumeration_exceeds_its_budget():
    theta = torch.linspace(-1, 1, 13, dtype=torch.float64, requires_grad=True)  # 2^13 > expect's budget 4096

    def step(est):
        storch.add_cost(((est(Bernoulli(logits=theta)) - T) ** 2).sum())
        return theta

    c = compare_estimators(step, ["expect@1", "score@1"], estimates=32, warmup=0, reference_estimates=40,
                           samples=4, **QUIET)
    assert c.reference == "score[loo]@4" and c.reference_estimates == 40
    assert dict(c.skipped)["expect@1"].startswith("UnsupportedDistributionError: expect: enumerating 2^13")
    assert [r.label for r in c.rows] == ["score@1"] and c.rows[0].bias_z < 4


def test_a_model_that_calls_est_several_times_skips_estimators_without_partitions():
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)

    def step(est):  # two steps of one partition: b2 depends on b1
        b1 = est(Bernoulli(logits=theta[0]))
        b2 = est(Bernoulli(logits=theta[1] + b1))
        storch.add_cost((b1 + b2 - 0.8) ** 2, name="c")
        return theta

    th = theta.detach().clone().requires_grad_(True)
    expectation = sum(Bernoulli(logits=th[0]).log_prob(torch.tensor(b1)).exp()
                      * Bernoulli(logits=th[1] + b1).log_prob(torch.tensor(b2)).exp() * (b1 + b2 - 0.8) ** 2
                      for b1 in (0.0, 1.0) for b2 in (0.0, 1.0))
    exact = torch.autograd.grad(expectation, th)[0]
    c = compare_estimators(step, ["score@1", "score[baseline=leave_one_out]@4", "arm@1", "expect@1"],
                           estimates=300, warmup=0, reference_estimates=300, samples=4, keep_estimates=True, **QUIET)
    skipped = dict(c.skipped)
    assert set(skipped) == {"arm@1", "expect@1"}  # (gumbel_softmax supports partitions since a8fee4a)
    assert all("partition" in why for why in skipped.values())
    assert c.reference == "score[loo]@4"
    for r in c.rows:
        assert r.bias_z < 4 and _z_vs_exact(r.estimates, exact) < 4, r


def test_a_named_reference_that_cannot_run_is_refused():
    """A biased or unknown --reference ran on with "reference = none" and exit 0."""
    from storch_bench.model_compare import BadReferenceError

    step, _, _ = _bernoulli_model()
    with pytest.raises(BadReferenceError, match="gumbel_softmax@1 cannot be the reference: biased"):
        compare_estimators(step, ["score@1"], estimates=8, warmup=0, reference="gumbel_softmax@1", **QUIET)
    with pytest.raises(BadReferenceError, match="nosuch@1 cannot be the reference: unknown estimator"):
        compare_estimators(step, ["score@1"], estimates=8, warmup=0, reference="nosuch@1", **QUIET)
    with pytest.raises(ValueError, match="reference_estimates must be >= 32"):
        compare_estimators(step, ["score@1"], estimates=8, warmup=0, reference_estimates=1, **QUIET)


@pytest.mark.parametrize("reference", ["nosuch@1", "gumbel_softmax@1"])
def test_cli_refuses_a_bad_reference(tmp_path, capsys, reference):
    from storch_bench.cli import main

    rc = main(["model", f"{EXAMPLE}:step", "--estimators", "score@1", "--estimates", "4", "--warmup", "0",
               "--reference", reference, "--no-memory", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and f"argument --reference: {reference} cannot be the reference" in err, err


def test_too_few_estimates_for_the_bias_test_leave_the_bias_columns_empty():
    """With 16 estimates score[baseline=learned]@1 showed bias z 8.89 ("> 4: biased"): below 32 no verdict."""
    from storch_bench.model_cli import markdown

    step, _, _ = _bernoulli_model()
    c = compare_estimators(step, ["score@1"], estimates=16, warmup=0, **QUIET)
    r = c.row("score@1")
    assert r.variance > 0 and np.isnan(r.bias_z) and np.isnan(r.rel_bias)
    md = markdown(c)
    assert "too few for the bias z-test" in md and "> 4: biased" not in md, md
    c = compare_estimators(step, ["score@1"], estimates=32, warmup=0, **QUIET)
    assert c.row("score@1").bias_z < 4 and "> 4: biased" in markdown(c)


def test_bad_step_functions_get_clear_errors():
    theta = torch.zeros(2, requires_grad=True)

    def no_params(est):
        storch.add_cost(est(Bernoulli(logits=theta)).sum())
        return None

    def no_node(est):
        storch.add_cost(theta.sum())
        return theta

    with pytest.raises(TypeError, match="must return the parameters"):
        compare_estimators(no_params, ["score@1"], **QUIET)
    with pytest.raises(ValueError, match="no stochastic node"):
        compare_estimators(no_node, ["score@1"], **QUIET)
    with pytest.raises(ValueError, match="order must be"):
        compare_estimators(no_node, ["score@1"], order=0, **QUIET)


def test_cli_with_a_misspelt_estimator_keeps_the_suggestion_and_fails(tmp_path, capsys):
    """storch-compare model ... --estimators scroe@1 said "not installed" and exited 0 with an empty table."""
    from storch_bench.cli import main

    rc = main(["model", f"{EXAMPLE}:step", "--estimators", "scroe@1", "--estimates", "4", "--warmup", "1",
               "--reference-estimates", "32", "--no-memory", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 2, out
    assert "scroe@1: unknown estimator: no estimator named 'scroe' is installed. Did you mean 'score'?" in out, out
    assert "not installed" not in out and "Nothing ran: --estimators scroe@1: a spec to fix" in out, out


def test_cli_on_the_example(tmp_path):
    exe = Path(sys.executable).with_name("storch-compare")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "storch_bench"]
    out = tmp_path / "model"
    proc = subprocess.run(cmd + ["model", f"{EXAMPLE}:step", "--estimators",
                                 "score@1,score[baseline=leave_one_out]@8,unordered_set@8,arm@1",
                                 "--estimates", "32", "--warmup", "1", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = {r["estimator"]: r for r in csv.DictReader(open(out / "model.csv"))}
    assert rows["arm@1"]["note"].startswith("skipped: supports Bernoulli")
    var = {k: float(rows[k]["variance"]) for k in ("score@1", "score[loo]@8", "unordered_set@8")}
    assert var["score[loo]@8"] < var["score@1"] / 5 and var["unordered_set@8"] < var["score@1"] / 5, var
    assert all(float(rows[k]["bias_z"]) < 4 for k in var)
    assert all(float(rows[k]["peak_mb"]) > 0 and float(rows[k]["ms_per_step"]) > 0 for k in var)
    assert rows["unordered_set@8"]["cost_evals"] == "8" and rows["score@1"]["cost_evals"] == "1"
    assert (out / "model.png").stat().st_size > 1000
    md = (out / "model.md").read_text()
    assert "| score[loo]@8 |" in md and "expect@1, exact" in md
    assert "| unordered_set@8 |" in proc.stdout and "Wrote" in proc.stdout  # the Markdown table on stdout
