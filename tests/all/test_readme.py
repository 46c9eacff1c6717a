"""The README's usage example runs as written (with every family installed)."""

import re
from pathlib import Path

import torch

import storch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_usage_example_trains():
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    torch.manual_seed(0)
    batches = [(torch.rand(16, 64) > 0.5).float() for _ in range(3)]
    scope = {"batches": batches}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["elbo"].dim() == 0 and torch.isfinite(scope["elbo"])
    assert scope["encoder"].weight.grad is None  # zero_grad after the step
    assert not storch.current_graph().nodes  # backward() reset the default graph
