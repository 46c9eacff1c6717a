"""The plate dispatcher: nn layers and the functions issue 10 found wrong equal a loop over plate
entries; every treatment passes gradients (up to order 2 through the surrogate); randomness is
independent per entry; registration, refusals and error messages."""

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributions as dist
from torch.distributions import Bernoulli
from torch.utils._pytree import tree_flatten

import storch
from storch import Plate, PlateTensor, Treatment, treatment_of

D = torch.float64


def make(raw, *plates):
    return PlateTensor(raw, [Plate(n, s) for n, s in plates])


def entry(x, a):
    if type(x) is not PlateTensor:
        return x
    raw = x.tensor.expand(*[p.size for p in x.plates], *x.tensor.shape[len(x.plates):])
    return raw[tuple(a[p.name] for p in x.plates)]


def check(fn, *inputs, atol=1e-9):
    """fn on plate tensors equals, per plate entry, fn on that entry alone."""
    out = fn(*inputs)
    plates = {}
    for x in tree_flatten(inputs)[0]:
        if type(x) is PlateTensor:
            plates.update({p.name: p.size for p in x.plates})
    outs = tree_flatten(out)[0]
    assert any(type(o) is PlateTensor for o in outs)
    for idx in itertools.product(*[range(s) for s in plates.values()]):
        a = dict(zip(plates, idx))
        ins = [tuple(entry(y, a) for y in x) if isinstance(x, tuple) else entry(x, a) for x in inputs]
        exp = tree_flatten(fn(*ins))[0]
        assert len(exp) == len(outs)
        for o, e in zip(outs, exp):
            if isinstance(e, torch.Tensor):
                got = entry(o, a)
                assert got.shape == e.shape, (got.shape, e.shape)
                torch.testing.assert_close(got, e, rtol=1e-7, atol=atol)
    return out


def rnd(*shape, seed=0, dtype=D):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


ZD = (("z", 3), ("data", 2))


# -- the functions issue 10 lists as silently wrong or raising -------------------------------------

