"""Each view of the tab in Chromium, server and browser together (issue 24 point 2).

Opens a synthetic run (benchmarks/eventgen.py, cached between runs; or `--logdir`, a logdir made
elsewhere, such as the 20,000 x 5,000 run) in a real TensorBoard (Rust data server, preload on) and
headless Chromium, and times each view from the click on its tab to the view saying it is drawn
(`data-state="ready"`: data fetched, decoded and plotted), twice: on the harness's clock (Playwright's click
and wait, round trips included) and in the page (from the click's `pointerdown` to the frame painted after
the view's last `data-state` change), on the first visit (cold for the browser;
the plugin has preloaded the run as far as its cache holds it) and on a later one (warm); then the
clicks inside views: open a group of layers in the gradient-flow heatmap and in the model view,
open a module of the model view (the layer drill-down), open the first finding. For each: the
requests the tab made, their bytes on the wire and the largest single answer. The findings are the
overview's first section: "findings" is the time until they are drawn. Prints a Markdown table and
writes JSON.

    python benchmarks/tab_views.py [--size 2000x5000 | --logdir DIR] [--passes 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

VIEWS = ("gradients", "activations", "model", "layer", "loss", "overview")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="2000x5000", metavar="STEPSxLAYERS")
    ap.add_argument("--logdir", default=None, help="an existing logdir with one run (instead of --size)")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--cache-dir", default=os.environ.get("TB_DIAG_BENCH_DATA", "/tmp/tb-diag-bench-data"))
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tab_views.json"))
    args = ap.parse_args(argv)

    import eventgen
    from conftest import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright
    from test_browser import Tab

    import tbserver

    class SlowTab(Tab):
        def wait_ready(self, view, timeout=1_800_000):
            super().wait_ready(view, timeout)

    if args.logdir:
        logdir, label = args.logdir, os.path.basename(os.path.normpath(args.logdir))
    else:
        steps, layers = (int(x) for x in args.size.split("x"))
        logdir, _ = eventgen.ensure(args.cache_dir, "diag", steps, layers, lambda m: print(m, file=sys.stderr))
        label = args.size
    run = next(d for d in sorted(os.listdir(logdir)) if os.path.isdir(os.path.join(logdir, d)))
    res: dict = {"command": "python benchmarks/tab_views.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "size": label, "loadavg_start": os.getloadavg(), "views": []}
    t0 = time.perf_counter()
    with tbserver.serve_with_plugin(logdir, load_fast=True) as (srv, plugin):
        srv.wait_for_runs(1, timeout=3600)
        res["listed_s"] = time.perf_counter() - t0
        # Preloaded as far as the plugin goes (a run over its cache budget is read on demand), at the data
        # TensorBoard has finished loading: the Rust data server loads a 2.3 GB run for a minute after
        # listing it, and the preload of a version it has not finished is redone for the next.
        from tensorboard.context import RequestContext

        def loaded_version():
            plugin.store._listing.clear()
            return plugin.store.index(RequestContext(), "")[run].data_version()

        while time.perf_counter() - t0 < 1800:
            if plugin.preloader.preloaded_runs().get(run) == loaded_version():
                time.sleep(3 * plugin.config.preload_settle_poll_s)  # the version held still since it was read
                if plugin.preloader.preloaded_runs().get(run) == loaded_version():
                    break
            time.sleep(0.5)
        res["preloaded_s"] = time.perf_counter() - t0
        print(f"listed after {res['listed_s']:.1f} s, preloaded after {res['preloaded_s']:.1f} s", file=sys.stderr)
        # What the first visits can be answered from: the step summaries the preload left in the cache.
        res["summaries_cached"] = sorted(key[0][2] for key in plugin.store.summaries.keys())
        res["cache_mb"] = plugin.store.memory.size / 2**20
        print(f"summaries cached: {res['summaries_cached']}; cache {res['cache_mb']:.0f} MiB", file=sys.stderr)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1440, "height": 1000}).new_page()
            # Each request is counted in the window (view) it was sent in; its size once it has finished.
            sent: list[dict] = []
            window = {"name": None}
            page.on("request", lambda r: sent.append({"req": r, "window": window["name"], "bytes": 0}))

            def finished(r):
                for e in reversed(sent):
                    if e["req"] is r:
                        e["bytes"] = (r.sizes() or {}).get("responseBodySize", 0)
                        tm = r.timing  # ms: startTime since the epoch, the rest after it
                        e["wait_ms"] = tm["responseStart"] - tm["requestStart"]  # the server's answer time
                        e["end_epoch_ms"] = tm["startTime"] + tm["responseEnd"]
                        break

            page.on("requestfinished", finished)

            def timed(name: str, pass_i: int, action) -> None:
                window["name"] = (name, pass_i)
                tab.frame.evaluate(PLOT_TIMER)
                tab.frame.evaluate(PAGE_TIMER)
                t, t_epoch = time.perf_counter(), time.time() * 1e3
                action()
                ms = (time.perf_counter() - t) * 1e3
                page_ms = tab.frame.evaluate(PAGE_MS)
                res["views"].append({"view": name, "pass": pass_i, "ms": ms, "page_ms": page_ms,
                                     "click_epoch_ms": t_epoch, "plot_ms": tab.frame.evaluate("window.__plotMs"),
                                     "plots": tab.frame.evaluate("window.__plots")})
                print(f"  {name} ({pass_i}): {ms:.0f} ms, in the page {page_ms:.0f} ms", file=sys.stderr)
                window["name"] = None

            page.set_default_timeout(1_800_000)  # a 20,000 x 5,000 run's first findings take minutes here
            t = time.perf_counter()
            tab = SlowTab(page, srv)  # waits for the overview, findings included
            print(f"tab open after {time.perf_counter() - t:.1f} s", file=sys.stderr)
            res["open_tab_to_overview_ms"] = (time.perf_counter() - t) * 1e3
            # Once the first view is drawn the tab pays Plotly's one-off costs while idle (charts.warmUp, a
            # few tens of ms): a user reads the overview before the next click; so does the harness.
            tab.frame.wait_for_function("document.body.dataset.plotly")
            res["plotly_warm"] = tab.frame.evaluate("document.body.dataset.plotly")
            for p_i in range(args.passes):
                for view in VIEWS:
                    if p_i == 0:
                        forget(tab, run)  # a first visit: nothing of the run in the tab's own cache
                    timed(view, p_i, lambda v=view: tab.show(v))
            for p_i in range(args.passes):  # the findings: the overview's first section, drawn before it says ready
                tab.show("loss")
                if p_i == 0:
                    forget(tab, run)
                timed("findings (the overview's list)", p_i, lambda: show_findings(tab))
            clicks(tab, timed, run, res)
            page.wait_for_timeout(1000)  # the last requests' sizes
            browser.close()
    for v in res["views"]:
        mine = [e for e in sent if e["window"] == (v["view"], v["pass"])]
        ends = [e["end_epoch_ms"] for e in mine if "end_epoch_ms" in e]
        v.update(requests=len(mine), bytes=sum(e["bytes"] for e in mine),
                 largest=max((e["bytes"] for e in mine), default=0),
                 # the server's longest answer, and when the view's last answer had arrived (after the click):
                 # the rest of `ms` is the tab's decoding and drawing
                 server_ms=max((e.get("wait_ms", 0) for e in mine), default=0),
                 fetched_ms=max(ends) - v["click_epoch_ms"] if ends else 0,
                 slowest=max(mine, key=lambda e: e.get("wait_ms", 0))["req"].url.split("/diagnostics/")[-1][:160]
                 if mine else "",
                 routes=sorted({e["req"].url.split("/diagnostics/")[-1].split("?")[0] for e in mine}))
    res["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"| view ({label}, Chromium) | visit | requests | bytes | largest answer | slowest answer ms "
          "| all fetched ms | Plotly ms (charts) | ms | in the page ms |\n|---|---|---|---|---|---|---|---|---|---|")
    for v in res["views"]:
        print(f"| {v['view']} | {'first' if v['pass'] == 0 else 'again'} | {v['requests']} | "
              f"{v['bytes'] / 1024:,.1f} kB | {v['largest'] / 1024:,.1f} kB | {v['server_ms']:.0f} | "
              f"{v['fetched_ms']:.0f} | {v['plot_ms']:.0f} ({v['plots']}) | {v['ms']:.0f} | {v['page_ms']:.0f} |")
    print(f"\nlisted {res['listed_s']:.1f} s, preloaded {res['preloaded_s']:.1f} s after start; open the tab "
          f"(TensorBoard page + overview): {res['open_tab_to_overview_ms']:.0f} ms; "
          f"load {res['loadavg_start'][0]:.1f} -> {res['loadavg_end'][0]:.1f}")
    return res


# In the page, from the click to the frame drawn after the view said it was ready: the time of the
# pointerdown event (its own timestamp), and of the first frame painted after the last `data-state`
# change (a requestAnimationFrame, then a task: after the paint). The harness's own clock (`ms`) adds
# Playwright's round trips and its checks before a click (the element visible and still for two frames).
PAGE_TIMER = """() => {
  if (!window.__pageTimer) {
    window.__pageTimer = true;
    document.addEventListener("pointerdown", (e) => { window.__clickAt = e.timeStamp; }, true);
    new MutationObserver(() => {
      const n = ++window.__changes;
      requestAnimationFrame(() => setTimeout(() => {
        if (n === window.__changes) [window.__drawnAt, window.__drawnFor] = [performance.now(), n];
      }, 0));
    }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["data-state"]});
  }
  window.__clickAt = null;
  window.__drawnAt = null;
  window.__drawnFor = -1;
  window.__changes = 0;
}"""

# ms from the click to the frame drawn after the last change so far; waits for that frame when the harness
# saw the view ready before it was drawn.
PAGE_MS = """async () => {
  for (let i = 0; i < 100 && window.__drawnFor !== window.__changes; i++) await new Promise((r) => setTimeout(r, 10));
  return window.__clickAt == null || window.__drawnAt == null ? -1 : window.__drawnAt - window.__clickAt;
}"""


# Time spent in Plotly drawing (Plotly.react / newPlot) since the last call: wraps them once, then resets.
PLOT_TIMER = """() => {
  const P = window.Plotly;
  if (P && !P.__timed) {
    for (const name of ["react", "newPlot"]) {
      const f = P[name];
      P[name] = function (...args) {
        const t = performance.now();
        const out = f.apply(this, args);
        const done = () => { window.__plotMs += performance.now() - t; window.__plots += 1; };
        if (out && out.then) out.then(done, done); else done();
        return out;
      };
    }
    P.__timed = true;
  }
  window.__plotMs = 0;
  window.__plots = 0;
}"""


def forget(tab, run: str) -> None:
    """Empty the tab's client-side cache of `run` (api.invalidate), so the next view fetches all it shows."""
    tab.frame.evaluate(
        "async (run) => (await import(new URL('static/api.js', document.baseURI).href)).invalidate(run)", run)


