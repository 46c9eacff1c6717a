"""A plain parameter table indexed by sampled indices (p-hmm15: an HMM's ``logA[z_prev, z]``, ``logB[z, x]``):
the fast paths are taken (a ``sys.setprofile`` probe), their values and gradients equal the general path's
and a loop over the plate entries, their errors stay torch's, and the other forms still go the general way."""

import pytest
import torch

import storch
from storch.plates.rules import indexing

from path_probes import calls
from test_plates_dispatch import check_grads, make, rnd

S, V, E = 3, 4, 5
_G = torch.Generator().manual_seed(11)


def _ints(high, *shape):
    return torch.randint(0, high, shape, generator=_G)


def _tables():
    """The float tables (leaves) and the lookups' tables computed from them: no gradient path is lost."""
    A, B = rnd(S, S, seed=1).requires_grad_(True), rnd(S, V, seed=2).requires_grad_(True)
    emb = rnd(S, E, seed=3).requires_grad_(True)
    return A, B, emb


# index layouts: one plate; a sample plate and a data plate (batch 1 and 4); z_prev and z of two nodes
_LAYOUTS = {
    "one plate": ((("z", 3),), (("z", 3),)),
    "z, batch 1": ((("z", 3), ("batch", 1)), (("z", 3), ("batch", 1))),
    "z, batch 4": ((("z", 3), ("batch", 4)), (("z", 3), ("batch", 4))),
    "two nodes": ((("z1", 3), ("batch", 4)), (("z2", 2), ("batch", 4))),
}


def _indices(layout):
    pa, pb = _LAYOUTS[layout]
    zp = make(_ints(S, *[s for _, s in pa]), *pa)
    z = make(_ints(S, *[s for _, s in pb]), *pb)
    return zp, z


def _lookups(A, B, emb):
    """(name, fn of (zp, z, x), its fast path, its leaf): the forms of a structured model's lookups (the
    tables computed in fn from the leaves, so that the loop's gradients run through their own graph)."""
    def logA():
        return torch.log_softmax(A, -1)

    def logB():
        return torch.log_softmax(B, -1)

    return [
        ("logA[zp, z]", lambda zp, z, x: logA()[zp, z], "_table_lookup", A),
        ("logA[(z,)]", lambda zp, z, x: logA()[(z,)], "_table_lookup", A),
        ("logB[z, 2]", lambda zp, z, x: logB()[z, 2], "_table_lookup", B),
        ("logB[z, -1]", lambda zp, z, x: logB()[z, -1], "_table_lookup", B),
        ("logB[z, x_t]", lambda zp, z, x: logB()[z, torch.tensor(3)], "_table_lookup", B),
        ("logB[z, x]", lambda zp, z, x: logB()[z, x], "_table_lookup", B),
        ("A[zp, z 1-d]", lambda zp, z, x: A[zp.unsqueeze(-1), z.unsqueeze(-1).expand(2)], "_table_lookup", A),
        ("B[z, plain 2-d]", lambda zp, z, x: B[z, torch.tensor([[0, 3, 1]])], "_table_lookup", B),
        ("index_select 0", lambda zp, z, x: torch.index_select(emb, 0, z), "_table_select", emb),
        ("index_select 1", lambda zp, z, x: emb.index_select(1, torch.stack([z, z + 2])), "_table_select", emb),
        ("index_select -1", lambda zp, z, x: emb.t().index_select(-1, z), "_table_select", emb),
        ("gather", lambda zp, z, x: emb.gather(1, torch.stack([z, z + 1]).unsqueeze(-1)), "_gather", emb),
    ]


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_sampled_lookups_of_a_plain_table_take_the_fast_path_and_equal_a_loop(layout):
    A, B, emb = _tables()
    zp, z = _indices(layout)
    batch = dict(_LAYOUTS[layout][0]).get("batch", 2)
    x = make(_ints(V, batch), ("batch", batch))  # the observed symbols: a data-plate tensor
    for name, fn, fast, leaf in _lookups(A, B, emb):
        # values, and gradients to the table's leaf (the loop over the plates of the indices the form reads)
        if name.endswith(", x]"):
            check_grads(lambda z_, x_: fn(None, z_, x_), (z, x), (leaf,))
        elif "zp" in name:
            check_grads(lambda zp_, z_: fn(zp_, z_, None), (zp, z), (leaf,))
        else:
            check_grads(lambda z_: fn(None, z_, None), (z,), (leaf,))
        _, seen = calls(lambda: fn(zp, z, x))
        assert fast in seen and not seen & {"_general", "_normalise", "_full", "vmap_call"}, (name, sorted(seen))


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_the_fast_lookup_equals_the_general_path(layout):
    """The same raw values and gradients as ``_general_read``, the path these lookups took before."""
    A, B, _ = _tables()
    zp, z = _indices(layout)
    logA = torch.log_softmax(A, -1)
    for idx in ((zp, z), (z, 1), (zp, z.unsqueeze(-1).expand(3)), (torch.tensor(2), z)):
        fast = logA[idx]
        general, _ = indexing._general_read(logA, idx)
        assert fast.plates == general.plates and fast.shape == general.shape
        assert torch.equal(fast.tensor, general.tensor), idx
        w = rnd(*fast.tensor.shape, seed=4)
        g1, = torch.autograd.grad((fast.tensor * w).sum(), A, retain_graph=True)
        g2, = torch.autograd.grad((general.tensor * w).sum(), A, retain_graph=True)
        assert torch.equal(g1, g2)


