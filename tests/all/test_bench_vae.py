"""storch-compare (the discrete VAE comparison): smoke run, reproducibility, estimator selection."""

import csv

import pytest
import torch
from torch.distributions import Bernoulli, Normal, OneHotCategorical

import storch
from storch_bench import Spec, VAEConfig, parse_specs, resolve, run_vae
from storch_bench.cli import main
from storch_bench.roster import parse_spec


class LocalScore(storch.Estimator):
    """A third-party estimator that is not registered: the comparison must take it as it is."""

    name = "local_score"
    distributions = (Bernoulli, OneHotCategorical)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    rc = main(["--estimators", "score@1,score[baseline=leave_one_out]@2,gumbel_softmax@1,expect@1,nosuch@1",
               "--epochs", "2", "--max-train", "100", "--batch-size", "50", "--variance-reps", "3",
               "--checkpoints", "2", "--no-progress", "--out", str(out), *extra])
    assert rc == 0
    return out


def test_smoke_and_same_seed_same_csv(tmp_path, capsys):
    a = _run(tmp_path, "a")
    b = _run(tmp_path, "b")
    text = capsys.readouterr().out
    for f in ("vae.md", "vae.csv", "vae_cost.csv", "vae_curves.csv", "vae.png"):
        assert (a / f).stat().st_size > 0, f
    assert (a / "vae.csv").read_bytes() == (b / "vae.csv").read_bytes()
    assert (a / "vae_curves.csv").read_bytes() == (b / "vae_curves.csv").read_bytes()
    rows = list(csv.DictReader(open(a / "vae.csv")))
    labels = {(r["model"], r["estimator"]) for r in rows}
    assert ("bernoulli", "score@1") in labels and ("categorical", "score[loo]@2") in labels
    assert ("categorical", "gumbel_softmax@1") in labels
    for r in rows:
        assert float(r["valid_neg_elbo"]) > 0 and float(r["grad_variance_mean"]) >= 0
    md = (a / "vae.md").read_text()
    # expect: 2^20 joint values exceed its budget on the first step; nosuch: not installed
    assert "expect@1" in md and "UnsupportedDistributionError" in md
    assert "nosuch@1: unknown estimator: no estimator named 'nosuch'" in md
    assert "valid -ELBO" in text


@pytest.mark.parametrize("spec, advice", [("scroe@1", "Did you mean 'score'"),
                                          ("score[baselin=leave_one_out]@2", "Did you mean 'baseline'")])
@pytest.mark.parametrize("seeds", ["1", "2"])
def test_a_misspelt_spec_keeps_the_suggestion_gets_no_install_advice_and_fails(tmp_path, capsys, spec, advice, seeds):
    """storch-compare vae --estimators scroe@1 said "not installed" and "Install an estimator family"
    (the registry's "Did you mean 'score'?" dropped), and exited 0 with an empty table."""
    rc = main(["vae", "--estimators", spec, "--epochs", "1", "--max-train", "50", "--models", "bernoulli",
               "--seeds", seeds, "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 2, out
    assert advice in out and "Install an estimator family" not in out and "not installed" not in out, out
    assert f"Nothing ran: --estimators {spec}: a spec to fix ({spec}: " in out, out


def test_installed_estimators_that_cannot_train_get_their_reasons_not_install_advice(tmp_path, capsys):
    """vimco, importance (no proposal) and reparameterization printed "No installed estimator could train these
    models. Install an estimator family" and called importance "an unknown estimator name"."""
    rc = main(["vae", "--estimators", "vimco@1,importance@1,reparameterization@1", "--epochs", "1",
               "--max-train", "50", "--models", "bernoulli", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 2, out
    assert "Install" not in out and "unknown estimator name" not in out, out
    assert "importance@1: invalid options: " in out and "`proposal` is required" in out, out
    assert "- bernoulli: vimco@1: estimates the gradient of a multi-sample bound" in out, out
    assert "- bernoulli: reparameterization@1: needs a distribution with rsample" in out, out


@pytest.mark.parametrize("seeds", ["1", "2"])
def test_nothing_ran_is_a_failed_run_with_one_seed_or_several(tmp_path, capsys, seeds):
    """With several seeds, a run where no estimator could train the models (none a misspelt spec) printed no
    reason and exited 0; with one seed it printed the reason and exited 0. Both exit 1 with the reason."""
    rc = main(["vae", "--estimators", "reparameterization@1", "--epochs", "1", "--max-train", "50",
               "--models", "bernoulli", "--seeds", seeds, "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "Nothing ran: none of these estimators can train these models" in out, out
    assert "- bernoulli: reparameterization@1: needs a distribution with rsample" in out, out


def test_different_seed_changes_numbers(tmp_path):
    a = _run(tmp_path, "a")
    c = _run(tmp_path, "c", "--seed", "1")
    assert (a / "vae.csv").read_bytes() != (c / "vae.csv").read_bytes()


def test_unregistered_estimator_class_takes_part():
    cfg = VAEConfig([Spec("local_score", 1, cls=LocalScore)], models=("bernoulli",), epochs=1, max_train=50,
                    variance_reps=2, checkpoints=2, measure_memory=False)
    results, skipped = run_vae(cfg, progress=False)
    assert [r.label for r in results] == ["local_score@1"] and not skipped
    assert len(results[0].valid_curve) == 2 and len(results[0].variances) == 2


def test_selection_reads_class_attributes():
    specs = parse_specs("auto", n_multi=3)
    assert Spec("score", 3, (("baseline", "leave_one_out"),)) in specs
    runnable, skipped = resolve(specs, Normal(torch.zeros(2), 1.0))
    names = {s.name for s, _ in runnable}
    assert "reparameterization" in names
    assert all(storch.get_estimator_class(s.name).distributions is None
               or any(t is Normal for t in storch.get_estimator_class(s.name).distributions)
               for s, _ in runnable)
    runnable, skipped = resolve(specs, Bernoulli(logits=torch.zeros(20)))
    assert "reparameterization@1" in dict(skipped)


def test_spec_parsing():
    s = parse_spec("gumbel_softmax[temperature=0.5]@8")
    assert (s.name, s.n_samples, s.options) == ("gumbel_softmax", 8, (("temperature", 0.5),))
    assert s.label == "gumbel_softmax[temperature=0.5]@8"
    assert parse_specs("score[baseline=leave_one_out,decay=0.9]@2,score@1") == [
        Spec("score", 2, (("baseline", "leave_one_out"), ("decay", 0.9))), Spec("score", 1)]
    with pytest.raises(ValueError, match="option=value"):
        parse_spec("score[baseline]@2")


class Exploding(LocalScore):
    """An estimator whose gradients are NaN: the run must end as 'diverged', the others go on."""

    name = "exploding"

    def gradient_function(self, node):
        return node.log_prob(node.sample) * float("nan")


class Broken(LocalScore):
    name = "broken"

    def proposal(self, node):
        raise RuntimeError("boom")


def test_diverging_and_broken_estimators_are_reported():
    cfg = VAEConfig([Spec("exploding", 1, cls=Exploding), Spec("broken", 1, cls=Broken),
                     Spec("local_score", 1, cls=LocalScore)], models=("bernoulli",), epochs=2, max_train=50,
                    variance_reps=2, checkpoints=2, measure_memory=False)
    results, skipped = run_vae(cfg, progress=False)
    notes = {r.label: r.note for r in results}
    assert notes["exploding@1"].startswith("diverged"), notes
    assert notes["broken@1"] == "error: RuntimeError: boom"
    assert notes["local_score@1"] == ""
