"""storch.aligned: raw values with the plates a caller names as leading dims, in that order, against a loop over
the entries; and the hand-aligned idiom it replaces (``(a + 0 * b).tensor`` read beside ``b.tensor``), which
pairs other entries where the values' plates come in another order or one of them lacks a plate.

Core estimators only (``reparameterization``, ``expect``); beams (a partition re-indexed by its parents) with a
hand-built lineage here, and with ``unordered_set`` in tests/score/test_aligned_beams.py."""

import math

import pytest
import torch
from torch.distributions import Categorical, Normal

import storch


def _names(x):
    return tuple(p.name for p in x.plates)


def _two_nodes():
    x = storch.estimator("reparameterization", plate="x", n_samples=3)(Normal(torch.tensor(0.0), 1.0))
    y = storch.estimator("reparameterization", plate="y", n_samples=3)(Normal(torch.tensor(2.0), 1.0))
    return x, y


def test_the_old_idiom_pairs_other_entries_where_two_values_order_their_plates_differently():
    torch.manual_seed(0)
    with storch.Graph():
        x, y = _two_nodes()
        a = x + 10 * y                    # plates (x, y)
        b = y * x                         # plates (y, x)
        assert _names(a) == ("x", "y") and _names(b) == ("y", "x")
        xs, ys = x.tensor, y.tensor       # one plate each: entry i of x is xs[i]
        # the loop: entry (y=i, x=j), in b's layout
        loop_a = torch.stack([torch.stack([xs[j] + 10 * ys[i] for j in range(3)]) for i in range(3)])
        loop_b = torch.stack([torch.stack([ys[i] * xs[j] for j in range(3)]) for i in range(3)])
        # the idiom: (a + 0 * b) read beside b.tensor, "b's plates"; it has a's order (as many plates as b), so the
        # pairs (a, b) it makes are those of other entries: a wrong value, no error (the sizes agree)
        old = (a + 0 * b).tensor
        assert _names(a + 0 * b) == ("x", "y") and old.shape == b.tensor.shape
        assert not torch.allclose(old, loop_a)
        (ra, rb), plates = storch.aligned(a, b, plates=("y", "x"))
        assert tuple(p.name for p in plates) == ("y", "x")
        assert torch.equal(ra, loop_a) and torch.equal(rb, loop_b)
        # the same in the other order, and put back on the plates it returned: a's own values
        (ra, rb), plates = storch.aligned(a, b, plates=a.plates)
        assert torch.equal(ra, a.tensor) and torch.equal(rb, loop_b.t())
        back = storch.PlateTensor(ra * rb, plates)          # a result of the raw values, back on the plates
        assert torch.equal((back - a * b).tensor, torch.zeros(3, 3))


def _mrt_old(lp, delta, pad, alpha=1.0, plate="z"):
    """The MRT recipe of docs/partitions.md as it was: the raw values lined up by hand after ``+ 0 * lp``."""
    i = [p.name for p in lp.plates].index(plate)
    a, d, m = (v.movedim(i, -1) for v in torch.broadcast_tensors(lp.tensor, (delta + 0 * lp).tensor,
                                                                   (pad + 0 * lp).tensor))
    q = torch.softmax((alpha * a).masked_fill(m > 0, -math.inf), -1)
    return (q * d).sum(-1)


def _mrt_new(lp, delta, pad, alpha=1.0, plate="z"):
    """The recipe with storch.aligned: the plate reduced over last, the result put back on the others."""
    (a, d, m), plates = storch.aligned(lp, delta, pad, plates=(..., plate))
    q = torch.softmax((alpha * a).masked_fill(m, -math.inf), -1)
    return storch.PlateTensor((q * d).sum(-1), plates[:-1])


