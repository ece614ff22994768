"""Measure torch.compile on the CFR step's loss math (toy size, 5 lanes): compile time and ms per step vs eager.

Usage: OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_compile.py   (docs/speed.md has the result)
"""

import time

import torch
import torch.nn.functional as F

from calib.methods.lanes import unit
from calib.methods.losses import info_nce

torch.manual_seed(0)
S, B, P, N, d, U, dh = 5, 128, 16, 16, 64, 2400, 96
h = torch.randn(S, U, dh)
W = torch.randn(S, dh, d, requires_grad=True)
slots = torch.randint(0, U, (S, B * (2 + P + N)))
text = F.normalize(torch.randn(2, d), dim=-1)
y = torch.randint(0, 2, (S, B))


def step(W, h, slots, y):
    e = unit(torch.bmm(h, W))
    g = e.reshape(S * U, d).index_select(0, (slots + U * torch.arange(S)[:, None]).reshape(-1)).view(S, -1, d)
    a, r, pos, neg = (
        g[:, :B],
        g[:, B : 2 * B],
        g[:, 2 * B : 2 * B + B * P].reshape(S, B, P, d),
        g[:, 2 * B + B * P :].reshape(S, B, N, d),
    )
    ce = F.cross_entropy((14.0 * a @ text.T).flatten(0, 1), y.flatten())
    return info_nce(unit(a), pos, neg, 1.0).sum() + ce + (r @ r.transpose(1, 2)).logsumexp(-1).mean()


def timeit(f, n=50):
    for _ in range(3):
        f(W, h, slots, y).backward()
    t = time.perf_counter()
    for _ in range(n):
        W.grad = None
        f(W, h, slots, y).backward()
    return (time.perf_counter() - t) / n * 1e3


print(f"eager: {timeit(step):.2f} ms per step")
t = time.perf_counter()
try:
    c = torch.compile(step)
    c(W, h, slots, y).backward()
    print(f"compile (first call): {time.perf_counter() - t:.1f} s")
    print(f"compiled: {timeit(c):.2f} ms per step")
except Exception as err:
    print("torch.compile failed:", type(err).__name__, str(err)[:300])
