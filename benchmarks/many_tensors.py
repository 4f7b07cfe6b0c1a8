"""Issue 24 point 5: the logger's cost at many small parameter tensors, against a bare twin.

    python benchmarks/many_tensors.py [--tensors 5000] [--numel 16] [--rounds 5] [--steps 20]
                                      [--optimizer adam|adamw|sgd] [--no-activations] [--profile] [--cpu-time]
                                      [--tensorboard-crc] [--floor]

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

`--floor` adds a block per round of `Floor`: the fewest torch calls that read the same tensors for the
same per-tensor numbers (a stack per list, row reductions, one host copy), no logger. Each block also
records the part of its steps from backward's end to the step's end (less the bare block's `opt.step()`):
the logger's and the floor's in-step costs, whose ratio per round is printed.

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


class Floor:
    """The fewest torch calls that read what a logged step must read here: one `torch.stack(out=)` per list
    (gradients, the weights before and after `opt.step()`, Adam's two moments and step counts), row
    reductions of the stacked buffers for the same per-tensor numbers the logger records (gradient norm
    and max |g|, weight norm, update norm, Adam's update RMS and count below eps), one host copy. Every
    tensor here has one shape, so a row is a tensor. What this costs, any logger built on torch pays for
    touching these tensors one by one; the logger's cost is compared with it."""

    def __init__(self, params, opt: torch.optim.Optimizer) -> None:
        self.params, self.opt = list(params), opt
        n, shape = len(self.params), self.params[0].shape
        self.bufs = {k: torch.empty(n, *shape) for k in ("g", "w", "w2", "m", "v")}
        self.rows: list[torch.Tensor] = []

    def _stack(self, key: str, tensors) -> torch.Tensor:
        buf = self.bufs[key]
        return torch.stack(tensors, out=buf).view(buf.shape[0], -1)

    def before_step(self) -> None:
        with torch.no_grad():
            g = self._stack("g", [p.grad for p in self.params])
            w = self._stack("w", self.params)
            self.rows = [g.pow(2).sum(1).sqrt(), g.abs().amax(1), w.pow(2).sum(1).sqrt()]
            state = [self.opt.state[p] for p in self.params]
            if state and "exp_avg_sq" in state[0]:
                eps = self.opt.param_groups[0]["eps"]
                m = self._stack("m", [s["exp_avg"] for s in state])
                root = self._stack("v", [s["exp_avg_sq"] for s in state]).sqrt()
                steps = torch.stack([s["step"] for s in state])
                self.rows += [(root < eps).sum(1).float(), (m / (root + eps)).pow(2).mean(1).sqrt(), steps]

    def after_step(self) -> None:
        with torch.no_grad():
            w2 = self._stack("w2", self.params)
            delta = (w2 - self.bufs["w"].view_as(w2)).pow(2).sum(1).sqrt()
            torch.cat([r.reshape(-1) for r in self.rows] + [delta]).cpu()


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
    ap.add_argument("--floor", action="store_true",
                    help="also time a block of the fewest torch calls reading the same tensors (class Floor)")
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

    def train(n: int, diag=None, floor: Floor | None = None, parts: list | None = None) -> list[float]:
        """Steps' times; `parts` gets each step's (time after backward until opt.step, opt.step onwards)."""
        times = []
        for _ in range(n):
            t0 = clock()
            opt.zero_grad()
            loss = model(x)
            loss.backward()
            t1 = clock()
            if diag is not None:
                diag.step(state["step"], loss=loss)
            if floor is not None:
                floor.before_step()
            t2 = clock()
            opt.step()  # with the logger's optimizer hooks, when attached
            if floor is not None:
                floor.after_step()
            t3 = clock()
            times.append(t3 - t0)
            if parts is not None:
                parts.append((t2 - t1, t3 - t2))
            state["step"] += 1
        return times

    def attach(tag: str) -> Diagnostics:
        return Diagnostics(model, logdir=os.path.join(root, tag), every=1, optimizer=opt,
                           activations=not args.no_activations, impl=args.impl)

    def logged_block(tag: str, parts: list | None = None) -> float:
        diag = attach(tag)
        train(2, diag)  # one-off costs
        logged = statistics.median(train(args.steps, diag, parts=parts))
        diag.close()
        return logged

    def in_step(parts: list, bare_parts: list) -> float:
        """Median time from backward's end to the step's end, less the bare step's (opt.step alone): the
        part of a step the logger (or the floor) adds, without the forward and backward's own noise."""
        return (statistics.median(a + b for a, b in parts)
                - statistics.median(a + b for a, b in bare_parts))

    fast_crc = summary.FAST_CRC
    train(5)  # the optimizer's state exists before anything is measured
    bare_rounds, logged_rounds, tb_crc_rounds, floor_rounds = [], [], [], []
    logged_in_step, floor_in_step = [], []  # per round: the in-step cost of the logger and of the floor
    floor = Floor(model.parameters(), opt) if args.floor else None
    for r in range(args.rounds):
        bare_parts, logged_parts, floor_parts = [], [], []
        bare = statistics.median(train(args.steps, parts=bare_parts))
        logged = logged_block(f"r{r}", logged_parts)
        bare_rounds.append(bare)
        logged_rounds.append(logged)
        logged_in_step.append(in_step(logged_parts, bare_parts))
        extra = f" (in-step {logged_in_step[-1] * 1e3:.2f} ms)"
        if floor is not None:
            train(2, floor=floor)
            floor_rounds.append(statistics.median(train(args.steps, floor=floor, parts=floor_parts)))
            floor_in_step.append(in_step(floor_parts, bare_parts))
            extra += (f", floor {(floor_rounds[-1] - bare) * 1e3:.2f} ms per step "
                      f"(in-step {floor_in_step[-1] * 1e3:.2f})")
        if args.tensorboard_crc:
            summary.FAST_CRC = False  # fast_records then leaves the writer as TensorBoard made it
            try:
                tb_crc = logged_block(f"r{r}_tbcrc")
            finally:
                summary.FAST_CRC = fast_crc
            tb_crc_rounds.append(tb_crc)
            extra += f", with TensorBoard's CRC {tb_crc * 1e3:.2f} ms"
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
    logged_mid = statistics.median(logged_in_step)
    print(f"in-step (backward's end to the step's end, less opt.step alone): {logged_mid * 1e3:.2f} ms per logged "
          f"step, {logged_mid / args.tensors * 1e6:.2f} us per tensor")
    if floor_rounds:
        floor_cost = statistics.median(floor_rounds) - bare
        floor_mid = statistics.median(floor_in_step)
        paired = [lg / f for lg, f in zip(logged_in_step, floor_in_step)]
        print(f"floor (class Floor): {floor_cost * 1e3:.2f} ms per step, in-step {floor_mid * 1e3:.2f} ms "
              f"({floor_mid / args.tensors * 1e6:.2f} us per tensor); the logger's in-step cost / the floor's: "
              f"{logged_mid / floor_mid:.2f} (per round: median {statistics.median(paired):.2f}, "
              f"{min(paired):.2f}-{max(paired):.2f})")
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
