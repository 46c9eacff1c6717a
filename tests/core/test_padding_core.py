"""storch.padding with the core's estimators alone: ``expect`` fills an impossible value's entry with the most
probable value (padding), ``reparameterization`` never pads, and what is not a sample is refused."""

import math

import pytest
import torch
from torch.distributions import Categorical, Normal

import storch

LOGITS = torch.tensor([[0.3, -0.2, -math.inf], [0.1, 0.5, -0.4]], dtype=torch.float64)


def test_expect_pads_the_entries_of_impossible_values():
    with storch.Graph():
        x = storch.denote_independent(LOGITS, 0, "data")
        z = storch.estimator("expect", plate="z")(Categorical(logits=x))
        (z, pad), _ = storch.aligned(z, storch.padding(z), plates=("data", "z"))
    repeats = (z.unsqueeze(-1) == z.unsqueeze(-2)).tril(-1).any(-1)  # by hand: a repeat of an earlier entry
    assert torch.equal(pad, repeats) and pad.tolist() == [[False, False, True], [False, False, False]]


def test_reparameterization_does_not_pad_and_a_computed_tensor_is_refused():
    with storch.Graph():
        x = storch.denote_independent(torch.zeros(2), 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(x, 1.0))
        pad = storch.padding(z)
        assert [p.name for p in pad.plates] == ["z", "data"] and not pad.tensor.any()
        for bad in (z * 2, z.tensor, x):
            with pytest.raises(storch.PlateError, match="storch.padding takes a sample"):
                storch.padding(bad)


class _Padded(storch.get_estimator_class("expect")):
    """A third party's estimator whose padding() returns ``self.mask`` (any shape)."""

    mask = None

    def padding(self, node):
        return self.mask


def test_a_leading_dims_mask_is_read_along_the_plate_and_a_wrong_shape_is_refused():
    # plates (z=3, data=3): an (N,) mask is one value per entry of z, not (torch's trailing broadcast) per data point
    est = _Padded(plate="z")
    with storch.Graph():
        x = storch.denote_independent(torch.zeros(3, 3, dtype=torch.float64), 0, "data")
        z = est(Categorical(logits=x))
        est.mask = torch.tensor([False, True, False])
        pad = storch.padding(z)
        names = [p.name for p in pad.plates]
        assert pad.tensor.permute(names.index("z"), names.index("data")).tolist() == [[False] * 3, [True] * 3,
                                                                                      [False] * 3]
        for bad in (torch.zeros(3, 3, 2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)):
            est.mask = bad
            with pytest.raises(storch.PlateError, match=r"padding\(\) must return a bool tensor of shape"):
                storch.padding(z)
        for bad, got in ((torch.zeros(3, dtype=torch.uint8), "dtype torch.uint8"), ([False, True, False], "a list")):
            est.mask = bad
            with pytest.raises(storch.PlateError, match=rf"padding\(\) must return a bool tensor .* got {got}"):
                storch.padding(z)


def test_a_sample_of_an_ended_graph_is_refused_as_stale():
    g = storch.Graph()
    with g:
        x = storch.denote_independent(torch.zeros(2, 3, requires_grad=True), 0, "data")
        z = storch.estimator("expect", plate="z")(Categorical(logits=x))
        storch.add_cost(z.float(), name="c")
        storch.backward()
        with pytest.raises(storch.PlateError, match="stale tensor"):
            storch.padding(z, g)
