"""index_reduce, nonzero_static and the in-place scatter_ and index_reduce_ on plate tensors: batched rules, not
vmap's loop.

torch has no batching rule for them, so the vmap fallback ran them once per plate entry (with torch's
"performance drop" warning). The rules (storch.plates.rules.scatter) must give the fallback's values, per
sample, and be taken: the probe sees the rule's function and the autograd graph holds one batched op
(ScatterReduceBackward0), not a stack of per-entry IndexReduceBackward0. index_reduce's product with a gradient
to take is a segmented product, differentiable twice where torch's refuses (two zeros meeting at one position).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal

import storch
from path_probes import calls, graph_ops
from storch.plates.rules.vmap import vmap_call


def _samples():
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    b = storch.estimator("expect", plate="b")(Bernoulli(logits=torch.zeros(3)))
    k = storch.estimator("expect", plate="k")(Categorical(logits=torch.zeros(4)))
    z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(theta, 1.0))
    return theta, b, k, z


def _fallback(func, args, kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's performance warning of its loop)
        return vmap_call(func, args, kwargs)


def _looped(fn) -> bool:
    """Whether ``fn()`` ran torch's vmap fallback, which loops over the plate entries (it warns each time)."""
    with warnings.catch_warnings(record=True) as heard:
        warnings.simplefilter("always")
        fn()
    return any("performance drop" in str(w.message) for w in heard)


def _same(got, want, exact=True):
    assert [p.name for p in got.plates] == [p.name for p in want.plates]
    if exact:
        assert torch.equal(got.tensor.detach(), want.tensor.detach())
    else:
        torch.testing.assert_close(got.tensor.detach(), want.tensor.detach(), rtol=1e-6, atol=0)


def _index_reduce_cases(z, k):
    zr = torch.round(z.detach())
    return [
        (torch.index_reduce, (torch.ones(3), 0, torch.tensor([0, 1, 1, 2, 0, 0]), z)),
        (torch.Tensor.index_reduce, (z.reshape(2, 3), 1, k.reshape(1) % 3, zr[:2].reshape(2, 1))),  # a sampled index
        (torch.Tensor.index_reduce, (z.reshape(3, 2), 0, torch.tensor([2, 2, 0, 0]),
                                     torch.stack([z[:2], zr[2:4], z[4:], zr[:2] * 0]))),  # zeros meeting
    ]


