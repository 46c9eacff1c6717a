"""storch.estimate(z) for the score package's estimators: E_q[one_hot(z)] (a VQ-VAE's EMA codebook counts).

Their plates hold entries that are not plain samples of p (unordered_set's weighted set and weight-0 padding,
sum_and_sample's enumerated memory and rejected samples, score's greedy entry), so ``z.tensor.mean(0)`` is
biased (found by porting a VQ-VAE: [.333, .325, .250, .092] for p = [.774, .173, .039, .014] with unordered_set
n=3). storch.estimate weighs them as the surrogate does: exact where the estimator is (unordered_set with
n >= K), unbiased elsewhere (z-tests over independent estimates against the enumerated p).
"""

import pytest
import torch
from torch.distributions import OneHotCategorical

import storch

torch.set_default_dtype(torch.float64)
# the tester's p (exact test); the z-tests use a flatter p: with this one the sets without the first value are
# rare (~5e-4), so R estimates would hold few of the rare large deviations and their standard error would be
# underestimated (a z-test needs the variance to be seen)
LOGITS = torch.tensor([2.0, 0.5, -1.0, -2.0])
FLAT = torch.tensor([1.0, 0.5, 0.0, -0.5])
R = 1000


def _estimates(name, options, seed, logits=LOGITS):
    torch.manual_seed(seed)
    est = storch.estimator(name, plate="z", **options)
    weighted, naive = [], []
    for _ in range(R):
        with storch.Graph():
            z = est(OneHotCategorical(logits=logits))
            e = storch.estimate(z)
            assert type(e) is torch.Tensor and e.shape == (4,)
            weighted.append(e)
            naive.append(z.tensor.mean(0))
    return torch.stack(weighted), torch.stack(naive)


def _z(samples, p):
    """z-scores of the mean of ``samples`` against ``p``; a value with no variance (sum_and_sample's enumerated
    memory) must be exact: its z-score is its error in units of 1e-12."""
    sd = samples.std(0)
    err = samples.mean(0) - p
    return torch.where(sd > 1e-12, err / (sd / R ** 0.5), err / 1e-12)


@pytest.mark.parametrize("n", [4, 6])
def test_unordered_set_with_the_whole_support_is_exact(n):
    # n > K: the set is the support plus weight-0 padding, which the plain mean counts
    weighted, naive = _estimates("unordered_set", dict(n_samples=n), 0)
    p = LOGITS.softmax(-1)
    torch.testing.assert_close(weighted, p.expand(R, 4), rtol=1e-12, atol=1e-12)
    if n > 4:
        assert (naive - p).abs().max() > 0.1


@pytest.mark.parametrize("name, options, seed, naive_biased", [
    ("unordered_set", dict(n_samples=3), 1, True),
    ("sum_and_sample", dict(n_samples=2), 2, True),
    ("score", dict(n_samples=3, baseline="greedy"), 3, True),
    ("score", dict(n_samples=3, baseline="leave_one_out"), 4, False),
])
def test_one_hot_expectation_is_unbiased(name, options, seed, naive_biased):
    weighted, naive = _estimates(name, options, seed, FLAT)
    p = FLAT.softmax(-1)
    z = _z(weighted, p)
    assert z.abs().max() < 4, (name, options, weighted.mean(0), p, z)
    if naive_biased:  # the test can fail: the plain mean of the plate is far off
        assert _z(naive, p).abs().max() > 8, _z(naive, p)
    else:  # uniform weights: the plain mean is the estimate
        torch.testing.assert_close(weighted, naive, rtol=0, atol=1e-15)


def test_an_ema_buffer_under_storch_compile_is_the_eager_one():
    # the in-place EMA update of a buffer the step captures, with a data plate: replayed by storch.compile
    # exactly as eagerly (a new batch each step)
    logits = torch.nn.Parameter(torch.tensor([1.0, 0.5, 0.0, -0.5]))
    est = storch.estimator("unordered_set", plate="z", n_samples=3)
    counts = torch.zeros(4)

    def step(data):
        with storch.Graph():
            x = storch.denote_independent(data, 0, "data")
            z = est(OneHotCategorical(logits=logits + x))
            with torch.no_grad():
                counts.mul_(0.9).add_(0.1 * storch.estimate(z))
            storch.add_cost((z * torch.arange(4.0)).sum(), name="c")
            return storch.surrogate_loss()

    out = []
    for f in (step, storch.compile(step, backend=None)):
        counts.zero_()
        torch.manual_seed(0)
        for _ in range(4):
            f(0.1 * torch.randn(2, 4))
        out.append(counts.clone())
    assert out[0].sum() > 0.3
    torch.testing.assert_close(out[1], out[0], rtol=1e-12, atol=1e-12)
