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