@pytest.mark.parametrize("reduce", ["prod", "mean", "amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_index_reduce_equals_the_fallback_and_takes_the_rule(reduce, include_self):
    with storch.Graph():
        _, _, k, z = _samples()
        for func, args in _index_reduce_cases(z, k):
            args = args + (reduce,)
            kwargs = {"include_self": include_self}
            want = _fallback(func, args, kwargs)
            with torch.no_grad():
                got, seen = calls(lambda: func(*args, **kwargs))
            assert "_index_reduce" in seen and "_segment_prod" not in seen
            _same(got, want)
            got = func(*args, **kwargs)  # with the gradient: the segmented product for prod (rounding may differ)
            _same(got, want, exact=reduce != "prod")
            assert not _looped(lambda: func(*args, **kwargs))
            assert _looped(lambda: vmap_call(func, args, kwargs))  # the control: the probe hears the loop
            ops = graph_ops(got.tensor)
            assert "IndexReduceBackward0" not in ops and "IndexReduceBackward0" in graph_ops(want.tensor)
            if reduce != "prod":
                assert ops["ScatterReduceBackward0"] == 1
            # the first derivative equals the fallback's
            grads = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
            g = torch.autograd.grad(got.tensor.sum(), [x.tensor if isinstance(x, storch.PlateTensor) else x
                                                      for x in grads], allow_unused=True)
            h = torch.autograd.grad(want.tensor.sum(), [x.tensor if isinstance(x, storch.PlateTensor) else x
                                                       for x in grads], allow_unused=True)
            for a, c in zip(g, h):
                assert (a is None) == (c is None)
                if a is not None:
                    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def test_index_reduce_prod_is_differentiated_twice_where_zeros_meet():
    # torch's own product reduction: "Double backward is unsupported for source when >1 zeros in source are
    # scattered to the same position" (a sampled mask times values, b * w); the segmented product's second
    # derivative equals the one of the products written out
    w = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        b = storch.estimator("expect", plate="b")(Bernoulli(logits=torch.zeros(3, dtype=torch.float64)))
        out = torch.ones(2, dtype=torch.float64).index_reduce(0, torch.tensor([0, 0, 1]), b * w, "prod")
        # in place, into a fresh per-sample buffer (the same rule, written)
        written = torch.ones_like(b[:2]).index_reduce_(0, torch.tensor([0, 0, 1]), b * w, "prod")
        by_hand = torch.stack(((b[0] * w[0]) * (b[1] * w[1]), b[2] * w[2]))
        hessians = []
        for got in (out, written, by_hand):
            g, = torch.autograd.grad((got.tensor ** 2).sum(), w, create_graph=True)
            hessians.append(torch.stack([torch.autograd.grad(g[i], w, retain_graph=True)[0] for i in range(3)]))
        first, second, hess = hessians
        torch.testing.assert_close(first, hess, rtol=0, atol=1e-12)
        torch.testing.assert_close(second, hess, rtol=0, atol=1e-12)
        assert float(first.abs().sum()) > 0


@pytest.mark.parametrize("size, fill", [(2, 9), (5, -1), (0, 0)])
def test_nonzero_static_equals_the_fallback_and_takes_the_rule(size, fill):
    with storch.Graph():
        _, b, _, z = _samples()
        for x in (b, torch.round(z.detach()).reshape(2, 3)):
            want = _fallback(torch.nonzero_static, (x,), {"size": size, "fill_value": fill})
            got, seen = calls(lambda: torch.nonzero_static(x, size=size, fill_value=fill))
            assert "_nonzero_static" in seen and "vmap_call" not in seen
            assert _looped(lambda: vmap_call(torch.nonzero_static, (x,), {"size": size}))  # the control
            _same(got, want)
            assert got.dtype == torch.long


def test_scatter_inplace_into_a_per_sample_buffer_equals_the_fallback_and_takes_the_rule():
    with storch.Graph():
        theta, _, _, z = _samples()
        j = (z > 0).long()
        for src in (1.0, z):
            want = _fallback(torch.Tensor.scatter_, (torch.zeros_like(z), 0, j, src), {})
            buf = torch.zeros_like(z)
            out, seen = calls(lambda: buf.scatter_(0, j, src))
            assert out is buf and "_scatter_inplace" in seen
            _same(buf, want)
            assert not _looped(lambda: torch.zeros_like(z).scatter_(0, j, src))
            assert _looped(lambda: vmap_call(torch.Tensor.scatter_, (torch.zeros_like(z), 0, j, src), {}))
        g, = torch.autograd.grad((buf.tensor ** 2).sum(), theta)  # the written values' gradient, as the loop's
        h, = torch.autograd.grad((want.tensor ** 2).sum(), theta)
        torch.testing.assert_close(g, h)
        # a buffer that lacks the written values' plates is refused, naming the in-place function
        with pytest.raises(storch.PlateError, match=r"scatter_"):
            torch.zeros_like(theta).scatter_(0, j, z)



def _index_reduce_inplace_cases(z, k):
    """(fresh per-sample buffer, dim, index, source, whether torch's in-place loop runs): the buffer carries every
    plate of what is written."""
    zr = torch.round(z.detach())
    by_k = torch.zeros_like(k, dtype=z.dtype)  # (0 per sample: gives a buffer the plate of a sampled index)
    return [
        (torch.ones_like(z[:3]), 0, torch.tensor([0, 1, 1, 2, 0, 0]), z, True),
        # a sampled index and values without its plate: torch's in-place loop raises ("vmap: aten::index_reduce_
        # ... is not possible ... use out-of-place operators")
        (z.reshape(2, 3) * 1 + by_k, 1, k.reshape(1) % 3, zr[:2].reshape(2, 1), False),
        (z.reshape(3, 2) * 1, 0, torch.tensor([2, 2, 0, 0]), torch.stack([z[:2], zr[2:4], z[4:], zr[:2] * 0]), True),
    ]


@pytest.mark.parametrize("reduce", ["prod", "mean", "amax", "amin"])
@pytest.mark.parametrize("include_self", [True, False])
def test_index_reduce_inplace_into_a_per_sample_buffer_equals_the_fallback_and_takes_the_rule(reduce, include_self):
    # the in-place form on a fresh buffer: the out-of-place rule written into it, not vmap's loop
    kwargs = {"include_self": include_self}
    with storch.Graph():
        theta, _, k, z = _samples()
        for buf, d, i, src, loop_runs in _index_reduce_inplace_cases(z, k):
            want = _fallback(torch.Tensor.index_reduce, (buf, d, i, src, reduce), kwargs)  # the out-of-place loop
            with torch.no_grad():
                fresh = buf.detach().clone()
                out, seen = calls(lambda: fresh.index_reduce_(d, i, src.detach(), reduce, **kwargs))
            assert out is fresh and "_index_reduce_inplace" in seen and "_index_reduce" in seen
            _same(fresh, want)
            got = buf.clone()
            assert got.index_reduce_(d, i, src, reduce, **kwargs) is got
            _same(got, want, exact=reduce != "prod")
            assert not _looped(lambda: buf.clone().index_reduce_(d, i, src, reduce, **kwargs))
            # one write of the batched result
            ops = graph_ops(got.tensor)
            assert ops["CopyBackwards"] == 1 and "CopySlices" not in ops and "IndexReduceBackward0" not in ops
            if reduce != "prod":
                assert ops["ScatterReduceBackward0"] == 1
            # the first derivative (through the written values and, with include_self, the buffer's) is the
            # out-of-place loop's
            g, = torch.autograd.grad(got.tensor.sum(), theta, retain_graph=True)
            h, = torch.autograd.grad(want.tensor.sum(), theta, retain_graph=True)
            torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-7)
            if not loop_runs:
                with pytest.raises(RuntimeError, match="use out-of-place operators"):
                    _fallback(torch.Tensor.index_reduce_, (buf.clone(), d, i, src, reduce), kwargs)
                continue
            # the in-place loop (the control: the probe hears it) writes each plate entry (a CopySlices each), to the
            # same values; its backward fails: each entry's write changes what the others' derivatives read
            looped = buf.clone()
            assert _looped(lambda: vmap_call(torch.Tensor.index_reduce_, (looped, d, i, src, reduce), kwargs))
            _same(looped, got, exact=reduce != "prod")
            assert graph_ops(looped.tensor)["CopySlices"] == 3
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(looped.tensor.sum(), theta, retain_graph=True)
        # a buffer that lacks the written values' plates is refused, naming the in-place function
        for plain in (torch.ones(3), torch.ones_like(k, dtype=z.dtype).expand(3).clone()):
            with pytest.raises(storch.PlateError, match=r"index_reduce_"):
                plain.index_reduce_(0, torch.tensor([0, 1, 1, 2, 0, 0]), z, reduce, **kwargs)


def test_index_reduce_prod_with_a_gradient_keeps_the_plate_order_of_its_operands():
    # a sampled index (plate k) and sampled values (plate z): scatter_reduce (no gradient to take) and torch's loop
    # give plates (k, z), the operands' order; the segmented product (a gradient to take) gave (z, k), so .tensor's
    # leading dims depended on whether a gradient was taken (review r-35)
    with storch.Graph():
        theta, _, k, z = _samples()
        args = (torch.ones(2, 3), 1, torch.stack([k % 3, 2 - k % 3]), z[:4].reshape(2, 2), "prod")
        want = _fallback(torch.Tensor.index_reduce, args, {})
        with torch.no_grad():
            plain = torch.Tensor.index_reduce(*args)
        got, seen = calls(lambda: torch.Tensor.index_reduce(*args))
        assert "_segment_prod" in seen
        assert [p.name for p in want.plates] == ["k", "z"]
        _same(plain, want)
        _same(got, want, exact=False)  # the same plates, and so the same .tensor layout
        g, = torch.autograd.grad((got.tensor ** 2).sum(), theta)
        h, = torch.autograd.grad((want.tensor ** 2).sum(), theta)
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("reduce", ["prod", "amax", "amin"])
def test_index_reduce_of_bool_values_is_torchs(reduce, include_self):
    # torch has no bool index_reduce ("index_reduce_func_exclude_input_init" / "index_func_" not implemented for
    # 'Bool'); scatter_reduce, which the rule runs, has one: the rule gave values where torch refuses (review r-35)
    with storch.Graph():
        _, b, _, _ = _samples()
        args = (torch.zeros(2, dtype=torch.bool), 0, torch.tensor([0, 0, 1]), b.bool(), reduce)
        for run in (_fallback, lambda f, a, kw: f(*a, **kw)):  # torch's loop, and the call: torch's refusal
            with pytest.raises(RuntimeError, match="not implemented for 'Bool'"):
                run(torch.Tensor.index_reduce, args, {"include_self": include_self})
