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