@pytest.mark.parametrize("refs", [[0, 2, 1], [0, 2, 1, 1]], ids=["3 data points", "4 data points"])
def test_the_old_mrt_recipe_is_wrong_where_the_risk_has_a_data_plate_that_log_p_lacks(refs):
    # a decoder that does not read the data point (log p on plate z alone) and a reference per data point (the
    # risk on (z, data)): lp.tensor (z,) broadcast against (z, data) by torch's trailing rule pairs z's entries
    # with the data points: silently wrong where they are as many (3), a torch error where not (4);
    # storch.aligned lines them up by name
    theta = torch.tensor([0.3, -0.4, 0.8], dtype=torch.float64, requires_grad=True)
    with storch.Graph():
        ref = storch.denote_independent(torch.tensor(refs), 0, "data")
        z = storch.estimator("expect", plate="z")(Categorical(logits=theta.detach()))  # 3 values; set held fixed
        lp = Categorical(logits=theta).log_prob(z)
        delta = (z != ref).double()
        pad = storch.padding(z)
        assert _names(lp) == ("z",) and _names(delta) == ("z", "data")
        zs, logp = z.tensor, torch.log_softmax(theta, -1)
        loop = torch.stack([sum(torch.softmax(logp[zs], -1)[k] * float(zs[k] != r) for k in range(3))
                            for r in refs])                                     # per data point, per entry
        new = _mrt_new(lp, delta, pad)
        assert _names(new) == ("data",)
        assert torch.allclose(new.tensor, loop, atol=1e-12, rtol=0)
        if len(refs) == 3:
            assert not torch.allclose(_mrt_old(lp, delta, pad), loop)
        else:
            with pytest.raises(RuntimeError, match="must match"):
                _mrt_old(lp, delta, pad)
        # the gradient of the loss added through storch is that of the loop (the views keep autograd)
        storch.add_cost(new, name="mrt", credit=False)
        grad, = torch.autograd.grad(storch.surrogate_loss(), theta)
    want, = torch.autograd.grad(loop.mean(), theta)
    assert torch.allclose(grad, want, atol=1e-12, rtol=0)


def test_a_data_plate_in_another_order_and_a_plain_tensor():
    torch.manual_seed(1)
    with storch.Graph():
        x = storch.denote_independent(torch.randn(2, 3), 0, "data")           # (data,), per-sample shape (3,)
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(x.sum(), 1.0))
        v = z * x                                                             # (z, data), per-sample (3,)
        w = torch.tensor([1.0, 2.0, 3.0])                                     # a plain tensor: per-sample dims
        assert _names(v) == ("z", "data")
        (rz, rv, rw), plates = storch.aligned(z, v, w, plates=("data", "z"))
        assert [p.name for p in plates] == ["data", "z"] and plates[0].independent
        assert rz.shape == (2, 4) and rv.shape == (2, 4, 3) and rw.shape == (2, 4, 3)
        zt, xt = z.tensor, x.tensor                                           # z: (z, data); x: (data, 3)
        for d in range(2):
            for i in range(4):
                assert torch.equal(rz[d, i], zt[i, d]) and torch.equal(rv[d, i], zt[i, d] * xt[d])
                assert torch.equal(rw[d, i], w)
        # views, no copies: a plate a value lacks is broadcast with stride 0
        assert rz.data_ptr() == zt.data_ptr() and rw.data_ptr() == w.data_ptr() and rw.stride()[:2] == (0, 0)
        # ...: the plates not listed, where it stands (in plates=None's order)
        (rz2,), plates = storch.aligned(z, plates=(..., "data"))
        assert [p.name for p in plates] == ["z", "data"] and torch.equal(rz2, zt)
        (rv2, rz2), plates = storch.aligned(v, z, plates=("data", ...))
        assert [p.name for p in plates] == ["data", "z"] and torch.equal(rv2, rv) and torch.equal(rz2, rz)
        # plates=None: the order a torch function of the values gives (torch.stack's), returned
        (rx, rv2), plates = storch.aligned(x, v)
        assert plates == (v + 0 * x).plates and torch.equal(rv2, v.tensor)


