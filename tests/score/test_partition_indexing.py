"""Indexing with sampled indices on the steps of a partition (issue 20): needs a partition
estimator, so it lives with the score family (tests/core runs with storch-core alone)."""

import torch

import storch


def test_index_on_partition_steps_follows_the_prefixes():
    """A tensor of an earlier step of a beam-search partition, indexed by a later step's token,
    is re-indexed by the parents first (as any operation)."""
    from torch.distributions import Categorical

    torch.manual_seed(3)
    est = storch.estimator("unordered_set", plate="seq", n_samples=4)
    table = torch.randn(3, 3, dtype=torch.float64)
    with storch.Graph():
        x0 = est(Categorical(logits=torch.zeros(3, dtype=torch.float64)))
        row = table[x0]  # step 0, (3,) per sample
        x1 = est(Categorical(logits=row))
        picked = row[x1]  # row follows x1's prefixes
        direct = table[x0, x1]  # the same with both indices at once
        assert torch.equal(picked.tensor, direct.tensor)
        assert torch.equal(direct.tensor, table[x0.tensor.gather(0, x0.plates[0].lineage.index(0, 1))
                                                 if x0.plates[0].lineage.index(0, 1) is not None else x0.tensor,
                                                 x1.tensor])
