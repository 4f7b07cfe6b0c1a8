"""The findings of a big run computed the way TensorBoard does, with their time and peak memory (issue 24).

    python benchmarks/findings_scale.py --logdir /work/data/big20k [--cache-mb 1024 64] [--baseline COMMIT]
                                        [--tracemalloc] [--reps 1]

For each cache budget (`--diagnostics_cache_mb`) and each version of the
plugin (this tree, and with `--baseline` that commit in a temporary git
worktree), a process of its own starts TensorBoard in-process (Rust data
server, `--diagnostics_preload false`, so nothing is read before the request),
waits until the data server has every step of the run, then asks `/findings`
once (the blocking form: the store reads the rules' inputs and runs every
rule). Reported per computation: its wall time, TensorBoard's resident memory
before it and the peak during it (VmHWM from /proc/self/status, reset just
before the request through /proc/self/clear_refs, and a sampler at 20 ms as a
check), the number of findings and a digest of the answer's findings (equal
digests: the same findings). With `--tracemalloc`, the peak of the memory
Python and numpy allocated during the request (tracemalloc slows the rules;
its time is not the time reported without it). The logdir holds one run
named `run`, written by `benchmarks/eventgen.write_diagnostics_run`.
Results: benchmarks/results/findings_scale.json.

    python benchmarks/findings_scale.py --rules-only 2000x5000

The rules alone, in this process, on a healthy run held in memory (eventgen's
values without their NaN and spikes, so that no NaN cutoff shortens what the
rules judge): tracemalloc's peak over the whole analysis and per rule, against
the size of one per-tensor metric, and the findings' digest.

    python benchmarks/findings_scale.py --write-healthy /work/data/h20k --size 20000x5000

Writes that healthy run (eventgen's run with its planted NaN and spikes
replaced by 1.0) as DIR/run, for `--logdir DIR`: on a healthy run the rules
judge every row, which is the most the findings hold.

    python benchmarks/findings_scale.py --spikes 2000x4040

`gradient_spike`'s per-tensor pass on noisy norms with planted spikes:
`column_spikes` (every tensor at once) against `spikes` called per tensor (the
loop it replaced), the same spikes found by both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUN = "run"


def _status() -> dict[str, float]:
    """This process's VmRSS and VmHWM, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(line.split()[1]) / 1024.0
    return out


