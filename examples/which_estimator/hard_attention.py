"""Which estimator for my model? A hard-attention layer, compared with ``storch-compare model``.

Each of 32 data points holds a memory of 10 slots (8 features each), a query and a target.
The layer scores the slots against the query and picks ONE slot with a categorical (hard
attention: z ~ OneHotCategorical(softmax(scores))), reads it, and predicts the target from
what it read; the cost is the squared error. The target is the slot that best matches the
query, so a good layer learns to attend there.

    storch-compare model examples/which_estimator/hard_attention.py:step
    storch-compare model examples/which_estimator/hard_attention.py:step --estimators "score@1,unordered_set@8"

``step(est)`` builds one graph for the fixed batch with the estimator it is given and returns
the module whose gradient is compared; storch calls it once per estimate, per estimator.
"""

import torch
from torch.distributions import OneHotCategorical

import storch

BATCH, SLOTS, DIM = 32, 10, 8

_gen = torch.Generator().manual_seed(0)
memory = torch.randn(BATCH, SLOTS, DIM, generator=_gen)
query = torch.randn(BATCH, DIM, generator=_gen)
target = memory[torch.arange(BATCH), torch.einsum("bsd,bd->bs", memory, query).argmax(-1)]
# one data plate holds inputs and targets: one row per data point
data = torch.cat([memory.flatten(1), query, target], dim=1)


class HardAttention(torch.nn.Module):
    """Scores slots against a query, reads ONE sampled slot, predicts the target from it."""

    def __init__(self) -> None:
        super().__init__()
        self.key = torch.nn.Linear(DIM, DIM)
        self.query = torch.nn.Linear(DIM, DIM)
        self.out = torch.nn.Linear(DIM, DIM)

    def forward(self, est, row: torch.Tensor) -> torch.Tensor:
        """The cost of one data point (code written for one sample)."""
        mem = row[: SLOTS * DIM].view(SLOTS, DIM)
        q, t = row[SLOTS * DIM: SLOTS * DIM + DIM], row[SLOTS * DIM + DIM:]
        scores = self.key(mem) @ self.query(q)  # (SLOTS,)
        z = est(OneHotCategorical(logits=scores))  # hard attention: a one-hot choice of a slot
        read = z @ mem  # the chosen slot (a relaxed mixture for Gumbel-softmax)
        return ((self.out(read) - t) ** 2).sum()


torch.manual_seed(0)
model = HardAttention()


def step(est):
    """One graph for the fixed batch, with estimator ``est``; returns the module to compare."""
    x = storch.denote_independent(data, 0, "data")
    storch.add_cost(model(est, x), name="squared error")
    return model


if __name__ == "__main__":  # the same comparison from Python
    from storch_bench import compare_estimators
    from storch_bench.model_cli import markdown

    torch.set_num_threads(1)  # tiny tensors: extra threads only add waiting (the CLI's --threads default)
    print(markdown(compare_estimators(step, estimates=32)))
