"""Where a logged step's time goes: cProfile of whole training steps, bare and logged.

    python benchmarks/profile_logger.py [--models MLP,CNN,Transformer] [--steps 20] [--top 15]

For each model, profiles `steps` bare steps and `steps` steps of
`Diagnostics(every=1, optimizer=opt)` (all metrics), interleaved, and prints
the functions whose own time grew the most per step: the logger's cost by
torch op and by Python function. CPU only (on a GPU, use torch.profiler).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import tempfile

import models
import torch
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics


def _own_times(prof: cProfile.Profile) -> dict[str, tuple[float, int]]:
    st = pstats.Stats(prof)
    out = {}
    for (file, line, fn), (_, ncalls, tottime, _, _) in st.stats.items():
        where = fn if file == "~" else f"{'/'.join(file.split('/')[-2:])}:{line}({fn})"
        out[where] = (tottime, ncalls)
    return out


def profile(workload, steps: int, top: int, activations: bool) -> None:
    torch.manual_seed(0)
    base = workload.build()
    g = torch.Generator().manual_seed(1)
    x, y = workload.batch(g, torch.device("cpu"))
    bare_m, diag_m = copy.deepcopy(base), copy.deepcopy(base)
    bare_o, diag_o = workload.optimizer(bare_m), workload.optimizer(diag_m)
    writer = SummaryWriter(tempfile.mkdtemp(prefix="tbdiag-prof-"))
    diag = Diagnostics(diag_m, writer, every=1, optimizer=diag_o, activations=activations)
    pb, pd = cProfile.Profile(), cProfile.Profile()

    def step(m, o, prof, i):
        prof.enable()
        o.zero_grad()
        loss = workload.loss(m(x), y)
        loss.backward()
        if m is diag_m:
            diag.step(i, loss=loss)
        o.step()
        prof.disable()

    for i in range(3):  # warm-up: first writes, optimizer state, snapshot buffers
        step(bare_m, bare_o, cProfile.Profile(), i)
        step(diag_m, diag_o, cProfile.Profile(), i)
    for i in range(steps):
        step(bare_m, bare_o, pb, i)
        step(diag_m, diag_o, pd, 3 + i)
    writer.flush()
    b, d = _own_times(pb), _own_times(pd)
    tb = sum(t for t, _ in b.values()) / steps * 1e3
    td = sum(t for t, _ in d.values()) / steps * 1e3
    print(f"\n## {workload.name} (activations {'on' if activations else 'off'}): bare {tb:.1f} ms/step, "
          f"logged {td:.1f} ms/step (+{td - tb:.1f} ms, x{td / tb:.2f}) under cProfile")
    grow = sorted(((d[k][0] - b.get(k, (0.0, 0))[0], k) for k in d), reverse=True)[:top]
    print("| function (own time) | extra ms per logged step | calls per step |")
    print("|---|---|---|")
    for dt, k in grow:
        print(f"| `{k}` | {dt / steps * 1e3:.2f} | {d[k][1] / steps:.0f} |")
    diag.close()
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="MLP,CNN,Transformer")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-activations", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    wanted = args.models.split(",")
    for w in models.workloads(8, 64):
        if w.name in wanted:
            profile(w, args.steps, args.top, not args.no_activations)


if __name__ == "__main__":
    main()
