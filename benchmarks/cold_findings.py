"""The tab's first visit to a big run right after TensorBoard loaded it, before the plugin has read it.

    python benchmarks/cold_findings.py [--reps 5] [--baseline COMMIT] [--backend rust|python] [--size 20000x500]

Each visit is cold: a fresh TensorBoard (`--diagnostics_preload false`, so
nothing is read before the tab asks) in a process of its own, started once the
run's event file exists, and the visit begins as soon as the data provider has
every step. The visit is what the tab does: `/runs` and `/tags`, the
overview's four series at once, then `/findings?partial=true` asked the way
that version's `api.js` asks (this tree: again with `wait_ms`; a baseline from
before `wait_ms`: again after 200, 400, 800... ms). Reported per version:
milliseconds from the visit's start to the overview's series, to the first
findings answer, and to the complete findings, then the time of the gradient
flow and the model views opened after them, as medians over `--reps` visits;
the versions alternate, so drift hits both. With `--baseline` the other
version is that commit, checked out in a temporary git worktree. Results:
benchmarks/results/cold_findings.json."""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from reading import GRADIENT_FLOW_SERIES, MODEL_VIEW_SERIES, OVERVIEW_SERIES, RUN, _wait_loaded  # noqa: E402


def _visit(srv, client: str) -> dict[str, float]:
    """The tab's first visit: ms from its start to each milestone."""
    d = "data/plugin/diagnostics/"
    t0 = time.perf_counter()

    def ms() -> float:
        return round((time.perf_counter() - t0) * 1e3, 1)

    def get(path: str) -> bytes:
        status, body, _ = srv.get(path, timeout=300)
        assert status == 200, (status, body[:300])
        return body

    get(d + "runs")
    get(d + f"tags?run={RUN}")
    out = {"tab_start_ms": ms()}
    with concurrent.futures.ThreadPoolExecutor(len(OVERVIEW_SERIES)) as ex:
        list(ex.map(get, [d + f"values?run={RUN}&format=f32&points=1000&metric={m}" for m in OVERVIEW_SERIES]))
    out["overview_ms"] = ms()
    body = json.loads(get(d + f"findings?run={RUN}&partial=true"))
    out["findings_first_ms"] = ms()
    wait, asks = 0.2, 1
    while body.get("complete") is False:
        if client == "longpoll":
            body = json.loads(get(d + f"findings?run={RUN}&partial=true&wait_ms=3000"))
        else:
            time.sleep(wait)
            wait = min(2.0, wait * 2)
            body = json.loads(get(d + f"findings?run={RUN}&partial=true"))
        asks += 1
    out["findings_complete_ms"] = ms()
    out["findings_asks"] = asks
    out["findings"] = len(body["findings"])
    # Then two views as the user would open them next; each timed from its own start.
    for view, metrics in (("gradients", GRADIENT_FLOW_SERIES), ("model", MODEL_VIEW_SERIES)):
        t = time.perf_counter()
        paths = [d + f"values?run={RUN}&format=f32&points=1000&metric={m}" for m in metrics]
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            list(ex.map(get, paths + ([d + f"structure?run={RUN}"] if view == "model" else [])))
        out[f"{view}_view_ms"] = round((time.perf_counter() - t) * 1e3, 1)
    return out


def _child(args) -> None:
    # The tree under test first: its plugin and its tests/tbserver.py.
    sys.path[:0] = [args.tree, os.path.join(args.tree, "tests")]
    import tbserver

    with tbserver.serve_with_plugin(args.logdir, load_fast=args.backend == "rust",
                                    extra=["--diagnostics_preload", "false"]) as (srv, plugin):
        _wait_loaded(plugin.store.provider, "diag", args.steps, args.layers, timeout=600)
        result = _visit(srv, args.client)
    print("RESULT " + json.dumps(result), flush=True)


def _run_child(tree: str, client: str, logdir: str, steps: int, layers: int, backend: str) -> dict:
    env = {**os.environ, "PYTHONPATH": tree + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tree", tree, "--client", client,
           "--logdir", logdir, "--steps", str(steps), "--layers", str(layers), "--backend", backend]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tree)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{tree}: no result\n{p.stderr[-2000:]}")


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline", default=None, metavar="COMMIT", help="compare with this commit's plugin")
    ap.add_argument("--baseline-client", choices=("longpoll", "backoff"), default="backoff",
                    help="how the baseline's tab asks again (backoff: before wait_ms existed)")
    ap.add_argument("--backend", choices=("rust", "python"), default="rust")
    ap.add_argument("--size", default="20000x500", metavar="STEPSxLAYERS")
    ap.add_argument("--cache-dir", default=os.environ.get("TB_DIAG_BENCH_DATA", "/tmp/tb-diag-bench-data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cold_findings.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--client", help=argparse.SUPPRESS)
    ap.add_argument("--logdir", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return {}

    import eventgen

    steps, layers = (int(x) for x in args.size.split("x"))
    logdir, _ = eventgen.ensure(args.cache_dir, "diag", steps, layers, lambda m: print(m, file=sys.stderr))
    versions = {"this tree": (ROOT, "longpoll")}
    tmp = None
    if args.baseline:
        tmp = tempfile.mkdtemp(prefix="tb-diag-baseline-")
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tmp, args.baseline], check=True,
                       capture_output=True)
        versions[f"baseline {args.baseline}"] = (tmp, args.baseline_client)
    code = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    res: dict[str, Any] = {"command": "python benchmarks/cold_findings.py " + " ".join(argv or sys.argv[1:]),
                           "code": code, "backend": args.backend, "size": args.size,
                           "loadavg_start": os.getloadavg(), "visits": {v: [] for v in versions}}
    try:
        names = list(versions)
        for rep in range(args.reps):
            for name in names if rep % 2 == 0 else names[::-1]:
                tree, client = versions[name]
                r = _run_child(tree, client, logdir, steps, layers, args.backend)
                res["visits"][name].append(r)
                print(f"{name:20} rep {rep}: {r}", file=sys.stderr, flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tmp], capture_output=True)
    res["loadavg_end"] = os.getloadavg()
    keys = ("overview_ms", "findings_first_ms", "findings_complete_ms", "gradients_view_ms", "model_view_ms")
    res["medians"] = {name: {k: statistics.median(v[k] for v in visits) for k in keys}
                      for name, visits in res["visits"].items()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{args.size}, {args.backend}, {args.reps} cold visits each (median [min-max] ms from the visit's start):")
    print("| version | overview series | first /findings answer | findings complete | then: gradient flow view"
          " | then: model view |")
    print("|---|---|---|---|---|---|")
    for name, visits in res["visits"].items():
        cells = [f"{statistics.median(v[k] for v in visits):.0f} [{min(v[k] for v in visits):.0f}–"
                 f"{max(v[k] for v in visits):.0f}]" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return res


if __name__ == "__main__":
    main()
