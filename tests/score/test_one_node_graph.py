"""One score node with one cost (the toy step of issue 19): storch's surrogate is the DiCE objective a person writes
by hand, ``(magic_box(l) * C).mean()`` (with a baseline b, ``lerp(b, C, magic_box(l))``), node for node in its
autograd graph, and its losses and first and second derivatives are those of that objective.

The hand-written benchmark step (``storch_bench.handwritten.score_surrogate``) writes the first-order form
``(C + l * ⊥C).mean()`` (one node fewer: Add instead of MagicBox's Sub and Exp); storch's order-1 surrogate is
the any-order form (its second derivative is DiCE's, the first-order form's is not), so it keeps MagicBox."""

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.surrogate import loss as loss_module


def _graph(fn) -> list[str]:
    """The autograd node types of the graph under ``fn`` in depth-first order (each node once)."""
    seen, out, stack = set(), [], [fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        out.append(f.name())
        stack.extend(g for g, _ in reversed(f.next_functions))
    return out


def _cost(z):
    return ((z - 0.45) ** 2).sum(-1)


def _storch_step(theta, baseline, seed):
    est = storch.estimator("score", plate="z", n_samples=8, baseline=baseline)
    torch.manual_seed(seed)
    with storch.Graph():
        th = storch.denote_independent(theta, 0, "data")
        z = est(Bernoulli(logits=th))
        storch.add_cost(_cost(z), name="f")
        return storch.surrogate_loss(order=1)


def _by_hand(theta, baseline, seed):
    """DiCE by hand on the same draws: l = log p(z) summed over the event, MagicBox(l) · C (+ (1 - MagicBox(l)) · ⊥b)."""
    torch.manual_seed(seed)
    d = Bernoulli(logits=theta)
    z = d.sample((8,))
    lp = d.log_prob(z).sum(-1)
    c = _cost(z)
    box = storch.magic_box(lp)
    if baseline == "none":
        return (box * c).mean()
    b = ((c.sum(0, keepdim=True) - c) / 7).detach()  # leave-one-out
    return torch.lerp(b, c, box).mean()


@pytest.mark.parametrize("baseline", ["none", "leave_one_out"])
def test_one_score_node_builds_the_hand_written_dice_graph(monkeypatch, baseline):
    taken = []
    one = loss_module._one_node_loss
    monkeypatch.setattr(loss_module, "_one_node_loss", lambda g: taken.append(1) or one(g))
    theta = torch.tensor([[-1.0, 0.2, 1.0], [0.5, -0.3, 0.0]], requires_grad=True)
    for seed in range(3):
        loss = _storch_step(theta, baseline, seed)
        hand = _by_hand(theta, baseline, seed)
        mid = "MulBackward0" if baseline == "none" else "LerpBackward1"
        want = ["MeanBackward0", mid, "ExpBackward0", "SubBackward0", "SumBackward1", "NegBackward0",
                "BinaryCrossEntropyWithLogitsBackward0", "ExpandBackward0", "torch::autograd::AccumulateGrad"]
        assert _graph(hand.grad_fn) == want  # (the reference itself: torch's Bernoulli.log_prob by hand)
        assert _graph(loss.grad_fn) == want
        assert torch.equal(loss.detach(), hand.detach())
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (h,) = torch.autograd.grad(hand, theta, create_graph=True)
        assert torch.equal(g, h)
        # second derivatives (any order, as DiCE): the same as the hand-written MagicBox objective's
        v = torch.tensor([[0.3, -1.0, 0.5], [1.0, 0.2, -0.4]])
        (gg,) = torch.autograd.grad((g * v).sum(), theta)
        (hh,) = torch.autograd.grad((h * v).sum(), theta)
        torch.testing.assert_close(gg, hh, rtol=1e-6, atol=1e-7)
    assert len(taken) == 3  # the one-node path built it
