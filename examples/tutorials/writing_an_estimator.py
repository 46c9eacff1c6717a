"""Tutorial 4: writing, testing and publishing an estimator.

    python examples/tutorials/writing_an_estimator.py        # ~20 s on one CPU thread
    pytest examples/tutorials/writing_an_estimator.py        # its test functions, as pytest runs them

1. Write: a score-function estimator with the leave-one-out baseline is one method on
   ``storch.Estimator``; a buggy variant (the baseline includes the sample's own cost) next to it.
2. Use it: an instance is an estimator like any other, in a training loop with ``storch.backward()``.
3. Publish: an estimator package declares a module under the entry-point group
   ``storch.estimators``; the module's ``storch_estimators()`` hook returns the classes. This script
   writes the metadata that ``pip install`` would write (a ``*.dist-info`` folder with
   ``entry_points.txt``) into a temporary folder on ``sys.path``, so storch finds the estimator by
   name exactly as it finds an installed package (examples/storch-estimators-example is a complete
   package).
4. Test: ``storch.testing`` z-tests the estimates of every order against exact values on small
   models, and the leakage check puts every replicate in its own graph; the buggy variant fails.

``--out DIR`` saves the figure (the z-scores of both variants) as DIR/writing_an_estimator.png.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.distributions import Bernoulli

import storch
import storch.testing as kit
from storch import hookimpl
from storch.extending import options


# 1. Write ---------------------------------------------------------------------------------

class LeaveOneOut(storch.Estimator):
    """Score function with the leave-one-out baseline.

    Components: the defaults of ``storch.Estimator`` (n i.i.d. samples, weights 1/n, the score
    function l = log p(x)), and a control variate with the baseline b_j = the mean cost of the
    OTHER samples, which does not depend on x_j.

    max_order: ∞, as the first-party ``score``: a detached baseline independent of the sample is
    zero-mean at any order (appendix C of the paper).
    """

    name = "my_leave_one_out"

    def check_option(self, name, value):
        # the constructor's check, and est.n_samples = v's on a constructed estimator: the baseline
        # averages the OTHER samples, so at least two (storch.OptionError otherwise)
        if name == "n_samples":
            return options.integer(self.name, "n_samples", value, minimum=2)
        return super().check_option(name, value)

    def baseline(self, node, cost):
        # the mean cost of the OTHER samples: independent of this sample (appendix C)
        return (cost.sum_plate(cost.tensor) - cost.tensor) / (node.n - 1)


class OwnSampleMean(LeaveOneOut):
    """The classic bug: the baseline averages every sample's cost, its own included (biased)."""

    name = "my_own_sample_mean"

    def baseline(self, node, cost):
        return cost.sum_plate(cost.tensor) / node.n + 0 * cost.tensor


@hookimpl
def storch_estimators() -> list:
    """The plugin hook: the classes this package provides (the entry point names this module)."""
    return [LeaveOneOut, OwnSampleMean]


# 3. Publish: what `pip install my-estimators` leaves on disk, next to this module -----------

PYPROJECT = """\
[project]
name = "my-estimators"
dependencies = ["storch-core", "torch>=2.1"]

[project.entry-points."storch.estimators"]
mine = "writing_an_estimator"
"""


def install_metadata(folder: Path) -> None:
    """The ``*.dist-info`` that pip writes for PYPROJECT, on ``sys.path`` with this module."""
    info = folder / "my_estimators-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-estimators\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[storch.estimators]\nmine = writing_an_estimator\n")
    sys.path[:0] = [str(folder), str(Path(__file__).resolve().parent)]
    storch.reload_estimators()


# 4. Test: these functions are what a package's tests/test_my_estimator.py holds ------------

def test_matches_exact_values():
    # orders 0..min(max_order, 3) (order 0 only if biased), on every kit model whose
    # distributions the estimator supports; raises AssertionError with a table on failure
    kit.check_against_enumeration(LeaveOneOut, options={"n_samples": 3})


