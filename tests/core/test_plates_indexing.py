"""Indexing and index assignment with plate tensors anywhere in the index (issue 20).

The oracle is torch on one sample: per plate entry, ``x[idx]`` (and ``x[idx] = v``) on plate
tensors equals ``x_e[idx_e]`` on that entry's tensors. A hypothesis property test generates index
expressions (ints, slices, None, Ellipsis, lists, plain and boolean tensors, plate tensors with
their own plates) over shapes and plate layouts, reading and writing; then the 17 everyday
patterns of the issue, written as users write them.
"""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import storch
from storch.plates.tensor import union_plates
from storch import Plate, PlateTensor

A, B = Plate("a", 2, True), Plate("b", 3, True)
PLATES = (A, B)
COUNT = {"read": 0, "write": 0, "refused": 0, "plate index not first": 0, "several plate indices": 0}


def entry(v, e):
    """The value of ``v`` at plate entry ``e`` ({name: index})."""
    if not isinstance(v, PlateTensor):
        return v
    r = v.tensor
    for p in v.plates:
        r = r[0] if r.shape[0] == 1 else r[e.get(p.name, 0)]  # a plate the result lacks: unused
    return r


def entries(plates):
    for idx in itertools.product(*[range(p.size) for p in plates]):
        yield dict(zip([p.name for p in plates], idx))


def at(idx, e):
    return tuple([entry(v, e) for v in i] if isinstance(i, list) else entry(i, e) for i in idx)


@st.composite
def plate_layout(draw, nonempty=False):
    chosen = draw(st.lists(st.sampled_from(PLATES), unique=True, min_size=1 if nonempty else 0, max_size=2))
    return tuple(chosen)


def plate_index(draw, size, plates, shape):
    raw = torch.tensor(draw(st.lists(st.integers(-size, size - 1), min_size=math.prod(plate.size for plate in plates) * math.prod(shape),
                                     max_size=math.prod(plate.size for plate in plates) * math.prod(shape))), dtype=torch.long)
    return PlateTensor(raw.reshape(tuple(p.size for p in plates) + shape), plates)


