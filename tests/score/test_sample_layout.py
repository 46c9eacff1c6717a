"""Samples come out of the sampling-without-replacement estimators laid out as a plain batch.

A sample's raw tensor has the plate dims first (``(k, data, ...)``). The samplers build index
tensors in other layouts (Gumbel-top-k over ``(data, values)``, a beam's ``(rows, k, n)``) and an
indexed or converted result keeps its index's strides, so the sample used to be a transposed
view: correct values, but every layer of the user's model then read (and differentiated) a
strided batch. Measured in isolation (the VAE benchmark's decoder, reconstruction loss and
backward on 8 x 100 samples of 20 Bernoullis, thread CPU time): 975 us on the transposed sample,
952 us on the same values laid out contiguously, ~2%; the end-to-end ``storch-compare overhead``
rows moved within their noise (a first reading of 1.81x -> 1.62x vs leave-one-out did not
reproduce in same-period runs). These tests check the layout on every path, not a time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, OneHotCategorical

import storch

DISTRIBUTIONS = {
    # 3 Bernoullis: 8 joint values, enumerated (Gumbel-top-k over the list)
    "enumerated": lambda l: Bernoulli(logits=l[..., :3]),
    "enumerated-categorical": lambda l: Categorical(logits=l[..., :6]),
    # 20 Bernoullis: first distinct of i.i.d. draws
    "iid-bernoulli": lambda l: Bernoulli(logits=l),
    "iid-onehot": lambda l: OneHotCategorical(logits=l.view(*l.shape[:-1], 10, 2)),
    # an impossible value: stochastic beam search
    "beam": lambda l: Bernoulli(logits=torch.cat([l[..., :19], torch.full_like(l[..., :1], math.inf)], -1)),
}


def _data(batch: int = 5) -> torch.Tensor:
    return torch.randn(batch, 20, requires_grad=True)


@pytest.mark.parametrize("path", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("name", ["unordered_set", "sum_and_sample"])
def test_sample_is_contiguous_in_plate_order(name, path):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", n_samples=4)
    with storch.Graph():
        x = storch.denote_independent(_data(), 0, "data")
        z = est(DISTRIBUTIONS[path](x * 1.0))
        assert z.plate_names == ("z", "data")
        assert z.tensor.is_contiguous(), (path, tuple(z.tensor.shape), z.tensor.stride())


def test_partition_steps_are_contiguous():
    """Each step of a partition (stochastic beam search over sequences) returns a plain batch."""
    torch.manual_seed(1)
    est = storch.estimator("unordered_set", plate="seq", n_samples=4)
    with storch.Graph():
        x = storch.denote_independent(_data(3), 0, "data")
        h = x[..., :4]
        for _ in range(3):
            y = est(Categorical(logits=h))
            assert y.tensor.is_contiguous(), (tuple(y.tensor.shape), y.tensor.stride())
            h = h + y.unsqueeze(-1).float()



@pytest.mark.parametrize("name", ["score", "importance"])
def test_iid_categorical_draws_are_contiguous(name):
    """torch's ``Categorical.sample((n,))`` is a transposed view of its ``multinomial`` draw (strides ``(1, n)`` for
    ``(n, data)``): the estimators that draw i.i.d. through ``storch.distributions.raw_sample`` (score, importance
    with its own proposal, a partition's later steps) hand out a plain batch. A sampled index in the transposed layout
    broke ``storch.compile(..., backend="aot_eager")`` of ``A[s] @ h`` (torch's meta for ``aten.index`` ignores the
    index's strides: tests/models/test_switching_state_space.py)."""
    torch.manual_seed(2)
    kw = {"proposal": lambda p: Categorical(logits=torch.zeros(p.logits.shape))} if name == "importance" else {}
    est = storch.estimator(name, plate="z", n_samples=4, **kw)
    with storch.Graph():
        x = storch.denote_independent(_data(3), 0, "data")
        s = est(Categorical(logits=x[..., :2]))
        assert s.plate_names == ("z", "data")
        assert s.tensor.is_contiguous(), (tuple(s.tensor.shape), s.tensor.stride())
        if name == "score":  # later steps of a partition (drawn by Estimator.draw)
            for _ in range(2):
                s = est(Categorical(logits=x[..., :2] + s.unsqueeze(-1).float()))
                assert s.tensor.is_contiguous(), (tuple(s.tensor.shape), s.tensor.stride())
