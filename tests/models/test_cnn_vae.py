"""A discrete VAE with a CNN encoder and a ConvTranspose decoder on 8x8 images (issue 10).

The model (``storch_bench.conv_vae``) is written once for one image; storch runs it over the
data plate and the sample plate. (a) its layers on plate tensors equal a loop over the plate
entries; (b) it trains with score + leave-one-out and with the Gumbel-softmax relaxation;
(c) one step's gradient equals the hand-written batched model's with the same samples.
"""

import pytest
import torch

import storch
from model_checks import PLATES, assert_per_entry, assert_same_grads, assert_trains, grads, layout, lift
from storch_bench.conv_vae import ConvVAE, batched_reconstruction, hand_surrogate, storch_surrogate


def _images(b: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, 8, 8, generator=g) < 0.4).to(dtype)


def test_layers_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    model = ConvVAE(n_latent=6, channels=(4, 8))
    x = lift(torch.randn(3, 2, 1, 8, 8))
    assert_per_entry(model.encoder, x)
    z = lift(torch.rand(3, 2, 6).round())
    assert_per_entry(model.decoder, z)
    x_data = lift(_images(2), PLATES[1:])  # the images live on the data plate only
    assert_per_entry(model.reconstruction, z, x_data)
    assert_per_entry(model.kl, lift(torch.randn(3, 2, 6)))


def test_other_convolutional_layers_equal_a_loop_over_plate_entries():
    # layers a CNN commonly adds; GroupNorm needs a batch dim in plain torch, so one sample is a batch of one image
    torch.manual_seed(4)
    block = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.PReLU(4),
        torch.nn.MaxPool2d(2), torch.nn.AvgPool2d(2, stride=1), torch.nn.Upsample(scale_factor=2, mode="bilinear"),
        torch.nn.InstanceNorm2d(4, affine=True),
        torch.nn.Dropout(0.0))
    x = lift(torch.randn(3, 2, 1, 1, 8, 8))
    assert_per_entry(block, x)
    assert_per_entry(block.eval(), x)
    assert_per_entry(torch.nn.Conv1d(3, 2, 3, padding=1), lift(torch.randn(3, 2, 3, 7)))
    assert_per_entry(torch.nn.Conv3d(1, 2, 2), lift(torch.randn(3, 2, 1, 3, 4, 4)))
    assert_per_entry(torch.nn.ConvTranspose1d(3, 2, 3, stride=2), lift(torch.randn(3, 2, 3, 5)))
    assert_per_entry(torch.nn.AdaptiveAvgPool2d(1), lift(torch.randn(3, 2, 4, 5, 5)))
    assert_per_entry(torch.nn.BatchNorm2d(4).eval(), lift(torch.randn(3, 2, 1, 4, 3, 3)))  # a batch of 1 per sample


@pytest.mark.parametrize("name, options", [("score", {"n_samples": 4, "baseline": "leave_one_out"}),
                                           ("gumbel_softmax", {"n_samples": 2, "temperature": 0.7})])
def test_three_training_steps(name, options):
    torch.manual_seed(1)
    model = ConvVAE(n_latent=8, channels=(4, 8))
    est = storch.estimator(name, plate="z", **options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = _images(10)
    def build(graph):
        z = storch_surrogate(model, est, x)
        assert {p.name: p.size for p in z.plates} == {"z": options["n_samples"], "data": 10}

    assert_trains(model, opt, build)


def test_score_leave_one_out_gradient_equals_hand_written():
    torch.manual_seed(2)
    model = ConvVAE(n_latent=6, channels=(4, 8)).double()
    x, n = _images(5, dtype=torch.float64), 4
    params = list(model.parameters())
    est = storch.estimator("score", plate="z", n_samples=n, baseline="leave_one_out")
    with storch.Graph():
        z = storch_surrogate(model, est, x)
        g_storch = grads(storch.surrogate_loss(), params)
    g_hand = grads(hand_surrogate(model, x, n, leave_one_out=True, z=layout(z, ("z", "data"))), params)
    assert_same_grads(g_storch, g_hand, [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_gumbel_softmax_gradient_equals_hand_written():
    torch.manual_seed(3)
    model = ConvVAE(n_latent=6, channels=(4, 8)).double()
    x, n, tau = _images(5, dtype=torch.float64), 3, 0.7
    params = list(model.parameters())
    est = storch.estimator("gumbel_softmax", plate="z", n_samples=n, temperature=tau)
    with storch.Graph():
        z = storch_surrogate(model, est, x)
        g_storch = grads(storch.surrogate_loss(), params)
    # by hand: binary Concrete z = σ((α + L)/τ) with storch's noise L = τ·logit(z) - α (Maddison et al. 2017)
    logits = model.encoder(x)
    y = layout(z, ("z", "data")).detach()
    relaxed = torch.sigmoid((logits - logits.detach()) / tau + torch.logit(y))
    torch.testing.assert_close(relaxed, y)
    loss = model.kl(logits).mean() + batched_reconstruction(model, relaxed, x).mean()
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_benchmark_pair_same_gradient():
    # the `cnn` row of storch-compare overhead: with one seed both sides draw the same samples
    from storch_bench.overhead import PROBLEMS

    est = storch.estimator("score", plate="z", n_samples=3, baseline="leave_one_out")
    with_storch, by_hand, sync = PROBLEMS["cnn"]("loo", est, 4, 3)
    sync()
    torch.manual_seed(5)
    g_storch = with_storch().clone()
    torch.manual_seed(5)
    assert_same_grads([g_storch], [by_hand().clone()])