@st.composite
def expressions(draw):
    """(x, idx): a plate (or plain) tensor and a per-sample index tuple with at least one plate tensor
    somewhere unless x is a plate tensor."""
    x_plates = draw(plate_layout())
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    tshape = draw(st.sampled_from([(), (2,), (1, 2)]))  # the per-sample shape of tensor indices
    idx = []
    for d, size in enumerate(shape):
        if d > 0 and not draw(st.integers(0, 3)):
            break  # fewer indices than dims
        kind = draw(st.sampled_from(["int", "slice", "slice", "plate", "plate", "plate", "plate", "tensor", "list", "mask", "none"]))
        if kind == "none":
            idx.append(None)
            kind = draw(st.sampled_from(["int", "slice", "plate"]))
        if kind == "int":
            idx.append(draw(st.integers(-size, size - 1)))
        elif kind == "slice":
            start = draw(st.none() | st.integers(-size, size))
            stop = draw(st.none() | st.integers(-size, size))
            idx.append(slice(start, stop, draw(st.sampled_from([None, 1, 2]))))
        elif kind == "plate":
            idx.append(plate_index(draw, size, draw(plate_layout(nonempty=True)), tshape))
        elif kind == "tensor":
            n = math.prod(tshape)
            idx.append(torch.tensor(draw(st.lists(st.integers(-size, size - 1), min_size=n, max_size=n))).reshape(tshape))
        elif kind == "list":
            n = tshape[-1] if tshape else 1
            idx.append(draw(st.lists(st.integers(-size, size - 1), min_size=n, max_size=n)))
        else:  # a plain boolean mask over this dim, with as many True as the tensor indices broadcast to
            k = min(size, tshape[-1] if tshape else 1)
            on = draw(st.lists(st.integers(0, size - 1), min_size=k, max_size=k, unique=True))
            idx.append(torch.zeros(size, dtype=torch.bool).index_fill(0, torch.tensor(on, dtype=torch.long), True))
    if draw(st.booleans()):  # an Ellipsis somewhere, standing for the dims not indexed
        idx.insert(draw(st.integers(0, len(idx))), Ellipsis)
    if draw(st.integers(0, 4)) == 0:
        idx.append(None)
    if not x_plates and not any(isinstance(i, PlateTensor) for i in idx):
        idx.insert(0, plate_index(draw, shape[0], draw(plate_layout(nonempty=True)), ()))
        shape = (shape[0],) + shape
    # a plate dim may be held once (size 1: the same value for every entry of that plate)
    raw = torch.randn(tuple(1 if draw(st.integers(0, 5)) == 0 else p.size for p in x_plates) + shape,
                      dtype=torch.float64)
    x = PlateTensor(raw, x_plates) if x_plates else raw
    masks = [i for i in idx if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
    tensors = [i for i in idx if isinstance(i, (torch.Tensor, list)) and not (isinstance(i, torch.Tensor) and i.dtype == torch.bool)]
    if len(masks) > 1 or (masks and any(m.sum() != (tshape[-1] if tshape else 1) and m.sum() != 1 for m in masks)):
        idx = [i for i in idx if not (isinstance(i, torch.Tensor) and i.dtype == torch.bool)] or [slice(None)]
    del tensors
    return x, tuple(idx)


def _reference(x, idx, e):
    try:
        return entry(x, e)[at(idx, e)], None
    except (IndexError, RuntimeError) as err:
        return None, err


@settings(max_examples=1500, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(expressions(), st.data())
def test_indexing_matches_a_per_sample_loop(expr, data):
    x, idx = expr
    plates = union_plates([x.plates if isinstance(x, PlateTensor) else ()] +
                                         [i.plates for i in idx if isinstance(i, PlateTensor)])
    refs = {tuple(e.values()): _reference(x, idx, e) for e in entries(plates)}
    if any(err is not None for _, err in refs.values()):  # not a valid index for one sample: torch's error
        with pytest.raises((IndexError, RuntimeError)):
            x[idx]
        return
    out = x[idx]
    COUNT["read"] += 1
    where = [j for j, i in enumerate(idx) if isinstance(i, PlateTensor)]
    COUNT["plate index not first"] += bool(where and where[-1] > 0)
    COUNT["several plate indices"] += len(where) > 1
    assert isinstance(out, PlateTensor) and out.plates == plates
    for (key, (ref, _)), e in zip(refs.items(), entries(plates)):
        got = entry(out, e)
        assert got.shape == ref.shape and torch.equal(got, ref), (idx, key)
    # writing: x[idx] = value, value a scalar or a plate tensor of the per-sample result shape
    if not isinstance(x, PlateTensor):
        with pytest.raises(storch.PlateError, match="one_hot"):
            x[idx] = 1.0
        COUNT["refused"] += 1
        return
    if plates != x.plates:
        with pytest.raises(storch.PlateError, match="does not vary"):
            x.clone()[idx] = 1.0
        COUNT["refused"] += 1
        return
    ref_shape = next(iter(refs.values()))[0].shape
    # positions written twice (repeated indices) get one value per sample: no order ambiguity
    positions = {k: torch.arange(entry(x, e).numel()).reshape(entry(x, e).shape)[at(idx, e)] for k, e in
                 zip(refs, entries(plates))}
    repeated = any(p.unique().numel() != p.numel() for p in positions.values())
    vplates = tuple(p for p in x.plates if data.draw(st.booleans()))
    vshape = () if repeated else ref_shape[data.draw(st.integers(0, len(ref_shape))):]
    value = PlateTensor(torch.randn(tuple(p.size for p in vplates) + tuple(vshape), dtype=torch.float64), vplates) \
        if vplates else data.draw(st.sampled_from([-1.5, torch.randn(vshape, dtype=torch.float64)]))
    y = x.clone()
    short = {p.name for j, p in enumerate(x.plates) if x.tensor.shape[j] != p.size}
    varies = {p.name for a in idx + (value,) if isinstance(a, PlateTensor) for j, p in enumerate(a.plates)
              if a.tensor.shape[j] > 1}
    if short & varies:  # per-entry writes into a value held once: refused, never a silent write
        with pytest.raises(storch.PlateError, match="does not vary"):
            y[idx] = value
        COUNT["refused"] += 1
        return
    y[idx] = value
    COUNT["write"] += 1
    for key, e in zip(refs, entries(plates)):
        want = entry(x, e).clone()
        want[at(idx, e)] = entry(value, e)
        assert torch.equal(entry(y, e), want), (idx, key)


def test_generated_expression_count():
    """The property test above ran (in this session) on >= 2000 index expressions with 0 mismatches."""
    if COUNT["read"] == 0:
        pytest.skip("run together with test_indexing_matches_a_per_sample_loop")
    print(f"generated index expressions: {COUNT}")
    assert COUNT["read"] + COUNT["write"] >= 2000, COUNT


# -- the 17 everyday patterns (issue 20), as users write them ---------------------------------------

def _check(fn, *args):
    out = fn(*args)
    plates = out.plates
    for e in entries(plates):
        ref = fn(*[entry(a, e) for a in args])
        got = out.tensor[tuple(e.values())]
        assert got.shape == ref.shape and torch.allclose(got, ref), (e, got, ref)
    return out


S_, A_ = Plate("s", 4), Plate("act", 3)


def _sampled(values, plate):
    return PlateTensor(torch.tensor(values), (plate,))


PATTERNS = {
    "Q[i]": lambda Q, s, a, x, h: Q[s],
    "Q[s, a]": lambda Q, s, a, x, h: Q[s, a],
    "x[:, j]": lambda Q, s, a, x, h: x[:, a],
    "x[..., j]": lambda Q, s, a, x, h: x[..., a],
    "x[0, j]": lambda Q, s, a, x, h: x[0, a],
    "B[i, :, j]": lambda Q, s, a, x, h: h[s, :, a],
    "v[[0, 2], j]": lambda Q, s, a, x, h: x[[0, 2], a],
    "Q[i, j]": lambda Q, s, a, x, h: Q[s, s % 3],
    "h[:, idx]": lambda Q, s, a, x, h: h[:, :, a],
    "P[s, a] (plate P)": lambda Q, s, a, x, h: (Q * x[0, 0])[s, a],
    "gather": lambda Q, s, a, x, h: Q.gather(0, s.view(1, 1).expand(1, 3)),
    "index_select": lambda Q, s, a, x, h: Q.index_select(0, s.unsqueeze(0)),
    "embedding": lambda Q, s, a, x, h: F.embedding(s, Q),
    "one_hot @ Q": lambda Q, s, a, x, h: F.one_hot(s, 4).to(Q.dtype) @ Q,
    "torch.where": lambda Q, s, a, x, h: torch.where(F.one_hot(a, 3).bool(), Q[0], 0.0),
    "x[j, ...]": lambda Q, s, a, x, h: h[s, ...],
    "Q[s][a]": lambda Q, s, a, x, h: Q[s][a],
}


@pytest.mark.parametrize("name", list(PATTERNS))
def test_everyday_indexing_patterns(name):
    torch.manual_seed(0)
    Q = torch.randn(4, 3, dtype=torch.float64)
    s = _sampled([0, 3, 1, 3], S_)
    a = _sampled([2, 0, 1], A_)
    x = PlateTensor(torch.randn(2, 3, 3, dtype=torch.float64), (Plate("data", 2, True),))
    h = torch.randn(4, 5, 3, dtype=torch.float64)
    _check(PATTERNS[name], Q, s, a, x, h)


def test_everyday_assignment_patterns():
    """Index assignment into a plate tensor with sampled indices: x[:, j] = v, Q[s, a] += 1,
    visited[a] = True on a per-sample tensor."""
    s = _sampled([0, 3, 1, 3], S_)
    a = _sampled([2, 0, 1], A_)
    visited = torch.zeros(3, dtype=torch.bool) | (a < 0)  # a plate tensor on a's plate
    visited[a] = True
    assert visited.tensor.tolist() == F.one_hot(a.tensor, 3).bool().tolist()
    x = torch.zeros(2, 3, dtype=torch.float64) + 0 * a  # plates (act,)
    x[:, a] = 1.0
    assert (x.tensor.sum((1, 2)) == 2).all() and (x.tensor[torch.arange(3), :, a.tensor] == 1).all()
    Q = torch.zeros(4, 3, dtype=torch.float64) + 0 * s + 0 * a.unsqueeze(-1).unsqueeze(-1).double().sum((-1, -2))
    Q[s, a] += 1.0
    assert Q.tensor.sum((-1, -2)).eq(1).all()
    plain = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(storch.PlateError, match=r"visited \| F\.one_hot\(a, n\)\.bool\(\)"):
        plain[a] = True


# -- masked assignment with a per-sample mask: x[mask] = value -------------------------------------


def _mask_cases(K, H, x, z):
    """(name, mask, value) as one-sample code writes them: x per sample (K, H), z per sample ()."""
    row = torch.arange(K) != z  # selects K - 1 rows in every entry
    return {
        "h[row_mask] = 0.": (row, 0.0),
        "h[row_mask] = per-sample scalar": (row, z.double() + 100),
        "h[row_mask] = per-sample row": (row, x[0] * 10),
        "h[row_mask] = plain row": (row, torch.arange(H, dtype=torch.float64)),
        "h[row_mask] = one row per selected row (plain)": (row, torch.arange((K - 1) * H, dtype=torch.float64).view(K - 1, H)),
        "h[row_mask] = one row per selected row (sampled)": (row, x[1:] * z.double()),
        "h[row_mask] = (1, 1, H) value": (row, (x[0] - z).view(1, 1, H)),
        "h[full_mask] = per-sample scalar": (x > 0, z.double() + 100),
        "h[full_mask] = plain scalar tensor": (x > 0, torch.tensor(7.0, dtype=torch.float64)),
    }


@pytest.mark.parametrize("sizes", [(3, 3, 3, 3), (3, 2, 4, 5)], ids=["plates equal per-sample sizes", "all differ"])
def test_masked_assignment_matches_a_per_sample_loop(sizes):
    """`y[mask] = value` with a sampled mask: per plate entry what torch does for that entry (the mask of
    y's leading per-sample dims; the value broadcast as torch allows). The mask and value used to be aligned
    to the plates without padding the per-sample dims: wrong in every entry where plate sizes equal per-sample
    sizes, torch's expand error otherwise."""
    Z, D, K, H = sizes
    torch.manual_seed(0)
    zp, dp = Plate("z", Z), Plate("data", D, True)
    x = PlateTensor(torch.randn(D, K, H, dtype=torch.float64), (dp,))
    z = PlateTensor(torch.randint(0, K, (Z, D)), (zp, dp))
    for name, (mask, value) in _mask_cases(K, H, x, z).items():
        h = x + 0 * z.double().unsqueeze(-1).unsqueeze(-1) + 1.0  # (K, H) on (z, data)
        h[mask] = value
        for e in entries((zp, dp)):
            ref = entry(x, e) + 1.0
            ref[entry(mask, e)] = entry(value, e)
            assert torch.equal(entry(h, e), ref), (name, e)


def test_masked_assignment_refuses_what_has_no_per_sample_answer():
    zp, dp = Plate("z", 3), Plate("data", 2, True)
    torch.manual_seed(1)
    x = PlateTensor(torch.randn(2, 4, 5), (dp,))
    z = PlateTensor(torch.tensor([[0, 1], [2, 3], [1, 1]]), (zp, dp))
    h = x + 0 * z.float().unsqueeze(-1).unsqueeze(-1)
    # one row per selected row, but the number selected depends on the sample
    with pytest.raises(storch.PlateError, match=r"numbers selected differ by sample .*torch\.where"):
        h[torch.arange(4) < z] = torch.ones(2, 5)
    with pytest.raises(IndexError, match="shape of the mask"):
        h[torch.arange(5) < z] = 0.0
    with pytest.raises(storch.PlateError, match=r"per-sample shape \[4, 1\] .*\[number selected\]"):
        h[x > 0] = x[:, :1]  # torch refuses it for one sample too
    # the tensor assigned into does not vary over the mask's plates: the message of scores[a] = ... (it
    # said "plates ['a'] are not among ('data',)")
    scores = x.sum(-1)  # (4,) on data only
    visited = F.one_hot(z, 4).bool()  # (4,) on (z, data)
    with pytest.raises(storch.PlateError, match=r"varies over plates \['z'\].*cannot become one value per sample"):
        scores[visited] = float("-inf")


def test_masked_assignment_of_a_sampled_value_gives_the_exact_gradient():
    """The tester's case: `y[arange(K) != z] = v` with v a per-sample scalar of z and the data, enumerated
    exactly by `expect`: value and gradient equal the enumeration (they were wrong in every entry)."""
    K, D = 3, 3
    theta = torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64, requires_grad=True)
    X = torch.arange(9, dtype=torch.float64).view(D, K)
    R = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)

    def exact(th):
        p = torch.softmax(th, 0)
        return sum(p[k] * (K - 1) * (R[k] + X[d].sum()) for d in range(D) for k in range(K)) / D

    est = storch.estimator("expect", plate="z")
    with storch.Graph():
        x = storch.denote_independent(X, 0, "data")
        z = est(torch.distributions.Categorical(logits=theta))
        v = R[z] + x.sum()
        y = torch.zeros(K, dtype=torch.float64) * v
        y[torch.arange(K) != z] = v
        storch.add_cost(y.sum(), name="c")
        loss = storch.surrogate_loss()
        g = torch.autograd.grad(loss, theta)[0]
    ex = exact(theta)
    assert torch.allclose(loss, ex)
    assert torch.allclose(g, torch.autograd.grad(ex, theta)[0])


