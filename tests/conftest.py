"""Shared by every test environment: the folder itself on ``sys.path``, so that test modules can
import the helpers that live here (``path_probes``) whichever subfolder pytest runs; fixtures."""

import sys
from pathlib import Path

import pytest
import torch

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


# -- torch's default dtype, per test folder ---------------------------------------------------------
# Some modules (tests/score) set float64 as torch's default dtype when imported. CI runs each folder
# in its own process (tox), where every test of the folder then runs with the default its modules
# left at the end of collection. One pytest process over several folders would carry that default
# into the next folder's modules (tests/models' inductor moving-average test failed after
# tests/score). So each folder starts its collection from the dtype pytest started with, and each
# test runs with the default its folder's collection ended with: what its own tox run gives it.

_START_DTYPE = torch.get_default_dtype()
_FOLDER_DTYPE: dict = {}  # top folder under tests/ -> the default dtype at the end of its collection
_collecting: list = [None]  # the folder whose modules are being collected


def _folder(path) -> str:
    try:
        return Path(str(path)).resolve().relative_to(_HERE).parts[0]
    except (ValueError, IndexError):
        return ""


def pytest_collectstart(collector):
    if isinstance(collector, pytest.Module):
        folder = _folder(collector.path)
        if folder != _collecting[0]:  # the first module of another folder: start from pytest's default
            _collecting[0] = folder
            torch.set_default_dtype(_FOLDER_DTYPE.get(folder, _START_DTYPE))


def pytest_collectreport(report):
    if _collecting[0] is not None:
        _FOLDER_DTYPE[_collecting[0]] = torch.get_default_dtype()


@pytest.fixture(autouse=True)
def _folder_default_dtype(request):
    """The default dtype the test's folder set up when collected (see above), restored after the test."""
    want = _FOLDER_DTYPE.get(_folder(request.path), _START_DTYPE)
    old = torch.get_default_dtype()
    torch.set_default_dtype(want)
    yield
    torch.set_default_dtype(old)


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
