"""Checks shared by the real-model tests: per-entry oracles, plate layouts, gradient comparison.

- :func:`assert_per_entry`: a function of plate tensors equals, at every plate entry, the same
  function applied to that entry's plain tensors (the per-sample oracle of issue 10).
- :func:`lift`: a plain tensor with leading plate dims made a ``storch.PlateTensor``.
- :func:`layout`: the raw storage of a plate tensor in a chosen plate order (missing or size-1
  plates expanded), to hand storch's samples to a hand-written batched model.
- :func:`assert_same_grads`: two lists of gradients are equal (tight tolerances).
- :func:`step_value_and_grads`, :func:`assert_same_step`: a (compiled or eager) step's value and gradients from a
  seed, and two of them equal (the compile tests' comparison with eager storch).
- :func:`assert_names_a_section`: the docs section an error message names is a heading of that page.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import storch

__all__ = ["lift", "layout", "assert_per_entry", "assert_same_grads", "grads", "PLATES", "step_value_and_grads",
           "assert_same_step", "assert_names_a_section"]

# a sample plate and a data plate, sizes chosen different so that mixed-up dims show
PLATES = (storch.Plate("z", 3), storch.Plate("data", 2, True))


def lift(raw: torch.Tensor, plates: Sequence[storch.Plate] = PLATES) -> storch.PlateTensor:
    """``raw`` (leading dims = ``plates``) as a PlateTensor."""
    return storch.PlateTensor(raw, tuple(plates))


def layout(t: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """Raw storage of plate tensor ``t`` with its plates in the order ``names`` (all of them), then
    its per-sample dims; plates that ``t`` lacks are not allowed."""
    if type(t) is not storch.PlateTensor:
        raise TypeError(f"expected a PlateTensor, got {type(t).__name__}")
    have = [p.name for p in t.plates]
    if sorted(have) != sorted(names):
        raise AssertionError(f"plates {have} are not {list(names)}")
    raw = t.tensor.permute(*[have.index(n) for n in names], *range(len(have), t.tensor.dim()))
    sizes = [p.size for n in names for p in t.plates if p.name == n]
    return raw.expand(*sizes, *raw.shape[len(names):])


def _entry(x, idx: dict):
    """The plain tensor of plate tensor ``x`` at plate entry ``idx`` (name -> index)."""
    if type(x) is not storch.PlateTensor:
        return x
    raw = x.tensor
    for p in x.plates:  # each select drops the leading plate dim; a size-1 dim broadcasts
        raw = raw.select(0, idx[p.name] if raw.shape[0] > 1 else 0)
    return raw


def _flat(out) -> list:
    if isinstance(out, (tuple, list)):
        return [y for o in out for y in _flat(o)]
    return [out]


def assert_per_entry(fn: Callable, *args, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """``fn(*args)`` on plate tensors equals ``fn`` on every plate entry of the args alone.

    Every tensor in the result must be a PlateTensor whose plates are the union of the args'
    plates (by name), and its entry must equal the plain result for that entry.
    """
    out = _flat(fn(*args))
    plates = {}
    for a in args:
        if type(a) is storch.PlateTensor:
            for p in a.plates:
                plates[p.name] = p.size
    names = list(plates)
    for k, o in enumerate(out):
        assert type(o) is storch.PlateTensor, f"result {k} is a {type(o).__name__}, not a PlateTensor"
        assert sorted(p.name for p in o.plates) == sorted(names), (k, o.plates, names)
    for combo in itertools.product(*(range(plates[n]) for n in names)):
        idx = dict(zip(names, combo))
        ref = _flat(fn(*[_entry(a, idx) for a in args]))
        assert len(ref) == len(out)
        for k, (o, r) in enumerate(zip(out, ref)):
            got = _entry(o, idx)
            assert got.shape == r.shape, f"result {k} at {idx}: shape {tuple(got.shape)} != {tuple(r.shape)}"
            torch.testing.assert_close(got, r, atol=atol, rtol=rtol, msg=lambda m: f"result {k} at {idx}: {m}")


def grads(loss: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d params (zeros for parameters the loss does not reach)."""
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, list(params), allow_unused=True), params)]


