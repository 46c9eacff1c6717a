"""storch-compare where estimator families are missing says what to install, before any run.

The registry is made to see storch-core alone (only core's entry point), as `pip install storch-core
storch-benchmarks` leaves it; a run with the wheels of those two packages gave the same output (p-pkg13).
"""

from __future__ import annotations

import pytest

import storch
from storch import registry
from storch_bench.cli import main


def _only(monkeypatch, modules: tuple) -> None:
    """The registry sees the entry points of these plugin modules only, as with the other packages uninstalled."""
    real = registry.entry_points
    monkeypatch.setattr(registry, "entry_points",
                        lambda **kw: [ep for ep in real(**kw) if ep.value.split(":")[0] in modules])
    storch.reload_estimators()


@pytest.fixture
def core_alone(monkeypatch):
    """Entry points of storch-core only: every family's estimators are unknown, as without their packages."""
    _only(monkeypatch, ("storch.builtins",))
    assert sorted(storch.available_estimators()) == ["expect", "reparameterization"]
    yield
    monkeypatch.undo()
    storch.reload_estimators()


@pytest.fixture
def core_and_score(monkeypatch):
    _only(monkeypatch, ("storch.builtins", "storch_score.plugin"))
    assert "score" in storch.available_estimators() and "gumbel_softmax" not in storch.available_estimators()
    yield
    monkeypatch.undo()
    storch.reload_estimators()


@pytest.mark.parametrize("argv, name, alternative", [
    (["ipd", "--iterations", "1", "--steps", "5", "--batch", "4", "--variance-reps", "0"], "score",
     "Or run --implementations torch"),
    (["sequences", "--steps", "1", "--variance-reps", "0"], "score", None),
    (["sequences", "--estimators", "unordered_set", "--steps", "1", "--variance-reps", "0"], "unordered_set", None),
])
def test_ipd_and_sequences_without_the_score_family_say_what_to_install(core_alone, tmp_path, capsys, argv, name,
                                                                       alternative):
    """They ended in a traceback of their first storch.estimator("score", ...) call (UnknownEstimatorError)."""
    with pytest.raises(SystemExit) as e:
        main([*argv, "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert f"storch-compare {argv[0]}: error: {argv[0]} builds the estimator {name!r}: " in err, err
    assert "`pip install storch-estimators-score`" in err, err
    assert (alternative is not None and alternative in err) or (alternative is None and "Or run" not in err), err


def test_ipd_with_the_hand_written_learners_alone_needs_no_family(core_alone, tmp_path, capsys):
    rc = main(["ipd", "--implementations", "torch", "--iterations", "1", "--steps", "5", "--batch", "4",
               "--variance-reps", "0", "--no-progress", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr()
    assert (tmp_path / "ipd.csv").read_text().count("torch") >= 1


def test_the_default_comparison_with_core_alone_says_to_install_a_family(core_alone, tmp_path, capsys):
    """`storch-compare` (auto: expect, reparameterization) said "name others with --estimators (auto: every installed
    one)", though no other estimator was installed."""
    rc = main(["--epochs", "1", "--max-train", "50", "--variance-reps", "2", "--checkpoints", "1",
               "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "Nothing ran: only storch-core's estimators are installed" in out, out
    assert "Install an estimator family, e.g. `pip install storch-estimators-score" in out, out
    assert "name others with --estimators" not in out, out


def test_auto_names_the_families_it_leaves_out(core_and_score):
    """`storch-compare` (auto) with storch-estimators-relaxed and -mvd missing printed its table without a word
    about gumbel_softmax, relax, mvd and the rest."""
    from storch_bench.cli import _missing_families

    assert _missing_families() == ["storch-estimators-relaxed", "storch-estimators-mvd"]


@pytest.mark.parametrize("estimators", ["auto", "expect@1"])
def test_the_note_on_families_left_out_comes_with_auto_only(core_alone, tmp_path, capsys, estimators):
    rc = main(["toy", "--estimators", estimators, "--replicates", "500", "--timing-reps", "1", "--no-progress",
               "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    note = ("--estimators auto compares the installed estimators; not installed: storch-estimators-score, "
            "storch-estimators-relaxed, storch-estimators-mvd (`pip install storch-estimators-score "
            "storch-estimators-relaxed storch-estimators-mvd` to compare theirs too)")
    assert (note in out) is (estimators == "auto"), out
