"""Gradients (first and second order) through every treatment of the plate dispatcher (issue 10).

For functions of each treatment (pointwise, handler, batch-first, vmap fallback) applied to a
plate tensor (plates z and data) and plain parameters, the gradient and a Hessian-vector product
of a weighted sum of the results equal those of the same sum over a Python loop of the plate
entries — w.r.t. the parameters and w.r.t. the plate tensor's raw storage. Refused functions
have no gradient to check; they are covered by the dispatcher's own tests.
"""

import pytest
import torch
import torch.nn.functional as F

import storch
from model_checks import PLATES, layout

treatment_of = storch.treatment_of  # the dispatcher's table

S, D = 3, 2  # plate sizes of model_checks.PLATES


def _case(name, func, fn, per_sample, param_shapes):
    return pytest.param(func, fn, per_sample, param_shapes, id=name)


CASES = [
    _case("pointwise-tanh", torch.tanh, lambda x, w: torch.tanh(x * w), (4,), [(4,)]),
    _case("pointwise-logsigmoid", F.logsigmoid, lambda x, w: F.logsigmoid(x + w), (4,), [(4,)]),
    _case("handler-softmax", torch.softmax, lambda x, w: torch.softmax(x @ w, dim=-1), (4,), [(4, 5)]),
    _case("handler-cumsum", torch.cumsum, lambda x, w: torch.cumsum(x * w, 0), (4,), [(4,)]),
    _case("batch-first-conv2d", F.conv2d, lambda x, w: F.conv2d(x, w, padding=1), (2, 4, 4), [(3, 2, 3, 3)]),
    _case("batch-first-conv_transpose2d", F.conv_transpose2d,
          lambda x, w: F.conv_transpose2d(x, w, stride=2), (2, 3, 3), [(2, 1, 2, 2)]),
    _case("batch-first-gru_cell", torch.gru_cell,
          lambda x, w_ih, w_hh: torch.gru_cell(x.unsqueeze(0), torch.tanh(x[:3]).unsqueeze(0), w_ih, w_hh), (4,), [(9, 4), (9, 3)]),
    _case("vmap-solve", torch.linalg.solve,
          lambda x, a: torch.linalg.solve(a @ a.T + torch.diag_embed(x.exp()), x), (3,), [(3, 3)]),
    _case("vmap-logdet", torch.logdet, lambda x, a: torch.logdet(a @ a.T + torch.diag_embed(x.exp())), (3,), [(3, 3)]),
    _case("vmap-kron", torch.kron, lambda x, w: torch.kron(x, w), (2, 2), [(2, 3)]),
    _case("vmap-einsum", torch.einsum, lambda x, w: torch.einsum("ij,jk,k->i", x, w, x[0]), (2, 2), [(2, 2)]),
]


def test_the_cases_cover_every_treatment_that_has_gradients():
    kinds = {str(treatment_of(c.values[0]).treatment.value) for c in CASES}
    assert {"pointwise", "handler", "batch-first", "vmap"} <= kinds, kinds


@pytest.mark.parametrize("func, fn, per_sample, param_shapes", CASES)
def test_first_and_second_order_equal_a_loop(func, fn, per_sample, param_shapes):
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    raw = torch.randn(S, D, *per_sample, generator=g, dtype=dt).requires_grad_(True)
    params = [(0.5 * torch.randn(*s, generator=g, dtype=dt)).requires_grad_(True) for s in param_shapes]
    inputs = [raw, *params]

    out = fn(storch.PlateTensor(raw, PLATES), *params)
    weights = torch.randn(S, D, *out.shape, generator=g, dtype=dt)
    loss = (layout(out, ("z", "data")) * weights).sum()
    loop = sum((fn(raw[i, j], *params) * weights[i, j]).sum() for i in range(S) for j in range(D))
    torch.testing.assert_close(loss, loop)

    directions = [torch.randn(x.shape, generator=g, dtype=dt) for x in inputs]
    results = []
    for value in (loss, loop):
        first = torch.autograd.grad(value, inputs, create_graph=True)
        second = torch.autograd.grad(sum((a * v).sum() for a, v in zip(first, directions)), inputs)
        results.append(([a.detach() for a in first], list(second)))
    for k, (a, b) in enumerate(zip(results[0][0] + results[0][1], results[1][0] + results[1][1])):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"derivative {k}: {m}")
    assert any(float(a.abs().max()) > 0 for a in results[0][1]), "second derivatives are all zero"