def test_out_of_range_and_negative_sampled_indices():
    A, _, emb = _tables()
    z = make(torch.tensor([[0, 1], [2, 3], [1, 0]]), ("z", 3), ("batch", 2))  # 3 is out of range for S = 3
    ok = make(torch.tensor([[0, 1], [2, 2], [1, 0]]), ("z", 3), ("batch", 2))
    for fn in (lambda: A[ok, z], lambda: A[z, 0], lambda: torch.index_select(emb, 0, z)):
        with pytest.raises(storch.PlateError, match="out of (bounds|range)") as e:
            calls(fn)
        assert isinstance(e.value, IndexError)
    # negative indices: an advanced index wraps them, as for one sample; index_select refuses them, as torch does
    neg = make(torch.tensor([[0, -1], [-3, 2], [-2, 0]]), ("z", 3), ("batch", 2))
    check_grads(lambda i, j: A[i, j], (neg, ok), (A,))
    _, seen = calls(lambda: A[neg, ok])
    assert "_table_lookup" in seen
    with pytest.raises(storch.PlateError, match="index out of range in self"):
        torch.index_select(emb, 0, neg)


def _amortised(layout, broadcast=False):
    """A table per data point (an amortised one: plates ("batch",), made of a leaf), of the layout's batch size (4
    where the layout has none); with ``broadcast``, one raw table for every point (a size-1 raw plate dim)."""
    batch = dict(_LAYOUTS[layout][0]).get("batch", 4)
    leaf = rnd(1 if broadcast else batch, S, V, seed=12).requires_grad_(True)
    return leaf, make(leaf.clone(), ("batch", batch))  # (a graph that gradients can run through twice)


def _amortised_lookups():
    """(name, fn of (table, zp, z, x)): the lookups of a table on a data plate by sampled indices."""
    return [
        ("W[z]", lambda w, zp, z, x: w[z]),
        ("W[(z,)]", lambda w, zp, z, x: w[(z,)]),
        ("W[z, 2]", lambda w, zp, z, x: w[z, 2]),
        ("W[z, -1]", lambda w, zp, z, x: w[z, -1]),
        ("W[1, z]", lambda w, zp, z, x: w[1, z]),
        ("W[z, x_t]", lambda w, zp, z, x: w[z, torch.tensor(3)]),
        ("W[z, x]", lambda w, zp, z, x: w[z, x]),
        ("W[zp, z]", lambda w, zp, z, x: w[zp, z]),
        ("W[z, plain 2-d]", lambda w, zp, z, x: w[z, torch.tensor([[0, 3, 1]])]),
    ]


