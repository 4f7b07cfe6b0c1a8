"""Reading big runs back (issue 6 item 5, issue 4 "Scale").

For runs of 1k/10k/20k logged steps x 50/500 parameter tensors, under both
TensorBoard backends (`--load_fast false`: the Python loader; `true`: the
Rust data server):

* the time until TensorBoard has every step of the run, and the memory of
  the TensorBoard process (and of its data server);
* the time each view of the tab takes to get its data from the plugin's
  routes, the first time (the plugin reads the metric from the data provider)
  and again;
* TensorBoard's scalars plugin serving the same `grad_norm` numbers written
  as one `add_scalar` tag per layer, one request per tag.

Each (run, backend, format) is measured in a fresh Python process, with a
real in-process TensorBoard (tests/tbserver.py: core, scalars and Diagnostics
plugins). The event files are synthetic but written exactly as the logger and
`add_scalar` write them (benchmarks/eventgen.py) and cached between runs.

    python benchmarks/reading.py [--quick] [--size 20000x500 --backend rust] [--cache-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.parse
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

RUN = "run"
POLL = "poll:"  # a request repeated until its answer is complete
# The series views ask for (frontend_static/views/*.js); cold_findings.py times the same views.
OVERVIEW_SERIES = ("loss", "grad_norm_total", "learning_rate", "dead_fraction")
GRADIENT_FLOW_SERIES = ("grad_norm", "weight_norm")  # the grad/weight heatmap
MODEL_VIEW_SERIES = ("grad_norm", "grad_nonfinite", "weight_norm", "update_ratio", "dead_fraction", "act_mean")
# Layer rows the heatmap views ask for (`max_rows`): about what a 1000-px-high window holds (views/heatmap.js).
TAB_MAX_ROWS = 80


# ------------------------------------------------------------ measurements
def _rss_mb(pid: int | str = "self", field: str = "VmRSS") -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _children_rss_mb(field: str) -> float:
    """RSS of this process's child processes (the Rust data server under --load_fast true)."""
    me = str(os.getpid())
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
        except OSError:
            continue
        if ppid == me:
            total += _rss_mb(pid, field) or 0.0
    return total


def _get(srv, path: str) -> tuple[float, int, int]:
    """(ms, status, bytes on the wire) for one GET, gzip accepted as a browser does."""
    t = time.perf_counter()
    status, body, _ = srv.get(path, headers={"Accept-Encoding": "gzip"}, timeout=300)
    return (time.perf_counter() - t) * 1e3, status, len(body)


