"""FlexAttention (``torch.nn.attention.flex_attention.flex_attention``) in a compiled step: refused by name.

Outside torch.compile, flex_attention runs its reference implementation (on every device) with ``score_mod`` and
``mask_mod`` under ``torch.func.vmap``, so storch.compile refused it at the trace as "it calls torch.func.vmap ...
inside the step", which the step does not do itself. Its autograd Function (FlexAttentionAutogradOp, with a backward
of its own) therefore never reaches the check of custom Functions: nothing silently wrong, but a message that did
not name the call. Now it names flex_attention and how to write the attention with torch operations, which compiles
with eager's gradient (checked against flex_attention's own eager gradient below). torch 2.13's FlexAttention has
no backward on CPU (inputs that require grad raise torch's NotImplementedError), so the differentiated example
samples a hard mask over the keys (``storch.expect`` of a Bernoulli: exact, so gradients compare to the float)."""

import pytest
import torch
from torch.distributions import Bernoulli
from torch.nn.attention.flex_attention import flex_attention

import storch
from storch.errors import StorchError

BACKENDS = [None, "inductor"]


@pytest.fixture(autouse=True)
def _keep_argument_validation():
    """flex_attention called eagerly compiles its reference implementation with torch.compile, whose first compile in
    a process turns torch.distributions argument validation off for the whole process
    (torch._dynamo.eval_frame.TorchPatcher): the tests after this module expect it on (tests/models' restore_validation)."""
    validate = torch.distributions.Distribution._validate_args
    yield
    torch.distributions.Distribution.set_default_validate_args(validate)
L, D = 4, 2


QKV = torch.randn(3, 1, 1, L, D, generator=torch.Generator().manual_seed(0))  # (constants the step captures)


def _qkv(n):
    return [t.expand(n, 1, L, D) for t in QKV.unbind(0)]


def _masked_attention_step(attend):
    """A step whose cost is the attention output's squared norm under a hard mask over the keys, drawn from
    Bernoulli(logits) and enumerated by storch.expect (one row of the batch per value of the mask)."""
    def step(logits):
        with storch.Graph():
            m = storch.estimator("expect", plate="m")(Bernoulli(logits=logits))
            mask = m.tensor > 0.5  # (16, L)
            q, k, v = _qkv(mask.shape[0])
            out = attend(q, k, v, mask)
            storch.add_cost(storch.PlateTensor(out.square().sum((1, 2, 3)), m.plates), name="cost")
            return storch.surrogate_loss()
    return step


def _flex(q, k, v, mask):
    return flex_attention(q, k, v, score_mod=lambda s, b, h, i, j: torch.where(mask[b, j], s, -1e4))


def _by_hand(q, k, v, mask):  # what the refusal advises
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return s.masked_fill(~mask[:, None, None, :], -1e4).softmax(-1) @ v


def _reparameterized_step(mu):
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(torch.distributions.Normal(mu, 1.0))
        q, k, v = _qkv(1)
        storch.add_cost((z - flex_attention(q, k, v).sum()) ** 2, name="cost")
        return storch.surrogate_loss()


STEPS = {"sampled_mask_score_mod": _masked_attention_step(_flex), "plain_call": _reparameterized_step}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(STEPS))
def test_flex_attention_in_a_compiled_step_is_refused_by_name(case, backend):
    step = STEPS[case]
    x = torch.zeros(L, requires_grad=True) if case == "sampled_mask_score_mod" else torch.tensor(0.5, requires_grad=True)
    torch.autograd.grad(step(x), x)  # eagerly: fine
    compiled = storch.compile(step, backend=backend)
    for _ in range(2):  # at the first call, and again (nothing was kept)
        with pytest.raises(StorchError, match=r"cannot trace \S*step: it calls torch.nn.attention.flex_attention."
                                              r"flex_attention.*torch.func.vmap.*Write the attention with torch "
                                              r"operations.*or run this step eagerly"):
            compiled(x)
        assert compiled.traces == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_attention_the_refusal_advises_compiles_with_flex_attentions_eager_gradient(backend):
    logits = torch.tensor([0.3, -1.0, 0.8, 0.0], requires_grad=True)
    flex_loss = _masked_attention_step(_flex)(logits)
    (flex_grad,) = torch.autograd.grad(flex_loss, logits)
    compiled = storch.compile(_masked_attention_step(_by_hand), backend=backend)
    for _ in range(2):  # the first call and a replay
        loss = compiled(logits)
        (grad,) = torch.autograd.grad(loss, logits)
        torch.testing.assert_close(loss, flex_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, flex_grad, rtol=1e-5, atol=1e-6)
    assert compiled.traces == 1 and flex_grad.abs().min() > 1e-3  # (a gradient that is not zero)
