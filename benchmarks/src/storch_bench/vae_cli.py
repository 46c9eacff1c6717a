"""The ``storch-compare`` (``vae``) subcommand: run the comparison and write its reports."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import storch

from .budget import aggregate
from .data import load_binary_digits
from .report import fmt, header, markdown_table, plot_vae, text_table, write_csv
from .roster import bad_spec_advice, parse_specs
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
        cfg.budget = FULL_BUDGET
    if getattr(args, "budget", None) is not None:
        cfg.budget = args.budget
    for name in ("epochs", "batch_size", "variance_reps", "checkpoints", "max_train"):
        v = getattr(args, name)
        if v is not None:
            setattr(cfg, name, v)
    # a batch larger than the training points that run (--max-train, or the 1437 digits) is all of them: the
    # report says what ran (the same computation), not what was asked
    points = len(load_binary_digits(cfg.n_valid)[0])
    if cfg.max_train is not None:
        points = min(points, cfg.max_train)
    cfg.batch_size = min(cfg.batch_size, points)
    cfg.variance_batch = min(cfg.variance_batch, points)
    return cfg


FULL_BUDGET = 24  # cost evaluations per data point and step in --full's equal-budget table
FULL_SEEDS = 3


def _seeds(args: argparse.Namespace) -> int:
    n = getattr(args, "seeds", None)
    return n if n is not None else (FULL_SEEDS if args.full else 1)


def _order(o: float) -> str:
    return "inf" if o == math.inf else str(int(o))


def run(args: argparse.Namespace) -> int:
    """The comparison at each estimator's own sample count, then (``--budget B``, or ``--full``) at an
    equal budget of B cost evaluations per step; with several seeds (``--seeds``, ``--full``: 3) each
    table gives mean ± sd over the seeds."""
    cfg = config_from_args(args)
    seeds = [cfg.seed + i for i in range(_seeds(args))]
    code = _run_table(args, replace(cfg, budget=None), seeds, "vae", "")
    if cfg.budget is not None:
        code |= _run_table(args, cfg, seeds, "vae_budget", f" at an equal budget of {cfg.budget} cost "
                           "evaluations per data point and step (n_samples chosen per estimator)")
    return code


def _run_table(args: argparse.Namespace, cfg: VAEConfig, seeds: list[int], stem: str, what: str) -> int:
    if len(seeds) == 1:
        return _run_single(args, replace(cfg, seed=seeds[0]), stem, what)
    return _run_seeds(args, cfg, seeds, stem, what)


AGG = ["model", "estimator", "seeds", "biased", "max_order", "train -ELBO", "valid -ELBO", "best valid -ELBO",
       "grad variance", "ms/step", "note"]
FIELDS = ("train", "valid", "best_valid", "variance", "step_ms")


def _run_seeds(args: argparse.Namespace, cfg: VAEConfig, seeds: list[int], stem: str, what: str) -> int:
    per_seed, skipped, exact = [], {}, []
    for seed in seeds:
        results, skip = run_vae(replace(cfg, seed=seed, measure_memory=False), progress=not args.no_progress)
        per_seed.append(results)
        skipped.update({(m, label): why for m, label, why in skip})
        exact += [[seed, r.model, r.label, r.steps, r.train, r.valid, r.best_valid, r.variance, r.note]
                  for r in results]
    rows = aggregate(per_seed, FIELDS)
    rows.sort(key=lambda r: (cfg.models.index(r["model"]), not math.isfinite(r["valid"][0]), r["valid"][0]))

    def pm(v):
        return f"{fmt(v[0])} ± {fmt(v[1])}"

    table = [[r["model"], r["label"], r["seeds"], r["biased"], _order(r["max_order"])] + [pm(r[f]) for f in FIELDS]
             + [r["note"]] for r in rows]
    out = args.out
    write_csv(out / f"{stem}_seeds.csv", ["seed", "model", "estimator", "steps", "train_neg_elbo", "valid_neg_elbo",
                                          "best_valid_neg_elbo", "grad_variance_mean", "note"], exact)
    write_csv(out / f"{stem}.csv", ["model", "estimator", "seeds"] + [f"{f}_{s}" for f in FIELDS for s in ("mean", "sd")],
              [[r["model"], r["label"], r["seeds"]] + [x for f in FIELDS for x in r[f]] for r in rows])
    setup = (f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, hidden {cfg.hidden}; mean ± sd over "
             f"seeds {', '.join(map(str, seeds))}; -ELBO in nats per digit with hard samples; gradient variance = "
             f"trace of the covariance of the encoder's gradient over {cfg.variance_reps} estimates on a fixed batch of "
             f"{cfg.variance_batch}, mean over {cfg.checkpoints} checkpoints")
    notes = "\n".join(f"- {m}: {label}: {why}" for (m, label), why in skipped.items())
    title = f"storch-compare: discrete VAE on load_digits (8x8, binarised){what}"
    md = (f"# {header(title)}\n{setup}.\n\n{markdown_table(AGG, table)}\n\n"
          + (f"Did not take part:\n\n{notes}\n" if notes else ""))
    (out / f"{stem}.md").write_text(md)
    print(f"\n{title}\n" + text_table(AGG[:-1], [r[:-1] for r in table]))
    print(f"\n{setup}.\nWrote {out / (stem + '.md')}, {out / (stem + '.csv')}, {out / (stem + '_seeds.csv')}")
    if not rows:
        print("\nDid not take part:\n" + notes)
        return _nothing_ran([(label, why) for (_, label), why in skipped.items()])
    return 1 if any(r["note"].startswith("error") for r in rows) else 0


def _run_single(args: argparse.Namespace, cfg: VAEConfig, stem: str = "vae", what: str = "") -> int:
    results, skipped = run_vae(cfg, progress=not args.no_progress)
    results.sort(key=lambda r: (cfg.models.index(r.model), not math.isfinite(r.valid), r.valid))
    rows = [[r.model, r.label, r.biased, _order(r.max_order), r.train, r.valid, r.best_valid, r.variance,
             r.step_ms, r.peak_mb, r.note] for r in results]
    exact = [[r.model, r.label, r.biased, _order(r.max_order), r.steps, r.train, r.valid, r.best_valid,
              r.variance, " ".join(repr(v) for v in r.variances), " ".join(map(str, r.checkpoint_epochs)),
              r.note] for r in results]
    out = args.out
    write_csv(out / f"{stem}.csv", EXACT, exact)
    write_csv(out / f"{stem}_cost.csv", ["model", "estimator", "ms_per_step", "peak_mb"],
              [[r.model, r.label, r.step_ms, r.peak_mb] for r in results])
    curves = []
    for r in results:
        for e, (t, v) in enumerate(zip(r.train_curve, r.valid_curve)):
            curves.append([r.model, r.label, e, t, v])
    write_csv(out / f"{stem}_curves.csv", ["model", "estimator", "epoch", "train_neg_elbo", "valid_neg_elbo"], curves)
    if results:
        plot_vae(results, out / f"{stem}.png")
    setup = (f"{cfg.epochs} epochs, batch {cfg.batch_size}, Adam lr {cfg.lr}, hidden {cfg.hidden}, seed "
             f"{cfg.seed}; -ELBO in nats per digit with hard samples; gradient variance = trace of the "
             f"covariance of the encoder's gradient over {cfg.variance_reps} estimates on a fixed batch of "
             f"{cfg.variance_batch}, mean over epochs {', '.join(map(str, results[0].checkpoint_epochs)) if results else '-'}; "
             "peak MB = torch CPU allocator peak of one step (torch.profiler)")
    notes = "\n".join(f"- {m}: {label}: {why}" for m, label, why in skipped)
    md = (f"# {header('storch-compare: discrete VAE on load_digits (8x8, binarised)' + what)}\n{setup}.\n\n"
          f"{markdown_table(HEADER, rows)}\n\n" + (f"Did not take part:\n\n{notes}\n" if notes else ""))
    (out / f"{stem}.md").write_text(md)
    if what:
        print(f"\nstorch-compare: discrete VAE{what}")
    print(text_table(HEADER[:-1], [r[:-1] for r in rows]))
    for r in results:
        if r.note:
            print(f"note: {r.model} {r.label}: {r.note}")
    if skipped:
        print("\nDid not take part:\n" + notes)
    print(f"\n{setup}.\nWrote {out / (stem + '.md')}, {out / (stem + '.csv')}, {out / (stem + '_cost.csv')}, "
          f"{out / (stem + '_curves.csv')}" + (f", {out / (stem + '.png')}" if results else ""))
    errors = [r for r in results if r.note.startswith("error")]
    if errors:
        print(f"\n{len(errors)} estimator(s) failed with an error (see the notes above)")
    if not results:
        return _nothing_ran([(label, why) for _, label, why in skipped])
    return 1 if errors else 0


def _families_installed() -> bool:
    """Whether an estimator outside storch-core (a family, first- or third-party) is installed."""
    return any(info.package != "storch-core" for info in storch.available_estimators().values())


def _nothing_ran(skipped: list[tuple[str, str]]) -> int:
    """Say why no estimator ran, and the exit status: 2 where specs were wrong (fix the spec), else 1 (an
    estimator family is missing, or none of those named can train these models): an empty table is a failed run."""
    advice = bad_spec_advice(skipped)
    if advice:
        print("\n" + advice)
        return 2
    if any(why.startswith("not installed") for _, why in skipped):
        # install advice only where an estimator is missing: a misspelt name or option (advice) is fixed in
        # the spec, and an installed estimator that cannot train these models is not helped by installing
        print("\nNothing ran. Install the missing estimator families (see \"Did not take part\"), e.g. "
              "`pip install storch-estimators-score storch-estimators-relaxed storch-estimators-mvd`, "
              "or name installed estimators with --estimators.")
    elif not _families_installed():
        # storch-core alone: `storch-compare` (auto) tried expect and reparameterization, which cannot train these
        # models; naming others does not help either, installing a family does
        print("\nNothing ran: only storch-core's estimators are installed, and they cannot train these models (see "
              "\"Did not take part\"). Install an estimator family, e.g. `pip install storch-estimators-score "
              "storch-estimators-relaxed storch-estimators-mvd`.")
    else:
        print("\nNothing ran: none of these estimators can train these models (each one's reason is under "
              "\"Did not take part\" above); name others with --estimators (auto: every installed one).")
    return 1
