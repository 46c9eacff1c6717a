"""storch-compare overhead, problems cnn and rnn: a smoke run through the CLI (tiny sizes)."""

import csv

from storch_bench.cli import main


def test_cnn_and_rnn_rows_through_the_cli(tmp_path):
    out = tmp_path / "ovh"
    assert main(["overhead", "--problems", "cnn,rnn", "--configs", "loo", "--batch-sizes", "2",
                 "--n-samples", "2", "--min-time", "0.002", "--clock", "cpu", "--no-progress", "--out", str(out)]) == 0
    rows = {(r["problem"], r["estimator"]): r for r in csv.DictReader(open(out / "overhead.csv"))}
    assert set(rows) == {("cnn", "loo"), ("rnn", "loo")}
    for key in [("cnn", "loo"), ("rnn", "loo")]:
        assert rows[key]["same grad"] == "yes", rows[key]
        assert float(rows[key]["time ratio"]) > 0 and float(rows[key]["storch MB"]) > 0
    assert "thread CPU time" in (out / "overhead.md").read_text()
