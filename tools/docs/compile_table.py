"""Which first-party estimators ``storch.compile`` replays and compiles: measured, not written by hand.

For each configuration below (a registry name with options, on a small step: a linear encoder, one
node, one cost), one eager step first (it builds what is built on first use: a learned baseline's
or control variate's network, a first moving average), then ``storch.compile(step, backend=None)``
and ``storch.compile(step, backend="aot_eager")`` (a compiling backend: the program is one autograd
node, as with inductor, which refuses the same estimators) are each called twice with
``loss.backward()``. A cell is "yes" when that ran, or "refused" with the first sentence of the
``StorchError``. docs/estimators/README.md shows the table between its compile-table markers;
``python tools/docs/compile_table.py --write`` rewrites it, and tests/docs/test_compile_table.py
checks that it is current.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from torch.distributions import Bernoulli, Normal

sys.path.insert(0, str(Path(__file__).resolve().parent))
from marked import between, write_between  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "estimators" / "README.md"
START, END = "<!-- compile-table: start -->", "<!-- compile-table: end -->"

# (registry name, options as written in the table, options, distribution family)
CONFIGS = [
    ("arm", "", {}, "bernoulli"),
    ("disarm", "", {}, "bernoulli"),
    ("expect", "", {}, "bernoulli"),
    ("go", "", {}, "bernoulli"),
    ("gumbel_softmax", "", {}, "bernoulli"),
    ("gumbel_softmax", "temperature=schedule", {"temperature": lambda step: max(0.5, 0.99 ** step)}, "bernoulli"),
    ("gumbel_straight_through", "", {}, "bernoulli"),
    ("importance", "proposal=Bernoulli(0.5)", {"proposal": "uniform"}, "bernoulli"),
    ("lax", "", {}, "normal"),
    ("mvd", "", {}, "bernoulli"),
    ("rebar", "", {}, "bernoulli"),
    ("rebar", "update=False", {"update": False}, "bernoulli"),
    ("relax", "", {}, "bernoulli"),
    ("reparameterization", "", {}, "normal"),
    ("score", "", {}, "bernoulli"),
    ("score", "baseline='leave_one_out'", {"baseline": "leave_one_out"}, "bernoulli"),
    ("score", "baseline='moving_average'", {"baseline": "moving_average"}, "bernoulli"),
    ("score", "baseline='learned'", {"baseline": "learned"}, "bernoulli"),
    ("score", "baseline='greedy'", {"baseline": "greedy"}, "normal"),
    ("spsa", "", {}, "bernoulli"),
    ("straight_through", "", {}, "bernoulli"),
    ("sum_and_sample", "", {}, "bernoulli"),
    ("unordered_set", "", {}, "bernoulli"),
]


def _first_sentence(message: str) -> str:
    text = re.sub(r"\s+", " ", message.strip()).replace("_status.<locals>.step", "the step")
    text = text.replace(" (plate 'z')", "")
    cut = re.search(r"\.(\s+[A-Z]|$)", text)  # (not at "e.g. a")
    text = text[: cut.start()] if cut else text
    return text.replace("|", "\\|")


def _status(name: str, options: dict, family: str, backend) -> str:
    import storch

    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 3)
    opts = dict(options)
    if opts.get("proposal") == "uniform":
        opts["proposal"] = Bernoulli(probs=torch.full((5, 3), 0.5))
    cls = storch.get_estimator_class(name)
    if "n_samples" in cls.options():
        opts.setdefault("n_samples", 2)
    est = storch.estimator(name, plate="z", **opts)
    x = torch.randn(5, 4)

    def build(x):
        h = encoder(storch.denote_independent(x, 0, "data"))
        z = est(Bernoulli(logits=h) if family == "bernoulli" else Normal(h, 1.0))
        storch.add_cost(((z - 0.45) ** 2).sum(-1), name="f")

    def step(x):
        with storch.Graph():
            build(x)
            return storch.surrogate_loss()

    with storch.Graph():  # one eager step: what is built on first use
        build(x)
        storch.backward()
    compiled = storch.compile(step, backend=backend)
    try:
        for _ in range(2):
            encoder.zero_grad()
            compiled(x).backward()
    except storch.StorchError as e:
        return "refused: " + _first_sentence(str(e))
    if any(p.grad is None or not torch.isfinite(p.grad).all() for p in encoder.parameters()):
        return "no gradient"
    return "yes"


def compile_table() -> str:
    """The table: estimator, options, ``backend=None`` (the replay), a compiling backend."""
    rows = ["| estimator | options | `storch.compile(step, backend=None)` | compiling backend (inductor, aot_eager) |",
            "|---|---|---|---|"]
    for name, shown, options, family in CONFIGS:
        replay = _status(name, options, family, None)
        compiled = _status(name, options, family, "aot_eager")
        rows.append(f"| [`{name}`]({name}.md) | {f'`{shown}`' if shown else 'defaults'} | {replay} | {compiled} |")
    return "\n".join(rows) + "\n"


def compile_table_problem() -> str:
    """Why docs/estimators/README.md's compile table is not what storch.compile does now, or ""."""
    shown = between(PAGE, START, END)
    if shown is None:
        return f"{PAGE.relative_to(ROOT)} has no {START} ... {END} markers"
    expected = compile_table().strip()
    if shown != expected:
        return (f"the compile table of {PAGE.relative_to(ROOT)} is not what storch.compile does now; "
                "`python tools/docs/compile_table.py --write` rewrites it. Now:\n" + expected)
    return ""


def write_compile_table() -> None:
    write_between(PAGE, START, END, compile_table())


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write_compile_table()
        raise SystemExit(0)
    print(compile_table())
