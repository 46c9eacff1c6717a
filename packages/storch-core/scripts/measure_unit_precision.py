"""Measures the limits of storch.distributions.precision for Beta and Kumaraswamy (LIKELY_PATHWISE, EXACT):
`beta1` / `beta0`: z of the pathwise d/dlog c E[log(1 - x)] (E[log x]) of Beta(1, c) (Beta(c, 1)) against the
digamma closed form 1/c, 6e6 draws per c; `kuma`: the fraction of Kumaraswamy draws equal to 1 or 0 exactly.
Run: python measure_unit_precision.py beta1|beta0|kuma (minutes on one core)."""
import torch, math, sys
from torch.distributions import Beta, Kumaraswamy
torch.set_num_threads(1); torch.manual_seed(0)
B, K = 100000, int(sys.argv[2]) if len(sys.argv) > 2 else 60
def z_side(dt, side, c):
    lc = torch.tensor(math.log(c), dtype=dt, requires_grad=True)
    gs = []
    for _ in range(K):
        if side == 1:
            v = Beta(torch.tensor(1.0, dtype=dt), lc.exp()).rsample((B,)); cost = torch.log1p(-v).mean()
        else:
            v = Beta(lc.exp(), torch.tensor(1.0, dtype=dt)).rsample((B,)); cost = torch.log(v).mean()
        gs.append(torch.autograd.grad(cost, lc)[0].double())
    g = torch.stack(gs); m = g.mean(); se = g.std() / math.sqrt(K); ex = 1 / c
    return (m - ex) / se, (m - ex) / ex
which = sys.argv[1]
if which == "beta1":
    for dt, grid in ((torch.float32, [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]), (torch.float64, [0.1, 0.15, 0.2, 0.25, 0.3, 0.4])):
        for c in grid:
            z, rel = z_side(dt, 1, c); print(dt, "near1 b", c, f"z {z:.1f} rel bias {rel:.2e}", flush=True)
if which == "beta0":
    for dt, grid in ((torch.float32, [0.03, 0.05, 0.08, 0.1, 0.15, 0.2]), (torch.float64, [0.005, 0.01, 0.02, 0.04])):
        for c in grid:
            z, rel = z_side(dt, 0, c); print(dt, "near0 a", c, f"z {z:.1f} rel bias {rel:.2e}", flush=True)
if which == "kuma":
    N = 10**7
    for dt in (torch.float32, torch.float64):
        for a, b in ((1, 0.3), (1, 0.45), (1, 0.6), (1, 0.8), (1, 1.0), (2, 2), (3, 3), (0.1, 1), (0.15, 1), (0.2, 1)):
            ones = zeros = 0
            for _ in range(N // 10**6):
                x = Kumaraswamy(torch.tensor(float(a), dtype=dt), torch.tensor(float(b), dtype=dt)).rsample((10**6,))
                ones += int((x == 1).sum()); zeros += int((x == 0).sum())
            print(dt, "kuma", a, b, "exact1", ones / N, "exact0", zeros / N, flush=True)
