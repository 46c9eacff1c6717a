"""z-tests of many independent estimates against an exact value."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from ..graph import denote_independent
from ..plates.tensor import PlateTensor

__all__ = ["replicate", "per_replicate_derivatives", "assert_unbiased", "z_test", "UnbiasednessReport"]


def replicate(param: torch.Tensor, n: int, plate: str = "replicate") -> tuple[torch.Tensor, PlateTensor]:
    """R independent copies of ``param`` on an independent plate, in the current graph.

    Returns:
        ``(leaf, copies)``: ``leaf`` has shape ``(n, *param.shape)`` and requires grad;
        ``copies`` is the PlateTensor to use in the model instead of ``param``.
    """
    leaf = param.detach().unsqueeze(0).expand(n, *param.shape).clone().requires_grad_(True)
    return leaf, denote_independent(leaf, 0, plate)


def per_replicate_derivatives(loss: torch.Tensor, leaf: torch.Tensor, order: int,
                              direction: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """Derivatives of orders 1..``order`` of each replicate's estimate.

    The loss is the mean over R replicates, so its gradient w.r.t. ``leaf[r]`` is ĝ_r / R. Since
    replicates do not interact, differentiating ``Σ_r ĝ_r[i]`` again gives each replicate's Hessian
    row i. Order 3 is returned as the derivative of the Hessian along ``direction`` (default: the
    all-ones vector; pass a generic vector for parameters, such as softmax logits, whose
    derivatives along all-ones vanish). A derivative that does not depend on ``leaf`` at all
    (e.g. the Hessian of a linear estimate) is returned as zeros.

    Returns:
        list of tensors: ``(R, d)``, ``(R, d, d)``, ``(R, d, d)`` for orders 1, 2, 3 (flattened
        parameter of size d).
    """
    r = leaf.shape[0]
    g = _grad(loss, leaf, create_graph=order > 1).reshape(r, -1) * r
    out = [g]
    if order >= 2:
        d = g.shape[1]
        rows = [_grad(g[:, i].sum(), leaf, create_graph=order > 2).reshape(r, d) for i in range(d)]
        h = torch.stack(rows, 1)
        out.append(h)
        if order >= 3:
            hv = h.sum(-1) if direction is None else h @ direction.to(h).reshape(d)  # H·v, shape (R, d)
            rows3 = [_grad(hv[:, i].sum(), leaf, create_graph=False).reshape(r, d) for i in range(d)]
            out.append(torch.stack(rows3, 1))
    return out


def _grad(y: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """dy/dx, zeros where y does not depend on x (keeps the graph for further derivatives)."""
    if not y.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(y, x, create_graph=create_graph, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


@dataclass
class UnbiasednessReport:
    """Result of a z-test: per-component mean, standard error, exact value and z-score."""

    name: str
    mean: torch.Tensor
    stderr: torch.Tensor
    exact: torch.Tensor
    z: torch.Tensor
    n: int
    threshold: float
    variance: Optional[torch.Tensor] = None  # per-component variance of the estimates (z_test fills it)
    atol: float = 1e-9
    dtype: Optional[torch.dtype] = None  # of the estimates as handed in (before the float64 comparison)

    @property
    def ok(self) -> bool:
        """True if every component's |z| is below the threshold."""
        return bool((self.z.abs() < self.threshold).all())

    @property
    def max_abs_z(self) -> float:
        """The largest |z| over the components (0 for an empty report)."""
        return float(self.z.abs().max()) if self.z.numel() else 0.0

    def __str__(self) -> str:
        # (the dataclass's repr prints every tensor in full: this is the summary, then the per-component table)
        verdict = "ok" if self.ok else "FAIL"
        lines = self.table().split("\n")
        lines[0] = (f"{self.name}: {verdict}, max |z| = {self.max_abs_z:.2f} over {self.z.numel()} component(s) "
                    f"({self.n} estimates, |z| < {self.threshold})")
        return "\n".join(lines)

    def table(self) -> str:
        """The per-component table: mean, standard error, exact value and z."""
        rows = [f"{self.name}: {self.n} estimates, |z| < {self.threshold}"]
        rows.append(f"{'component':>10} {'mean':>12} {'stderr':>10} {'exact':>12} {'z':>8}")
        for i, (m, s, e, z) in enumerate(zip(self.mean.flatten(), self.stderr.flatten(),
                                            self.exact.flatten(), self.z.flatten())):
            flag = "" if abs(float(z)) < self.threshold else "  <-- FAIL"
            tol = self.atol * (1 + abs(float(e)))
            if flag and float(s) <= tol and math.isfinite(float(m)) and math.isfinite(float(e)):
                # zero variance: z is infinite for any gap, so say how large the gap is and what was allowed
                flag += (f": zero variance, so the mean must equal the exact value; |mean - exact| = "
                         f"{abs(float(m) - float(e)):.3g} > tolerance {tol:.3g} (atol {self.atol:g} x (1 + |exact|))")
                if self.dtype in (torch.float32, torch.float16, torch.bfloat16):
                    flag += (f"; the estimates are {str(self.dtype).replace('torch.', '')} (a relative precision of "
                             f"{torch.finfo(self.dtype).eps:.1g}): compute the model in float64 (or, calling assert_unbiased yourself, pass a larger atol=)")
            rows.append(f"{i:>10} {float(m):>12.6g} {float(s):>10.3g} {float(e):>12.6g} {float(z):>8.2f}{flag}")
        return "\n".join(rows)


