"""sum_and_sample in the VAE comparison: beyond its enumeration budget it runs (beam memory)."""

import math

import pytest
import torch

from storch_bench import VAEConfig, parse_specs, run_vae


def test_auto_roster_has_sum_and_sample_at_an_equal_number_of_cost_evaluations():
    specs = parse_specs("auto", n_multi=5)
    labels = {s.label for s in specs}
    assert {"sum_and_sample@1", "sum_and_sample[n_enumerate=1,loo]@4", "unordered_set@5"} <= labels


@pytest.fixture
def float32():
    # the VAE is float32; test modules of other folders may have switched the default dtype
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def test_sum_and_sample_trains_both_vaes(float32):
    specs = parse_specs("sum_and_sample[n_enumerate=1,baseline=leave_one_out]@2")
    cfg = VAEConfig(specs, models=("bernoulli", "categorical"), epochs=1, max_train=100, variance_reps=2,
                    checkpoints=2, measure_memory=False)
    results, skipped = run_vae(cfg, progress=False)
    assert not skipped and len(results) == 2
    for r in results:
        assert not r.note, r.note
        assert all(math.isfinite(v) and v > 0 for v in r.valid_curve)
        assert all(math.isfinite(v) for v in r.variances)
