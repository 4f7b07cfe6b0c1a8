"""Issue 24 point 5: the logger's cost at many small parameter tensors, against a bare twin.

    python benchmarks/many_tensors.py [--tensors 5000] [--numel 16] [--rounds 5] [--steps 20]
                                      [--optimizer adam|adamw|sgd] [--no-activations] [--profile] [--cpu-time]
                                      [--tensorboard-crc]

One model of `--tensors` parameter tensors of `--numel` elements each (a
`ParameterList`; the forward stacks them, so the bare step is a handful of
kernels whatever their number and the logger's own per-tensor work is what
shows). One process, `torch.set_num_threads(2)`, one model and optimizer:
each round runs a block of `--steps` bare steps, then a block with
`Diagnostics(every=1)` attached (two untimed steps first take the one-off
costs: structure document, buffers, plans) and closed after it, so drift of
the machine cancels (as benchmarks/overhead.py does). Prints, per round and
as medians, the bare step, the logged step, their difference (the cost of one
logged step) and that cost per tensor; then the bytes a logged step must read
(gradients, weights, the optimizer's state) for scale.

`--tensorboard-crc` adds a third block per round whose event records are
framed by TensorBoard's own pure-Python CRC-32C, in its writer thread, as they
were before tb-diag framed them with the C one (`tb_diag_plugin.summary.fast_records`).

`--profile` also runs `--steps` logged steps under cProfile and prints the
Python function calls per logged step: all of them, and those in tb-diag's
own modules; then the top functions by call count. A logger whose cost follows
bytes has a count that does not grow with `--tensors` (compare 500 and 5000).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import tempfile
import time

import torch
from torch import nn

from tb_diag_logger import Diagnostics
from tb_diag_plugin import summary


class ManyTensors(nn.Module):
    """`n` parameter tensors of shape (side, side); forward: x through all of them at once, then summed."""

    def __init__(self, n: int, numel: int) -> None:
        super().__init__()
        side = max(1, int(round(numel ** 0.5)))
        self.side = side
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(side, side) / side ** 0.5) for _ in range(n)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.stack(tuple(self.weights))  # [n, side, side]: one kernel, one backward
        return torch.relu(torch.einsum("bi,nij->bnj", x, w)).pow(2).mean()


def make_optimizer(kind: str, params) -> torch.optim.Optimizer:
    """fused: on CPU torch's default is a Python loop over the tensors, which would swamp the bare step."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3, fused=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return torch.optim.SGD(params, lr=1e-3, fused=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=5000)
    ap.add_argument("--numel", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per block")
    ap.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adam")
    ap.add_argument("--no-activations", action="store_true", help="Diagnostics(..., activations=False)")
    ap.add_argument("--profile", action="store_true", help="Python calls per logged step (cProfile)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time steps by this thread's CPU time (time.thread_time), not wall time: on a shared "
                         "machine other processes' time slices then do not count (cache contention still does); "
                         "torch's second thread is not counted, and these tensors are too small to use it")
    ap.add_argument("--tensorboard-crc", action="store_true",
                    help="also time a block with TensorBoard's own (pure-Python) record checksums")
    ap.add_argument("--impl", default=None, help="Diagnostics(impl=...): flat, stream or foreach")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = ManyTensors(args.tensors, args.numel)
    opt = make_optimizer(args.optimizer, model.parameters())
    x = torch.randn(8, model.side)
    root = tempfile.mkdtemp(prefix="many_tensors_")
    state = {"step": 0}
    clock = time.thread_time if args.cpu_time else time.perf_counter

    def train(n: int, diag=None) -> list[float]:
        times = []
        for _ in range(n):
            t0 = clock()
            opt.zero_grad()
            loss = model(x)
            loss.backward()
            if diag is not None:
                diag.step(state["step"], loss=loss)
            opt.step()
            times.append(clock() - t0)
            state["step"] += 1
        return times

    def attach(tag: str) -> Diagnostics:
        return Diagnostics(model, logdir=os.path.join(root, tag), every=1, optimizer=opt,
                           activations=not args.no_activations, impl=args.impl)

    def logged_block(tag: str) -> float:
        diag = attach(tag)
        train(2, diag)  # one-off costs
        logged = statistics.median(train(args.steps, diag))
        diag.close()
        return logged

    fast_crc = summary.FAST_CRC
    train(5)  # the optimizer's state exists before anything is measured
    bare_rounds, logged_rounds, tb_crc_rounds = [], [], []
    for r in range(args.rounds):
        bare = statistics.median(train(args.steps))
        logged = logged_block(f"r{r}")
        bare_rounds.append(bare)
        logged_rounds.append(logged)
        extra = ""
        if args.tensorboard_crc:
            summary.FAST_CRC = False  # fast_records then leaves the writer as TensorBoard made it
            try:
                tb_crc = logged_block(f"r{r}_tbcrc")
            finally:
                summary.FAST_CRC = fast_crc
            tb_crc_rounds.append(tb_crc)
            extra = f", with TensorBoard's CRC {tb_crc * 1e3:.2f} ms"
        print(f"round {r}: bare {bare * 1e3:.2f} ms, every=1 {logged * 1e3:.2f} ms, "
              f"cost {(logged - bare) * 1e3:.2f} ms per logged step{extra}", flush=True)
    bare, logged = statistics.median(bare_rounds), statistics.median(logged_rounds)
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(root, "r0")) for f in fs)
    cost = logged - bare
    n_params = sum(p.numel() for p in model.parameters())
    elt = next(model.parameters()).element_size()
    state_tensors = 2 if args.optimizer in ("adam", "adamw") else 0
    read = n_params * elt * (2 + state_tensors)  # gradients, weights, exp_avg, exp_avg_sq
    print(f"\n{args.tensors} tensors x {args.numel} elements ({n_params} parameters), {args.optimizer}, "
          f"activations {'off' if args.no_activations else 'on'}, {args.rounds} rounds x {args.steps} steps")
    print(f"bare step {bare * 1e3:.2f} ms; every=1 step {logged * 1e3:.2f} ms ({logged / bare:.2f}x); "
          f"cost {cost * 1e3:.2f} ms per logged step, {cost / args.tensors * 1e6:.2f} us per tensor")
    print(f"a logged step reads {read / 1e6:.2f} MB (gradients, weights"
          f"{', Adam state' if state_tensors else ''}) and writes {written / (args.steps + 2) / 1e3:.1f} kB of events")
    if tb_crc_rounds:
        tb_crc = statistics.median(tb_crc_rounds)
        print(f"with TensorBoard's own record checksums: every=1 step {tb_crc * 1e3:.2f} ms, cost "
              f"{(tb_crc - bare) * 1e3:.2f} ms per logged step")
    if args.profile:
        profile(train, attach, args.steps)


def profile(train, attach, steps: int) -> None:
    diag = attach("profile")
    train(2, diag)
    prof = cProfile.Profile()
    prof.enable()
    train(steps, diag)
    prof.disable()
    diag.close()
    stats = pstats.Stats(prof)
    total = ours = 0
    rows = []
    for (path, line, func), (_, ncalls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        total += ncalls
        mine = "tb_diag" in path or os.sep + "logger" + os.sep in path
        ours += ncalls if mine else 0
        rows.append((ncalls, f"{os.path.basename(path)}:{line}({func})"))
    print(f"\nPython calls per logged step (with the bare step's own): {total / steps:.0f}; "
          f"in tb-diag's modules: {ours / steps:.0f}")
    for ncalls, where in sorted(rows, reverse=True)[:15]:
        print(f"  {ncalls / steps:9.0f}  {where}")


if __name__ == "__main__":
    main()
