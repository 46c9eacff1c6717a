"""An LSTM encoder, a Gaussian latent (pathwise) and an autoregressive LSTMCell decoder (issue 10).

Written once for one image: ``nn.LSTM`` reads the image's 8 rows as an unbatched ``(8, 8)``
sequence and sets q(u | x) = Normal; u is drawn with ``reparameterization`` (pathwise); an
``nn.LSTMCell`` decoder then emits tokens, all drawn by ONE score estimator (one partition over
the steps, whose plate follows the u plate); the cost is -log p(x | h_T) + KL(q(u | x) || N(0, I)).
(a) layers on plate tensors equal a loop over plate entries; (b) three training steps;
(c) one step's gradient equals the hand-written batched model's with the same samples.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Normal, OneHotCategorical, kl_divergence

import storch
from model_checks import PLATES, assert_per_entry, assert_same_grads, assert_trains, grads, layout, lift
from storch_bench.handwritten import score_surrogate


class LSTMSequenceVAE(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 10, n_u: int = 3, n_tokens: int = 4, embed: int = 5,
                 steps: int = 3) -> None:
        super().__init__()
        self.steps, self.hidden = steps, hidden
        self.encoder = nn.LSTM(width, hidden)
        self.q = nn.Linear(hidden, 2 * n_u)
        self.init = nn.Linear(n_u, 2 * hidden)
        self.cell = nn.LSTMCell(embed, hidden)
        self.out = nn.Linear(hidden, n_tokens)
        self.embed = nn.Linear(n_tokens, embed, bias=False)
        self.readout = nn.Linear(hidden, width * width)

    # -- the model for ONE image (8, 8) -------------------------------------------------------

    def posterior(self, image):
        """mean and scale of q(u | x): the LSTM reads the rows as a sequence (unbatched (T, F))."""
        _, (h, _) = self.encoder(image)  # h: (1, hidden)
        mu, log_sigma = self.q(h.squeeze(0)).chunk(2, -1)
        return mu, log_sigma.exp()

    def initial_state(self, u):
        h, c = torch.tanh(self.init(u)).chunk(2, -1)
        return h, c

    def step(self, token, h, c):
        return self.cell(self.embed(token), (h, c))  # unbatched LSTMCell: (embed,), ((hidden,), (hidden,))

    def reconstruction(self, h, image):
        return F.binary_cross_entropy_with_logits(self.readout(h), image.flatten(), reduction="none").sum()


def storch_model(model, est_u, est_tok, images):
    x = storch.denote_independent(images, 0, "data")
    mu, sigma = model.posterior(x)
    q = Normal(mu, sigma)
    u = est_u(q)
    h, c = model.initial_state(u)
    tokens = []
    for _ in range(model.steps):
        tok = est_tok(OneHotCategorical(logits=model.out(h)))
        tokens.append(tok)
        h, c = model.step(tok, h, c)
    storch.add_cost(kl_divergence(q, Normal(torch.zeros_like(mu), torch.ones_like(sigma))).sum(), name="kl")
    storch.add_cost(model.reconstruction(h, x), name="reconstruction")
    return u, tokens


def hand_surrogate(model, images, u_samples, token_samples):
    """By hand, batched: u pathwise from storch's noise, tokens (seq, u, data) with leave-one-out."""
    b = images.shape[0]
    _, (h, _) = model.encoder(images.transpose(0, 1))  # batched LSTM: (T, B, F)
    mu, log_sigma = model.q(h.squeeze(0)).chunk(2, -1)
    sigma = log_sigma.exp()
    eps = ((u_samples - mu) / sigma).detach()  # storch's standard normal noise
    u = mu + sigma * eps  # (n_u, B, n_u_dim): the reparameterisation
    kl = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(-1)
    n_tok, n_u = token_samples[0].shape[:2]
    h, c = torch.tanh(model.init(u)).chunk(2, -1)  # (n_u, B, hidden)
    h = h.expand(n_tok, -1, -1, -1).reshape(-1, model.hidden)
    c = c.expand(n_tok, -1, -1, -1).reshape(-1, model.hidden)
    logp = 0.0
    for tok in token_samples:
        q = OneHotCategorical(logits=model.out(h).view(n_tok, n_u, b, -1))
        logp = logp + q.log_prob(tok)  # the partition's l: sum over the steps
        h, c = model.cell(model.embed(tok.reshape(n_tok * n_u * b, -1)), (h, c))
    target = images.flatten(1).expand(n_tok, n_u, -1, -1)
    rec = F.binary_cross_entropy_with_logits(model.readout(h).view(target.shape), target, reduction="none").sum(-1)
    # leave-one-out over the token sequences, then the mean over u samples and data points
    return kl.mean() + score_surrogate(logp.flatten(1), rec.flatten(1), leave_one_out=True)


def _images(b, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.rand(b, 8, 8, generator=g) < 0.4).to(dtype)


def test_layers_equal_a_loop_over_plate_entries():
    torch.manual_seed(0)
    model = LSTMSequenceVAE()
    assert_per_entry(model.posterior, lift(torch.randn(3, 2, 8, 8)))
    assert_per_entry(model.posterior, lift(_images(2), PLATES[1:]))
    assert_per_entry(model.initial_state, lift(torch.randn(3, 2, 3)))
    token = lift(F.one_hot(torch.randint(4, (3, 2)), 4).float())
    assert_per_entry(model.step, token, lift(torch.randn(3, 2, 10)), lift(torch.randn(2, 10), PLATES[1:]))
    assert_per_entry(model.reconstruction, lift(torch.randn(3, 2, 10)), lift(_images(2), PLATES[1:]))


def test_three_training_steps_pathwise_and_score_leave_one_out():
    torch.manual_seed(1)
    model = LSTMSequenceVAE()
    est_u = storch.estimator("reparameterization", plate="u", n_samples=2)
    est_tok = storch.estimator("score", plate="seq", n_samples=3, baseline="leave_one_out")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = _images(6)
    def build(graph):
        u, tokens = storch_model(model, est_u, est_tok, x)
        assert len(graph.nodes) == 2
        assert {p.name: p.size for p in tokens[-1].plates} == {"seq": 3, "u": 2, "data": 6}

    assert_trains(model, opt, build)


def test_gradient_equals_hand_written():
    torch.manual_seed(2)
    model = LSTMSequenceVAE().double()
    x = _images(4, torch.float64)
    params = list(model.parameters())
    est_u = storch.estimator("reparameterization", plate="u", n_samples=2)
    est_tok = storch.estimator("score", plate="seq", n_samples=3, baseline="leave_one_out")
    with storch.Graph():
        u, tokens = storch_model(model, est_u, est_tok, x)
        g_storch = grads(storch.surrogate_loss(), params)
    loss = hand_surrogate(model, x, layout(u, ("u", "data")).detach(),
                          [layout(t, ("seq", "u", "data")) for t in tokens])
    assert_same_grads(g_storch, grads(loss, params), [k for k, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)
