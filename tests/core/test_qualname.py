"""storch._util.qualname: the class-qualified name of a function for messages ("OneHotCategorical.log_prob applied max",
"masked_fill in MyDist.rsample"). Python 3.9 and 3.10 have no ``code.co_qualname``; there the messages said only
"log_prob" (tests/relaxed/test_relaxed_errors.py failed on Python 3.9). The name found without ``co_qualname`` is
checked here against ``co_qualname`` itself where Python has it."""

import sys

import pytest
import torch
from torch.distributions import Categorical, Normal, OneHotCategorical

from storch._util.qualname import _found_qualname, code_qualname


class _Mine(Normal):
    def rsample(self, sample_shape=torch.Size()):
        frame = sys._getframe(0)
        return frame.f_code, frame


class _Sub(_Mine):
    pass


def _plain():
    frame = sys._getframe(0)
    return frame.f_code, frame


def _cases():
    yield OneHotCategorical.log_prob.__code__, None, "OneHotCategorical.log_prob"
    yield Categorical.log_prob.__code__, None, "Categorical.log_prob"
    yield (*_Sub(0.0, 1.0).rsample(), "_Mine.rsample")  # the defining class, not the instance's
    yield (*_plain(), "_plain")


@pytest.mark.parametrize("code, frame, expected", list(_cases()))
def test_the_name_found_without_co_qualname_is_co_qualname(code, frame, expected):
    assert _found_qualname(code, frame) == expected
    assert code_qualname(code, frame) == expected
    if sys.version_info >= (3, 11):
        assert code.co_qualname == expected
