"""Where a storch warning points: the first frame outside storch and torch (the user's call)."""

from __future__ import annotations

import os
import sys
from types import ModuleType

import torch

__all__ = ["user_stacklevel"]

# storch's and torch's own files: frames a warning skips to reach the user's call (this module is in storch/_util/:
# two dirnames up is the whole storch package, not only _util/)
_OWN_DIRS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def user_stacklevel(*modules: ModuleType) -> int:
    """The ``stacklevel`` of a warning issued by the caller of this function that points at the first frame
    outside storch and torch (the user's call, whichever of storch's paths led to it).

    ``modules``: modules whose folders' frames are skipped too: an estimator family passes one of its own
    (``warnings.warn(..., stacklevel=storch.extending.user_stacklevel(sys.modules[__name__]))`` in a module at
    its package's top level), so that a warning issued deep in its code points at the user's line, not at the
    family's or storch's frames in between.
    """
    own = _OWN_DIRS + tuple(_folder(m) for m in modules)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(own):
        frame, level = frame.f_back, level + 1
    return level


def _folder(module: ModuleType) -> str:
    """The folder of ``module``'s file. A module without one (a namespace package's ``__file__`` is None) is
    refused: ``str(None)`` read as a relative path named the working directory, and the walk skipped the user's
    own frames there."""
    file = getattr(module, "__file__", None)
    if not isinstance(module, ModuleType) or not isinstance(file, str):
        raise TypeError(
            f"storch.extending.user_stacklevel: {module!r} is not a module loaded from a file (a namespace package "
            "has no __file__); pass a module of your package, e.g. sys.modules[__name__] from a module at its top "
            "level")
    return os.path.dirname(os.path.abspath(file)) + os.sep