@pytest.mark.parametrize("broadcast", [False, True])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_sampled_lookups_of_a_table_on_a_data_plate_take_the_fast_path_and_equal_a_loop(layout, broadcast):
    """An amortised table (``W[z]``, W one table per data point) took the general path (its normalisation and an
    expanded view of the table, ~2x a plain table's lookup); it is the plain table's raw index with the table's plate
    dims indexed by aranges. Values and gradients to the leaf equal a loop over the plate entries, and the fast path
    is taken; the index's plates may lack the table's (layout "one plate": the result has both)."""
    leaf, table = _amortised(layout, broadcast)
    zp, z = _indices(layout)
    batch = dict(_LAYOUTS[layout][0]).get("batch", 4)
    x = make(_ints(V, batch), ("batch", batch))  # the observed symbols: a data-plate tensor
    for name, fn in _amortised_lookups():
        if name == "W[zp, z]":
            check_grads(lambda w, zp_, z_: fn(w, zp_ % S, z_, None), (table, zp, z), (leaf,))
        else:
            check_grads(lambda w, z_, x_: fn(w, None, z_, x_), (table, z, x), (leaf,))
        _, seen = calls(lambda: fn(table, zp, z, x))
        assert "_table_lookup" in seen and not seen & {"_general", "_normalise", "_full", "vmap_call"}, (
            name, sorted(seen))


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_the_fast_lookup_of_a_table_on_a_data_plate_equals_the_general_path(layout):
    """The same plates, raw values and gradients as ``_general_read``, the path these lookups took before; also for
    a table of the index's own plates (a per-sample table) and a broadcast one."""
    zp, z = _indices(layout)
    batch = dict(_LAYOUTS[layout][0]).get("batch", 4)
    x = make(_ints(V, batch), ("batch", batch))
    for broadcast in (False, True):
        leaf, table = _amortised(layout, broadcast)
        per_sample = table * (1.0 + z.double()).unsqueeze(-1).unsqueeze(-1)  # plates: z's and the table's
        for w in (table, per_sample):
            for idx in ((z,), (z, 2), (zp, z), (z, x), (torch.tensor(2), z), (z, torch.tensor([[0, 3, 1]]))):
                _, seen = calls(lambda: w[idx])
                assert "_table_lookup" in seen and "_general" not in seen, (idx, sorted(seen))
                fast = w[idx]
                general, _ = indexing._general_read(w, idx)
                assert fast.plates == general.plates and fast.shape == general.shape
                # (a broadcast table's result stays broadcast where the index is: a size-1 raw plate dim)
                assert torch.equal(fast.tensor.expand(general.tensor.shape), general.tensor), idx
                g = rnd(*general.tensor.shape, seed=4)
                g1, = torch.autograd.grad((fast.tensor * g).sum(), leaf, retain_graph=True)
                g2, = torch.autograd.grad((general.tensor * g).sum(), leaf, retain_graph=True)
                if broadcast:  # (summed over the points in another order: the last bits)
                    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)
                else:
                    assert torch.equal(g1, g2)


