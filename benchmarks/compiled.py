"""A torch.compile'd (inductor, CPU) nanoGPT-shaped model: bare vs Diagnostics, interleaved.

    python benchmarks/compiled.py [--rounds 12] [--every 10] [--layers 4] [--d 128] [--seq 64] [--batch 8]

Two copies of the same model are compiled: one bare, one with Diagnostics
(every=`every`, all metrics, an AdamW optimizer). After warming up (both of
the diagnosed model's graphs compiled), each round trains `every` steps of
the bare model, then `every` steps of the diagnosed one (one logged step,
`every - 1` steps that are not logged), alternating which goes first.
Printed: the median of the per-round medians of a bare step, a step that is
not logged, the step right after a logged one (it writes the update ratio)
and the logged step, with ratios to the bare step of the same run, and the
spread of the per-round ratios (min–max); then what the same logged step
costs through the uncompiled model (the other faithful path: run the logged
step's forward eagerly), and dynamo's graph and graph-break counts.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch
from torch._dynamo.utils import counters
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _tiny_gpt import TinyGPT  # noqa: E402  (the tests' model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--functional-probe", action="store_true",
                    help="only: what a TorchFunctionMode around a compiled model with F.gelu does to dynamo")
    args = ap.parse_args()
    if args.functional_probe:
        functional_probe()
        return
    torch.manual_seed(0)
    torch.set_num_threads(2)
    net = TinyGPT(vocab=args.vocab, block=args.seq, d=args.d, layers=args.layers, heads=4)
    eager = copy.deepcopy(net)
    bare, diagnosed = torch.compile(copy.deepcopy(net)), torch.compile(net)
    g = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g) for _ in range(8)]
    data = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    logdir = tempfile.mkdtemp()

    def trainer(model, diag_every=None):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        diag = None
        if diag_every is not None:
            diag = Diagnostics(model, SummaryWriter(os.path.join(logdir, str(id(model)))), every=diag_every,
                               optimizer=opt)
        step = 0

        def run(n):
            nonlocal step
            times = []
            for _ in range(n):
                x, y = data[step % len(data)]
                t = time.perf_counter()
                loss = model(x, y)
                opt.zero_grad()
                loss.backward()
                if diag is not None:
                    diag.step(step, loss=loss)
                opt.step()
                times.append(time.perf_counter() - t)
                step += 1
            return times

        return run, diag

    # Diagnostics first: it turns on dynamo's guards on module hooks, which the bare model then gets too
    # (compiled without them, the bare model's graph would also serve the diagnosed one: the same class).
    run_diag, diag = trainer(diagnosed, args.every)
    counters.clear()
    run_bare, _ = trainer(bare)
    start = time.perf_counter()
    run_bare(3)
    bare_compile_s = time.perf_counter() - start
    bare_graphs, bare_breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    counters.clear()
    start = time.perf_counter()
    run_diag(2 * args.every)  # both graphs: logged and not logged
    diag_compile_s = time.perf_counter() - start
    run_eager, eager_diag = trainer(eager, args.every)
    run_eager(2 * args.every)

    rows = {"bare": [], "not logged": [], "after logged": [], "logged": [], "eager logged": [], "eager bare": []}
    for r in range(args.rounds):
        order = [0, 1] if r % 2 == 0 else [1, 0]
        for which in order:
            if which == 0:
                rows["bare"].append(statistics.median(run_bare(args.every)))
            else:
                t = run_diag(args.every)  # steps k*every .. k*every + every - 1: logged first
                rows["logged"].append(t[0])
                rows["after logged"].append(t[1])
                rows["not logged"].append(statistics.median(t[2:]))
        if r % 3 == 0:  # the eager path is slow: fewer samples
            t = run_eager(args.every)
            rows["eager logged"].append(t[0])
            rows["eager bare"].append(statistics.median(t[2:]))
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    diag.close()
    eager_diag.close()

    bare_ms = statistics.median(rows["bare"]) * 1e3
    print(f"model: TinyGPT layers={args.layers} d={args.d} seq={args.seq} batch={args.batch} vocab={args.vocab}, "
          f"every={args.every}, {args.rounds} rounds, torch {torch.__version__}, 2 threads")
    print(f"first steps (compilation): bare {bare_compile_s:.1f} s, with Diagnostics {diag_compile_s:.1f} s")
    print(f"dynamo: bare {bare_graphs} graph(s), {bare_breaks} break(s); with Diagnostics {graphs} graph(s), "
          f"{breaks} break(s) after {diag_steps(args)} steps")
    for name in ("bare", "not logged", "after logged", "logged"):
        ms = statistics.median(rows[name]) * 1e3
        ratios = [a / b for a, b in zip(rows[name], rows["bare"])]
        print(f"  compiled {name:13s} {ms:8.2f} ms  ratio {ms / bare_ms:.3f}  "
              f"(per-round {min(ratios):.3f}-{max(ratios):.3f})")
    logged_extra = (statistics.median(rows["logged"]) + statistics.median(rows["after logged"])) * 1e3 - 2 * bare_ms
    print(f"  extra per logged step (logged + the step after, minus two bare): {logged_extra:.1f} ms; "
          f"at every={args.every}: ratio {1 + logged_extra / (args.every * bare_ms):.3f}")
    e_log, e_bare = statistics.median(rows["eager logged"]) * 1e3, statistics.median(rows["eager bare"]) * 1e3
    print(f"  uncompiled path: logged step {e_log:.2f} ms ({e_log / bare_ms:.2f}x the compiled bare step), "
          f"uncompiled step not logged {e_bare:.2f} ms")


class _FunctionalGelu(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 2)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x)))


def functional_probe(steps: int = 10, every: int = 5) -> None:
    """Graphs and graph breaks of a compiled model with F.gelu: bare, and with a TorchFunctionMode entered
    around the logged steps' forward that records F.gelu's output, with and without a frame lookup."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Record(TorchFunctionMode):
        frames = False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.nn.functional.gelu:
                if self.frames:
                    sys._getframe(1)  # what the eager capture does to find the calling module
                seen.append(out.detach().sum())
            return out

    class RecordWithFrames(Record):
        frames = True

    x = torch.randn(4, 8)
    for name, mode in (("bare", None), ("mode, no frame lookup", Record), ("mode with frame lookup", RecordWithFrames)):
        torch._dynamo.reset()
        counters.clear()
        seen.clear()
        model = torch.compile(_FunctionalGelu())
        for step in range(steps):
            if mode is not None and step % every == 0:
                with mode():
                    model(x).sum().backward()
            else:
                model(x).sum().backward()
        print(f"F.gelu model, {steps} steps, every={every}, {name}: {counters['stats']['unique_graphs']} graph(s), "
              f"{sum(counters['graph_break'].values())} graph break(s), F.gelu outputs recorded {len(seen)}")


def diag_steps(args) -> int:
    return 2 * args.every + args.rounds * args.every


if __name__ == "__main__":
    main()
