"""The measurements behind the issue-15 thresholds (`Thresholds.diverge_*`, `weight_growth_*`,
`decay_*`, `clip_*`, `logit_*`, `adam_eps_fraction`): a small GPT trained on CPU at several
settings, every quantity computed here directly from torch (not through the logger or the rules).

Per run it prints the loss (start, peak, end, as multiples of the start), the largest growth of a
weight tensor's norm (overall and within 10 steps), the median tensor's update ratio, the share of
steps gradient clipping changed with the pre-clip norm's median and 90th percentile, max |logit|,
and the largest share of a weight tensor's entries with sqrt(v_hat) < eps.

    python benchmarks/divergence.py                      # the runs quoted in thresholds.py
    python benchmarks/divergence.py "lr=1" "lr=1e-2,wd=30"
"""

from __future__ import annotations

import ast
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from pathologies import TinyGPT  # noqa: E402

RUNS = (
    "lr=1",  # blow-up, no NaN
    "lr=0.3",
    "lr=0.03",
    "lr=3e-3,clip=1.0,warmup=10,cosine=True,wd=0.1",  # the suite's healthy GPT
    "lr=6e-4,clip=1.0,warmup=20,cosine=True,wd=0.1",  # nanoGPT's defaults
    "lr=1e-2,wd=30",  # weight-decay equilibrium
)


def run(lr: float, wd: float = 0.0, clip: float = 0.0, warmup: int = 0, cosine: bool = False, steps: int = 120,
        seed: int = 0) -> None:
    """Train the suite's TinyGPT on its arithmetic sequences and print the measured quantities."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    m = TinyGPT()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    names = [n for n, _ in m.named_parameters()]
    weights = [i for i, (n, p) in enumerate(m.named_parameters()) if not n.endswith("bias") and p.dim() > 1]
    loss_v, pre_v, post_v, logit_v, eps_v, wn, ur = [], [], [], [], [], [], []
    for s in range(steps):
        f = min(1.0, (s + 1) / warmup) if warmup else 1.0
        if cosine:
            f *= 0.5 * (1 + math.cos(math.pi * s / steps))
        for pg in opt.param_groups:
            pg["lr"] = lr * f
        start = torch.randint(0, 32, (16, 1), generator=g)
        stride = torch.randint(1, 4, (16, 1), generator=g)
        seq = (start + stride * torch.arange(17)) % 32
        out = m(seq[:, :-1])
        loss = F.cross_entropy(out.reshape(-1, 32), seq[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        pre = float(torch.nn.utils.clip_grad_norm_(m.parameters(), clip if clip else math.inf))
        post = math.sqrt(sum(float(p.grad.norm()) ** 2 for p in m.parameters() if p.grad is not None))
        before = [p.detach().clone() for p in m.parameters()]
        opt.step()
        with torch.no_grad():
            ps = list(m.parameters())
            wn.append([float(p.norm()) for p in ps])
            ur.append([float((p - b).norm() / max(float(b.norm()), 1e-12)) for p, b in zip(ps, before)])
            fr = []
            for i in weights:
                st = opt.state[ps[i]]
                v_hat = st["exp_avg_sq"] / (1 - 0.999 ** float(st["step"]))
                fr.append(float((v_hat.sqrt() < 1e-8).float().mean()))
        loss_v.append(float(loss.detach()))
        pre_v.append(pre)
        post_v.append(post)
        logit_v.append(float(out.detach().abs().max()))
        eps_v.append(max(fr))
    L, W, U = np.array(loss_v), np.array(wn)[:, weights], np.array(ur)[:, weights]
    P, Q = np.array(pre_v), np.array(post_v)
    growth = W / W[0]
    ten = max(float((W[i + 10] / W[i]).max()) for i in range(steps - 10))
    w = max(3, steps // 10)
    print(f"== lr={lr} wd={wd} clip={clip or '-'} warmup={warmup} cosine={cosine} seed={seed}")
    print(f"  loss: start {L[0]:.3g}, peak {L.max():.3g} ({L.max() / L[0]:.3g}x), end {np.median(L[-w:]):.3g} "
          f"({np.median(L[-w:]) / L[0]:.3g}x); nan: {bool(np.isnan(L).any())}")
    top = names[weights[int(np.nanargmax(growth.max(0)))]]
    print(f"  weights: largest tensor growth {np.nanmax(growth):.3g}x ({top}), within 10 steps {ten:.3g}x; "
          f"median tensor at the end {np.median(growth[-1]):.3g}x")
    print(f"  update ratio (median tensor): median {np.median(np.median(U, 1)):.3g}, after step 10 "
          f"{np.median(np.median(U[10:], 1)):.3g}")
    print(f"  clipping changed {100 * float((Q < P * (1 - 1e-3)).mean()):.0f} % of steps; pre-clip norm median "
          f"{np.median(P):.3g}, p90 {np.percentile(P, 90):.3g}")
    print(f"  max |logit|: start {logit_v[0]:.3g}, peak {max(logit_v):.3g}, end {logit_v[-1]:.3g}; "
          f"largest weight-tensor share sqrt(v_hat) < eps: {max(eps_v):.3g}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    for spec in sys.argv[1:] or RUNS:
        run(**{k: ast.literal_eval(v) for k, v in (kv.split("=") for kv in spec.split(","))})
