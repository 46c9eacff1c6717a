"""An Embedding + BatchNorm1d (eval) + sort classifier; inputs and targets on one data plate (issue 10).

For one data point, a sequence of L token ids: ``nn.Embedding`` -> ``(L, d)``, ``BatchNorm1d``
in eval mode over the L tokens (its batch) and d channels (here L == d, the case where a
dispatcher that guesses the channel dim goes wrong), a score per token, the top-3 scores by
``torch.sort`` (no ``dim``: the last), a linear head. The predicted class is SAMPLED and the cost
is the 0-1 loss against the label, so only the estimator carries gradient to the classifier.
``x, y = storch.denote_independent((x, y), 0, "data")`` puts inputs and labels on one plate.
(a) the layers equal a loop over plate entries; (b) training with score + leave-one-out and
Gumbel-softmax; (c) gradients equal the hand-written batched model's with the same samples.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import OneHotCategorical

import storch
from model_checks import PLATES, assert_per_entry, assert_same_grads, assert_trains, grads, layout, lift
from storch_bench.handwritten import score_surrogate

VOCAB, LENGTH, D, CLASSES, TOP = 12, 6, 6, 3, 3


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D)
        self.norm = nn.BatchNorm1d(D)
        self.token_score = nn.Linear(D, 1)
        self.head = nn.Linear(TOP + D, CLASSES)
        with torch.no_grad():  # non-trivial running statistics, then eval mode for good
            self.norm.running_mean.normal_()
            self.norm.running_var.uniform_(0.5, 2.0)
        self.eval()

    def logits(self, tokens):
        """One data point: tokens (L,) -> class logits (classes,)."""
        h = self.norm(self.embed(tokens))  # (L, d): BatchNorm1d, batch L, channels d
        s = self.token_score(h).squeeze(-1)  # (L,)
        top = torch.sort(s, descending=True).values[:TOP]
        return self.head(torch.cat([top, h.mean(0)]))

    def batched_logits(self, tokens):
        """By hand: tokens (B, L) -> (B, classes)."""
        b = tokens.shape[0]
        h = self.norm(self.embed(tokens).view(b * LENGTH, D)).view(b, LENGTH, D)
        s = self.token_score(h).squeeze(-1)
        top = torch.sort(s, dim=-1, descending=True).values[:, :TOP]
        return self.head(torch.cat([top, h.mean(1)], -1))


def error(prediction, label):
    """0-1 loss of a one-hot (or relaxed) prediction against a class index."""
    return 1.0 - (prediction * F.one_hot(label, CLASSES)).sum(-1)


def _data(b):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(VOCAB, (b, LENGTH), generator=g)
    return x, (x[:, 0] % CLASSES)  # a learnable rule


def storch_model(model, est, tokens, labels):
    x, y = storch.denote_independent((tokens, labels), 0, "data")
    prediction = est(OneHotCategorical(logits=model.logits(x)))
    storch.add_cost(error(prediction, y), name="error")
    return prediction


def test_layers_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    model = TokenClassifier()
    tokens = lift(torch.randint(VOCAB, (3, 2, LENGTH)))
    assert_per_entry(model.logits, tokens)
    assert_per_entry(model.embed, tokens)
    assert_per_entry(model.norm, lift(torch.randn(3, 2, LENGTH, D)))
    assert_per_entry(model.norm, lift(torch.randn(3, 2, 4, D)))
    assert_per_entry(lambda s: torch.sort(s), lift(torch.randn(3, 2, LENGTH)))
    assert_per_entry(lambda s: torch.argsort(s, descending=True), lift(torch.randn(3, 2, 4, LENGTH)))
    assert_per_entry(error, lift(torch.softmax(torch.randn(3, 2, CLASSES), -1)), lift(torch.tensor([1, 2]), PLATES[1:]))


def test_batchnorm_in_training_mode_is_refused_on_plates():
    # its batch statistics would mix plate entries: no per-sample meaning, so a PlateError
    model = TokenClassifier().train()
    mean, var = model.norm.running_mean.clone(), model.norm.running_var.clone()
    with pytest.raises(storch.PlateError, match="eval"):
        model.logits(lift(torch.randint(VOCAB, (3, 2, LENGTH))))
    # the running statistics are untouched (torch's module bumps num_batches_tracked before the call)
    assert torch.equal(model.norm.running_mean, mean) and torch.equal(model.norm.running_var, var)


def test_inputs_and_targets_share_one_data_plate():
    tokens, labels = _data(5)
    with storch.Graph():
        x, y = storch.denote_independent((tokens, labels), 0, "data")
        assert x.plates == y.plates and x.shape == (LENGTH,) and y.shape == ()
        assert torch.equal(y.tensor, labels) and torch.equal(x.tensor, tokens)
    with storch.Graph(), pytest.raises(storch.PlateError) as info:
        storch.denote_independent((tokens, labels[:4]), 0, "data")
    assert "5" in str(info.value) and "4" in str(info.value)  # the message names both sizes


@pytest.mark.parametrize("name, options", [("score", {"n_samples": 4, "baseline": "leave_one_out"}),
                                           ("gumbel_softmax", {"n_samples": 2, "temperature": 0.5})])
def test_three_training_steps(name, options):
    torch.manual_seed(1)
    model = TokenClassifier()
    est = storch.estimator(name, plate="prediction", **options)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tokens, labels = _data(10)
    assert_trains(model, opt, lambda graph: storch_model(model, est, tokens, labels))
    assert not model.training and model.norm.num_batches_tracked == 0  # eval mode: statistics untouched


def test_score_leave_one_out_gradient_equals_hand_written():
    torch.manual_seed(2)
    model = TokenClassifier().double()
    tokens, labels = _data(6)
    params, n = list(model.parameters()), 4
    est = storch.estimator("score", plate="prediction", n_samples=n, baseline="leave_one_out")
    with storch.Graph():
        prediction = storch_model(model, est, tokens, labels)
        g_storch = grads(storch.surrogate_loss(), params)
    p = layout(prediction, ("prediction", "data"))
    logp = OneHotCategorical(logits=model.batched_logits(tokens)).log_prob(p)
    loss = score_surrogate(logp, error(p, labels), leave_one_out=True)
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_gumbel_softmax_gradient_equals_hand_written():
    torch.manual_seed(3)
    model = TokenClassifier().double()
    tokens, labels = _data(6)
    params, n, tau = list(model.parameters()), 3, 0.5
    est = storch.estimator("gumbel_softmax", plate="prediction", n_samples=n, temperature=tau)
    with storch.Graph():
        prediction = storch_model(model, est, tokens, labels)
        g_storch = grads(storch.surrogate_loss(), params)
    y = layout(prediction, ("prediction", "data")).detach()
    logits = model.batched_logits(tokens)
    relaxed = torch.softmax((logits - logits.detach()) / tau + torch.log(y), -1)  # storch's Gumbel noise
    torch.testing.assert_close(relaxed, y)
    loss = error(relaxed, labels).mean()
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)
