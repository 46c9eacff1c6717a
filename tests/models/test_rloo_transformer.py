"""RLOO fine-tuning of a tiny transformer language model: score + leave-one-out over an eos partition.

The model is written once for ONE prompt and ONE completion: a 2-layer decoder-only transformer,
a left-padded prompt with its attention mask on a data plate, a KV cache grown with ``torch.cat``
at every step (the cache of earlier steps meets the current step's keys), temperature and top-k
truncation of the logits, ``eos=`` ending completions, a frozen reference model under
``torch.no_grad()``, and the sequence-level reward r - beta * KL (per token, detached, masked
after eos in user code). It checks (a) the gradient against a hand-written batched RLOO objective
on the same draws, computed without a cache (the whole sequence in one causal forward pass), also
under bfloat16 autocast; (b) a z-test against exact enumeration of E[r - beta * KL(pi || ref)] for
the tempered top-k policy: the gradient is the truncated policy's, the distribution handed to the
estimator.
"""

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
from torch.distributions import Categorical

import storch
from model_checks import assert_same_grads, grads
from storch.testing import assert_unbiased, per_replicate_derivatives, replicate

EOS, TARGET, BETA = 0, 2, 0.5


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


class TinyLM(nn.Module):
    """Tokens ``(..., m)`` at positions ``pos``; ``kmask`` ``(..., n_past + m)`` marks valid keys."""

    def __init__(self, vocab, d=32, layers=2, maxlen=16):
        super().__init__()
        self.d = d
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(maxlen, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tok, pos, kmask, cache=None):
        h = self.emb(tok) + self.pos(pos)
        m, n = tok.shape[-1], kmask.shape[-1]
        j, i = torch.arange(n), torch.arange(m)[:, None] + (n - m)
        allowed = ((j <= i) & kmask.unsqueeze(-2)) | (j == i)  # causal, valid keys, and itself (a pad)
        new = []
        for b, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(blk.ln1(h)).chunk(3, -1)
            if cache is not None:
                k, v = torch.cat([cache[b][0], k], -2), torch.cat([cache[b][1], v], -2)
            new.append((k, v))
            s = q @ k.transpose(-1, -2) / math.sqrt(self.d)
            s = torch.where(allowed, s, torch.full_like(s, -math.inf))
            h = h + blk.proj(torch.softmax(s, -1) @ v)
            h = h + blk.mlp(blk.ln2(h))
        return self.head(self.lnf(h)), new


def policy(logits, temperature, top_k):
    logits = logits / temperature
    if top_k is None:
        return logits
    kth = torch.topk(logits, top_k, -1).values[..., -1:]
    return torch.where(logits >= kth, logits, torch.full_like(logits, -math.inf))


def storch_rloo(model, ref, est, prompts, pmask, steps, temperature=1.0, top_k=None, bias=0.0):
    """One-sample code: prompt (Lp,), mask (Lp,); the cost is -(r - beta * KL)."""
    x, mask = storch.denote_independent((prompts, pmask), 0, "data")
    pos = (torch.cumsum(mask.long(), -1) - 1).clamp(min=0)
    logits, cache = model(x, pos, mask)
    with torch.no_grad():
        rlogits, rcache = ref(x, pos, mask)
    last, rlast, nxt, live = logits[-1], rlogits[-1], pos[-1:] + 1, torch.ones((), dtype=torch.bool)
    tokens, r, kl = [], 0.0, 0.0
    for t in range(steps):
        logp = torch.log_softmax(policy(last + bias, temperature, top_k), -1)
        tok = est(Categorical(logits=logp))
        tokens.append(tok)
        ref_logp = torch.log_softmax(policy(rlast, temperature, None), -1)[tok]
        # a finished completion draws eos with log-probability 0 for the estimator, but our own
        # log_softmax says log p(eos) (-inf where top-k cut eos): mask what follows eos ourselves
        kl = kl + torch.where(live, logp[tok] - ref_logp, torch.zeros_like(ref_logp)).detach()
        r = r + ((tok == TARGET) & live).float()
        live = live & (tok != EOS)
        if t < steps - 1:
            mask = torch.cat([mask, torch.ones_like(mask[:1])], -1)
            lg, cache = model(tok[None], nxt, mask, cache)
            with torch.no_grad():
                rlg, rcache = ref(tok[None], nxt, mask, rcache)
            last, rlast, nxt = lg[-1], rlg[-1], nxt + 1
    storch.add_cost(-(r - BETA * kl), name="reward")
    return tokens


