"""storch-compare's arguments: bad values are usage errors (exit 2, one line naming the option) before any run,
and each subcommand offers only the options it reads."""

import pytest

from storch_bench.cli import COMMANDS, _parser, main

EXAMPLE = "examples/which_estimator/hard_attention.py:step"


@pytest.mark.parametrize("argv, message", [
    (["model", EXAMPLE, "--estimators", "score@1.5"], "argument --estimators: cannot read estimator spec 'score@1.5'"),
    (["model", EXAMPLE, "--estimators", "score@0"], "argument --estimators: estimator spec 'score@0' asks for 0"),
    (["model", EXAMPLE, "--estimates", "0"], "argument --estimates: must be >= 4, got 0"),
    (["model", EXAMPLE, "--estimates", "1"], "argument --estimates: must be >= 4, got 1"),
    (["model", EXAMPLE, "--order", "0"], "argument --order: must be >= 1, got 0"),
    (["model", EXAMPLE, "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["model", EXAMPLE, "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["model", EXAMPLE, "--reference-estimates", "0"], "argument --reference-estimates: must be >= 32, got 0"),
    (["model", EXAMPLE, "--reference-estimates", "1"], "argument --reference-estimates: must be >= 32, got 1"),
    (["model", EXAMPLE, "--reference", "score[baseline"], "argument --reference: cannot read estimator spec"),
    (["vae", "--models", "nosuch"], "argument --models: unknown 'nosuch'; choose from bernoulli, categorical"),
    (["vae", "--samples", "0"], "argument --samples: must be >= 1, got 0"),
    # a name given twice ran (and was reported) twice
    (["vae", "--models", "bernoulli,bernoulli", "--epochs", "1", "--max-train", "10", "--estimators", "score@1",
      "--variance-reps", "2"], "argument --models: names 'bernoulli' more than once"),
    (["overhead", "--problems", "toy", "--configs", "score, score", "--batch-sizes", "1", "--n-samples", "1",
      "--min-time", "0.001"], "argument --configs: names 'score' more than once"),
    (["vae", "--estimators", ""], "argument --estimators: names no estimator"),
    (["vae", "--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (["overhead", "--problems", "nosuch"], "argument --problems: unknown 'nosuch'; choose from toy, vae, cnn, rnn, sbn, ipd"),
    (["overhead", "--configs", "nosuch"], "argument --configs: unknown 'nosuch'; choose from score, loo"),
    (["overhead", "--batch-sizes", "0"], "argument --batch-sizes: must be >= 1, got 0"),
    (["overhead", "--n-samples", "2,x"], "argument --n-samples: 'x' is not an integer"),
    (["overhead", "--min-time", "0"], "argument --min-time: must be > 0, got 0"),
    (["overhead", "--threads", "0"], "argument --threads: must be >= 1, got 0"),
    # --backend: an unknown one failed every row's compile after the eager timings (exit 0); without --compile it
    # was ignored (tiny sizes: the old code ran)
    (["overhead", "--compile", "--backend", "nosuch", "--problems", "toy", "--configs", "score", "--batch-sizes", "1",
      "--n-samples", "1", "--min-time", "0.001"], "argument --backend: unknown torch.compile backend 'nosuch'; "
                                                  "choose from "),
    # the ipd rows measure score and loo only: other configs left them out without a word
    (["overhead", "--problems", "toy,ipd", "--configs", "gumbel_softmax", "--batch-sizes", "1", "--n-samples", "1",
      "--min-time", "0.001"], "argument --configs: the ipd rows measure score and loo only"),
    (["overhead", "--backend", "eager", "--problems", "toy", "--configs", "score", "--batch-sizes", "1",
      "--n-samples", "1", "--min-time", "0.001"], "argument --backend: 'eager' is read only with --compile"),
    (["toy", "--threads", "-3"], "argument --threads: must be >= 1, got -3"),
    (["ipd", "--configs", "nosuch"], "argument --configs: unknown 'nosuch'; choose from LOLA-DiCE"),
    (["ipd", "--seeds", "0,a"], "argument --seeds: 'a' is not an integer"),
    # a seed torch.manual_seed cannot take was a traceback (ValueError: Overflow when unpacking long long)
    (["toy", "--seed", str(2**64), "--replicates", "500", "--timing-reps", "1", "--estimators", "score@1"],
     "argument --seed: must be < 9223372036854775808, got 18446744073709551616"),
    (["sequences", "--seeds", f"0,{2**64}", "--steps", "1", "--k", "2", "--estimators", "score+loo", "--variance-reps",
      "0"], "argument --seeds: must be < 9223372036854775808"),
    (["vae", "--seed", "-1", "--epochs", "1", "--max-train", "10", "--estimators", "score@1", "--models", "bernoulli"],
     "argument --seed: must be >= 0, got -1"),
    # one estimate has no variance: sequences printed "nan -> nan", ipd "-"
    (["ipd", "--iterations", "1", "--steps", "2", "--batch", "2", "--configs", "naive", "--variance-reps", "1"],
     "argument --variance-reps: must be 0 (skip) or >= 2"),
    (["sequences", "--steps", "1", "--k", "2", "--estimators", "score+loo", "--variance-reps", "1"],
     "argument --variance-reps: must be 0 (skip) or >= 2"),
    (["sequences", "--variance-reps", "-1"], "argument --variance-reps: must be >= 0, got -1"),
    (["toy", "--replicates", "0"], "argument --replicates: must be >= 500, got 0"),
    (["toy", "--replicates", "20"], "argument --replicates: must be >= 500, got 20"),
    (["sequences", "--estimators", "score@1"], "argument --estimators: unknown 'score@1'; choose from auto, "
                                               "score+loo, unordered_set, sum_and_sample"),
    (["ops", "--cases", "exp,nosuch", "--min-time", "0.001"], "argument --cases: unknown 'nosuch'; choose from x + 1,"),
    # a negative or nan threshold marked every call slow, or none
    (["ops", "--cases", "exp", "--min-time", "0.001", "--threshold", "-1"], "argument --threshold: must be >= 0, got -1"),
    (["ops", "--cases", "exp", "--min-time", "0.001", "--threshold", "nan"], "argument --threshold: must be >= 0, got nan"),
    # a misspelt subcommand said "unrecognized arguments: toyy"
    (["toyy"], "unknown command 'toyy'; choose from vae, toy, overhead, ops, model, sequences, ipd (none: vae)"),
    # options a subcommand would ignore are not offered
    (["ops", "--estimators", "nosuch@1"], "unrecognized arguments: --estimators nosuch@1"),
    (["ops", "--samples", "0"], "unrecognized arguments: --samples 0"),
    (["overhead", "--estimators", "score@1"], "unrecognized arguments: --estimators score@1"),
    (["ipd", "--samples", "3"], "unrecognized arguments: --samples 3"),
    (["sequences", "--samples", "3"], "unrecognized arguments: --samples 3"),
    (["toy", "--out", "/proc/storch-compare-x"], "argument --out: cannot write to '/proc/storch-compare-x'"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err and "Traceback" not in err, err
    # the subcommand's usage line, also for errors found after parsing (--out, --backend, unrecognized
    # arguments): they printed the top-level one, 'usage: storch-compare [-h] {vae,toy,...} ...'
    if argv[0] in COMMANDS:  # (not the misspelt command, nor the default vae)
        assert err.startswith(f"usage: storch-compare {argv[0]} "), err


@pytest.mark.parametrize("command, ignored", [("overhead", ("--estimators", "--samples", "--seed")),
                                              ("ops", ("--estimators", "--samples", "--seed")),
                                              ("ipd", ("--estimators", "--samples")),
                                              ("sequences", ("--samples",))])
def test_help_lists_only_the_options_a_subcommand_reads(command, ignored):
    sub = next(a for a in _parser()._actions if a.dest == "command").choices[command]
    text = " ".join(sub.format_help().split())
    assert all(f"{opt} " not in text for opt in ignored), text
    if command == "sequences":  # names, not specs
        assert "score+loo, unordered_set, sum_and_sample" in text and "name[" not in text, text


def test_model_help_states_the_bias_rule():
    sub = next(a for a in _parser()._actions if a.dest == "command").choices["model"]
    text = " ".join(sub.format_help().split())
    assert "the bias z-test and rel. bias only from 32 on" in text and "at least 32" in text, text


def test_tasks_py_names_an_unknown_verb(capsys):
    """`python3 tasks.py tset` printed the usage without saying the verb is unknown."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("storch_tasks", Path(__file__).parents[2] / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    assert tasks.main(["tset"]) == 2
    captured = capsys.readouterr()
    assert "unknown command 'tset'; choose from demo, test, docs" in captured.err
    assert "The quick-start commands" in captured.out and "two quick-start" not in captured.out


def test_tasks_py_refuses_a_python_the_pinned_torch_has_no_wheel_for(monkeypatch, capsys):
    """On Python 3.9 (which the packages accept) `python3 tasks.py test` failed deep in tox's pip install of
    torch==2.13.0, which has no wheel for it: the quick start says 3.10+, and tasks.py says why, first."""
    import importlib.util
    import sys
    import types
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("storch_tasks_py39", Path(__file__).parents[2] / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    monkeypatch.setattr(tasks, "sys", types.SimpleNamespace(version_info=(3, 9, 18), stderr=sys.stderr))
    monkeypatch.setattr(tasks, "ensure_tox", lambda: pytest.fail("tox was set up on Python 3.9"))
    import re

    root = Path(__file__).parents[2]
    pins = set(re.findall(r"torch==([0-9.]+)", (root / "tox.ini").read_text()))  # (the message and README name it)
    assert len(pins) == 1, pins
    pin = pins.pop()
    for verb in ("test", "demo", "docs"):
        assert tasks.main([verb]) == 2
        err = capsys.readouterr().err
        assert "no wheel for Python 3.9; run this file with Python 3.10 or newer" in err
        assert f"environments pin torch {pin}," in err, (pin, err)
    text = (root / "README.md").read_text()
    assert f"Needs only `python3` (3.10+: the test and demo environments pin torch {pin}," in text


def test_readme_using_it_block_defines_its_data():
    """The README's "Using it" block failed with NameError: batches when copied (the data was in hidden setup)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[2] / "README.md").read_text()
    section = text[text.index("## Using it"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    before = section[:section.index("```python")]
    assert "test-setup" not in before
    assert block.index("batches = ") < block.index("for data in batches")


def test_overhead_ipd_rows_say_why_compiled_and_replay_columns_are_empty(tmp_path, monkeypatch):
    """--compile does not reach the ipd rows, --replay only their reinforce rows: the empty columns were unexplained.
    (The episode pairs are replaced by a tiny gradient: this checks the notes, not the timings.)"""
    import csv

    import torch

    import storch_bench.overhead_ipd as overhead_ipd

    def tiny(config, steps):
        theta = torch.zeros(2, requires_grad=True)

        def grad():
            return torch.autograd.grad(theta.exp().sum(), theta)[0]

        return grad, grad

    for kind in overhead_ipd.PAIRS:
        monkeypatch.setitem(overhead_ipd.PAIRS, kind, (tiny, (2,)))
    monkeypatch.setattr(overhead_ipd, "add_replay_columns", lambda row, *a: setattr(row, "replay_same_grad", "yes"))
    assert main(["overhead", "--problems", "ipd", "--configs", "score", "--min-time", "0.001", "--compile", "--backend",
                 "eager", "--replay", "--no-progress", "--out", str(tmp_path)]) == 0
    rows = {r["problem"]: r for r in csv.DictReader(open(tmp_path / "overhead.csv"))}
    assert set(rows) == {"ipd reinforce T=2", "ipd surrogate T=2", "ipd lola T=2"}
    assert all("not compiled (--compile: toy, vae, cnn, rnn)" in r["note"] for r in rows.values())
    assert rows["ipd reinforce T=2"]["replay same grad"] == "yes"
    assert "not replayed" not in rows["ipd reinforce T=2"]["note"]
    assert all("not replayed (--replay: the ipd reinforce rows only)" in rows[k]["note"]
               for k in ("ipd surrogate T=2", "ipd lola T=2"))


def test_overhead_runs_the_ipd_rows_it_documents(tmp_path, monkeypatch):
    """`storch-compare overhead --problems ipd` (docs/performance.md, issue 19's ipd targets) reaches the ipd rows:
    a regression had the argument check refuse 'ipd' while run_overhead still handled it."""
    import storch_bench.overhead_ipd as overhead_ipd

    asked = []

    def rows(row_cls, configs, min_time=0.2, kinds=(), replay=False):
        asked.append((tuple(configs), min_time))
        row = row_cls("ipd reinforce T=50", "score", 1, 128)
        row.storch_us, row.torch_us, row.same_grad = 2.0, 1.0, "yes"
        return [row]

    monkeypatch.setattr(overhead_ipd, "ipd_rows", rows)
    assert main(["overhead", "--problems", "ipd", "--configs", "score", "--min-time", "0.01", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    assert asked == [(("score",), 0.01)]
    assert "ipd reinforce T=50" in (tmp_path / "overhead.csv").read_text()


@pytest.mark.parametrize("target, message", [
    ("no/such/model.py:step", "argument FILE:FUNCTION: no such file 'no/such/model.py'"),
    (EXAMPLE.replace(":step", ":stpe"), "has no function 'stpe'; write FILE:FUNCTION (functions there: "
                                        "HardAttention, model, step)"),
])
def test_model_target_that_names_nothing_is_a_usage_error(target, message, tmp_path, capsys):
    """`storch-compare model nosuch.py:step` ended in a traceback (FileNotFoundError / AttributeError, exit 1)."""
    assert main(["model", target, "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--problems", "nosuch"], "argument --problems: unknown 'nosuch'; choose from toy, vae, cnn, rnn"),
    (["--problems", "toy", "--configs", "nosuch"], "argument --configs: unknown 'nosuch'; choose from score, loo"),
    (["--problems", "toy", "--configs", "score", "--batch-sizes", "0", "--n-samples", "1"],
     "argument --batch-sizes: must be >= 1, got 0"),
    (["--problems", "toy", "--configs", "score", "--batch-sizes", "1", "--n-samples", "1", "--min-time", "0"],
     "argument --min-time: must be > 0, got 0"),
])
def test_compiled_benchmark_arguments_are_usage_errors(argv, message, capsys):
    """`python -m storch_bench.compiled` (docs/performance.md) read its options unchecked: an unknown problem or
    config was a traceback (after the rows before it), batch 0 a PlateError row, --min-time 0 a row of inf."""
    from storch_bench import compiled

    with pytest.raises(SystemExit) as e:
        compiled.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert message in err and "Traceback" not in err, err


def test_model_report_says_when_memory_was_not_measured(tmp_path):
    """`storch-compare model ... --no-memory` said "peak MB = torch CPU allocator peak ..." above a column of "-"."""
    assert main(["model", EXAMPLE, "--estimators", "score@1", "--estimates", "4", "--warmup", "0", "--no-memory",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "model.md").read_text()
    assert "peak MB = not measured (measure_memory=False, --no-memory)" in text and "allocator peak" not in text, text
