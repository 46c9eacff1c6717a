"""storch.estimate(x, keep_data=...) and storch.cost_estimates(keep_data=...): per-data-point estimates.

Found by porting a Bayesian MLP (its posterior predictive p(y | x_i) per test point): ``estimate`` averages every
data plate. With ``keep_data`` the sampling plates are reduced by the same weights and the kept data plates stay:
leading dims in the order of the ``denote_independent`` calls (``True``) or in the order named. What each layout
gives is defined here with ``expect`` (exact: the per-data-point estimate is the enumerated expectation);
the score package's estimators are z-tested in tests/score/test_per_data_point_estimates.py.
"""

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch

pytestmark = pytest.mark.usefixtures("float64_default")

A = torch.tensor([[0.3, -1.0, 2.0, 0.1, -0.4], [1.2, 0.0, -0.7, 0.5, 0.9],
                  [-2.0, 0.4, 0.6, -0.1, 1.5], [0.8, -0.3, 0.2, 1.1, -1.4]], dtype=torch.float64)  # 4 documents x 5 words
V = torch.tensor([1.0, -2.0], dtype=torch.float64)


def _nested():
    docs = storch.denote_independent(A, 0, "docs")
    words = storch.denote_independent(docs, 0, "words")  # words nested in docs: plates ("words", "docs")
    z = storch.estimator("expect", plate="z")(Bernoulli(logits=words))
    return z, z * V + z ** 2  # per sample (2,)


def test_nested_data_plates_in_the_order_of_the_calls():
    with storch.Graph():
        z, x = _nested()
        # the tensor's own order is not the calls' order
        assert [n for n in x.plate_names if n != "z"] == ["words", "docs"]
        kept = storch.estimate(x, keep_data=True)
        exact = torch.sigmoid(A)[..., None] * (V + 1)  # (docs, words, 2)
        assert kept.shape == (4, 5, 2) and not kept.requires_grad
        torch.testing.assert_close(kept, exact, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(storch.estimate(x, keep_data=("docs", "words")), kept, rtol=0, atol=0)
        torch.testing.assert_close(storch.estimate(x, keep_data=["words", "docs"]), kept.transpose(0, 1),
                                   rtol=0, atol=0)
        torch.testing.assert_close(storch.estimate(x, keep_data="docs"), exact.mean(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(storch.estimate(x, keep_data="words"), exact.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kept.mean((0, 1)), storch.estimate(x), rtol=1e-12, atol=1e-12)


def test_a_data_plate_only_some_nodes_are_under_and_a_node_under_none():
    # g is global (no data plate); z is per data point and depends on g
    a = A[0]
    with storch.Graph():
        d = storch.denote_independent(a, 0, "data")
        g = storch.estimator("expect", plate="g")(Bernoulli(logits=torch.tensor(0.4)))
        z = storch.estimator("expect", plate="z")(Bernoulli(logits=d - 2.0 * g))
        pg = torch.sigmoid(torch.tensor(0.4))
        exact_z = (1 - pg) * torch.sigmoid(a) + pg * (torch.sigmoid(a - 2.0) + 1.0)
        torch.testing.assert_close(storch.estimate(z + g, keep_data=True), exact_z, rtol=1e-12, atol=1e-12)
        # a tensor under no data plate: True keeps none (the full estimate); naming the plate gives a dim along
        # which the estimate is constant (g does not depend on the data point)
        assert storch.estimate(3 * g, keep_data=True).shape == ()
        torch.testing.assert_close(storch.estimate(3 * g, keep_data=True), 3 * pg, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(storch.estimate(3 * g, keep_data="data"), (3 * pg).expand(5), rtol=1e-12,
                                   atol=1e-12)


def test_a_plain_tensor_and_a_data_plate_alone():
    t = torch.randn(3, generator=torch.Generator().manual_seed(0))
    with storch.Graph():
        d = storch.denote_independent(A, 1, "data")  # per data point: A's column, shape (4,)
        torch.testing.assert_close(storch.estimate(d ** 2, keep_data=True), (A ** 2).T, rtol=0, atol=0)
        assert torch.equal(storch.estimate(t, keep_data=True), t)
        assert torch.equal(storch.estimate(t, keep_data="data"), t.expand(5, 3))


def test_reparameterization_per_data_point_is_unbiased():
    torch.manual_seed(3)
    loc = torch.tensor([0.5, -1.0, 2.0])
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=4000)(
            Normal(storch.denote_independent(loc, 0, "data"), 1.0))
        kept = storch.estimate(z, keep_data=True)
        torch.testing.assert_close(kept, z.tensor.mean(z.plate_names.index("z")), rtol=0, atol=1e-15)
    zscore = (kept - loc) / (1.0 / 4000 ** 0.5)
    assert zscore.abs().max() < 4, zscore


def test_cost_estimates_per_data_point():
    with storch.Graph():
        z, x = _nested()
        storch.add_cost(x.sum(), name="words")          # on (docs, words)
        per_doc = storch.denote_independent(A.sum(1), 0, "docs2")  # another plate: not the cost's
        storch.add_cost(per_doc, name="other", credit=False)
        kept = storch.cost_estimates(keep_data=True)
        exact = (torch.sigmoid(A)[..., None] * (V + 1)).sum(-1)
        torch.testing.assert_close(kept["words"], exact, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kept["other"], A.sum(1), rtol=0, atol=0)
        full = storch.cost_estimates()
        for name in full:
            torch.testing.assert_close(kept[name].mean(), full[name], rtol=1e-12, atol=1e-12)


def test_costs_of_one_name_on_different_data_plates():
    with storch.Graph():
        z, x = _nested()
        storch.add_cost(x.sum(), name="c")                      # (docs, words)
        storch.add_cost(z.sum() * 0 + storch.denote_independent(torch.arange(3.0), 0, "n"), name="c")  # (n, docs, words)
        with pytest.raises(storch.PlateError, match=r"the costs named 'c' carry different data plates"):
            storch.cost_estimates(keep_data=True)
        both = storch.cost_estimates(keep_data=("docs", "words", "n"))  # constant along a plate a cost lacks
        assert both["c"].shape == (4, 5, 3)
        torch.testing.assert_close(both["c"].mean(), storch.cost_estimates()["c"], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad, message", [
    (1, r"keep_data takes True .* got 1"),
    ("yes", r"'yes' is not a plate of the graph. The graph's data plates .* are \('docs', 'words'\)"),
    ("z", r"'z' is the sample plate of a stochastic node"),
    (("docs", "docs"), r"names a plate twice"),
    (("docs", 2), r"got \('docs', 2\)"),
])
def test_bad_keep_data_is_refused(bad, message):
    with storch.Graph():
        _, x = _nested()
        storch.add_cost(x.sum(), name="c")
        with pytest.raises(storch.PlateError, match=message):
            storch.estimate(x, keep_data=bad)
        with pytest.raises(storch.PlateError, match=message.replace("keep_data takes", "storch.cost_estimates: "
                                                                                      "keep_data takes")):
            storch.cost_estimates(keep_data=bad)
