"""Where this package's warnings point: the first frame outside storch, storch_score and torch (the user's call)."""

from __future__ import annotations

import os
import sys

import torch

import storch

__all__ = ["user_stacklevel"]

# storch's, this package's and torch's files: the frames a warning skips to point at the user's call
_OWN_DIRS = tuple(os.path.dirname(os.path.abspath(str(m.__file__))) + os.sep for m in (storch, torch)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def user_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the first frame
    outside storch, storch_score and torch (the user's call, whichever path led to it)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_DIRS):
        frame, level = frame.f_back, level + 1
    return level
