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


def test_rnn_sum_and_sample_row_has_vs_loo(tmp_path):
    # sum_and_sample over the GRU decoder's tokens: MAPO's buffer (buffer=1, memory_key at the first
    # token), n - 1 samples + the buffered sequence; its row is compared with score + leave-one-out
    out = tmp_path / "ovh"
    assert main(["overhead", "--problems", "rnn", "--configs", "sum_and_sample", "--batch-sizes", "2",
                 "--n-samples", "3", "--min-time", "0.002", "--clock", "cpu", "--no-progress", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "overhead.csv")))
    assert [(r["problem"], r["estimator"]) for r in rows] == [("rnn", "sum_and_sample")]
    row = rows[0]
    assert "not run on partitions" not in row["note"], row
    assert float(row["storch us"]) > 0 and float(row["vs loo"]) > 0, row


def test_rnn_sum_and_sample_estimator_keeps_one_sequence_per_image():
    # n cost evaluations per image as score@n: one buffered sequence summed, n - 1 sampled
    import torch

    import storch
    from storch_bench import gru_decoder
    from storch_bench.overhead import PARTITION_OPTIONS, memory_key

    est = storch.estimator("sum_and_sample", plate="z", n_samples=2, n_enumerate=1, baseline="leave_one_out",
                           **PARTITION_OPTIONS["sum_and_sample"])
    ids = memory_key(est, 4)
    assert ids.tolist() == [0, 1, 2, 3]
    model, x = gru_decoder.GRUDecoder(), torch.rand(4, 64).round()
    sizes = []
    for _ in range(2):  # the first step fills the buffer
        with storch.Graph():
            tokens = gru_decoder.storch_surrogate(model, est, x, ids)
            sizes.append(tokens[-1].plates[0].size)
            storch.backward()
    assert sizes == [2, 3]
    assert sorted(est._buffer.entries) == [0, 1, 2, 3]
    assert all(len(book) == 1 for book in est._buffer.entries.values())