# -- select, roll, repeat_interleave with a sampled argument ---------------------------------------


def test_select_with_a_sampled_index_is_indexing():
    """torch.select(x, d, i) with a sampled i is x[..., i] at d (it failed with vmap's '.item()' text)."""
    a = _sampled([2, 0, 1], A_)
    x = PlateTensor(torch.randn(2, 3, 4, dtype=torch.float64), (Plate("data", 2, True),))
    _check(lambda x, a: torch.select(x, 0, a), x, a)
    _check(lambda x, a: x.select(1, a), x, a)
    _check(lambda x, a: torch.select(x, -2, a), x, a)
    _check(lambda x, a: torch.select(x, dim=1, index=a), x, a)
    assert torch.equal(torch.select(x, 1, 2).tensor, x.tensor[:, :, 2])  # an int index: as before
    with pytest.raises(storch.PlateError, match="where torch takes a Python number"):
        torch.select(torch.randn(3), 0, a)  # torch's parser reads the int itself, below storch's handlers


def test_select_and_slice_scatter_at_a_sampled_index_name_the_index_write():
    """p-attn (memory writes): torch.select_scatter(x, src, 0, i) with a sampled i gave vmap's '.item()' text in a
    PlateRuntimeError, slice_scatter(..., start=i) and x[i:i + 2] the variable-length advice (a fixed maximum
    length and a mask). A sampled index, or start with a fixed length, is an index: the messages name the write
    (index_copy / index_put) and read (index_select) with i + arange(k), which give each sample's scatter."""
    a = _sampled([2, 0, 1], A_)
    x = torch.randn(4, 3, dtype=torch.float64)
    src = a * torch.ones(3, dtype=torch.float64)  # a sampled row
    with pytest.raises(storch.PlateError, match=r"select_scatter got a sampled index.*"
                                                r"`x\.index_copy\(0, i\.reshape\(1\), src\.unsqueeze\(0\)\)` "
                                                r"\(`x\.index_put\(\(i,\), src\)`\)") as err:
        torch.select_scatter(x, src, 0, a)
    assert "vmap" not in str(err.value) and ".item()" not in str(err.value)
    # what it advises is each sample's select_scatter (an int index: torch's own, per sample)
    _check(lambda a: x.index_put((a,), a * torch.ones(3, dtype=torch.float64)), a)
    out = x.index_copy(0, a.reshape(1), src.unsqueeze(0))
    for e, k in enumerate([2, 0, 1]):
        assert torch.equal(out.tensor[e], torch.select_scatter(x, torch.full((3,), float(k), dtype=x.dtype), 0, k))
    rows = a * torch.ones(2, 3, dtype=torch.float64)
    with pytest.raises(storch.PlateError, match=r"slice_scatter got a sampled start.*fixed by src \(2 along dim 0\)"
                                                r".*`x\.index_copy\(0, i \+ torch\.arange\(2\), src\)`"):
        torch.slice_scatter(x, rows, 0, a, a + 2)
    out = x.index_copy(0, a + torch.arange(2), rows)
    for e, k in enumerate([2, 0, 1]):
        assert torch.equal(out.tensor[e], torch.slice_scatter(x, torch.full((2, 3), float(k), dtype=x.dtype), 0, k,
                                                              k + 2))
    # plain x and src: torch reads the int itself, below storch's handlers; the message still names the index
    for fn in (lambda: torch.slice_scatter(x, x[:2], 0, a, a + 2), lambda: x[a:a + 2],
               lambda: torch.select_scatter(x, x[0], 1, a)):
        with pytest.raises(storch.PlateError, match=r"start with a fixed length k.*it is an index: read with "
                                                    r"`x\.index_select\(d, i \+ torch\.arange\(k\)\)`.*write "
                                                    r"with `x\.index_copy\(d, i \+ torch\.arange\(k\), src\)`"):
            fn()
    out = x.index_select(0, a + torch.arange(2))
    assert all(torch.equal(out.tensor[e], x[k:k + 2]) for e, k in enumerate([2, 0, 1]))
    # an int index is torch's own, per sample
    _check(lambda a: torch.select_scatter(x, a * torch.ones(3, dtype=torch.float64), 0, 1), a)
    _check(lambda a: torch.slice_scatter(x, a * torch.ones(2, 3, dtype=torch.float64), 0, 1, 3), a)