CASES = {
    "flip": lambda x: torch.flip(x, [0]) + x.flip(-1),
    "roll": lambda x: torch.roll(x, 1, 0) + x.roll(1),
    "rot90": lambda x: torch.rot90(x, 1, (0, 1)).sum(0),
    "diag": lambda x: torch.diag(x[:3, :3]) + torch.diag(x[0, :3]).sum(0),
    "diagonal": lambda x: x.diagonal().sum() + torch.diagonal(x, 1).sum(),
    "ravel": lambda x: x.ravel() * 2,
    "tensor_split": lambda x: torch.tensor_split(x, 2, dim=0)[1].sum() + x.tensor_split(torch.tensor([1, 2]))[0].sum(),
    "repeat_interleave": lambda x: x.repeat_interleave(2, dim=0)[:5].sum(-1) + torch.repeat_interleave(x[0], 2)[:5],
    "cumsum_dim0": lambda x: x.clone().cumsum_(0),
    "cosine_similarity_dim0": lambda x: F.cosine_similarity(x, x.flip(-1) + 1, dim=0),
    "quantile": lambda x: torch.quantile(x, 0.3, dim=0) + x.quantile(0.7),
    "nanmedian": lambda x: x.nanmedian() + x.nanmedian(0).values.sum(),
    "std_mean": lambda x: torch.std_mean(x, 0)[0] + torch.std_mean(x)[1],
    "aminmax": lambda x: torch.aminmax(x).max + torch.aminmax(x, dim=0).min.sum(),
    "tensordot": lambda x: torch.tensordot(x, x, dims=([0], [0])),
    "unfold": lambda x: x.unfold(0, 2, 1).sum(-1),
    "einsum": lambda x: torch.einsum("ij,kj->ik", x, x),
    "outer_trace": lambda x: torch.outer(x[0], x[1]) + torch.trace(x[:3, :3]),
    "scatter_index_add": lambda x: torch.zeros(5, 4, dtype=D).scatter(0, torch.tensor([[0, 1, 2, 3]]), x[:1])
    + torch.zeros(5, 4, dtype=D).index_add(0, torch.tensor([4, 0]), x[:2]),
    "sort_argsort_diff": lambda x: x.sort().values + x.argsort() + F.pad(torch.diff(x), (0, 1)),
    "softmax_implicit": lambda x: F.softmax(x, dim=None) if False else F.softmax(x, 1),
    "t_tril": lambda x: x.t().tril().sum(0)[:4] + torch.triu(x, 1).sum(0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_functions_issue_10_found_wrong_are_per_sample(name):
    x = make(rnd(3, 2, 5, 4), *ZD)
    check(CASES[name], x)


def test_index_select_with_a_sampled_index():
    table = rnd(6, 4)
    idx = make(torch.tensor([[0, 5], [3, 3], [1, 2]]), ("z", 3))
    check(lambda i: torch.index_select(table, 0, i), idx)
    x = make(rnd(3, 6, 4), ("z", 3))
    check(lambda a, i: a.index_select(0, i), x, idx)


_I = torch.randint(0, 5, (3, 4, 2), generator=torch.Generator().manual_seed(1))
_FLAT = torch.randint(0, 20, (3, 2, 3), generator=torch.Generator().manual_seed(2))  # indices into 4 * 5 elements
INDEXING_SPELLINGS = {  # (fn, index): every argument spelling torch accepts; index "I" (4, 2), "F" flat, "S" (2,)
    "gather": (lambda a, b: torch.gather(a, 1, b), "I"),
    "gather_kw": (lambda a, b: torch.gather(a, dim=1, index=b), "I"),
    "gather_all_kw": (lambda a, b: torch.gather(input=a, dim=-1, index=b, sparse_grad=False), "I"),
    "gather_method_kw": (lambda a, b: a.gather(dim=-1, index=b), "I"),
    "take_along_dim": (lambda a, b: torch.take_along_dim(a, b, 1), "I"),
    "take_along_dim_dim_kw": (lambda a, b: torch.take_along_dim(a, b, dim=1), "I"),
    "take_along_dim_all_kw": (lambda a, b: torch.take_along_dim(input=a, indices=b, dim=-1), "I"),
    "take_along_dim_method": (lambda a, b: a.take_along_dim(b, 1), "I"),
    "take_along_dim_method_kw": (lambda a, b: a.take_along_dim(indices=b, dim=1), "I"),
    "take_along_dim_broadcast": (lambda a, b: torch.take_along_dim(a[:1], b[:1], dim=-1), "I"),  # (1, 2) index
    "take_along_dim_flat": (lambda a, b: torch.take_along_dim(a, b), "F"),
    "take_along_dim_flat_none": (lambda a, b: torch.take_along_dim(a, b, None), "F"),
    "take_along_dim_flat_kw": (lambda a, b: torch.take_along_dim(a, b, dim=None), "F"),
    "take_along_dim_flat_method": (lambda a, b: a.take_along_dim(b), "F"),
    "index_select_kw": (lambda a, b: torch.index_select(a, dim=-1, index=b), "S"),
    "index_select_all_kw": (lambda a, b: torch.index_select(input=a, dim=-1, index=b), "S"),
    "index_select_method_kw": (lambda a, b: a.index_select(dim=1, index=b), "S"),
}


@pytest.mark.parametrize("operands", ["both sampled", "plain index", "plain input"])
@pytest.mark.parametrize("name", sorted(INDEXING_SPELLINGS))
def test_gather_take_along_dim_index_select_in_every_spelling_equal_a_loop(name, operands):
    """Positional, keyword (take_along_dim's is indices=, input= for all) and method forms, and
    take_along_dim without dim (each sample flattened), on sampled or plain input and index."""
    fn, kind = INDEXING_SPELLINGS[name]
    raw_i = {"I": _I, "F": _FLAT, "S": _I[:, 0]}[kind]
    x, i = make(rnd(3, 4, 5), ("z", 3)), make(raw_i, ("z", 3))
    if operands == "plain index":
        i = raw_i[0]
    elif operands == "plain input":
        x = rnd(4, 5, seed=1)
    check(fn, x, i)


DIFF_PLAIN_ENDS = {  # (fn, per-sample shape): diff with a plain prepend / append, the same for every sample
    "prepend": (lambda a, p: a.diff(prepend=p[:1]), (5,)),
    "cumsum_prepend_zero": (lambda a, p: a.cumsum(0).diff(prepend=torch.zeros(1, dtype=D), append=p[:2]), (5,)),
    "append_dim0": (lambda a, p: torch.diff(a, dim=0, append=p), (5,)),
    "both_positional": (lambda a, p: torch.diff(a, 2, -1, p[:1], p), (5,)),
    "input_kw": (lambda a, p: torch.diff(input=a, prepend=p), (5,)),
    "matrix_dim0": (lambda a, p: a.diff(dim=0, prepend=p[None], append=p[None]), (4, 2)),
    "matrix_dim_last": (lambda a, p: a.diff(1, -1, prepend=p[:, None]), (2, 4)),
    "matrix_append_positional_dim": (lambda a, p: a.diff(1, 1, None, p.view(2, 1)), (2, 3)),
}


@pytest.mark.parametrize("name", sorted(DIFF_PLAIN_ENDS))
def test_diff_with_a_plain_prepend_or_append_equals_a_loop(name):
    """A plain prepend/append is concatenated to every sample (it was handed to torch unexpanded and
    refused); values and the prepend's gradient (summed over the samples) as a loop."""
    fn, shape = DIFF_PLAIN_ENDS[name]
    x = make(rnd(3, 2, *shape), *ZD)
    x_shared = make(rnd(1, 2, *shape, seed=2), *ZD)  # shared by every z entry: a raw plate dim of size 1
    p = rnd(shape[-1] if len(shape) == 1 else shape[1 if "dim0" in name else 0], seed=1).requires_grad_()
    for a in (x, x_shared):
        out = check(lambda a: fn(a, p), a)
        (g,) = torch.autograd.grad((out.tensor.expand(3, 2, *out.shape) ** 2).sum(), p)
        ref = sum((fn(entry(a, {"z": z, "data": b}), p) ** 2).sum() for z in range(3) for b in range(2))
        torch.testing.assert_close(g, torch.autograd.grad(ref, p)[0])
    # a sampled prepend next to a plain append goes to vmap, equal to a loop too
    pre = make(rnd(3, 1, *shape[:-1], 1, seed=3), *ZD)
    check(lambda a, b: torch.diff(a, prepend=b, append=torch.ones(*shape[:-1], 1, dtype=D)), x, pre)
    with pytest.raises(storch.PlateError, match=r"\(\) \(plain\).*same dimension"):
        x.diff(prepend=torch.tensor(0.0, dtype=D))  # torch's own rule per sample: no 0-dim prepend


def test_data_dependent_shapes_are_refused_with_advice():
    x = make(rnd(3, 4), ("z", 3))
    with pytest.raises(storch.PlateError, match="depends on the values.*torch.where"):
        torch.nonzero(x > 0)
    with pytest.raises(storch.PlateError, match="depends on the values"):
        x.masked_select(x > 0)
    with pytest.raises(storch.PlateError, match="Python bool"):
        torch.equal(x, x)
    assert treatment_of(torch.nonzero).treatment is Treatment.REFUSED


# -- batch-first nn layers ------------------------------------------------------------------------


def _mods(seed=0):
    torch.manual_seed(seed)
    return {
        "conv1d": nn.Conv1d(6, 4, 3, padding=1),  # (C=6, L=6) per image row block
        "conv2d": nn.Conv2d(3, 4, 3, stride=2),
        "conv_transpose2d": nn.ConvTranspose2d(3, 2, 3, stride=2, output_padding=1),
        "maxpool2d": nn.MaxPool2d(2),
        "avgpool2d": nn.AvgPool2d(2),
        "adaptive_max": nn.AdaptiveMaxPool2d(1),
        "groupnorm": nn.GroupNorm(1, 3),
        "instancenorm": nn.InstanceNorm2d(3, affine=True),
        "prelu": nn.PReLU(3),
        "upsample": nn.Upsample(scale_factor=2, mode="bilinear"),
        "reflect_conv": nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"),
    }


@pytest.mark.parametrize("name", sorted(_mods()))
@pytest.mark.parametrize("batched", [False, True])
def test_image_layers_equal_a_loop(name, batched):
    mod = _mods()[name].double()
    shape = (2, 3, 6, 6) if batched else (3, 6, 6)
    if name in ("upsample", "groupnorm", "prelu") and not batched:
        # plain torch reads dim 0 of a (3, 6, 6) input as the batch and fails; so does storch
        with pytest.raises(Exception):
            mod(rnd(*shape))
        with pytest.raises(storch.PlateError):
            mod(make(rnd(3, 2, *shape), *ZD))
        return
    if name == "conv1d":
        shape = shape[1:] if batched else shape[1:]  # (N=3, C=6, L=6) / (C=6, L=6)
        shape = (3, 6, 6) if batched else (6, 6)
    x = make(rnd(3, 2, *shape), *ZD)
    check(mod, x)
    assert treatment_of(torch.conv2d).treatment is Treatment.BATCH_FIRST


def test_conv_with_a_sampled_weight_goes_to_vmap():
    x = make(rnd(3, 3, 6, 6), ("z", 3))
    w = make(rnd(3, 4, 3, 3, 3, seed=1), ("z", 3))
    check(lambda a, b: F.conv2d(a, b), x, w)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_recurrent_layers_equal_a_loop(kind, batch_first, batched):
    torch.manual_seed(0)
    rnn = getattr(nn, kind)(4, 5, num_layers=2, batch_first=batch_first).double()
    shape = ((2, 7, 4) if batch_first else (7, 2, 4)) if batched else (7, 4)
    x = make(rnd(3, 2, *shape), *ZD)
    check(lambda a: rnn(a)[0], x)
    check(lambda a: rnn(a)[1], x)
    # an initial state per sample (e.g. from an encoder)
    h0 = make(rnd(3, 2, 2, *((2, 5) if batched else (5,)), seed=2), *ZD)
    if kind == "LSTM":
        check(lambda a, h: rnn(a, (h, h * 0.5))[0], x, h0)
    else:
        check(lambda a, h: rnn(a, h)[0], x, h0)


@pytest.mark.parametrize("kind", ["LSTMCell", "GRUCell", "RNNCell"])
@pytest.mark.parametrize("batched", [False, True])
def test_recurrent_cells_equal_a_loop(kind, batched):
    torch.manual_seed(0)
    cell = getattr(nn, kind)(4, 5).double()
    x = make(rnd(3, 2, *((2, 4) if batched else (4,))), *ZD)
    check(lambda a: cell(a), x)


@pytest.mark.parametrize("batch_first", [False, True])
def test_attention_and_transformer_layers_equal_a_loop(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first).double().eval()
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).double().eval()
    x = make(rnd(3, 2, 5, 4, 8), *ZD)  # per sample: 5 x 4 x 8 (sequence/batch in either order)
    check(lambda a: mha(a, a, a)[0], x)
    check(lambda a: mha(a, a, a)[1], x)
    check(enc, x)
    single = make(rnd(3, 2, 5, 8, seed=1), *ZD)  # unbatched (L, E) per sample
    check(lambda a: mha(a, a, a)[0], single)
    mask = make(torch.rand(3, 2, 4, 5, generator=torch.Generator().manual_seed(3)) > 0.7, *ZD)
    if batch_first:
        check(lambda a, m: mha(a, a, a, key_padding_mask=m)[0], make(rnd(3, 2, 5, 4, 8).transpose(2, 3), *ZD), mask)


def check_grads(fn, inputs, leaves, seed=7):
    """Values (``check``) and gradients of ``fn`` on plate tensors equal those of a loop over plate entries:
    the gradient of a random weighting of the output w.r.t. the raw ``leaves`` (that the inputs are made of)."""
    out = check(fn, *inputs)
    plates = {p.name: p.size for p in out.plates}
    full = out.tensor.expand(*plates.values(), *out.shape)
    w = rnd(*full.shape, seed=seed)
    got = torch.autograd.grad((full * w).sum(), leaves)
    ref = 0
    for idx in itertools.product(*[range(s) for s in plates.values()]):
        a = dict(zip(plates, idx))
        ins = [entry(x, a) for x in inputs]
        ref = ref + (fn(*ins) * w[idx]).sum()
    want = torch.autograd.grad(ref, leaves)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h)
    return out


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("dtype", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_attention_with_a_sampled_attn_mask_equals_a_loop(batched, need_weights, dtype, train):
    """A 2-d attn_mask built from a sample (a hard attention mask) is folded into the (N * heads, L, S) mask of
    the batch-first call. With need_weights=False (and in TransformerEncoderLayer, which always passes it) it
    went to vmap, which cannot return the None weights: "`call` must only return Tensors" (found by porting).
    Values and gradients equal a loop; a 3-d mask, plain or sampled, likewise."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dropout=0.0).double().train(train)
    xr = rnd(2, *((3, 5, 8) if batched else (5, 8))).requires_grad_(True)
    x = make(xr, ("data", 2))  # the data on fewer plates than the mask
    keep = torch.rand(4, 2, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    keep[..., 0] = True  # (never a fully masked row)
    rows = (~keep)[:, :, None, :].expand(4, 2, 5, 5)
    mr = rows if dtype == "bool" else torch.where(rows, -1e4, 0.5 * rnd(4, 2, 5, 5, seed=2)).requires_grad_(True)
    m = make(mr, ("z", 4), ("data", 2))
    leaves = [xr, mha.in_proj_weight] + ([mr] if dtype == "float" else [])
    check_grads(lambda a, k: mha(a, a, a, attn_mask=k, need_weights=need_weights)[0], [x, m], leaves)
    if need_weights:
        check_grads(lambda a, k: mha(a, a, a, attn_mask=k, average_attn_weights=False)[1], [x, m], leaves)
    # with a sampled key padding mask too
    pad = make(~keep if not batched else (~keep)[:, :, None].expand(4, 2, 3, 5), ("z", 4), ("data", 2))
    check(lambda a, k, p: mha(a, a, a, attn_mask=k, key_padding_mask=p if dtype == "bool" else None,
                              need_weights=need_weights)[0], x, m, pad)
    # 3-d masks: (N * heads, L, S), or (heads, L, S) for an unbatched query, plain or sampled
    n = 2 * (3 if batched else 1)
    m3 = make(mr[:, :, None].expand(4, 2, n, 5, 5), ("z", 4), ("data", 2))
    check_grads(lambda a, k: mha(a, a, a, attn_mask=k, need_weights=need_weights)[0], [x, m3], leaves)
    plain3 = entry(m3, {"z": 1, "data": 0})
    check(lambda a: mha(a, a, a, attn_mask=plain3, need_weights=need_weights)[0], x)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("batched", [False, True])
def test_transformer_encoder_layer_with_a_sampled_src_mask_equals_a_loop(batched, train):
    """TransformerEncoderLayer passes need_weights=False: a src_mask built from a sample failed (the vmap path's
    None weights); with a sampled src_key_padding_mask too, in eval and train mode (dropout 0)."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().train(train)
    xr = rnd(2, *((3, 5, 8) if batched else (5, 8))).requires_grad_(True)
    x = make(xr, ("data", 2))
    keep = torch.rand(4, 2, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    keep[..., 0] = True
    m = make((~keep)[:, :, None, :].expand(4, 2, 5, 5), ("z", 4), ("data", 2))
    pad_raw = torch.rand(4, 2, *((3, 5) if batched else (5,)), generator=torch.Generator().manual_seed(2)) > 0.7
    pad_raw[..., 0] = False
    pad = make(pad_raw, ("z", 4), ("data", 2))
    leaves = [xr, enc.self_attn.in_proj_weight, enc.linear1.weight]
    check_grads(lambda a, k: enc(a, src_mask=k), [x, m], leaves)
    check_grads(lambda a, k, p: enc(a, src_mask=k, src_key_padding_mask=p), [x, m, pad], leaves)


def test_vmap_returns_the_non_tensor_outputs_of_a_function_as_they_are():
    """torch.func.vmap refuses an output that is not a tensor; vmap_call returned "`call` must only return
    Tensors" for multi_head_attention_forward's None weights (need_weights=False) on its vmap path (a sampled
    projection weight). Non-tensor outputs, the same for every entry, are returned as they are, on the vmap
    path and on the per-entry loop (an operator without a batching rule)."""
    from storch.plates.rules.vmap import vmap_call

    x = make(rnd(3, 2, 4), *ZD)
    y = make(rnd(2, 4, seed=1), ("data", 2))  # mapped on one of the two plates: nested vmap levels
    for a in (x, y):
        out = vmap_call(lambda t: (t * 2, None, (t.sum(), "s")), (a,), {})
        assert out[1] is None and out[2][1] == "s"
        torch.testing.assert_close(out[0].tensor, a.tensor * 2)
        torch.testing.assert_close(out[2][0].tensor, a.tensor.sum(-1))

    def no_rule(t, other=lambda t: None):  # as an operator that torch has no batching rule for
        if torch._C._functorch.is_batchedtensor(t):
            raise RuntimeError("Batching rule not implemented for no_rule")
        return t + 1, other(t)

    out = vmap_call(no_rule, (x,), {})
    assert out[1] is None
    torch.testing.assert_close(out[0].tensor, x.tensor + 1)
    assert len({int(x.tensor[k].sum() > 0) for k in itertools.product(range(3), range(2))}) == 2
    with pytest.raises(storch.PlateError, match="not the same one for every entry"):
        vmap_call(no_rule, (x, lambda t: int(t.sum() > 0)), {})

    # multi_head_attention_forward with a sampled projection weight goes to vmap
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).double().eval()
    w = make(mha.in_proj_weight.detach() + 0.1 * rnd(3, 24, 8, seed=3), ("z", 3))
    q = make(rnd(2, 5, 8, seed=4), ("data", 2))

    def f(a, wt):
        return F.multi_head_attention_forward(a, a, a, 8, 2, wt, mha.in_proj_bias, None, None, False, 0.0,
                                              mha.out_proj.weight, mha.out_proj.bias, training=False,
                                              need_weights=False)

    out = check(lambda a, wt: f(a, wt)[0], q, w)
    assert f(q, w)[1] is None and treatment_of(F.multi_head_attention_forward).treatment == Treatment.BATCH_FIRST


def test_transformer_encoder_eval_with_a_padding_mask_equals_a_loop():
    # the default enable_nested_tensor=True: in eval mode torch's own code asks
    # torch._nested_tensor_from_mask_left_aligned (a bool) before choosing its fast path
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2).double().eval()
    tr = nn.Transformer(8, 2, 1, 1, 16, dropout=0.0, batch_first=True).double().eval()
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    x = make(rnd(3, 2, 2, 5, 8), *ZD)
    check(lambda a: enc(a, src_key_padding_mask=kpm), x)
    check(lambda a: tr(a, a, src_key_padding_mask=kpm), x)
    # a sampled mask, left-aligned in every entry: the same answer for all of them
    m = torch.zeros(3, 2, 2, 5, dtype=torch.bool)
    m[:, 1, 1, 3:] = True
    check(lambda a, k: enc(a, src_key_padding_mask=k), x, make(m, *ZD))


