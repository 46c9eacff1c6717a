"""Plate tensors of a relaxed node pickle (and torch.save) as a score node's do: the lineage's watch, a closure of the
step's node (gumbel_softmax's comparisons and index reads, relax's thresholds), is dropped from the pickled state; an
unpickled tensor mixed into a new step is refused; ``copy.deepcopy`` keeps the watch, as it did."""

import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from step_checks import pickle_round_trips


@pytest.mark.parametrize("name", ["gumbel_softmax", "relax"])
def test_plate_tensors_pickle(name):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", n_samples=2)

    def dist_of(logits):
        return OneHotCategorical(logits=logits) if name == "gumbel_softmax" else Bernoulli(logits=logits)

    pickle_round_trips(est, dist_of)