def test_roll_and_repeat_interleave_by_a_sample_are_refused_with_what_to_do():
    a = _sampled([2, 0, 1], A_)
    x = PlateTensor(torch.randn(2, 3, 4), (Plate("data", 2, True),))
    with pytest.raises(storch.PlateError, match=r"roll by a sampled shift.*\(torch\.arange\(n\) - shift\) % n"):
        x.roll(a, 0)
    with pytest.raises(storch.PlateError, match="roll by a sampled shift"):
        torch.roll(x, shifts=(a,), dims=(0,))
    with pytest.raises(storch.PlateError, match="sampled repeats.*different shapes"):
        torch.repeat_interleave(torch.arange(3.0), torch.stack([a, a, a]) + 1)
    with pytest.raises(storch.PlateError, match="sampled repeats"):
        torch.repeat_interleave(a + 1)
    # without a sampled shift / repeats: per sample, as before
    _check(lambda x: x.roll(1, 0), x)
    _check(lambda x: x.repeat_interleave(2, 1), x)
    # the roll the message suggests is the roll of each sample
    idx = (torch.arange(3) - a) % 3
    out = x[idx]
    for e in entries(out.plates):
        assert torch.equal(entry(out, e), entry(x, e).roll(int(entry(a, e)), 0))


# -- writes through a 0-dim sampled index: torch's view, storch's copy written back ------------------
# For one sample `y[s]` with s a 0-dim integer tensor is a view of y (torch reads s as an int), so a
# write through it changes y, and a later write into y shows in it. Per plate entry storch gathers (a
# copy); the copy is written back and refreshed, so per entry the values are torch's.


def _table(plates=PLATES, shape=(3, 4)):
    return PlateTensor(torch.randn(tuple(p.size for p in plates) + shape, dtype=torch.float64), plates)


def _ints(plate, high):
    return PlateTensor(torch.randint(high, (plate.size,)), (plate,))


def _row_view_rows(y, s, a):
    r = y[s]
    r[a] += 1.0


