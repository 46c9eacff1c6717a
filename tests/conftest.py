"""Shared by every test environment: the folder itself on ``sys.path``, so that test modules can
import the helpers that live here (``path_probes``) whichever subfolder pytest runs; fixtures."""

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (``pytestmark = pytest.mark.usefixtures(...)``
    for a module), restored after it: a module-level ``torch.set_default_dtype`` leaks into every
    test collected after it in the same process (tests/models' float32 attention model failed)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from torch's seed 0, so a test that draws without seeding itself is still
    reproducible (one that did not, and asserted on a difference the draws could hide, flaked 1 in
    64); tests that seed themselves do so on top."""
    torch.manual_seed(0)
