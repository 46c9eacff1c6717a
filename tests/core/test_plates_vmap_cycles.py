"""Functions storch runs per plate entry (``rules.vmap``) leave no reference cycles (issue 19).

``torch.func.vmap`` flattens its inputs and outputs with ``torch.utils._pytree``, whose recursive
local helpers hold themselves in their closure cells: 34 cyclic objects per vmapped call (found
by a tester with a replay buffer: ``Categorical(logits=theta).log_prob(plate_actions)`` runs
broadcast_tensors and gather per entry; 3502 objects after 100 importance steps). storch now
batches with functorch's primitives itself (``rules.flat_vmap``): a step that reaches the vmap
route frees everything by reference counting, and its values and gradients are the per-entry ones.
Most of the cases below reached the vmap route only through the action's ``unsqueeze`` (a 0-dim sample),
which is one raw call since p-hmm15: they are kept, for their values and garbage, and asserted off the route.
"""

from __future__ import annotations

from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, OneHotCategorical

import storch
import storch.plates.rules.vmap as vmap_rule
from step_checks import garbage_after

K, N = 6, 5


def _theta():
    torch.manual_seed(0)
    return torch.randn(K, requires_grad=True)


def _acts():
    return torch.tensor([0, 3, 5, 3, 1])


# name: cost per plate entry from (theta: plain, a: plate actions (N,), x: plate floats (N, K))
CASES = {
    "gather, plain input, plate index": lambda th, a, x: torch.log_softmax(th, -1).gather(-1, a.unsqueeze(-1))[..., 0],
    "take_along_dim": lambda th, a, x: torch.take_along_dim(torch.log_softmax(th, -1), a.unsqueeze(-1), -1)[..., 0],
    "broadcast_tensors": lambda th, a, x: torch.broadcast_tensors(a.unsqueeze(-1), th)[1].sum(-1) * a,
    "Categorical(plain logits).log_prob(plate)": lambda th, a, x: Categorical(logits=th).log_prob(a),
    "Categorical(plate logits).log_prob(plate)": lambda th, a, x: Categorical(logits=x * th).log_prob(a),
    "OneHotCategorical(plain logits).log_prob(plate)":
        lambda th, a, x: OneHotCategorical(logits=th).log_prob(F.one_hot(a, K).float()),
    "cross_entropy, plate target": lambda th, a, x: F.cross_entropy(th.unsqueeze(0), a.unsqueeze(0)),
    "scatter_add, plate index": lambda th, a, x: torch.zeros(K).scatter_add(0, a.unsqueeze(0), th[:1]) @ th,
    "diff, plate prepend": lambda th, a, x: torch.diff(x * th, 1, -1, prepend=(x * th)[..., :1]).sum(-1),
}
# the cases that still reach the vmap route; the others reached it through the action's unsqueeze only
VMAPPED = {"scatter_add, plate index", "diff, plate prepend"}


def _per_entry(fn, theta, acts, xs):
    return torch.stack([fn(theta, acts[i], xs[i]) for i in range(N)])


def _count_vmaps(monkeypatch):
    calls = []
    orig = vmap_rule._vmap_tensors
    monkeypatch.setattr(vmap_rule, "_vmap_tensors", lambda *a, **k: calls.append(1) or orig(*a, **k))
    return calls


@pytest.mark.parametrize("name", list(CASES))
def test_a_step_through_the_vmap_route_leaves_no_cycles(name, monkeypatch):
    fn = CASES[name]
    theta, xs = _theta(), torch.rand(N, K) + 0.5

    def step():
        a, x = storch.denote_independent((_acts(), xs), 0, "buffer")
        storch.add_cost(fn(theta, a, x), name="cost")
        storch.backward()

    step()  # (first-call caches: lazy imports, decompositions)
    calls = _count_vmaps(monkeypatch)
    garbage = garbage_after(step, warmups=0)
    if name in VMAPPED:
        assert calls, f"{name} no longer reaches the vmap route: this test no longer covers it"
    else:
        assert not calls, f"{name}: the action's unsqueeze went through the vmap route again"
    assert garbage == 0, f"{name}: {garbage} objects in reference cycles after one step"


@pytest.mark.parametrize("name", list(CASES))
def test_the_vmap_route_gives_the_per_entry_values_and_gradients(name, monkeypatch):
    fn = CASES[name]
    theta, xs, acts = _theta(), torch.rand(N, K) + 0.5, _acts()
    calls = _count_vmaps(monkeypatch)
    with storch.Graph():
        a, x = storch.denote_independent((acts, xs), 0, "buffer")
        out = fn(theta, a, x)
        got = out.tensor
        (g,) = torch.autograd.grad((got * torch.arange(1.0, N + 1)).sum(), theta)
    assert bool(calls) == (name in VMAPPED), (name, len(calls))
    want = _per_entry(fn, theta, acts, xs)
    (gw,) = torch.autograd.grad((want * torch.arange(1.0, N + 1)).sum(), theta)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gw)


