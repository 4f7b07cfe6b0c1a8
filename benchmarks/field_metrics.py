"""What issue 15's new per-logged-step diagnostics cost: Adam state and output-logit statistics.

    python benchmarks/field_metrics.py [--reps 15] [--every 20]

On the benchmark Transformer (AdamW, a 1000-way head) and the MLP trained with
AdamW instead of SGD, measures with `time.thread_time` (CPU time of this
thread, one torch thread: robust to other processes on a shared machine)
the median of: a bare training step; a logged step of
`Diagnostics(every=1, optimizer=opt)` (all metrics); `optim_state.adam_state`
(the two Adam metrics of every tensor); the logit statistics of one forward's
output. Prints a Markdown table: ms per logged step, and the CPU-time ratio a
logged step every `every` steps gives (all metrics, and the new ones' share).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import models
import torch

from tb_diag_logger import Diagnostics
from tb_diag_logger.collectors import logits, optim_state


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1000 * statistics.median(times)


def measure(w: models.Workload, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    model = w.build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = w.batch(g, torch.device("cpu"))

    def step():
        opt.zero_grad()
        w.loss(model(x), y).backward()
        opt.step()

    for _ in range(3):
        step()
    params = list(model.named_parameters())
    cpu = torch.device("cpu")
    with torch.no_grad():
        out = model(x)
    capture = logits.LogitCapture(model, lambda: False, lambda where, e: None)

    def logit_stats():
        with torch.no_grad():
            capture._add(out)
            capture.take(cpu)

    with tempfile.TemporaryDirectory() as logdir, Diagnostics(model, logdir=logdir, every=1, optimizer=opt) as diag:
        counter = iter(range(10**6))

        def logged_step():
            opt.zero_grad()
            loss = w.loss(model(x), y)
            loss.backward()
            diag.step(next(counter), loss=loss)
            opt.step()

        logged_ms = _median_ms(logged_step, reps)
    result = {
        "model": w.name,
        "tensors": len(params),
        "bare_ms": _median_ms(step, reps),
        "logged_ms": logged_ms,
        "adam_ms": _median_ms(lambda: optim_state.adam_state(params, opt, cpu), reps),
        "logits_ms": _median_ms(logit_stats, reps),
        "logits_shape": list(out.shape),
    }
    capture.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--every", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(w, args.reps) for w in models.workloads(8, 64) if w.name in ("MLP", "Transformer")]
    print(f"| model (tensors), logits | bare step | logged step, all metrics | of which adam_state | logit stats "
          f"| CPU ratio at every={args.every} | of which the new metrics |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = 1 + (r["logged_ms"] - r["bare_ms"]) / args.every / r["bare_ms"]
        share = (r["adam_ms"] + r["logits_ms"]) / args.every / r["bare_ms"]
        print(f"| {r['model']} ({r['tensors']}), {r['logits_shape']} | {r['bare_ms']:.1f} ms | "
              f"{r['logged_ms']:.1f} ms | "
              f"{r['adam_ms']:.2f} ms | {r['logits_ms']:.2f} ms | {ratio:.3f} | +{share:.3f} |")


if __name__ == "__main__":
    main()
