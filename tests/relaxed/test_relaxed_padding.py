"""storch.padding for the relaxed family: none of its estimators fills a plate entry in at weight 0 (every entry is
a draw of its own), so the mask is False everywhere, on the node's plates (tests/score/test_padding.py has the
estimators that pad)."""

import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch

LOGITS = torch.tensor([[0.0, 1.0, -2.0], [0.5, -0.5, 0.0]])


@pytest.mark.parametrize("name", ["gumbel_softmax", "gumbel_straight_through", "straight_through", "arm", "disarm",
                                  "rebar", "relax", "go"])
def test_relaxed_estimators_do_not_pad(name):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", n_samples=4)
    one_hot = name in ("gumbel_softmax", "gumbel_straight_through", "straight_through")
    with storch.Graph():
        x = storch.denote_independent(LOGITS, 0, "data")
        z = est(OneHotCategorical(logits=x) if one_hot else Bernoulli(logits=x))
        pad = storch.padding(z)
    assert pad.dtype == torch.bool and not pad.tensor.any()
    assert [p.name for p in pad.plates] == ["z", "data"]
    assert pad.shape == ()  # one flag per plate entry: the node's joint value
