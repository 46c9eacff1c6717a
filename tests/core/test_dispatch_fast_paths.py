"""Per-op fast paths of the plate dispatcher (issue 19, the per-op part): each is taken (a
``sys.setprofile`` probe, with a control that takes the general path) and equals a loop over the
plate entries where its semantics could differ from the general path."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

import storch
from storch import PlateTensor

from path_probes import calls, graph_ops
from test_fast_paths import GENERAL
from test_plates_dispatch import ZD, check, check_grads, make, rnd

# -- metadata answered in Python --------------------------------------------------------------


def test_metadata_is_answered_without_the_dispatcher():
    x = make(rnd(3, 2, 4, 5), *ZD)
    x.dim()  # warm-up
    for fn in (lambda: x.dim(), lambda: x.ndim, lambda: x.shape, lambda: x.size(), lambda: x.size(-1),
               lambda: x.size(0), lambda: x.dtype, lambda: x.device, lambda: x.ndimension(), lambda: x.numel(),
               lambda: x.is_floating_point()):
        out, seen = calls(fn)
        assert "_torch_function" not in seen, fn
    assert (x.dim(), x.ndim, x.ndimension(), x.numel()) == (2, 2, 2, 20)
    assert x.shape == x.size() == (4, 5) and x.size(0) == 4 and x.size(-1) == 5 and x.size(dim=1) == 5
    assert x.dtype == torch.float64 and x.device == torch.device("cpu") and x.is_floating_point()
    assert not (x > 0).is_floating_point()
    # the answers are those of the dispatched handlers (torch.Tensor's own methods on the wrapper)
    assert torch.Tensor.size(x) == x.size() and torch.Tensor.dim(x) == x.dim() and torch.Tensor.numel(x) == 20
    # the control: an out-of-range dim goes through the dispatcher, which gives torch's own error
    _, seen = calls(lambda: pytest.raises(IndexError, x.size, 2))
    assert "_torch_function" in seen
    with pytest.raises(IndexError, match="out of range"):
        x.size(-3)


# -- a dim argument ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dim", [("sum", -1), ("sum", 0), ("sum", 1), ("logsumexp", -1), ("all", 1),
                                      ("unsqueeze", 0), ("unsqueeze", 2), ("unsqueeze", -3), ("softmax", 1),
                                      ("cumsum", 0), ("amax", -2)])
def test_an_int_dim_takes_the_fast_path_and_equals_a_loop(name, dim):
    x = make(rnd(3, 2, 4, 5), *ZD)
    if name == "all":
        x = x > 0
    fn = (lambda a: getattr(a, name)(dim)) if name != "softmax" else (lambda a: F.softmax(a, dim))
    check(fn, x)
    out, seen = calls(lambda: fn(x))
    assert "_set_dim" not in seen and not seen & GENERAL, sorted(seen)
    # keyword dims, keepdim
    check(lambda a: torch.logsumexp(a, dim=dim if name != "unsqueeze" else -1, keepdim=True), x)
    # the control: no dim (over all per-sample dims) takes the general path
    _, seen = calls(lambda: x.sum())
    assert "_get_dim" in seen


@pytest.mark.parametrize("dim", [0, -1])
def test_unsqueeze_of_a_0_dim_sample_is_one_raw_call(dim):
    """A token per plate entry (a Categorical's sample): ``Categorical.log_prob`` unsqueezes it at every step
    of a sequence; it is one raw unsqueeze after the plate dims, not a call per entry (vmap)."""
    x = make(rnd(3, 2), *ZD)
    check(lambda a: a.unsqueeze(dim), x)
    out, seen = calls(lambda: x.unsqueeze(dim))
    assert tuple(out.tensor.shape) == (3, 2, 1) and not seen & GENERAL, sorted(seen)
    with pytest.raises(storch.PlateError, match="out of range"):
        x.unsqueeze(1)
    logits = make(rnd(3, 2, 4), *ZD)
    token = make(torch.tensor([[0, 3], [1, 2], [2, 0]]), *ZD)
    _, seen = calls(lambda: Categorical(logits=logits).log_prob(token))
    assert "vmap_call" not in seen, sorted(seen)
    check(lambda lg, tk: Categorical(logits=lg).log_prob(tk), logits, token)


def test_an_int_dim_out_of_range_or_with_a_sampled_operand_is_not_fast():
    x = make(rnd(3, 2, 4, 5), *ZD)
    with pytest.raises(storch.PlateError, match="out of range"):
        x.sum(2)
    with pytest.raises(storch.PlateError, match="out of range"):
        x.unsqueeze(3)
    # a sampled prepend goes to vmap, and equals a loop
    p = make(rnd(3, 2, 4, 1, seed=1), *ZD)
    check(lambda a, b: torch.diff(a, 1, -1, prepend=b), x, p)
    # topk(k, dim): the dim is the third argument
    check(lambda a: torch.topk(a, 2, 0).values, x)
    check(lambda a: F.normalize(a, 2.0, 0), x)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "clamp", "relu_inplace_option"])
def test_one_plate_tensor_with_non_tensor_options_is_one_raw_call(name):
    """F.relu (called with inplace=), F.leaky_relu(negative_slope=), clamp(min=): one plate tensor and
    options that are not tensors skip the general loop over operands; values as a loop."""
    fn = {"relu": F.relu, "leaky_relu": lambda a: F.leaky_relu(a, negative_slope=0.2),
          "clamp": lambda a: torch.clamp(a, min=-0.1, max=0.3),
          "relu_inplace_option": lambda a: F.relu(a.clone(), inplace=True)}[name]
    x = make(rnd(3, 2, 4), *ZD)
    fn(x)  # the first call decides the function's treatment (cached)
    out, seen = calls(lambda: fn(x))
    assert "_operands" not in seen and not seen & GENERAL, sorted(seen)
    assert out.plates == x.plates
    check(fn, x)
    # the controls: a tensor option takes the general loop; an in-place method returns its own
    # plate tensor (not a new wrapper)
    lo = make(rnd(3, 2, 4, seed=1), *ZD)
    check(lambda a, b: torch.clamp(a, min=b), x, lo)
    _, seen = calls(lambda: torch.clamp(x, min=lo))
    assert "_operands" in seen
    y = x.clone()
    assert y.clamp_(min=0.0) is y and bool((y.tensor >= 0).all())


def test_broadcast_tensors_of_one_plate_tensor_returns_it_without_the_generator_test():
    """torch.distributions' broadcast_all of one parameter (Bernoulli(logits=x)): the tensor itself, as the test of
    several tensors of equal plates and shape returns them, without that test's generator (issue 19: once a step)."""
    import sys

    from storch.plates.rules import pointwise

    x = make(rnd(3, 2, 4), *ZD)
    ran: list = []

    def probe(frame, event, arg):
        if event == "call" and frame.f_code.co_filename == pointwise.__file__:
            ran.append(frame.f_code.co_name)

    for args in ((x,), (x, x)):
        ran.clear()
        sys.setprofile(probe)
        try:
            out = torch.broadcast_tensors(*args)
        finally:
            sys.setprofile(None)
        assert type(out) is tuple and len(out) == len(args) and all(o is x for o in out)
        if len(args) == 1:
            assert ran == ["_broadcast_tensors"], ran
        else:  # the control: two tensors take the test of equal plates and shapes
            assert "<genexpr>" in ran, ran


# -- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_elementwise_loss_with_equal_plates_skips_broadcasting(reduction):
    x = make(rnd(3, 2, 4), *ZD)
    t = make(torch.rand(3, 2, 4, dtype=torch.float64), *ZD)
    check(lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction=reduction), x, t)
    f = F.binary_cross_entropy_with_logits
    _, seen = calls(lambda: f(x, t, reduction=reduction))
    assert "broadcast_tensors" not in seen and not seen & GENERAL, sorted(seen)
    # a target on fewer plates, in another order than the logits' last plates: aligned by name,
    # broadcast over the rest, as a loop
    d = make(torch.rand(3, 4, dtype=torch.float64), ("z", 3))
    check(lambda a, b: f(a, b, reduction=reduction), x, d)
    _, seen = calls(lambda: f(x, d, reduction=reduction))
    assert "union_plates" in seen and "_broadcast_pair" in seen  # the control: the general path
    assert "broadcast_tensors" not in seen  # ... whose broadcast is two expands, not torch.broadcast_tensors
    # a plain target of a lower rank (not denoted independent): broadcast over every plate, as a loop
    plain = torch.rand(4, dtype=torch.float64)
    check(lambda a: f(a, plain, reduction=reduction), x)
    _, seen = calls(lambda: f(x, plain, reduction=reduction))
    assert "broadcast_tensors" not in seen, sorted(seen)
    # plates in another order
    check(lambda a, b: F.mse_loss(a, b, reduction=reduction), x,
          PlateTensor(x.tensor.transpose(0, 1).contiguous() * 0.5, tuple(reversed(x.plates))))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("loss", ["bce_with_logits", "mse", "mse_swapped"])
