"""``sum_and_sample`` is two estimators: the one-step one and MAPO's sequence mode (``buffer=``),
each with its own per-node state, behind one registered name whose options, description and
checkpoints are unchanged.

Seed for seed they give what the single class gave before the split: ``sum_and_sample_reference.json``
holds the values of every scenario of ``sum_and_sample_scenarios.py`` computed by the code before the
split (its commit is in the file); a deliberate numerical change regenerates it with
``python tests/score/sum_and_sample_scenarios.py --write`` and says why in the commit.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle

import pytest
import torch
from sum_and_sample_scenarios import REFERENCE, SCENARIOS, run
from torch.distributions import Categorical

import storch
from storch_score import SumAndSample
from storch_score._sum_and_sample_options import SUMMARY
from storch_score.sum_and_sample import MemoryState
from storch_score.sum_and_sample_sequences import SequenceState, SumAndSampleSequences

REF = json.loads(REFERENCE.read_text(encoding="utf-8"))


def _differences(got, want, path="") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{path}/{k}: missing" for k in want if k not in got]
        out += [f"{path}/{k}: unexpected" for k in got if k not in want]
        for k in want:
            if k in got:
                out += _differences(got[k], want[k], f"{path}/{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _differences(g, w, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float):
        # float64 rounding only: the surrogate may sum the same terms in another order (the perf work
        # reuses the cost's MagicBox in the baseline term); other draws differ far beyond this
        same = math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-14)
        return [] if same else [f"{path}: {got!r} != {want!r}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_the_reference_covers_every_scenario() -> None:
    assert sorted(REF["scenarios"]) == sorted(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_seed_for_seed_the_values_before_the_split(name: str) -> None:
    diff = _differences(run(name), REF["scenarios"][name])
    assert not diff, f"{name} differs from the values of {REF['generated_at']}:\n" + "\n".join(diff[:20])


# -- two estimators, one registered name ---------------------------------------------------------------

ONE_STEP_FIELDS = ["k", "m", "first", "logp", "idx", "mask", "beam", "lp", "log_rest", "empty", "table", "codes",
                   "sure", "rest", "gone"]
SEQUENCE_FIELDS = ["n_slots", "m", "keys", "mem", "mem_len", "mem_ok", "mem_range", "slot", "slot_ok", "imp", "q", "parents",
                   "names", "tokens", "lps", "slot_cum", "costs", "l0", "slot_seq", "slots_full", "any_imp", "is_slot", "orders",
                   "tables", "weights", "finished", "mem_ended", "smp_eq", "slot_eq"]


def _one_step_node():
    est = storch.estimator("sum_and_sample", plate="z", n_enumerate=2, n_samples=2)
    with storch.Graph() as graph:
        z = est(Categorical(logits=torch.zeros(5)))
        storch.add_cost(z.double())
        storch.surrogate_loss()
        return est, graph.nodes[0]


def _sequence_node():
    est = storch.estimator("mapo", plate="seq", buffer=2, n_samples=2, memory=torch.tensor([[1, 2]]))
    th = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    with storch.Graph() as graph:
        x = est(Categorical(logits=th))
        y = est(Categorical(logits=th + x.double().unsqueeze(-1)))
        storch.add_cost((x + y).double())
        node = graph.nodes[0]
        storch.backward()  # the buffer update reads the record too
        return est, node


def test_each_mode_is_its_own_class_with_its_own_state() -> None:
    one, one_node = _one_step_node()
    seq, seq_node = _sequence_node()
    assert type(one) is SumAndSample and type(seq) is SumAndSampleSequences
    assert [f.name for f in dataclasses.fields(one.State)] == ONE_STEP_FIELDS
    assert [f.name for f in dataclasses.fields(seq.State)] == SEQUENCE_FIELDS
    # the components fill only their own fields (no attribute of the other mode appears on the record)
    assert type(one_node.state) is MemoryState and sorted(vars(one_node.state)) == sorted(ONE_STEP_FIELDS)
    assert type(seq_node.state) is SequenceState and sorted(vars(seq_node.state)) == sorted(SEQUENCE_FIELDS)
    assert len(seq_node.state.tokens) == 2 and one_node.state.k == 2
    # the sequence estimator inherits nothing from the one-step one; isinstance still holds (virtual subclass)
    assert SumAndSample not in SumAndSampleSequences.__mro__ and isinstance(seq, SumAndSample)
    assert not any(name in vars(SumAndSample) for name in ("update_parameters", "control_variate"))
    assert not any(name in vars(SumAndSampleSequences) for name in ("baseline", "_parts", "_beyond_budget"))


def test_the_registered_name_is_unchanged() -> None:
    assert storch.get_estimator_class("mapo") is storch.get_estimator_class("sum_and_sample") is SumAndSample
    assert SumAndSample.options() == ["n_samples", "n_enumerate", "memory", "baseline", "budget", "buffer", "eos"]
    info = storch.available_estimators()["sum_and_sample"]
    # the first line of the class docstring before the split
    assert info.description == ("Sum exactly over a memory set M of values and sample the rest from p(x | x ∉ M) "
                                "(appendix D.2.3).") == SUMMARY
    for est in (storch.estimator("sum_and_sample", plate="z"), storch.estimator("mapo", plate="s", buffer=2)):
        got = est.info()
        assert (got.name, got.max_order, got.biased, got.description) == (
            info.name, info.max_order, info.biased, info.description)
        assert est.supports_partitions and est.requires_enumerate_support
        assert type(est).has_update  # the name's capability (buffer= keeps a memory of sequences) ...
    # ... while the one-step instance has no state to update (like gumbel_softmax at a constant temperature):
    # storch.backward() keeps no graph for it and storch.compile takes it (tests/models/test_compile.py)
    assert not storch.estimator("sum_and_sample", plate="z").has_update
    assert storch.estimator("mapo", plate="s", buffer=2).has_update


def test_buffer_chooses_the_mode_by_keyword_or_position() -> None:
    assert type(SumAndSample("s", 2, None, None, "none", 4096, 3)) is SumAndSampleSequences  # buffer=3
    est = storch.estimator("mapo", plate="s", buffer=3, n_samples=2, budget=5)  # budget: not used on sequences
    assert (est.buffer, est.n_enumerate, est.n_samples) == (3, 3, 2)
    assert type(copy.deepcopy(est)) is SumAndSampleSequences
    assert type(pickle.loads(pickle.dumps(SumAndSample("z")))) is SumAndSample

    class Mine(SumAndSample):
        pass

    assert type(Mine("z", n_samples=2)) is Mine
    with pytest.raises(storch.OptionError, match="subclass storch_score.sum_and_sample_sequences"):
        Mine("z", buffer=2)


def test_checkpoints_written_before_the_split_load() -> None:
    """The keys are those of the single class: '_extra_state', None for one step, the buffer for sequences."""
    one = storch.estimator("sum_and_sample", plate="z")
    assert dict(one.state_dict()) == {"_extra_state": None}
    one.load_state_dict({"_extra_state": None})  # strict
    book = {"capacity": 2, "entries": {5: {(1, 2): [0.25, -1.5]}}}  # SequenceBuffer.state(), unchanged
    seq = storch.estimator("mapo", plate="s", buffer=2)
    seq.load_state_dict({"_extra_state": book})  # (a checkpoint from before the record of who saved it)
    record = {"saved_by": {"estimator": "sum_and_sample", "buffer": 2, "eos": None},  # (written since)
              "met_again": True}  # (written since too; a checkpoint without it reads as having met its keys)
    assert seq.state_dict()["_extra_state"] == {**book, **record}
    seq.load_state_dict({"_extra_state": None})  # a one-step checkpoint leaves the buffer as it is (as before)
    assert seq.state_dict()["_extra_state"] == {**book, **record}
    with pytest.raises(storch.OptionError, match="made with buffer="):
        one.load_state_dict({"_extra_state": book})
