"""The ``storch-compare`` (``vae``) subcommand: run the comparison and write its reports."""

from __future__ import annotations

import argparse
import math

from .report import markdown_table, plot_vae, text_table, write_csv
from .roster import parse_specs
from .vae import VAEConfig, run_vae

__all__ = ["run", "config_from_args"]

HEADER = ["model", "estimator", "biased", "max_order", "train -ELBO", "valid -ELBO", "best valid -ELBO",
          "grad variance", "ms/step", "peak MB", "note"]
EXACT = ["model", "estimator", "biased", "max_order", "steps", "train_neg_elbo", "valid_neg_elbo",
         "best_valid_neg_elbo", "grad_variance_mean", "grad_variance_per_checkpoint", "checkpoint_epochs", "note"]


def config_from_args(args: argparse.Namespace) -> VAEConfig:
    n_multi = args.samples or 5
    cfg = VAEConfig(specs=parse_specs(args.estimators, n_multi), seed=args.seed, threads=args.threads,
                    lr=args.lr, models=tuple(m.strip() for m in args.models.split(",") if m.strip()))
    if args.full:
        cfg.epochs, cfg.checkpoints, cfg.variance_reps, cfg.eval_samples = 100, 5, 32, 4
    for name in ("epochs", "batch_size", "variance_reps", "checkpoints", "max_train"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    return cfg


def _order(o: float) -> str:
    return "inf" if o == math.inf else str(int(o))


def run(args: argparse.Namespace) -> int:
    from .cli import _header

    cfg = config_from_args(args)
    results, skipped = run_vae(cfg, progress=not args.no_progress)
    results.sort(key=lambda r: (cfg.models.index(r.model), not math.isfinite(r.valid), r.valid))
    rows = [[r.model, r.label, r.biased, _order(r.max_order), r.train, r.valid, r.best_valid, r.variance,
             r.step_ms, r.peak_mb, r.note] for r in results]
    exact = [[r.model, r.label, r.biased, _order(r.max_order), r.steps, r.train, r.valid, r.best_valid,
              r.variance, " ".join(repr(v) for v in r.variances), " ".join(map(str, r.checkpoint_epochs)),
              r.note] for r in results]
    out = args.out
    write_csv(out / "vae.csv", EXACT, exact)
    write_csv(out / "vae_cost.csv", ["model", "estimator", "ms_per_step", "peak_mb"],
              [[r.model, r.label, r.step_ms, r.peak_mb] for r in results])
    curves = []
    for r in results:
        for e, (t, v) in enumerate(zip(r.train_curve, r.valid_curve)):
            curves.append([r.model, r.label, e, t, v])
    write_csv(out / "vae_curves.csv", ["model", "estimator", "epoch", "train_neg_elbo", "valid_neg_elbo"], curves)
    if results:
        plot_vae(results, out / "vae.png")
    setup = (f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, hidden {cfg.hidden}, seed "
             f"{cfg.seed}; -ELBO in nats per digit with hard samples; gradient variance = trace of the "
             f"covariance of the encoder's gradient over {cfg.variance_reps} estimates on a fixed batch of "
             f"{cfg.variance_batch}, mean over epochs {', '.join(map(str, results[0].checkpoint_epochs)) if results else '-'}; "
             "peak MB = torch CPU allocator peak of one step (torch.profiler)")
    notes = "\n".join(f"- {m}: {label}: {why}" for m, label, why in skipped)
    md = (f"# {_header('storch-compare: discrete VAE on load_digits (8x8, binarised)')}\n{setup}.\n\n"
          f"{markdown_table(HEADER, rows)}\n\n" + (f"Did not take part:\n\n{notes}\n" if notes else ""))
    (out / "vae.md").write_text(md)
    print(text_table(HEADER[:-1], [r[:-1] for r in rows]))
    for r in results:
        if r.note:
            print(f"note: {r.model} {r.label}: {r.note}")
    if skipped:
        print("\nDid not take part:\n" + notes)
    if not results:
        print("\nNo installed estimator could train these models. Install an estimator family, e.g. "
              "`pip install storch-estimators-score storch-estimators-relaxed storch-estimators-mvd`, "
              "or name your own with --estimators.")
    print(f"\n{setup}.\nWrote {out / 'vae.md'}, {out / 'vae.csv'}, {out / 'vae_cost.csv'}, "
          f"{out / 'vae_curves.csv'}" + (f", {out / 'vae.png'}" if results else ""))
    errors = [r for r in results if r.note.startswith("error")]
    if errors:
        print(f"\n{len(errors)} estimator(s) failed with an error (see the notes above)")
    return 1 if errors else 0