def test_elementwise_loss_against_a_target_on_the_last_plates_is_one_expand(loss, reduction):
    """A target on the data plate against logits on (z, data) (a VAE's reconstruction), or a plain
    target of the per-sample shape: expanded once to the logits' raw shape, no alignment."""
    f = {"bce_with_logits": F.binary_cross_entropy_with_logits, "mse": F.mse_loss,
         "mse_swapped": lambda a, b, **kw: F.mse_loss(b, a, **kw)}[loss]
    x = make(rnd(3, 2, 4), *ZD)
    d = make(torch.rand(2, 4, dtype=torch.float64), ("data", 2))
    plain = torch.rand(4, dtype=torch.float64)
    for t in (d, plain):
        f(x, t, reduction=reduction)  # the first call decides the function's treatment (cached)
        out, seen = calls(lambda: f(x, t, reduction=reduction))
        assert "_expand_to_trailing" in seen and not seen & GENERAL and "_broadcast_pair" not in seen, sorted(seen)
        assert out.plates == x.plates
        check(lambda a, b: f(a, b, reduction=reduction), x, t)
        # the same values and gradient as the general path (the target aligned and broadcast by two views)
        xr = x.tensor.detach().requires_grad_()
        tr = t.tensor if type(t) is PlateTensor else t
        got = f(PlateTensor(xr, x.plates), t, reduction=reduction).tensor
        ref = f(xr, tr.expand(xr.shape), reduction="none")
        ref = ref if reduction == "none" else getattr(ref.flatten(2), reduction)(-1)
        assert torch.equal(got, ref)
        assert torch.equal(torch.autograd.grad(got.sum(), xr)[0], torch.autograd.grad(ref.sum(), xr)[0])
    # the control: a target whose data plate has raw size 1 where the logits' is full (not the
    # trailing part of their raw shape) takes the general path
    t = make(torch.rand(1, 4, dtype=torch.float64), ("data", 2))
    check(lambda a, b: f(a, b, reduction=reduction), x, t)
    _, seen = calls(lambda: f(x, t, reduction=reduction))
    assert "union_plates" in seen and "_expand_to_trailing" in seen, sorted(seen)


# -- batch-first: size-1 dims before the batch dim fold by a view -------------------------------------


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
@pytest.mark.parametrize("batched", [False, True])
def test_one_step_recurrent_layer_folds_without_permutes(kind, batched):
    torch.manual_seed(0)
    rnn = getattr(nn, kind)(4, 5).double()  # one layer: states (1, N, H) / (1, H)
    x = make(rnd(3, 2, *((1, 2, 4) if batched else (1, 4))), *ZD)  # one time step
    h = make(rnd(2, *((1, 2, 5) if batched else (1, 5)), seed=2), ("data", 2))  # shared by the z samples
    if kind == "LSTM":
        def fn(a, s):
            return rnn(a, (s, s * 0.5))
    else:
        def fn(a, s):
            return rnn(a, s)
    check(lambda a, s: fn(a, s)[0], x, h)
    check(lambda a, s: fn(a, s)[1], x, h)
    out = fn(x, h)[0]
    ops = graph_ops(out.tensor)
    assert "PermuteBackward0" not in ops, ops
    # the control: two layers have a layer dim of size 2 before the batch dim: moved, as before
    rnn2 = getattr(nn, kind)(4, 5, num_layers=2).double()
    x3 = make(rnd(3, 2, *((7, 2, 4) if batched else (7, 4))), *ZD)
    check(lambda a: rnn2(a)[1] if kind == "GRU" else rnn2(a)[1][0], x3)
    assert "PermuteBackward0" in graph_ops((rnn2(x3)[1] if kind == "GRU" else rnn2(x3)[1][0]).tensor)


