"""Settings for the reliability tests."""

import pytest
import torch

import storch

# Small tensors: one intra-op thread avoids thread contention when tox runs several
# environments in parallel on a small machine (oversubscribed OpenMP threads spin).
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long-running test (still run in CI)")


@pytest.fixture(autouse=True)
def _clean_default_graph():
    """Every test starts and ends with an empty default graph (a failing test must not leak)."""
    storch.reset()
    yield
    storch.reset()