def _loop_writes(fn, y, s, a):
    """``fn`` on a copy of y per plate entry of y (s, a: that entry's ints); the stacked results."""
    out = y.tensor.clone()
    for e in entries(y.plates):
        v = out[tuple(e[p.name] for p in y.plates)]
        fn(v, int(entry(s, e)), int(entry(a, e)))
    return out


WRITES = {
    "y[s][a] = 1": lambda y, s, a: y[s].__setitem__(a, 1.0),
    "y[s].fill_(1)": lambda y, s, a: y[s].fill_(1.0),
    "y[s, 1:].fill_(1)": lambda y, s, a: y[s, 1:].fill_(1.0),
    "y[s][1:].mul_(2) (a view of the copy)": lambda y, s, a: y[s][1:].mul_(2.0),
    "r = y[s]; r[a] += 1": _row_view_rows,
    "y[s][a] += 1 (counts)": lambda y, s, a: y[s][a].add_(1.0),
    "y[s, a] += 1": lambda y, s, a: y[s, a].add_(1.0),
    "y[:, a].zero_()": lambda y, s, a: y[:, a].zero_(),
    "y[s].view(2, 2)[1].exp_()": lambda y, s, a: y[s].view(2, 2)[1].exp_(),
    "y[s][a] = y[s][a] * 3": lambda y, s, a: y[s].__setitem__(a, y[s][a] * 3),
}


@pytest.mark.parametrize("name", WRITES)
def test_a_write_through_a_0dim_sampled_index_reaches_the_tensor(name):
    torch.manual_seed(0)
    y, s, a = _table(), _ints(A, 3), _ints(B, 4)
    expected = _loop_writes(WRITES[name], y, s, a)
    WRITES[name](y, s, a)
    assert torch.equal(y.tensor, expected), name


def test_in_place_augmented_assignment_with_a_sampled_index_counts_once():
    # counts[s][a] += 1 and counts[s, a] += 1, as tabular code writes them (Python reads, adds in
    # place, then assigns back: the write-back and the assignment agree)
    torch.manual_seed(1)
    s, a = _ints(A, 3), _ints(B, 4)
    for form in range(2):
        counts = PlateTensor(torch.zeros(2, 3, 3, 4), PLATES)
        for _ in range(3):
            if form:
                counts[s, a] += 1
            else:
                counts[s][a] += 1
        for e in entries(PLATES):
            c = torch.zeros(3, 4)
            c[int(entry(s, e)), int(entry(a, e))] = 3
            assert torch.equal(entry(counts, e), c)


def test_rows_read_with_a_sampled_index_see_later_writes_into_the_tensor():
    torch.manual_seed(2)
    y, s, a = _table(), _ints(A, 3), _ints(B, 4)
    y0 = y.tensor.clone()
    row, cell = y[s], y[s][a]
    y[1:].mul_(2.0)  # through a view of y
    y[s, a] = 7.0
    for e in entries(PLATES):
        v = y0[e["a"], e["b"]].clone()
        i, j = int(entry(s, e)), int(entry(a, e))
        r, c = v[i], v[i][j]  # torch: views
        v[1:].mul_(2.0)
        v[i, j] = 7.0
        assert torch.equal(entry(row, e), r) and torch.equal(entry(cell, e), c)


def test_reads_through_a_0dim_sampled_index_leave_the_tensor_alone():
    torch.manual_seed(3)
    y, s, a = _table(), _ints(A, 3), _ints(B, 4)
    y0 = y.tensor.clone()
    r = y[s]
    out = (r * 2 + y[s, a]).exp()
    r.clone().fill_(5.0)  # a clone is not a view: as in torch, y keeps its values
    assert torch.equal(y.tensor, y0)
    for e in entries(PLATES):
        i, j = int(entry(s, e)), int(entry(a, e))
        assert torch.equal(entry(r, e), y0[e["a"], e["b"]][i])
        assert torch.allclose(entry(out, e), (y0[e["a"], e["b"]][i] * 2 + y0[e["a"], e["b"], i, j]).exp())


def test_a_write_back_gives_torchs_gradient():
    torch.manual_seed(4)
    s, a = _ints(A, 3), _ints(B, 4)
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, 3, 4, dtype=torch.float64)
    y = PlateTensor(w.expand(2, 3, 3, 4) * 1.0, PLATES)
    y[s][a].mul_(3.0)
    y[s, 1:].mul_(w[0, 1:])
    loss = (y.tensor * c).sum()
    (g,) = torch.autograd.grad(loss, w)
    w2 = w.detach().clone().requires_grad_(True)
    total = 0
    for e in entries(PLATES):
        v = w2 * 1.0
        i, j = int(entry(s, e)), int(entry(a, e))
        v[i][j].mul_(3.0)
        v[i, 1:].mul_(w2[0, 1:])
        total = total + (v * c[e["a"], e["b"]]).sum()
    (g2,) = torch.autograd.grad(total, w2)
    assert torch.allclose(g, g2)


def test_a_write_through_a_sampled_index_that_cannot_reach_the_tensor_is_refused():
    torch.manual_seed(5)
    s = _ints(A, 3)
    table = torch.zeros(3, 4)
    with pytest.raises(storch.PlateError, match="plain tensor"):
        table[s].fill_(1.0)  # torch: a write into the plain table, different per sample
    with pytest.raises(storch.PlateError, match="plain tensor"):
        table[s][0] = 1.0
    assert not table.any()
    y = _table((B,))  # y does not vary over s's plate a
    with pytest.raises(storch.PlateError, match="does not vary"):
        y[s].fill_(1.0)
    with pytest.raises(storch.PlateError, match="changed in place"):
        y2, s2 = _table(), _ints(A, 3)
        r = y2[s2]
        s2.add_(1).remainder_(3)
        r.fill_(0.0)


