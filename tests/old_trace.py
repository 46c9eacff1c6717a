"""torch 2.7 and 2.8's ``make_fx(pre_dispatch=True)`` on the torch installed, for the tests of storch.compile's
grad-mode switches (``tests/conftest.py`` puts this folder on ``sys.path``)."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode


class RecordsWithoutSwitching(torch.overrides.TorchFunctionMode):
    """Active around a compiled step's first call (the trace): a grad-mode switch that reaches this mode while
    make_fx traces, from make_fx's pre-dispatch mode above it, which has recorded it, is not made, as those torch
    versions did not make it (torch 2.9 and later do). Switches outside a trace (the eager step, the replay check,
    the program's own) are made as usual."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch._C._set_grad_enabled and get_proxy_mode() is not None:
            return None
        return func(*args, **(kwargs or {}))
