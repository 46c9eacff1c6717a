"""``sum_and_sample`` is two estimators: the one-step one and MAPO's sequence mode (``buffer=``).

Seed for seed they give what the single class gave before the split: ``sum_and_sample_reference.json``
holds the values of every scenario of ``sum_and_sample_scenarios.py`` computed by the code before the
split (its commit is in the file); a deliberate numerical change regenerates it with
``python tests/score/sum_and_sample_scenarios.py --write`` and says why in the commit.
"""

from __future__ import annotations

import json

import pytest
from sum_and_sample_scenarios import REFERENCE, SCENARIOS, run

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
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def test_the_reference_covers_every_scenario() -> None:
    assert sorted(REF["scenarios"]) == sorted(SCENARIOS)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_seed_for_seed_the_values_before_the_split(name: str) -> None:
    diff = _differences(run(name), REF["scenarios"][name])
    assert not diff, f"{name} differs from the values of {REF['generated_at']}:\n" + "\n".join(diff[:20])