def test_a_one_hot_sample_as_a_boolean_mask_is_refused_with_the_index_that_works():
    """``table[z.bool()]`` with a OneHotCategorical sample z selects one row per sample, but a mask that varies
    per sample is refused (it may select a different number); the message named only torch.where (found by
    porting a mixture model). It now also names ``table[z.argmax(-1)]`` and ``z @ table``, which work."""
    torch.manual_seed(0)
    table = torch.randn(4, 3)
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(torch.distributions.OneHotCategorical(logits=torch.zeros(4)))
        with pytest.raises(storch.PlateError, match=r"one-hot mask.*table\[z\.argmax\(-1\)\].*z @ table"):
            table[z.bool()]
        picked = table[z.argmax(-1)]
        assert torch.equal(picked.tensor, table) and torch.equal((z @ table).tensor, table)


# -- bincount of a sampled index (found by porting: vmap failed where the lengths differ, or warned) ---------

def _bincount_cases():
    torch.manual_seed(6)
    i = PlateTensor(torch.randint(4, (2, 3, 5)), PLATES)  # values 0..3 on plates (a, b)
    w = torch.randn(5)
    wp = PlateTensor(torch.randn(3, 5, dtype=torch.float64), (B,))  # per-sample weights on plate b only
    return {
        "minlength=4": (lambda: torch.bincount(i, minlength=4), lambda e: torch.bincount(entry(i, e), minlength=4)),
        "minlength=6": (lambda: i.bincount(minlength=6), lambda e: entry(i, e).bincount(minlength=6)),
        "float32 weights": (lambda: torch.bincount(i, weights=w, minlength=4),
                            lambda e: torch.bincount(entry(i, e), weights=w, minlength=4)),
        "int32 weights (float64 counts)": (lambda: i.bincount(w.mul(10).int(), 4),
                                           lambda e: entry(i, e).bincount(w.mul(10).int(), 4)),
        "sampled float64 weights": (lambda: torch.bincount(i, wp, minlength=4),
                                    lambda e: torch.bincount(entry(i, e), entry(wp, e), minlength=4)),
        "int32 input": (lambda: torch.bincount(i.int(), minlength=4),
                        lambda e: torch.bincount(entry(i, e).int(), minlength=4)),
        # every entry holds a 3 (its largest value): torch's length is the same for all, no minlength needed
        "same max everywhere, no minlength": (lambda: torch.bincount(torch.cat([i, i[:1] * 0 + 3])),
                                              lambda e: torch.bincount(torch.cat([entry(i, e), entry(i, e)[:1] * 0 + 3]))),
        "empty per sample, weights": (lambda: torch.bincount(i[:0], weights=w[:0], minlength=3),
                                      lambda e: torch.bincount(entry(i, e)[:0], weights=w[:0], minlength=3)),
    }


@pytest.mark.parametrize("name", list(_bincount_cases()))
def test_bincount_of_a_sampled_index_is_torchs_per_sample(name):
    """Per plate entry the values and the dtype of torch's bincount (int64 counts, float64 for integer
    weights, int64 for an empty input), and no warning: torch's vmap of bincount warned of a performance
    drop (it has no batching rule) and failed where the entries' lengths differ."""
    run, ref = _bincount_cases()[name]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = run()
    for e in entries(out.plates):
        r = ref(e)
        got = entry(out, e)
        assert got.dtype == r.dtype and got.shape == r.shape and torch.allclose(got, r), (name, e, got, r)


def test_bincount_whose_length_depends_on_the_draw_is_refused_with_minlength():
    i = PlateTensor(torch.tensor([[0, 1], [2, 2], [1, 0]]), (A_,))  # per sample max 1, 2, 1: lengths 2, 3, 2
    for call in (lambda: torch.bincount(i), lambda: i.bincount(minlength=2),
                 lambda: torch.bincount(i, weights=torch.ones(2))):
        with pytest.raises(storch.PlateError, match=r"depends on the drawn values: here from 2 to 3.*minlength="
                                                     r".*F\.one_hot\(i, K\)\.sum\(0\)"):
            call()
    assert torch.equal(torch.bincount(i, minlength=3).tensor, F.one_hot(i, 3).sum(0).tensor)
    for bad, match in ((i.float(), "integral"), (i - 1, "non-negative"), (i[:, None], "1-d")):
        with pytest.raises(RuntimeError, match=match):
            torch.bincount(bad, minlength=3)


def test_bincount_takes_a_numpy_minlength_and_refuses_a_meta_input_without_minlength():
    """``minlength=np.int64(4)`` (``K = len(np.unique(...))``), which torch takes, skipped the handler (``type(minlength)
    is not int``): vmap's loop warned of a performance drop, or failed where the samples' max differ although
    minlength covers them. On the meta device, ``torch.bincount(i)`` gave shape (0,) where torch raises (no meta
    kernel): its length depends on values a meta tensor does not hold. Found by review."""
    import warnings
    from typing import Any

    import numpy as np

    i = PlateTensor(torch.tensor([[0, 1], [2, 2], [1, 0]]), (A_,))  # per sample max 1, 2, 1
    ml: Any  # numpy integers, which torch's stubs do not list
    for ml in (np.int64(4), np.int32(4)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = torch.bincount(i, minlength=ml)
        assert torch.equal(out.tensor, torch.bincount(i, minlength=4).tensor)
        assert torch.equal(out.tensor, torch.stack([torch.bincount(r, minlength=ml) for r in i.tensor]))
    with pytest.raises(storch.PlateError, match=r"depends on the drawn values: here from 2 to 3"):
        torch.bincount(i, minlength=np.int64(2))  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="minlength"):  # torch's own refusal of a bool, as on a plain tensor
        torch.bincount(i, minlength=True)
    meta = PlateTensor(torch.zeros(3, 2, dtype=torch.long, device="meta"), (A_,))
    with pytest.raises(storch.PlateError, match=r"meta tensor without minlength.*minlength="):
        torch.bincount(meta)
    assert torch.bincount(meta, minlength=np.int64(5)).tensor.shape == (3, 5)  # pyright: ignore[reportArgumentType]
    assert torch.bincount(meta[:0]).tensor.shape == (3, 0)  # an empty input counts nothing, as torch's CPU kernel


