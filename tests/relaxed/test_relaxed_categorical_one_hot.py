"""A Categorical node under the estimators that hand out one-hot vectors for it (gumbel_softmax,
gumbel_straight_through, rebar, relax with REBAR's term): refused by default, taken with categorical="one_hot".

Found by porting (p-dists): switching ``score`` to ``gumbel_straight_through`` by one string turned a cost written
for Categorical's index, ((x.float() - 1.3) ** 2).sum() over 4 categoricals with K = 3, from E = 3.255 into an
estimate of 13.88 (gumbel_softmax: 12.09), silently: the node handed out one-hot vectors and the arithmetic and
the reduction went through on them.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, OneHotCategorical

import storch

ONE_HOT = ["gumbel_softmax", "gumbel_straight_through", "straight_through", "rebar", "relax"]
LOGITS = torch.tensor([[0.2, -0.3, 0.5]] * 4, dtype=torch.float64)  # 4 categoricals, K = 3
VALUES = torch.arange(3, dtype=torch.float64)  # category k has value k


def _exact() -> float:
    return float((torch.softmax(LOGITS, -1) * (VALUES - 1.3) ** 2).sum())


@pytest.fixture(autouse=True)
def _clean_graph():
    yield
    storch.reset()


@pytest.mark.parametrize("wrap", [False, True])
@pytest.mark.parametrize("name", ONE_HOT)
def test_a_categorical_is_refused_by_default_with_what_to_do(name, wrap):
    d = Categorical(logits=LOGITS.clone().requires_grad_(True))
    with storch.Graph():
        with pytest.raises(storch.UnsupportedDistributionError) as info:
            storch.estimator(name, plate="x", n_samples=2)(Independent(d, 1) if wrap else d)
    msg = str(info.value)
    print(msg)
    given = "an Independent of a Categorical" if wrap else "a Categorical"
    assert f"estimator '{name}' does not support {given} by default (plate 'x')" in msg
    assert "one-hot vector of shape (..., K)" in msg and "not the category index" in msg
    assert "would compute another cost, silently" in msg
    assert "OneHotCategorical(logits=...)" in msg and "x @ emb instead of emb[x]" in msg
    assert f"pass categorical='one_hot' to '{name}'" in msg
    assert "score" in msg and "unordered_set" in msg and "relax with control_variate='network'" in msg


@pytest.mark.parametrize("name", ONE_HOT)
def test_the_capability_check_says_so(name):
    """supports() (the registry's list, storch-compare's roster) agrees with the refusal: the class and a default
    instance do not take a Categorical, an instance with the option does, and the other estimators' refusals
    no longer send a Categorical to these."""
    cls = storch.get_estimator_class(name)
    cat, onehot = Categorical(logits=LOGITS), OneHotCategorical(logits=LOGITS)
    est = storch.estimator(name, plate="x")
    assert not cls.supports(cat) and not est.supports(cat)
    assert cls.supports(onehot) and est.supports(onehot) and est.supports(Bernoulli(logits=LOGITS))
    assert storch.estimator(name, plate="x", categorical="one_hot").supports(cat)
    est.categorical = "one_hot"  # set later: checked as at construction, and followed by supports()
    assert est.supports(cat) and est.categorical == "one_hot"
    with pytest.raises(storch.UnsupportedDistributionError) as info:
        storch.estimator("arm", plate="a")(Categorical(logits=torch.zeros(5)))
    supporting = str(info.value).split("support it:")[1]
    assert name not in supporting and "go" in supporting  # (score, when installed beside: not in this package's env)


@pytest.mark.parametrize("name", ONE_HOT)
def test_bad_option_values(name):
    with pytest.raises(storch.OptionError, match=r"categorical='index' is not accepted; use 'refuse'.*'one_hot'"):
        storch.estimator(name, plate="x", categorical="index")
    est = storch.estimator(name, plate="x")
    with pytest.raises(storch.OptionError, match="categorical=True is not accepted"):
        est.categorical = True
    assert est.categorical == "refuse"


def test_relax_network_keeps_the_index_and_takes_a_categorical():
    est = storch.estimator("relax", plate="x", control_variate="network")
    assert est.supports(Categorical(logits=LOGITS))
    with storch.Graph():
        x = est(Categorical(logits=LOGITS.clone().requires_grad_(True)))
        assert x.tensor.dtype == torch.long and x.shape == (4,)  # the index, as for score
    with pytest.raises(storch.OptionError, match="categorical='one_hot' does not apply with control_variate='network'"):
        storch.estimator("relax", plate="x", control_variate="network", categorical="one_hot")


def _draw(name, dist, opts, seed=3):
    """The node's values (every block) and ∂(a one-hot cost)/∂logits under a fixed seed."""
    torch.manual_seed(seed)
    theta = LOGITS.clone().requires_grad_(True)
    with storch.Graph():
        x = storch.estimator(name, plate="x", n_samples=3, update=False, **opts)(dist(logits=theta)) \
            if name in ("rebar", "relax") else storch.estimator(name, plate="x", n_samples=3, **opts)(dist(logits=theta))
        storch.add_cost((((x * VALUES).sum(-1) - 1.3) ** 2).sum(), name="c")
        grad, = torch.autograd.grad(storch.surrogate_loss(), theta)
    return x.tensor.detach(), grad


@pytest.mark.filterwarnings("ignore:.*its default control-variate network .input width. the sample's. was built now")
@pytest.mark.parametrize("name", ONE_HOT)
def test_the_opt_in_hands_out_what_a_one_hot_categorical_does(name):
    """categorical="one_hot" gives a Categorical node the behaviour it had before the refusal: the one-hot values
    (and relaxed blocks) and the gradient of OneHotCategorical with the same parameters, draw for draw."""
    got, got_grad = _draw(name, Categorical, {"categorical": "one_hot"})
    want, want_grad = _draw(name, OneHotCategorical, {})
    assert got.shape == want.shape and got.shape[-1] == 3
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)


@pytest.mark.parametrize("dist,opts", [(OneHotCategorical, {}), (Categorical, {"categorical": "one_hot"})])
@pytest.mark.parametrize("name", ["gumbel_straight_through", "rebar"])
def test_the_one_hot_value_is_an_exact_sample(name, dist, opts):
    """The forward value (the weighted block) is an exact sample: the cost estimate of a cost written for
    one-hot vectors matches E = 3.255 (z-test over 4000 samples, 4 standard errors)."""
    torch.manual_seed(7)
    n = 4000
    extra = {"update": False} if name == "rebar" else {}
    with storch.Graph():
        x = storch.estimator(name, plate="x", n_samples=n, **opts, **extra)(dist(logits=LOGITS.clone()))
        c = (((x * VALUES).sum(-1) - 1.3) ** 2).sum()
        per = c.tensor.detach()[:n]  # rebar: the b block (weight 1/n), then the relaxed blocks (weight 0)
    z = (float(per.mean()) - _exact()) / (float(per.std()) / n ** 0.5)
    print(f"{name} {dist.__name__}: mean {float(per.mean()):.4f}, exact {_exact():.4f}, z = {z:.2f}")
    assert abs(z) < 4
