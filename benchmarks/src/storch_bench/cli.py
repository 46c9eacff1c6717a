"""``storch-compare``: the estimator comparison demo.

    storch-compare                 # discrete VAE on bundled digits, every installed estimator
    storch-compare --full          # the longer comparison (3 seeds, mean ± sd; also at an equal budget)
    storch-compare --budget 12     # also at an equal budget of cost evaluations per step
    storch-compare --estimators "score@1,score[baseline=leave_one_out]@8,gumbel_softmax@1"
    storch-compare toy             # REBAR toy and K=10 categorical: bias, variance, time
    storch-compare overhead        # storch vs hand-written torch: time and peak memory ratios
    storch-compare ops             # single torch calls on plate tensors vs the raw call (slow paths)
    storch-compare model path/to/model.py:step   # which estimator for MY model? (see model_cli)
    storch-compare sequences       # GRU decoder, -edit distance: unordered_set, sum_and_sample, score+loo
    storch-compare ipd             # LOLA-DiCE on the iterated prisoner's dilemma (a short run)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .argtypes import (SEED_BELOW, at_least, choice_list, int_list, non_negative_float, positive_float,
                       positive_int, seed_int, variance_reps)

__all__ = ["main"]

COMMANDS = ("vae", "toy", "overhead", "ops", "model", "sequences", "ipd")


def ops_cases(text: str) -> str:
    """An argparse ``type=``: comma-separated case names of ``storch-compare ops``; the text is kept."""
    from .ops import CASES

    return choice_list(tuple(c.name for c in CASES))(text)


def estimator_specs(text: str) -> str:
    """An argparse ``type=``: a comma-separated list of estimator specs (or ``auto``); the text is kept."""
    from .roster import parse_specs

    try:
        specs = parse_specs(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not specs:
        raise argparse.ArgumentTypeError("names no estimator; write specs name[option=value,...]@n or auto")
    return text


def estimator_spec(text: str) -> str:
    """An argparse ``type=``: one estimator spec ``name[option=value,...]@n``."""
    from .roster import parse_spec

    try:
        parse_spec(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _estimators(p: argparse.ArgumentParser) -> None:
    p.add_argument("--estimators", default="auto", type=estimator_specs,
                   help="comma-separated specs name[option=value,...]@n; 'auto' = every installed estimator "
                        "(default: auto)")
    p.add_argument("--samples", type=positive_int, default=None, help="sample count of the multi-sample presets "
                   "(score with leave-one-out, unordered_set)")


def _common(p: argparse.ArgumentParser, estimators: bool = True, seed: bool = True) -> None:
    """The options every subcommand reads; ``--estimators``/``--samples`` and ``--seed`` only where they are used
    (overhead and ops seed every measurement themselves: both sides draw the same samples)."""
    if estimators:
        _estimators(p)
    if seed:
        p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=positive_int, default=1, help="torch threads (default 1: reproducible, and no "
                   "OpenMP spin-waits competing with other processes on small tensors)")
    p.add_argument("--out", type=Path, default=Path("results"), help="output folder (default results/)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


# names the subcommands accept (checked when the arguments are read, not after a long run)
VAE_MODELS = ("bernoulli", "categorical")
OVERHEAD_PROBLEMS = ("toy", "vae", "cnn", "rnn", "sbn", "ipd")
OVERHEAD_CONFIGS = ("score", "loo", "unordered_set", "gumbel_softmax", "sum_and_sample", "moving_average",
                    "gumbel_annealed")
IPD_CONFIGS = ("LOLA-DiCE", "LOLA-DiCE + baseline", "naive")
SEQUENCE_ESTIMATORS = ("score+loo", "unordered_set", "sum_and_sample")
MIN_REPLICATES = 500  # toy: below, max z > 4 flags unbiased estimators too often (docs/comparison.md)


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Create the output folder and check that a file can be written there, before any long run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".storch-compare-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        parser.error(f"argument --out: cannot write to {str(out)!r} ({e.strerror or e}); choose another folder")


def _check_backend(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``overhead --backend``: only with ``--compile`` (else nothing reads it), and a backend torch.compile knows,
    checked before the run (an unknown one failed every row's compile, after the eager timings)."""
    if args.backend is not None and not args.compile:
        parser.error(f"argument --backend: {args.backend!r} is read only with --compile (the compiled columns; "
                     "--replay traces without a compiler); add --compile or drop --backend")
    args.backend = args.backend or "inductor"
    if args.compile:
        import torch._dynamo

        if args.backend not in torch._dynamo.list_backends(exclude_tags=()):
            parser.error(f"argument --backend: unknown torch.compile backend {args.backend!r}; choose from "
                         f"{', '.join(torch._dynamo.list_backends())}, or a debug backend such as eager or aot_eager "
                         "(torch._dynamo.list_backends(exclude_tags=()) lists them all)")