def test_bincount_weights_get_the_gradient_of_the_counts():
    """The counts are a scatter_add of the weights: d counts[k] / d w[j] = [i[j] == k] per sample (torch's
    bincount has no derivative for its weights; storch's per-sample counts are differentiable)."""
    torch.manual_seed(7)
    i = PlateTensor(torch.randint(4, (3, 5)), (B,))
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad((torch.bincount(i, w, minlength=6).tensor * c).sum(), w)
    expected = sum(c[b][entry(i, {"b": b})] for b in range(3))  # each weight meets the cost of its bin
    assert torch.allclose(g, expected)


# -- errors in per-sample terms --------------------------------------------------------------------------

_RELAXED = PlateTensor(torch.eye(3)[torch.tensor([[0, 2], [1, 1]])], (A,))  # a one-hot (B=2, K=3) sample per entry, as the
_FEATS, _TABLE = torch.randn(2, 3, 2), torch.randn(3, 2)       # relaxed estimators hand it out
FLOAT_INDEX = {
    "index_select": lambda w: _TABLE.index_select(0, w[0]),
    "gather": lambda w: _FEATS.gather(1, w[:, :, None]),
    "take_along_dim": lambda w: torch.take_along_dim(_FEATS, w[:, :, None], 1),
    "index_add": lambda w: torch.zeros(3, 2).index_add(0, w[0], torch.ones(3, 2)),
    "index_add_ (into a plain tensor)": lambda w: torch.zeros(3, 2).index_add_(0, w[0], torch.ones(3, 2)),
    "scatter": lambda w: torch.zeros(2, 3).scatter(1, w, 1.0),
    "scatter_add": lambda w: torch.zeros(2, 3).scatter_add(1, w, torch.ones(2, 3)),
    "take": lambda w: torch.take(_TABLE, w),
    "bincount": lambda w: torch.bincount(w[0], minlength=3),
}


@pytest.mark.parametrize("name", list(FLOAT_INDEX))
def test_a_floating_point_sample_as_the_index_of_an_index_function_says_it_is_one_hot(name):
    """``table[w]`` and ``F.embedding(w, t)`` of a relaxed (one-hot) sample said why it fails and what to
    write; index_select, gather, ... gave only torch's dtype error (or storch's in-place refusal)."""
    with pytest.raises(storch.PlateError, match=r"floating-point sample used as an index.*z @ emb\.weight"):
        FLOAT_INDEX[name](_RELAXED)


def test_a_failed_expand_quotes_torch_in_per_sample_shapes():
    """``w[:, None, None].expand(B, 1, D)`` of a one-hot sample failed with torch's message about the raw
    tensor ([2, 2, 1, 1, 3], size=[-1, 2, 1, 2]: plate dims included) inside storch's per-sample shapes."""
    with pytest.raises(storch.PlateError) as info:
        _RELAXED[:, None, None].expand(2, 1, 2)
    msg = str(info.value)
    assert "shapes (2, 1, 1, 3) on plates (a=2)" in msg
    assert "expand(torch.FloatTensor{[2, 1, 1, 3]}, size=[2, 1, 2])" in msg and "[2, 2, 1, 1, 3]" not in msg
    with pytest.raises(storch.PlateError, match=r"non-singleton dimension 1\. +Target sizes: \[2, 4\]\. +Tensor "
                                                 r"sizes: \[2, 3\]"):
        torch.broadcast_to(_RELAXED, (2, 4))


def test_torchs_message_about_raw_tensors_says_that_the_plates_come_first():
    """Where a handler's torch call fails with the raw shapes in its message, storch says what they are."""
    x = PlateTensor(torch.randn(2, 3, 4), (A,))
    with pytest.raises(storch.PlateError) as info:
        torch.gather(x, 0, PlateTensor(torch.zeros(2, 3, 5, dtype=torch.long), (A,)))
    msg = str(info.value)
    print(msg)
    assert "raw tensors'" in msg and "(2, 3, 4) is the per-sample shape (3, 4) after plate dims (a=2)" in msg


def test_the_raw_shapes_note_is_not_added_where_torch_quotes_the_users_own_sizes():
    """``x.unflatten(0, (2, 3))`` on a plate tensor of raw shape (2, 3): torch's message quotes the sizes the user
    passed ([2, 3]), which equal the raw shape by coincidence, and storch added "(2, 3) is the per-sample shape (3,)
    after plate dims" (found by review). Not where the matched shape is one the call's arguments hold, as a sequence
    or as int arguments; still where torch quotes the raw shape itself (F.conv1d's input)."""
    x = PlateTensor(torch.randn(2, 3), (A,))
    with pytest.raises(storch.PlateError) as info:
        x.unflatten(0, (2, 3))
    assert "[2, 3]" in str(info.value) and "raw tensors'" not in str(info.value)
    with pytest.raises(storch.PlateError) as info:
        F.conv1d(x[None], torch.randn(1, 2, 3))
    assert "(2, 1, 3) is the per-sample shape (1, 3) after plate dims (a=2)" in str(info.value)
    from storch.plates.dispatch import _passed_sizes
    assert _passed_sizes((x, 0, (2, 3)), {}) == {(0,), (2, 3)}
    assert _passed_sizes((x, 2, 3), {"size": torch.Size([4])}) == {(2, 3), (4,)}


def test_a_write_into_a_new_zeros_tensor_says_factories_are_plain_and_what_works():
    """``A = z.new_zeros(N, N, K); A[iu0, iu1] = z`` (p-graphs): new_zeros of a plate tensor is plain (factories
    cannot see plates), so the write is refused; the message says so and names the out-of-place index_put, which
    gives per sample what the in-place write would."""
    n, k = 3, 2
    iu = torch.triu_indices(n, n, 1)
    z = PlateTensor(torch.randn(4, 3, k, generator=torch.Generator().manual_seed(0)), [Plate("z", 4)])
    a = z.new_zeros(n, n, k)
    assert type(a) is torch.Tensor
    with pytest.raises(storch.PlateError, match=r"(?s)new_zeros.*is plain.*index_put\(\(i, j\), z\)"):
        a[iu[0], iu[1]] = z
    b = torch.zeros(n, n, k).index_put((iu[0], iu[1]), z)
    for e in range(4):
        expect = torch.zeros(n, n, k)
        expect[iu[0], iu[1]] = z.tensor[e]
        assert torch.equal(b.tensor[e], expect)