def test_transformer_encoder_mask_check_that_differs_per_entry_is_refused_with_advice():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1).double().eval()
    m = torch.zeros(3, 2, 2, 5, dtype=torch.bool)
    m[1, 0, 1, 0] = True  # one entry's mask is not left-aligned
    x, kpm = make(rnd(3, 2, 2, 5, 8), *ZD), make(m, *ZD)
    with pytest.raises(storch.PlateError, match="enable_nested_tensor=False"):
        enc(x, src_key_padding_mask=kpm)
    off = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1,
                                enable_nested_tensor=False).double().eval()
    check(lambda a, k: off(a, src_key_padding_mask=k), x, kpm)
    # asked by the user's own code, a bool per entry is refused even when the entries agree
    with pytest.raises(storch.PlateError, match="torch's own code"):
        torch._nested_tensor_from_mask_left_aligned(x, make(torch.ones(3, 2, 2, 5, dtype=torch.bool), *ZD))


def test_batchnorm_eval_is_per_sample_even_when_length_equals_channels():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4).double()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.eval()
    check(bn, make(rnd(3, 2, 6, 4, 4), *ZD))  # (N, C, L) with L == C
    check(bn, make(rnd(3, 2, 6, 4), *ZD))


def test_batchnorm_training_on_plates_is_refused_with_advice():
    bn = nn.BatchNorm1d(4).double().train()
    with pytest.raises(storch.PlateError, match="running statistics.*model.eval.*track_running_stats=False"):
        bn(make(rnd(3, 6, 4), ("z", 3)))


def test_batchnorm_without_running_statistics_normalises_each_entry_over_its_batch():
    """BatchNorm(track_running_stats=False) (training or eval mode: batch statistics, nothing updated in place)
    on a sample whose per-sample shape has a batch dim (a decoder's (rows, C) after z): each plate entry is
    normalised over its own rows, as the one-sample code does. It was refused as 'training mode' (in eval mode
    too, with the advice to use eval mode; found by porting)."""
    bn = nn.BatchNorm1d(4, track_running_stats=False).double()
    check(bn, make(rnd(3, 2, 6, 4), *ZD))
    check(bn, make(rnd(3, 2, 6, 4, 5), *ZD))
    bn.eval()
    check(bn, make(rnd(3, 2, 6, 4), *ZD))


def test_embedding_bag_and_bilinear_equal_a_loop():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10, 3, mode="mean").double()
    idx = make(torch.randint(0, 10, (3, 2, 4, 5), generator=torch.Generator().manual_seed(1)), *ZD)
    check(bag, idx)
    bil = nn.Bilinear(4, 5, 2).double()
    check(bil, make(rnd(3, 2, 4), *ZD), make(rnd(3, 5, seed=4), ("z", 3)))


def test_packed_sequences_are_refused():
    lstm = nn.LSTM(4, 5).double()
    x = make(rnd(3, 6, 2, 4), ("z", 3))
    # refused when packing (before a PackedSequence whose batch_sizes vary over the plates is built)
    for sort in (True, False):
        with pytest.raises(storch.PlateError, match="pad the sequences"):
            nn.utils.rnn.pack_padded_sequence(x, torch.tensor([6, 4]), enforce_sorted=sort)
    # a plain packed sequence with plate-tensor states: refused by the RNN
    packed = nn.utils.rnn.pack_padded_sequence(rnd(6, 2, 4), torch.tensor([6, 4]))
    h = make(rnd(3, 1, 2, 5), ("z", 3))
    with pytest.raises(storch.PlateError, match="pad the sequences"):
        lstm(packed, (h, h))


@pytest.mark.parametrize("kind", ["gru", "gru 2 layers", "lstm 2 layers"])
def test_packed_sequences_refusal_gives_the_padded_recipe_for_the_state_at_length(kind):
    """An EGG receiver reads a message up to its eos with pack_padded_sequence: the refusal said only "pad", whose
    final state reads past the end (a silently different model). It says to take the padded run's output at
    length - 1, and that recipe, with a sampled length per plate entry, is the packed RNN's final state. A sampled
    length of 0 (a message that is all eos) took out[-1], the last padded position, silently: torch's packing
    refuses a length of 0, and the recipe as written gives the initial state there (a run of no steps). Its h0 is
    the one passed to the rnn, h0[-1] the last layer's (an LSTM's h): the whole h0, (num_layers, H), silently
    broadcast the result to (num_layers, H)."""
    layers = 1 if kind == "gru" else 2
    rnn = (nn.LSTM if kind.startswith("lstm") else nn.GRU)(4, 5, num_layers=layers).double()
    x = make(rnd(4, 6, 4), ("z", 4))                                   # per sample: (L, H_in), unbatched
    length = make(torch.tensor([6, 0, 2, 4]), ("z", 4))
    with pytest.raises(storch.PlateError) as info:
        nn.utils.rnn.pack_padded_sequence(x, length, enforce_sorted=False)
    recipe = "out, _ = rnn(padded); h = torch.where(length > 0, out[(length - 1).clamp(min=0)], h0[-1])"
    assert recipe in str(info.value), str(info.value)
    h0 = rnd(layers, 5, seed=7)                                         # a passed initial state, not zeros
    state = (h0, rnd(layers, 5, seed=8)) if kind.startswith("lstm") else h0
    out, _ = rnn(x, state)
    h = torch.where(length > 0, out[(length - 1).clamp(min=0)], h0[-1])    # the recipe as written
    assert h.shape == (5,)
    if layers > 1:  # the whole h0: a (num_layers, H) result per sample
        assert torch.where(length > 0, out[(length - 1).clamp(min=0)], h0).shape == (layers, 5)
    assert (out[length - 1].tensor[1] - h0[-1]).abs().max() > 0.01     # the old recipe: out[-1], not h0
    with pytest.raises(RuntimeError, match="greater than 0"):          # torch refuses a length of 0
        nn.utils.rnn.pack_padded_sequence(x.tensor[1, :, None], length.tensor[1:2], enforce_sorted=False)
    for i in range(4):
        if length.tensor[i] == 0:
            torch.testing.assert_close(h.tensor[i], h0[-1])
            continue
        packed = nn.utils.rnn.pack_padded_sequence(x.tensor[i, :, None], length.tensor[i:i + 1], enforce_sorted=False)
        _, expected = rnn(packed, tuple(t[:, None] for t in state) if isinstance(state, tuple) else state[:, None])
        expected = expected[0] if isinstance(expected, tuple) else expected  # (an LSTM's (h, c))
        torch.testing.assert_close(h.tensor[i], expected[-1, 0])


