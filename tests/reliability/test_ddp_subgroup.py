"""torch.distributed with estimators synchronised over a process group that leaves out the world's rank 0
(tests/reliability/_ddp_subgroup.py runs three gloo processes; ranks 1 and 2 form the group).

storch broadcasts from the group's first member: REBAR's trained parameters at its first update (ranks built with
temperature 0.5 and 0.3 start from rank 1's), NVIL's heads when they are built. Before, both raised torch's
ValueError "Global rank 0 is not part of group" on every member.
"""

from __future__ import annotations

import math

import pytest
import torch

import _ddp_subgroup
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 3


ranks = _gloo.ranks_fixture(_ddp_subgroup.worker, WORLD, "ddp_subgroup")


@pytest.mark.parametrize("case", ["rebar", "nvil"])
def test_a_group_without_the_worlds_rank_0_broadcasts_from_its_first_member(ranks, case):
    assert ranks[0] == {}  # (not a member: it runs no step)
    (k1, p1), (k2, p2) = ranks[1][case], ranks[2][case]
    assert k1 == k2 == "ok", (ranks[1][case], ranks[2][case])
    assert p1.keys() == p2.keys() and all(torch.equal(p1[n], p2[n]) for n in p1), (p1, p2)
    if case == "rebar":  # rank 1's temperature (the group's first member), one Adam step on (lr 0.01)
        assert abs(float(p1["log_temperature"]) - math.log(0.5)) <= 1.01 * 0.01, float(p1["log_temperature"])