def test_a_padding_mask_on_a_data_plate_is_refused_naming_that_plate():
    """``cost[mask]`` with a padding mask from ``denote_independent`` varies along the data plate, not a sample
    plate; the message said "varies per sample" (found by porting a masked sequence model). It now says the mask
    varies per plate entry and names the plates it varies along, data or sample, and keeps torch.where."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    with storch.Graph():
        (m,) = storch.denote_independent((mask,), 0, "data")
        cost = torch.ones(3)
        with pytest.raises(storch.PlateError) as err:
            cost[m]
        msg = str(err.value)
        assert "varies per plate entry" in msg and "per sample" not in msg
        assert "'data' (a data plate)" in msg and "torch.where(mask, x, other)" in msg
        z = storch.estimator("expect", plate="z")(torch.distributions.Bernoulli(probs=torch.full((3,), 0.5)))
        with pytest.raises(storch.PlateError) as err:
            cost[z.bool() & m]
        assert "'data' (a data plate), 'z' (a sample plate)" in str(err.value) or \
            "'z' (a sample plate), 'data' (a data plate)" in str(err.value)


# -- a sampled count used as a size, a length or a slice bound (a variable length) --------------------

SIZE_USES = {
    "range(n)": lambda n, z: sum(z[..., i] for i in range(n)),
    "z[:n]": lambda n, z: z[..., :n].sum(-1),
    "n.item()": lambda n, z: z[..., :n.item()].sum(-1),
    "torch.arange(n)": lambda n, z: torch.arange(n).float().sum(),
    "z.narrow(-1, 0, n)": lambda n, z: z.narrow(-1, 0, n).sum(-1),
    "torch.narrow(z, -1, start=n, length=1)": lambda n, z: torch.narrow(z, -1, start=n, length=1).sum(-1),
}


def _count_and_bits(use, est="expect"):
    phi = torch.tensor([0.2, -0.1, 0.4, 0.0], dtype=torch.float64, requires_grad=True)  # n in 0..3
    psi = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64, requires_grad=True)  # 3 bits, M = 3
    with storch.Graph():
        n = storch.estimator(est, plate="n")(torch.distributions.Categorical(logits=phi))
        z = storch.estimator(est, plate="z")(torch.distributions.Bernoulli(logits=psi))
        storch.add_cost(use(n, z))
        return phi, psi, storch.surrogate_loss()


@pytest.mark.parametrize("label", list(SIZE_USES))
def test_a_sampled_size_names_the_mask_over_a_maximum_length(label):
    """p-struct (AIR-style variable length): range(n) and z[:n] advised `table[z]`, torch.arange(n) 'keep the
    number a fixed constant', narrow passed vmap's '.item()' text; none named what works, a mask over a
    maximum length."""
    with pytest.raises(storch.PlateError) as err:
        _count_and_bits(SIZE_USES[label])
    msg = str(err.value)
    assert "vmap" not in msg and ".item()" not in msg
    if "length=1" in label:
        # a sampled START with a fixed length is an index, not a length: index with the start plus an arange
        # (found by porting hard attention, p-attn; the length's mask advice did not fit)
        assert "sampled start" in msg and "fixed length 1" in msg and "r + torch.arange(1)" in msg
        return
    assert "a size, a length or a slice bound" in msg and "fixed maximum length M" in msg
    assert "`z * (torch.arange(M) < n.unsqueeze(-1))`" in msg
    if "narrow" in label:
        assert "sampled length" in msg


def test_a_float_sample_as_a_number_does_not_advise_a_length_mask():
    x = PlateTensor(torch.tensor([0.5, 1.5]), (A,))
    with pytest.raises(storch.PlateError) as err:
        float(x)
    assert "needs a single value" in str(err.value) and "maximum length" not in str(err.value)


def test_the_advised_length_mask_is_exact():
    """The advice, `z * (torch.arange(M) < n.unsqueeze(-1))`, under expect: E[sum_{i<n} z_i] =
    sum_i P(n > i) sigmoid(psi_i), value and gradient."""
    phi, psi, loss = _count_and_bits(lambda n, z: (z * (torch.arange(3) < n.unsqueeze(-1))).sum(-1))
    g = torch.autograd.grad(loss, (phi, psi))

    def exact(phi, psi):
        p_more = 1 - phi.softmax(-1).cumsum(-1)[:3]  # P(n > i), i = 0, 1, 2
        return (p_more * psi.sigmoid()).sum()

    assert torch.allclose(loss, exact(phi.detach(), psi.detach()))
    ex = torch.autograd.functional.jacobian(exact, (phi.detach(), psi.detach()))
    assert all(torch.allclose(a, b) for a, b in zip(g, ex))


def test_a_format_spec_and_round_are_refused_as_item_is():
    """p-tools: f"{cost:.3f}" ignored the spec (the multi-line repr came back), round(cost, 2) gave torch's
    TypeError; both are .item()'s PlateError now. f"{x}" and str(x) stay the repr."""
    x = PlateTensor(torch.tensor([0.5, 1.5]), (A,))
    for call, what in ((lambda: f"{x:.3f}", 'a format spec (f"{x:.3f}")'), (lambda: format(x, ">20"), ">20"),
                       (lambda: round(x, 2), "`round`"), (lambda: round(x), "`round`")):
        with pytest.raises(storch.PlateError) as err:
            call()
        assert what in str(err.value) and "needs a single value" in str(err.value), str(err.value)
    with pytest.raises(storch.PlateError) as err:
        x.item()
    assert "needs a single value" in str(err.value)
    assert f"{x}" == str(x) == repr(x) and repr(x).startswith("PlateTensor(plates=")
    assert f"{torch.tensor(0.5):.3f}" == "0.500"  # plain tensors as torch formats them