def _check_ipd_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``overhead --problems ...ipd`` with ``--configs`` naming neither score nor loo: the ipd rows would be left out
    without a word (they measure those two only)."""
    from .overhead_ipd import BASELINES

    problems = [p.strip() for p in args.problems.split(",")]
    configs = [c.strip() for c in (args.configs or "score").split(",")]
    if "ipd" in problems and not set(configs) & set(BASELINES):
        parser.error(f"argument --configs: the ipd rows measure {' and '.join(BASELINES)} only, and --configs "
                     f"{args.configs!r} names neither; add one of them, or drop ipd from --problems")


def _needed_estimators(args: argparse.Namespace) -> list[str]:
    """The estimators ``sequences`` and ``ipd`` build by name (each one's runs need them all), in order."""
    if args.command == "sequences":
        names = [s.strip() for s in args.estimators.split(",") if s.strip()]
        names = list(SEQUENCE_ESTIMATORS) if "auto" in names else names
        return list(dict.fromkeys("score" if n == "score+loo" else n for n in names))
    if args.command == "ipd" and "storch" in args.implementations.split(","):
        return ["score"]  # every configuration's storch learner: storch.estimator("score", ...)
    return []


FAMILIES = ("storch-estimators-score", "storch-estimators-relaxed", "storch-estimators-mvd")


def _missing_families() -> list[str]:
    """The first-party estimator families none of whose estimators is installed, in FAMILIES' order."""
    import storch

    installed = {info.package for info in storch.available_estimators().values()}
    return [f for f in FAMILIES if f not in installed]


def _note_missing_families(args: argparse.Namespace) -> None:
    """``--estimators auto`` compares the installed estimators only: say which families it leaves out and how to add
    them (a run with storch-estimators-relaxed missing printed its table without a word about gumbel_softmax & co.)."""
    if args.command not in ("vae", "toy", "model") or "auto" not in [s.strip() for s in args.estimators.split(",")]:
        return
    missing = _missing_families()
    if missing:
        print(f"--estimators auto compares the installed estimators; not installed: {', '.join(missing)} "
              f"(`pip install {' '.join(missing)}` to compare theirs too)")


def _check_installed(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``sequences`` and ``ipd`` without the estimator family they use: say what to install before the run (they
    ended in a traceback of the first storch.estimator call)."""
    import storch

    for name in _needed_estimators(args):
        try:
            storch.get_estimator_class(name)
        except (storch.UnknownEstimatorError, storch.PluginError) as e:
            alternative = " Or run --implementations torch (the hand-written learners alone)." if args.command == "ipd" else ""
            parser.error(f"{args.command} builds the estimator {name!r}: {e}{alternative}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="storch-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    v = sub.add_parser("vae", help="discrete VAE comparison (the default)")
    _common(v)
    v.add_argument("--full", action="store_true", help="the longer comparison: 100 epochs, 5 variance checkpoints of "
                   "32 estimates, -ELBO over 4 samples, 3 seeds (mean ± sd), and a table at an equal budget of 24 cost "
                   "evaluations (--epochs, --checkpoints, --variance-reps, --seeds, --budget override)")
    v.add_argument("--models", default="bernoulli,categorical", type=choice_list(VAE_MODELS), help="bernoulli, categorical or both")
    v.add_argument("--epochs", type=positive_int, default=None)
    v.add_argument("--batch-size", type=positive_int, default=None)
    v.add_argument("--lr", type=positive_float, default=3e-3)
    v.add_argument("--variance-reps", type=at_least(2), default=None, help="gradient estimates per checkpoint")
    v.add_argument("--checkpoints", type=positive_int, default=None, help="number of variance checkpoints")
    v.add_argument("--max-train", type=positive_int, default=None, help="use only the first N training points")
    v.add_argument("--budget", type=positive_int, default=None, help="also compare at an equal budget of B cost evaluations "
                   "per data point and step (n_samples chosen per estimator; --full: 24)")
    v.add_argument("--seeds", type=positive_int, default=None, help="repeat over this many seeds and report mean ± sd "
                   "(--full: 3)")
    t = sub.add_parser("toy", help="REBAR toy and K=10 categorical: bias, variance, time per estimate")
    _common(t)
    t.add_argument("--replicates", type=at_least(MIN_REPLICATES), default=2000, help="independent estimates per "
                   f"estimator (default 2000, at least {MIN_REPLICATES}: below, the z-test flags unbiased estimators; "
                   "see docs/comparison.md)")
    t.add_argument("--timing-reps", type=positive_int, default=100, help="single-estimate runs timed per estimator")
    o = sub.add_parser("overhead", help="storch vs hand-written torch: time and peak memory ratios")
    _common(o, estimators=False, seed=False)
    o.add_argument("--batch-sizes", default="1,100", type=int_list(1), help="comma-separated (default 1,100)")
    o.add_argument("--n-samples", default="1,8,64", type=int_list(1), help="comma-separated sample counts (default 1,8,64)")
    o.add_argument("--problems", default="toy,vae", type=choice_list(OVERHEAD_PROBLEMS), help="toy, vae, cnn, rnn, sbn (two nodes, the second in the first's plate), ipd (episodes of the iterated prisoner's dilemma: REINFORCE and LOLA-DiCE "
                   "updates, on the CPU; comma-separated; default toy,vae)")
    o.add_argument("--min-time", type=positive_float, default=0.2, help="seconds of timing per measurement")
    o.add_argument("--configs", default=None, type=choice_list(OVERHEAD_CONFIGS), help="subset of score,loo,unordered_set,gumbel_softmax,sum_and_sample (default: all of them), "
                   "or moving_average (score with a moving-average baseline), gumbel_annealed (gumbel_softmax with "
                   "a temperature schedule); those only when named")
    o.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (default); cpu: this thread's CPU time (steadier on a shared machine; not on "
                        "CUDA, whose kernels it does not count)")
    o.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when available); "
                   "the ipd rows run on the CPU")
    o.add_argument("--compile", action="store_true", help="also time both step functions through torch.compile "
                   "(columns: compiled storch / compiled hand-written, and the storch step's graph breaks)")
    o.add_argument("--backend", default=None, help="torch.compile backend for --compile (default inductor)")
    o.add_argument("--replay", action="store_true", help="also time the storch loss traced once by "
                   "storch.compile(backend=None) and replayed without a compiler, against the eager hand-written loss "
                   "(columns: replayed storch / eager hand-written, and whether the replay's gradient is eager storch's)")
    ops = sub.add_parser("ops", help="single torch calls on plate tensors vs the same call on raw tensors: "
                         "the dispatcher's extra cost per call, slow paths marked")
    _common(ops, estimators=False, seed=False)
    ops.add_argument("--cases", default=None, type=ops_cases, help="comma-separated case names (default: all)")
    ops.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, or auto (cuda when available)")
    ops.add_argument("--min-time", type=positive_float, default=0.05, help="timing per call and side: 5 x this many "
                     "seconds, as storch-compare overhead's --min-time")
    ops.add_argument("--threshold", type=non_negative_float, default=5.0, help="extra microseconds above which a call is "
                     "marked slow (the wrapper's floor is ~2-3 us on a CPU)")
    m = sub.add_parser("model", help="which estimator for MY model: rank the installed estimators on "
                       "FILE:FUNCTION (variance, bias, time, memory)")
    _common(m)
    from .model_cli import add_arguments

    add_arguments(m, at_least, estimator_spec)
    q = sub.add_parser("sequences", help="GRU decoder trained on -edit distance: sequence estimators at equal k")
    _common(q, estimators=False)
    q.add_argument("--estimators", default="auto", type=choice_list(("auto", *SEQUENCE_ESTIMATORS)),
                   help=f"comma-separated names out of {', '.join(SEQUENCE_ESTIMATORS)} (not specs: each runs with "
                        "--k samples); 'auto' = all of them (default)")
    q.add_argument("--k", type=at_least(2), default=8, help="sequences per target and step (default 8)")
    q.add_argument("--steps", type=positive_int, default=400, help="training steps (default 400; the first 5 are warm-up, not timed)")
    q.add_argument("--lr", type=positive_float, default=0.005)
    q.add_argument("--seeds", default=None, type=int_list(0, SEED_BELOW), help="comma-separated seeds, one run each (default: --seed)")
    q.add_argument("--variance-reps", type=variance_reps, default=16, help="gradient estimates for the variance at the start "
                   "and the end (0: skip)")
    i = sub.add_parser("ipd", help="LOLA-DiCE and naive learners on the iterated prisoner's dilemma (short run)")
    _common(i, estimators=False)  # --seed: the default of --seeds, and the variance estimates' seed
    i.add_argument("--iterations", type=positive_int, default=30, help="updates per run (default 30; the example uses 200)")
    i.add_argument("--steps", type=positive_int, default=150, help="episode length")
    i.add_argument("--batch", type=positive_int, default=128, help="episodes per estimate")
    i.add_argument("--configs", default=None, type=choice_list(IPD_CONFIGS), help="subset of: LOLA-DiCE, LOLA-DiCE + baseline, naive")
    i.add_argument("--implementations", default="storch", type=choice_list(("storch", "torch")), help="storch, torch (hand-written) or both")
    i.add_argument("--seeds", default=None, type=int_list(0, SEED_BELOW), help="comma-separated seeds, one run each (default: --seed)")
    i.add_argument("--variance-reps", type=variance_reps, default=16, help="second-order estimates for the variance (0: skip)")
    return p


def _command_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The subparser of ``command``: its ``error`` prints ``usage: storch-compare COMMAND ...``."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:  # vae takes no positional argument
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)} (none: vae)")
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["vae", *argv]
    args, extra = parser.parse_known_args(argv)
    # errors found after parsing print the subcommand's usage line, as argparse's own do
    command = _command_parser(parser, args.command)
    if extra:
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "overhead":
        _check_backend(command, args)
        _check_ipd_configs(command, args)
    _check_installed(command, args)
    torch.set_num_threads(args.threads)
    _check_out(command, args.out)
    _note_missing_families(args)
    if args.command == "vae":
        from .vae_cli import run

        return run(args)
    if args.command == "toy":
        from .toy import run_cli

        return run_cli(args)
    if args.command == "model":
        from .model_cli import run as run_model

        return run_model(args)
    if args.command == "sequences":
        from .sequences import run_cli

        return run_cli(args)
    if args.command == "ops":
        from .ops import run_cli as run_ops

        return run_ops(args)
    if args.command == "ipd":
        from .lola import run_cli as run_ipd

        return run_ipd(args)
    from .overhead import run_cli

    return run_cli(args)


if __name__ == "__main__":
    sys.exit(main())
