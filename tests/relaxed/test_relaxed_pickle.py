"""Plate tensors of a relaxed node pickle (and torch.save) as a score node's do: the lineage's watch, a closure of the
step's node (gumbel_softmax's comparisons and index reads, relax's thresholds), is dropped from the pickled state; an
unpickled tensor mixed into a new step is refused; ``copy.deepcopy`` keeps the watch, as it did."""

import copy
import io
import pickle

import pytest
import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch


@pytest.mark.parametrize("name", ["gumbel_softmax", "relax"])
def test_plate_tensors_pickle(name):
    torch.manual_seed(0)
    est = storch.estimator(name, plate="z", n_samples=2)
    x = torch.randn(5, 3)
    lin = torch.nn.Linear(3, 3)

    def dist_of(xs):
        logits = lin(xs)
        return OneHotCategorical(logits=logits) if name == "gumbel_softmax" else Bernoulli(logits=logits)

    with storch.Graph():
        xs = storch.denote_independent(x, 0, "data")
        z = est(dist_of(xs))
        cost = ((z - 0.3) ** 2).sum()
        assert z.plates[0].lineage.watch is not None  # the closure that did not pickle
        saved = []
        for obj in (z, z.detach(), cost):
            back = pickle.loads(pickle.dumps(obj))
            buffer = io.BytesIO()
            torch.save(obj, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
            for copy_ in (back, loaded):
                assert isinstance(copy_, storch.PlateTensor)
                assert [p.name for p in copy_.plates] == [p.name for p in obj.plates]
                assert torch.equal(copy_.tensor, obj.tensor.detach())
                assert copy_.plates[0].lineage.watch is None
            saved.append(back)
        kept = copy.deepcopy(z.detach())
        assert kept.plates[0].lineage.watch is z.plates[0].lineage.watch
        storch.add_cost(cost, name="c")
        storch.backward()
    with storch.Graph():
        xs = storch.denote_independent(x, 0, "data")
        z = est(dist_of(xs))
        with pytest.raises(storch.PlateError, match="comes from two different graphs"):
            storch.add_cost((z * saved[0]).sum(), name="mixed")
