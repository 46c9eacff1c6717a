"""storch.estimate(x): the estimate of E[x] for a plate tensor of any per-sample shape, reduced as
storch.cost_estimates reduces a cost (sample plates by their estimators' weights, data plates by the mean).

Found by porting a VQ-VAE: its EMA codebook update needs E_q[one_hot(z)], and ``z.tensor.mean(0)`` is wrong for
estimators with non-uniform weights. Here the core estimators (``expect``: exact, so the estimate equals the
enumerated expectation); the score package's estimators are z-tested in tests/score/test_estimate_weights.py.
"""

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Normal, OneHotCategorical

import storch

pytestmark = pytest.mark.usefixtures("float64_default")


def test_expect_is_the_enumerated_expectation_of_a_one_hot():
    logits = torch.tensor([2.0, 0.5, -1.0, -2.0])
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(OneHotCategorical(logits=logits))
        e = storch.estimate(z)
    assert type(e) is torch.Tensor and e.shape == (4,) and not e.requires_grad
    torch.testing.assert_close(e, logits.softmax(-1), rtol=1e-12, atol=1e-12)


def test_per_sample_shape_is_kept_and_weights_are_detached():
    # two-dim per-sample values of a node with gradient-carrying weights (expect: w = p(x))
    logits = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    v = torch.arange(6.0).reshape(2, 3)
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(Bernoulli(logits=logits))
        x = z.unsqueeze(0) * v + z.unsqueeze(0) ** 2  # per sample (2, 3)
        e = storch.estimate(x)
    p = torch.sigmoid(logits.detach())
    assert e.shape == (2, 3) and not e.requires_grad
    torch.testing.assert_close(e, p * v + p, rtol=1e-12, atol=1e-12)


def test_two_nodes_and_a_data_plate():
    # E over two nodes (each exact), the mean over the data plate: the exact value is the mean over the batch
    # of E[z1 * z2 + z1] per data point
    torch.manual_seed(0)
    a = torch.randn(5, 3)
    with storch.Graph():
        d = storch.denote_independent(a, 0, "data")
        z1 = storch.estimator("expect", plate="z1")(Bernoulli(logits=d))
        z2 = storch.estimator("expect", plate="z2")(Bernoulli(logits=2.0 * d - z1))
        x = torch.stack([z1 * z2 + z1, z1], 0)  # per sample (2, 3)
        e = storch.estimate(x)
    p1 = torch.sigmoid(a)
    p2_given = [torch.sigmoid(2.0 * a - v) for v in (0.0, 1.0)]
    exact0 = p1 * p2_given[1] + p1
    torch.testing.assert_close(e, torch.stack([exact0.mean(0), p1.mean(0)]), rtol=1e-12, atol=1e-12)


def test_a_data_plate_alone_is_the_mean():
    a = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    with storch.Graph():
        e = storch.estimate(storch.denote_independent(a, 0, "data") ** 2)
    torch.testing.assert_close(e, (a ** 2).mean(0), rtol=0, atol=0)


def test_reparameterization_is_the_sample_mean():
    # uniform weights: the plain mean of the samples, whose z-test against the exact mean holds
    torch.manual_seed(2)
    loc = torch.tensor([0.5, -1.0])
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=4000)(Normal(loc, 1.0))
        e = storch.estimate(z)
        torch.testing.assert_close(e, z.tensor.mean(0), rtol=0, atol=0)
    zscore = (e - loc) / (1.0 / 4000 ** 0.5)
    assert zscore.abs().max() < 4, zscore


def test_a_plain_tensor_passes_through():
    t = torch.randn(3)
    with storch.Graph():
        assert storch.estimate(t) is t


def test_a_scalar_cost_is_its_cost_estimate_bitwise():
    logits = torch.tensor([0.3, -0.2, 0.5], requires_grad=True)
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(Bernoulli(logits=logits))
        c = ((z - 0.45) ** 2).sum()
        storch.add_cost(c, name="f")
        assert torch.equal(storch.estimate(c), storch.cost_estimates()["f"])


def test_a_tensor_of_an_earlier_step_is_refused():
    est = storch.estimator("expect", plate="z")
    with storch.Graph():
        z = est(Bernoulli(logits=torch.zeros(2)))
    with storch.Graph():
        with pytest.raises(storch.PlateError, match="storch.estimate's tensor has plate 'z'"):
            storch.estimate(z)


