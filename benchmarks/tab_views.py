"""Each view of the tab in Chromium, server and browser together (issue 24 point 2).

Opens a synthetic run (benchmarks/eventgen.py, cached between runs) in a real
TensorBoard (Rust data server, preload on) and headless Chromium, and times
each view from the click on its tab to the view saying it is drawn
(`data-state="ready"`: data fetched, decoded and plotted), on the first visit
(cold for the browser; the plugin has preloaded the run) and on a later one;
then the time to open a group of layers in the gradient-flow heatmap, and the
bytes the tab fetched for each. Prints a Markdown table and writes JSON.

    python benchmarks/tab_views.py [--size 2000x5000] [--passes 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

VIEWS = ("gradients", "activations", "model", "loss", "overview")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="2000x5000", metavar="STEPSxLAYERS")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.environ.get("TB_DIAG_BENCH_DATA", "/tmp/tb-diag-bench-data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tab_views.json"))
    args = ap.parse_args(argv)

    import eventgen
    from conftest import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright
    from test_browser import Tab

    import tbserver

    steps, layers = (int(x) for x in args.size.split("x"))
    logdir, _ = eventgen.ensure(args.cache_dir, "diag", steps, layers, lambda m: print(m, file=sys.stderr))
    res: dict = {"command": "python benchmarks/tab_views.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "size": args.size, "loadavg_start": os.getloadavg(), "views": []}
    with tbserver.serve_with_plugin(logdir, load_fast=True) as (srv, plugin):
        while "run" not in plugin.preloader.preloaded_runs():
            time.sleep(0.1)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            sizes: list[int] = []
            page.on("requestfinished", lambda r: sizes.append((r.sizes() or {}).get("responseBodySize", 0)))
            t = time.perf_counter()
            tab = Tab(page, srv)  # waits for the overview
            res["open_tab_to_overview_ms"] = (time.perf_counter() - t) * 1e3
            for p_i in range(args.passes):
                for view in VIEWS:
                    n = len(sizes)
                    t = time.perf_counter()
                    tab.show(view)
                    ms = (time.perf_counter() - t) * 1e3
                    res["views"].append({"view": view, "pass": p_i, "ms": ms, "requests": len(sizes) - n,
                                         "bytes": sum(sizes[n:])})
            tab.show("gradients")
            key = "gradients:run"
            y = tab.chart(key)["data"][0]["y"]
            row = next((i for i, label in enumerate(y) if "▸" in label), None)
            if row is not None:
                n = len(sizes)
                t = time.perf_counter()
                tab.click_cell(key, steps // 2, row)
                tab.wait_chart(key, f"gd.data[0].y.length !== {len(y)}")
                tab.wait_ready("gradients")
                res["views"].append({"view": f"gradients: open group {y[row]!r}", "pass": 0,
                                     "ms": (time.perf_counter() - t) * 1e3, "requests": len(sizes) - n,
                                     "bytes": sum(sizes[n:])})
            res["rows_shown"] = len(y)
            browser.close()
    res["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"| view ({args.size}, Chromium) | visit | requests | bytes | ms |\n|---|---|---|---|---|")
    for v in res["views"]:
        print(f"| {v['view']} | {'first' if v['pass'] == 0 else 'again'} | {v['requests']} | "
              f"{v['bytes'] / 1024:,.1f} kB | {v['ms']:.0f} |")
    print(f"\nopen the tab (TensorBoard page + overview): {res['open_tab_to_overview_ms']:.0f} ms; "
          f"load {res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f}")
    return res


if __name__ == "__main__":
    main()
