"""Settings for the real-model tests (tests/models)."""

import torch

# small tensors: one intra-op thread avoids contention when tox runs environments in parallel
torch.set_num_threads(1)


import pytest  # noqa: E402

import storch  # noqa: E402


@pytest.fixture
def forbid_storch(monkeypatch):
    """A callable that, once called, makes entering a ``storch.Graph`` or calling an estimator raise:
    a step replayed by ``storch.compile`` must run no storch code (call it after the traces)."""

    def no_storch(*a, **k):
        raise AssertionError("a replayed step must not run storch code")

    def forbid():
        monkeypatch.setattr(storch.Graph, "__enter__", no_storch)
        monkeypatch.setattr(storch.Estimator, "__call__", no_storch)

    return forbid
