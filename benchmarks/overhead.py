"""What logging diagnostics costs a training step (issue 6, items 1-4).

Three models (benchmarks/models.py), one process, `torch.set_num_threads(2)`.
All ways of logging ("arms") take turns on one model and one optimizer: a
round runs one block of steps of every arm, in a rotating order. An arm's
instrumentation is attached for its block only (a new `Diagnostics`, a
`wandb.watch`) and removed after it (`close()`, `wandb.unwatch`), so no
hook runs in another arm's steps; two untimed steps after attaching take the
one-off costs (metadata and structure written once, update-ratio buffers
allocated once) that a long training pays once. (Separate model copies were
tried first: their memory placement alone made identical bare copies differ
by up to 10 %.) Each step is timed on its own (between
`torch.cuda.synchronize()` calls on a GPU) and compared with the bare block
of the same round, so slow drift of the machine cancels. Figures are medians
over rounds with min and max.

    python benchmarks/overhead.py [--quick] [--device cpu|cuda] [--out FILE]

Arms, at the Diagnostics default cadence unless marked every=1:

    bare            a plain step (zero_grad, forward, loss, backward, opt.step)
    bare (A/A)      a second bare copy: the noise floor of a ratio
    diag            Diagnostics(model, writer, optimizer=opt), all metrics on
    diag, no act.   the same with activations=False
    add_scalar      writer.add_scalar(f"grad_norm/{name}", p.grad.norm().item(), step) per parameter
    add_histogram   writer.add_histogram(f"grad/{name}", p.grad, step) per parameter
    .item()         p.grad.norm().item() per parameter, nothing written (on a GPU, a sync each)
    wandb.watch     wandb.watch(model, log="all", log_freq=every), offline, plus wandb.log of the loss
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import signal
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import models
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics
from tb_diag_logger.diagnostics import DEFAULT_EVERY


def _code_state() -> str:
    """The git commit measured (see run._git_state)."""
    from run import _git_state

    return _git_state()

HERE = os.path.dirname(os.path.abspath(__file__))
WARMUP = 2  # untimed steps after attaching an arm


# ------------------------------------------------------------------ arms
@dataclass
class Arm:
    key: str
    label: str
    every: int
    kind: str  # bare | diag | diag_noact | diag_noupd | diag_quiet | add_scalar | add_histogram | item | wandb | floor
    model: Any = None
    opt: Any = None
    writer: Any = None
    diag: Any = None
    step: int = 0
    since_attach: int = 0
    logdir: str = ""
    times: list = field(default_factory=list)  # per round: [seconds per step]
    logged: list = field(default_factory=list)  # per round: [bool per step]

    def is_logged(self, step: int) -> bool:
        if self.kind == "bare":
            return False
        if self.kind == "wandb":  # wandb counts forwards since watch() and logs on the every-th
            return (self.since_attach + 1) % self.every == 0
        return step % self.every == 0


def build_arms(every: int, with_wandb: bool) -> list[Arm]:
    arms = [
        Arm("bare", "bare", every, "bare"),
        Arm("bare2", "bare (A/A)", every, "bare"),
        Arm("diag", f"Diagnostics, every={every}", every, "diag"),
        Arm("diag_noact", f"Diagnostics, every={every}, activations off", every, "diag_noact"),
        Arm("add_scalar", f"add_scalar per parameter, every={every}", every, "add_scalar"),
        Arm("add_histogram", f"add_histogram per parameter, every={every}", every, "add_histogram"),
        Arm("item", f".item() per parameter, every={every}", every, "item"),
    ]
    if with_wandb:
        arms.append(Arm("wandb", f"wandb.watch(log='all'), every={every}", every, "wandb"))
    arms += [
        Arm("diag1", "Diagnostics, every=1", 1, "diag"),
        Arm("diag1_noact", "Diagnostics, every=1, activations off", 1, "diag_noact"),
        Arm("diag1_noupd", "Diagnostics, every=1, update_ratio off", 1, "diag_noupd"),
        # What the floor arms do and no more: no activations, no findings in the training process (alert=None:
        # nothing listens, so the rules do not run during training; they take up to 2 % of the wall time).
        Arm("diag1_quiet", "Diagnostics, every=1, activations off, alert=None", 1, "diag_quiet"),
        # The memory-traffic floor of every=1 (no activations): the fewest passes torch offers over the
        # parameters for what the logger records of them (gradient norms and max |g|, weight norms, the
        # update ratio), one host copy.
        Arm("floor1", "floor: norms + update ratio by hand, every=1", 1, "floor"),
        # The same plus the fewest passes over Adam's state for adam_eps_fraction and update_rms (sqrt(v),
        # m / (sqrt(v) + eps), its norm, the count below eps): what `diag1_noact` must do on an Adam model.
        Arm("floor1_adam", "floor + Adam state by hand, every=1", 1, "floor_adam"),
    ]
    return arms


def setup_arm(arm: Arm, root: str) -> None:
    arm.logdir = os.path.join(root, arm.key)
    if arm.kind in ("diag", "diag_noact", "diag_noupd", "diag_quiet", "add_scalar", "add_histogram"):
        arm.writer = SummaryWriter(arm.logdir)


def attach(arm: Arm, model: torch.nn.Module, opt: torch.optim.Optimizer, wandb_mod) -> None:
    arm.model, arm.opt, arm.since_attach = model, opt, 0
    # Start at a logged step: the untimed warm-up steps take the one-off costs.
    arm.step = -(-arm.step // arm.every) * arm.every
    if arm.kind in ("diag", "diag_noact", "diag_noupd", "diag_quiet"):
        arm.diag = Diagnostics(model, arm.writer, every=arm.every, optimizer=opt,
                               activations=arm.kind not in ("diag_noact", "diag_quiet"),
                               update_ratio=arm.kind != "diag_noupd",
                               alert=None if arm.kind == "diag_quiet" else "error")
    if arm.kind == "wandb":
        wandb_mod.watch(model, log="all", log_freq=arm.every)
    if arm.kind in ("floor", "floor_adam"):  # buffers allocated once: fresh parameter-sized tensors page-fault
        arm.floor_params = [p for p in model.parameters() if p.requires_grad]
        arm.floor_bufs = [torch.empty_like(p) for p in arm.floor_params]


def detach(arm: Arm, wandb_mod) -> None:
    if arm.diag is not None:
        arm.diag.close()
        arm.diag = None
    if arm.kind == "wandb":
        wandb_mod.unwatch(arm.model)


def after_backward(arm: Arm, step: int, loss: torch.Tensor, wandb_mod) -> None:
    """What each arm does between backward() and opt.step()."""
    k = arm.kind
    if k == "bare":
        return
    if k in ("diag", "diag_noact", "diag_noupd", "diag_quiet"):
        arm.diag.step(step, loss=loss)
        return
    if not arm.is_logged(step):
        return
    named = [(n, p) for n, p in arm.model.named_parameters() if p.grad is not None]
    if k == "add_scalar":
        for n, p in named:
            arm.writer.add_scalar(f"grad_norm/{n}", p.grad.norm().item(), step)
    elif k == "add_histogram":
        for n, p in named:
            arm.writer.add_histogram(f"grad/{n}", p.grad, step)
    elif k == "item":
        arm.item_sink = [p.grad.norm().item() for _, p in named]
    elif k in ("floor", "floor_adam"):
        with torch.no_grad():  # one pass over the gradients, one over the weights while snapshotting them
            grads = [p.grad for p in arm.floor_params]
            arm.floor_norms = list(torch._foreach_norm(grads))
            # max |g|: one aminmax per tensor, the fastest torch has on CPU (_foreach_norm(ord=inf) is slower)
            arm.floor_norms += [torch.maximum(hi, -lo) for lo, hi in map(torch.aminmax, grads)]
            torch._foreach_copy_(arm.floor_bufs, arm.floor_params)
            arm.floor_norms += list(torch._foreach_norm(arm.floor_bufs))
            if k == "floor_adam":
                arm.floor_norms += floor_adam_state(arm.opt, arm.floor_params)
    elif k == "wandb":
        wandb_mod.log({"loss": loss.item()})


def floor_adam_state(opt: torch.optim.Optimizer, params: list) -> list:
    """Per tensor with Adam state: ||m / (sqrt(v) + eps)|| and the count of sqrt(v) < eps, by the fewest
    torch passes (bias corrections are per-tensor scalars and cost nothing at this size)."""
    held = [p for p in params if p in opt.state and "exp_avg_sq" in opt.state[p]]
    if not held:
        return []
    eps = opt.param_groups[0].get("eps", 1e-8)
    root = torch._foreach_sqrt([opt.state[p]["exp_avg_sq"] for p in held])
    below = [(r < eps).sum() for r in root]
    torch._foreach_add_(root, eps)
    norms = torch._foreach_norm(torch._foreach_div([opt.state[p]["exp_avg"] for p in held], root))
    return list(norms) + below


def after_step(arm: Arm) -> None:
    """What the floor arm does after opt.step(): ||w - w_old|| (one pass over weights and snapshot), one host copy."""
    if arm.kind not in ("floor", "floor_adam"):
        return
    with torch.no_grad():
        torch._foreach_sub_(arm.floor_bufs, arm.floor_params)  # in the snapshot: new tensors would page-fault
        delta = torch._foreach_norm(arm.floor_bufs)
        torch.stack(arm.floor_norms + list(delta)).cpu()


def run_block(arm: Arm, workload, batches, n_steps: int, sync: Callable[[], None], wandb_mod,
              timed: bool = True) -> None:
    times, logged = [], []
    for _ in range(n_steps):
        x, y = batches[arm.step % len(batches)]
        sync()
        t0 = time.perf_counter()
        arm.opt.zero_grad()
        loss = workload.loss(arm.model(x), y)
        loss.backward()
        after_backward(arm, arm.step, loss, wandb_mod)
        arm.opt.step()
        after_step(arm)
        sync()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        logged.append(arm.is_logged(arm.step))
        arm.step += 1
        arm.since_attach += 1
    if arm.writer is not None:
        arm.writer.flush()  # waits for the writer thread: its work stays in this block
    if timed:
        arm.times.append(times)
        arm.logged.append(logged)


# ---------------------------------------------------------------- statistics
def _stats(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and np.isfinite(x)]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# A round whose bare steps (either bare copy) ran this much slower than in the fastest
# round was disturbed by other processes: on 2 cores another busy process makes each
# of torch's parallel regions wait for a descheduled thread, and small ops (the
# logger's) suffer far more than big ones, so such rounds are left out of the figures.
DISTURBED = 1.25


def clean_rounds(arms: list[Arm]) -> list[int]:
    bares = [a for a in arms if a.kind == "bare"]
    meds = [[statistics.median(t) for t in a.times] for a in bares]
    best = min(min(m) for m in meds)
    keep = [r for r in range(len(meds[0])) if all(m[r] <= DISTURBED * best for m in meds)]
    return keep if len(keep) >= min(3, len(meds[0])) else list(range(len(meds[0])))


def summarise(arms: list[Arm], rounds: Optional[list[int]] = None) -> dict:
    """Figures over the given rounds (default: the undisturbed ones)."""
    bare = arms[0]
    by_key = {a.key: a for a in arms}
    if rounds is None:
        rounds = clean_rounds(arms)
    bare_med = {r: statistics.median(bare.times[r]) for r in rounds}
    bare_mean = {r: statistics.fmean(bare.times[r]) for r in rounds}
    out = {
        "bare_step_ms": _stats([bare_med[r] * 1e3 for r in rounds]),
        "rounds_used": rounds,
        "rounds_run": len(bare.times),
        "arms": {},
    }
    for arm in arms[1:]:
        ratio, logged_ms, nonlogged_ratio = [], [], []
        for r in rounds:
            t = arm.times[r]
            lg = arm.logged[r]
            ratio.append(statistics.fmean(t) / bare_mean[r])
            lt = [x for x, f in zip(t, lg) if f]
            nt = [x for x, f in zip(t, lg) if not f]
            if lt:
                logged_ms.append((statistics.median(lt) - bare_med[r]) * 1e3)
            if nt:
                nonlogged_ratio.append(statistics.median(nt) / bare_med[r])
        e = arm.every
        lm = _stats(logged_ms)["median"]
        nr = _stats(nonlogged_ratio)["median"]
        bm = out["bare_step_ms"]["median"]
        robust = None
        if arm.kind != "bare" and lm is not None:
            robust = ((e - 1) * (nr if nr is not None else 1.0) + (bm + lm) / bm) / e
        out["arms"][arm.key] = {
            "label": arm.label,
            "every": e,
            "kind": arm.kind,
            "ratio": _stats(ratio),
            "ratio_from_medians": robust,
            "logged_step_extra_ms": _stats(logged_ms),
            "logged_step_share": (lm / bm) if (lm is not None and bm) else None,
            "nonlogged_ratio": _stats(nonlogged_ratio),
        }
    for floor in ("floor1", "floor1_adam"):
        if floor not in by_key:
            continue
        for arm in arms[1:]:
            if arm.every == 1 and arm.kind.startswith("diag"):
                out["arms"][arm.key][f"vs_{floor}"] = vs_floor(arm, by_key[floor], rounds)
    return out


def vs_floor(arm: Arm, floor: Arm, rounds: list[int]) -> dict:
    """The arm's block mean over the floor arm's of the same round, per round: both ran within minutes of
    each other, so a machine that drifts between rounds moves both (the ratio of two ratios to the bare
    arm carries the bare arm's noise twice). Median, min-max, and the quartiles."""
    ratios = [statistics.fmean(arm.times[r]) / statistics.fmean(floor.times[r]) for r in rounds]
    out = _stats(ratios)
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        out.update(q1=q1, q3=q3)
    return out


# ------------------------------------------------------------ event bytes
def _records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    off = 0
    while off + 12 <= len(data):
        (n,) = struct.unpack_from("<Q", data, off)
        yield data[off + 12 : off + 12 + n]
        off += 16 + n


def _event_files(logdir: str) -> list[str]:
    return sorted(os.path.join(logdir, f) for f in os.listdir(logdir) if f.startswith("events.out.tfevents"))


def event_bytes(arms: list[Arm]) -> dict:
    """Bytes per logged step: Diagnostics against per-layer add_scalar of the same numbers."""
    import eventgen
    from tensorboard.compat.proto import event_pb2

    from tb_diag_plugin import metadata

    by_key = {a.key: a for a in arms}
    out: dict[str, Any] = {}
    diag = by_key["diag"]
    per_step: dict[int, int] = {}
    first_writes: set[int] = set()  # steps that carry metadata or the structure (once per attach)
    scalar_equiv: dict[int, int] = {}
    floats: dict[int, int] = {}
    layers_of: dict[str, tuple[str, tuple[str, ...]]] = {}
    for path in _event_files(diag.logdir):
        for rec in _records(path):
            ev = event_pb2.Event.FromString(rec)
            if not ev.HasField("summary"):
                continue
            per_step[ev.step] = per_step.get(ev.step, 0) + len(rec) + 16
            for v in ev.summary.value:
                if v.metadata.plugin_data.content:
                    first_writes.add(ev.step)
                    pd = metadata.parse_plugin_data(v.metadata.plugin_data.content)
                    layers_of[v.tag] = (pd.metric, pd.layers)
                if v.tag not in layers_of or not v.tensor.tensor_content:
                    continue
                metric, layers = layers_of[v.tag]
                vals = np.frombuffer(v.tensor.tensor_content, dtype="<f4")
                floats[ev.step] = floats.get(ev.step, 0) + vals.size
                scalar_equiv[ev.step] = scalar_equiv.get(ev.step, 0) + sum(
                    len(eventgen.scalar_event(f"{metric}/{layer}" if layer else metric, float(x), ev.step,
                                              ev.wall_time)) + 16
                    for layer, x in zip(layers, vals)
                )
    steady = [s for s in sorted(per_step) if s not in first_writes]
    if steady:
        out["diag_bytes_per_logged_step"] = statistics.median(per_step[s] for s in steady)
        out["diag_first_logged_step_bytes"] = max(per_step[s] for s in first_writes) if first_writes else None
        out["values_per_logged_step"] = statistics.median(floats.get(s, 0) for s in steady)
        out["add_scalar_same_numbers_bytes"] = statistics.median(scalar_equiv.get(s, 0) for s in steady)
    for key in ("add_scalar", "add_histogram"):
        arm = by_key.get(key)
        if arm is None:
            continue
        sizes: dict[int, int] = {}
        for path in _event_files(arm.logdir):
            for rec in _records(path):
                ev = event_pb2.Event.FromString(rec)
                if ev.HasField("summary"):
                    sizes[ev.step] = sizes.get(ev.step, 0) + len(rec) + 16
        if sizes:
            out[f"{key}_bytes_per_logged_step"] = statistics.median(sizes.values())
    return out


# --------------------------------------------------------------------- main
def bench_model(workload, device: torch.device, rounds: int, blocks_per_cadence: int, every: int,
                block_every1: int, wandb_mod, log, only: Optional[list[str]] = None) -> dict:
    torch.manual_seed(0)
    model = workload.build().to(device)
    opt = workload.optimizer(model)
    g = torch.Generator().manual_seed(1)
    batches = [workload.batch(g, device) for _ in range(4)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    arms = build_arms(every, wandb_mod is not None)
    if only:  # the bare arm stays first: every other arm is compared with it
        arms = [a for a in arms if a.key == "bare" or a.key in only]
    root = tempfile.mkdtemp(prefix=f"tbdiag-overhead-{workload.name}-")
    for arm in arms:
        setup_arm(arm, root)
    n_params = sum(1 for _ in model.parameters())
    log(f"{workload.name}: {n_params} tensors, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    attach(arms[0], model, opt, wandb_mod)
    run_block(arms[0], workload, batches, 3, sync, wandb_mod, timed=False)  # optimizer state, allocator
    detach(arms[0], wandb_mod)
    t_start = time.perf_counter()
    for r in range(rounds):
        order = arms[r % len(arms):] + arms[: r % len(arms)]
        for arm in order:
            gc.collect()
            attach(arm, model, opt, wandb_mod)
            run_block(arm, workload, batches, WARMUP, sync, wandb_mod, timed=False)
            n = blocks_per_cadence * arm.every if arm.every > 1 else block_every1
            run_block(arm, workload, batches, n, sync, wandb_mod)
            detach(arm, wandb_mod)
        log(f"  round {r + 1}/{rounds}: bare {statistics.median(arms[0].times[-1]) * 1e3:.1f} ms/step, "
            f"{time.perf_counter() - t_start:.0f} s, load {os.getloadavg()[0]:.2f}")
    for arm in arms:
        if arm.writer is not None:
            arm.writer.close()
    result = summarise(arms)
    result["all_rounds"] = summarise(arms, list(range(rounds)))
    result["raw"] = {a.key: {"every": a.every, "kind": a.kind, "times": a.times, "logged": a.logged} for a in arms}
    result["bytes"] = event_bytes(arms) if any(a.key == "diag" for a in arms) else {}  # bytes: the default cadence
    result.update(
        name=workload.name,
        describe=workload.describe,
        tensors=n_params,
        parameters=sum(p.numel() for p in model.parameters()),
        rounds=rounds,
        block_steps={"cadence": blocks_per_cadence * every, "every1": block_every1},
        seconds=time.perf_counter() - t_start,
    )
    return result


def start_wandb(log) -> tuple[Optional[Any], str]:
    """wandb in offline mode, silent, writing into a temporary folder; (module, note)."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="tbdiag-wandb-"))
    try:
        import wandb
    except ImportError:
        return None, "wandb is not installed (pip install wandb): its arm was skipped"
    try:
        wandb.init(project="tb-diag-bench", mode="offline")
    except Exception as e:  # an install that cannot start offline is reported, not fatal
        log(f"wandb.init failed: {e}")
        return None, f"wandb {wandb.__version__} is installed but wandb.init failed offline: {e}"
    return wandb, f"wandb {wandb.__version__}, offline mode"


def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    try:
        import tensorboard

        info["tensorboard"] = tensorboard.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short validation run (a few rounds)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (figures are recorded per device)")
    ap.add_argument("--every", type=int, default=DEFAULT_EVERY, help="the cadence (default: the logger's)")
    ap.add_argument("--models", default="MLP,CNN,Transformer")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per model (default: by mode)")
    ap.add_argument("--transformer-batch", type=int, default=8)
    ap.add_argument("--transformer-seq", type=int, default=64)
    ap.add_argument("--no-wandb", action="store_true")
    ap.add_argument("--arms", default=None,
                    help="comma-separated arm keys to run beside bare (e.g. bare2,diag,diag1); default: all")
    ap.add_argument("--transformer-optimizer", choices=("adamw", "adam"), default="adamw",
                    help="the Transformer's optimizer (its Adam state is one of the logged metrics)")
    ap.add_argument("--merge", action="store_true",
                    help="keep the figures of models not run now from the existing JSON")
    ap.add_argument("--out", default=None, help="JSON results (default benchmarks/results/overhead-DEVICE.json)")
    args = ap.parse_args(argv)

    # A plain `kill` ends the run through the finally below (wandb's helpers included).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(2)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    wandb_mod, wandb_note = (None, "skipped (--no-wandb)") if args.no_wandb else start_wandb(log)
    log(f"wandb: {wandb_note}")
    rounds_default = {"MLP": 6, "CNN": 5, "Transformer": 3}
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    results = {
        "machine": machine_info(device),
        "mode": "quick" if args.quick else "full",
        "every": args.every,
        "wandb": wandb_note,
        "loadavg_start": os.getloadavg(),
        "command": "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "code": _code_state(),
        "models": {},
    }
    out = args.out or os.path.join(HERE, "results", f"overhead-{device.type}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if args.merge and os.path.exists(out):  # keep the other models' figures from an earlier run
        with open(out) as f:
            earlier = json.load(f)
        results["models"] = {k: v for k, v in earlier.get("models", {}).items() if k not in wanted}
        results["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {k: earlier.get(k) for k in ("command", "loadavg_start", "loadavg_end", "machine")}]
    try:
        for w in models.workloads(args.transformer_batch, args.transformer_seq):
            if w.name not in wanted:
                continue
            if w.name == "Transformer" and args.transformer_optimizer == "adam":
                w = dataclasses.replace(w, optimizer=lambda m: torch.optim.Adam(m.parameters(), lr=1e-4),
                                        describe=w.describe.replace("AdamW", "Adam"))
            rounds = args.rounds or (1 if args.quick else rounds_default[w.name])
            results["models"][w.name] = bench_model(
                w, device, rounds, blocks_per_cadence=1, every=args.every, block_every1=10 if not args.quick else 4,
                wandb_mod=wandb_mod, log=log, only=args.arms.split(",") if args.arms else None,
            )
            results["loadavg_end"] = os.getloadavg()
            with open(out, "w") as f:  # after each model: a run cut short keeps what it measured
                json.dump(results, f, indent=1)
    finally:
        if wandb_mod is not None:
            wandb_mod.finish()  # also stops wandb's helper processes
    log(f"wrote {out}")
    import report

    print(report.overhead_tables(results))
    return results


if __name__ == "__main__":
    main()
