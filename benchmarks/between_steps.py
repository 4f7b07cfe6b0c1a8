"""What the between-steps accumulators (logger/collectors/between.py) cost a step that is not logged.

For each benchmark model (benchmarks/models.py) a real training step is
timed (the bare step), and right after its backward the accumulators'
per-step update is timed on its own, many times over: with the loss only
(what every `Diagnostics.step()` does), and with the global gradient norm
measured too (`grad_norm_every_step=True`). The ratio is one plus that extra
time over the bare step; the default cadence's logged steps are not part of
it (see benchmarks/overhead.py). The last figure is all that issue 22 adds
to a `Diagnostics.step()` that is not logged (the accumulators from the
loss, the step-order check, disarming the wiring hooks). On a GPU the update runs under
`torch.cuda.set_sync_debug_mode("error")`: a host synchronisation raises.

    python benchmarks/between_steps.py [--device cpu|cuda] [--steps N] [--repeat R]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import models
import torch

from tb_diag_logger import Diagnostics
from tb_diag_logger.collectors.between import BetweenSteps
from tb_diag_logger.collectors.wiring import WiringChecks
from tb_diag_logger.diagnostics import DEFAULT_EVERY


def _median_ms(fn, n: int, sync) -> float:
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench(workload, device: torch.device, steps: int, repeat: int) -> dict:
    torch.manual_seed(0)
    model = workload.build().to(device)
    opt = workload.optimizer(model)
    g = torch.Generator().manual_seed(1)
    batches = [workload.batch(g, device) for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    params = list(model.named_parameters())
    loss_only = BetweenSteps(params, measure_grad_norm=False)
    with_norm = BetweenSteps(params, measure_grad_norm=True)
    # Everything issue 22 adds to an unlogged Diagnostics.step() (accumulators, step-order check, disarming).
    diag = Diagnostics(model, logdir=tempfile.mkdtemp(prefix="tbdiag-between-"), every=DEFAULT_EVERY,
                       optimizer=opt)
    bare, extra_loss, extra_norm, extra_step = [], [], [], []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = workload.loss(model(x), y)
        loss.backward()
        opt.step()
        sync()
        bare.append((time.perf_counter() - t0) * 1e3)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            extra_loss.append(_median_ms(functools.partial(loss_only.observe, step, loss, None), repeat, sync))
            extra_norm.append(_median_ms(functools.partial(with_norm.observe, step, loss, None), repeat, sync))
            extra_step.append(_median_ms(functools.partial(_issue22_step_work, diag, step, loss), repeat, sync))
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    diag.close()
    b = statistics.median(bare[2:])
    es = statistics.median(extra_step[2:])
    el, en = statistics.median(extra_loss[2:]), statistics.median(extra_norm[2:])
    return {
        "model": workload.name, "bare_ms": b, "bare_ms_min": min(bare[2:]), "bare_ms_max": max(bare[2:]),
        "loss_only_ms": el, "with_norm_ms": en, "ratio_loss_only": 1 + el / b, "ratio_with_norm": 1 + en / b,
        "step_work_ms": es, "ratio_step_work": 1 + es / b,
    }


def _issue22_step_work(diag: Diagnostics, step: int, loss: torch.Tensor) -> None:
    """What issue 22 adds to an unlogged `Diagnostics.step()`: the accumulators, the order check, disarming."""
    diag._ctx.losses = [("total", loss)]
    for c in diag.collectors:
        c.on_step(step)  # the accumulators and the step order
        if isinstance(c, WiringChecks):
            c.arm(False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--models", default="MLP,CNN,Transformer")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    wanted = args.models.split(",")
    print(f"device {device}, torch {torch.__version__}, load {os.getloadavg()[0]:.2f}")
    for w in models.workloads():
        if w.name not in wanted:
            continue
        r = bench(w, device, args.steps, args.repeat)
        print(
            f"{r['model']:12s} bare {r['bare_ms']:.1f} ms (min {r['bare_ms_min']:.1f}, max {r['bare_ms_max']:.1f}); "
            f"accumulators: loss only +{r['loss_only_ms'] * 1e3:.0f} us ({r['ratio_loss_only']:.4f}), "
            f"with the global gradient norm +{r['with_norm_ms'] * 1e3:.0f} us ({r['ratio_with_norm']:.4f}); "
            f"all issue-22 work of an unlogged step() +{r['step_work_ms'] * 1e3:.0f} us ({r['ratio_step_work']:.4f})"
        )
    print(f"load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