def test_one_step_gru_gradients_equal_the_hand_written_batch():
    torch.manual_seed(0)
    gru = nn.GRU(4, 5).double()
    xr, hr = rnd(3, 2, 1, 4), rnd(2, 1, 5, seed=1)
    x, h = make(xr, *ZD), make(hr, ("data", 2))
    out = gru(x, h)[1].tensor  # (3, 2, 1, 5)
    g = torch.autograd.grad(out.square().sum(), list(gru.parameters()))
    # by hand: 6 sequences in one batch, the state expanded over the samples
    ref = gru(xr.reshape(1, 6, 4), hr.reshape(1, 2, 5).expand(3, 2, 5).reshape(1, 6, 5).contiguous())[1]
    torch.testing.assert_close(out.reshape(1, 6, 5), ref)
    for a, b in zip(g, torch.autograd.grad(ref.square().sum(), list(gru.parameters()))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("layer", ["conv", "pool"])
def test_batch_first_call_on_one_plate_returns_the_raw_output_without_a_view(layer):
    """One plate folded into a new batch dim (a conv on one image per data point): the call's output
    is the plate tensor's raw tensor as it is, with the autograd graph of the batched call by hand."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1).double()
    fn = conv if layer == "conv" else (lambda a: F.max_pool2d(a, 2))
    xr = rnd(2, 1, 4, 4).requires_grad_()
    x = make(xr, ("data", 2))
    fn(x)  # the first call decides the function's treatment (cached)
    out, seen = calls(lambda: fn(x))
    assert "unflatten" not in seen and not seen & GENERAL, sorted(seen)
    ref = fn(xr)
    assert graph_ops(out.tensor) == graph_ops(ref)  # no view node: the batched call by hand
    assert torch.equal(out.tensor, ref)
    params = [xr] + (list(conv.parameters()) if layer == "conv" else [])
    for a, b in zip(torch.autograd.grad(out.tensor.square().sum(), params),
                    torch.autograd.grad(ref.square().sum(), params)):
        assert torch.equal(a, b)
    check(fn, make(rnd(2, 1, 4, 4), ("data", 2)))
    # the control: two plates are folded into one batch dim and unfolded by a view
    x2 = make(rnd(3, 2, 1, 4, 4), *ZD)
    check(fn, x2)
    out2, seen = calls(lambda: fn(x2))
    assert "unflatten" in seen, sorted(seen)


@pytest.mark.parametrize("call", ["gru", "conv"])
def test_batch_first_call_on_equal_plates_skips_the_general_bookkeeping(call):
    """Every batched input a positional plate tensor on the same plates (an RNN step whose state is
    per sample, a convolution): folded and called without the general bookkeeping (no ``_set``);
    values per entry as a loop, gradients as the batch written by hand."""
    torch.manual_seed(0)
    if call == "gru":
        layer = nn.GRU(4, 5).double()
        xr, hr = rnd(3, 2, 1, 4).requires_grad_(), rnd(3, 2, 1, 5, seed=1)
        fn = (lambda a, s: layer(a, s)[1])

        def by_hand(a, s):  # 6 sequences in one batch
            return layer(a.reshape(1, 6, 4), s.reshape(1, 6, 5))[1].reshape(3, 2, 1, 5)
    else:
        layer = nn.Conv2d(1, 3, 3, padding=1).double()
        xr, hr = rnd(3, 2, 1, 4, 4).requires_grad_(), None
        fn = (lambda a, s=None: layer(a))

        def by_hand(a, s=None):
            return layer(a.reshape(6, 1, 4, 4)).reshape(3, 2, 3, 4, 4)
    x = make(xr, *ZD)
    args = (x,) + ((PlateTensor(hr, x.plates),) if hr is not None else ())  # one graph: the same plates
    fn(*args)  # the first call decides the function's treatment (cached)
    out, seen = calls(lambda: fn(*args))
    assert "_positional_same_plates" in seen and "_set" not in seen and not seen & GENERAL, sorted(seen)
    check(fn, *(make(a.tensor.detach(), *ZD) for a in args))
    ref = by_hand(xr, hr)
    assert torch.equal(out.tensor, ref)
    params = [xr] + list(layer.parameters())
    for a, b in zip(torch.autograd.grad(out.tensor.square().sum(), params),
                    torch.autograd.grad(ref.square().sum(), params)):
        assert torch.equal(a, b)
    # the controls: an input on fewer plates takes the general path (aligned, expanded), and a
    # per-sample weight (a plate tensor outside the batched inputs) goes to vmap
    if call == "gru":
        h_data = make(rnd(2, 1, 5, seed=2), ("data", 2))
        check(fn, make(xr.detach(), *ZD), h_data)
        _, seen = calls(lambda: fn(args[0], h_data))
        assert "_set" in seen, sorted(seen)
    else:
        w = make(rnd(3, 3, 1, 3, 3, seed=3), ("z", 3))
        check(lambda a, k: F.conv2d(a, k, padding=1), make(xr.detach(), *ZD), w)
        _, seen = calls(lambda: F.conv2d(args[0], w, padding=1))
        assert "vmap_call" in seen, sorted(seen)


def test_rnn_state_of_the_previous_step_of_a_partition_folds_without_the_general_path():
    """An RNN whose state comes from step t-1 of a partition and whose input from step t (the GRU
    decoder of ``storch-compare overhead``): the raw dims line up (no parent indices), so the call
    takes the fast path; the state and gradients equal the same recurrence written by hand."""
    from torch.distributions import Normal

    torch.manual_seed(0)
    gru, out = nn.GRU(4, 5).double(), nn.Linear(5, 4).double()
    xs = rnd(2, 5).requires_grad_()
    est = storch.estimator("reparameterization", plate="walk", n_samples=3)
    raws, seen_at = [], {}
    with storch.Graph():
        h = storch.denote_independent(xs, 0, "data")
        for t in range(3):
            tok = est(Normal(out(h), 1.0))
            raws.append(tok.tensor)  # with its graph: the hand-written recurrence gets the same inputs
            _, seen_at[t] = calls(lambda: gru(tok.unsqueeze(0), h.unsqueeze(0)))
            h = gru(tok.unsqueeze(0), h.unsqueeze(0))[1].squeeze(0)
        got = h.tensor  # (walk, data, 5)
    # step 0: the state is on the data plate only (general path); steps 1, 2: lined-up steps (fast)
    assert "_set" in seen_at[0]
    for t in (1, 2):
        seen = seen_at[t]
        assert "_positional_same_plates" in seen and "_set" not in seen and not seen & GENERAL, sorted(seen)
    # by hand: 6 sequences in one batch, the same inputs
    hr = xs.expand(3, 2, 5).reshape(1, 6, 5).contiguous()
    for r in raws:
        hr = gru(r.reshape(1, 6, 4), hr)[1]
    ref = hr.reshape(3, 2, 5)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    params = [xs] + list(gru.parameters())
    ga = torch.autograd.grad(got.square().sum(), params, retain_graph=True)  # the tokens' graph is shared
    for a, b in zip(ga, torch.autograd.grad(ref.square().sum(), params)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# -- distributions built on plate tensors ------------------------------------------------------------


def test_categorical_validation_on_plate_tensors_asks_no_metadata_of_the_dispatcher():
    logits = make(rnd(3, 2, 4), *ZD)
    OneHotCategorical(logits=logits)
    _, seen = calls(lambda: OneHotCategorical(logits=logits))
    assert not seen & GENERAL, sorted(seen & GENERAL)
    assert "_meta" not in seen


# -- matmul with one plain operand ---------------------------------------------------------------


@pytest.mark.parametrize("per_sample,plain", [((4,), (4,)), ((5, 4), (4,)), ((4,), (4, 3)), ((5, 4), (4, 3))])
def test_matmul_with_a_plain_vector_or_matrix_is_one_call(per_sample, plain):
    """``x @ w`` with plain ``w`` (1-d: a per-sample dot product / matrix-vector product; 2-d) is one
    torch.matmul on the raw tensor, the plates as its batch dims (the ipd rollout's ``a @ w`` per
    step took the general path: a dispatched mul and sum, 8 us instead of 3)."""
    x = make(rnd(3, 2, *per_sample), *ZD)
    w = rnd(*plain, seed=1)
    check(lambda a: a @ w, x)
    check(lambda a: torch.matmul(a, w), x)
    out, seen = calls(lambda: x @ w)
    assert not seen & GENERAL and "_sum" not in seen and "union_plates" not in seen, sorted(seen)
    assert out.shape == torch.matmul(torch.zeros(per_sample, dtype=w.dtype), w).shape
    # gradients equal those of the loop over entries (the dot product's backward included)
    xr = x.tensor.clone().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    (PlateTensor(xr, x.plates) @ wr).tensor.pow(2).sum().backward()
    xl = x.tensor.clone().requires_grad_(True)
    wl = w.clone().requires_grad_(True)
    sum(torch.matmul(xl[i, j], wl).pow(2).sum() for i in range(3) for j in range(2)).backward()
    assert torch.allclose(xr.grad, xl.grad) and torch.allclose(wr.grad, wl.grad)
    # the control: a plate-tensor right operand on other plates takes the general path
    other = make(rnd(2, *plain, seed=2), ("data", 2))
    check(lambda a, b: a @ b, x, other)
    _, seen = calls(lambda: x @ other)
    assert "union_plates" in seen


def test_matmul_of_two_plate_tensors_on_the_same_plates_is_one_call():
    """``x @ y.mT`` with both on the same plates and per-sample matrices of one rank: one batched
    matmul (the plate dims line up as batch dims); a size-1 (shared) plate dim broadcasts."""
    x = make(rnd(3, 2, 4, 5), *ZD)
    y = make(rnd(3, 2, 6, 5, seed=1), *ZD)
    shared = make(rnd(1, 2, 5, 6, seed=2), *ZD)
    for b in (y.mT, shared):
        check(lambda a, c: a @ c, x, b)
        _, seen = calls(lambda: x @ b)
        assert "union_plates" not in seen and not seen & GENERAL, sorted(seen)
    # controls: a per-sample vector, or matrices of different ranks, take the general path
    for b in (make(rnd(3, 2, 5, seed=3), *ZD), make(rnd(3, 2, 2, 5, 6, seed=4), *ZD)):
        check(lambda a, c: a @ c, x, b)
        _, seen = calls(lambda: x @ b)
        assert "union_plates" in seen


# -- matmul and linear of operands on different plates (a sampled weight against data points) -------

# (per-sample shape, plates) of each operand: "w" a sample plate of 3 (a sampled weight), "data" 2
W_, DATA_, BOTH_ = (("w", 3),), (("data", 2),), (("w", 3), ("data", 2))
SAMPLED_WEIGHT = {
    "linear": (lambda x, w: F.linear(x, w), ((4,), DATA_), ((5, 4), W_)),
    "linear_plain_bias": (lambda x, w: F.linear(x, w, rnd(5, seed=9)), ((4,), DATA_), ((5, 4), W_)),
    "linear_sampled_bias": (lambda x, b: F.linear(x, rnd(5, 4, seed=9), b), ((4,), DATA_), ((5,), W_)),
    "linear_both_sampled": (lambda x, w: F.linear(x, w, w[:, 0]), ((4,), DATA_), ((5, 4), W_)),
    "linear_1d_weight": (lambda x, w: F.linear(x, w), ((6, 4), DATA_), ((4,), W_)),
    "linear_x_on_both_plates": (lambda x, w: F.linear(x, w), ((4,), BOTH_), ((5, 4), W_)),
    "linear_x_on_both_plates_reordered": (lambda x, w: F.linear(x, w), ((4,), (("data", 2), ("w", 3))), ((5, 4), W_)),
    "linear_w_on_both_plates": (lambda x, w: F.linear(x, w), ((4,), DATA_), ((5, 4), BOTH_)),
    "linear_2d_x": (lambda x, w: F.linear(x, w), ((6, 4), DATA_), ((5, 4), W_)),
    "matmul": (lambda x, w: torch.matmul(x, w.mT), ((4,), DATA_), ((5, 4), W_)),
    "operator": (lambda x, w: x @ w.mT, ((6, 4), DATA_), ((5, 4), W_)),
    "weight_left": (lambda x, w: w @ x, ((4,), DATA_), ((5, 4), W_)),
    "weight_left_2d_x": (lambda x, w: w @ x.mT, ((6, 4), DATA_), ((5, 4), W_)),
    "stacks": (lambda x, w: x @ w, ((7, 6, 4), DATA_), ((7, 4, 5), W_)),
    "stack_against_a_matrix": (lambda x, w: x @ w, ((7, 6, 4), DATA_), ((4, 5), W_)),
}


def _operand(shape, plates, seed):
    return make(rnd(*[s for _, s in plates], *shape, seed=seed), *plates)


@pytest.mark.parametrize("name", sorted(SAMPLED_WEIGHT))
def test_matmul_of_a_sampled_weight_and_data_points_equals_a_loop(name):
    """x on a data plate times a weight on a sample plate (F.linear, matmul, @, either side, with a
    plain, a sampled or no bias, 1-d and 2-d per-sample x, stacks of matrices): values, gradients and
    second derivatives equal those of a loop over the entries of both plates."""
    fn, (xs, xp), (ws, wp) = SAMPLED_WEIGHT[name]
    x, w = _operand(xs, xp, 0), _operand(ws, wp, 1)
    check(fn, x, w)
    xr, wr = x.tensor.clone().requires_grad_(True), w.tensor.clone().requires_grad_(True)
    out = fn(PlateTensor(xr, x.plates), PlateTensor(wr, w.plates)).tensor.pow(2).sum()
    g = torch.autograd.grad(out, (xr, wr), create_graph=True)
    xl, wl = x.tensor.clone().requires_grad_(True), w.tensor.clone().requires_grad_(True)
    xi, wi = [p.name for p in x.plates], [p.name for p in w.plates]
    loop = 0
    for a in range(3):
        for d in range(2):
            at = {"w": a, "data": d}
            loop = loop + fn(xl[tuple(at[p] for p in xi)], wl[tuple(at[p] for p in wi)]).pow(2).sum()
    e = torch.autograd.grad(loop, (xl, wl), create_graph=True)
    torch.testing.assert_close(g, e)
    # second order (the surrogate of a higher-order estimator differentiates through the product)
    torch.testing.assert_close(torch.autograd.grad(g[1].pow(2).sum(), xr), torch.autograd.grad(e[1].pow(2).sum(), xl))


def _largest_saved(fn):
    """fn() and the largest number of elements of a tensor saved for its backward."""
    sizes = [0]

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, max(sizes)


def test_a_sampled_weight_is_not_copied_per_data_point(monkeypatch):
    """F.linear(x, W) (and x @ W.mT, W @ x) with x on a data plate of B and W on a sample plate of n:
    the data plate is folded into the rows of one (B, IN) @ (IN, n*H) product, and the weight is not
    expanded per data point (torch.matmul broadcasting copied it: an n*B*H*IN tensor saved for the
    backward, >10x the hand-written batch at n=4). The controls: with the fold replaced by
    torch.matmul (the old path) the probe sees the copy; operands that share every batch dim go to
    torch.matmul, which copies nothing."""
    from storch.plates.rules import shape

    n, B, H, IN = 3, 8, 5, 4
    x = make(rnd(B, IN).requires_grad_(True), ("data", B))
    w = make(rnd(n, H, IN, seed=1).requires_grad_(True), ("w", n))
    copy = n * B * H * IN
    for fn in (lambda: F.linear(x, w), lambda: x @ w.mT, lambda: w @ x, lambda: F.linear(x, w, w[:, 0])):
        (out, largest), seen = calls(lambda: _largest_saved(fn))
        assert largest <= n * H * IN, largest  # the operands themselves, at most
        assert "_broadcast_matmul" in seen and "mm" in seen and "bmm" not in seen, sorted(seen)
        ops = graph_ops(out.tensor)
        assert "ExpandBackward0" not in ops and ops["MmBackward0"] == 1, ops
    # control: the old path (torch.matmul's broadcasting) materialises the copy, and the probe sees it
    monkeypatch.setattr(shape, "_broadcast_matmul", torch.matmul)
    out, largest = _largest_saved(lambda: F.linear(x, w))
    assert largest >= copy and "ExpandBackward0" in graph_ops(out.tensor)
    monkeypatch.undo()
    # control: every batch dim in both operands (plates in another order): plain torch.matmul
    y = make(rnd(B, n, IN, seed=2), ("data", B), ("w", n))
    v = make(rnd(n, B, H, IN, seed=3), ("w", n), ("data", B))
    check(lambda a, c: F.linear(a, c), y, v)
    _, seen = calls(lambda: F.linear(y, v))
    assert "_broadcast_matmul" in seen and "matmul" in seen and "mm" not in seen, sorted(seen)


# -- the slow paths an audit of common ops found (issue 19, per op) --------------------------------
# Every op a model commonly runs was timed on plate tensors against the raw call; most cost the
# wrapper's floor (+2-3 us), these did not: einsum and the default-p norm went through vmap
# (+68 and +58 us), linalg.vector_norm too, gather/cat/stack always aligned and expanded, dropout in
# eval mode expanded every plate to draw nothing, a loss against a plain or data-plate target called
# torch.broadcast_tensors. Each test checks values per plate entry (a loop) and the path taken.

EINSUMS = [
    ("ij,jk->ik", (True, False)),  # per-sample matrix times a plain one
    ("ij,kj->ik", (True, True)),  # two plate operands
    ("ij,jk", (True, False)),  # implicit output
    ("i,i->", (True, True)),  # dot product
    ("ij->j", (True,)),  # a reduction
    ("bi,Bi->bB", (True, False)),  # upper-case labels
    ("k,kd->d", (True, False)),  # the mixture model's pick of a mean (tests/models/test_gaussian_mixture.py)
]


@pytest.mark.parametrize("equation,plate", EINSUMS)
def test_einsum_is_one_call_on_the_raw_tensors(equation, plate):
    terms = equation.split("->")[0].split(",")
    sizes = {"i": 4, "j": 5, "k": 3, "b": 2, "B": 3, "d": 4}
    ops = []
    for n, (term, is_plate) in enumerate(zip(terms, plate)):
        shape = tuple(sizes[c] for c in term)
        ops.append(make(rnd(3, 2, *shape, seed=n), *ZD) if is_plate else rnd(*shape, seed=n))
    check(lambda *a: torch.einsum(equation, *a), *[o for o in ops if type(o) is PlateTensor]) if all(plate) else \
        check(lambda a: torch.einsum(equation, a, *ops[1:]), ops[0])
    _, seen = calls(lambda: torch.einsum(equation, *ops))
    assert "vmap_call" not in seen and "_einsum" in seen, sorted(seen)
    # the list form of the operands
    out = torch.einsum(equation, ops)
    assert torch.allclose(out.tensor, torch.einsum(equation, *ops).tensor)


def test_einsum_on_different_plates_and_fallbacks():
    x = make(rnd(3, 2, 4, 5), *ZD)
    y = make(rnd(2, 5, seed=1), ("data", 2))  # fewer plates: aligned
    check(lambda a, b: torch.einsum("ij,j->i", a, b), x, y)
    _, seen = calls(lambda: torch.einsum("ij,j->i", x, y))
    assert "vmap_call" not in seen and "union_plates" in seen
    # an ellipsis of the user's own: the plates are letters of their own (see the ellipsis tests below)
    check(lambda a: torch.einsum("...j,jk->...k", a, rnd(5, 2, seed=2)), x)
    _, seen = calls(lambda: torch.einsum("...j,jk->...k", x, rnd(5, 2, seed=2)))
    assert "vmap_call" not in seen
    # the control: a term whose rank is not the per-sample rank goes to vmap, for torch's own error in
    # per-sample shapes
    _, seen = calls(lambda: pytest.raises(storch.PlateError, torch.einsum, "ijk,jk->i", x, rnd(5, 2)))
    assert "vmap_call" in seen
    with pytest.raises(storch.PlateError):
        torch.einsum("...ijk,jk->i", x, rnd(5, 2))  # (with an ellipsis: fewer per-sample dims than letters)


# (equation, the per-sample shape of each operand, its plates or None for a plain tensor)
_D = (("data", 2),)
EINSUM_ELLIPSIS = {
    "matmul": ("...j,jk->...k", [(4, 5), (5, 2)], [ZD, None]),
    "batch matmul": ("...ij,...jk->...ik", [(6, 4, 5), (6, 5, 3)], [ZD, _D]),  # operands on different plates
    "batch, plain batch": ("b...ij,bjk->b...ik", [(2, 6, 4, 5), (2, 5, 3)], [ZD, None]),
    "implicit output": ("...ij,jk", [(6, 4, 5), (5, 3)], [_D, ZD]),
    "trace": ("...ii->...", [(6, 4, 4)], [ZD]),
    "implicit trace": ("...ii", [(4, 4)], [ZD]),
    "ellipsis last": ("i...->...i", [(4, 6, 5)], [ZD]),
    "empty ellipsis": ("...i,...i->...", [(4,), (4,)], [ZD, (("z", 3),)]),
    "broadcast ellipsis": ("...i,...i->...", [(6, 4), (1, 4)], [_D, ZD]),
    "outer": ("...i,j->...ij", [(6, 4), (3,)], [ZD, ZD]),
}
EINSUM_PLAIN = {  # no ellipsis (the letters path too)
    "trace": ("ii->", [(4, 4)], [ZD]),
    "outer": ("i,j->ij", [(4,), (3,)], [ZD, _D]),
    "batch": ("bij,bjk->bik", [(2, 4, 5), (2, 5, 3)], [ZD, ZD]),
    "matmul, plates swapped": ("ij,jk->ik", [(4, 5), (5, 3)], [ZD, (("data", 2), ("z", 3))]),
}


def _einsum_operands(shapes, plates):
    leaves, ops = [], []
    for n, (shape, lay) in enumerate(zip(shapes, plates)):
        raw = rnd(*[s for _, s in lay or ()], *shape, seed=n).requires_grad_(True)
        leaves.append(raw)
        ops.append(raw if lay is None else make(raw, *lay))
    return leaves, ops


@pytest.mark.parametrize("name", [*("ellipsis: " + k for k in EINSUM_ELLIPSIS), *("plain: " + k for k in EINSUM_PLAIN)])
def test_einsum_plates_as_letters_equal_the_loop_and_vmap(name):
    """Issue 19: an equation with an ellipsis went to vmap (slower, and torch's vmap leaves a garbage
    cycle per call); now every equation gets one subscript letter per plate, leading the plate
    operands and the result. Values and gradients equal the loop over plate entries and the vmap
    path, and the call is one torch.einsum on the raw tensors."""
    kind, key = name.split(": ")
    equation, shapes, plates = (EINSUM_ELLIPSIS if kind == "ellipsis" else EINSUM_PLAIN)[key]
    leaves, ops = _einsum_operands(shapes, plates)
    pos = [i for i, o in enumerate(ops) if type(o) is PlateTensor]

    def fn(*plated):
        it = iter(plated)
        return torch.einsum(equation, *[next(it) if i in pos else o for i, o in enumerate(ops)])

    out = check_grads(fn, [ops[i] for i in pos], leaves)
    _, seen = calls(lambda: fn(*[ops[i] for i in pos]))
    assert "vmap_call" not in seen and "_einsum" in seen, sorted(seen)
    # the vmap path (the treatment before): the same values and gradients
    from storch.plates.rules.vmap import vmap_call

    ref = vmap_call(torch.einsum, (equation, *ops), {})
    assert ref.plates == out.plates
    torch.testing.assert_close(out.tensor.expand_as(ref.tensor), ref.tensor)
    w = rnd(*ref.tensor.shape, seed=9)
    again = fn(*[ops[i] for i in pos])  # (check_grads differentiated the first)
    got = torch.autograd.grad((again.tensor.expand_as(w) * w).sum(), leaves)
    want = torch.autograd.grad((ref.tensor * w).sum(), leaves)
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h)


def test_einsum_sublist_format_with_an_ellipsis():
    """torch turns the sublist format into an equation before dispatch: Ellipsis in a sublist is ``...``."""
    leaves, (x, y) = _einsum_operands([(6, 4, 5), (5, 3)], [ZD, None])
    fn = lambda a: torch.einsum(a, [Ellipsis, 0, 1], y, [1, 2], [Ellipsis, 0, 2])  # noqa: E731
    check_grads(fn, [x], leaves)
    _, seen = calls(lambda: fn(x))
    assert "vmap_call" not in seen and "_einsum" in seen, sorted(seen)


@pytest.mark.parametrize("fn", [
    lambda a: a.norm(dim=-1), lambda a: torch.norm(a, dim=0), lambda a: a.norm(), lambda a: a.norm(p=2, dim=(0, 1)),
    lambda a: a.norm(1, -1), lambda a: torch.linalg.vector_norm(a, dim=-1), lambda a: torch.linalg.vector_norm(a),
    lambda a: torch.linalg.vector_norm(a, 3, dim=0, keepdim=True), lambda a: torch.linalg.norm(a, dim=-1),
    lambda a: torch.linalg.norm(a, "fro", dim=(0, 1)), lambda a: a.norm("nuc", dim=(0, 1)),
    # over all of a sample's elements, every per-sample dim kept (a keepdim that once kept only one)
    lambda a: torch.linalg.vector_norm(a, keepdim=True), lambda a: torch.norm(a, dim=None, keepdim=True),
    lambda a: a.sum(dim=None, keepdim=True), lambda a: a.mean(None, keepdim=True),
    lambda a: a.norm(3, None, keepdim=True),
])
def test_norms_with_dims_translate_them(fn):
    x = make(rnd(3, 2, 4, 5), *ZD)
    check(fn, x)
    _, seen = calls(lambda: fn(x))
    assert "vmap_call" not in seen, sorted(seen)


def test_norms_that_depend_on_the_per_sample_rank_go_to_vmap():
    x = make(rnd(3, 2, 4, 5), *ZD)
    for fn in (lambda a: a.norm("nuc"), lambda a: torch.linalg.norm(a), lambda a: torch.linalg.norm(a, 2),
               lambda a: torch.linalg.vector_norm(a, 2, None, True)):  # positional after dim=None: torch's own
        check(fn, x)
        _, seen = calls(lambda: fn(x))
        assert "vmap_call" in seen


def test_gather_cat_stack_on_equal_plates_skip_alignment():
    x = make(rnd(3, 2, 4, 5), *ZD)
    i = make(torch.randint(0, 5, (3, 2, 4, 1), generator=torch.Generator().manual_seed(3)), *ZD)
    for fn, args in ((lambda a, b: a.gather(-1, b), (x, i)), (lambda a, b: torch.gather(a, 1, b), (x, i)),
                     (lambda a, b: torch.cat([a, a * 2], -1), (x, i)), (lambda a, b: torch.cat((a, a), 0), (x, i)),
                     (lambda a, b: torch.stack([a, a + 1]), (x, i)), (lambda a, b: torch.stack([a, a], dim=-1), (x, i))):
        check(fn, *args)
        _, seen = calls(lambda: fn(*args))
        assert not seen & GENERAL and "_full" not in seen, sorted(seen)
    # controls: an index on fewer plates, a plain operand, a broadcast plate dim take the general path
    j = make(torch.randint(0, 5, (2, 4, 1), generator=torch.Generator().manual_seed(4)), ("data", 2))
    shared = make(rnd(1, 2, 4, 5, seed=5), *ZD)  # size 1 on z: shared by every sample
    for fn, args in ((lambda a, b: a.gather(-1, b), (x, j)), (lambda a, b: torch.cat([a, b], 0), (x, rnd(1, 5))),
                     (lambda a, b: torch.stack([a, b]), (x, shared))):
        check(fn, *args)
        _, seen = calls(lambda: fn(*args))
        assert "union_plates" in seen


@pytest.mark.parametrize("fn", [lambda a: F.dropout(a, 0.3, False), lambda a: F.dropout(a, 0.3, training=False),
                                lambda a: torch.dropout(a, 0.3, False), lambda a: F.alpha_dropout(a, 0.3, False),
                                lambda a: F.alpha_dropout(a, 0.3)])  # alpha_dropout's training defaults to False
def test_dropout_in_eval_mode_returns_its_input(fn):
    x = make(rnd(1, 2, 4), *ZD)  # shared over z: training-mode dropout would expand it
    state = torch.get_rng_state()
    assert fn(x) is x
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    m = nn.Dropout(0.3).eval()
    assert m(x) is x
    # the control: in training mode every plate entry gets its own mask
    torch.manual_seed(0)
    y = F.dropout(make(torch.ones(1, 2, 400, dtype=torch.float64), *ZD), 0.5, True)
    assert y.tensor.shape == (3, 2, 400) and not torch.equal(y.tensor[0], y.tensor[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_one_class_target_per_sample(name, reduction):
    """Class losses with one target per sample: the per-sample mean/sum is the loss itself (NaN where
    the target is ignore_index and reduction is mean, as torch gives for one sample)."""
    f = getattr(F, name)
    x = make(rnd(3, 2, 5), *ZD)
    t = make(torch.randint(0, 5, (3, 2), generator=torch.Generator().manual_seed(6)), *ZD)
    check(lambda a, b: f(a, b, reduction=reduction), x, t)
    t.tensor[0, 1] = -100  # ignored
    out = f(x, t, reduction=reduction).tensor
    want = f(x.tensor[0, 1], t.tensor[0, 1], reduction=reduction)
    assert torch.equal(out[0, 1].isnan(), want.isnan()) and (want.isnan() or torch.allclose(out[0, 1], want))
    # with class weights: the weighted mean of one term is still that term's loss
    w = torch.rand(5, dtype=torch.float64) + 0.5
    t.tensor[0, 1] = 2
    check(lambda a, b: f(a, b, w, reduction=reduction), x, t)


def test_sampled_index_reuses_its_plate_aranges():
    """``v[i]`` with a plate-tensor index indexes the plate dims by aranges, made once per shape and
    device (not two torch.arange calls per indexing); also when first made in inference mode, the
    cached aranges are normal tensors that a later differentiated call can save for backward."""
    from storch.plates.rules import indexing

    indexing._ARANGES.clear()
    v = make(rnd(3, 2, 5).requires_grad_(True), *ZD)
    i = make(torch.randint(0, 5, (3, 2, 4), generator=torch.Generator().manual_seed(7)), *ZD)
    with torch.inference_mode():
        v[i]
    check(lambda a, b: a[b], v, i)
    _, seen = calls(lambda: v[i])
    assert "arange" not in seen and "_arange" in seen, sorted(seen)
    out = v[i]
    out.tensor.sum().backward()  # the arange made in inference mode is saved for backward
    counts = torch.zeros(3, 2, 5, dtype=torch.float64)
    counts.scatter_add_(2, i.tensor, torch.ones(3, 2, 4, dtype=torch.float64))
    assert torch.equal(v.tensor.grad, counts)
    # the control: a new plate size makes a new arange
    _, seen = calls(lambda: make(rnd(4, 2, 5), ("z", 4), ("data", 2))[make(i.tensor[:1].expand(4, 2, 4), ("z", 4), ("data", 2))])
    assert "arange" in seen


# -- einsum: random equations on random plate layouts, against the loop over plate entries ----------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_SIZES = {"a": 2, "b": 3, "c": 2, "d": 3}
_LAYOUTS = [None, (("z", 3),), (("z", 3), ("data", 2)), (("data", 2),), (("data", 2), ("z", 3))]


@st.composite
def _einsum_case(draw):
    n_ops = draw(st.integers(1, 3))
    terms = [draw(st.text(alphabet="abcd", min_size=1, max_size=3)) for _ in range(n_ops)]
    layouts = [draw(st.sampled_from(_LAYOUTS)) for _ in range(n_ops)]
    if all(lay is None for lay in layouts):
        layouts[0] = _LAYOUTS[1]
    shared = [draw(st.booleans()) for _ in range(n_ops)]  # a size-1 first plate dim (shared entries)
    labels = sorted(set("".join(terms)))
    out = draw(st.one_of(st.none(), st.permutations(labels).map(lambda p: p[:len(p) // 2 + 1])))
    lhs = ",".join(terms)
    equation = lhs if out is None else lhs + "->" + "".join(out)
    return equation, terms, layouts, shared


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(_einsum_case())
def test_einsum_equals_the_loop_on_random_layouts(case):
    """Any per-sample equation (repeated labels: diagonals and traces; implicit or explicit output),
    operands plain or on plates in either order, a plate dim of size 1 (one value shared by every
    entry): the result is the equation applied to each plate entry alone."""
    equation, terms, layouts, shared = case
    ops = []
    for n, (term, lay, one) in enumerate(zip(terms, layouts, shared)):
        shape = tuple(_SIZES[c] for c in term)
        if lay is None:
            ops.append(rnd(*shape, seed=n))
        else:
            sizes = [1 if (one and i == 0) else s for i, (_, s) in enumerate(lay)]
            ops.append(make(rnd(*sizes, *shape, seed=n), *lay))
    plate_ops = [o for o in ops if type(o) is PlateTensor]

    def fn(*plated):
        it = iter(plated)
        return torch.einsum(equation, *[next(it) if type(o) is PlateTensor else o for o in ops])

    check(fn, *plate_ops)
    _, seen = calls(lambda: fn(*plate_ops))
    assert "vmap_call" not in seen


@pytest.mark.parametrize("per_sample", [(4,), (4, 5), (3, 4, 5)])
def test_reductions_over_a_whole_sample(per_sample):
    """Without dim, a reduction covers all of a sample's elements: one call with every per-sample
    dim where the function takes a tuple of dims (no reshape, no view in the backward), a
    flattened view otherwise (norm, whose default p='fro' refuses more than two dims; max, prod);
    keepdim keeps every per-sample dim. Against torch per sample, at 1, 2 and 3 per-sample dims."""
    x = make(rnd(3, 2, *per_sample).abs() + 0.1, *ZD)
    for fn in (lambda a: a.sum(), lambda a: a.mean(None, keepdim=True), lambda a: a.std(), lambda a: a.var(correction=0),
               lambda a: a.amax(), lambda a: (a > 0.5).any(), lambda a: a.count_nonzero(), lambda a: a.nansum(),
               lambda a: torch.linalg.vector_norm(a, 3), lambda a: torch.linalg.vector_norm(a, keepdim=True),
               lambda a: a.norm(), lambda a: a.norm(p=3), lambda a: a.norm(keepdim=True), lambda a: a.prod(),
               lambda a: a.max(), lambda a: a.logsumexp(dim=tuple(range(len(per_sample))))):
        check(fn, x)
    _, seen = calls(lambda: x.sum())
    assert "reshape" not in seen, sorted(seen)
    _, seen = calls(lambda: x.norm())  # the control: the flattened view
    assert "reshape" in seen


# -- torch's operators written in Python --------------------------------------------------------------


OPERATORS = {
    "1 - x": lambda x: 1 - x, "2 / x": lambda x: 2 / x, "x ** 2": lambda x: x ** 2, "2 ** x": lambda x: 2 ** x,
    "x // 0.5": lambda x: x // 0.5, "3 // x": lambda x: 3 // x, "3 % x": lambda x: 3 % x,
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_python_operators_skip_torchs_python_dispatch_and_equal_a_loop(name):
    """``1 - x``, ``2 / x``, ``x ** 2`` ...: torch writes these operators in Python, and they reached the
    dispatcher through ``handle_torch_function`` (~2 us each); plate tensors call it directly. The control:
    inside a TorchFunctionMode they take torch's path, and the mode sees the call."""
    from torch.overrides import TorchFunctionMode

    fn = OPERATORS[name]
    x = make(rnd(3, 2, 4).abs() + 0.5, *ZD)
    check(fn, x)
    _, seen = calls(lambda: fn(x))
    assert "_torch_function" in seen and "handle_torch_function" not in seen, sorted(seen)

    class Count(TorchFunctionMode):
        funcs: list = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.funcs.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        out, seen = calls(lambda: fn(x))
    assert "handle_torch_function" in seen and Count.funcs
    torch.testing.assert_close(out.tensor, fn(x).tensor)


def test_reflected_operators_with_a_tensor_keep_the_tensors_operator():
    """``t - x`` and ``t / x`` with a plain tensor ``t``: Python asks the plate tensor's ``__rsub__`` first (a
    subclass), which leaves it to ``t.__sub__``, as before (``t / x`` stays a division: torch's ``__rdiv__``
    multiplies by a reciprocal); a str operand still gives Python's TypeError."""
    x = make((rnd(3, 2, 4).abs() + 0.5).requires_grad_(), *ZD)
    t = rnd(4, seed=1)
    check(lambda a: t - a, x)
    check(lambda a: t / a, x)
    assert (t - x).tensor.grad_fn.name() == "SubBackward0"
    assert (t / x).tensor.grad_fn.name() == "DivBackward0"
    with pytest.raises(TypeError, match="unsupported operand"):
        x ** "2"


# -- a sampled size is refused on the error path only ------------------------------------------------------------


def test_shape_calls_with_plain_sizes_do_not_look_for_a_sampled_size():
    """view / reshape / expand / repeat / new_zeros & co. refuse a sampled size (a PlateTensor where torch takes a
    Python number), but only once the call has failed: with plain sizes they neither scan the sizes nor name the
    call (review r-52: the refusal's describe(func) ran on every view / reshape / expand, 1-2 us each)."""
    x = make(rnd(3, 2, 4, 5), *ZD)
    n = PlateTensor(torch.tensor([2, 3, 2]), [storch.Plate("z", 3)])
    for fn in (lambda: x.view(-1), lambda: x.view(20), lambda: x.reshape(x.shape[0], -1),
               lambda: torch.reshape(x, (5, 4)), lambda: x[:1].expand(3, 5), lambda: x.expand(size=(2, 4, 5)),
               lambda: x.repeat(2, 1), lambda: x.new_zeros(x.shape), lambda: x.new_full((2,), 1.0),
               lambda: x.new_empty_strided((2, 3), (3, 1)), lambda: x.new_tensor([1.0, 2.0])):
        fn()  # warm-up
        out, seen = calls(fn)
        assert "refuse_sampled_size" not in seen and "describe" not in seen, fn
        assert type(out) in (PlateTensor, torch.Tensor)
    assert x.view(-1).shape == (20,) and x.reshape(x.shape[0], -1).shape == (4, 5)
    assert torch.equal(x[:1].expand(3, 5).tensor, x.tensor[:, :, :1].expand(3, 2, 3, 5))
    assert x.new_zeros(x.shape).shape == (4, 5) and type(x.new_zeros(3)) is torch.Tensor
    # the control: a sampled size fails, and the refusal names the call and what to write
    for fn, what in ((lambda: x.view(n, -1), "Tensor.view"), (lambda: x.reshape([n, -1]), "Tensor.reshape"),
                     (lambda: x[:1].expand(size=(n, 5)), "Tensor.expand"), (lambda: x.repeat(n, 1), "Tensor.repeat"),
                     (lambda: x.new_zeros(n), "Tensor.new_zeros"), (lambda: x.new_full((n,), 1.0), "Tensor.new_full"),
                     (lambda: x.new_empty_strided((n,), (1,)), "Tensor.new_empty_strided")):
        with pytest.raises(storch.PlateError, match=f"{what} got a sampled size .*keep a fixed maximum length"):
            fn()
    with pytest.raises(storch.PlateError, match=r"data\.detach\(\)\.clone\(\)"):
        x.new_tensor(n)
