"""The two ways a user differentiates a loss twice, for the tests that an order-1 surrogate refuses it.

Shared by every test folder (``tests/conftest.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

from typing import Callable

import torch


def differentiate_twice(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, how: str) -> object:
    """Second derivatives of ``f`` at ``x0``: ``how="hessian"`` by ``torch.autograd.functional.hessian``,
    ``"grad_of_grad"`` by ``torch.autograd.grad`` of the summed first derivative taken with ``create_graph=True``."""
    if how == "hessian":
        return torch.autograd.functional.hessian(f, x0)
    if how != "grad_of_grad":
        raise ValueError(f"how must be 'hessian' or 'grad_of_grad', got {how!r}")
    x = x0.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(x), x, create_graph=True)
    return torch.autograd.grad(g.sum(), x)