def z_test(estimates: torch.Tensor, exact: Union[torch.Tensor, float], name: str = "estimate", threshold: float = 4.0,
           atol: float = 1e-9) -> UnbiasednessReport:
    """z-test ``estimates`` (R independent draws along dim 0) against ``exact``; never raises.

    A component whose estimates have (numerically) zero variance must equal the exact value to
    ``atol`` (relative to its magnitude); otherwise its z-score is infinite. Non-finite estimates
    give an infinite z-score too, and so does a non-finite exact value (an enumeration that failed,
    e.g. 0 * inf for a masked value, must not pass as z = 0).
    """
    dtype = estimates.dtype
    est = estimates.detach().to(torch.float64)
    n = est.shape[0]
    exact = torch.as_tensor(exact).detach().to(torch.float64).expand(est.shape[1:])
    mean = est.mean(0)
    var = est.var(0) if n > 1 else torch.zeros_like(mean)
    stderr = (var / n).sqrt()
    tiny = stderr <= atol * (1 + exact.abs())
    z = torch.where(tiny, ((mean - exact).abs() > atol * (1 + exact.abs())).double() * float("inf"),
                    (mean - exact) / stderr.clamp_min(1e-300))
    # nan_to_num would turn ±inf into ±1.797e308: keep infinities as they are
    z = torch.where(torch.isfinite(mean) & torch.isfinite(exact), torch.nan_to_num(z, nan=0.0, posinf=math.inf, neginf=-math.inf),
                    torch.full_like(z, math.inf))
    return UnbiasednessReport(name, mean, stderr, exact, z, n, threshold, var, atol, dtype)


def assert_unbiased(estimates: torch.Tensor, exact: Union[torch.Tensor, float], name: str = "estimate", threshold: float = 4.0,
                    atol: float = 1e-9) -> UnbiasednessReport:
    """z-test ``estimates`` (R independent draws along dim 0) against ``exact``.

    A component whose estimates have (numerically) zero variance must equal the exact value to
    ``atol`` (relative to its magnitude). Raises AssertionError with a readable table on failure.
    """
    report = z_test(estimates, exact, name, threshold, atol)
    if not report.ok:
        raise AssertionError("estimator is biased (or the exact value is wrong):\n" + report.table())
    return report
