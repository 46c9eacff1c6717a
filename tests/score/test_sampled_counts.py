"""Counting sampled indices (torch.bincount of a score sample, found by porting): the counts are torch's
per sample, so the score gradient of a cost written with them is unbiased (tests/core checks the values)."""

import pytest
import torch
from torch.distributions import Categorical

import storch
from score_problems import Maker, derivative_estimates, exact_derivatives

THETA = torch.tensor([0.3, -0.5, 0.1, 1.0, 0.0, -0.7], dtype=torch.float64)  # two rows of K = 3 logits
C = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # the cost of each category


def _model(th, make):
    i = make("z", Categorical(logits=th.view(2, 3)))  # (2,) indices per sample
    storch.add_cost((torch.bincount(i, minlength=3).to(C.dtype) * C).sum())


def _exact(th):
    return (th.view(2, 3).softmax(-1) * C).sum()


def test_a_cost_of_bincount_counts_has_an_unbiased_score_gradient():
    torch.manual_seed(0)
    g = derivative_estimates(_model, THETA, Maker("score", n_samples=4), 1, replicates=3000)[0]
    exact = exact_derivatives(_exact, THETA, 1)[0]
    z = (g.mean(0) - exact) / (g.std(0) / g.shape[0] ** 0.5)
    print("z:", [round(float(v), 2) for v in z])
    assert z.abs().max() < 4, (g.mean(0), exact, z)


def test_bincount_without_minlength_is_refused_when_the_lengths_differ():
    torch.manual_seed(0)
    with storch.Graph():
        i = storch.estimator("score", plate="z", n_samples=4)(Categorical(logits=torch.zeros(2, 3)))
        assert i.tensor.amax(-1).unique().numel() > 1  # (seed 0: the samples' largest values differ)
        with pytest.raises(storch.PlateError, match=r"depends on the drawn values.*minlength="):
            torch.bincount(i)
