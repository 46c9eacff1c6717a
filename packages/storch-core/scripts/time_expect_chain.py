"""Time per gradient estimate of `expect` on the two-node categorical chain vs hand-written torch.

The chain is the one of tests/core/test_expect_exact.py: z1 ~ Cat(softmax(a)) with K1 = 3,
z2 ~ Cat(softmax(z1 @ W)) with K2 = 4, cost (z2·v + φ z1·u)^2 + sin(φ) z2·v. Both sides compute
the exact expectation and its gradient. Run: python time_expect_chain.py
"""

import timeit

import torch
from torch.distributions import OneHotCategorical

import storch

K1, K2 = 3, 4
V = torch.arange(1.0, K2 + 1)
U = torch.tensor([0.5, -1.0, 2.0])


def cost(z1, z2, phi):
    return (z2 @ V + phi * (z1 @ U)) ** 2 + torch.sin(phi) * (z2 @ V)


a = torch.randn(K1, requires_grad=True)
W = torch.randn(K1, K2, requires_grad=True)
phi = torch.tensor(0.3, requires_grad=True)
e1, e2 = storch.estimator("expect", plate="z1"), storch.estimator("expect", plate="z2")


def with_storch():
    with storch.Graph():
        z1 = e1(OneHotCategorical(logits=a))
        z2 = e2(OneHotCategorical(logits=z1 @ W))
        storch.add_cost(cost(z1, z2, phi))
        loss = storch.surrogate_loss()
    return torch.autograd.grad(loss, (a, W, phi))


def by_hand():
    eye1, eye2 = torch.eye(K1), torch.eye(K2)
    p1 = torch.softmax(a, -1)                      # (K1,)
    p2 = torch.softmax(eye1 @ W, -1)               # (K1, K2)
    c = cost(eye1[:, None, :], eye2[None, :, :], phi)  # (K1, K2)
    loss = (p1[:, None] * p2 * c).sum()
    return torch.autograd.grad(loss, (a, W, phi))


if __name__ == "__main__":
    torch.set_num_threads(1)
    for x, y in zip(with_storch(), by_hand()):
        assert torch.allclose(x, y, atol=1e-5), (x, y)
    for _ in range(200):
        with_storch(), by_hand()
    n = 2000
    ts = min(timeit.repeat(with_storch, number=n, repeat=5)) / n * 1e6
    th = min(timeit.repeat(by_hand, number=n, repeat=5)) / n * 1e6
    print(f"expect on the chain: storch {ts:.1f} us, by hand {th:.1f} us, ratio {ts / th:.2f}")
