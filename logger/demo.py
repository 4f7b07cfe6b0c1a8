"""`tb-diag demo`: small CPU trainings, healthy and broken, for the tab to show.

On the training side (it imports torch when it runs); the CLI imports it only
for `tb-diag demo`, so TensorBoard and `tb-diag report` never load torch.
Each run is a few seconds on a 2-core CPU, with synthetic data so nothing is
downloaded.
"""

from __future__ import annotations

import os
import time
from typing import Callable

RUNS = ("healthy", "vanishing_sigmoid", "dying_relu", "diverging")


def _data(torch, n: int = 2048, d: int = 32, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(1)
    return x, y


def _mlp(nn, d: int, width: int, depth: int, act: Callable, classes: int = 4):
    layers = []
    for i in range(depth):
        layers += [nn.Linear(d if i == 0 else width, width), act()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def _train(
    run_dir: str, model, opt, steps: int, every: int, sched=None, l2: float = 1e-4, seed: int = 0, batch: int = 64
) -> None:
    import torch
    import torch.nn.functional as F
    from torch.utils.tensorboard import SummaryWriter

    from tb_diag_logger import Diagnostics

    torch.manual_seed(seed)
    x, y = _data(torch, seed=seed)
    writer = SummaryWriter(run_dir)
    with Diagnostics(model, writer, every=every, optimizer=opt) as diag:
        for step in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,))
            logits = model(x[idx])
            ce = F.cross_entropy(logits, y[idx], reduction="none")
            reg = l2 * sum((p * p).sum() for p in model.parameters())
            loss = ce.mean() + reg
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss, losses={"ce": ce, "l2": reg})
            opt.step()
            if sched is not None:
                sched.step()
            if step % every == 0:
                writer.add_scalar("train/loss", loss.item(), step)  # the user's own scalars
    writer.close()


def write_demo(logdir: str, steps: int = 400, every: int = 2, quiet: bool = False) -> list[str]:
    """Train the demo runs into `logdir`; returns the run directories."""
    import torch
    from torch import nn

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = []

    def run(name: str, build: Callable[[], tuple]) -> None:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model, opt, sched = build()
        path = os.path.join(logdir, name)
        _train(path, model, opt, steps, every, sched)
        out.append(path)
        if not quiet:
            print(f"  {name:<18} {time.perf_counter() - t0:5.1f} s  -> {path}")

    def healthy():
        m = _mlp(nn, 32, 128, 3, nn.ReLU)
        return m, torch.optim.Adam(m.parameters(), lr=1e-3), None

    def vanishing():
        m = _mlp(nn, 32, 64, 20, nn.Sigmoid)
        return m, torch.optim.SGD(m.parameters(), lr=0.05), None

    def dying():
        m = _mlp(nn, 32, 128, 4, nn.ReLU)
        with torch.no_grad():
            for layer in m:
                if isinstance(layer, nn.Linear) and layer is not m[-1]:
                    layer.bias.fill_(-1.5)  # most units start, and stay, negative
        return m, torch.optim.SGD(m.parameters(), lr=0.3), None

    def diverging():
        m = _mlp(nn, 32, 128, 3, nn.ReLU)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        # The learning rate grows 4 % a step: fine at first, NaN after ~150 steps.
        return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.04**s)

    for name, build in zip(RUNS, (healthy, vanishing, dying, diverging)):
        run(name, build)
    return out
