"""What the in-process findings cost per logged step (issue 23 point 6), as the run's history grows.

For each model of benchmarks/models.py, a few real logged steps are recorded
(every=1, everything on, items captured where they are written); then those
steps' items are replayed into a `LiveFindings` (tb_diag_logger/live.py) with
step numbers 0, 20, 40, ... (the default cadence) and a little noise, and one
evaluation (the rules engine over every retained step) is timed at
history lengths H = 10, 100, 1000, ... logged steps. The training-side work of
a logged step that is not the evaluation (copying the items into the
retained series) is timed too.

    python benchmarks/live_findings.py [--lengths 10,100,1000,5000,20000] [--models MLP,CNN,Transformer]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import models
import numpy as np
import torch

from tb_diag_logger import Diagnostics
from tb_diag_logger.diagnostics import DEFAULT_EVERY
from tb_diag_logger.live import LiveFindings


def recorded_steps(w: models.Workload, n: int = 4) -> tuple[list[list], dict]:
    """The items and the structure document `n` real logged steps of `w` write."""
    torch.manual_seed(0)
    model, g = w.build(), torch.Generator().manual_seed(0)
    opt = w.optimizer(model)
    seen: list[list] = []
    with tempfile.TemporaryDirectory() as d:
        diag = Diagnostics(model, logdir=d, every=1, optimizer=opt, alert=None)
        for step in range(n + 1):
            x, y = w.batch(g, torch.device("cpu"))
            loss = w.loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
        diag.close()
        live = diag._live
        series = live.series()
        structure = live._structure
    # Per logged step: (metric, layers, types, values) as written, rebuilt from the retained series.
    for i in range(n):
        items = []
        for m, s in series.items():
            if i < s.steps.size:
                items.append((m, s.layers, s.layer_types, s.values[i]))
        seen.append(items)
    return seen, structure


def measure(w: models.Workload, lengths: list[int], every: int) -> dict:
    steps, structure = recorded_steps(w)
    live = LiveFindings(None, None, None, lambda where, e: (_ for _ in ()).throw(e))
    live.observe_structure(0, structure)
    rng = np.random.default_rng(0)
    out = {"model": w.name, "describe": w.describe, "layers": {m: len(s[1]) for m, s in
                                                               ((it[0], it) for it in steps[0])},
           "evaluation_ms": {}, "record_us": None}
    record_s: list[float] = []
    h = 0
    for target in sorted(lengths):
        while h < target:
            items = steps[h % len(steps)]
            noisy = [(m, names, types, v * (1 + 0.01 * rng.standard_normal(v.shape)).astype(np.float32))
                     for m, names, types, v in items]
            t0 = time.perf_counter()
            live.observe_vectors(h * every, noisy)
            record_s.append(time.perf_counter() - t0)
            h += 1
        times = []
        for _ in range(3):
            live._dirty = True
            t0 = time.perf_counter()
            live.evaluate(None)  # now, whatever the time budget says
            times.append(time.perf_counter() - t0)
        out["evaluation_ms"][str(target)] = round(1000 * statistics.median(times), 2)
        print(f"{w.name:12s} H={target:6d} logged steps: evaluation {1000 * statistics.median(times):9.2f} ms "
              f"(min {1000 * min(times):.2f}, max {1000 * max(times):.2f}); {len(live.findings())} findings",
              flush=True)
    out["record_us"] = round(1e6 * statistics.median(record_s), 1)
    print(f"{w.name:12s} recording one logged step's items: {out['record_us']} us (median)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="10,100,1000,5000,20000")
    ap.add_argument("--models", default="MLP,CNN,Transformer")
    ap.add_argument("--every", type=int, default=DEFAULT_EVERY)
    ap.add_argument("--out", default=None, help="JSON results (default: none)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    lengths = [int(x) for x in args.lengths.split(",")]
    chosen = [w for w in models.workloads(transformer_batch=8, transformer_seq=64) if w.name in args.models.split(",")]
    results = [measure(w, lengths, args.every) for w in chosen]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