def _views(layers: list[str], steps: int) -> list[tuple[str, list[str], str]]:
    """Each view of the tab and the requests it makes (frontend_static/views/*.js), with when
    to time it: "all" passes, "once" (first visit and one warm repeat: slow, and the tab caches
    it client-side), "first" (first visit only)."""
    import eventgen

    d = "data/plugin/diagnostics/"
    v = d + "values?run=" + RUN + "&format=f32&metric="
    one = urllib.parse.quote(layers[len(layers) // 2])
    mid = steps // 2
    g = f"&points=1000&max_rows={TAB_MAX_ROWS}"
    out = [
        ("tab start: /runs + /tags", [d + "runs", d + f"tags?run={RUN}"], "all"),
        ("overview: 4 headline series", [v + m + "&points=1000" for m in OVERVIEW_SERIES], "all"),
        # As the tab asks: at once with what is ready, then again until complete (api.js `findings`).
        ("overview: /findings", [d + f"findings?run={RUN}&partial=true"], "first"),
        ("(reference) overview: findings complete (polled)", [POLL + d + f"findings?run={RUN}&partial=true"], "first"),
        ("gradient flow: grad_norm heatmap", [v + "grad_norm&points=1000"], "all"),
        ("gradient flow: grad/weight heatmap", [v + m + "&points=1000" for m in GRADIENT_FLOW_SERIES], "all"),
        ("gradient flow: click a step (profile)", [v + f"grad_norm&points=1&start={mid}&end={mid}"], "all"),
        ("activations: dead_fraction heatmap", [v + "dead_fraction&points=1000"], "all"),
        # As the tab asks since issue 24: layers grouped along the module tree to the screen's height.
        (f"gradient flow: grad_norm heatmap, grouped (max_rows={TAB_MAX_ROWS})", [v + "grad_norm" + g], "all"),
        (f"gradient flow: grad/weight heatmap, grouped (max_rows={TAB_MAX_ROWS})",
         [v + m + g for m in GRADIENT_FLOW_SERIES], "all"),
        ("gradient flow: click a step (profile), grouped", [v + f"grad_norm&points=1&start={mid}&end={mid}"
                                                            f"&max_rows={TAB_MAX_ROWS}"], "all"),
        (f"activations: dead_fraction heatmap, grouped (max_rows={TAB_MAX_ROWS})", [v + "dead_fraction" + g], "all"),
        ("live poll of an unchanged run: /runs + /versions", [d + "runs", d + f"versions?run={RUN}"], "all"),
    ]
    first_group = _first_group(layers)
    if first_group is not None:  # a click on a group's row: its children in place
        out.append((f"gradient flow: open group {first_group}", [
            v + "grad_norm" + g + "&expand=" + urllib.parse.quote(first_group)], "all"))
    out += [
        ("loss", [v + "loss&points=1000"], "all"),
        ("model: structure + 6 metrics", [d + f"structure?run={RUN}"] + [
            v + m + "&points=200" for m in MODEL_VIEW_SERIES], "all"),
        ("layer drill-down: 5 metrics of one layer",
         [v + m + "&points=1000&layer=" + one for m in eventgen.PARAM_METRICS], "all"),
    ]
    if steps >= 20_000:
        out.append(("(reference) grad_norm heatmap as JSON", [d + f"values?run={RUN}&metric=grad_norm&points=1000"],
                    "once"))
    return out


def _first_group(layers: list[str]) -> Optional[str]:
    """The key of the first group a grouped gradient-flow heatmap shows, or None when it shows none."""
    from tb_diag_plugin import layer_groups

    rows = layer_groups.rows(layer_groups.build(layers, "param"), TAB_MAX_ROWS)
    return next((r.key for r in rows if isinstance(r, layer_groups.Group)), None)


def _poll(srv, path: str) -> tuple[float, int, int]:
    """GET `path`, then again with `wait_ms` until its JSON says complete, as api.js asks for /findings:
    (ms, status, bytes)."""
    t = time.perf_counter()
    status, body, _ = srv.get(path, timeout=300)
    while status == 200 and json.loads(body).get("complete") is False:
        status, body, _ = srv.get(path + "&wait_ms=3000", timeout=300)
    return (time.perf_counter() - t) * 1e3, status, len(body)


def _visit(srv, reqs: list[str]) -> tuple[float, int, set]:
    """All of a view's requests at once, 6 at a time, as the tab's Promise.all does: (ms, bytes, statuses)."""
    t = time.perf_counter()
    if len(reqs) == 1 and reqs[0].startswith(POLL):
        got = [_poll(srv, reqs[0][len(POLL):])]
    elif len(reqs) == 1:
        got = [_get(srv, reqs[0])]
    else:
        with concurrent.futures.ThreadPoolExecutor(min(6, len(reqs))) as ex:
            got = list(ex.map(lambda r: _get(srv, r), reqs))
    return (time.perf_counter() - t) * 1e3, sum(g[2] for g in got), {g[1] for g in got}


def _wait_loaded(provider, kind: str, steps: int, layers: int, timeout: float) -> float:
    from tensorboard import context as tb_context

    ctx = tb_context.RequestContext()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            if kind == "scalars":
                tags = provider.list_scalars(ctx, experiment_id="", plugin_name="scalars").get(RUN, {})
                done = len(tags) == layers
            else:
                tags = provider.list_tensors(ctx, experiment_id="", plugin_name="diagnostics").get(RUN, {})
                done = len(tags) >= 11
            if done and all(ts.max_step == steps - 1 for ts in tags.values()):
                return time.perf_counter() - t0
        except Exception:  # the Rust server may not answer yet
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{kind} {steps}x{layers}: not loaded after {timeout:.0f} s")


def measure_one(logdir: str, kind: str, steps: int, layers: int, load_fast: bool, passes: int,
                timeout: float, preload: bool = True) -> dict:
    """In this process: start TensorBoard on `logdir`, wait for the run (and, with `preload`, for the
    plugin to have read it, which it does by itself once the run is loaded), time the routes."""
    import eventgen

    import tbserver

    out: dict[str, Any] = {"rss_before_mb": _rss_mb(), "preload": preload}
    t_start = time.perf_counter()
    extra = [] if preload else ["--diagnostics_preload", "false"]
    # The plugin object: its data provider is polled for loading without going through the routes.
    with tbserver.serve_with_plugin(logdir, load_fast=load_fast, extra=extra) as (srv, plugin):
        t_served = time.perf_counter() - t_start
        out["load_s"] = t_served + _wait_loaded(plugin.store.provider, kind, steps, layers, timeout)
        out["rss_loaded_mb"] = _rss_mb() + _children_rss_mb("VmRSS")
        if kind == "diag" and preload:
            t = time.perf_counter()
            cpu = time.process_time()
            while RUN not in plugin.preloader.preloaded_runs():
                if time.perf_counter() - t > timeout:
                    raise TimeoutError("the plugin never preloaded the run")
                time.sleep(0.05)
            # From loaded to preloaded: includes the plugin's looks at the runs (one a second while they change).
            out["preload_s"] = time.perf_counter() - t
            out["preload_cpu_s"] = time.process_time() - cpu  # this process only (not the Rust data server)
            out["rss_preloaded_mb"] = _rss_mb() + _children_rss_mb("VmRSS")
        names = eventgen.layer_names(layers)
        if kind == "diag":
            out["views"] = _time_views(srv, names, passes, steps, layers)
        else:
            out.update(_time_scalars(srv, names, steps))
        out["rss_mb"] = (_rss_mb(field="VmHWM") or 0.0) + _children_rss_mb("VmHWM")
    return out


def _time_views(srv, names: list[str], passes: int, steps: int, layers: int) -> list[dict]:
    views = _views(names, steps)
    rec: dict[str, dict[str, Any]] = {v: {"again": [], "warm": [], "status": set()} for v, _, _ in views}
    for p in range(passes):
        for view, reqs, when in views:
            if p > 0 and when != "all":
                continue
            ms, size, st = _visit(srv, reqs)
            r = rec[view]
            r["status"] |= st
            if p == 0:
                r["first"], r["bytes"] = ms, size
            else:
                r["again"].append(ms)
            if when != "first" and (p == 0 or when == "all"):
                r["warm"].append(_visit(srv, reqs)[0])  # at once again: the plugin's cache is warm
    # Sanity: the heatmap holds every layer and every step.
    body = srv.plugin(f"values?run={RUN}&metric=grad_norm&points=10")
    assert body["num_steps"] == steps and len(body["layers"]) == layers, (body["num_steps"], len(body["layers"]))
    return [
        {"view": view, "requests": len(reqs), "status": sorted(rec[view]["status"]), "bytes": rec[view]["bytes"],
         "first_ms": rec[view]["first"], "again_ms": _stats(rec[view]["again"]),
         "warm_ms": _stats(rec[view]["warm"])}
        for view, reqs, _ in views
    ]


def _time_scalars(srv, names: list[str], steps: int, sample: int = 50) -> dict:
    """One request per layer tag: all of them 6 at a time (as a browser would), and
    `sample` of them one by one for the per-request time (the sequential total is
    that median times the number of layers when not every tag was timed)."""
    paths = [f"data/plugin/scalars/scalars?run={RUN}&tag=" + urllib.parse.quote(f"grad_norm/{n}") for n in names]
    status, body, _ = srv.get(paths[0])
    assert status == 200 and len(json.loads(body)) == min(steps, 1000), (status, body[:200])
    t = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda p: _get(srv, p), paths))
    par = (time.perf_counter() - t) * 1e3
    assert all(g[1] == 200 for g in got)
    step = max(1, len(paths) // sample)
    per = [_get(srv, p)[0] for p in paths[::step]]
    seq = sum(per) if step == 1 else statistics.median(per) * len(paths)
    return {"one_tag_ms": _stats(per), "all_sequential_ms": seq, "sequential_estimated": step > 1,
            "all_parallel_ms": par, "bytes": sum(g[2] for g in got), "requests": len(paths)}


def _code_state() -> str:
    from run import _git_state

    return _git_state()


def _stats(xs: list[float]) -> Optional[dict]:
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


# ------------------------------------------------------------------ driver
def _child(args) -> None:
    res = measure_one(args.logdir, args.kind, args.steps, args.layers, args.load_fast == "true", args.passes,
                      args.timeout, preload=args.preload == "true")
    print("RESULT " + json.dumps(res), flush=True)


def run_child(logdir: str, kind: str, steps: int, layers: int, load_fast: bool, passes: int,
              timeout: float, preload: bool = True) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--logdir", logdir, "--kind", kind,
           "--steps", str(steps), "--layers", str(layers), "--load-fast", "true" if load_fast else "false",
           "--passes", str(passes), "--timeout", str(timeout), "--preload", "true" if preload else "false"]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 300)
    except subprocess.TimeoutExpired:
        return {"skipped": "timed out"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or "").strip().splitlines()[-5:]
    return {"skipped": "failed", "error": " | ".join(tail)}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small runs only, two passes")
    ap.add_argument("--cache-dir", default=os.environ.get("TB_DIAG_BENCH_DATA", "/tmp/tb-diag-bench-data"),
                    help="where the synthetic logdirs are written once and reused")
    ap.add_argument("--out", default=None)
    ap.add_argument("--python-scalar-limit", type=int, default=100_000,
                    help="largest per-layer scalar run (events) loaded with the Python loader; "
                         "above it the time is estimated from the measured rate")
    ap.add_argument("--size", action="append", default=None, metavar="STEPSxLAYERS",
                    help="measure only these runs (e.g. 20000x500; repeatable), under --backend")
    ap.add_argument("--backend", choices=("rust", "python", "both"), default="both")
    ap.add_argument("--diag-only", action="store_true", help="skip the per-layer scalars comparison")
    # Internal: one measurement in a fresh process.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--logdir", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--load-fast", help=argparse.SUPPRESS)
    ap.add_argument("--passes", type=int, default=4, help=argparse.SUPPRESS)
    ap.add_argument("--preload", default="true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=240, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return {}

    import eventgen

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    eventgen.self_check()
    if args.quick:
        sizes = [(1000, 50), (2000, 500)]
        python_sizes = [(1000, 50)]
        passes = 2
    else:
        sizes = [(1000, 50), (10_000, 50), (20_000, 50), (1000, 500), (10_000, 500), (20_000, 500)]
        # The Python loader reads about 4 MB/s here: its 10k runs are left out to keep the
        # whole benchmark near 15 minutes (its 1k and 20k runs bracket them).
        python_sizes = [(1000, 50), (20_000, 50), (1000, 500), (20_000, 500)]
        passes = 2
    if args.size:
        sizes = python_sizes = [tuple(int(x) for x in size.split("x")) for size in args.size]
    backends = ("rust", "python") if args.backend == "both" else (args.backend,)
    res: dict[str, Any] = {
        "mode": "quick" if args.quick else "sizes" if args.size else "full",
        "command": "python benchmarks/reading.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "code": _code_state(),
        "loadavg_start": os.getloadavg(),
        "passes": passes,
        "configs": [],
    }
    t_all = time.perf_counter()
    python_rate = None  # scalar events per second under the Python loader, once measured
    for backend in backends:
        for steps, layers in sizes if backend == "rust" else python_sizes:
            conf: dict[str, Any] = {"steps": steps, "layers": layers, "backend": backend}
            for kind in ("diag",) if args.diag_only else ("diag", "scalars"):
                logdir, size = eventgen.ensure(args.cache_dir, kind, steps, layers, log)
                events = steps * layers if kind == "scalars" else steps
                if backend == "python" and kind == "scalars" and events > args.python_scalar_limit:
                    est = f"not run (~{events / python_rate:.0f} s est.)" if python_rate else "not run"
                    conf[kind] = {"file_bytes": size, "skipped": est}
                    continue
                t = time.perf_counter()
                r = run_child(logdir, kind, steps, layers, backend == "rust", passes,
                              timeout=600 if backend == "python" else 240)
                r["file_bytes"] = size
                conf[kind] = r
                if backend == "python" and kind == "scalars" and r.get("load_s"):
                    python_rate = events / r["load_s"]
                log(f"{backend:6} {kind:7} {steps:>6} x {layers:<3}: loaded in "
                    f"{r.get('load_s', float('nan')):.1f} s {r.get('skipped', '')}"
                    f"{r.get('error', '')} ({time.perf_counter() - t:.0f} s, load {os.getloadavg()[0]:.2f})")
            if steps >= 20_000 and layers >= 500:
                # The tab opened before the plugin has preloaded the run (or with --diagnostics_preload false).
                t = time.perf_counter()
                logdir, size = eventgen.ensure(args.cache_dir, "diag", steps, layers, log)
                r = run_child(logdir, "diag", steps, layers, backend == "rust", passes,
                              timeout=600 if backend == "python" else 240, preload=False)
                r["file_bytes"] = size
                conf["diag_no_preload"] = r
                log(f"{backend:6} diag, no preload {steps:>6} x {layers:<3}: ({time.perf_counter() - t:.0f} s)")
            res["configs"].append(conf)
    res["python_scalar_events_per_s"] = python_rate
    res["loadavg_end"] = os.getloadavg()
    res["seconds"] = time.perf_counter() - t_all
    suffix = "-quick" if args.quick else "-sizes" if args.size else ""
    out = args.out or os.path.join(HERE, "results", f"reading{suffix}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {out}")
    import report

    print(report.reading_tables(res))
    return res


if __name__ == "__main__":
    main()
