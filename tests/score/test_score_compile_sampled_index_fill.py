"""storch.compile of index_fill (and index_reduce) with a sampled index: the range check is part of the program.

Found porting indexing forms with a sampled index that is not the first one: ``x.index_fill(2, k, v)`` ran
eagerly, but its handler checked the index's range with a Python read of the sampled values, which the trace
refuses ("It appears that you're trying to get value out of a tracing tensor"), so the step did not compile.
The check is now recorded in the program (``torch._assert_async``): every call checks its own draw, and an index
out of range raises a StorchError in per-sample terms (dimension 1 of the sample, not the raw tensor's dim 2).
"""

import pytest
import torch
from torch.distributions import Categorical

import storch

X = torch.arange(24.0).reshape(4, 6)
LOW = torch.tensor([30.0, -30.0, -30.0, -30.0, -30.0])  # draws 0
MID = torch.tensor([-30.0, -30.0, -30.0, 30.0, -30.0])  # draws 3
HIGH = torch.tensor([-30.0, -30.0, -30.0, -30.0, 30.0])  # draws 4: out of range for dims of size 4


def _step(est, op):
    def step(logits):
        with storch.Graph():
            k = est(Categorical(logits=logits))
            storch.add_cost((op(k) * torch.arange(1.0, 5.0)).sum(), name="c")
            return storch.surrogate_loss()

    return step


@pytest.mark.parametrize("op, dim", [
    (lambda k: X.t().index_fill(1, k, -1.0), 1),
    (lambda k: X.t().index_reduce(1, k.reshape(1), torch.full((6, 1), 2.0), "prod"), 1),
], ids=["index_fill", "index_reduce"])
def test_a_sampled_index_traces_replays_every_draw_and_checks_its_range(op, dim):
    est = storch.estimator("score", plate="k", n_samples=2)
    step = _step(est, op)
    compiled = storch.compile(step, backend=None)
    for logits in (LOW, MID, LOW):
        torch.manual_seed(0)
        got = compiled(logits)
        torch.manual_seed(0)
        torch.testing.assert_close(got, step(logits).detach(), rtol=0, atol=0)
    with pytest.raises(storch.StorchError, match=rf"index \(sampled\) is out of (bounds|range) for dimension {dim}"):
        compiled(HIGH)
    with pytest.raises(IndexError, match=rf"index 4 is out of (bounds|range) for dimension {dim}"):
        step(HIGH)  # eagerly, the same check with the value