def test_a_table_on_a_data_plate_keeps_the_general_path_s_errors_and_writes():
    """Out-of-range indices raise the general path's error; negative ones wrap; a boolean or floating-point index
    still gets its message; too many indices torch's IndexError. A write into a looked-up entry (one integer per
    sample: a view for one sample) is written back to a per-sample table, and refused for a table that does not vary
    over the index's sample plate."""
    leaf, table = _amortised("z, batch 4")
    bad = make(torch.tensor([[0, 1, 2, 3]] * 3), ("z", 3), ("batch", 4))  # 3 is out of range for S = 3
    with pytest.raises(storch.PlateError, match="out of (bounds|range)") as fast:
        table[bad]
    with pytest.raises(IndexError, match="out of (bounds|range)") as general:
        indexing._general_read(table, (bad,))  # (the handler's raw error, which the dispatcher wraps)
    assert isinstance(fast.value, IndexError) and str(general.value) in str(fast.value), (fast.value, general.value)
    neg = make(torch.tensor([[0, -1, -3, 2]] * 3), ("z", 3), ("batch", 4))
    check_grads(lambda w, i: w[i], (table, neg), (leaf,))
    zp, z = _indices("z, batch 4")
    with pytest.raises(storch.PlateError, match="boolean mask that varies"):
        table[z > 0]
    with pytest.raises(storch.PlateError, match="one-hot"):
        table[z.double()]
    with pytest.raises(IndexError, match="too many indices"):
        table[z, 0, 1]
    w = make(torch.zeros(4, S, V), ("batch", 4))
    with pytest.raises(storch.PlateError, match=r"varies over plates \['z'\]"):
        w[z, 2].fill_(1.0)  # one table per point, a row per sample: refused (the table would have to vary over z)
    assert not w.tensor.any()
    w = make(torch.zeros(3, 4, S, V), ("z", 3), ("batch", 4))  # a per-sample table: the copy is written back
    w[z, 2].fill_(1.0)
    want = torch.zeros(3, 4, S, V)
    for a in range(3):
        for c in range(4):
            want[a, c, z.tensor[a, c], 2] = 1.0
    assert torch.equal(w.tensor, want)


def test_a_write_into_a_looked_up_entry_is_still_refused():
    """``A[zp, z]`` is a view of the plain table for one sample: a write into storch's copy is refused."""
    A = torch.zeros(S, S)
    zp, z = _indices("z, batch 4")
    with pytest.raises(storch.PlateError, match="plain tensor"):
        A[zp, z].fill_(1.0)
    with pytest.raises(storch.PlateError, match="plain tensor"):
        A[zp, 2].add_(1.0)
    assert not A.any()


def test_other_index_forms_and_plate_tensor_tables_take_the_general_path():
    A, B, emb = _tables()
    zp, z = _indices("z, batch 4")
    logA = torch.log_softmax(A, -1)
    table = make(rnd(4, S, S, seed=6), ("batch", 4))  # a plate-tensor table (a parameter per data point)
    forms = {"A[:, z]": lambda: logA[:, z], "A[z, :]": lambda: logA[z, :], "A[z, None]": lambda: logA[z, None],
             "A[..., z]": lambda: logA[..., z], "A[[0, 2], z]": lambda: logA[[0, 2], z], "A[z, True]": lambda: logA[z, True],
             "table[:, z]": lambda: table[:, z], "table[z, None]": lambda: table[z, None]}
    for name, fn in forms.items():
        _, seen = calls(fn)
        assert "_general" in seen, (name, sorted(seen))  # (_table_lookup looked at the index and declined)
    check_grads(lambda i: torch.log_softmax(A, -1)[:, i], (z,), (A,))  # (the general path: a loop over entries)
    # a boolean mask and a floating-point index are refused with their messages
    with pytest.raises(storch.PlateError, match="boolean mask that varies"):
        logA[z > 0, zp]
    with pytest.raises(storch.PlateError, match="one-hot"):
        logA[z.double(), zp]
    # index_select / gather of a plate-tensor table: the general path
    _, seen = calls(lambda: torch.index_select(table, 0, z))
    assert "_table_select" not in seen and "_full" in seen
    _, seen = calls(lambda: table.gather(1, z.reshape(1, 1)))
    assert "union_plates" in seen


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_of_a_plain_table_with_scale_grad_by_freq_counts_per_sample(padding_idx):
    """``F.embedding(z, emb, scale_grad_by_freq=True)`` divides a row's gradient by its count in one sample's
    indices; on the raw indices torch counted it over every plate entry (row 0 of ``[[0, 0], [0, 1]]`` got 1
    where the entries' sum is 2: a silently wrong gradient)."""
    emb = rnd(S, E, seed=8).requires_grad_(True)
    z = make(torch.tensor([[[0, 0, 2], [0, 1, 1]], [[2, 2, 2], [1, 0, 1]]]), ("z", 2), ("batch", 2))
    check_grads(lambda i: torch.nn.functional.embedding(i, emb, padding_idx, scale_grad_by_freq=True), (z,), (emb,))
    check_grads(lambda i: torch.nn.functional.embedding(i, emb, scale_grad_by_freq=True, padding_idx=padding_idx),
                (z,), (emb,))