def _beam():
    """One beam per data point: parents per entry of the data plate (a hand-built lineage, as a beam search's); a
    value of step 0 without the data plate, one of step 2 with it, and the loop: h0 read at step 2, (data, z)."""
    lin = storch.Lineage()
    data = storch.Plate("data", 2, True, 0, storch.Lineage())
    p1 = torch.tensor([[1, 0], [1, 1], [0, 0]])                      # (entries at step 1, data): parent at step 0
    p2 = torch.tensor([[2, 0], [0, 2]])                              # (entries at step 2, data): parent at step 1
    lin.set_parents(1, p1, (data,))
    lin.set_parents(2, p2, (data,))
    s0, s2 = storch.Plate("z", 2, False, 0, lin), storch.Plate("z", 2, False, 2, lin)
    h0 = storch.PlateTensor(torch.tensor([10.0, 11.0]), (s0,))      # step 0, no data plate
    y2 = storch.PlateTensor(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), (s2, data))
    loop = torch.tensor([[float(h0.tensor[p1[p2[i, d], d]]) for i in range(2)] for d in range(2)])  # (data, z)
    return data, s0, s2, h0, y2, loop


def test_steps_of_a_partition_are_re_indexed_by_the_parents_as_an_operand_is():
    # The idiom (h0 + 0 * y2).tensor is right here: the dispatcher re-indexes an earlier step to the later one;
    # storch.aligned does the same, in the order asked
    data, s0, s2, h0, y2, loop = _beam()
    (r0, r2), plates = storch.aligned(h0, y2, plates=("data", "z"))
    assert plates == (data, s2) and torch.equal(r0, loop) and torch.equal(r2, y2.tensor.t())
    old = h0 + 0 * y2
    assert old.plates == (s2, data) and torch.equal(old.tensor, loop.t())
    # a storch.Plate in plates= takes the partition's plate at (at least) its step: h0 with a value on the data
    # plate alone (the plate its parents are chosen per) is re-indexed to step 2 by plates=y2.plates
    (r0, _), plates = storch.aligned(h0, storch.PlateTensor(torch.zeros(2), (data,)), plates=y2.plates)
    assert plates == y2.plates and torch.equal(r0, loop.t())
    (r0,), plates = storch.aligned(h0, plates=("z",))                # no later step named: step 0 as it is
    assert plates == (s0,) and torch.equal(r0, h0.tensor)


def test_a_plate_in_plates_that_no_value_carries_and_the_plate_a_beam_chose_its_parents_per():
    # before: plates=y2.plates with h0 alone was refused ("no value carries a plate 'data'"; the test above passes a
    # value of zeros on the data plate to carry it), and the partition's plate alone, plates=(s2,) (or (..., s2)),
    # failed inside the alignment: "partition 'z' chose its parents per entry of plates ['data'], which the tensor's
    # plates ('z',) do not have"
    data, s0, s2, h0, y2, loop = _beam()
    (r0,), plates = storch.aligned(h0, plates=y2.plates)
    assert plates == y2.plates and torch.equal(r0, loop.t())
    # h0 read at step 2 differs per data point: the data plate is one of the results' plates, where ... stands
    (r0,), plates = storch.aligned(h0, plates=(..., s2))
    assert plates == (data, s2) and torch.equal(r0, loop)
    (r0,), plates = storch.aligned(h0, plates=("data", s2))
    assert plates == (data, s2) and torch.equal(r0, loop)
    with pytest.raises(storch.PlateError, match=r"partition 'z' chose the parents of its entries at step 2 per entry "
                                                r"of plate 'data'.*list \['data'\]"):
        storch.aligned(h0, plates=(s2,))
    # plates=None: a (hand-built) value of step 2 without the data plate; h0 re-indexed to step 2 gains it
    (r0, r2), plates = storch.aligned(h0, storch.PlateTensor(torch.zeros(2), (s2,)))
    assert plates == (s2, data) and torch.equal(r0, loop.t()) and r2.shape == (2, 2)
    # a plate of plates= that no value carries, at the values' step: broadcast over (a view)
    (r0,), plates = storch.aligned(h0, plates=(data, s0))
    assert plates == (data, s0) and torch.equal(r0, h0.tensor.expand(2, 2)) and r0.stride() == (0, 1)
    # a name (not a storch.Plate) no value carries is still refused: its size is unknown
    with pytest.raises(storch.PlateError, match="no value carries a plate 'w'"):
        storch.aligned(h0, plates=("w", s0))


