"""A chain of REBAR / RELAX nodes: each node's plate holds 3 n entries (b, σ_λ(z), σ_λ(z̃)) and a node downstream
is drawn for every one of them, so M chained nodes hold (3 n)^M entries per data point. Past ``max_chain_entries``
(default 32768) a node downstream of another relaxed node is refused before its draw, with what to do instead; short chains still run, unbiased."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributions import Bernoulli

import storch
from storch.testing import assert_unbiased
from path_probes import Allocations

from relaxed_problems import estimates, exact_derivatives


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    storch.reset()


DATA, D = 4, 3


def _chain(ests, data, ws, last=None):
    """z_i ~ Bernoulli(logits = z_{i-1} W_i), z_0's logits from the data; ``last`` runs around the last call."""
    h = storch.denote_independent(data, 0, "d")
    for i, est in enumerate(ests):
        q = Bernoulli(logits=h @ ws[i])
        if i == len(ests) - 1 and last is not None:
            with last:
                h = est(q)
        else:
            h = est(q)
        storch.add_cost(((h - 0.45) ** 2).sum(), name=f"c{i}")
    return h


def _weights(m):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(D, D, generator=g, requires_grad=True) for _ in range(m)]


@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_chained_node_past_the_default_refused_before_its_draw(name):
    """Two nodes of n = 61: 183 x 183 = 33489 > 32768 entries per data point, refused at the second."""
    torch.manual_seed(0)
    ests = [storch.estimator(name, plate=f"z{i}", n_samples=61) for i in range(2)]
    probe = Allocations()
    with storch.Graph():
        with pytest.raises(storch.PlateError) as info:
            _chain(ests, torch.randn(DATA, D), _weights(2), last=probe)
    msg = str(info.value)
    assert f"{name} (plate 'z1'): this node would hold 33489 entries per data point" in msg
    assert "3 blocks of n_samples=61 (b, σ_λ(z), σ_λ(z̃))" in msg
    assert "1 earlier relaxed node(s)" in msg and "'z0' (183)" in msg
    assert "multiplies the entries downstream by 3 n" in msg and "max_chain_entries=32768" in msg
    for fix in ("control_variate='network'", "storch.estimator('score'", "baseline=", "fewer chained relaxed nodes",
                "larger max_chain_entries"):
        assert fix in msg
    # refused before the draw: no tensor of the node's size was made in its call (the old code drew it)
    assert probe.largest < 183 * 183 * DATA * D


@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_a_node_in_no_chain_is_not_refused_whatever_its_n(name):
    """A node that depends on no earlier relaxed node holds 3 n entries, linear in n: never refused (review
    r-thirteen: n = 1366 alone was refused by a count of its own entries), nor one below a score node."""
    torch.manual_seed(5)
    with storch.Graph():
        z = _chain([storch.estimator(name, plate="z0", n_samples=2000)], torch.randn(DATA, D), _weights(1))
        assert z.tensor.shape == (6000, DATA, D)
    with storch.Graph():
        ests = [storch.estimator("expect", plate="s"), storch.estimator(name, plate="z0", n_samples=2000)]
        z = _chain(ests, torch.randn(DATA, D), _weights(2))
        assert z.tensor.shape[0] == 6000


def test_large_n_refused_at_the_second_node():
    """Two nodes of n = 100: 300 x 300 = 90000 entries per data point (the first alone, 300, runs)."""
    torch.manual_seed(1)
    ests = [storch.estimator("rebar", plate=f"z{i}", n_samples=100) for i in range(2)]
    probe = Allocations()
    with storch.Graph():
        with pytest.raises(storch.PlateError, match="would hold 90000 entries per data point") as info:
            _chain(ests, torch.randn(DATA, D), _weights(2), last=probe)
    assert "3 blocks of n_samples=100" in str(info.value) and "'z0' (300)" in str(info.value)
    assert probe.largest < 300 * 300 * DATA * D


def test_max_chain_entries_option():
    torch.manual_seed(2)
    data, ws = torch.randn(DATA, D), _weights(2)
    # 2 nodes of n = 1: 9 entries per data point
    with storch.Graph():
        with pytest.raises(storch.PlateError, match="9 entries per data point.*max_chain_entries=8"):
            _chain([storch.estimator("relax", plate=f"z{i}", max_chain_entries=8) for i in range(2)], data, ws)
    with storch.Graph():
        z = _chain([storch.estimator("rebar", plate=f"z{i}", max_chain_entries=9) for i in range(2)], data, ws)
        assert z.tensor.shape == (3, 3, DATA, D)
    for bad in (0, 2.5, "many"):
        with pytest.raises(storch.OptionError, match="max_chain_entries"):
            storch.estimator("relax", plate="z", max_chain_entries=bad)


def test_network_form_does_not_multiply():
    """control_variate='network': a plate of n entries, evaluation_from unset: 10 chained nodes hold 1 entry each,
    and a relaxed node after them counts only its own 3."""
    torch.manual_seed(4)
    ests = [storch.estimator("relax", plate=f"z{i}", control_variate="network") for i in range(10)]
    ests.append(storch.estimator("rebar", plate="z10", max_chain_entries=3))
    with storch.Graph():
        z = _chain(ests, torch.randn(DATA, D), _weights(11))
        assert z.tensor.shape == (3,) + (1,) * 10 + (DATA, D)
        storch.backward()


# -- a chain of 3 relaxed nodes (27 entries per data point) still runs, unbiased: z-test against enumeration ----

THETA = torch.tensor([0.3, -0.4, 0.2], dtype=torch.float64)


def _costs(b1, b2, b3):
    return (b1 + b2 + b3 - 1.2) ** 2 + 0.5 * (b3 - 0.3 * b1) ** 2


def _exact(theta):
    total = theta.new_zeros(())
    for v in itertools.product([0.0, 1.0], repeat=3):
        b1, b2, b3 = (theta.new_tensor(x) for x in v)
        p = (Bernoulli(logits=theta[0]).log_prob(b1) + Bernoulli(logits=theta[1] + 1.5 * b1 - 0.5).log_prob(b2)
             + Bernoulli(logits=theta[2] + b2 - 0.8 * b1).log_prob(b3)).exp()
        total = total + p * _costs(b1, b2, b3)
    return total


@pytest.mark.parametrize("name", ["relax", "rebar"])
def test_three_node_chain_unbiased(name):
    torch.manual_seed(5)
    e1, e2, e3 = (storch.estimator(name, plate=f"b{i}") for i in range(3))

    def model(x):
        b1 = e1(Bernoulli(logits=x[0]))
        b2 = e2(Bernoulli(logits=x[1] + 1.5 * b1 - 0.5))
        b3 = e3(Bernoulli(logits=x[2] + b2 - 0.8 * b1))
        assert tuple(p.size for p in b3.plates if not p.independent) == (3, 3, 3)
        storch.add_cost(_costs(b1, b2, b3))

    got = estimates(model, THETA, 1)[0]
    report = assert_unbiased(got, exact_derivatives(_exact, THETA, 1)[0], f"{name} 3-node chain")
    print(f"{report.name}: max |z| = {float(report.z.abs().max()):.2f}")
