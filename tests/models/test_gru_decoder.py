"""An autoregressive GRU decoder: one estimator instance over the steps is one partition (issue 10).

The model (``storch_bench.gru_decoder``) is written once for one image and one sequence: an
``nn.GRU`` called one step at a time with unbatched ``(1, embed)`` input. (a) its layers on plate
tensors equal a loop over the plate entries; (b) it trains with score + leave-one-out; (c) one step's
gradient equals the hand-written batched model's with the same token samples.
"""

import torch
import torch.nn.functional as F

import storch
from model_checks import PLATES, assert_per_entry, assert_same_grads, assert_trains, grads, layout, lift
from storch_bench.gru_decoder import GRUDecoder, hand_surrogate, storch_surrogate


def _images(b: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 64, generator=g) < 0.4).to(dtype)


def _model(**kw) -> GRUDecoder:
    return GRUDecoder(hidden=12, n_tokens=5, embed=6, steps=kw.pop("steps", 4), **kw)


def test_layers_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    model = _model()
    x = lift(_images(2), PLATES[1:])
    assert_per_entry(model.initial_state, x)
    token = lift(F.one_hot(torch.randint(5, (3, 2)), 5).float())
    h = lift(torch.randn(3, 2, 12))
    assert_per_entry(model.step, token, h)
    assert_per_entry(model.step, token, lift(torch.randn(2, 12), PLATES[1:]))  # h before the first sample
    assert_per_entry(model.reconstruction, h, x)


def test_one_partition_over_the_steps():
    torch.manual_seed(1)
    model = _model()
    est = storch.estimator("score", plate="seq", n_samples=3, baseline="leave_one_out")
    with storch.Graph() as g:
        tokens = storch_surrogate(model, est, _images(4))
        assert len(g.nodes) == 1
        for t in tokens:
            assert {p.name: p.size for p in t.plates} == {"seq": 3, "data": 4}
            assert t.shape == (5,) and torch.equal(t.tensor.sum(-1), torch.ones_like(t.tensor.sum(-1)))


def test_three_training_steps_score_leave_one_out():
    torch.manual_seed(2)
    model = _model()
    est = storch.estimator("score", plate="seq", n_samples=4, baseline="leave_one_out")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = _images(8)
    assert_trains(model, opt, lambda graph: storch_surrogate(model, est, x))


def test_score_leave_one_out_gradient_equals_hand_written():
    torch.manual_seed(3)
    model = _model().double()
    x, n = _images(5, dtype=torch.float64), 4
    params = list(model.parameters())
    est = storch.estimator("score", plate="seq", n_samples=n, baseline="leave_one_out")
    with storch.Graph():
        tokens = storch_surrogate(model, est, x)
        g_storch = grads(storch.surrogate_loss(), params)
    samples = [layout(t, ("seq", "data")) for t in tokens]
    g_hand = grads(hand_surrogate(model, x, n, leave_one_out=True, tokens=samples), params)
    assert_same_grads(g_storch, g_hand, [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_benchmark_pair_same_gradient():
    # the `rnn` row of storch-compare overhead: with one seed both sides draw the same samples
    from storch_bench.overhead import PROBLEMS

    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")
    with_storch, by_hand, sync = PROBLEMS["rnn"]("loo", est, 4, 3)
    sync()
    torch.manual_seed(5)
    g_storch = with_storch().clone()
    torch.manual_seed(5)
    assert_same_grads([g_storch], [by_hand().clone()])


def test_benchmark_skips_estimators_without_partitions():
    from storch_bench.overhead import measure

    assert measure("rnn", "gumbel_softmax", batch=4, n=3).note.startswith("rnn:")


def test_score_leave_one_out_over_the_partition_is_unbiased_to_order_2():
    # z-test: R independent estimates (replicates of one input on an independent plate) of the
    # gradient and Hessian of E[C] w.r.t. the input, against enumerating all 3^2 token sequences
    # with the same one-sample model code on plain tensors
    import itertools

    from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

    torch.manual_seed(6)
    model = GRUDecoder(n_in=4, hidden=3, n_tokens=3, embed=2, steps=2).double()
    image = torch.rand(4, dtype=torch.float64)
    est = storch.estimator("score", plate="seq", n_samples=3, baseline="leave_one_out")
    with storch.Graph():
        leaf, x = replicate(image, 3000)
        h = model.initial_state(x)
        for _ in range(model.steps):
            h = model.step(est(torch.distributions.OneHotCategorical(logits=model.out(h))), h)
        storch.add_cost(model.reconstruction(h, x), name="reconstruction")
        grad, hess = per_replicate_derivatives(storch.surrogate_loss(order=2), leaf, 2)

    def expected(x):
        total = 0.0
        for seq in itertools.product(range(3), repeat=model.steps):
            h, logp = model.initial_state(x), 0.0
            for t in seq:
                logp = logp + torch.log_softmax(model.out(h), -1)[t]
                h = model.step(F.one_hot(torch.tensor(t), 3).double(), h)
            total = total + logp.exp() * model.reconstruction(h, x)
        return total

    g_exact = torch.autograd.functional.jacobian(expected, image)
    h_exact = torch.autograd.functional.hessian(expected, image)
    assert_unbiased(grad, g_exact, "gradient")
    assert_unbiased(hess, h_exact, "Hessian")
    assert float(g_exact.abs().max()) > 0.1 and float(h_exact.abs().max()) > 0.01
