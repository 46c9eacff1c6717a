"""A checkpoint of an estimator's state loads only into an estimator of the same kind with the options that give
the state its meaning (found by porting: score(baseline="moving_average")'s averages loaded silently into
baseline="leave_one_out" or "none", even with strict=True). The extra state records who
saved it (storch.extending.state_record); a checkpoint without the record (saved before it was written) loads as
it did."""

from __future__ import annotations

import io

import pytest
import torch
from torch.distributions import Bernoulli

import storch


def _trained(**options) -> storch.Estimator:
    """A score estimator after 3 training steps: moving averages (or NVIL's heads and Adam) to save."""
    est = storch.estimator("score", plate="z", n_samples=2, **options)
    theta = torch.zeros(3, requires_grad=True)
    torch.manual_seed(0)
    for _ in range(3):
        with storch.Graph():
            x = storch.denote_independent(torch.randn(4, 3), 0, "data")
            z = est(Bernoulli(logits=theta + x), inputs=x) if options.get("baseline") == "learned" else \
                est(Bernoulli(logits=theta + x))
            storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
            storch.backward()
    return est


@pytest.mark.parametrize("other, differs", [
    ({"baseline": "leave_one_out"}, "baseline differs"),
    ({"baseline": "none"}, "baseline differs"),
    ({"baseline": "learned"}, "baseline differs"),
])
def test_moving_average_state_is_refused_by_other_baseline_options(other, differs):
    saved = _trained(baseline="moving_average").state_dict()
    assert saved["_extra_state"]["moving_averages"]  # something to lose
    target = storch.estimator("score", plate="z", n_samples=2, **other)
    for strict in (True, False):
        with pytest.raises(storch.OptionError) as info:
            target.load_state_dict(saved, strict=strict)
        text = str(info.value)
        assert f"saved with other options ({differs})" in text
        assert "saved by 'score' (baseline='moving_average')" in text
        assert "docs/reliability.md" in text
    assert target.moving_averages == {}  # refused before anything changed


def test_learned_baseline_state_is_refused_by_a_moving_average():
    saved = _trained(baseline="learned").state_dict()
    target = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average")
    with pytest.raises(storch.OptionError, match=r"saved by 'score' \(baseline='learned'\)"):
        target.load_state_dict(saved)


def test_the_same_options_load_and_options_the_state_does_not_depend_on_may_change():
    est = _trained(baseline="moving_average")
    buf = io.BytesIO()
    torch.save(est.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # the record is plain data
    assert saved["_extra_state"]["saved_by"] == {"estimator": "score", "baseline": "moving_average"}
    # n_samples, decay, lr and update do not change what a moving average means (a resumed run may average on
    # with another decay: fine-tuning)
    target = storch.estimator("score", plate="q", n_samples=5, baseline="moving_average", decay=0.5, lr=0.5,
                              update=False)
    target.load_state_dict(saved)
    assert set(target.moving_averages) == set(est.moving_averages)
    assert all(torch.equal(target.moving_averages[k], v) for k, v in est.moving_averages.items())
    # "reinforce" is the same estimator; "batch_average" the same baseline as "leave_one_out"
    loo = storch.estimator("score", plate="z", n_samples=2, baseline="leave_one_out").state_dict()
    storch.estimator("reinforce", plate="z", n_samples=2, baseline="batch_average").load_state_dict(loo)


def test_a_checkpoint_without_the_record_loads_as_before():
    """Backward compatible: a state saved before the record was written loads into any score estimator, as it
    did (nothing says what it was saved with)."""
    est = _trained(baseline="moving_average")
    saved = est.state_dict()
    old = {"_extra_state": {k: v for k, v in saved["_extra_state"].items() if k != "saved_by"}}
    for options in ({"baseline": "moving_average"}, {"baseline": "moving_average", "decay": 0.5},
                    {"baseline": "leave_one_out"}):
        target = storch.estimator("score", plate="z", n_samples=2, **options)
        target.load_state_dict(old)
        assert all(torch.equal(target.moving_averages[k], v) for k, v in est.moving_averages.items())
    # and the escape the error names: delete the record, then it loads on purpose
    target = storch.estimator("score", plate="z", n_samples=2, baseline="moving_average", decay=0.5)
    del saved["_extra_state"]["saved_by"]
    target.load_state_dict(saved)
    assert set(target.moving_averages) == {"c"}


def _mapo(buffer: int) -> storch.Estimator:
    est = storch.estimator("mapo", plate="s", buffer=buffer, n_samples=2)
    theta = torch.zeros(2, 3, requires_grad=True)
    torch.manual_seed(1)
    with storch.Graph():
        toks = [est(torch.distributions.Categorical(logits=theta[t])) for t in range(2)]
        storch.add_cost((toks[0] + toks[1]).double(), name="c")
        storch.backward()
    return est


def test_mapo_buffer_of_another_size_or_estimator_is_refused():
    saved = _mapo(2).state_dict()
    assert saved["_extra_state"]["entries"]
    with pytest.raises(storch.OptionError, match=r"saved with other options \(buffer differs\)"):
        storch.estimator("mapo", plate="s", buffer=3, n_samples=2).load_state_dict(saved)
    # a checkpoint from before the record: its buffer's size says it (it silently replaced buffer= before)
    old = {"_extra_state": {k: v for k, v in saved["_extra_state"].items() if k != "saved_by"}}
    with pytest.raises(storch.OptionError, match="keeps 2 sequences per key and this estimator buffer=3"):
        storch.estimator("mapo", plate="s", buffer=3, n_samples=2).load_state_dict(old)
    storch.estimator("mapo", plate="s", buffer=2, n_samples=2).load_state_dict(old)  # the same size: loads
    # a score state into mapo, and into the one-step sum_and_sample (which keeps none): named
    score = _trained(baseline="moving_average").state_dict()
    with pytest.raises(storch.OptionError, match="saved by another estimator: saved by 'score'"):
        storch.estimator("mapo", plate="s", buffer=2, n_samples=2).load_state_dict(score)
    with pytest.raises(storch.OptionError, match="saved by estimator 'score'"):
        storch.estimator("sum_and_sample", plate="s").load_state_dict(score)
