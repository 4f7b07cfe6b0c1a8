"""The live-findings tests' training loop, shared by `test_live_findings.py` and its gloo worker."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tb_diag_logger import Diagnostics

BLOW_UP = 55  # the step whose batch holds the corrupted sample


def diverging_loop(logdir, steps: int = 150, blow_up: bool = True,
                   wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
                   on_step: Optional[Callable[[int], None]] = None, **kw) -> tuple[Diagnostics, int]:
    """A plain loop at learning rate 0.05; with `blow_up` a corrupted sample (an inf in its input) reaches the
    model at step 55 and every value turns NaN from there: a run that diverges mid-way, with no warning sign
    before it. (A learning rate ramped up until NaN would be found as `lr_unbounded` from its start.)

    `wrap` wraps the model (DDP); `on_step(step)` runs before each step's forward; `kw` goes to
    `Diagnostics`. Returns the `Diagnostics`, not closed yet, and the last step run."""
    torch.manual_seed(0)
    model = wrap(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    diag = Diagnostics(model, logdir=str(logdir), every=5, optimizer=opt, **kw)
    last = -1
    for step in range(steps):
        if on_step is not None:
            on_step(step)
        batch = x.clone()
        if blow_up and step == BLOW_UP:
            batch[0, 0] = float("inf")
        loss = F.mse_loss(model(batch), y)
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss)
        opt.step()
        last = step
        if diag.should_stop:
            break
    return diag, last