def show_findings(tab) -> None:
    """From the click on the overview's tab to the findings drawn (the overview waits for them)."""
    tab.frame.click('[data-tab="overview"]')
    tab.frame.wait_for_function(
        "document.querySelector('[data-view=overview]').dataset.state === 'ready' && "
        "['ok', 'unavailable'].includes(document.querySelector('.findings')?.dataset.state)")


def clicks(tab, timed, run: str, res: dict) -> None:
    """The clicks inside views: open a group (gradient flow, model view), a module, a finding."""
    tab.show("gradients")
    key = f"gradients:{run}"
    y = tab.chart(key)["data"][0]["y"]
    x = tab.chart(key)["data"][0]["x"]
    row = next((i for i, label in enumerate(y) if "▸" in label), None)
    if row is not None:
        def open_heatmap_group():
            tab.click_cell(key, x[len(x) // 2], row)
            tab.wait_chart(key, f"gd.data[0].y.length !== {len(y)}")
            tab.wait_ready("gradients")

        timed(f"gradient flow: open group {y[row]!r}", 0, open_heatmap_group)
    res["rows_shown"] = len(y)
    tab.show("model")
    tab.frame.wait_for_function("document.querySelector('.model-body').dataset.findings === 'ready'")
    res["model_rows"] = tab.frame.evaluate("document.querySelectorAll('.tree .node').length")
    group = tab.frame.evaluate("document.querySelector('.tree .node.group')?.dataset.group ?? null")
    if group is not None:
        def open_model_group():
            tab.frame.locator(f'.tree .node[data-group="{group}"]').click()
            tab.frame.wait_for_function(f"!document.querySelector('.tree .node[data-group=\"{group}\"]')")
            tab.wait_ready("model")

        timed(f"model: open group {group!r}", 0, open_model_group)
    module = tab.frame.evaluate(
        "[...document.querySelectorAll('.tree .node:not(.group)')].find(n => n.querySelector('.node-shapes'))"
        "?.dataset.module ?? null")
    if module is not None:
        def open_module():
            tab.frame.locator(f'.tree .node[data-module="{module}"]').click()
            tab.wait_ready("layer")

        timed(f"layer drill-down: click module {module!r} in the model view", 0, open_module)
    tab.show("overview")
    link = tab.frame.locator(".finding .finding-link").first
    if link.count():
        def open_finding():
            link.click()
            tab.frame.wait_for_function("tbDiag.state.view !== 'overview'")
            tab.wait_ready(tab.frame.evaluate("tbDiag.state.view"))

        kind = tab.frame.evaluate("document.querySelector('.finding')?.dataset.kind")
        timed(f"findings: open the first ({kind})", 0, open_finding)


if __name__ == "__main__":
    main()
