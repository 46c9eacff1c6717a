"""The ``sbn`` row of ``storch-compare overhead``: a two-layer sigmoid belief network (two nodes, the second in the
first's plate) through storch and written by hand. With one seed both sides draw the same samples, so their
gradients agree; over several steps for the moving average, whose state (one average per node) both sides update."""

import pytest
import torch

import storch
from model_checks import assert_same_grads

CONFIGS = {"score": {}, "loo": {"baseline": "leave_one_out"}, "moving_average": {"baseline": "moving_average"}}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("n", [1, 3])
def test_benchmark_pair_same_gradient(config, n):
    from storch_bench.overhead import PROBLEMS

    if config == "loo" and n == 1:
        pytest.skip("leave-one-out needs n >= 2")
    est = storch.estimator("score", plate="z", n_samples=n, **CONFIGS[config])
    with_storch, by_hand, sync = PROBLEMS["sbn"](config, est, 5, n)
    for step in range(3):  # the moving average's first step sets it, the later ones read it
        sync()
        torch.manual_seed(5 + step)
        g_storch = with_storch().clone()
        torch.manual_seed(5 + step)
        g_hand = by_hand().clone()
        assert g_storch.abs().sum() > 0
        assert_same_grads([g_storch], [g_hand])


def test_benchmark_pair_has_no_hand_written_unordered_set():
    from storch_bench.overhead import PROBLEMS

    est = storch.estimator("score", plate="z", n_samples=2)
    _, by_hand, _ = PROBLEMS["sbn"]("unordered_set", est, 2, 2)
    with pytest.raises(NotImplementedError, match="no hand-written version"):
        by_hand()