def assert_same_grads(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], names: Sequence[str] = (),
                      atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Two gradient lists agree entry by entry; and they are not all zero (a vacuous match)."""
    assert len(a) == len(b)
    assert any(float(g.abs().max()) > 0 for g in a), "all gradients are zero"
    for i, (ga, gb) in enumerate(zip(a, b)):
        label = names[i] if i < len(names) else str(i)
        torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol, msg=lambda m: f"gradient of {label}: {m}")


def sgd_run(params: Sequence[torch.Tensor], seeds, step: Callable[[int], tuple], after_trace: Optional[Callable] = None,
            trace_at: int = 2, lr: float = 0.3) -> list:
    """A training run for comparing a compiled step with eager storch: for each seed (step ``i``),
    ``torch.manual_seed(seed)``, zeroed gradients, ``step(i)`` (which runs and backpropagates step ``i``
    and returns its record: loss, gradients, estimator state), then an SGD step (``lr``) of ``params``.
    ``after_trace()`` runs before step ``trace_at``, once the compiled step has been traced (e.g. the
    ``forbid_storch`` fixture). Returns the records, for :func:`assert_same_runs`."""
    opt = torch.optim.SGD(params, lr=lr)
    out = []
    for i, seed in enumerate(seeds):
        if after_trace is not None and i == trace_at:
            after_trace()
        torch.manual_seed(seed)
        opt.zero_grad()
        out.append(step(i))
        opt.step()
    return out


def assert_same_runs(got: Sequence, want: Sequence) -> None:
    """Two training runs agree step by step (a compiled step's against eager storch's): each step's
    record (loss, gradients, estimator state: tensors, lists, dicts of tensors, integers) compared as a
    whole by ``torch.testing.assert_close``, tensors to rtol 1e-5 / atol 1e-6, dict keys and
    integers exactly."""
    assert len(got) == len(want)
    torch.testing.assert_close(list(got), list(want), rtol=1e-5, atol=1e-6)


def assert_trains(model: torch.nn.Module, opt: torch.optim.Optimizer, build: Callable, steps: int = 3) -> None:
    """``steps`` training steps, each ``build(graph)`` in a fresh ``storch.Graph`` then
    ``storch.backward()``: a finite value, a finite gradient for every parameter, and every
    parameter moved by the optimiser at the end."""
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(steps):
        opt.zero_grad()
        with storch.Graph() as graph:
            build(graph)
            assert torch.isfinite(storch.backward())
        for q in model.parameters():
            assert q.grad is not None and torch.isfinite(q.grad).all()
        opt.step()
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def train_exact(theta0: torch.Tensor, exact: Callable, build: Callable, steps: int = 30,
                lr: float = 0.05) -> tuple[float, float, torch.Tensor]:
    """``steps`` Adam steps on a copy of ``theta0``, each ``build(theta)`` (its costs) in a fresh ``storch.Graph``
    then ``storch.backward()``: ``(before, after, theta)``, the exact expected cost ``exact(theta)`` (by
    enumeration) before and after training, and the trained parameter (for the ported models' training tests)."""
    theta = torch.nn.Parameter(theta0.detach().clone())
    opt = torch.optim.Adam([theta], lr=lr)
    before = float(exact(theta.detach()))
    for _ in range(steps):
        opt.zero_grad()
        with storch.Graph():
            build(theta)
            storch.backward()
        opt.step()
    return before, float(exact(theta.detach())), theta


class TrainableBaseline(torch.nn.Module):
    """A user's trainable baseline module for ``score(baseline=...)`` on 3 Bernoulli logits: b = a
    linear map of the (detached) logits, aligned to the cost. ``storch.compile`` refuses it (its
    regression reads what it likes, not declared detached inputs)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(3, 1)

    def forward(self, node, cost):
        return cost.align(self.net(node.distribution.logits.detach()).squeeze(-1), node.parents)


def step_value_and_grads(loss: Callable, params: Sequence[torch.Tensor], args: Sequence, seed: int):
    """``(value, grads)`` of ``loss(*args)`` drawn from ``seed``."""
    torch.manual_seed(seed)
    value = loss(*args)
    return value.detach(), torch.autograd.grad(value, params)


def assert_same_step(got, want) -> None:
    """``(value, grads)`` of a compiled or replayed step equal eager storch's from the same seed."""
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert len(got[1]) == len(want[1])
    for g, e in zip(got[1], want[1]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def assert_names_a_section(message: str) -> None:
    """The section an error message names, ``(docs/PAGE.md, 'Title')`` (the first such reference), is a heading
    of that page (not a paragraph's words)."""
    found = re.search(r"\((docs/[\w/-]+\.md), '([^']+)'\)", message)
    assert found is not None, message
    page, title = found.groups()
    text = (Path(__file__).resolve().parents[2] / page).read_text(encoding="utf-8")
    assert title in re.findall(r"^#+ (.+)$", text, re.M), (page, title)
