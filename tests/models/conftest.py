"""Settings for the real-model tests (tests/models)."""

import torch

# small tensors: one intra-op thread avoids contention when tox runs environments in parallel
torch.set_num_threads(1)


import pytest  # noqa: E402
from torch.distributions import Distribution  # noqa: E402

import storch  # noqa: E402


@pytest.fixture(scope="module")
def restore_validation():
    """For modules that compile (``pytestmark = pytest.mark.usefixtures("restore_validation")``):
    torch.compile turns torch.distributions argument validation off for the whole process on its
    first compile (torch._dynamo.eval_frame.TorchPatcher); the other tests in this process keep it on."""
    validate = Distribution._validate_args
    yield
    Distribution.set_default_validate_args(validate)
    torch._dynamo.reset()


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
