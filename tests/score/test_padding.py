"""storch.padding: the entries of a sample's plate that the estimator filled in (repeats of a possible value
at weight 0, where a data point has fewer possible values than the plate has entries), for a loss of the whole
set written by the user (docs/estimators/unordered_set.md, "Only possible values").

Oracles: by hand, an entry that repeats an earlier entry's value (the comparison docs/partitions.md's MRT recipe
made before); and the exact value of a set loss over a data point whose set is its whole support.
"""

import math

import pytest
import torch
from torch.distributions import Categorical

import storch

INF = math.inf
# three data points over 5 values: 2, 4 and 5 of them possible
LOGITS = torch.tensor([[0.3, -0.2, -INF, -INF, -INF], [0.1, 0.5, -0.4, 0.2, -INF], [0.0, 0.4, -0.3, 0.2, 0.1]],
                      dtype=torch.float64)


def _draw(name, logits=LOGITS, seed=0, **options):
    """(value, padding, log p of the value), each with plates (entry, data) as raw tensors, data first."""
    torch.manual_seed(seed)
    est = storch.estimator(name, plate="z", **options)
    with storch.Graph():
        x = storch.denote_independent(logits, 0, "data")
        d = Categorical(logits=x)
        z = est(d)
        pad = storch.padding(z)
        lp = d.log_prob(z)
        assert pad.plates == z.plates[:2] and pad.dtype == torch.bool
        out = [(v + 0 * lp).tensor for v in (z, pad, lp)]
        names = [p.name for p in lp.plates]
        return [v.permute(names.index("data"), names.index("z")) for v in out]


def _repeats(z):
    """By hand: entries whose value repeats an earlier entry's (entry dim last)."""
    return (z.unsqueeze(-1) == z.unsqueeze(-2)).tril(-1).any(-1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name,options", [("unordered_set", dict(n_samples=4)), ("expect", {}),
                                          ("unordered_set", dict(n_samples=4, baseline=False))])
def test_padding_is_the_repeats_of_a_set_estimator(name, options, seed):
    z, pad, lp = _draw(name, seed=seed, **options)
    assert torch.equal(pad > 0, _repeats(z))
    assert (pad > 0).sum(-1).tolist() == ([3, 1, 0] if name == "expect" else [2, 0, 0])
    assert torch.isfinite(lp[pad == 0]).all()  # every entry that is not padding is a possible value


def test_padding_on_the_beam_path():
    # three Categorical variables per node (125 joint values) above budget=16: stochastic beam search; data point 0
    # has 2^3 = 8 possible joint values, fewer than n_samples = 10
    torch.manual_seed(1)
    logits = LOGITS.unsqueeze(1).expand(3, 3, 5)
    est = storch.estimator("unordered_set", plate="z", n_samples=10, budget=16)
    with storch.Graph():
        z = est(Categorical(logits=storch.denote_independent(logits, 0, "data")))
        pad = storch.padding(z)
        names = [p.name for p in z.plates]
        z = z.tensor.permute(names.index("data"), names.index("z"), 2)
        pad = pad.tensor.permute(names.index("data"), names.index("z"))
    codes = (z * torch.tensor([25, 5, 1])).sum(-1)
    assert torch.equal(pad, _repeats(codes))
    assert pad.sum(-1).tolist() == [2, 0, 0]


def test_sum_and_sample_pads_its_memory_and_the_samples_of_an_empty_remainder():
    # n_enumerate=3: data point 0 (2 possible values) repeats one in its memory, and its remainder is empty
    # (its 2 samples are draws from p at weight 0); data point 1's samples are draws of its remainder (real,
    # even where two of them are the same value)
    z, pad, _ = _draw("sum_and_sample", n_enumerate=3, n_samples=2)
    mem, smp = z[:, :3], pad[:, 3:]
    assert torch.equal(pad[:, :3] > 0, _repeats(mem))
    assert smp.tolist() == [[True, True], [False, False], [False, False]]