def test_packed_sequences_refusal_names_the_batched_and_bidirectional_forms():
    """``out[length - 1]`` is right for a unidirectional rnn on one unbatched sequence only: on a per-sample batch it
    indexes the batch dim (silently a (B, B, H) result), and a bidirectional run's backward half starts in the
    padding. The refusal names the batched index and the masked cell run backwards; both equal the packed rnn per
    sequence, and give the initial state (zeros) for a length of 0, which torch's packing refuses."""
    with pytest.raises(storch.PlateError) as info:
        nn.utils.rnn.pack_padded_sequence(make(rnd(3, 6, 2, 4), ("z", 3)), make(torch.tensor([[6, 1], [2, 3], [4, 4]]),
                                                                                ("z", 3)))
    msg = str(info.value)
    batched = ("batched, batch_first=False, torch.where((length > 0).unsqueeze(-1), out[(length - 1).clamp(min=0), "
               "torch.arange(B)], h0[-1])")
    assert batched in msg and "t from the end for a bidirectional rnn" in msg, msg
    gru = nn.GRU(4, 5, bidirectional=True).double()
    x, length = make(rnd(3, 6, 2, 4), ("z", 3)), make(torch.tensor([[6, 1], [0, 3], [4, 0]]), ("z", 3))
    out, _ = gru(x)
    h0 = torch.zeros(2, 5, dtype=torch.double)
    fwd = torch.where((length > 0).unsqueeze(-1), out[(length - 1).clamp(min=0), torch.arange(2)][..., :5], h0)
    cell = nn.GRUCell(4, 5).double()
    cell.weight_ih, cell.weight_hh = gru.weight_ih_l0_reverse, gru.weight_hh_l0_reverse
    cell.bias_ih, cell.bias_hh = gru.bias_ih_l0_reverse, gru.bias_hh_l0_reverse
    h = h0
    for t in reversed(range(6)):  # the masked cell, backwards: the state stays h0 in the padding
        h = torch.where((t < length).unsqueeze(-1), cell(x[t], h), h)
    for i, b in itertools.product(range(3), range(2)):
        n = length.tensor[i, b]
        if n == 0:
            torch.testing.assert_close(fwd.tensor[i, b], h0[b])
            torch.testing.assert_close(h.tensor[i, b], h0[b])
            continue
        packed = nn.utils.rnn.pack_padded_sequence(x.tensor[i, :, b:b + 1], n[None], enforce_sorted=False)
        _, expected = gru(packed)
        torch.testing.assert_close(fwd.tensor[i, b], expected[0, 0])
        torch.testing.assert_close(h.tensor[i, b], expected[1, 0])


# -- randomness -----------------------------------------------------------------------------------


def test_random_functions_draw_independently_per_plate_entry():
    torch.manual_seed(0)
    # a plate tensor that is broadcast (size 1) along plate "data"
    big = PlateTensor(torch.zeros(4, 1, 16, dtype=D), (Plate("z", 4), Plate("data", 5, True)))
    for noise in (torch.randn_like(big), torch.rand_like(big), torch.bernoulli(torch.full_like(big, 0.5)),
                  F.dropout(torch.ones_like(big), 0.5), torch.normal(big, 1.0)):
        raw = noise.tensor
        assert raw.shape == (4, 5, 16), raw.shape
        # all 20 plate entries got their own draw (16 values each: equal rows would be a shared draw)
        assert len({tuple(r.tolist()) for r in raw.reshape(20, 16)}) == 20
    x = PlateTensor(torch.zeros(4, 1, 3, dtype=D), (Plate("z", 4), Plate("data", 5, True)))
    # randn_like: per entry N(0, 1), independent: mean and variance over 20 * 3 * 200 draws
    draws = torch.stack([torch.randn_like(x).tensor for _ in range(200)])
    z_mean = draws.mean() / (1 / draws.numel() ** 0.5)
    assert abs(z_mean) < 4
    corr = torch.corrcoef(draws.reshape(200, -1).T)
    off = corr - torch.eye(60, dtype=D)
    assert off.abs().max() < 4 / 200 ** 0.5 * 1.5


def test_vmap_random_functions_draw_per_entry_of_a_broadcast_plate():
    # multinomial has no elementwise treatment (vmap): a plate dim that no operand maps (size 1 in
    # the raw storage) must still give every entry its own draw
    torch.manual_seed(0)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=D)
    p = PlateTensor(probs.expand(4, 1, 4), (Plate("z", 4), Plate("data", 5, True)))
    n = 400
    for draw in (lambda: torch.multinomial(p, n, replacement=True), lambda: dist.Categorical(probs=p).sample((n,))):
        raw = draw().tensor
        assert raw.shape == (4, 5, n), raw.shape
        assert len({tuple(r.tolist()) for r in raw.reshape(20, n)}) == 20
        # every entry draws from probs: counts within 4 standard errors
        counts = F.one_hot(raw, 4).to(D).mean(-2)
        se = (probs * (1 - probs) / n) ** 0.5
        assert ((counts - probs).abs() < 4 * se).all()


def test_tensor_new_reads_a_torch_size_as_a_shape():
    x = make(torch.zeros(2, 5, 3, dtype=D), ("data", 2))  # per sample (5, 3)
    t = torch.zeros(5, 3, dtype=D)
    for f in (lambda a: a.new(a.shape), lambda a: a.new(5, 3), lambda a: a.new(torch.Size([4])),
              lambda a: a.new([1.0, 2.0]), lambda a: a.new(())):
        out = f(x)
        assert out.shape == f(t).shape and out.dtype == D
        assert [p.name for p in out.plates] == ["data"]
    assert x.new([1.0, 2.0]).tensor.tolist() == [[1.0, 2.0]] * 2
    # the generic vmap treatment keeps a torch.Size a torch.Size too (pytree would make it a tuple)
    from storch.plates.rules.vmap import vmap_call

    assert vmap_call(torch.Tensor.new, (x, x.shape), {}).shape == (5, 3)
    # each entry has its own storage: an in-place draw is independent per entry
    u = x.new(x.shape).uniform_()
    assert not torch.equal(u.tensor[0], u.tensor[1])


def test_laplace_and_exponential_rsample_draw_per_plate_entry():
    # torch.distributions draws them with loc.new(shape).uniform_() / rate.new(shape).exponential_()
    torch.manual_seed(0)
    n = 4000
    loc = torch.tensor([[0.0, 10.0], [-5.0, 2.0], [1.0, 3.0]], dtype=D)  # per (z, data) entry
    rate = torch.tensor([[0.5, 1.0], [2.0, 4.0], [1.0, 3.0]], dtype=D)
    x = make(loc[:, :, None].expand(3, 2, n).clone(), *ZD)
    r = make(rate[:, :, None].expand(3, 2, n).clone(), *ZD)
    lap, ex = dist.Laplace(x, 2.0).rsample(), dist.Exponential(r).rsample()
    for out, oracle in ((lap, dist.Laplace(loc[0, 0].expand(n), 2.0).rsample()),
                        (ex, dist.Exponential(rate[0, 0].expand(n)).rsample())):
        assert out.shape == oracle.shape and [p.name for p in out.plates] == ["z", "data"]
        assert out.tensor.shape == (3, 2, n)
    noise = (lap.tensor - loc[:, :, None]).reshape(6, n)
    assert len({tuple(v.tolist()) for v in noise}) == 6  # no two entries share a draw
    assert len({tuple((ex.tensor * rate[:, :, None]).reshape(6, n)[i].tolist()) for i in range(6)}) == 6
    # per entry, the distribution of Laplace(loc, 2) and Exponential(rate): mean (and mean absolute
    # deviation for Laplace) within 4 standard errors of the exact values
    m = lap.tensor.mean(-1)
    assert ((m - loc).abs() < 4 * (2 * 2.0 ** 2 / n) ** 0.5).all()
    mad = (lap.tensor - loc[:, :, None]).abs().mean(-1)
    assert ((mad - 2.0).abs() < 4 * 2.0 / n ** 0.5).all()
    em = ex.tensor.mean(-1)
    assert ((em - 1 / rate).abs() < 4 / rate / n ** 0.5).all()
    # reparameterised: d sample / d loc is 1 per element
    lp = make(loc[:, :, None].expand(3, 2, 5).clone().requires_grad_(), *ZD)
    (g,) = torch.autograd.grad(dist.Laplace(lp, 2.0).rsample().tensor.sum(), lp.tensor)
    assert torch.equal(g, torch.ones_like(g))


def test_in_place_random_on_a_broadcast_plate_is_refused():
    x = PlateTensor(torch.zeros(4, 1, 3, dtype=D), (Plate("z", 4), Plate("data", 5, True)))
    with pytest.raises(storch.PlateError, match="rand_like"):
        x.uniform_()


# -- inputs and targets on one data plate ---------------------------------------------------------


def test_inputs_and_targets_on_one_data_plate():
    with storch.Graph():
        x, y = storch.denote_independent((rnd(5, 3), torch.arange(5) % 3), 0, "data")
        assert x.plates == y.plates and x.shape == (3,) and y.shape == ()
        torch.testing.assert_close(x.tensor, rnd(5, 3))
        loss = F.cross_entropy(x, y)  # pairs x[i] with y[i]
        assert loss.plates == x.plates
        torch.testing.assert_close(loss.tensor, F.cross_entropy(rnd(5, 3), torch.arange(5) % 3, reduction="none"))
    with storch.Graph():
        x = storch.denote_independent(rnd(5, 3), 0, "data")  # the single-tensor form still works
        assert x.plates[0][:3] == ("data", 5, True)


def test_mismatched_sizes_on_one_data_plate_are_an_error():
    with storch.Graph():
        with pytest.raises(storch.PlateError, match=r"sizes \[5, 4\].*same number of rows"):
            storch.denote_independent((rnd(5, 3), torch.arange(4)), 0, "data")


# -- registration ---------------------------------------------------------------------------------


