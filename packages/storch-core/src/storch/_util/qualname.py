"""A function's qualified name for a message (``OneHotCategorical.log_prob``, ``MyDist.rsample``), from its code.

Python 3.11+ has ``code.co_qualname``; Python 3.9 and 3.10 have only ``co_name`` (``log_prob``), which left a
message naming "log_prob" without its class. There the class is the one, in the MRO of the frame's ``self`` (or among
torch.distributions' classes), whose attribute of that name runs this very code: the name ``co_qualname`` gives.
"""

from __future__ import annotations

from types import CodeType, FrameType
from typing import Optional

import torch

__all__ = ["code_qualname"]


def _runs(attribute, code: CodeType) -> bool:
    attribute = getattr(attribute, "fget", attribute)  # a property's getter
    attribute = getattr(attribute, "__func__", attribute)  # a classmethod / staticmethod
    return getattr(attribute, "__code__", None) is code


def code_qualname(code: CodeType, frame: Optional[FrameType] = None) -> str:
    """``code.co_qualname``; before Python 3.11 the same name found through ``frame``'s ``self`` or
    torch.distributions' classes (``co_name`` where neither defines it: a plain function)."""
    qualname = getattr(code, "co_qualname", None)
    return qualname if qualname is not None else _found_qualname(code, frame)


def _found_qualname(code: CodeType, frame: Optional[FrameType]) -> str:
    owner = frame.f_locals.get("self") if frame is not None else None
    classes = type(owner).__mro__ if owner is not None else ()
    if not classes:
        classes = tuple(c for c in vars(torch.distributions).values() if isinstance(c, type))
    for cls in classes:
        if _runs(cls.__dict__.get(code.co_name), code):
            return f"{cls.__qualname__}.{code.co_name}"
    return code.co_name
