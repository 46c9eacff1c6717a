"""Per-sample semantics the raw call would get wrong: type promotion of 0-dim samples, index_fill with a
sampled value, F.embedding with a per-sample table (padding_idx, scale_grad_by_freq), and in-place writes
into a plate held once (a size-1 raw plate dim). Oracle: a loop over plate entries (values, dtypes and
gradients)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

import storch
from storch import Plate, PlateTensor

Z, DATA = Plate("z", 3), Plate("data", 2, True)


def entry(x, a):
    if type(x) is not PlateTensor:
        return x
    raw = x.tensor.expand(*[p.size for p in x.plates], *x.tensor.shape[len(x.plates):])
    return raw[tuple(a[p.name] for p in x.plates)]


def assignments(*xs):
    plates = {}
    for x in xs:
        if type(x) is PlateTensor:
            plates.update({p.name: p.size for p in x.plates})
    names = list(plates)
    for idx in itertools.product(*[range(plates[n]) for n in names]):
        yield dict(zip(names, idx))


def leaf(shape, dtype, plates=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(*[p.size for p in plates], *shape, generator=g, dtype=torch.float64) + 2).to(dtype)
    raw.requires_grad_(dtype.is_floating_point)
    return raw, (PlateTensor(raw, plates) if plates else raw)


def _total(t):
    return (torch.view_as_real(t) if t.is_complex() else t).double().sum()


def check_loop(fn, leaves, inputs, grads=True):
    """fn(*inputs) equals fn per plate entry: value, dtype, and the gradient of the sum w.r.t. the leaves."""
    out = fn(*inputs)
    got_total = ref_total = 0
    for a in assignments(*inputs, out):
        ref = fn(*[entry(x, a) for x in inputs])
        got = entry(out, a)
        assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, ref.dtype, got.shape, ref.shape)
        # (torch's default tolerance of the dtype: a CPU 0-dim operand may be read in a wider precision than
        # the common dtype, where storch casts it to the common dtype, as torch does on the GPU)
        torch.testing.assert_close(got, ref)
        ref_total = ref_total + _total(ref)
        got_total = got_total + _total(got)  # (every entry, also of a plate held once: a size-1 raw dim)
    if grads:
        ls = [t for t in leaves if t.requires_grad]
        g_got = torch.autograd.grad(got_total, ls, allow_unused=True, retain_graph=True)
        g_ref = torch.autograd.grad(ref_total, ls, allow_unused=True)
        for t, a, b in zip(ls, g_got, g_ref):
            a = torch.zeros_like(t) if a is None else a
            b = torch.zeros_like(t) if b is None else b
            torch.testing.assert_close(a, b)
    return out


# -- type promotion ------------------------------------------------------------------------------

# (dtype of the dimensioned operand, dtype of the 0-dim sample)
PAIRS = [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.int32, torch.int64),
         (torch.float64, torch.float32), (torch.int64, torch.float32), (torch.float32, torch.complex64)]
OPS = {
    "mul": lambda x, s: x * s,
    "radd": lambda x, s: s + x,
    "div": lambda x, s: x / s,
    "where": lambda x, s: torch.where(x > 2, x, s),
    "maximum": lambda x, s: torch.maximum(x, s),
    "clamp_min": lambda x, s: x.clamp(min=s),
    "add_alpha": lambda x, s: torch.add(x, s, alpha=2),
    "lt": lambda x, s: x < s,
    "three": lambda x, s: x * s + torch.ones(1, dtype=x.dtype),
}


@pytest.mark.parametrize("layout", ["plain", "same", "other"])
@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("dx,ds", PAIRS)
def test_zero_dim_sample_promotes_as_one_sample(layout, op, dx, ds):
    fn = OPS[op]
    if ds.is_complex and op in ("where", "maximum", "clamp_min", "lt"):
        pytest.skip("not defined for complex")
    xp = {"plain": (), "same": (Z,), "other": (DATA,)}[layout]
    rx, x = leaf((4,), dx, xp, seed=1)
    rs, s = leaf((), ds, (Z,), seed=2)
    out = check_loop(fn, [rx, rs], [x, s], grads=dx.is_floating_point and ds.is_floating_point and op != "lt"
                     and not ds.is_complex and dx != torch.float16)
    assert type(out) is PlateTensor


@pytest.mark.parametrize("ds,dc", [(torch.float16, torch.float32), (torch.int32, torch.int64),
                                   (torch.int64, torch.float64)])
def test_zero_dim_sample_with_plain_zero_dim_tensor(ds, dc):
    """per sample both are 0-dim: the wider dtype wins (the raw call counted the sample as dimensioned)"""
    rs, s = leaf((), ds, (Z, DATA), seed=3)
    c = torch.tensor(3, dtype=dc)
    check_loop(lambda s, c: s * c, [rs], [s, c], grads=False)
    check_loop(lambda s, c: torch.add(c, s), [rs], [s, c], grads=False)


def test_mixed_precision_activations_stay_half_and_linear_runs():
    rx, x = leaf((4,), torch.float32, (DATA,), seed=4)
    rs, s = leaf((), torch.float64, (Z,), seed=5)
    lin = torch.nn.Linear(4, 2)
    y = lin(x * s)
    assert y.dtype == torch.float32
    rh, h = leaf((4,), torch.float16, (DATA,), seed=6)
    assert (h / storch.PlateTensor(rs.float(), (Z,))).dtype == torch.float16


def test_result_type_is_per_sample():
    _, s = leaf((), torch.float64, (Z,))
    _, x = leaf((4,), torch.float32, (DATA,))
    assert torch.result_type(s, 1.0) == torch.float64
    assert torch.result_type(x, s) == torch.float32
    assert torch.result_type(s, torch.ones(2, dtype=torch.float16)) == torch.float16
    assert torch.result_type(torch.ones(2, dtype=torch.int32), s) == torch.float64
    assert torch.result_type(tensor=s, other=torch.tensor(1, dtype=torch.int32)) == torch.float64


def test_per_sample_dtype_matches_torch_result_type():
    from storch.plates.rules.pointwise import per_sample_dtype

    dtypes = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32,
              torch.float64, torch.complex64]
    operands = [torch.zeros((), dtype=d) for d in dtypes] + [torch.zeros(2, dtype=d) for d in dtypes] + [
        True, 2, 1.5, 1j]
    for a, b in itertools.product(operands, repeat=2):
        if not isinstance(a, torch.Tensor):
            continue
        assert per_sample_dtype([a, b]) == torch.result_type(a, b), (a, b)
    for a, b, c in itertools.product(operands[::2], repeat=3):  # three operands: clamp's common dtype
        if not all(isinstance(t, torch.Tensor) for t in (a, b, c)) or any(t.dtype.is_complex or t.dtype == torch.bool
                                                                          for t in (a, b, c)):
            continue
        assert per_sample_dtype([a, b, c]) == torch.clamp(a, b, c).dtype, (a, b, c)


def test_same_dtype_fast_path_unchanged():
    _, x = leaf((4,), torch.float32, (DATA,))
    _, s = leaf((), torch.float32, (Z,))
    assert (x * s).tensor.dtype == torch.float32 and (x * s).plates == (DATA, Z)


# -- index_fill with a sampled value -----------------------------------------------------------

FILL_LAYOUTS = {
    # name: (plates of self, per-sample shape of self, dim, index, plates of the value, index plates)
    "plain self": ((), (3,), 0, [1], (Z,), None),
    "self lacks the value's plates": ((DATA,), (3,), 0, [1], (Z,), None),
    "size-1 raw plate dim": ((Z, DATA), (3,), 0, [1, 2], (Z,), None),
    "2-d, dim -1, repeated": ((DATA,), (2, 4), -1, [3, 0, 3], (Z, DATA), None),
    "negative index": ((DATA,), (2, 4), 1, [-1, 0], (Z,), None),
    "0-dim index": ((), (3,), 0, 2, (Z,), None),
    "0-dim self": ((DATA,), (), 0, [0], (Z,), None),
    "sampled index and value": ((), (4,), 0, None, (Z,), (DATA,)),
}


@pytest.mark.parametrize("name", list(FILL_LAYOUTS))
@pytest.mark.parametrize("form", ["method", "function"])
def test_index_fill_with_a_sampled_value(name, form):
    sp, shape, d, index, vp, ip = FILL_LAYOUTS[name]
    rx, x = leaf(shape, torch.float64, sp, seed=7)
    if name == "size-1 raw plate dim":
        rx = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
        x = PlateTensor(rx, sp)
    rv, v = leaf((), torch.float32, vp, seed=8)  # cast to self's dtype, as torch does
    if ip is None:
        i = torch.tensor(index)
    else:
        i = PlateTensor(torch.tensor([[0, 3], [2, 2]]), ip)
    if form == "method":
        fn = lambda x, i, v: x.index_fill(d, i, v)  # noqa: E731
    else:
        fn = lambda x, i, v: torch.index_fill(x, d, i, v)  # noqa: E731
    # (torch's own backward of index_fill fails on negative indices: values only there)
    out = check_loop(fn, [rx, rv], [x, i, v], grads=name != "negative index")
    assert out.dtype == torch.float64


def test_index_fill_inplace_with_a_sampled_value():
    rv, v = leaf((), torch.float64, (Z,), seed=9)
    raw = torch.zeros(3, 2, 4, dtype=torch.float64)
    x = PlateTensor(raw.clone(), (Z, DATA))
    y = x.index_fill_(0, torch.tensor([0, 2]), v)
    assert y is x
    for a in assignments(x):
        ref = torch.zeros(4, dtype=torch.float64).index_fill(0, torch.tensor([0, 2]), entry(v, a))
        torch.testing.assert_close(entry(x, a), ref)
    shared = PlateTensor(torch.zeros(1, 2, 4, dtype=torch.float64), (Z, DATA))
    with pytest.raises(storch.PlateError, match="would write values that vary over plates"):
        shared.index_fill_(0, torch.tensor([1]), v)
    lacking = PlateTensor(torch.zeros(2, 4, dtype=torch.float64), (DATA,))
    with pytest.raises(storch.PlateError, match="would write values that vary over plates"):
        lacking.index_fill_(0, torch.tensor([1]), v)


def test_index_fill_out_of_range_raises():
    _, v = leaf((), torch.float64, (Z,))
    with pytest.raises(IndexError):
        torch.zeros(3).index_fill(0, torch.tensor([3]), v)
    with pytest.raises(IndexError):
        torch.zeros(3).index_fill(0, PlateTensor(torch.tensor([[0], [-4], [1]]), (Z,)), v)


# -- F.embedding with a per-sample table ------------------------------------------------------------

@pytest.mark.parametrize("padding_idx", [None, 0, -1])
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("layout", ["both sampled", "plain indices", "shared plates", "index held once"])
def test_embedding_with_a_per_sample_table(padding_idx, scale, layout):
    W_, I_ = Plate("w", 2), Plate("i", 3)
    mu = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    wp = {"both sampled": (W_, DATA), "plain indices": (W_,), "shared plates": (DATA,),
          "index held once": (W_, DATA)}[layout]
    sizes = [p.size for p in wp]
    factors = torch.arange(1, 1 + torch.Size(sizes).numel(), dtype=torch.float64).reshape(*sizes, 1, 1)
    W = PlateTensor(mu * factors, wp)  # a different table per plate entry
    g = torch.Generator().manual_seed(0)
    if layout == "plain indices":
        idx = torch.randint(0, 4, (5,), generator=g)
        idx[:2] = 0
    elif layout == "index held once":
        idx = PlateTensor(torch.tensor([[0, 0, 3, 1, 3]]).reshape(1, 1, 5), (I_, DATA))
    else:
        r = torch.randint(0, 4, (3, 2, 5), generator=g)
        r[..., :2] = 0
        idx = PlateTensor(r, (I_, DATA))

    def fn(i, w):
        return F.embedding(i, w, padding_idx=padding_idx, scale_grad_by_freq=scale)

    check_loop(fn, [mu], [idx, W])


def _sampled_table_and_index(mu):
    """A table per entry of plate w (mu times 1, 2) and an index per entry of i and the data plate."""
    W_, I_ = Plate("w", 2), Plate("i", 3)
    W = PlateTensor(mu * torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(2, 1, 1, 1), (W_, DATA))
    r = torch.randint(0, 4, (3, 2, 5), generator=torch.Generator().manual_seed(1))
    r[..., :2] = 0  # row 0 read twice per entry (a count of 2)
    return W, PlateTensor(r, (I_, DATA))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_sparse_embedding_of_a_per_sample_table_with_scale_grad_by_freq_is_refused_as_torch_refuses_it(padding_idx):
    """``F.embedding(z, W, sparse=True, scale_grad_by_freq=True)`` with a per-sample table W: torch's backward refuses
    the pair on one sample ("not supported with sparse gradients"); storch gave the laid-out tables a dense gradient
    silently (f-silent17). The values are torch's per entry, the backward raises torch's own error, and without a
    gradient to the table the lookup works as in torch."""
    mu = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    W, idx = _sampled_table_and_index(mu)
    out = F.embedding(idx, W, padding_idx, sparse=True, scale_grad_by_freq=True)
    for a in assignments(idx, W):
        one = F.embedding(entry(idx, a), entry(W, a), padding_idx, sparse=True, scale_grad_by_freq=True)
        torch.testing.assert_close(entry(out, a), one)
        with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
            one.sum().backward(retain_graph=True)  # torch, on one entry
    with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
        out.tensor.sum().backward()
    assert mu.grad is None
    frozen = F.embedding(idx, W.detach(), padding_idx, sparse=True, scale_grad_by_freq=True)
    torch.testing.assert_close(frozen.tensor, out.tensor.detach())
    with torch.no_grad():
        torch.testing.assert_close(F.embedding(idx, W, padding_idx, sparse=True, scale_grad_by_freq=True).tensor,
                                   out.tensor.detach())


def test_sparse_embedding_of_a_per_sample_table_is_refused_and_the_advised_forms_keep_torchs_gradient():
    """``F.embedding(z, W, sparse=True)`` with a per-sample table that needs a gradient: torch gives one entry's
    table a sparse gradient, which cannot flow back through the plates' broadcast (sparse tensors have no views);
    storch gave a dense one silently (f-silent17), now refuses with the advice. The advised forms equal a loop over
    the entries: sparse=False (the same values, dense), and the rows looked up in the plain table with sparse=True
    (torch's sparse gradient, per entry summed); without a gradient to the table, sparse=True runs as torch does."""
    mu = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    W, idx = _sampled_table_and_index(mu)
    with pytest.raises(storch.PlateError, match=r"(?s)sparse=True of a table on the plates 'w' \(size 2\).*"
                                                r"sparse=False.*SparseAdam.*plain table"):
        F.embedding(idx, W, sparse=True)
    with pytest.raises(storch.PlateError, match="sparse=True"):  # nn.Embedding(sparse=True) with a sampled weight
        torch.func.functional_call(torch.nn.Embedding(4, 2, sparse=True), {"weight": W}, (idx,))
    # sparse=False: the values and gradient per entry (the per-entry loop's gradient is sparse, its values equal)
    check_loop(lambda i, w: F.embedding(i, w), [mu], [idx, W])
    W, idx = _sampled_table_and_index(mu)
    dense, = torch.autograd.grad(F.embedding(idx, W).tensor.sum(), mu, retain_graph=True)
    ref = 0
    for a in assignments(idx, W):  # each entry's table made from mu (a slice of W's raw tensor passes no sparse grad)
        ref = ref + F.embedding(entry(idx, a), mu * (1.0 + a["w"]), sparse=True).sum()
    sparse_ref, = torch.autograd.grad(ref, mu)
    assert sparse_ref.is_sparse and not dense.is_sparse
    torch.testing.assert_close(dense, sparse_ref.to_dense())
    # the plain table with a sampled index, scaled after the lookup: torch's sparse gradient
    scale = PlateTensor(torch.tensor([1.0, 2.0], dtype=torch.float64).reshape(2, 1), (Plate("w", 2), DATA))
    looked = F.embedding(idx, mu, sparse=True) * scale
    torch.testing.assert_close(looked.tensor, F.embedding(idx, W).tensor.detach().expand_as(looked.tensor))
    grad, = torch.autograd.grad(looked.tensor.sum(), mu)
    assert grad.is_sparse
    torch.testing.assert_close(grad.to_dense(), sparse_ref.to_dense())
    # no gradient to the table (detached, or under no_grad): sparse=True runs, the entries' values
    for out in (F.embedding(idx, W.detach(), sparse=True), _no_grad(lambda: F.embedding(idx, W, sparse=True))):
        for a in assignments(idx, W):
            torch.testing.assert_close(entry(out, a), F.embedding(entry(idx, a), entry(W, a).detach()))


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def test_embedding_per_sample_table_rejects_bad_indices():
    W = PlateTensor(torch.randn(2, 4, 3), (Plate("w", 2),))
    for bad in (torch.tensor([4]), torch.tensor([-1])):
        with pytest.raises(IndexError):
            F.embedding(bad, W)
        with pytest.raises(IndexError):
            F.embedding(bad, W, scale_grad_by_freq=True)


# -- in-place writes into a plate held once ------------------------------------------------------------

@pytest.mark.parametrize("form", ["add_", "mul_", "iadd"])
def test_inplace_into_a_size_one_plate_dim_is_refused_with_storch_message(form):
    x = PlateTensor(torch.zeros(1, 2, 4), (Z, DATA))
    v = PlateTensor(torch.randn(3, 2, 4), (Z, DATA))
    with pytest.raises(storch.PlateError, match="in-place .* would write values that vary over plates"):
        if form == "add_":
            x.add_(v)
        elif form == "mul_":
            x.mul_(v)
        else:
            x += v
    assert x.tensor.shape == (1, 2, 4)
    # a value that does not vary over the held-once plate is written as before
    x.add_(PlateTensor(torch.ones(2, 4), (DATA,)))
    assert torch.equal(x.tensor, torch.ones(1, 2, 4))


@pytest.mark.parametrize("op", ["div", "atan2", "true_divide"])
@pytest.mark.parametrize("sample_dtype", [torch.int64, torch.int32])
def test_an_integral_common_dtype_does_not_cast_the_sample(op, sample_dtype):
    # found by review: the common per-sample dtype of a sampled int64 0-dim value and a uint8 tensor is uint8, and
    # casting the sample to it made -5 into 251 before a true division (or atan2), which computes in floating
    # point with the operands' values: the values must be each entry's own
    z = Plate("z", 3)
    k = PlateTensor(torch.tensor([-5, 2, -1], dtype=sample_dtype), (z,))
    img = torch.tensor([2, 4, 10], dtype=torch.uint8)
    f = getattr(torch, op)
    got = f(k, img)
    for i in range(3):
        torch.testing.assert_close(got.tensor[i], f(k.tensor[i], img))