def test_register_plate_handler_refuses_silent_overwrite():
    def my_op(x):
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(my_op, (x,), x)
        return x * 2

    calls = []

    @storch.register_plate_handler(my_op, note="test op")
    def handler(func, args, kwargs):
        calls.append(1)
        x = args[0]
        return PlateTensor(my_op(x.tensor), x.plates)

    x = make(rnd(3, 2), ("z", 3))
    check(my_op, x)
    assert calls and treatment_of(my_op).treatment is Treatment.HANDLER
    with pytest.raises(storch.PlateError, match="override=True"):
        storch.register_plate_handler(my_op, lambda f, a, k: None)
    storch.register_plate_handler(my_op, "vmap", override=True)
    assert treatment_of(my_op).treatment is Treatment.VMAP
    check(my_op, x)
    storch.register_plate_handler(my_op, storch.refuse("use my_op_per_sample instead"), override=True)
    with pytest.raises(storch.PlateError, match="my_op_per_sample"):
        my_op(x)


def test_a_handler_whose_result_lacks_the_plates_is_caught():
    def bad_op(x):
        if torch.overrides.has_torch_function_unary(x):
            return torch.overrides.handle_torch_function(bad_op, (x,), x)
        return x

    from storch.plates.kit import wrap

    storch.register_plate_handler(bad_op, lambda f, a, k: wrap(a[0].tensor.sum(0), a[0].plates))
    with pytest.raises(storch.PlateError, match="leading dims"):
        bad_op(make(rnd(3, 2), ("z", 3)))


# -- errors in the user's terms -------------------------------------------------------------------


def test_torch_errors_are_reraised_with_per_sample_shapes_and_plates():
    conv = nn.Conv2d(4, 2, 3).double()  # expects 4 channels
    x = make(rnd(3, 2, 3, 6, 6), *ZD)
    with pytest.raises(storch.PlateError) as info:
        conv(x)
    msg = str(info.value)
    assert "torch.conv2d" in msg and "(3, 6, 6)" in msg and "z=3" in msg and "data=2" in msg
    assert isinstance(info.value, RuntimeError)  # still the kind of error torch raised
    assert isinstance(info.value.__cause__, RuntimeError)


def test_reraised_torch_errors_have_public_names():
    """A torch error re-raised in per-sample terms is shown in the traceback by its class's name: it was
    storch.errors._PlateRuntimeError (a private name users cannot catch by) for ``torch.topk(z, k)`` with k larger
    than a sample's dim; now storch.PlateRuntimeError (and PlateIndexError, PlateTypeError), a PlateError that
    still is torch's kind of error."""
    x = make(rnd(4, 3), ("z", 4))
    with pytest.raises(storch.PlateRuntimeError, match="torch.topk failed on plate tensors") as info:
        torch.topk(x, 5)
    assert type(info.value) is storch.PlateRuntimeError and "._" not in info.typename
    with pytest.raises(storch.PlateIndexError, match="__getitem__ failed on plate tensors") as info:
        x[7]
    assert type(info.value) is storch.PlateIndexError and isinstance(info.value, IndexError)
    from storch.errors import plate_error_from

    assert type(plate_error_from(TypeError("t"), "m")) is storch.PlateTypeError
    for cls in (storch.PlateRuntimeError, storch.PlateIndexError, storch.PlateTypeError):
        assert issubclass(cls, storch.PlateError) and not cls.__name__.startswith("_") and cls.__name__ in storch.__all__


# -- gradients through every treatment ------------------------------------------------------------

