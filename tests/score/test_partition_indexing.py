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


def _beam_writes():
    return {
        "counts[s, a] += 1": lambda tab, s, a: tab.__setitem__((s, a), tab[s, a] + 1),
        "tab[s] = a": lambda tab, s, a: tab.__setitem__(s, a.to(tab.dtype)),
        "tab.add_(a)": lambda tab, s, a: tab.add_(a.to(tab.dtype)),
        "tab.scatter_": lambda tab, s, a: tab[s].scatter_(0, a.unsqueeze(0), 1.0),
        "tab.index_put_": lambda tab, s, a: tab.index_put_((s, a), torch.tensor(3.0, dtype=tab.dtype)),
    }


def test_a_table_of_an_earlier_beam_step_written_in_place_is_refused():
    """A beam re-indexes its entries between steps: an in-place write at step 1 into a table of step 0
    cannot reach the right entries. Refused, saying the table belongs to the earlier step and how to bring
    it to the current one (setitem's message named no plate: "varies over plates []"; scatter_ and
    index_put_ wrote into a re-indexed copy: the writes were lost)."""
    import pytest
    from torch.distributions import Categorical

    for form, write in _beam_writes().items():
        torch.manual_seed(3)
        est = storch.estimator("unordered_set", plate="seq", n_samples=3)
        with storch.Graph():
            s = torch.tensor(0)
            a = est(Categorical(logits=torch.randn(3, 3, dtype=torch.float64)[s]))
            tab = torch.zeros(3, 3, dtype=torch.float64) + 0.0 * a[..., None, None]
            write(tab, s, a)  # at its own step: fine
            s = (s + a + 1) % 3
            a = est(Categorical(logits=torch.randn(3, 3, dtype=torch.float64)[s]))
            with pytest.raises(storch.PlateError, match=r"belongs to step 0 of partition 'seq'.*tab = tab \+ 0 \*"):
                write(tab, s, a)
            tab = tab + 0 * a[..., None, None]  # the workaround: the table of step 1 (re-indexed)
            write(tab, s, a)
            assert tab.plates[0].step == 1
