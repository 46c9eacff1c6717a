"""storch.distributed.ranks_agree: whether every rank holds bitwise the same tensors (tests/reliability/
_ddp_ranks_agree.py runs it in two gloo processes).

It compared the ranks' min and max in float64: equal tensors holding NaN read as disagreeing (NaN is neither min nor
max: a false mismatch), and int64 values above 2**53 that differ in their last bits read as agreeing (rounded to one
float64: a real mismatch missed). Now the ranks compare a digest of their tensors' bytes, dtypes and shapes (one
collective, the check that precedes every storch collective)."""

from __future__ import annotations

import pytest

import _ddp_ranks_agree
import _gloo

pytestmark = _gloo.needs_distributed

WORLD = 2


ranks = _gloo.ranks_fixture(_ddp_ranks_agree.worker, WORLD, "ddp_ranks_agree")


@pytest.mark.parametrize("case, agree", [
    ("nan_equal", True),  # before: False
    ("nan_other", False),
    ("int64_equal", True),
    ("int64_last_bit", False),  # before: True
    ("float_equal", True),
    ("float_other", False),
    ("shape_other", False),
])
def test_ranks_agree_is_exact(ranks, case, agree):
    assert ranks[0][case] == ranks[1][case] == ("ok", agree), (ranks[0][case], ranks[1][case])
