"""The VAE overhead rows' storch step runs the hand-written step's aten ops plus only MagicBox's (issue 19).

At batch 100 storch's VAE step is ~1.10x the hand-written one, and the gap in microseconds is the same at
batch 1, 10, 30, 100 and 300 (docs/performance-log.md): the kernels are the same and the gap is per-step
Python. This pins the kernel side: per phase (forward; backward, the autograd engine's), the aten ops storch's
step issues beyond the hand-written step's (``storch-compare overhead``'s ``vae`` pair, score and leave-one-out)
are exactly MagicBox(l)'s -- ``exp(l - l.detach())`` and its backward's two products -- and the detached
returned estimate. A log-probability computed twice, a float64 widening, an expand materialised, a copy or an
extra reduction fails here. (The hand-written step's extra ops, torch's validation of the sample in
``Bernoulli.log_prob``, are not asserted: storch's raw distribution skips them.)
"""

from collections import Counter

import pytest
from torch.distributions import Distribution
from torch.profiler import ProfilerActivity, profile

import storch
from storch_bench.overhead import CONFIGS, vae_pair

# phase -> aten op -> how many more storch's step issues than the hand-written step
MAGIC_BOX = {
    # sub and exp: MagicBox(l) = exp(l - l.detach()); detach: its l.detach(), the sample's detached logits
    # (storch's raw Bernoulli draw) and the detached estimate storch.backward() returns
    "forward": {"sub": 1, "exp": 1, "detach": 3},
    # exp's backward (grad · result) and the product MagicBox(l) · C's other factor (or lerp's ∂/∂end); the
    # logits' four gradient contributions are summed by the autograd engine in place once more and out of place
    # once fewer (the order its buffer receives them in: the same number of additions)
    "backward": {"mul": 2, "add_": 1, "add": -1},
}
# the score function without a baseline: the hand-written step detaches the cost for its advantage, and adds
# C + log p · ⊥C where storch multiplies MagicBox(l) · C
EXTRA = {"score": {"forward": {"detach": -1, "add": -1}},
         # leave-one-out: storch's baseline term C - b is one lerp (leave_one_out's) and one sub, where the
         # hand-written step's (sum - C) / (n - 1) subtracted from C is two subs; storch's cost detach for the
         # baseline matches the hand-written advantage's; lerp's derivative in its weight MagicBox(l) is
         # grad · (C - b): a sub and a mul in backward
         "loo": {"forward": {"sub": -1, "add": -1, "mul": -1, "lerp": 1}, "backward": {"sub": 1}}}


def _aten_counts(step) -> dict:
    """Per phase, each aten op's count in one call of ``step`` (the optimizer's ops left out: the same Adam)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    counts = {"forward": Counter(), "backward": Counter()}
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        phase, p = "forward", ev.cpu_parent
        while p is not None:
            if p.name.startswith("Optimizer."):
                phase = None
                break
            if p.name.startswith("autograd::engine::evaluate_function"):
                phase = "backward"
            p = p.cpu_parent
        if phase is not None:
            counts[phase][ev.name[len("aten::"):]] += 1
    return counts


@pytest.mark.parametrize("config", ["score", "loo"])
def test_vae_step_issues_only_magic_box_beyond_the_hand_written_ops(config):
    validate = Distribution._validate_args
    Distribution.set_default_validate_args(True)  # (torch.compile elsewhere in a process turns it off)
    try:
        name, options, _ = CONFIGS[config]
        est = storch.estimator(name, plate="z", n_samples=4, **options)
        with_storch, by_hand, _ = vae_pair(config, est, 3, 4)
        for _ in range(2):  # past the first steps (a plain node is decided, Adam's state is made)
            with_storch(), by_hand()
        s, h = _aten_counts(with_storch), _aten_counts(by_hand)
    finally:
        Distribution.set_default_validate_args(validate)
    for phase in ("forward", "backward"):
        expected = Counter(MAGIC_BOX[phase])
        expected.update(EXTRA[config].get(phase, {}))
        # storch's excess over the hand-written step, op by op
        excess = {op: s[phase][op] - h[phase][op] for op in s[phase] if s[phase][op] > h[phase][op]}
        assert excess == {op: k for op, k in expected.items() if k > 0}, (phase, excess, s[phase], h[phase])
        fewer = {op: s[phase][op] - h[phase][op] for op in expected if expected[op] < 0}
        assert fewer == {op: k for op, k in expected.items() if k < 0}, (phase, fewer)
