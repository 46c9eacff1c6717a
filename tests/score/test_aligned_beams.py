"""storch.aligned across the steps of a beam search (``unordered_set``: the entries are re-indexed by their parents
between steps, per data point): the tokens of every step read at the last step, against a loop that follows
storch.ancestor_index entry by entry; and the invariant the hand-written idiom ``(x + 0 * y).tensor`` rests on
(an earlier step is re-indexed when it meets a later one), which holds."""

import torch
from torch.distributions import Categorical

import storch

V, T, S = 4, 3, 3


def _decode(est, logits0):
    """T tokens, one estimator call per step, from per-data-point logits; the state follows the tokens."""
    h, tokens = logits0, []
    for t in range(T):
        y = est(Categorical(logits=h))
        tokens.append(y)
        h = h + 1.7 * torch.nn.functional.one_hot(y, V).double() - 0.3 * t
    return tokens


def test_every_step_read_at_the_last_step_follows_each_entrys_ancestry_per_data_point():
    torch.manual_seed(3)
    est = storch.estimator("unordered_set", plate="seq", n_samples=S)
    with storch.Graph():
        x = storch.denote_independent(torch.randn(2, V, dtype=torch.float64), 0, "data")
        tokens = _decode(est, x)
        last = tokens[-1]
        names = [p.name for p in last.plates]
        raw, plates = storch.aligned(*tokens, plates=("data", "seq"))
        assert [p.name for p in plates] == ["data", "seq"] and plates[1].step == T - 1
        anc = [storch.ancestor_index(last, "seq", step=s).tensor for s in range(T)]    # in last's layout
        moved = 0
        for s, tok in enumerate(tokens):
            own = [p.name for p in tok.plates]
            for d in range(2):
                for i in range(S):
                    j = int(anc[s][(d, i) if names == ["data", "seq"] else (i, d)])   # entry i's ancestor at step s
                    at = {"data": d, "seq": j}
                    assert raw[s][d, i] == tok.tensor[tuple(at[n] for n in own)]
                    moved += j != i
            # the invariant of the idiom: (tok + 0 * last) is re-indexed to the last step as storch.aligned's read
            old = tok + 0 * last
            assert old.plates == last.plates
            assert torch.equal(old.tensor, raw[s] if names == ["data", "seq"] else raw[s].t())
        assert moved > 0  # the beams did re-index some entries (else the loop would not tell the steps apart)
        # SeqGAN's read: every token and the state in the current step's plates, then the value put back on them
        h = sum(torch.nn.functional.one_hot(t, V).double() for t in tokens)
        (*toks, state), plates = storch.aligned(*tokens, h, plates=last.plates)
        assert plates == last.plates and state.shape == last.tensor.shape + (V,)
        value = storch.PlateTensor(sum(t.double() for t in toks) + state.sum(-1), plates)
        assert torch.equal(value.tensor, (sum(t.double() for t in tokens) + h.sum(-1)).tensor)
