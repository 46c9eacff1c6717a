"""`storch-compare model`'s bias z-test treats a difference below floating-point precision as zero
(issue 20): unordered_set with k >= the support is exact, and in float32 its estimates differ from
the enumerated reference only by rounding in another order; it must not be flagged as biased."""

import torch
from torch.distributions import OneHotCategorical

import storch
from storch_bench import compare_estimators
from storch_bench.model_compare import bias_z


def test_exact_unordered_set_on_six_categories_in_float32_is_not_flagged():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float32)
    costs = torch.rand(5, 6, generator=gen, dtype=torch.float32) * 3.0
    weight = torch.nn.Parameter(torch.randn(3, 6, generator=gen, dtype=torch.float32))  # float32, as a user's model

    def step(est):
        row = storch.denote_independent(torch.cat([x, costs], 1), 0, "data")
        z = est(OneHotCategorical(logits=row[:3] @ weight))
        storch.add_cost((z * row[3:]).sum(), name="c")
        return [weight]

    torch.manual_seed(0)
    c = compare_estimators(step, ["unordered_set@8", "score@1"], estimates=64, warmup=0,
                           keep_estimates=True, measure_memory=False, progress=False)
    exact = c.row("unordered_set@8")
    assert exact.variance < 1e-9  # exact up to rounding
    assert exact.bias_z == 0.0, exact
    assert c.row("score@1").bias_z < 4


def test_a_bias_above_rounding_is_still_measured():
    torch.manual_seed(1)
    ref = torch.randn(1, 8, dtype=torch.float32)
    noise = 1e-3 * torch.randn(64, 8, dtype=torch.float32)
    assert bias_z(ref + noise, ref) < 6  # unbiased noise
    assert bias_z(ref + noise + 2e-3, ref) > 6  # a bias of twice the noise's standard deviation
    assert bias_z(ref + 1e-7 * torch.randn(64, 8, dtype=torch.float32), ref) == 0.0  # float32 rounding: no bias
    # the same float32 values cast to float64 (as compare_estimators does): eps= says their precision
    est64 = (ref + 1e-7 * torch.randn(64, 8, dtype=torch.float32)).double()
    assert bias_z(est64, ref.double(), eps=torch.finfo(torch.float32).eps) == 0.0
    assert bias_z(est64, ref.double()) != 0.0  # as float64 values: z-tested, not floored
