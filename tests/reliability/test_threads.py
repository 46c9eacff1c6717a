"""Two threads, each with its own storch.Graph, train different models at the same time and get
bitwise the same gradients as each alone.

torch's global generator is shared by all threads; ``storch.Graph(generator=g)`` makes every
random draw storch makes in it (the estimators' proposals, relaxation noise, lazily built networks'
initialisation) use ``g``; user code passes ``storch.current_generator()`` to its own draws."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch

STEPS = 15


def _model(kind: str):
    g = torch.Generator().manual_seed(11 if kind == "a" else 22)
    enc = torch.nn.Linear(6, 4)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    available = storch.available_estimators()
    if kind == "a":
        est = storch.estimator("score", plate="z", n_samples=4, baseline="leave_one_out") \
            if "score" in available else storch.estimator("expect", plate="z")
    else:
        est = storch.estimator("relax", plate="z") if "relax" in available else \
            storch.estimator("reparameterization", plate="z", n_samples=3)
    return enc, est


def _train(kind: str, barrier=None) -> list[torch.Tensor]:
    enc, est = _model(kind)
    opt = torch.optim.SGD(enc.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5 if kind == "a" else 6)
    data = torch.randn(8, 6, generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(STEPS):
        if barrier is not None:
            barrier.wait()  # both threads inside their steps at the same time
        with storch.Graph(generator=gen):
            noise = torch.randn(8, 6, generator=storch.current_generator())  # the user's own draw: g too
            x = storch.denote_independent(data + 0.1 * noise, 0, "data")
            logits = enc(x)
            q = Bernoulli(logits=logits) if (kind == "a" or est.name in ("relax", "score", "expect")) \
                else Normal(logits, 1.0)
            z = est(q)
            storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
            opt.zero_grad()
            storch.backward()
        grads.append(enc.weight.grad.clone())
        opt.step()
    return grads


def test_two_threads_get_bitwise_the_same_gradients_as_alone():
    alone = {k: _train(k) for k in ("a", "b")}
    together: dict = {}
    errors = []
    barrier = threading.Barrier(2)

    def run(k):
        try:
            together[k] = _train(k, barrier)
        except BaseException as e:  # reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in ("a", "b")]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors
    for k in ("a", "b"):
        for g_alone, g_together in zip(alone[k], together[k]):
            assert torch.equal(g_alone, g_together)


def test_without_a_generator_threads_share_the_global_one():
    """The reason for the generator: the same seeds, drawn through the global generator by two
    threads at once, interleave (shown here deterministically, by drawing in turns)."""
    torch.manual_seed(0)
    alone = torch.rand(4)
    torch.manual_seed(0)
    torch.rand(1)  # another thread's draw in between
    assert not torch.equal(torch.rand(4), alone)


def test_generator_draws_are_reproducible_and_leave_the_global_generator_alone():
    est = storch.estimator("reparameterization", plate="z", n_samples=3)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    draws = []
    for _ in range(2):
        with storch.Graph(generator=torch.Generator().manual_seed(4)):
            draws.append(est(Normal(torch.zeros(2), 1.0)).tensor)
            assert storch.current_generator() is not None
    assert torch.equal(*draws)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert storch.current_generator() is None


def test_generator_must_be_a_generator():
    with pytest.raises(TypeError, match="torch.Generator"):
        storch.Graph(generator=3)


@pytest.mark.parametrize("name, options", [("score", {"n_samples": 2, "baseline": "learned", "hidden": 4}),
                                           ("relax", {})])
def test_learned_parts_initialise_from_the_graphs_generator_not_the_global_one(name, options):
    """NVIL's heads (score's baseline='learned') and RELAX's network are built on first use inside
    ``storch.Graph(generator=g)``: ``g`` initialises them, so the global seed changes nothing (NVIL's
    first layer was drawn from the global generator)."""
    if name not in storch.available_estimators():
        pytest.skip(f"needs {name}")
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        enc, _ = _model("a")
        est = storch.estimator(name, plate="z", **options)
        gen = torch.Generator().manual_seed(3)
        data = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
        grads = []
        for _ in range(3):
            with storch.Graph(generator=gen):
                z = est(Bernoulli(logits=enc(storch.denote_independent(data, 0, "data"))))
                storch.add_cost(((z - 0.3) ** 2).sum(), name="c")
                enc.zero_grad()
                storch.backward()
            grads.append(enc.weight.grad.clone())
        runs.append((grads, [p.detach().clone() for p in est.parameters()]))
    (grads_a, params_a), (grads_b, params_b) = runs
    assert len(params_a) > 0
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
