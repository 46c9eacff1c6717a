"""torch.cdist on plate tensors folds the plates into its batch dim (it was vmapped, which
storch.compile could not trace: "Either your tensor may have escaped from inside a function being
vmapped"; found by porting a TSP policy). Values against a loop over the plate entries."""

from __future__ import annotations

import torch

import storch


def test_cdist_on_plate_tensors_matches_a_loop_over_entries():
    torch.manual_seed(0)
    xy = torch.rand(3, 4, 2, requires_grad=True)
    other = torch.rand(5, 2)
    with storch.Graph():
        x = storch.denote_independent(xy, 0, "inst")
        assert storch.treatment_of(torch.cdist).treatment.value == "batch-first"
        d_self, d_other = torch.cdist(x, x), torch.cdist(x, other)
        assert d_self.shape == (4, 4) and d_other.shape == (4, 5)
        for i in range(3):
            assert torch.allclose(d_self.tensor[i], torch.cdist(xy[i], xy[i]))
            assert torch.allclose(d_other.tensor[i], torch.cdist(xy[i], other))
        (g,) = torch.autograd.grad(d_other.tensor.sum(), xy)
        assert torch.isfinite(g).all()
