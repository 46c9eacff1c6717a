"""Each storch-compare option reaches the code it configures: the subcommand's runner is replaced by a recorder
(or run at the tiniest sizes), so a parsed-but-dropped option (`overhead --problems ipd` refused for a day, `ipd
--seed` ignored) fails here, in seconds."""

import pytest

from storch_bench.cli import main


def test_ipd_seed_reaches_training_and_the_variance_estimates(tmp_path, monkeypatch):
    """`storch-compare ipd --seed 3` trained with seed 0 (only --seeds, default "0", was read)."""
    import storch_bench.lola as lola

    trained, variance = [], []
    real_train = lola.train

    def train(label, implementation, iterations, batch, steps, seed=0, progress=False):
        trained.append((label, implementation, iterations, batch, steps, seed))
        return real_train(label, implementation, 1, 2, 2, seed=seed)

    def variance_table(batch, steps, reps, thetas, seed=0):
        variance.append((batch, steps, reps, seed))
        return []

    monkeypatch.setattr(lola, "train", train)
    monkeypatch.setattr(lola, "variance_table", variance_table)
    common = ["ipd", "--configs", "naive", "--iterations", "2", "--steps", "3", "--batch", "4", "--variance-reps", "5",
              "--no-progress", "--out", str(tmp_path)]
    assert main(common + ["--seed", "3"]) == 0
    assert trained == [("naive", "storch", 2, 4, 3, 3)] and variance == [(4, 3, 5, 3)]
    trained.clear()
    assert main(common + ["--seeds", "1,2", "--implementations", "torch"]) == 0
    assert trained == [("naive", "torch", 2, 4, 3, 1), ("naive", "torch", 2, 4, 3, 2)]
    assert "seeds 1,2" in (tmp_path / "ipd.md").read_text()


@pytest.mark.parametrize("argv", [["overhead", "--problems", "toy", "--configs", "score", "--batch-sizes", "1",
                                   "--n-samples", "1"], ["ops", "--cases", "exp"]])
