"""Tutorial 1: a discrete VAE from scratch, and choosing its estimator.

    python examples/tutorials/discrete_vae.py                 # ~30 s on one CPU thread
    python examples/tutorials/discrete_vae.py --steps 2000    # longer training

A VAE whose latent code is 8 categorical variables of 8 classes, on scikit-learn's bundled 8x8
digits (binarised). The model is written for ONE data point; storch runs it on a batch and on n
samples per data point. Only the ``storch.estimator(...)`` line changes between estimators. The
leave-one-out run is repeated with the step replayed by ``storch.compile(step, backend=None)`` (the
same training, faster). The second half asks storch_bench which estimator this model should use: gradient variance, bias and
time per step, measured at the same parameters. Prints both tables; ``--out DIR`` saves the
figure as DIR/discrete_vae.png.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.distributions import Bernoulli, OneHotCategorical

import storch
from storch_bench import compare_estimators
from storch_bench.data import load_binary_digits

LATENTS, CLASSES, PIXELS = 8, 8, 64


class VAE(torch.nn.Module):
    """Encoder q(z | x) and decoder p(x | z) of one data point; the estimator is given per call."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(PIXELS, 128), torch.nn.ReLU(),
                                           torch.nn.Linear(128, LATENTS * CLASSES))
        self.decoder = torch.nn.Sequential(torch.nn.Linear(LATENTS * CLASSES, 128), torch.nn.ReLU(),
                                           torch.nn.Linear(128, PIXELS))

    def forward(self, est, x: torch.Tensor) -> None:
        """Adds the two costs of the negative ELBO of one data point x, shape (64,)."""
        q = OneHotCategorical(logits=self.encoder(x).view(LATENTS, CLASSES))
        z = est(q)                                           # one-hot (8, 8): n samples per data point
        prior = OneHotCategorical(logits=torch.zeros(LATENTS, CLASSES))
        storch.add_cost(torch.distributions.kl_divergence(q, prior).sum(), name="kl")
        logits = self.decoder(z.reshape(LATENTS * CLASSES))
        storch.add_cost(-Bernoulli(logits=logits).log_prob(x).sum(), name="reconstruction")


def train(est, train_x, valid_x, steps: int, batch: int, seed: int = 0, replay: bool = False):
    """Adam on the negative ELBO with estimator ``est``; the validation -ELBO every 50 steps; ms per
    step after the first. With ``replay``, the step is written as a function and replayed by
    ``storch.compile(backend=None)``: traced into plain torch on the first call, then each step runs
    that program (no storch code, no compiler); ``loss.backward()`` replaces ``storch.backward()``,
    since the step builds its own graph."""
    torch.manual_seed(seed)
    vae = VAE()
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    if replay:
        def loss_fn(x):
            with storch.Graph():
                vae(est, storch.denote_independent(x, 0, "data"))
                return storch.surrogate_loss()

        fast = storch.compile(loss_fn, backend=None)

        def step_on(x):
            fast(x).backward()
    else:
        def step_on(x):
            vae(est, storch.denote_independent(x, 0, "data"))  # the batch is an independent plate
            storch.backward()       # backprop the surrogate, estimator updates (baselines), reset
    curve = []
    started = None
    for step in range(steps + 1):
        if step % 50 == 0:
            curve.append((step, validation_elbo(vae, valid_x)))
        if step == steps:
            break
        rows = torch.randint(len(train_x), (batch,))
        step_on(train_x[rows])
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            started = time.perf_counter()  # after the first step (which traces, with replay)
    ms = 1000 * (time.perf_counter() - started) / max(steps - 1, 1)
    return vae, curve, ms