GRAD_CASES = {
    "pointwise": lambda x, w: torch.tanh(x * w).sum(),
    "handler": lambda x, w: (torch.cat([x, w.expand(2, 4)], 0).softmax(-1) * x.sum(0)).sum(),
    "batch-first": lambda x, w: F.conv1d(x.unsqueeze(1), w.view(1, 1, 4), padding=1).sum(),
    "vmap": lambda x, w: torch.tensordot(x.flip(0), w.expand(2, 4), dims=([1], [1])).trace(),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_through_every_treatment_equal_a_loop(name):
    fn = GRAD_CASES[name]
    raw = rnd(3, 2, 2, 4).requires_grad_()
    w = rnd(1, 4, seed=1).requires_grad_()
    out = fn(make(raw, *ZD), w)
    total = out.tensor.sum()
    g_raw, g_w = torch.autograd.grad(total, (raw, w), create_graph=True)
    loop = sum(fn(raw[i, j], w) for i in range(3) for j in range(2))
    e_raw, e_w = torch.autograd.grad(loop, (raw, w), create_graph=True)
    torch.testing.assert_close(g_raw, e_raw)
    torch.testing.assert_close(g_w, e_w)
    # second order
    h1 = torch.autograd.grad(g_w.sum(), raw, allow_unused=True)[0]
    h2 = torch.autograd.grad(e_w.sum(), raw, allow_unused=True)[0]
    if h2 is None:
        assert h1 is None or h1.abs().max() == 0
    else:
        torch.testing.assert_close(h1, h2)


@pytest.mark.parametrize("layer", ["conv", "vmap"])
def test_second_order_surrogate_through_conv_and_vmap_is_exact(layer):
    """surrogate_loss(order=2) with `expect` (exact enumeration) equals the exact expectation's
    gradient and Hessian, computed by hand with a loop over the 2^3 outcomes."""
    torch.manual_seed(0)
    logits = rnd(3, seed=5).requires_grad_()
    w = rnd(1, 1, 3, seed=6).requires_grad_()

    def cost(z):  # z: per sample (3,) in {0, 1}
        if layer == "conv":
            h = F.conv1d(z.view(1, 3), w, padding=1).view(3)
        else:
            h = torch.tensordot(z.flip(0), w.view(3), dims=1) * z.roll(1)
        return (h.tanh() * h).sum()

    est = storch.estimator("expect", plate="z")
    with storch.Graph():
        z = est(Bernoulli(logits=logits))
        storch.add_cost(cost(z))
        loss = storch.surrogate_loss(order=2)
        g = torch.autograd.grad(loss, (logits, w), create_graph=True)
        hess = [torch.autograd.grad(g[0].sum(), (logits, w), retain_graph=True)]
    exact = 0.0
    for bits in itertools.product([0.0, 1.0], repeat=3):
        zz = torch.tensor(bits, dtype=D)
        exact = exact + Bernoulli(logits=logits).log_prob(zz).sum().exp() * cost(zz)
    torch.testing.assert_close(loss, exact)
    ge = torch.autograd.grad(exact, (logits, w), create_graph=True)
    for a, b in zip(g, ge):
        torch.testing.assert_close(a, b)
    he = torch.autograd.grad(ge[0].sum(), (logits, w))
    for a, b in zip(hess[0], he):
        torch.testing.assert_close(a, b)


def test_docs_plates_md_is_generated_from_the_table():
    import importlib.util
    import pathlib

    if not torch.__version__.startswith("2.13."):  # (the table lists the torch functions of the torch installed)
        pytest.skip(f"docs/plates.md is generated against the pinned torch 2.13 (tox.ini), not {torch.__version__}")
    root = pathlib.Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("gen_plates_doc", root / "packages/storch-core/scripts/gen_plates_doc.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = (root / "docs" / "plates.md").read_text()
    assert gen.render(text) == text, "docs/plates.md is out of date: run packages/storch-core/scripts/gen_plates_doc.py"


def test_transformer_decoder_with_memory_on_fewer_plates_equals_a_loop():
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(8, 2, 16, dropout=0.0, batch_first=True).double().eval()
    tgt = make(rnd(3, 2, 4, 8), *ZD)  # per sample (T=4, E=8), unbatched
    memory = make(rnd(2, 1, 6, 8, seed=7), ("data", 2))  # the encoder output: per data point only
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=D)
    check(lambda t, m: dec(t.unsqueeze(0), m, tgt_mask=mask, tgt_is_causal=True).squeeze(0), tgt, memory)


def test_one_argument_where_and_inferred_one_hot_are_refused():
    x = make(rnd(3, 4), ("z", 3))
    with pytest.raises(storch.PlateError, match="one argument"):
        torch.where(x > 0)  # 3 true elements would have fit the plate size: must still refuse
    check(lambda a: torch.where(a > 0, a, -a), x)
    with pytest.raises(storch.PlateError, match="num_classes"):
        F.one_hot((x > 0).long())
    check(lambda a: F.one_hot((a > 0).long(), 2), x)


def test_batch_first_fold_inside_the_batch_dim_is_contiguous():
    """RNN states fold the plates into dim 1 ((layers, N, H)); cuDNN refuses a non-contiguous state,
    so the folded operand is contiguous even when it was broadcast over a plate (stride 0)."""
    from storch.plates.rules.batch_first import _fold

    with storch.Graph():
        # the GRU decoder's case: one data point, a state shared by the samples (as on CUDA)
        h = storch.denote_independent(torch.randn(1, 1, 1, 6), 0, "data")  # plates (data=1)
        z = storch.Plate("z", 4)
        plates = (z,) + tuple(h.plates)
        folded = _fold(h, plates, 1, True)  # per sample (1, 1, 6): batch dim 1 gets 4 * 1 * 1
        assert folded.shape == (1, 4, 6) and folded.is_contiguous()


INDEX_ADD_SPELLINGS = {  # name -> (spelling, the same call as torch.index_add's (args, kwargs) of x, i, s, t)
    "function": (lambda x, i, s, t: torch.index_add(x, 0, i, s), lambda x, i, s, t: ((x, 0, i, s), {})),
    "method_alpha": (lambda x, i, s, t: x.index_add(1, i, t, alpha=2.5),
                     lambda x, i, s, t: ((x, 1, i, t), {"alpha": 2.5})),
    "keywords": (lambda x, i, s, t: torch.index_add(x, dim=-1, index=i, source=t),
                 lambda x, i, s, t: ((x, -1, i, t), {})),
    "method_keywords": (lambda x, i, s, t: x.index_add(dim=0, index=i, source=s, alpha=-1.0),
                        lambda x, i, s, t: ((x, 0, i, s), {"alpha": -1.0})),
}


@pytest.mark.parametrize("plain_input", [True, False])
@pytest.mark.parametrize("name", sorted(INDEX_ADD_SPELLINGS))
def test_index_add_with_a_sampled_index_is_a_scatter_add(monkeypatch, name, plain_input):
    """index_add with a sampled index went to vmap, where torch's batching rule loops over the batch (60x a
    scatter_add at 25.6k entries, 137 s for an order-2 enumeration check): it is a scatter_add of the index
    placed at dim now. Per entry the values equal torch's for that entry (duplicate indices sum), values and
    gradients equal the vmap path's, and the vmap path is not taken (asserted)."""
    from storch.plates.rules import indexing

    fn, call = INDEX_ADD_SPELLINGS[name]
    x = rnd(4, 5) if plain_input else make(rnd(2, 4, 5), ("data", 2))
    i = make(torch.tensor([[0, 3], [2, 2], [1, 0]]), ("z", 3))  # (a duplicate: entries sum)
    s = make(rnd(2, 3, 2, 5, seed=1).requires_grad_(True), ("r", 2), ("z", 3))
    t = make(rnd(2, 4, 2, seed=2).requires_grad_(True), ("r", 2))
    out = check(fn, x, i, s, t)
    ref = indexing.vmap_call(torch.index_add, *call(x, i, s, t))  # the path taken before
    assert out.tensor.shape == ref.tensor.shape
    torch.testing.assert_close(out.tensor, ref.tensor)
    w = torch.randn(out.tensor.shape, dtype=D, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad((out.tensor * w).sum(), [s.tensor, t.tensor], allow_unused=True)
    want = torch.autograd.grad((ref.tensor * w).sum(), [s.tensor, t.tensor], allow_unused=True)
    for g, h in zip(got, want):
        assert (g is None) == (h is None)
        if g is not None:
            torch.testing.assert_close(g, h)
    calls = []
    monkeypatch.setattr(indexing, "vmap_call", lambda *a: calls.append(a))
    fn(x, i, s, t)
    assert not calls and treatment_of(torch.index_add).treatment == Treatment.HANDLER


INDEX_FILL_SPELLINGS = {  # name -> index_fill of x at a sampled (or plain) index i with a value v
    "method": lambda x, i, v: x.index_fill(0, i, 1.5),
    "function": lambda x, i, v: torch.index_fill(x, 0, i, -2.0),
    "keywords_dim1": lambda x, i, v: torch.index_fill(x, dim=1, index=i % 3, value=0.25),
    "negative": lambda x, i, v: x.index_fill(-2, i - 4, 3.0),
    "sampled_value": lambda x, i, v: x.index_fill(0, i, v),
    "sampled_value_plain_index": lambda x, i, v: x.index_fill(1, torch.tensor([2, 0, 2]), v),
    "scalar_index": lambda x, i, v: x.index_fill(0, i[1], v),
}


@pytest.mark.parametrize("plain_input", [True, False])
@pytest.mark.parametrize("name", sorted(INDEX_FILL_SPELLINGS))
def test_index_fill_with_a_sampled_index_or_value_equals_a_loop(name, plain_input):
    """Out-of-place index_fill of a plain tensor at a sampled index (the one-hot of an attended slot) failed
    with a sample plate and a data plate both larger than 1 (torch's nested vmap of index_fill: "use
    out-of-place operators instead of index_fill_"; found by porting), and with a sampled value torch's vmap
    filled every entry with one entry's value. Values and gradients (duplicate indices: the value's gradient
    counts each position once) equal a loop over the entries."""
    fn = INDEX_FILL_SPELLINGS[name]
    xr = (rnd(4, 3) if plain_input else rnd(2, 4, 3, seed=1)).requires_grad_(True)
    x = xr if plain_input else make(xr, ("data", 2))
    i = make(torch.tensor([[[0, 3], [2, 2]], [[1, 1], [3, 0]], [[2, 0], [0, 0]]]), ("z", 3), ("data", 2))
    vr = rnd(3, 2, seed=2).requires_grad_(True)
    v = make(vr, ("z", 3), ("data", 2))
    leaves = [xr] + ([vr] if "value" in name or name == "scalar_index" else [])
    check_grads(fn, [x, i, v], leaves)
    assert treatment_of(torch.index_fill).treatment == Treatment.HANDLER


def test_index_fill_with_a_sampled_index_out_of_range_is_an_error():
    """The where of index_fill checks the index's range as torch does (scatter's error names the index)."""
    i = make(torch.tensor([[1], [4]]), ("z", 2))
    with pytest.raises((RuntimeError, IndexError), match="index 4 is out of bounds"):
        torch.zeros(4).index_fill(0, i, 1.0)
    with pytest.raises((RuntimeError, IndexError), match="index -8 is out of bounds"):
        torch.zeros(4).index_fill(0, i - 9, 1.0)


# -- out= (no rule reads it: a plain buffer got the raw plate storage, index_select/take returned the
# last plate entry's value for every entry, gather ignored out) ---------------------------------------

_TABLE = torch.arange(12., dtype=D).view(4, 3)
_IDX = torch.tensor([3, 2, 1, 3])

# name: (call with plate arguments, call for one entry k); each takes out=
_OUT_CALLS = {
    "index_select": (lambda x, i, out: torch.index_select(_TABLE, 0, i.view(1), out=out),
                     lambda k, out: torch.index_select(_TABLE, 0, _IDX[k].view(1), out=out)),
    "take": (lambda x, i, out: torch.take(_TABLE, i.view(1), out=out),
             lambda k, out: torch.take(_TABLE, _IDX[k].view(1), out=out)),
    "gather": (lambda x, i, out: torch.gather(_TABLE, 0, i.view(1, 1).expand(1, 3), out=out),
               lambda k, out: torch.gather(_TABLE, 0, _IDX[k].view(1, 1).expand(1, 3), out=out)),
    "mul": (lambda x, i, out: torch.mul(x, 2.0, out=out), lambda k, out: torch.mul(_X[k], 2.0, out=out)),
    "sigmoid": (lambda x, i, out: torch.sigmoid(x, out=out), lambda k, out: torch.sigmoid(_X[k], out=out)),
    "sum": (lambda x, i, out: torch.sum(x, 0, out=out), lambda k, out: torch.sum(_X[k], 0, out=out)),
    "cumsum": (lambda x, i, out: torch.cumsum(x, 1, out=out), lambda k, out: torch.cumsum(_X[k], 1, out=out)),
    "matmul": (lambda x, i, out: torch.matmul(x, _TABLE.T, out=out),
               lambda k, out: torch.matmul(_X[k], _TABLE.T, out=out)),
    "vector_norm": (lambda x, i, out: torch.linalg.vector_norm(x, dim=1, out=out),
                    lambda k, out: torch.linalg.vector_norm(_X[k], dim=1, out=out)),
    "normalize": (lambda x, i, out: F.normalize(x, 2.0, 1, out=out),  # a Python function: passes out=None on
                  lambda k, out: F.normalize(_X[k], 2.0, 1, out=out)),
    "max": (lambda x, i, out: torch.max(x, 1, out=out), lambda k, out: torch.max(_X[k], 1, out=out)),
    "sort": (lambda x, i, out: torch.sort(x, 1, out=out), lambda k, out: torch.sort(_X[k], 1, out=out)),
}
_X = rnd(4, 2, 3, seed=7)


def _plate_args():
    return make(_X.clone(), ("z", 4)), make(_IDX.clone(), ("z", 4))


def _as_tuple(r):
    return tuple(r) if isinstance(r, tuple) else (r,)


@pytest.mark.parametrize("name", list(_OUT_CALLS))
def test_out_a_plain_buffer_is_refused(name):
    call, one = _OUT_CALLS[name]
    x, i = _plate_args()
    bufs = tuple(torch.full(r.shape, -1.0, dtype=r.dtype) for r in _as_tuple(one(0, None)))
    kept = [b.clone() for b in bufs]
    with pytest.raises(storch.PlateError, match=r"out= a plain tensor.*Drop out= and assign the result"):
        call(x, i, bufs if len(bufs) > 1 else bufs[0])
    for b, k in zip(bufs, kept):  # nothing written
        assert torch.equal(b, k)


@pytest.mark.parametrize("name", list(_OUT_CALLS))
def test_out_a_plate_tensor_is_written_per_entry(name):
    call, one = _OUT_CALLS[name]
    x, i = _plate_args()
    expected = [_as_tuple(one(k, None)) for k in range(4)]
    bufs = tuple(make(torch.full((4, *r.shape), -1.0, dtype=r.dtype), ("z", 4)) for r in expected[0])
    got = call(x, i, bufs if len(bufs) > 1 else bufs[0])
    assert all(g is b for g, b in zip(_as_tuple(got), bufs))  # torch returns the out tensors
    if len(bufs) > 1:
        assert type(got) is type(one(0, None))  # the structseq (values, indices)
    for k in range(4):
        for b, e in zip(bufs, expected[k]):
            # a batched matmul and the per-entry one may round differently in the last bit (BLAS kernels differ
            # by CPU: failed with torch.equal on an Intel Xeon): equal up to rounding, exactly for integers
            torch.testing.assert_close(b.tensor[k], e, rtol=1e-12, atol=1e-12)
    assert type(call(x, i, None)) is type(got)  # out=None: the call without out


def test_out_a_plate_tensor_with_more_plates_and_a_plain_call():
    x = make(rnd(3, 2, seed=1), ("z", 3))
    buf = make(torch.zeros(3, 2, 2, dtype=D), ("z", 3), ("w", 2))
    assert torch.mul(x, 2.0, out=buf) is buf  # the value does not vary over w: every w entry gets it
    assert torch.equal(buf.tensor, (2 * x.tensor).unsqueeze(1).expand(3, 2, 2))
    t = rnd(2, seed=2)
    assert torch.add(t, 1.0, out=buf) is buf  # only out is a plate tensor: every entry gets the plain result
    assert torch.equal(buf.tensor, (t + 1).expand(3, 2, 2))


def test_out_a_plate_tensor_that_cannot_hold_the_result_is_refused():
    x = make(rnd(3, 2, seed=1), ("z", 3))
    with pytest.raises(storch.PlateError, match="per-sample shape"):
        torch.mul(x, 2.0, out=make(torch.zeros(3, 5, dtype=D), ("z", 3)))  # torch would resize it
    with pytest.raises(storch.PlateError, match="dtype"):
        torch.mul(x, 2.0, out=make(torch.zeros(3, 2), ("z", 3)))
    with pytest.raises(storch.PlateError, match="vary over plates"):
        torch.mul(x, 2.0, out=make(torch.zeros(2, 2, dtype=D), ("w", 2)))
    with pytest.raises(storch.PlateError, match="vary over plates"):  # a size-1 (shared) plate dim
        torch.mul(x, 2.0, out=make(torch.zeros(1, 2, dtype=D), ("z", 3)))


def test_out_a_plate_tensor_passes_the_gradient():
    w = rnd(3, 2, seed=3).requires_grad_()
    x = make(w, ("z", 3))
    buf = make(torch.zeros(3, 2, dtype=D), ("z", 3))
    torch.mul(x, x, out=buf)
    (g,) = torch.autograd.grad(buf.tensor.sum(), w)
    torch.testing.assert_close(g, 2 * w.detach())


VIEW_WRITES = {
    "diagonal": lambda y: y.diagonal().fill_(1.0),
    "tensor_split": lambda y: y.tensor_split(2)[1].fill_(1.0),
    "unfold": lambda y: y.unfold(0, 2, 2)[0].fill_(1.0),
    "hsplit": lambda y: y.hsplit(2)[1].mul_(3.0),
    "split_with_sizes": lambda y: y.split_with_sizes([1, 3])[1].add_(1.0),
    "torch.diagonal(dims)": lambda y: torch.diagonal(y, 0, 0, 1).zero_(),
}


@pytest.mark.parametrize("permuted", [False, True])
@pytest.mark.parametrize("name", VIEW_WRITES)
def test_writes_through_vmapped_views_reach_a_tensor_with_two_plates(name, permuted):
    # a view function run by vmap returns views of its operand also on two or more plates whose raw
    # storage cannot be flattened as a view (plate dims permuted, as downstream of a sample drawn
    # from parameters on a data plate): the write lands in y per entry, as in torch
    torch.manual_seed(0)
    raw = torch.randn(3, 2, 4, 4, dtype=D)
    raw = raw.transpose(0, 1) if permuted else raw.reshape(2, 3, 4, 4)
    y = make(raw, ("z", 2), ("data", 3))
    expected = raw.clone()
    for i, j in itertools.product(range(2), range(3)):
        VIEW_WRITES[name](expected[i, j])
    VIEW_WRITES[name](y)
    assert torch.equal(y.tensor, expected)


def test_reads_through_vmapped_views_of_a_permuted_two_plate_tensor_are_unchanged():
    torch.manual_seed(1)
    raw = torch.randn(3, 2, 4, 4, dtype=D).transpose(0, 1)
    y = make(raw, ("z", 2), ("data", 3))
    for fn in (lambda v: v.diagonal() * 2, lambda v: v.tensor_split(2)[1].exp(), lambda v: v.unfold(0, 2, 2).sum(-1)):
        check(fn, y)
    assert torch.equal(y.tensor, raw)


@pytest.mark.parametrize("layout, vmaps", [("contiguous", 1), ("size-1 plate, any stride", 1), ("permuted", 2)])
def test_vmap_over_two_plates_flattens_them_only_where_that_is_a_view(layout, vmaps, monkeypatch):
    # one vmap over the flattened plates where the raw storage allows a view, nested vmaps where it does
    # not (decided from the strides: trying the view raised RuntimeError eagerly but ValueError on
    # storch.compile's fake tensors, which escaped as a PlateError)
    raw = {"contiguous": rnd(2, 3, 4), "size-1 plate, any stride": rnd(3, 1, 4).transpose(0, 1),
           "permuted": rnd(3, 2, 4).transpose(0, 1)}[layout]
    y = make(raw, *((("z", 1), ("data", 3)) if raw.shape[0] == 1 else (("z", 2), ("data", 3))))
    import storch.plates.rules.vmap as vmap_rule

    calls = []
    vmap = vmap_rule.flat_vmap  # (torch.func.vmap's own flattening, without its pytree cycles: issue 19)
    monkeypatch.setattr(vmap_rule, "flat_vmap", lambda *a, **k: calls.append(1) or vmap(*a, **k))
    check(lambda v: torch.flip(v, [0]), y)
    assert len(calls) == vmaps


def test_index_add_with_a_sampled_index_and_a_mismatched_source_is_torchs_error():
    """Per sample torch refuses a source whose dims other than dim differ from the input's; the scatter_add
    rewrite filled part of the input instead (found by a reviewer): such calls go to torch per sample."""
    i = make(torch.tensor([[0, 3, 1], [2, 2, 4]]), ("z", 2))
    with pytest.raises(RuntimeError, match="source tensor shape must match"):
        torch.index_add(rnd(5, 4), 0, i, rnd(3, 2))
    with pytest.raises(RuntimeError):
        torch.index_add(rnd(5, 4), 0, i, rnd(2, 4))  # (the index and the source disagree on dim)


# -- argument forms a property tester found (axis=, input=, dim=(), implicit dims, sampled 0-dim indices) --


def check_grad(fn, *inputs, grad_as=None):
    """``check`` (values per plate entry) and the gradients: of a weighted sum of storch's result and of
    the same weighted sum of the per-entry results (of ``grad_as`` where given), for every input (raw
    plate storage or plain) that requires grad."""
    out = check(fn, *inputs)
    fn = grad_as or fn
    leaves = [x.tensor if type(x) is PlateTensor else x for x in inputs]
    leaves = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    plates = {}
    for x in inputs:
        if type(x) is PlateTensor:
            plates.update({p.name: p.size for p in x.plates})
    got = want = 0
    for n, idx in enumerate(itertools.product(*[range(s) for s in plates.values()])):
        a = dict(zip(plates, idx))
        c = 1.0 + 0.25 * n  # a different weight per entry: a gradient that mixes entries shows
        for o, e in zip(tree_flatten(out)[0], tree_flatten(fn(*[entry(x, a) for x in inputs]))[0]):
            if isinstance(e, torch.Tensor) and e.is_floating_point():
                got = got + c * entry(o, a).sum()
                want = want + c * e.sum()
    assert leaves and torch.is_tensor(got)
    for g, w, leaf in zip(torch.autograd.grad(got, leaves, allow_unused=True),
                          torch.autograd.grad(want, leaves, allow_unused=True), leaves):
        zero = torch.zeros_like(leaf)
        torch.testing.assert_close(zero if g is None else g, zero if w is None else w, equal_nan=True)
    return out


def _leaf(*shape, seed=0):
    return rnd(*shape, seed=seed).requires_grad_()


CAT_AXIS = {  # torch's numpy alias axis= for dim (it was ignored: always per-sample dim 0)
    "cat": lambda x, y, w: torch.cat([x, y], axis=1),
    "concat_plain": lambda x, y, w: torch.concat([x, w], axis=-1),
    "concatenate_plain_first": lambda x, y, w: torch.concatenate([w, y], axis=1),
    "cat_tensors_kw": lambda x, y, w: torch.cat(tensors=[x, y], axis=0),
    "stack": lambda x, y, w: torch.stack([x, y], axis=2),
}


@pytest.mark.parametrize("name", sorted(CAT_AXIS))
def test_cat_with_axis_equals_a_loop(name):
    x = make(_leaf(3, 2, 4, 3), *ZD)
    y = make(_leaf(3, 4, 3, seed=1), ("z", 3))
    check_grad(CAT_AXIS[name], x, y, _leaf(4, 3, seed=2))
    check_grad(CAT_AXIS[name], x, x, _leaf(4, 3, seed=2))  # (the same plates: the fast path's condition)


def test_cat_skips_a_legacy_empty_tensor_whatever_the_samples_rank():
    """`out = torch.tensor([])` then `out = torch.cat([out, row[None]])`: torch skips a 1-d empty tensor
    (its dtype is still promoted); the raw call counted plate dims and refused."""
    x = make(_leaf(3, 4, 3), ("z", 3))

    def accumulate(x, empty):
        out = empty
        for t in range(2):
            out = torch.cat([out, x[t].unsqueeze(0)])
        return out

    check_grad(lambda x: accumulate(x, torch.tensor([], dtype=D)), x)
    ints = make(torch.arange(24).reshape(3, 2, 4), ("z", 3))
    out = check(lambda i: torch.cat([torch.tensor([], dtype=D), i, i]), ints)
    assert out.dtype == D  # the skipped tensor's dtype takes part in the promotion, as in torch
    empty = make(torch.zeros(3, 0, dtype=D), ("z", 3))  # a sampled (0,) among matrices: skipped too
    check_grad(lambda e, x: torch.cat([e, x, e], 1), empty, x)
    check(lambda e: torch.cat([e, e]), empty)  # only empties: concatenated as they are
    with pytest.raises(RuntimeError, match="same number of dimensions: got 1 and 2"):  # per-sample ranks
        torch.cat([x, make(rnd(3, 3), ("z", 3))])


INDEX_SELECT_SAMPLED = {  # (fn, per-sample index shape)
    "method_0d": (lambda t, i: t.index_select(0, i), ()),
    "torch_0d": (lambda t, i: torch.index_select(t, 0, i), ()),
    "keywords_0d": (lambda t, i: torch.index_select(t, dim=0, index=i), ()),
    "input_kw_dim1_0d": (lambda t, i: torch.index_select(input=t, dim=1, index=i), ()),
    "negative_dim_0d": (lambda t, i: t.index_select(-1, i), ()),
    "vector": (lambda t, i: t.index_select(0, i), (3,)),
    "vector_dim1": (lambda t, i: t.index_select(dim=1, index=i), (3,)),
    "int32": (lambda t, i: t.index_select(1, i.int()), (2,)),
    "empty": (lambda t, i: t.index_select(1, i[:0]), (2,)),
}


@pytest.mark.parametrize("table", ["plain", "sampled", "same plates"])
@pytest.mark.parametrize("name", sorted(INDEX_SELECT_SAMPLED))
def test_index_select_with_a_sampled_0d_or_1d_index_equals_a_loop(name, table):
    """A sampled 0-dim index (a Categorical sample) selects one row per sample, shape (1, E); vmap's
    rule returned the whole table per sample."""
    fn, shape = INDEX_SELECT_SAMPLED[name]
    raw = torch.randint(0, 4, (3, *shape), generator=torch.Generator().manual_seed(3))
    i = make(raw, ("z", 3))
    t = {"plain": lambda: _leaf(4, 5), "sampled": lambda: make(_leaf(2, 4, 5), ("data", 2)),
         "same plates": lambda: make(_leaf(3, 4, 5), ("z", 3))}[table]()
    check_grad(fn, t, i)


def test_index_select_with_a_sampled_index_keeps_torchs_checks():
    a = make(torch.tensor([0, 3, 1]), ("z", 3))
    x0 = make(_leaf(2), ("data", 2))  # 0-dim samples: an index of one element, 0
    check_grad(lambda x, i: x.index_select(0, i * 0), x0, a)
    check_grad(lambda x, i: x.index_select(-1, (i * 0).unsqueeze(0)), x0, a)
    table = rnd(4, 5)
    with pytest.raises(IndexError, match="index out of range in self"):
        table.index_select(0, a + 1)  # 4 is out of range for one of the samples
    with pytest.raises(IndexError, match="index out of range in self"):
        table.index_select(0, a - 1)  # torch's index_select does not wrap -1
    with pytest.raises(IndexError, match=r"range of \[-2, 1\], but got 2"):
        table.index_select(2, a)
    with pytest.raises(IndexError, match="supposed to be a vector"):
        table.index_select(0, a.view(1, 1))
    with pytest.raises(RuntimeError, match="int32 or int64"):
        table.index_select(0, a.float())
    with pytest.raises(IndexError, match="only 1 value, got 2"):
        x0.index_select(0, torch.stack([a, a], -1) * 0)


EMPTY_DIMS = {  # torch: an empty dim list reduces every dim of the sample (all/any: none)
    "sum_tuple": lambda x: x.sum(dim=()),
    "sum_list": lambda x: x.sum(dim=[]),
    "torch_sum_positional": lambda x: torch.sum(x, ()),
    "sum_keepdim": lambda x: x.sum((), keepdim=True),
    "mean_list": lambda x: x.mean(dim=[]),
    "amax": lambda x: x.amax(dim=()),
    "amin_keepdim": lambda x: torch.amin(x, (), True),
    "nansum": lambda x: x.nansum(()),
    "nanmean": lambda x: torch.nanmean(x, dim=[]),
    "std": lambda x: x.std(dim=()),
    "var_correction": lambda x: torch.var(x, dim=[], correction=0),
    "logsumexp_keepdim": lambda x: torch.logsumexp(x, (), keepdim=True),
    "norm": lambda x: x.norm(2, ()),
    "norm_fro": lambda x: torch.norm(x, dim=()),
    "vector_norm": lambda x: torch.linalg.vector_norm(x, 3, dim=[]),
    "count_nonzero": lambda x: (x * (x > 0)).count_nonzero(()) * x.sum(0).sum(),
    "all_any": lambda x: (x > 0).all(dim=()) * x + (x < 0).any(dim=[]) * x,
}


EMPTY_DIMS_GRAD_AS = {"std": lambda x: x.std(), "var_correction": lambda x: torch.var(x, correction=0)}


@pytest.mark.parametrize("name", sorted(EMPTY_DIMS))
def test_an_empty_dim_list_reduces_as_torch_does_per_sample(name):
    """sum(dim=()) summed the plate dims too: a PlateTensor of raw shape () that still claimed plates."""
    x = make(_leaf(3, 2, 4, 3), *ZD)
    # torch's own backward of std/var(dim=()) is not the derivative of its value (it reads the empty list
    # as no dims: a gradient N times too large, or inf): compared with std/var over all dims instead
    grad_as = EMPTY_DIMS_GRAD_AS.get(name)
    out = check_grad(EMPTY_DIMS[name], x, grad_as=grad_as)
    assert out.tensor.shape[:2] == (3, 2)
    if grad_as is None:  # 0-dim samples (std and var of one element: nan)
        check_grad(EMPTY_DIMS[name], make(_leaf(3, 2, seed=1), *ZD))


def test_repeated_dims_are_refused_in_per_sample_dims():
    x = make(rnd(3, 1, 4, 1), ("z", 3))
    with pytest.raises(RuntimeError, match="dim 0 appears multiple times"):  # the raw call said dim 1
        x.squeeze((0, -3))
    with pytest.raises(RuntimeError, match="dim 2 appears multiple times"):
        x.sum((2, -1))
    check(lambda x: x.squeeze((0, -1)) + x.sum((0, 2)), x)


KEYWORD_FORMS = {  # keyword and numpy-alias spellings torch accepts (each raised on plate tensors)
    "sum_axis": lambda x: x.sum(axis=1),
    "mean_axis_keepdims": lambda x: torch.mean(x, axis=0, keepdims=True),
    "max_axis": lambda x: x.max(axis=-1).values,
    "std_axis": lambda x: x.std(axis=0),
    "argmax_axis": lambda x: x.argmax(axis=1) * x.sum(1),
    "cumsum_axis": lambda x: x.cumsum(axis=1),
    "logsumexp_axis": lambda x: torch.logsumexp(x, axis=0),
    "squeeze_axis": lambda x: x[:, :1].squeeze(axis=1),
    "flatten_input": lambda x: torch.flatten(input=x, start_dim=0),
    "reshape_input": lambda x: torch.reshape(input=x, shape=(-1,)),
    "matmul_input": lambda x: torch.matmul(input=x, other=x.mT),
    "matmul_other_kw": lambda x: torch.matmul(x, other=x[0]),
    "mm_input": lambda x: torch.mm(input=x, mat2=x.t()),
    "mv_input": lambda x: torch.mv(input=x, vec=x[0]),
    "linear_input": lambda x: F.linear(input=x, weight=x, bias=x[:, 0]),
    "linear_plain_weight": lambda x: F.linear(input=x, weight=torch.ones(2, 3, dtype=D)),
    "swapaxes_axis": lambda x: torch.swapaxes(x, axis0=0, axis1=1),
    "swapaxes_method_axis": lambda x: x.swapaxes(axis0=-1, axis1=0),
    "swapdims_dims": lambda x: torch.swapdims(x, dim0=0, dim1=1),
    "transpose_mixed": lambda x: torch.transpose(x, 0, dim1=1),
    "transpose_input": lambda x: torch.transpose(input=x, dim0=1, dim1=0),
    "movedim_kw": lambda x: torch.movedim(x, source=0, destination=1),
    "moveaxis_kw": lambda x: x.moveaxis(source=-1, destination=0),
    "permute_input": lambda x: torch.permute(input=x, dims=(1, 0)),
    "unflatten_input": lambda x: torch.unflatten(input=x, dim=1, sizes=(3, 1)),
    "squeeze_input": lambda x: torch.squeeze(input=x[None]),
}


@pytest.mark.parametrize("name", sorted(KEYWORD_FORMS))
def test_keyword_and_axis_forms_equal_a_loop(name):
    check_grad(KEYWORD_FORMS[name], make(_leaf(3, 2, 4, 3), *ZD))


IMPLICIT_SOFTMAX = {
    "softmax": lambda x: F.softmax(x),
    "log_softmax": lambda x: F.log_softmax(x),
    "softmin": lambda x: F.softmin(x),
    "nn.Softmax": nn.Softmax(),
    "nn.LogSoftmax": nn.LogSoftmax(),
    "dtype_kw": lambda x: F.softmax(x, dtype=torch.float32).double(),
}


@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 4, 3)])
@pytest.mark.parametrize("name", sorted(IMPLICIT_SOFTMAX))
def test_implicit_softmax_dim_is_torchs_of_the_per_sample_rank(name, shape):
    """F.softmax(x) passes dim=None on: it raised "needs an explicit dim"; torch's rule (dim 0 for
    ranks 0, 1 and 3, else 1) reads the per-sample rank, and torch's deprecation warning is kept."""
    x = make(_leaf(3, 2, *shape), *ZD)
    with pytest.warns(UserWarning, match="Implicit dimension choice") as rec:
        out = IMPLICIT_SOFTMAX[name](x)
    assert rec[0].filename == __file__ or name.startswith("nn.")  # attributed to the caller
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        check_grad(IMPLICIT_SOFTMAX[name], x)
    assert out.shape == shape


