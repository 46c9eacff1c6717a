"""storch_bench.measure.peak_memory: the peak above the level before the call, counting the frees of blocks
allocated before it (a training step frees the previous step's gradients in zero_grad and allocates new ones)."""

import torch

from storch_bench.measure import peak_memory

MB = 2**20


def test_a_block_freed_and_allocated_again_is_not_counted_twice():
    """The profiler reports a free only for a block whose allocation it saw: one profiled call counted the
    previous call's block, freed and allocated again, as 1 MB held (0 here: the free comes first)."""
    held = [torch.ones(MB // 4)]

    def step():
        held[0] = None  # like zero_grad(set_to_none=True): the previous step's block
        held[0] = torch.ones(MB // 4)

    assert peak_memory(step) < 0.01 * MB


def test_the_peak_of_blocks_held_together():
    held: list = []

    def step():
        held.clear()
        a = torch.ones(MB // 4)
        b = torch.ones(MB // 2)  # 3 MB held at once, then 1 MB kept
        held.append(a + 1)
        del a, b

    assert 2.99 * MB <= peak_memory(step) <= 3.01 * MB