def test_no_seed_where_the_measurement_seeds_itself(argv, tmp_path, capsys):
    """overhead and ops seed each measurement themselves (both sides draw the same samples): --seed was accepted
    and ignored (tiny sizes: the old code ran the measurement)."""
    with pytest.raises(SystemExit) as e:
        main(argv + ["--min-time", "0.001", "--no-progress", "--out", str(tmp_path), "--seed", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --seed 3" in capsys.readouterr().err


class Reached(Exception):
    """Raised by a recorder in place of a subcommand's runner: what the options configured."""


def _stop_at(monkeypatch, module, name, calls=None):
    """Replace ``module.name`` by a recorder that raises Reached (or, with ``calls``, records and goes on)."""

    def record(*args, **kwargs):
        if calls is None:
            raise Reached(args, kwargs)
        calls.append((args, kwargs))
        return [], []

    monkeypatch.setattr(module, name, record)


def _reach(argv):
    with pytest.raises(Reached) as e:
        main(argv)
    return e.value.args


def test_vae_options_reach_the_config(tmp_path, monkeypatch):
    import storch_bench.vae_cli as vae_cli

    calls = []
    _stop_at(monkeypatch, vae_cli, "run_vae", calls)
    main(["vae", "--estimators", "auto", "--samples", "7", "--seed", "4", "--models", "categorical", "--epochs", "3",
          "--batch-size", "9", "--lr", "0.01", "--variance-reps", "5", "--checkpoints", "2", "--max-train", "60",
          "--budget", "12", "--seeds", "2", "--no-progress", "--out", str(tmp_path)])
    cfgs = [args[0] for args, _ in calls]
    assert [(c.seed, c.budget) for c in cfgs] == [(4, None), (5, None), (4, 12), (5, 12)]  # --seeds from --seed
    for c in cfgs:
        assert (c.models, c.epochs, c.batch_size, c.lr, c.variance_reps, c.checkpoints, c.max_train) == (
            ("categorical",), 3, 9, 0.01, 5, 2, 60)
        assert {s.n_samples for s in c.specs if s.label.startswith(("unordered_set", "score[loo]"))} == {7}
    assert all(kw == {"progress": False} for _, kw in calls)
    calls.clear()
    main(["vae", "--full", "--epochs", "2", "--estimators", "score@1", "--out", str(tmp_path)])  # --full, overridden
    cfgs = [args[0] for args, _ in calls]
    assert [(c.seed, c.budget) for c in cfgs] == [(0, None), (1, None), (2, None), (0, 24), (1, 24), (2, 24)]
    assert {(c.epochs, c.checkpoints, c.variance_reps, c.eval_samples) for c in cfgs} == {(2, 5, 32, 4)}
    assert [kw for _, kw in calls][0] == {"progress": True}
    calls.clear()  # fewer training points than a batch: the report said "batch 50" and "a fixed batch of 100"
    main(["vae", "--max-train", "10", "--estimators", "score@1", "--out", str(tmp_path)])
    (cfg,), _ = calls[0]
    assert (cfg.max_train, cfg.batch_size, cfg.variance_batch) == (10, 10, 10)
    calls.clear()  # a batch above the training set (1797 digits less 360 for validation): it said "batch 5000"
    main(["vae", "--batch-size", "5000", "--estimators", "score@1", "--out", str(tmp_path)])
    (cfg,), _ = calls[0]
    assert (cfg.max_train, cfg.batch_size, cfg.variance_batch) == (None, 1437, 100)


def test_toy_options_reach_the_config(tmp_path, monkeypatch):
    import storch_bench.toy as toy

    _stop_at(monkeypatch, toy, "run_toy")
    (cfg,), kwargs = _reach(["toy", "--samples", "6", "--seed", "2", "--replicates", "700", "--timing-reps", "3",
                             "--no-progress", "--out", str(tmp_path)])
    assert (cfg.replicates, cfg.timing_reps, cfg.seed, kwargs) == (700, 3, 2, {"progress": False})
    assert {s.n_samples for s in cfg.specs if s.label.startswith(("unordered_set", "score[loo]"))} == {6}


def test_overhead_options_reach_the_runner(tmp_path, monkeypatch):
    import torch

    import storch_bench.overhead as overhead

    _stop_at(monkeypatch, overhead, "run_overhead")
    threads = torch.get_num_threads()
    try:
        args, _ = _reach(["overhead", "--problems", "vae,cnn", "--configs", "loo,moving_average", "--batch-sizes", "2,3",
                          "--n-samples", "4", "--threads", "2", "--min-time", "0.03", "--clock", "cpu", "--device",
                          "auto", "--compile", "--backend", "eager", "--replay", "--no-progress", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    expected_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert args == (["vae", "cnn"], ["loo", "moving_average"], [2, 3], [4], 2, 0.03, False, "cpu", expected_device,
                    True, "eager", True)
    args, _ = _reach(["overhead", "--out", str(tmp_path)])  # the defaults the help states
    assert args == (["toy", "vae"], ["score", "loo", "unordered_set", "gumbel_softmax", "sum_and_sample"], [1, 100],
                    [1, 8, 64], 1, 0.2, True, "wall", torch.device("cpu"), False, "inductor", False)


def test_ops_options_reach_the_runner(tmp_path, monkeypatch):
    import torch

    import storch_bench.ops as ops

    _stop_at(monkeypatch, ops, "run_ops")
    args, _ = _reach(["ops", "--cases", "exp, relu", "--device", "cpu", "--min-time", "0.02", "--threshold", "7.5",
                      "--out", str(tmp_path)])
    assert args == (["exp", "relu"], torch.device("cpu"), 0.02, 7.5)


def test_sequences_options_reach_the_config(tmp_path, monkeypatch):
    import storch_bench.sequences as sequences

    _stop_at(monkeypatch, sequences, "run_sequences")
    (cfg,), kwargs = _reach(["sequences", "--estimators", "unordered_set,score+loo", "--k", "3", "--steps", "7",
                             "--lr", "0.02", "--seed", "5", "--variance-reps", "4", "--no-progress", "--out", str(tmp_path)])
    assert (cfg.estimators, cfg.k, cfg.steps, cfg.lr, cfg.seed, cfg.seeds, cfg.variance_reps, kwargs) == (
        ("unordered_set", "score+loo"), 3, 7, 0.02, 5, (), 4, {"progress": False})
    (cfg,), _ = _reach(["sequences", "--seeds", "1,2", "--out", str(tmp_path)])
    assert cfg.seeds == (1, 2)


def test_model_options_reach_compare_estimators(tmp_path, monkeypatch):
    import storch_bench.model_cli as model_cli

    _stop_at(monkeypatch, model_cli, "compare_estimators")
    (step, specs), kwargs = _reach(["model", "examples/which_estimator/hard_attention.py:step", "--estimators",
                                    "score@1", "--samples", "3", "--seed", "2", "--estimates", "5", "--order", "2",
                                    "--warmup", "1", "--reference", "score@4", "--reference-estimates", "40",
                                    "--no-memory", "--no-progress", "--out", str(tmp_path)])
    assert step.__name__ == "step" and specs == "score@1"
    assert kwargs == {"estimates": 5, "order": 2, "warmup": 1, "reference": "score@4", "reference_estimates": 40,
                      "seed": 2, "samples": 3, "measure_memory": False, "progress": False}


def test_tasks_py_passes_its_arguments_on(monkeypatch, tmp_path):
    """README's quick start: `python3 tasks.py demo ARGS` = `tox -e demo -- ARGS` (storch-compare ARGS), docs ARGS to
    the docs environment, test ARGS to tox itself (tox is replaced by a recorder)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("storch_tasks_reach", Path(__file__).parents[2] / "tasks.py")
    tasks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tasks)
    calls = []
    monkeypatch.setattr(tasks, "ensure_tox", lambda: Path("py"))
    monkeypatch.setattr(tasks.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    monkeypatch.setattr(tasks, "ROOT", tmp_path)  # no .tox here: the test summary counts nothing
    assert tasks.main(["demo", "toy", "--replicates", "500"]) == 0
    assert tasks.main(["docs", "tests/docs", "-k", "comparison"]) == 0
    assert tasks.main(["test", "-e", "core"]) == 0
    assert calls == [["py", "-m", "tox", "-e", "demo", "--", "toy", "--replicates", "500"],
                     ["py", "-m", "tox", "-e", "docs", "--", "tests/docs", "-k", "comparison"],
                     ["py", "-m", "tox", "-p", "auto", "--parallel-live", "-e", "core"]]


def test_overhead_refuses_the_cpu_clock_on_cuda(tmp_path, monkeypatch, capsys):
    """--clock cpu with --device cuda timed the host thread only (the kernels run asynchronously): a wrong number
    without a word. (The device is faked: the check runs before any measurement.)"""
    import torch

    import storch_bench.overhead as overhead

    _stop_at(monkeypatch, overhead, "run_overhead")
    monkeypatch.setattr(overhead, "select_device", lambda name: torch.device("cuda"))
    assert main(["overhead", "--device", "auto", "--clock", "cpu", "--out", str(tmp_path)]) == 2
    assert "--clock cpu with --device auto (cuda): thread CPU time does not count the GPU's kernels" in \
        capsys.readouterr().err
    args, _ = _reach(["overhead", "--device", "auto", "--clock", "wall", "--out", str(tmp_path)])
    assert args[7:9] == ("wall", torch.device("cuda"))