def test_masked_fill_with_a_per_sample_0d_value_equals_a_loop():
    """Per sample the value is 0-dim; on the raw tensors it has the plate dims, which masked_fill refused."""
    x = make(_leaf(3, 2, 4, 3), *ZD)
    s = make(_leaf(3, seed=1), ("z", 3))
    check_grad(lambda x: x.masked_fill(x > 0, x.sum()), x)
    check_grad(lambda x, s: torch.masked_fill(x, x < 0, s), x, s)
    check_grad(lambda x, s: x.masked_fill(mask=torch.tensor([True, False, True]), value=s), x, s)
    check_grad(lambda w, s: w.masked_fill(w > 0, s), _leaf(4, 3, seed=2), s)  # a plain input
    check(lambda s: torch.zeros(2, 3, dtype=torch.long).masked_fill(torch.tensor([True, False, True]), s * 3),
          make(rnd(3, seed=1), ("z", 3)))  # the value cast to the input's dtype

    def inplace(x, s):
        y = x * 1
        y.masked_fill_(y > 0, s)
        return y

    check_grad(inplace, x, s)
    with pytest.raises(storch.PlateError, match="vary over plates"):
        inplace(s, x.sum(-1).sum(-1))  # the value varies over data, which the written tensor lacks
    with pytest.raises(RuntimeError, match="0-dimensional value tensor, but got tensor with 1 dimension"):
        x.masked_fill(x > 0, x[0])
