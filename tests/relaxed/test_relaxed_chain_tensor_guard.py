"""One 'go' estimator per step of a GRU chain (found porting a world model): each node's plate holds the sample and
its neighbours, so the entries multiply along the chain even at n_samples=1, and the GRU's state (H values per
sample) with them. The chain guards counted the samples only (a few values each), so the process was killed by
the OS at step 13 (918 MB for one gru_cell output). The state spread over the next node's plate is now refused
past ``MAX_CHAIN_TENSOR_BYTES`` (lowered here, to keep the test small), before gru_cell's input is made."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import OneHotCategorical

import storch
import storch.plates.tensor as plate_tensor
from path_probes import Allocations

DATA, H, C = 2, 16, 3


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    storch.reset()


def test_go_per_step_under_a_gru_is_refused_where_the_state_passes_the_bound(monkeypatch):
    monkeypatch.setattr(plate_tensor, "MAX_CHAIN_TENSOR_BYTES", 2 ** 16, raising=False)
    torch.manual_seed(0)
    gru, head = nn.GRUCell(C, H), nn.Linear(H, C)
    sizes, probe = [], Allocations()
    with storch.Graph(), pytest.raises(storch.PlateError) as info, probe:
        h = storch.denote_independent(torch.zeros(DATA, H), 0, "data")
        for t in range(12):
            z = storch.estimator("go", plate=f"z{t}")(OneHotCategorical(logits=head(h)))
            sizes.append(z.plates[0].size)
            h = gru(z, h)  # h_{t-1} (plates z0..z{t-1}) spread over z_t's entries
            storch.add_cost((h ** 2).sum(), name=f"c{t}")
    m = sizes[0]
    assert m > 1 and set(sizes) == {m}
    # gru_cell at step t spreads h_{t-1} (H float32 per sample) over m^(t+1) x DATA entries: the first step past
    # 2^16 bytes is refused (at step t, before the gru_cell of that step made anything of that size)
    t = len(sizes) - 1
    assert m ** t * DATA * H * 4 <= 2 ** 16 < m ** (t + 1) * DATA * H * 4 and t >= 2
    msg = str(info.value)
    assert (f"spread a value of {H} elements per sample, which varies over the samples of {t} earlier node(s), over "
            f"the samples of plates z{t}={m}: the tensor computed would hold {m ** (t + 1) * DATA} entries") in msg
    assert "'go' or 'spsa', multiplies even then" in msg and "partition_estimators" in msg
    # refused before that step's gru_cell: its gates (3 H per entry) were never made; the largest tensor made is
    # the previous step's gates, m^t x DATA x 3 H (the bound counts the spread state, not what an op makes of it)
    assert probe.largest == m ** t * DATA * 3 * H