@torch.no_grad()
def validation_elbo(vae: VAE, valid_x: torch.Tensor) -> float:
    """-ELBO in nats per digit, one hard sample per digit (the same for every estimator)."""
    with storch.Graph():
        x = storch.denote_independent(valid_x, 0, "data")
        vae(storch.estimator("score", plate="z"), x)
        value = storch.surrogate_loss()       # value: the mean of the costs over the plates
    return float(value)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--estimates", type=int, default=32,
                   help="gradient estimates per estimator (variance; the bias z needs >= 32)")
    p.add_argument("--out", type=Path, default=None, help="folder for discrete_vae.png")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train_x, valid_x = load_binary_digits()

    # 1. Train with three estimators: only this line differs.
    estimators = {
        "score@1": storch.estimator("score", plate="z"),
        "score[baseline=leave_one_out]@4": storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out"),
        "unordered_set@4": storch.estimator("unordered_set", plate="z", n_samples=4),
        "gumbel_softmax[temperature=0.5]@1": storch.estimator("gumbel_softmax", plate="z", temperature=0.5),
    }
    curves, timings = {}, {}
    print(f"Training for {args.steps} steps, batch {args.batch} (validation -ELBO, nats per digit):\n")
    print("| estimator | -ELBO at start | -ELBO at end | ms/step |")
    print("|---|---|---|---|")
    for spec, est in estimators.items():
        vae, curve, ms = train(est, train_x, valid_x, args.steps, args.batch)
        curves[spec], timings[spec] = curve, ms
        print(f"| {spec} | {curve[0][1]:.2f} | {curve[-1][1]:.2f} | {ms:.1f} |")

    # 1b. The fast path: the leave-one-out training again, replayed by storch.compile(backend=None).
    # Same seed, same draws: the same training run, without storch's per-call bookkeeping.
    loo = "score[baseline=leave_one_out]@4"
    _, fast_curve, fast_ms = train(estimators[loo], train_x, valid_x, args.steps, args.batch, replay=True)
    eager_ms = timings[loo]
    same = max(abs(a[1] - b[1]) for a, b in zip(curves[loo], fast_curve)) < 1e-3
    print(f"\n{loo}, replayed by storch.compile(step, backend=None): -ELBO at end {fast_curve[-1][1]:.2f}, "
          f"{fast_ms:.1f} ms/step (eager: {eager_ms:.1f}); "
          f"replayed training follows the eager one: {'yes' if same else 'NO'}")

    # 2. Which estimator for this model? storch_bench measures every estimator at the same
    # parameters (the last model trained above): gradient variance, bias against a reference
    # (exact enumeration when it fits, else many leave-one-out estimates), time per estimate.
    fixed_x = valid_x[:32]

    def step(est):
        x = storch.denote_independent(fixed_x, 0, "data")
        vae(est, x)
        return vae.encoder          # the gradient whose variance matters: the encoder's

    comparison = compare_estimators(step, estimators=list(estimators), estimates=args.estimates,
                                    warmup=5, measure_memory=False, progress=False)
    print(f"\nGradient of the encoder, {args.estimates} estimates per estimator on a fixed batch of 32:\n")
    print(f"(bias z-score against {comparison.reference}: > 4 means biased)\n")
    print("| estimator | variance | biased by design | bias z | ms per estimate | variance x ms |")
    print("|---|---|---|---|---|---|")
    for r in comparison.rows:
        print(f"| {r.label} | {r.variance:.3g} | {'yes' if r.biased else 'no'} | {r.bias_z:.1f} | "
              f"{r.ms_per_step:.1f} | {r.efficiency:.3g} |")

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
        for spec, curve in curves.items():
            a.plot([s for s, _ in curve], [v for _, v in curve], label=spec)
        a.set_xlabel("training step")
        a.set_ylabel("validation -ELBO (nats)")
        a.legend(fontsize=8)
        rows = [r for r in comparison.rows if r.variance == r.variance]
        b.barh([r.label for r in rows], [r.variance for r in rows])
        b.set_xscale("log")
        b.set_xlabel("encoder gradient variance (log)")
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "discrete_vae.png", dpi=90)


if __name__ == "__main__":
    main()