@pytest.mark.parametrize("padding_idx", [None, 1, -1])
def test_sparse_embedding_of_a_plain_table_with_scale_grad_by_freq_is_refused_as_torch_refuses_it(padding_idx):
    """``F.embedding(z, emb, sparse=True, scale_grad_by_freq=True)``: torch's backward refuses the pair ("not supported
    with sparse gradients"), per entry as on one sample. The per-sample counting laid the tables out one after another
    and silently gave the table a dense gradient instead (which SparseAdam then refused, far from the cause): the
    values are torch's per entry, and the backward raises torch's own error; without a gradient to the table, the
    lookup works as in torch."""
    F = torch.nn.functional
    emb = rnd(S, E, seed=8).requires_grad_(True)
    z = make(torch.tensor([[[0, 0, 2], [0, 1, 1]], [[2, 2, 2], [1, 0, 1]]]), ("z", 2), ("batch", 2))
    out = F.embedding(z, emb, padding_idx, sparse=True, scale_grad_by_freq=True)
    for a in range(2):
        for c in range(2):
            one = F.embedding(z.tensor[a, c], emb, padding_idx, sparse=True, scale_grad_by_freq=True)
            torch.testing.assert_close(out.tensor[a, c], one)
            with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
                one.sum().backward()  # torch, on one sample
    with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
        out.tensor.sum().backward()
    module = torch.nn.Embedding(S, E, padding_idx, sparse=True, scale_grad_by_freq=True)  # (sparse passed positionally)
    with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse gradients"):
        module(z).tensor.sum().backward()
    assert emb.grad is None and module.weight.grad is None
    frozen = F.embedding(z, emb.detach(), padding_idx, sparse=True, scale_grad_by_freq=True)
    torch.testing.assert_close(frozen.tensor, out.tensor.detach())
    with pytest.raises(IndexError, match="out of range"):  # torch's error
        F.embedding(make(torch.tensor([0, 4]), ("z", 2)), emb, sparse=True, scale_grad_by_freq=True)


def test_embedding_of_a_plain_table_with_scale_grad_by_freq_and_max_norm_renormalises_as_per_sample():
    """``max_norm`` with ``scale_grad_by_freq`` on a plain table went to vmap, which cannot renormalise in place (a
    PlateRuntimeError where one call per entry works): the rows any entry reads are renormalised once (a row's
    renorm is idempotent), then the per-sample lookup; values, the renormalised table and gradients equal a loop."""
    F = torch.nn.functional
    z = make(torch.tensor([[[0, 0, 2], [0, 1, 1]], [[2, 2, 2], [1, 0, 1]]]), ("z", 2), ("batch", 2))
    leaf = (3 * rnd(4, E, seed=9)).requires_grad_(True)  # row 3 is read by no entry: it keeps its norm
    emb, ref = leaf * 1, leaf * 1
    out = F.embedding(z, emb, max_norm=1.0, norm_type=2.0, scale_grad_by_freq=True)
    w = rnd(*out.tensor.shape, seed=10)
    got, = torch.autograd.grad((out.tensor * w).sum(), leaf)
    want = 0
    for a in range(2):
        for c in range(2):
            want = want + (F.embedding(z.tensor[a, c], ref, max_norm=1.0, scale_grad_by_freq=True) * w[a, c]).sum()
            torch.testing.assert_close(out.tensor[a, c], F.embedding(z.tensor[a, c], ref, max_norm=1.0))
    torch.testing.assert_close(emb, ref)  # the same rows renormalised in place
    assert emb[:3].norm(dim=-1).max() <= 1.0 + 1e-9 and emb[3].norm() > 1.0
    torch.testing.assert_close(got, torch.autograd.grad(want, leaf)[0])
    with pytest.raises(storch.PlateError, match="out of range"):
        F.embedding(make(torch.tensor([0, 4]), ("z", 2)), leaf * 1, max_norm=1.0, scale_grad_by_freq=True)