def test_random_draws_over_two_plates_leave_no_cycles(monkeypatch):
    # a random function on a plate tensor among two plates (refused in vmap's randomness "error" mode,
    # then rerun with every entry drawing its own)
    theta = _theta()
    probs = torch.rand(3, K) + 0.1

    def step():
        p = storch.denote_independent(probs, 0, "outer")
        a = storch.denote_independent(torch.randint(0, K, (2, 4)), 0, "inner")
        q, b = torch.broadcast_tensors(theta[:4] * p[..., :4], a)  # plates (outer, inner), each maps one
        draw = torch.multinomial(p, 2)
        storch.add_cost((q * b).sum(-1) + draw.sum(-1), name="cost")
        storch.backward()

    step()
    calls = _count_vmaps(monkeypatch)
    levels = []
    flat_vmap = vmap_rule.flat_vmap
    monkeypatch.setattr(vmap_rule, "flat_vmap", lambda *a, **k: levels.append(1) or flat_vmap(*a, **k))
    garbage = garbage_after(step, warmups=0)
    assert calls and levels
    assert garbage == 0


def _garbage_of(step):
    return garbage_after(step, warmups=0)


# operators torch has no batching rule for (and no fallback): storch calls them once per plate entry (rules.vmap._loop)
LOOPED = {
    "chain_matmul": lambda w, th: torch.chain_matmul(w, th, w),
    "_neg_view": lambda w, th: getattr(torch, "_neg_view")(w @ th),  # (private: not in torch's stubs)
}


@pytest.mark.filterwarnings("ignore::UserWarning")  # chain_matmul is deprecated
@pytest.mark.parametrize("name", list(LOOPED))
def test_the_per_entry_loop_leaves_no_cycles_and_gives_the_per_entry_values(name, monkeypatch):
    """The per-entry loop flattened the entries' outputs with pytree's tree_flatten: 7 cyclic objects per entry
    (28 for 4 entries) after every step that ran such an operator."""
    fn = LOOPED[name]
    torch.manual_seed(0)
    theta, ws = torch.randn(3, 3, requires_grad=True), torch.randn(4, 3, 3)
    weights = torch.arange(1.0, 10.0).reshape(3, 3)

    def step():
        w = storch.denote_independent(ws, 0, "p")
        storch.add_cost((fn(w, theta) * weights).sum((-2, -1)), name="cost")
        storch.backward()

    step()
    loops = []
    orig = vmap_rule._loop
    monkeypatch.setattr(vmap_rule, "_loop", lambda *a, **k: loops.append(1) or orig(*a, **k))
    garbage = _garbage_of(step)
    assert loops, f"{name} no longer reaches the per-entry loop: this test no longer covers it"
    assert garbage == 0, f"{name}: {garbage} objects in reference cycles after one step"

    loops.clear()
    with storch.Graph():
        got = fn(storch.denote_independent(ws, 0, "p"), theta).tensor
        (g,) = torch.autograd.grad((got * weights).sum(), theta)
    assert loops
    want = torch.stack([fn(ws[i], theta) for i in range(4)])
    (gw,) = torch.autograd.grad((want * weights).sum(), theta)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gw)


def _attention(q, w, mha):
    # need_weights=False: the weights output is None, which torch.func.vmap refuses; storch vmaps the tensors
    # and puts the None back (rules.vmap._vmap's tensors_only)
    return F.multi_head_attention_forward(q, q, q, 8, 2, w, mha.in_proj_bias, None, None, False, 0.0,
                                          mha.out_proj.weight, mha.out_proj.bias, training=False, need_weights=False)


def test_a_function_with_a_non_tensor_output_leaves_no_cycles_and_gives_the_per_entry_values(monkeypatch):
    """vmap's wrapper that keeps a function's non-tensor outputs aside flattened every output with pytree's
    tree_flatten: a reference cycle per vmapped call."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2).double().eval()
    ws = mha.in_proj_weight.detach() + 0.1 * torch.randn(3, 24, 8, dtype=torch.double)
    q0 = torch.randn(5, 1, 8, dtype=torch.double)
    theta = torch.randn(8, dtype=torch.double, requires_grad=True)

    def step():
        w = storch.denote_independent(ws, 0, "z")
        out, attn = _attention(q0 * theta, w, mha)
        assert attn is None
        storch.add_cost(out.sum((-3, -2, -1)), name="cost")
        storch.backward()

    step()
    split = []
    orig = vmap_rule._non_tensor_leaves
    monkeypatch.setattr(vmap_rule, "_non_tensor_leaves", lambda o: split.append(orig(o) is not None) or orig(o))
    garbage = _garbage_of(step)
    assert any(split), "the attention no longer reaches vmap's non-tensor outputs: this test no longer covers it"
    assert garbage == 0, f"{garbage} objects in reference cycles after one step"

    split.clear()
    with storch.Graph():
        out, attn = _attention(q0 * theta, storch.denote_independent(ws, 0, "z"), mha)
        got = cast(storch.PlateTensor, out).tensor
        (g,) = torch.autograd.grad((got * torch.arange(1.0, 4.0, dtype=torch.double).view(3, 1, 1, 1)).sum(), theta)
    assert any(split) and attn is None
    want = torch.stack([_attention(q0 * theta, ws[i], mha)[0] for i in range(3)])
    (gw,) = torch.autograd.grad((want * torch.arange(1.0, 4.0, dtype=torch.double).view(3, 1, 1, 1)).sum(), theta)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g, gw)
