"""LDA with explicit topic assignments, written as a user coming from Pyro would (docs/coming-from-pyro.md).

Documents x words are two nested data plates (``denote_independent`` for the documents, then for the words
of a document); ragged documents are padded to one length ``L`` with a mask, and a padded word's cost is
``torch.where(mask, cost, 0)``. A document's topic proportions θ_d ~ q(θ_d | words) = Dirichlet(encoder(bag of
words)), drawn with ``reparameterization``; each word's topic z_dn ~ Categorical(θ_d), put on the words plate
(θ alone has no words plate: a Categorical of it would draw one topic per document); the topic-word
distributions β = softmax(logits) are parameters. Cost: N · KL(q(θ_d) || Dir(α)) per document and
N · L · (-log β_{z_dn, w_dn}) per word position (each data plate is averaged: the sum over the N documents
and the L positions of a document, plates.md's "Minibatches ... nested data plates").

The expected cost has a closed form, E_q[θ_dk] = c_dk / Σ_j c_dj, so the exact gradient w.r.t. the topic-word
logits and the encoder is autograd of it, computed from the ragged documents (no padding, no mask). Each
estimator of z is z-tested against it over many seeded estimates, and against ``expect`` with the same θ noise
(the difference is then the z estimator's error alone). K = 2 for ``expect`` and ``score``; ``unordered_set``
with 2 samples and ``sum_and_sample`` with a memory of 1 and 2 samples are exact at K = 2, so they run at K = 3.
Order 2 (Hessian-vector products) for the estimators that declare it: θ is then drawn by ``score``, since torch's
Dirichlet rsample has no second derivative (storch refuses order 2 through it). ``gumbel_softmax`` says it is
biased, and the same z-test sees it (|z| > 6). Padded words: any token value gives the same gradient, and more
padding leaves the estimate unbiased.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Dirichlet, OneHotCategorical, kl_divergence

import storch
from model_checks import layout

V, N_DOCS, DOCS = 3, 5, ([0, 2, 1], [1, 1])   # the tiny instance: 2 documents of 3 and 2 words, a corpus of 5
ALPHA = 0.8                                     # the Dirichlet prior's concentration
REPEATS = 400

# (estimator, options, K): each z estimator with a setting in which it samples (is not exact)
VARIANTS = [
    ("expect", {}, 2),
    ("score", dict(n_samples=4, baseline="leave_one_out"), 2),
    ("unordered_set", dict(n_samples=2), 3),
    ("sum_and_sample", dict(n_enumerate=1, n_samples=2), 3),
]


def lda_step(tokens, mask, encoder, beta_logits, est_z, n_docs, alpha, est_theta=None):
    """One ELBO step on a minibatch of documents: ``tokens`` (B, L) token ids, ``mask`` (B, L) True on words."""
    L, V_ = tokens.shape[1], beta_logits.shape[1]
    toks, m = storch.denote_independent((tokens, mask), 0, "docs")           # per document: (L,)
    bow = (F.one_hot(toks, V_) * m.unsqueeze(-1)).to(beta_logits.dtype).sum(0)
    q_theta = Dirichlet(F.softplus(encoder(bow)) + 0.5)
    est_theta = est_theta or storch.estimator("reparameterization", plate="theta")
    theta = est_theta(q_theta)                                               # (K,)
    storch.add_cost(n_docs * kl_divergence(q_theta, Dirichlet(alpha)), name="kl")
    w, mw = storch.denote_independent((toks, m), 0, "words")                # per word: ()
    z = est_z(OneHotCategorical(probs=theta + 0 * mw.unsqueeze(-1)))        # θ put on the words plate
    nll = -(z * torch.log_softmax(beta_logits, -1)[:, w]).sum(-1)
    storch.add_cost(n_docs * L * torch.where(mw, nll, 0.0), name="nll")
    return z


def _model(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    encoder = torch.nn.Linear(V, k).double()
    with torch.no_grad():
        encoder.weight.copy_(torch.randn(k, V, generator=g, dtype=torch.float64))
        encoder.bias.copy_(torch.randn(k, generator=g, dtype=torch.float64))
    beta = torch.randn(k, V, generator=g, dtype=torch.float64).requires_grad_()
    return encoder, beta, [beta, encoder.weight, encoder.bias]


def _padded(length, pad):
    tokens = torch.full((len(DOCS), length), pad)
    for d, doc in enumerate(DOCS):
        tokens[d, :len(doc)] = torch.tensor(doc)
    return tokens, torch.arange(length) < torch.tensor([len(doc) for doc in DOCS]).unsqueeze(-1)


def exact_loss(encoder, beta):
    """The expected cost from the ragged documents: mean over documents of N (KL_d + Σ_n E[-log β_{z, w_dn}])."""
    k = beta.shape[0]
    logbeta, terms = torch.log_softmax(beta, -1), []
    for doc in DOCS:
        conc = F.softplus(encoder(F.one_hot(torch.tensor(doc), V).sum(0).double())) + 0.5
        kl = kl_divergence(Dirichlet(conc), Dirichlet(torch.full((k,), ALPHA, dtype=torch.float64)))
        terms.append(N_DOCS * (kl - (conc / conc.sum() * logbeta[:, doc].T).sum()))
    return torch.stack(terms).mean()


def _flat(gs):
    return torch.cat([g.flatten() for g in gs])


def estimate(name, opts, k, seed, length=3, pad=0, order=1, direction=None, minibatch=None):
    """One estimate of the gradient (order 1) or of the Hessian-vector product along ``direction`` (order 2);
    ``minibatch``: a minibatch of that many documents drawn uniformly (scaled by the same N)."""
    encoder, beta, params = _model(k)
    tokens, mask = _padded(length, pad)
    torch.manual_seed(seed)
    if minibatch is not None:
        rows = torch.randperm(len(DOCS))[:minibatch]
        tokens, mask = tokens[rows], mask[rows]
    with storch.Graph():
        # order 2: torch's Dirichlet rsample has no second derivative (storch refuses it): θ by score
        est_theta = storch.estimator("score", plate="theta", n_samples=4, baseline="leave_one_out") if order > 1 else None
        lda_step(tokens, mask, encoder, beta, storch.estimator(name, plate="z", **opts), N_DOCS,
                 torch.full((k,), ALPHA, dtype=torch.float64), est_theta)
        return _derivative(storch.surrogate_loss(order=order), params, order, direction)


def _derivative(loss, params, order, direction):
    g = torch.autograd.grad(loss, params, create_graph=order > 1)
    if order == 1:
        return _flat(g).detach()
    return _flat(torch.autograd.grad((_flat(g) * direction).sum(), params)).detach()


def exact(k, order=1, direction=None):
    encoder, beta, params = _model(k)
    return _derivative(exact_loss(encoder, beta), params, order, direction)


def z_scores(samples, reference):
    """(mean - reference) / standard error per entry; an entry with no spread must equal the reference."""
    mean, se = samples.mean(0), samples.std(0) / samples.shape[0] ** 0.5
    flat = se < 1e-12
    assert torch.allclose(mean[flat], reference[flat], atol=1e-9), "a constant entry differs from the exact value"
    return ((mean - reference) / se)[~flat]


@pytest.mark.parametrize("name,opts,k", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_gradient_of_the_expected_elbo_matches_the_exact_value(name, opts, k):
    est = torch.stack([estimate(name, opts, k, seed) for seed in range(REPEATS)])
    z = z_scores(est, exact(k))
    assert z.numel() == 2 * k * V + k, "every gradient entry of β, the encoder's weight and bias varies"
    assert float(z.abs().max()) < 4, z
    if name != "expect":  # the same θ noise: the difference is the z estimator's own error
        reference = torch.stack([estimate("expect", {}, k, seed) for seed in range(REPEATS)])
        diff = est - reference
        assert float(diff.std(0).max()) > 1e-6, "the estimator sampled nothing: the test would be vacuous"
        assert float(z_scores(diff, torch.zeros_like(diff[0])).abs().max()) < 4


@pytest.mark.parametrize("name,opts,k", [v for v in VARIANTS if v[0] != "unordered_set"],
                         ids=[v[0] for v in VARIANTS if v[0] != "unordered_set"])
def test_hessian_vector_product_matches_the_exact_value(name, opts, k):
    """Order 2 for the estimators that declare it (unordered_set's baseline is order 1 only)."""
    assert storch.get_estimator_class(name).max_order >= 2
    direction = torch.randn(2 * k * V + k, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    est = torch.stack([estimate(name, opts, k, seed, order=2, direction=direction) for seed in range(REPEATS)])
    assert float(z_scores(est, exact(k, 2, direction)).abs().max()) < 4


def test_order_two_is_refused_through_the_dirichlet_rsample_and_unordered_sets_baseline():
    with pytest.raises(storch.OrderError, match="Dirichlet"):
        encoder, beta, _ = _model(2)
        with storch.Graph():
            lda_step(*_padded(3, 0), encoder, beta, storch.estimator("expect", plate="z"), N_DOCS,
                     torch.full((2,), ALPHA, dtype=torch.float64))
            storch.surrogate_loss(order=2)
    with pytest.raises(storch.OrderError, match="unordered_set"):
        estimate("unordered_set", dict(n_samples=2), 3, 0, order=2, direction=torch.zeros(2 * 3 * V + 3))


def test_gumbel_softmax_says_it_is_biased_and_is():
    """The relaxation estimates the relaxed objective: its info says biased, and the z-test has the power to see it."""
    assert storch.estimator("gumbel_softmax", plate="z").info().biased
    est = torch.stack([estimate("gumbel_softmax", dict(n_samples=4), 2, seed) for seed in range(REPEATS)])
    assert float(z_scores(est, exact(2)).abs().max()) > 6


@pytest.mark.parametrize("name,opts,k", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_a_padded_word_does_not_contribute_whatever_its_token(name, opts, k):
    """Same seed, padding of 1 or 3 positions with each token value: the same gradient (the padding changes no
    draw of a real word: z is drawn per position from θ, which does not read the padded tokens)."""
    for length in (3, 5):
        grads = [estimate(name, opts, k, seed=7, length=length, pad=pad) for pad in range(V)]
        for g in grads[1:]:
            torch.testing.assert_close(g, grads[0], rtol=0, atol=1e-12)


def test_more_padding_does_not_bias_the_estimate():
    """Padded to 6 positions (4 padded for the short document): the mask and the L scaling stay unbiased."""
    est = torch.stack([estimate("score", dict(n_samples=4, baseline="leave_one_out"), 2, seed, length=6, pad=2)
                       for seed in range(REPEATS)])
    assert float(z_scores(est, exact(2)).abs().max()) < 4


def test_a_categorical_of_theta_alone_draws_one_topic_per_document():
    """A plate is no context (Pyro's ``with words: sample(Categorical(theta))`` broadcasts): a node has the plates
    of its distribution's parameters. Without the words plate on θ, one topic per document is shared by its words;
    with ``theta + 0 * w``, the words draw independently (P(two words agree) = Σ_k θ_k², not 1)."""
    theta = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    with storch.Graph():
        th, w = storch.denote_independent((theta, torch.zeros(2, 4, dtype=torch.long)), 0, "docs")
        w = storch.denote_independent(w, 0, "words")
        shared = storch.estimator("score", plate="shared", n_samples=2000)(OneHotCategorical(probs=th))
        own = storch.estimator("score", plate="own", n_samples=2000)(OneHotCategorical(probs=th + 0 * w.unsqueeze(-1)))
    assert "words" not in [p.name for p in shared.plates]
    draws = layout(own, ["own", "docs", "words"]).argmax(-1)  # (2000, docs, words)
    agree = (draws[:, :, 0] == draws[:, :, 1]).double().mean(0)
    expected = (theta ** 2).sum(-1).double()
    se = (expected * (1 - expected) / 2000) ** 0.5
    assert bool(((agree - expected).abs() < 4 * se).all()), (agree, expected)


def test_a_minibatch_of_one_document_scaled_by_n_is_unbiased():
    """plates.md's minibatch rule on the nested plates: one document of the two per step, each cost scaled by N as
    for the whole batch: the expected gradient is the full objective's. (With B = 1, Pyro's N / B is the same factor:
    tests/core/test_minibatch_scaling.py tells the two apart.)"""
    est = torch.stack([estimate("score", dict(n_samples=4, baseline="leave_one_out"), 2, seed, minibatch=1)
                       for seed in range(REPEATS)])
    assert float(z_scores(est, exact(2)).abs().max()) < 4
