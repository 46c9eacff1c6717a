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
        pad = storch.padding(z)
        names = [p.name for p in pad.plates]
        z = (z + 0 * pad.float()).tensor.permute(names.index("data"), names.index("z"))
        pad = pad.tensor.permute(names.index("data"), names.index("z"))
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
