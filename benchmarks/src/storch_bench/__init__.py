"""storch's estimator comparison: a discrete VAE on bundled data, toy tables, overhead benchmarks.

The command-line entry point is ``storch-compare`` (:func:`storch_bench.cli.main`).
"""

from .roster import Spec, parse_specs, resolve
from .vae import VAEConfig, run_vae
from .toy import ToyConfig, run_toy
from .model_compare import Comparison, EstimatorResult, compare_estimators

__all__ = ["Spec", "parse_specs", "resolve", "VAEConfig", "run_vae", "ToyConfig", "run_toy",
           "compare_estimators", "Comparison", "EstimatorResult"]