def _reset_peak() -> bool:
    """Reset VmHWM to the current resident size (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _digest(findings: list[dict]) -> str:
    """What identifies the findings: kind, severity, layers, steps, message, suggestion, marked steps."""
    keep = [[f["kind"], f["severity"], f["layers"], f["first_step"], f["last_step"], f["message"],
             f["suggestion"], f.get("steps")] for f in findings]
    return hashlib.sha256(json.dumps(keep).encode()).hexdigest()[:16]


def _child(args) -> None:
    sys.path[:0] = [args.tree, os.path.join(args.tree, "tests"), HERE]
    from reading import _wait_loaded

    import tbserver

    extra = ["--diagnostics_preload", "false", "--diagnostics_cache_mb", str(args.cache_mb)]
    with tbserver.serve_with_plugin(args.logdir, load_fast=True, extra=extra) as (srv, plugin):
        steps, layers = (int(x) for x in args.size.split("x"))
        load_s = _wait_loaded(plugin.store.provider, "diag", steps, layers, timeout=1800)
        time.sleep(2.0)  # TensorBoard's own start-up work settles
        before = _status()
        peak = [before["VmRSS"]]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                peak[0] = max(peak[0], _status()["VmRSS"])

        sampler = threading.Thread(target=sample, daemon=True)
        reset = _reset_peak()
        if args.tracemalloc:
            import tracemalloc

            tracemalloc.start()
        sampler.start()
        t = time.perf_counter()
        status, body, _ = srv.get("data/plugin/diagnostics/" + f"findings?run={RUN}", timeout=1800)
        seconds = time.perf_counter() - t
        traced = None
        if args.tracemalloc:
            traced = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        done.set()
        sampler.join()
        after = _status()
        assert status == 200, (status, body[:300])
        answer = json.loads(body)
    result = {"load_s": round(load_s, 1), "findings_s": round(seconds, 2), "rss_before_mib": round(before["VmRSS"]),
              "peak_mib": round(after["VmHWM"]) if reset else None, "peak_sampled_mib": round(peak[0]),
              "rss_after_mib": round(after["VmRSS"]), "tracemalloc_peak_mib": traced and round(traced),
              "findings": len(answer["findings"]), "kinds": sorted({f["kind"] for f in answer["findings"]}),
              "digest": _digest(answer["findings"])}
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(tree: str, args, cache_mb: int, tracemalloc: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tree", tree, "--logdir", args.logdir,
           "--size", args.size, "--cache-mb", str(cache_mb)] + (["--tracemalloc"] if tracemalloc else [])
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env, cwd=tree)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{tree}: no result\n{p.stderr[-3000:]}")


def rules_only(size: str) -> dict:
    """tracemalloc's peak of `findings.analyze` on a healthy STEPSxTENSORS run held in memory, whole and per rule."""
    import dataclasses
    import tracemalloc

    import numpy as np

    sys.path.insert(0, HERE)
    import eventgen

    from tb_diag_plugin import findings, metadata
    from tb_diag_plugin.findings.registry import ORDER
    from tb_diag_plugin.series import Series

    steps_n, width = (int(x) for x in size.split("x"))
    steps = np.arange(steps_n, dtype=np.int64)
    names = eventgen.layer_names(width)

    def series(metric: str, layers: list[str], values: np.ndarray) -> Series:
        return Series(metric, layers, [""] * len(layers), steps, values.astype(np.float32),
                      np.broadcast_to(np.True_, values.shape))

    run = {m: series(m, names, healthy_values(m, steps, width))
           for m in ("grad_norm", "grad_nonfinite", "weight_norm", "update_ratio")}
    run["grad_norm_total"] = series("grad_norm_total", [""], np.sqrt(
        (run["grad_norm"].values.astype(np.float64) ** 2).sum(axis=1, keepdims=True)))
    run["learning_rate"] = series("learning_rate", [""], np.full((steps_n, 1), 0.1))
    run["loss"] = series("loss", [metadata.TOTAL_LOSS], (2.0 / (1 + steps / 500))[:, None])
    peaks: list[tuple[str, float]] = []

    def measured(rule):
        def check(ctx, _check=rule.check):
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            _check(ctx)
            peaks.append((rule.name, (tracemalloc.get_traced_memory()[1] - held) / 2**20))
        return dataclasses.replace(rule, check=check)

    out = {"size": size, "metric_mib": round(run["grad_norm"].values.nbytes / 2**20, 1)}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        t = time.perf_counter()
        found, _ = findings.analyze(run)
        out["seconds_traced"] = round(time.perf_counter() - t, 2)
        out["peak_mib"] = round((tracemalloc.get_traced_memory()[1] - before) / 2**20, 1)
        findings.analyze(run, rules=[measured(r) for r in ORDER])
    finally:
        tracemalloc.stop()
    out["kinds"] = sorted({f.kind for f in found})
    out["digest"] = _digest([f.to_dict(RUN) for f in found])  # equal digests: the same findings
    out["per_rule_mib"] = {name: round(p, 1) for name, p in peaks if p >= 1.0}
    print(json.dumps(out, indent=1))
    return out


def healthy_values(metric: str, steps, width: int):
    """`eventgen.metric_values` without its planted NaN and spikes (replaced by 1.0): a healthy run's."""
    sys.path.insert(0, HERE)
    import eventgen

    return _unplanted(metric, eventgen.metric_values(metric, steps, width))


def _unplanted(metric: str, v):
    import numpy as np

    v[~np.isfinite(v)] = 1.0
    if metric == "grad_norm":
        v[v > 5.0] = 1.0  # eventgen's planted spikes: a healthy run has none
    return v


def write_healthy(logdir: str, size: str) -> None:
    """`eventgen.write_diagnostics_run` at LOGDIR/run with `healthy_values`."""
    sys.path.insert(0, HERE)
    import eventgen

    steps_n, width = (int(x) for x in size.split("x"))
    planted = eventgen.metric_values
    eventgen.metric_values = lambda m, steps, n: _unplanted(m, planted(m, steps, n))
    try:
        t = time.perf_counter()
        written = eventgen.write_diagnostics_run(os.path.join(logdir, RUN), steps_n, width)
    finally:
        eventgen.metric_values = planted
    print(f"{logdir}/{RUN}: {written / 1e6:,.0f} MB of events in {time.perf_counter() - t:.0f} s")


