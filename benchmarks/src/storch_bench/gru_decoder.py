"""An autoregressive GRU decoder of discrete tokens: one estimator instance over all steps.

A sequence autoencoder for 64-pixel images: the image sets the GRU's initial state; at each of
``steps`` steps a token is drawn from ``OneHotCategorical(logits=out(h))`` and fed back through
the GRU; the cost is ``-log p(x | h_T)``. The model code is written for ONE image; the one
estimator called at every step makes the steps one partition (one plate, paper section 3.2).
:func:`hand_surrogate` is the same model by hand in batched torch (samples ``(n, batch, ...)``),
the floor of ``storch-compare overhead`` (problem ``rnn``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import OneHotCategorical

import storch

from .handwritten import score_surrogate

__all__ = ["GRUDecoder", "storch_surrogate", "hand_surrogate"]


class GRUDecoder(nn.Module):
    """Initial state from the image, ``steps`` sampled tokens through an ``nn.GRU``, a readout.

    Args:
        n_in: pixels per image.
        hidden: GRU state size.
        n_tokens: categories per token.
        embed: token embedding size (a linear map of the one-hot token).
        steps: tokens per sequence.
    """

    def __init__(self, n_in: int = 64, hidden: int = 32, n_tokens: int = 8, embed: int = 16, steps: int = 8) -> None:
        super().__init__()
        self.steps = steps
        self.init = nn.Linear(n_in, hidden)
        self.out = nn.Linear(hidden, n_tokens)
        self.embed = nn.Linear(n_tokens, embed, bias=False)
        self.gru = nn.GRU(embed, hidden)
        self.readout = nn.Linear(hidden, n_in)

    def initial_state(self, x: torch.Tensor) -> torch.Tensor:
        """h_0 of one image ``(n_in,)`` -> ``(hidden,)``."""
        return torch.tanh(self.init(x))

    def step(self, token: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """One GRU step of one sequence: token ``(n_tokens,)`` one-hot, h ``(hidden,)`` -> new h."""
        _, h = self.gru(self.embed(token).unsqueeze(0), h.unsqueeze(0))  # unbatched: (L=1, embed), (1, hidden)
        return h.squeeze(0)

    def reconstruction(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """-log p(x | h_T) of one image, summed over the pixels."""
        return F.binary_cross_entropy_with_logits(self.readout(h), x, reduction="none").sum(-1)


def storch_surrogate(model: GRUDecoder, est, images: torch.Tensor,
                     ids: Optional[torch.Tensor] = None) -> list[storch.PlateTensor]:
    """One step's graph in the current ``storch.Graph``; ``images`` ``(B, n_in)``; returns the tokens.

    ``ids``: the images' ids ``(B,)``, given to the first token's call as ``memory_key`` (an estimator
    that remembers sequences per data point, e.g. ``sum_and_sample`` with ``buffer=``, needs them).
    """
    x = storch.denote_independent(images, 0, "data")
    h = model.initial_state(x)
    tokens = []
    for t in range(model.steps):
        key = {"memory_key": ids} if ids is not None and t == 0 else {}
        token = est(OneHotCategorical(logits=model.out(h)), **key)  # the same estimator: one partition
        tokens.append(token)
        h = model.step(token, h)
    storch.add_cost(model.reconstruction(h, x), name="reconstruction")
    return tokens


def hand_surrogate(model: GRUDecoder, images: torch.Tensor, n: int, leave_one_out: bool = True,
                   tokens: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The same step by hand: score function over whole sequences, batched torch.

    Args:
        images: ``(B, n_in)``.
        n: sequences per image.
        tokens: per step ``(n, B, n_tokens)`` samples to use; drawn as storch draws them when ``None``.
    """
    b = images.shape[0]
    h = model.initial_state(images)  # (B, hidden)
    logp = images.new_zeros(n, b)
    for t in range(model.steps):
        q = OneHotCategorical(logits=model.out(h).view(-1, b, model.out.out_features).squeeze(0))
        tok = tokens[t] if tokens is not None else (q.sample((n,)) if t == 0 else q.sample())
        logp = logp + q.log_prob(tok)  # l = Σ_t log p(token_t | tokens_<t): the sequence's log-probability
        inp = model.embed(tok.reshape(n * b, -1)).unsqueeze(0)  # (1, n·B, embed)
        h0 = (h.expand(n, b, -1) if t == 0 else h).reshape(1, n * b, -1).contiguous()  # cuDNN: contiguous hx
        h = model.gru(inp, h0)[1].squeeze(0)  # (n·B, hidden)
    rec = F.binary_cross_entropy_with_logits(model.readout(h), images.repeat(n, 1), reduction="none").sum(-1)
    return score_surrogate(logp, rec.view(n, b), leave_one_out)