def test_theorem_1_conditions():
    kit.check_conditions(
        LeaveOneOut,
        lambda theta: Bernoulli(logits=theta),            # the node, written for one sample
        torch.tensor([0.3, -0.7], dtype=torch.float64),   # where to check
        lambda x: ((x - 0.2) ** 2).sum(),                  # a deterministic test function f
        options={"n_samples": 3},
    )


def test_no_leak_across_the_frame():
    # every replicate its own graph with a data plate of 2: a baseline that averages the frame
    # (its own sample or data point included) is biased here, as in real use
    kit.check_leakage(LeaveOneOut, options={"n_samples": 3})


def test_on_chosen_models():
    # kit.standard_models(est) returns a tuple: the LIST of the kit's models that est supports,
    # and a dict {model name: why it is skipped} for the others; pass a selection as models=
    models, skipped = kit.standard_models(LeaveOneOut("probe", n_samples=3))
    chosen = [m for m in models if m.name in ("bernoulli[3]", "global_latent[Bernoulli]")]
    assert len(chosen) == 2, skipped
    kit.check_leakage(LeaveOneOut, options={"n_samples": 3}, models=chosen)


def test_learned_baseline():
    # a learned part is tested trained: warmup=100 steps of storch.backward() first (here the
    # first-party score estimator's learned NVIL baseline)
    kit.check_against_enumeration("score", options={"n_samples": 2, "baseline": "learned"}, warmup=100)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    # 2. Use it: an instance works like any estimator. Fit p(b=1) to minimise E[(b - 0.8)^2].
    torch.manual_seed(0)
    logit = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([logit], lr=0.1)
    est = LeaveOneOut("b", n_samples=4)
    for _ in range(100):
        b = est(Bernoulli(logits=logit))
        storch.add_cost(((b - 0.8) ** 2).sum())
        storch.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"2. trained with LeaveOneOut@4: p(b=1) = {torch.sigmoid(logit).item():.3f} (optimum: 1)\n")

    # 3. Publish and find it by name.
    with tempfile.TemporaryDirectory() as tmp:
        install_metadata(Path(tmp))
        info = storch.available_estimators()["my_leave_one_out"]
        print("3. pyproject.toml of the package:\n")
        print("   " + PYPROJECT.replace("\n", "\n   "))
        print(f"   storch.available_estimators()['my_leave_one_out']: package={info.package!r}, "
              f"max_order={info.max_order}, biased={info.biased}")
        print(f"   storch.estimator('my_leave_one_out', plate='z', n_samples=3) -> "
              f"{type(storch.estimator('my_leave_one_out', plate='z', n_samples=3)).__name__}\n")

        # 4. Test both, by name, as an installed package is tested.
        print("4. storch.testing on both estimators (|z| < 4 passes):\n")
        reports = {}
        for name in ("my_leave_one_out", "my_own_sample_mean"):
            report = kit.check_leakage(name, options={"n_samples": 3}, raise_on_failure=False)
            reports[name] = report
            print(f"check_leakage({name!r}): {'PASS' if report.ok else 'FAIL'}")
            print(report.table(details=False))
            print()
        exact = kit.check_against_enumeration("my_leave_one_out", options={"n_samples": 3},
                                              raise_on_failure=False)
        print(f"check_against_enumeration('my_leave_one_out'): {'PASS' if exact.ok else 'FAIL'}")
        print(exact.table(details=False))
    storch.reload_estimators()  # the temporary package is gone

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.4))
        for i, (name, report) in enumerate(reports.items()):
            labels = [c.name for c in report.checks]
            z = [c.max_abs_z for c in report.checks]
            ax.scatter(z, range(len(labels)), label=name, marker="o" if i == 0 else "x")
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.axvline(4.0, color="grey", linestyle="--", label="threshold |z| = 4")
        ax.set_xscale("log")
        ax.set_xlabel("max |z| of the check (log)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.out.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out / "writing_an_estimator.png", dpi=90)


if __name__ == "__main__":
    main()