def spike_pass(size: str) -> dict:
    """Seconds of gradient_spike's per-tensor pass at STEPSxTENSORS, every tensor at once and one at a time."""
    import numpy as np

    from tb_diag_plugin.findings.rules.spikes import column_spikes, spikes
    from tb_diag_plugin.findings.thresholds import Thresholds

    n, width = (int(x) for x in size.split("x"))
    rng = np.random.default_rng(1)
    v = np.exp(rng.normal(0, 0.3, (n, width)) - np.log1p(np.arange(n) / 200)[:, None])
    v[rng.random(v.shape) < 1e-4] *= 1000.0
    v[rng.random(v.shape) < 1e-5] = np.nan
    th = Thresholds()
    t = time.perf_counter()
    together = column_spikes(v, th, draws=width)
    at_once = time.perf_counter() - t
    t = time.perf_counter()
    alone = {j: s for j in range(width) if (s := spikes(v[:, j], th, draws=width))}
    per_tensor = time.perf_counter() - t
    assert together == alone
    out = {"size": size, "all_at_once_s": round(at_once, 2), "per_tensor_s": round(per_tensor, 2),
           "tensors_with_spikes": len(alone), "spikes": sum(map(len, alone.values()))}
    print(json.dumps(out))
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--logdir", help="a logdir with one run named 'run'")
    ap.add_argument("--rules-only", metavar="STEPSxTENSORS", help="the rules alone on a healthy run in memory")
    ap.add_argument("--spikes", metavar="STEPSxTENSORS", help="gradient_spike's per-tensor pass, old and new")
    ap.add_argument("--write-healthy", metavar="DIR", help="write a healthy run of --size as DIR/run")
    ap.add_argument("--size", default="20000x5000", metavar="STEPSxTENSORS", help="the run's size (to wait for)")
    ap.add_argument("--cache-mb", type=int, nargs="+", default=[1024, 64])
    ap.add_argument("--baseline", default=None, metavar="COMMIT", help="compare with this commit's plugin")
    ap.add_argument("--tracemalloc", action="store_true", help="also one computation per version under tracemalloc")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "findings_scale.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    if args.child:
        args.cache_mb = args.cache_mb[0]
        _child(args)
        return {}
    if args.rules_only:
        return rules_only(args.rules_only)
    if args.spikes:
        return spike_pass(args.spikes)
    if args.write_healthy:
        write_healthy(args.write_healthy, args.size)
        return {}
    if not args.logdir:
        ap.error("--logdir is required (or --rules-only)")
    versions = {"this tree": ROOT}
    tmp = None
    if args.baseline:
        tmp = tempfile.mkdtemp(prefix="tb-diag-baseline-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tmp, args.baseline], check=True,
                       capture_output=True)
        versions[f"baseline {args.baseline}"] = tmp
    code = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    res: dict[str, Any] = {"command": "python benchmarks/findings_scale.py " + " ".join(argv or sys.argv[1:]),
                           "code": code, "size": args.size, "loadavg_start": os.getloadavg(), "runs": []}
    try:
        names = list(versions)
        plan = [(mb, False) for mb in args.cache_mb for _ in range(args.reps)]
        plan += [(args.cache_mb[-1], True)] if args.tracemalloc else []
        for i, (mb, traced) in enumerate(plan):
            for name in names if i % 2 == 0 else names[::-1]:  # alternate, so drift hits both
                r = _run_child(versions[name], args, mb, traced)
                r.update(version=name, cache_mb=mb, tracemalloc=traced)
                res["runs"].append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tmp], capture_output=True)
    res["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{args.size}: /findings computed once per row (one process each; shared machine, load "
          f"{res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f})")
    print("| version | cache budget | time | resident before | peak (VmHWM) | tracemalloc peak | findings | digest |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res["runs"]:
        traced = " (traced)" if r["tracemalloc"] else ""
        print(f"| {r['version']} | {r['cache_mb']} MiB | {r['findings_s']:.1f} s{traced}"
              f" | {r['rss_before_mib']} MiB | {r['peak_mib']} MiB (sampled {r['peak_sampled_mib']}) | "
              f"{r['tracemalloc_peak_mib'] or '-'} | {r['findings']} | {r['digest']} |")
    return res


if __name__ == "__main__":
    main()
