"""storch.extending.state_record / check_state_record: a third-party estimator with extra state records who saved
it, with the options that give it its meaning, and refuses a state saved by another estimator or with other such
options; a state without the record (an older checkpoint) loads."""

from __future__ import annotations

import pytest

import storch
from storch.extending import check_state_record, state_record


class Counting(storch.Estimator):
    name = "test_counting"

    def __init__(self, plate: str, n_samples: int = 1, mode: str = "sum") -> None:
        super().__init__(plate, n_samples)
        self.mode, self.count = mode, 0

    def get_extra_state(self) -> dict:
        return {"count": self.count, **state_record(self, mode=self.mode)}

    def set_extra_state(self, state: dict) -> None:
        check_state_record(self, state, mode=self.mode)
        self.count = state["count"]


class Other(Counting):
    name = "test_other_counting"


def test_a_third_party_state_is_refused_by_another_mode_or_estimator_and_old_states_load():
    a = Counting("z", mode="sum")
    a.count = 7
    saved = a.state_dict()
    assert saved["_extra_state"] == {"count": 7, "saved_by": {"estimator": "test_counting", "mode": "sum"}}
    b = Counting("z", mode="sum")
    b.load_state_dict(saved)
    assert b.count == 7
    c = Counting("z", mode="max")
    with pytest.raises(storch.OptionError, match=r"estimator 'test_counting' \(plate 'z'\): .* \(mode differs\): "
                                                 r"saved by 'test_counting' \(mode='sum'\); this estimator is "
                                                 r"'test_counting' \(mode='max'\)"):
        c.load_state_dict(saved)
    assert c.count == 0
    with pytest.raises(storch.OptionError, match="saved by another estimator"):
        Other("z", mode="sum").load_state_dict(saved)
    c.load_state_dict({"_extra_state": {"count": 3}})  # no record: an older checkpoint
    assert c.count == 3