@pytest.mark.parametrize("call, match", [
    (lambda a, b: storch.aligned(a, b, plates=("x",)), r"carry plates \['y'\] that plates= does not list"),
    (lambda a, b: storch.aligned(a, plates=("x", "y", "w")), r"no value carries a plate 'w'"),
    (lambda a, b: storch.aligned(a, plates=("x", "x", "y")), r"names plate 'x' twice"),
    (lambda a, b: storch.aligned(a, plates=(..., "x", ...)), r"holds \.\.\. twice"),
    (lambda a, b: storch.aligned(a, plates="x"), r"a sequence of plate names.*plates=\('x',\)"),
    (lambda a, b: storch.aligned(a, plates=("x", 1)), r"takes plate names .* got a int"),
    (lambda a, b: storch.aligned(a, plates=b"xy"), r"a sequence of plate names, got b'xy': pass plates=\('xy',\)"),
    (lambda a, b: storch.aligned(a, plates=("x", b"y")), r"got a bytes: b'y'; pass the name as a str, 'y'"),
    # a hand-built storch.Plate (no lineage) said "plate 'x' comes from two different graphs"
    (lambda a, b: storch.aligned(a, plates=(storch.Plate("x", 3), "y")),
     r"Plate\(name='x'.* built by hand \(lineage=None\), not one of this graph's plates.*taken from a value of this "
     r"graph.*Pass the plate's name, 'x', in its place"),
    (lambda a, b: storch.aligned(a, plates=(..., storch.Plate("w", 2))),
     r"built by hand.*No value carries a plate 'w': pass the Plate of a value of this graph that has it"),
    (lambda a, b: storch.aligned(a, 3.0), r"value 1 is a float, not a tensor.*torch.as_tensor"),
    (lambda a, b: storch.aligned(), r"at least one value"),
], ids=["unlisted plate", "unknown plate", "twice", "two ...", "a string", "not a name", "bytes", "a bytes name",
        "a hand-built Plate", "a hand-built Plate no value carries", "a number", "nothing"])
def test_bad_input_is_refused_with_what_to_do(call, match):
    with storch.Graph():
        x, y = _two_nodes()
        with pytest.raises(storch.PlateError, match=match):
            call(x + y, y)


def test_a_plate_of_a_hand_built_value_is_its_own():
    # a Plate without lineage that a value carries (a plate tensor built by hand on hand-built plates) is that value's
    x, y = storch.Plate("x", 2), storch.Plate("y", 3)
    v = storch.PlateTensor(torch.arange(6.0).reshape(2, 3), (x, y))
    (r,), plates = storch.aligned(v, plates=(y, x))
    assert plates == (y, x) and torch.equal(r, v.tensor.t())


def test_values_of_two_graphs_are_refused():
    with storch.Graph():
        x, _ = _two_nodes()
    with storch.Graph():
        x2, _ = _two_nodes()
        with pytest.raises(storch.PlateError, match="different graphs"):
            storch.aligned(x, x2, plates=("x",))


def test_the_signature_resolves_at_run_time():
    # typing.get_type_hints (typeguard, pydantic, sphinx's autodoc) raised NameError: name 'ellipsis' is not defined
    import typing

    hints = typing.get_type_hints(storch.aligned)
    assert type(...) in typing.get_args(typing.get_args(typing.get_args(hints["plates"])[0])[0])


def test_a_cost_of_raw_values_in_another_plate_order_added_unwrapped_is_told_the_plates():
    """A per-entry cost computed from raw values lined up in an order of the user's (the data plate first) and added
    as a plain tensor: refused for its shape, as before, but the advice was only to reduce it or use
    storch.denote_independent (both cut it from the samples); now it names the plates to wrap it on (review r-57)."""
    est = storch.estimator("reparameterization", plate="z", n_samples=3)
    with storch.Graph():
        x = storch.denote_independent(torch.randn(2, 4), 0, "data")
        z = est(Normal(x, 1.0))
        c = ((z - x) ** 2).sum(-1)
        assert c.plate_names == ("z", "data")
        (r,), plates = storch.aligned(c, plates=("data", "z"))
        with pytest.raises(storch.CostError) as info:
            storch.add_cost(r * 2.0, name="c")
        message = str(info.value)
        assert "have the sizes of the plates ('z', 'data') of the sample of node 'z', in another order" in message
        assert "storch.PlateTensor(r, plates)" in message
        storch.add_cost(storch.PlateTensor(r * 2.0, plates), name="c")  # the advice, taken
