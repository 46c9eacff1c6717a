"""Sparse operands: a plain sparse matrix times plate tensors, and the refusals of sparse results.

A fixed graph as a plain sparse matrix ``S`` (COO or CSR) times per-sample node features ``h``
(a GCN on a fixed graph with sampled features or masks): torch's sparse products take no batch
dims (torch.matmul expands them, which sparse tensors do not support), so the plates are folded
into the dense operand's columns (``S @ h``: raw ``(P..., m, k)`` to ``(m, P*k)``) or rows
(``h @ S``: ``(P*n, m)``), one sparse product is made and the result unfolded. Values and
gradients are those of a loop over the plate entries; a sparse tensor that varies per sample
(``x.to_sparse()``, ``torch.sparse_coo_tensor`` of sampled values) is refused: build the dense
tensor instead.
"""

from __future__ import annotations

import torch

from ...errors import PlateError
from ..kit import register, wrap_same
from ..tensor import PlateTensor
from ..treatments import describe, refuse, register_plate_handler
from .vmap import vmap_call

__all__ = ["is_sparse", "sparse_matmul", "SPARSE_RESULT", "SPARSE_ADVICE"]

_PT = PlateTensor
_T = torch.Tensor

SPARSE_ADVICE = ("build the dense tensor instead (index_add, scatter_add, a dense adjacency mask), or keep the "
                 "sparse matrix plain (a fixed graph) and multiply it with the per-sample dense tensor: S @ h, "
                 "torch.mm(S, h), torch.sparse.mm(S, h), torch.sparse.addmm(b, S, h) and h @ S run on plate "
                 "tensors (docs/plates.md, 'Sparse tensors')")
SPARSE_RESULT = ("it makes or reads a sparse tensor that varies per sample (a plate tensor), and storch holds a "
                 "plate tensor's samples in one dense tensor (plates leading) that a sparse layout cannot batch; "
                 + SPARSE_ADVICE)


def is_sparse(t) -> bool:
    """Whether ``t`` is a plain tensor of a sparse layout (COO, CSR, CSC, BSR, BSC)."""
    return type(t) is _T and t.layout is not torch.strided


def sparse_matmul(a, b, func=torch.mm, ranks=(2, 1), called=None):
    """``func(a, b)`` (``torch.mm`` or ``torch.sparse.mm``) for a plain sparse matrix and a plate tensor, one sparse
    product: the plates folded into the dense operand's columns (sparse ``a``: per-sample matrices or vectors
    whose rank is in ``ranks``, as torch's sparse products take) or rows (sparse ``b``: any per-sample rank, its
    leading dims folded with the plates), the result unfolded. ``called``: the user's function (messages)."""
    left = is_sparse(a)
    s, x = (a, b) if left else (b, a)
    if type(x) is not _PT or s.dim() != 2:
        what = (f"a {s.dim()}-d sparse tensor" if s.dim() != 2 else
                "a sparse operand and a plain or sparse one")
        raise PlateError(
            f"a product of {what} with plate tensors: storch multiplies a plain 2-d sparse matrix (COO or CSR, a "
            "fixed graph) with per-sample dense matrices, S @ h or h @ S (torch.matmul, torch.mm, Tensor.mm, "
            "torch.mv, torch.sparse.mm, torch.sparse.addmm, torch.addmm); loop over the sparse batch yourself, or "
            "use a dense tensor")
    n = len(x._plates)
    raw = x._raw
    k = raw.dim() - n
    if k not in ranks and (left or ranks == (2,)):  # (torch.matmul's h @ S takes any rank: its batch dims)
        shapes = " or ".join(("a matrix", "a vector")[2 - r] for r in ranks)
        raise PlateError(
            f"a plain sparse matrix and a plate tensor of per-sample shape {tuple(x.shape)} ({describe(called or func)}): "
            f"torch's sparse product takes {shapes} as the dense operand there, no batch dims; "
            "multiply each matrix of the stack (a loop or torch.stack), or move the batch into the columns yourself "
            "(h.movedim(0, -2).flatten(-2))")
    lead = raw.shape[:n]
    if left:  # S (r, m) @ x: (P..., m, k) -> (m, P*k) -> (r, P*k) -> (P..., r, k); a vector: (P..., m) -> (m, P)
        d = -2 if k == 2 else -1
        cols = raw.movedim(d, 0).reshape(raw.shape[d], -1)
        out = func(s, cols)
        out = out.reshape(out.shape[0], *lead, *raw.shape[n + 1:]).movedim(0, d)
    else:  # x @ S (m, c): (P..., ..., m) -> (P*..., m) -> (P*..., c) -> (P..., ..., c)
        if k == 0:
            raise PlateError(f"{describe(called or func)}: a 0-dim per-sample operand has no matrix product; use `*`")
        out = func(raw.reshape(-1, raw.shape[-1]), s)
        out = out.reshape(*raw.shape[:-1], out.shape[-1])
    return wrap_same(out, x._plates)


@register(torch.sparse.mm)
def _sparse_mm(func, args, kwargs):
    """plain sparse S times per-sample dense matrices (or h @ S): plates folded into their columns (rows), one mm"""
    a, b = (*args, *[kwargs[key] for key in ("sparse", "dense", "mat1", "mat2") if key in kwargs])[:2]
    if not (is_sparse(a) or is_sparse(b)):
        return vmap_call(func, args, kwargs)  # torch's own error (no sparse operand)
    return sparse_matmul(a, b, torch.sparse.mm, (2,), func)


@register(torch.sparse.addmm, torch.addmm, _T.addmm)
def _addmm(func, args, kwargs):
    """beta * input + alpha * (mat1 @ mat2) per sample; a plain sparse mat1 folds the plates into mat2's columns
    (one sparse mm), else vmap"""
    names = ("input", "mat1", "mat2")
    ops = list(args[:3]) + [kwargs[k] for k in names[len(args):] if k in kwargs]
    rest = {k: v for k, v in kwargs.items() if k not in names}
    beta, alpha = rest.pop("beta", 1), rest.pop("alpha", 1)
    if len(ops) != 3 or len(args) > 3 or rest or not is_sparse(ops[1]):
        return vmap_call(func, args, kwargs)  # dense operands, or torch's own error (it takes a sparse mat1 only)
    mm = torch.sparse.mm if func is torch.sparse.addmm else torch.mm
    if type(ops[1]) is not _PT and type(ops[2]) is not _PT:
        prod = mm(ops[1], ops[2])  # (only input is a plate tensor)
    else:
        prod = sparse_matmul(ops[1], ops[2], mm, (2,), func)
    out = prod if alpha == 1 else prod * alpha
    if beta == 0:  # torch ignores input (NaN and inf in it included)
        return out
    mat = ops[0]
    return out + (mat if beta == 1 else mat * beta)


def _refuse_sparse_results() -> None:
    names = ("to_sparse", "to_sparse_coo", "to_sparse_csr", "to_sparse_csc", "to_sparse_bsr", "to_sparse_bsc",
             "hspmm", "smm", "sspaddmm", "_sparse_sum", "_sparse_softmax", "_sparse_log_softmax")
    funcs = [f for n in names for f in (getattr(torch, n, None), getattr(_T, n, None)) if callable(f)]
    # torch.sparse.softmax / log_softmax are builtins of torch._C._sparse, not attributes of torch (a docs reader
    # found them vmapped into a 60-line torch error)
    funcs += [f for f in (getattr(torch.sparse, "softmax", None), getattr(torch.sparse, "log_softmax", None))
              if callable(f)]
    register_plate_handler(list(dict.fromkeys(funcs)), refuse(SPARSE_RESULT))


_refuse_sparse_results()