def hand_terms(model, ref, prompts, pmask, toks, temperature=1.0, top_k=None, bias=0.0):
    """Batched, no cache: toks (..., B, T) -> log p of each completion, its KL (not detached), r."""
    b, lp_len = prompts.shape
    steps, lead = toks.shape[-1], toks.shape[:-2]
    p, m = prompts.expand(*lead, b, lp_len), pmask.expand(*lead, b, lp_len)
    pos_p = (torch.cumsum(m.long(), -1) - 1).clamp(min=0)
    pos = torch.cat([pos_p, pos_p[..., -1:] + 1 + torch.arange(steps)], -1)
    kmask = torch.cat([m, torch.ones_like(toks, dtype=torch.bool)], -1)
    logits, _ = model(torch.cat([p, toks], -1), pos, kmask)
    with torch.no_grad():
        rlogits, _ = ref(torch.cat([p, toks], -1), pos, kmask)
    window = slice(lp_len - 1, lp_len - 1 + steps)
    lp = torch.log_softmax(policy(logits[..., window, :] + bias, temperature, top_k), -1)
    rlp = torch.log_softmax(policy(rlogits[..., window, :], temperature, None), -1)
    lp, rlp = lp.gather(-1, toks[..., None])[..., 0], rlp.gather(-1, toks[..., None])[..., 0]
    ended = torch.cumsum((toks == EOS).long(), -1)
    alive = torch.cat([torch.zeros_like(ended[..., :1]), ended[..., :-1]], -1) == 0
    zero = torch.zeros_like(lp)
    logp = torch.where(alive, lp, zero).sum(-1)
    kl = torch.where(alive, lp - rlp, zero).sum(-1)
    return logp, kl, ((toks == TARGET) & alive).float().sum(-1)


def _models(vocab, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    ref = TinyLM(vocab).to(dtype).requires_grad_(False)
    model = copy.deepcopy(ref).requires_grad_(True)
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.1 * torch.randn_like(q))
        model.head.weight.mul_(3)
    return model, ref


PROMPTS = torch.tensor([[0, 0, 3, 4], [0, 7, 8, 9], [2, 3, 4, 5]])
PMASK = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]).bool()


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.7, 3)])
def test_gradient_equals_hand_written_rloo_on_the_same_draws(temperature, top_k):
    model, ref = _models(12, 0)
    params, k = list(model.parameters()), 4
    est = storch.estimator("score", plate="seq", n_samples=k, baseline="leave_one_out", eos=EOS)
    with storch.Graph() as g:
        tokens = storch_rloo(model, ref, est, PROMPTS, PMASK, 8, temperature, top_k)
        assert len(g.nodes) == 1 and {p.name: p.size for p in tokens[-1].plates} == {"seq": k, "data": 3}
        g_storch = grads(storch.surrogate_loss(), params)
    toks = torch.stack(tokens, -1).tensor  # (seq, data, T): plates in the order storch made them
    assert (toks == EOS).any() and (toks != EOS).any()
    logp, kl, r = hand_terms(model, ref, PROMPTS, PMASK, toks, temperature, top_k)
    f = (r - BETA * kl).detach()
    baseline = (f.sum(0, keepdim=True) - f) / (k - 1)
    g_hand = grads(-((f - baseline) * logp).mean(), params)
    assert_same_grads(g_storch, g_hand, [n for n, _ in model.named_parameters()], atol=1e-9, rtol=1e-7)


def test_gradient_under_bfloat16_autocast():
    model, ref = _models(12, 1, torch.float32)
    params, k = list(model.parameters()), 4
    est = storch.estimator("score", plate="seq", n_samples=k, baseline="leave_one_out", eos=EOS)
    with storch.Graph():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = storch_rloo(model, ref, est, PROMPTS, PMASK, 8)
        assert tokens[-1].tensor.dtype == torch.int64
        loss = storch.surrogate_loss()
        assert loss.dtype == torch.float32
        g_storch = grads(loss, params)
    toks = torch.stack(tokens, -1).tensor
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, kl, r = hand_terms(model, ref, PROMPTS, PMASK, toks)
    f = (r - BETA * kl).detach()
    g_hand = grads(-((f - (f.sum(0, keepdim=True) - f) / (k - 1)) * logp).mean(), params)
    scale = max(float(x.abs().max()) for x in g_hand)
    assert_same_grads(g_storch, g_hand, atol=0.02 * scale, rtol=0.0)  # bfloat16 rounding: 2^-8 per op


def test_unbiased_for_the_tempered_top_k_policy():
    # R replicates of a logit bias (a steering vector) on an independent plate, against enumerating
    # every completion of length 3 over 3 tokens (eos absorbing) under the same truncated policy
    vocab, steps, temperature, top_k = 3, 3, 0.7, 2
    model, ref = _models(vocab, 2)
    prompts, pmask = PROMPTS[:2, 1:] % vocab, PMASK[:2, 1:]
    bias = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    est = storch.estimator("score", plate="seq", n_samples=4, baseline="leave_one_out", eos=EOS)
    torch.manual_seed(3)
    with storch.Graph():
        leaf, b = replicate(bias, 3000)
        storch_rloo(model, ref, est, prompts, pmask, steps, temperature, top_k, bias=b)
        (grad,) = per_replicate_derivatives(storch.surrogate_loss(), leaf, 1)

    ys = torch.tensor(list(itertools.product(range(vocab), repeat=steps)))
    ended = torch.cumsum((ys == EOS).long(), -1)
    ys = ys[((torch.cat([torch.zeros_like(ended[:, :1]), ended[:, :-1]], -1) == 0) | (ys == EOS)).all(-1)]

    def expected_cost(bias):
        toks = ys[:, None, :].expand(-1, prompts.shape[0], -1)
        logp, kl, r = hand_terms(model, ref, prompts, pmask, toks, temperature, top_k, bias)
        p = logp.exp()
        return -(p * torch.where(p > 0, r - BETA * kl, torch.zeros_like(r))).sum(0).mean()

    exact = torch.autograd.functional.jacobian(expected_cost, bias)
    assert float(exact.abs().max()) > 0.05
    assert_unbiased(grad, exact, "gradient")