@pytest.mark.parametrize("write", [
    lambda c, z: c.mul_(0.9).add_(0.1 * z),
    lambda c, z: c.copy_(z),
    lambda c, z: c.index_add_(0, torch.tensor([0, 1, 2]), z),
])
def test_in_place_write_into_a_plain_buffer_says_to_reduce_first(write):
    # the old message said only "use the out-of-place version", which for a buffer kept across steps makes it a
    # plate tensor of this step's graph (the next step fails with "plate 'z' comes from two different graphs")
    counts = torch.zeros(3)
    with storch.Graph():
        z = storch.estimator("expect", plate="z")(OneHotCategorical(logits=torch.zeros(3)))
        with pytest.raises(storch.PlateError) as info:
            write(counts, z)
    msg = str(info.value)
    assert "into a plain tensor (no plates)" in msg
    assert "storch.estimate(z)" in msg and "state kept across steps" in msg
    assert "For a value used in this step only, use the out-of-place version" in msg



@pytest.mark.parametrize("buffer", [lambda k: torch.zeros(3), lambda k: torch.zeros(3) + 0.0 * k])
def test_in_place_write_names_the_out_of_place_method(buffer):
    # an MoE's or a GNN's combine into a zeros buffer, `out.index_add_(0, k, y)`: the advice names
    # `out = out.index_add(...)`, not only `x = x + v`, into a plain buffer and into a plate tensor that lacks a plate
    with storch.Graph():
        k = storch.estimator("expect", plate="k")(Categorical(logits=torch.zeros(3)))
        z = storch.estimator("expect", plate="z")(OneHotCategorical(logits=torch.zeros(3)))
        out = buffer(k)
        with pytest.raises(storch.PlateError) as info:
            out.index_add_(0, torch.tensor([0, 1, 2]), z)
        assert "out-of-place version (" in str(info.value) and "x = x.index_add(...) instead of x.index_add_(...)" in str(info.value)
        with pytest.raises(storch.PlateError) as info:
            out.add_(z)  # a pointwise in-place method names its own out-of-place form too
        assert "x = x.add(...) instead of x.add_(...)" in str(info.value)
        with pytest.raises(storch.PlateError) as info:
            out += z
        assert "x = x + v instead of x += v)" in str(info.value) and "x.__iadd__" not in str(info.value)


@pytest.mark.parametrize("buffer", [lambda k: torch.zeros(3), lambda k: torch.zeros(3) + 0.0 * k])
@pytest.mark.parametrize("method", ["copy_", "fill_"])
def test_the_advice_for_copy_and_fill_names_a_form_that_exists(buffer, method):
    # copy_ and fill_ have no out-of-place method (there is no Tensor.copy / Tensor.fill: the advice "x = x.copy(...)"
    # failed with an AttributeError when followed); the advice given is run literally and gives the written values
    with storch.Graph():
        k = storch.estimator("expect", plate="k")(Categorical(logits=torch.zeros(3)))
        z = storch.estimator("expect", plate="z")(OneHotCategorical(logits=torch.zeros(3)))
        v = z if method == "copy_" else z.sum(-1) * 2.0
        x = buffer(k)
        with pytest.raises(storch.PlateError) as info:
            getattr(x, method)(v)
        msg = str(info.value)
        assert f"x = torch.zeros_like(x) + v instead of x.{method}(v)" in msg and f"x.{method[:-1]}(" not in msg
        x = torch.zeros_like(x) + v
        assert {p.name for p in x.plates} >= {"z"}
        # expect's exact weights: E[one-hot z] = 1/3 each (copy_), 2 * sum(z) = 2 everywhere (fill_)
        expected = torch.full((3,), 1 / 3) if method == "copy_" else torch.full((3,), 2.0)
        assert torch.allclose(storch.estimate(x), expected)

def test_the_advice_then_works_across_steps():
    # the EMA update of the message, over two steps, against the enumerated expectation
    logits = torch.tensor([1.0, 0.0, -1.0])
    counts = torch.zeros(3)
    est = storch.estimator("expect", plate="z")
    for _ in range(2):
        with storch.Graph():
            z = est(OneHotCategorical(logits=logits))
            counts.mul_(0.5).add_(0.5 * storch.estimate(z))
    torch.testing.assert_close(counts, 0.75 * logits.softmax(-1), rtol=1e-12, atol=1e-12)


def test_in_place_write_into_a_plate_tensor_keeps_the_short_advice():
    with storch.Graph():
        d = storch.denote_independent(torch.zeros(2, 3), 0, "data")
        z = storch.estimator("expect", plate="z")(OneHotCategorical(logits=torch.zeros(3)))
        with pytest.raises(storch.PlateError, match="into a tensor with plates .'data',.; use the out-of-place") as info:
            d.add_(z)
    assert "storch.estimate" not in str(info.value)
