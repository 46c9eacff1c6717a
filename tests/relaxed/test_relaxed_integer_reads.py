"""An index read from a gumbel_softmax sample (pathwise: the relaxed cost is differentiated through the relaxed
point of the simplex) and used by a cost is refused at every order (storch.plates.integer_reads, found by porting
with reparameterization: the gradient missed the jump's term), also where the cost reaches the sample smoothly as
well; a straight-through estimator's hard sample is meant to be read as indices and stays accepted."""

import pytest
import torch
from torch.distributions import OneHotCategorical

import storch

EMB = torch.tensor([1.0, -0.5, 2.0, 0.3])
W = torch.tensor([0.2, -0.1, 0.4, 0.0])

READS = {
    "argmax index": lambda z: EMB[z.argmax(-1)],
    "max(-1).indices": lambda z: EMB[z.max(-1).indices],
    "topk indices": lambda z: EMB[torch.topk(z, 1).indices].sum(),
}


def _surrogate(name: str, read, order: int):
    logits = torch.zeros(4, requires_grad=True)
    est = storch.estimator(name, plate="z", n_samples=3, temperature=0.5)
    with storch.Graph():
        z = est(OneHotCategorical(logits=logits))
        storch.add_cost(read(z) + (z * W).sum(-1), name="c")
        return storch.surrogate_loss(order=order)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("case", sorted(READS))
def test_gumbel_softmax_index_reads_are_refused(case, order):
    torch.manual_seed(0)
    with pytest.raises(storch.OrderError, match=r"estimator 'gumbel_softmax' on plate 'z': the cost 'c' is computed "
                                                r"from an integer value"):
        _surrogate("gumbel_softmax", READS[case], order)


@pytest.mark.parametrize("case", sorted(READS))
def test_a_straight_through_sample_read_as_indices_is_accepted(case):
    torch.manual_seed(0)
    loss = _surrogate("gumbel_straight_through", READS[case], 1)
    assert loss.requires_grad
