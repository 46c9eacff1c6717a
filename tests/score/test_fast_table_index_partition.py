"""The fast path for a plain table indexed by sampled indices (storch.plates.rules.indexing._table_lookup; the
rest of its tests are tests/core/test_fast_table_index.py) at two steps of one partition: here because a core
estimator has no partitions."""
import torch
from torch.distributions import Categorical

import storch
from storch.plates.rules import indexing

from path_probes import calls

S = 3


def test_a_chain_of_steps_indexes_the_previous_step_as_the_general_path_does():
    """z_prev and z of one estimator's partition at two steps (the HMM's ``W[z_prev]``, ``logA[z_prev, z]``): the
    earlier step's sample is re-indexed to the later step (its plates), as the general path aligns it."""
    A = torch.randn(S, S, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
    torch.manual_seed(0)
    est = storch.estimator("score", plate="z", n_samples=3)
    with storch.Graph():
        z_prev = est(Categorical(logits=A[0]))
        z = est(Categorical(logits=A[z_prev]))
        assert z.plates != z_prev.plates  # the same plate at a later step
        out, seen = calls(lambda: A[z_prev, z])
        general, _ = indexing._general_read(A, (z_prev, z))
        assert "_table_lookup" in seen and "_general" not in seen
        assert out.plates == general.plates == z.plates and torch.equal(out.tensor, general.tensor)
