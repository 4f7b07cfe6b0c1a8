"""Issue 7's big model: 2,000 parameter tensors and 1,000 activation sites, bare vs Diagnostics.

    python benchmarks/wide_model.py [--rounds 8] [--every 20]
    python benchmarks/wide_model.py --logged-cost [--samples 40] [--no-activations]
    python benchmarks/wide_model.py --mode-floor

One model (1,000 blocks of Linear(2, 2) + F.relu, summed), trained by blocks
of `every` steps: bare, then Diagnostics attached for the block and removed,
interleaved per round so drift cancels. Prints the per-round medians: bare
step, non-logged step, logged step, and the ratio at the given cadence; then
the same from the fastest step of each kind over all rounds. This model's
step is Python-bound (2,000 module calls): other processes and garbage
collection pauses spread its medians far more than the three benchmark
models', and the fastest steps are the steadier comparison.

`--logged-cost` measures the cost of a logged step more directly: Diagnostics
with every=2 (a logged step, then the step that writes its update ratio),
`--samples` of each, then as many bare steps; the fastest logged step plus the
fastest step after it, minus two fastest bare steps, is the extra time of one
logged step, and the ratio it implies at every=20 is printed with it. Run it
against another commit's logger (a `git worktree` of it, with a
`tb_diag_logger` symlink to its `logger/` on PYTHONPATH) for an A/B.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _logger_helpers import WideModel as Wide  # noqa: E402  (the same model as the tests')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--logged-cost", action="store_true", help="the extra time of one logged step (see above)")
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--no-activations", action="store_true", help="Diagnostics(..., activations=False)")
    ap.add_argument("--mode-floor", action="store_true",
                    help="the forward alone, bare and inside an empty TorchFunctionMode (what capture cannot avoid)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = Wide()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(4, 2)
    writer = SummaryWriter(tempfile.mkdtemp())

    def train(n, diag=None, start=0):
        times = []
        for s in range(start, start + n):
            t = time.perf_counter()
            opt.zero_grad()
            model(x).backward()
            if diag is not None:
                diag.step(s)
            opt.step()
            times.append(time.perf_counter() - t)
        return times

    train(5)
    if args.mode_floor:
        mode_floor(model, x, args.samples)
        writer.close()
        return
    if args.logged_cost:
        logged_cost(train, model, opt, writer, args.samples, activations=not args.no_activations)
        writer.close()
        return
    rows = []
    mins = []  # fastest step of each kind per round: robust to other processes and GC pauses
    step = 0
    for r in range(args.rounds):
        bare = train(args.every)
        diag = Diagnostics(model, writer, every=args.every, optimizer=opt, activations=not args.no_activations)
        train(2, diag, start=step)  # untimed: the first logged step allocates
        step += args.every
        timed = train(args.every, diag, start=step)
        step += args.every
        diag.close()
        logged, other = timed[0], timed[1:]
        mins.append((min(bare), min(other), logged))
        b = statistics.median(bare)
        ratio = ((args.every - 1) * statistics.median(other) + logged) / (args.every * b)
        rows.append((b, statistics.median(other), logged, ratio))
        print(f"round {r + 1}: bare {b * 1e3:.1f} ms, not logged {rows[-1][1] * 1e3:.1f} ms, "
              f"logged {logged * 1e3:.1f} ms, ratio at every={args.every}: {ratio:.3f}")
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"median: bare {med[0] * 1e3:.1f} ms, not logged {med[1] * 1e3:.1f} ms ({med[1] / med[0]:.3f}), "
          f"logged {med[2] * 1e3:.1f} ms, ratio at every={args.every}: {med[3]:.3f} "
          f"[{min(r[3] for r in rows):.3f}-{max(r[3] for r in rows):.3f}]")
    fb, fo, fl = (min(c) for c in zip(*mins))
    print(f"fastest: bare {fb * 1e3:.1f} ms, not logged {fo * 1e3:.1f} ms ({fo / fb:.3f}), logged {fl * 1e3:.1f} ms, "
          f"ratio at every={args.every}: {((args.every - 1) * fo + fl) / (args.every * fb):.3f}")
    writer.close()


def mode_floor(model, x, samples: int) -> None:
    """The fastest forward of `samples`, bare and inside a TorchFunctionMode that only calls through."""
    from torch.overrides import TorchFunctionMode

    class CallThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def fastest(inside_mode: bool) -> float:
        times = []
        for _ in range(samples):
            t = time.perf_counter()
            if inside_mode:
                with CallThrough():
                    model(x)
            else:
                model(x)
            times.append(time.perf_counter() - t)
        return min(times)

    bare, moded = fastest(False), fastest(True)
    print(f"fastest forward of {samples}: bare {bare * 1e3:.1f} ms, in an empty TorchFunctionMode "
          f"{moded * 1e3:.1f} ms (+{(moded - bare) * 1e3:.1f} ms)")


def logged_cost(train, model, opt, writer, samples: int, activations: bool = True) -> None:
    diag = Diagnostics(model, writer, every=2, optimizer=opt, activations=activations)
    times = train(2 * samples, diag)
    diag.close()
    logged, after = times[0::2], times[1::2]
    bare = train(samples)
    extra = min(logged) + min(after) - 2 * min(bare)
    print(f"fastest of {samples}: bare {min(bare) * 1e3:.1f} ms, logged {min(logged) * 1e3:.1f} ms, "
          f"the step after it {min(after) * 1e3:.1f} ms; extra per logged step {extra * 1e3:.1f} ms, "
          f"ratio at every=20: {1 + extra / (20 * min(bare)):.3f}")


if __name__ == "__main__":
    main()
