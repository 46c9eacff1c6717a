"""A TransformerEncoderLayer / MultiheadAttention feature selector with hard attention (issue 10).

Each data point is a set of F feature tokens ``(F, d)`` with a class label. A
``TransformerEncoderLayer`` scores the tokens; which tokens to keep is sampled
(``Bernoulli`` per token: hard attention); a ``MultiheadAttention`` pool with a learned query
reads the kept tokens and a linear head classifies. Cost: cross-entropy + 0.05 per kept token.
Written once for one data point (unbatched ``(F, d)`` inputs); inputs and labels share the data
plate. (a) layers equal a loop over plate entries (also in eval mode, where torch takes its
fused fast path); (b) training with score + leave-one-out and with Gumbel-softmax; (c) gradients
equal the hand-written batched model's with the same samples.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Bernoulli

import storch
from model_checks import PLATES, assert_per_entry, assert_same_grads, assert_trains, grads, layout, lift
from storch_bench.handwritten import score_surrogate

N_FEATURES, D, CLASSES, PRICE = 5, 8, 3, 0.05


class FeatureSelector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(D, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.score = nn.Linear(D, 1)
        self.query = nn.Parameter(torch.randn(1, D))
        self.pool = nn.MultiheadAttention(D, num_heads=2, batch_first=True)
        self.head = nn.Linear(D, CLASSES)

    # -- the model for ONE data point: features (F, d) -----------------------------------------

    def selection_logits(self, x):
        return self.score(self.encoder(x)).squeeze(-1)  # (F,)

    def predict(self, x, keep):
        v = x * keep.unsqueeze(-1)  # hard attention: dropped tokens are zero
        pooled, _ = self.pool(self.query, v, v)  # query (1, d) attends over the F tokens
        return self.head(pooled.squeeze(0))  # (classes,)

    def cost(self, x, keep, y):
        return F.cross_entropy(self.predict(x, keep), y) + PRICE * keep.sum()

    # -- the same model by hand, batched: x (B, F, d), keep (n, B, F), y (B,) -> (n, B) ----------

    def batched_cost(self, x, keep, y):
        n, b = keep.shape[:2]
        v = (x * keep.unsqueeze(-1)).reshape(n * b, N_FEATURES, D)
        pooled, _ = self.pool(self.query.expand(n * b, 1, D), v, v)
        ce = F.cross_entropy(self.head(pooled.squeeze(1)), y.repeat(n), reduction="none").view(n, b)
        return ce + PRICE * keep.sum(-1)


def _data(b, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, N_FEATURES, D, generator=g, dtype=dtype), torch.randint(CLASSES, (b,), generator=g)


def storch_model(model, est, features, labels):
    x, y = storch.denote_independent((features, labels), 0, "data")  # inputs and targets on one plate
    keep = est(Bernoulli(logits=model.selection_logits(x)))
    storch.add_cost(model.cost(x, keep, y), name="classification")
    return keep


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layers_equal_a_loop_over_plate_entries(mode):
    torch.manual_seed(0)
    model = FeatureSelector().train(mode == "train")
    x = lift(torch.randn(3, 2, N_FEATURES, D))
    assert_per_entry(model.selection_logits, x)
    assert_per_entry(model.encoder, x)
    keep = lift(torch.rand(3, 2, N_FEATURES).round())
    x_data = lift(torch.randn(2, N_FEATURES, D), PLATES[1:])
    assert_per_entry(model.predict, x_data, keep)
    assert_per_entry(lambda q, v: model.pool(q, v, v), lift(torch.randn(3, 2, 1, D)), x_data)
    assert_per_entry(model.cost, x_data, keep, lift(torch.tensor([2, 0]), PLATES[1:]))


@pytest.mark.parametrize("name, options", [("score", {"n_samples": 4, "baseline": "leave_one_out"}),
                                           ("gumbel_softmax", {"n_samples": 2, "temperature": 0.5})])
def test_three_training_steps(name, options):
    torch.manual_seed(1)
    model = FeatureSelector()
    est = storch.estimator(name, plate="keep", **options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    features, labels = _data(6)
    def build(graph):
        keep = storch_model(model, est, features, labels)
        assert {p.name: p.size for p in keep.plates} == {"keep": options["n_samples"], "data": 6}

    assert_trains(model, opt, build)


def test_score_leave_one_out_gradient_equals_hand_written():
    torch.manual_seed(2)
    model = FeatureSelector().double()
    features, labels = _data(5, torch.float64)
    params, n = list(model.parameters()), 4
    est = storch.estimator("score", plate="keep", n_samples=n, baseline="leave_one_out")
    with storch.Graph():
        keep = storch_model(model, est, features, labels)
        g_storch = grads(storch.surrogate_loss(), params)
    k = layout(keep, ("keep", "data"))
    logits = model.score(model.encoder(features)).squeeze(-1)  # (B, F)
    logp = Bernoulli(logits=logits).log_prob(k).sum(-1)
    loss = score_surrogate(logp, model.batched_cost(features, k, labels), leave_one_out=True)
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_gumbel_softmax_gradient_equals_hand_written():
    torch.manual_seed(3)
    model = FeatureSelector().double()
    features, labels = _data(5, torch.float64)
    params, n, tau = list(model.parameters()), 3, 0.5
    est = storch.estimator("gumbel_softmax", plate="keep", n_samples=n, temperature=tau)
    with storch.Graph():
        keep = storch_model(model, est, features, labels)
        g_storch = grads(storch.surrogate_loss(), params)
    y = layout(keep, ("keep", "data")).detach()
    logits = model.score(model.encoder(features)).squeeze(-1)
    relaxed = torch.sigmoid((logits - logits.detach()) / tau + torch.logit(y))  # storch's logistic noise
    torch.testing.assert_close(relaxed, y)
    loss = model.batched_cost(features, relaxed, labels).mean()
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)
