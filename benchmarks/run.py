"""The whole benchmark: training overhead, then reading, then benchmarks/RESULTS.md.

    python benchmarks/run.py            # full: about 15 minutes on 2 cores
    python benchmarks/run.py --quick    # a short validation run (results/*-quick.json, results/RESULTS-quick.md)
    python benchmarks/run.py --device cuda --skip-reading   # GPU figures, recorded separately

RESULTS.md is rewritten from the JSON in benchmarks/results/; any text below
the line `<!-- hand-written below -->` is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import report  # noqa: E402

KEEP_MARK = "<!-- hand-written below -->"


def _load(path: str) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _git_state() -> str:
    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "logger", "tb_diag_plugin"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    import hashlib

    h = hashlib.sha1()
    for sub in ("logger", "tb_diag_plugin"):
        d = os.path.join(root, sub)
        for name in sorted(os.listdir(d)):
            if name.endswith(".py"):
                with open(os.path.join(d, name), "rb") as f:
                    h.update(name.encode() + f.read())
    state = head + (" with uncommitted changes in logger/ or tb_diag_plugin/" if dirty else "")
    return f"{state} (sha1 of logger/*.py + tb_diag_plugin/*.py as measured: {h.hexdigest()[:12]})"


def _mem_gb() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return f"{kb / 1024 / 1024:.0f} GB"
    except (OSError, ValueError, IndexError):
        return "?"


def write_results(quick: bool) -> str:
    suffix = "-quick" if quick else ""
    res_dir = os.path.join(HERE, "results")
    cpu = _load(os.path.join(res_dir, f"overhead-cpu{suffix}.json"))
    cuda = _load(os.path.join(res_dir, f"overhead-cuda{suffix}.json"))
    rd = _load(os.path.join(res_dir, f"reading{suffix}.json"))
    path = os.path.join(res_dir, "RESULTS-quick.md") if quick else os.path.join(HERE, "RESULTS.md")
    kept = ""
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
        if KEEP_MARK in text:
            kept = text[text.index(KEEP_MARK):]
    m = (cpu or cuda or {}).get("machine", {})
    lines = [
        "# Benchmark results" + (" (quick validation run: too few rounds to trust)" if quick else ""),
        "",
        "Written by `python benchmarks/run.py" + (" --quick" if quick else "") + "` from the JSON in "
        "`benchmarks/results/`. How the figures are made: [README.md](README.md)."
        if not quick else "`benchmarks/results/`.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {_mem_gb()} RAM; "
        f"`torch.set_num_threads({m.get('threads', 2)})`",
        f"- Python {m.get('python', '?')}, torch {m.get('torch', '?')}, tensorboard {m.get('tensorboard', '?')}, "
        f"numpy {m.get('numpy', '?')}; {(cpu or {}).get('wandb', 'wandb: not measured')}",
        *(f"- Code of the {what} run: git {r['code']}" for what, r in (("overhead", cpu), ("CUDA overhead", cuda),
                                                                        ("reading", rd)) if r and r.get("code")),
        *([f"- Code: git {_git_state()}"] if not any(r and r.get("code") for r in (cpu, cuda, rd)) else []),
        f"- Date: {m.get('date', '?')}",
    ]
    if cpu:
        lines.append(f"- Load average (1/5/15 min) during the overhead run: start {_la(cpu.get('loadavg_start'))}, "
                     f"end {_la(cpu.get('loadavg_end'))}")
    if rd:
        lines.append(f"- Load average during the reading run: start {_la(rd.get('loadavg_start'))}, "
                     f"end {_la(rd.get('loadavg_end'))}")
    lines += ["", "## Commands", ""]
    for r in (cpu, cuda, rd):
        if r:
            lines.append(f"- `{r['command'].strip()}` ({r.get('mode')}"
                         + (f", {r['seconds']:.0f} s" if r.get("seconds") else "") + ")")
    lines += ["", "## Targets (issue 6 and issue 4's Scale)", ""]
    rows = []
    if cpu:
        rows += report.overhead_targets(cpu)
    if rd:
        rows += report.reading_targets(rd)
    lines.append(report.targets_table(rows) if rows else "(no results yet)\n")
    if cpu:
        lines += ["## Training overhead, CPU", "", _overhead_legend(), "", report.overhead_tables(cpu)]
    if cuda:
        lines += [f"## Training overhead, CUDA ({cuda['machine'].get('gpu', '?')})", "", report.overhead_tables(cuda),
                  "", "CUDA targets:", "", report.targets_table(report.overhead_targets(cuda))]
    else:
        lines += ["## Training overhead, CUDA", "",
                  "Not measured: no GPU on this machine. `python benchmarks/run.py --device cuda --skip-reading` "
                  "records them (steps are timed between `torch.cuda.synchronize()` calls).", ""]
    if rd:
        lines += ["## Reading big runs", "", report.reading_tables(rd)]
        if rd.get("python_scalar_events_per_s"):
            lines.append(f"The Python loader read the per-layer scalars at "
                         f"{rd['python_scalar_events_per_s']:,.0f} events/s (it checks each record's CRC-32C "
                         "in pure Python).")
            lines.append("")
    text = "\n".join(lines).rstrip() + "\n\n" + (kept or KEEP_MARK + "\n")
    with open(path, "w") as f:
        f.write(text)
    return path


def _la(v) -> str:
    return "?" if not v else " / ".join(f"{x:.2f}" for x in v)


def _overhead_legend() -> str:
    return (
        "*Ratio (block means)*: mean step time of an arm's block over the mean of the bare block in the same "
        "round; median [min–max] over rounds. *Ratio from medians*: the same from per-step medians "
        "(((every-1) x non-logged + logged) / (every x bare)), which shrugs off steps slowed by other "
        "processes. *Logged step: extra ms*: median logged-step time minus the bare median, per round. "
        "*Non-logged step ratio*: median non-logged step over median bare step. *bare (A/A)* is a second bare "
        "copy: its spread is the noise floor of every ratio."
    )


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-reading", action="store_true")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md from the JSON only")
    args = ap.parse_args(argv)
    t = time.perf_counter()
    flags = ["--quick"] if args.quick else []
    if not args.report_only:
        if not args.skip_overhead:
            subprocess.run([sys.executable, os.path.join(HERE, "overhead.py"), "--device", args.device, *flags],
                           check=True)
        if not args.skip_reading:
            subprocess.run([sys.executable, os.path.join(HERE, "reading.py"), *flags], check=True)
    path = write_results(args.quick)
    print(f"wrote {path} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