def test_a_set_loss_with_the_padding_left_out_is_exact_on_a_whole_support():
    # Q ∝ p^α over the set: data point 0's set is its whole support (2 values); with the padding left out its loss
    # is exact, counted twice it is not
    f = torch.tensor([1.0, 3.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    for seed in range(3):
        z, pad, lp = _draw("unordered_set", seed=seed, n_samples=4)
        q = torch.softmax(lp.masked_fill(pad > 0, -INF), -1)
        exact = (torch.softmax(LOGITS[0, :2], 0) * f[:2]).sum()
        assert torch.allclose((q * f[z.long()]).sum(-1)[0], exact)
        assert not torch.allclose((torch.softmax(lp, -1) * f[z.long()]).sum(-1)[0], exact)


def test_importance_pads_the_draws_it_replaced():
    # q draws value 2, which p masks: the entry holds p's mode at weight 0 instead (a stand-in, not q's draw)
    torch.manual_seed(0)
    est = storch.estimator("importance", plate="z", n_samples=50,
                           proposal=Categorical(logits=torch.zeros(3, 5, dtype=torch.float64)))
    with storch.Graph():
        x = storch.denote_independent(LOGITS, 0, "data")
        z = est(Categorical(logits=x))
        pad = storch.padding(z)
        node = storch.current_graph().nodes[-1]
        names = [p.name for p in pad.plates]
        pad = pad.tensor.permute(names.index("data"), names.index("z"))
    assert pad[0].sum() > 0 and pad[2].sum() == 0  # data point 0 masks 3 of 5 values; data point 2 none
    assert torch.equal(pad, node.state.impossible.permute(1, 0))


def test_estimators_that_do_not_pad_say_false():
    # (the relaxed family's: tests/relaxed/test_relaxed_padding.py)
    est = storch.estimator("score", plate="z", n_samples=4)
    with storch.Graph():
        x = storch.denote_independent(LOGITS, 0, "data")
        z = est(Categorical(logits=x))
        pad = storch.padding(z)
    assert pad.dtype == torch.bool and not pad.tensor.any() and pad.shape == ()
    assert [p.name for p in pad.plates] == ["z", "data"]


def test_sum_and_sample_sequences_pad_the_slots_a_key_does_not_use():
    # the memory seeds one sequence for key 0 and two for key 1: two slots, of which key 0's second follows the
    # first sample at weight 0
    memory = {0: torch.tensor([[1, 2]]), 1: torch.tensor([[1, 2], [0, 1]])}
    est = storch.estimator("sum_and_sample", plate="seq", buffer=3, n_samples=2, memory=memory)
    torch.manual_seed(0)
    with storch.Graph():
        x = storch.denote_independent(torch.zeros(2, 3), 0, "data")
        toks = [est(Categorical(logits=x), memory_key=torch.arange(2))]
        toks.append(est(Categorical(logits=x + 0 * toks[0].float().unsqueeze(-1))))
        pad = storch.padding(toks[-1])
        names = [p.name for p in pad.plates]
        assert torch.equal(storch.padding(toks[0]).tensor, pad.tensor)
        pad = pad.tensor.permute(names.index("data"), names.index("seq"))
        seqs = torch.stack([(t + 0 * toks[-1]).tensor for t in toks], -1).permute(
            names.index("data"), names.index("seq"), 2)
    assert seqs[0, 1].tolist() == seqs[0, 2].tolist()  # key 0's unused slot repeats its first sample
    assert pad.tolist() == [[False, True, False, False], [False, False, False, False]]


def test_sum_and_sample_sequences_pad_a_remembered_sequence_that_became_impossible():
    # key 1's second remembered sequence (0, 1) has token 1 masked at step 1 now: its slot holds the most probable
    # tokens at weight 0
    memory = {0: torch.tensor([[1, 2]]), 1: torch.tensor([[1, 2], [0, 1]])}
    est = storch.estimator("sum_and_sample", plate="seq", buffer=3, n_samples=2, memory=memory)
    mask = torch.tensor([[0.0, 0.0, 0.0], [0.0, -INF, 0.0]])
    torch.manual_seed(0)
    with storch.Graph():
        x, m = storch.denote_independent((torch.zeros(2, 3), mask), 0, "data")
        first = est(Categorical(logits=x), memory_key=torch.arange(2))
        last = est(Categorical(logits=x + m + 0 * first.float().unsqueeze(-1)))
        pad = storch.padding(last)
        names = [p.name for p in pad.plates]
        pad = pad.tensor.permute(names.index("data"), names.index("seq"))
    assert pad.tolist() == [[False, True, False, False], [False, True, False, False]]
