"""examples/distributed/train_ddp.py runs under torchrun with 2 gloo processes (a short run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "distributed" / "train_ddp.py"


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_train_ddp_example():
    # one short run (tests/reliability/test_ddp.py checks the numbers, find_unused_parameters included)
    args = ["--estimator", "relax"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(EXAMPLE),
           "--epochs", "1", "--max-train", "200", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "validation -ELBO" in out.stdout
    assert "estimator state identical on every rank: True; model parameters identical: True" in out.stdout
