"""The Diagnostics tab in headless Chromium, on a real TensorBoard and real event files.

One server and one page for the module: the demo's four runs plus a few
made here (hostile names, a single-step run, a loss-only run, a run that
grows while the page is open). Each test drives the tab through its UI and
compares what the charts hold with what the routes return.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import urllib.parse

import numpy as np
import pytest
from conftest import ARTIFACTS

from tb_diag_plugin.diagnostics_plugin import DiagnosticsLoader
from tb_diag_plugin.layer_groups import module_of
from tb_diag_plugin.metadata import METRIC_SPECS, METRICS
from tbserver import serve

# A run directory and a loss component named to run script if ever rendered as HTML.
HOSTILE = "<img src=x onerror=\"window.__xss=1\"> & 'q' “ünï” 运行"
DEMO_RUNS = ["diverging", "dying_relu", "healthy", "vanishing_sigmoid"]
FRAME_URL = "plugin_entry.html?name=diagnostics"
SPIKE_STEP = 60
VAL_STEPS = [0, 30, 66]
# Pictures of what a test checked, to look at (git-ignored; never the README's).
CHECKS = os.path.join(os.path.dirname(__file__), "artifacts")


# ----------------------------------------------------------------- data
def _train(run_dir, steps, every=1, losses_extra=None, writer=None):
    import torch
    from torch import nn
    from torch.utils.tensorboard import SummaryWriter

    from tb_diag_logger import Diagnostics

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    own = writer is None
    writer = writer or SummaryWriter(str(run_dir))
    diag = Diagnostics(model, writer, every=every, optimizer=opt)
    for step in range(steps):
        ce = torch.nn.functional.cross_entropy(model(x), y)
        losses = {"ce": ce}
        if losses_extra:
            losses[losses_extra] = 0.01 * ce.detach() + 0.0 * ce
        loss = sum(losses.values())
        opt.zero_grad()
        loss.backward()
        diag.step(step, loss=loss, losses=losses)
        opt.step()
    diag.close()
    if own:
        writer.close()


class LiveRun:
    """A run that a logger extends while the page is open."""

    def __init__(self, run_dir):
        import torch
        from torch import nn
        from torch.utils.tensorboard import SummaryWriter

        from tb_diag_logger import Diagnostics

        torch.manual_seed(1)
        self.torch = torch
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.writer = SummaryWriter(str(run_dir))
        self.diag = Diagnostics(self.model, self.writer, every=1, optimizer=self.opt)
        self.step_no = 0
        self.x = torch.randn(32, 8)

    def steps(self, n):
        for _ in range(n):
            loss = self.model(self.x).pow(2).mean()
            self.opt.zero_grad()
            loss.backward()
            self.diag.step(self.step_no, loss=loss)
            self.opt.step()
            self.step_no += 1
        self.writer.flush()

    def close(self):
        self.diag.close()
        self.writer.close()


@pytest.fixture(scope="module")
def ui_logdir(request, tmp_path_factory):
    # TB_DIAG_DEMO_LOGDIR reuses a logdir written by `tb-diag demo` (handy
    # while working on the tab); by default the session's demo runs are used.
    src = os.environ.get("TB_DIAG_DEMO_LOGDIR")
    src = pathlib.Path(src) if src else request.getfixturevalue("demo_logdir")
    d = tmp_path_factory.mktemp("ui")
    for run in DEMO_RUNS:
        shutil.copytree(src / run, d / run)
    _train(d / HOSTILE, steps=8, losses_extra=HOSTILE)
    _train(d / "single_step", steps=1)
    # Only a loss, no model: written through the logger's own summary sink.
    from torch.utils.tensorboard import SummaryWriter

    from tb_diag_logger.summaries import SummarySink

    # A slowly falling loss with one spike at step SPIKE_STEP (a loss_spike finding).
    w = SummaryWriter(str(d / "loss_only"))
    sink = SummarySink(w)
    for step in range(0, 90, 3):
        value = 1.0 / (1 + 0.005 * step) * (10.0 if step == SPIKE_STEP else 1.0)
        sink.write_vectors(step, [("loss", ["total"], [""], np.array([value], dtype=np.float32))])
        if step in VAL_STEPS:  # a validation loss, as diag.evaluate() writes it
            sink.write_vectors(step, [("val_loss", ["total"], (), np.array([value * 1.5], dtype=np.float32))])
    w.close()
    return d


def _all_plugins():
    from tensorboard import default

    plugins = default.get_plugins()
    assert DiagnosticsLoader in plugins, "tb-diag is not installed (pip install -e .)"
    return plugins


@pytest.fixture(scope="module")
def ui_server(ui_logdir):
    # Every plugin `tensorboard` itself loads (ours through its entry point),
    # so the page is what a user sees; with only some of them TensorBoard's
    # own frontend logs 404s for the missing ones.
    with serve(str(ui_logdir), plugins=_all_plugins()) as srv:
        srv.wait_for_runs(7)
        yield srv


# JS: the panel (a chart's card) named `key`, found without CSS-quoting the name.
FIND_PANEL = "const box = [...document.querySelectorAll('[data-panel]')].find(b => b.dataset.panel === key);"


class Tab:
    """The TensorBoard page with the Diagnostics tab open, and what it logged."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.errors = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.goto(server.url + "#diagnostics")
        self.frame = self._find_frame()
        self.wait_ready("overview")

    def _console(self, msg):
        # Every console error counts, from TensorBoard's page and from the
        # tab's iframe alike (Playwright reports both here); none is ignored.
        if msg.type == "error":
            self.errors.append(f"console: {msg.text} @ {msg.location.get('url')}")

    def _find_frame(self):
        for _ in range(600):  # the iframe exists once the tab is selected
            for f in self.page.frames:
                if FRAME_URL in f.url:
                    return f
            self.page.wait_for_timeout(100)
        raise AssertionError("the Diagnostics iframe never appeared")

    # ------------------------------------------------------------ driving
    def wait_ready(self, view, timeout=60_000):
        self.frame.wait_for_function(
            "v => document.querySelector(`[data-view=\"${v}\"]`)?.dataset.state === 'ready'", arg=view, timeout=timeout
        )

    def show(self, view):
        self.frame.click(f'[data-tab="{view}"]')
        self.wait_ready(view)

    def select_runs(self, runs):
        """Choose runs in the run list like a user: 'none', then tick each box."""
        self.frame.get_by_role("button", name="none", exact=True).click()
        for run in runs:
            self.frame.get_by_label(run, exact=True).check()
        self.wait_ready(self.frame.evaluate("tbDiag.state.view"))

    def view_text(self, view):
        return self.frame.inner_text(f"[data-view={view}]")

    # ------------------------------------------------------------- charts
    def chart(self, key):
        """A panel of the current view: its text, and its Plotly traces and layout as plain JSON."""
        return self.frame.evaluate(
            """key => {
                const view = document.querySelector(`[data-view="${tbDiag.state.view}"]`);
                const box = [...view.querySelectorAll('[data-panel]')].find(b => b.dataset.panel === key);
                if (!box) return null;
                const gd = box.querySelector('.js-plotly-plot');
                if (!gd) return {panel: box.innerText, data: null};
                return {panel: box.innerText, dataset: {...box.dataset},
                        data: gd.data.map(t => ({type: t.type, name: t.name, x: t.x, y: t.y, z: t.z,
                                                  customdata: t.customdata, meta: t.meta, mode: t.mode,
                                                  color: t.line && t.line.color, xaxis: t.xaxis || 'x',
                                                  yaxis: t.yaxis || 'y'})),
                        layout: {xrange: gd.layout.xaxis.range, yaxis_type: gd.layout.yaxis.type,
                                 shapes: gd.layout.shapes || [], height: gd.layout.height,
                                 annotations: (gd.layout.annotations || []).map(a => ({text: a.text, xref: a.xref})),
                                 yaxis_types: Object.fromEntries(Object.entries(gd._fullLayout)
                                   .filter(([k]) => /^yaxis\\d*$/.test(k)).map(([k, a]) => [k, a.type]))}};
            }""",
            key,
        )

    def on_chart(self, key, expr):
        """Evaluate `expr` with `gd` (the panel's Plotly div) in scope."""
        return self.frame.evaluate(
            f"key => {{ {FIND_PANEL} const gd = box.querySelector('.js-plotly-plot'); return {expr}; }}", key
        )

    def wait_chart(self, key, cond, timeout=60_000):
        self.frame.wait_for_function(
            f"key => {{ {FIND_PANEL} const gd = box?.querySelector('.js-plotly-plot');"
            f" return !!gd && !!gd.data && ({cond}); }}",
            arg=key,
            timeout=timeout,
        )

    def _at(self, key, x, y_js):
        """Page coordinates of data x (an axis value) and y (a JS expression) inside a chart's plot area."""
        pos = self.on_chart(
            key,
            f"(() => {{ const r = gd.querySelector('.nsewdrag').getBoundingClientRect(); const fl = gd._fullLayout;"
            f" return {{x: r.left + fl.xaxis.l2p({float(x)}), y: r.top + {y_js}}}; }})()",
        )
        frame_box = self.page.locator(f'iframe[src*="{FRAME_URL}"]').bounding_box()
        return frame_box["x"] + pos["x"], frame_box["y"] + pos["y"]

    def click_cell(self, key, step, row):
        """Click a heatmap cell (step on x, row index on the category y axis) with the mouse."""
        self.page.mouse.click(*self._at(key, step, f"fl.yaxis.l2p({int(row)})"))

    def drag_x(self, key, x0, x1):
        """Zoom like a user: drag across a chart from x0 to x1."""
        start = self._at(key, x0, "r.height / 2")
        end = self._at(key, x1, "r.height / 2")
        self.page.mouse.move(*start)
        self.page.mouse.down()
        self.page.mouse.move(*end, steps=8)
        self.page.mouse.up()

    # ------------------------------------------------------------ results
    def assert_clean(self):
        assert self.errors == [], "\n".join(self.errors)
        assert self.frame.evaluate("window.__xss") is None
        assert self.page.evaluate("window.__xss") is None

    def screenshot(self, name, height=None, folder=ARTIFACTS):
        """Save the page to `folder`: ARTIFACTS (tests/artifacts/, or docs/screenshots/ from
        docs/make_screenshots.py), or CHECKS for pictures that are not the README's;
        `height="content"` grows the window to fit the view."""
        os.makedirs(folder, exist_ok=True)
        self.page.mouse.move(5, 995)  # no hover label or modebar in the picture
        self.frame.evaluate("document.activeElement && document.activeElement.blur()")
        size = self.page.viewport_size
        if height == "content":
            top = self.page.locator(f'iframe[src*="{FRAME_URL}"]').bounding_box()["y"]
            height = min(2400, int(top + self.frame.evaluate("document.querySelector('.main').scrollHeight")) + 8)
        if height:
            self.page.set_viewport_size({"width": size["width"], "height": height})
        self.page.wait_for_timeout(700)  # Plotly redraws after a resize
        self.page.screenshot(path=os.path.join(folder, name))
        if height:
            self.page.set_viewport_size(size)
            self.page.wait_for_timeout(300)


@pytest.fixture(scope="module")
def tab(browser, ui_server):
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    t = Tab(page, ui_server)
    yield t
    context.close()


def values(server, run, metric, **params):
    q = urllib.parse.urlencode({"run": run, "metric": metric, **params}, doseq=True)
    return server.plugin(f"values?{q}")


def num(v):
    """A value from the JSON route as a float (NaN/Infinity strings included)."""
    if v is None:
        return None
    return float(v)


def finite_or_none(v):
    """How a line chart holds a route value: non-finite values are gaps."""
    v = num(v)
    return v if v is not None and math.isfinite(v) else None


def same(a, b, rel=1e-6):
    if a is None or b is None:
        return a is None and b is None
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-30)


def layer_chart(tab, metric):
    """The drill-down's chart of `metric`: a subplot of the view's one figure, as `Tab.chart` gives a chart
    (its traces and the shapes on its axes), after checking that the subplot is titled with the metric's
    label and holds only that metric's traces; None when the view draws no chart of it."""
    whole = tab.chart("layer")
    if whole is None or whole["data"] is None:
        return None
    data = [t for t in whole["data"] if t["meta"]["metric"] == metric]
    if not data:
        return None
    axis = data[0]["xaxis"]
    assert {t["xaxis"] for t in data} == {axis}
    assert all(t["meta"]["metric"] == metric for t in whole["data"] if t["xaxis"] == axis)
    titles = [a["text"] for a in whole["layout"]["annotations"] if a["xref"] == f"{axis} domain"]
    assert titles == [METRICS[metric].label], titles
    value = next(t for t in data if t["meta"]["role"] == "value")
    yaxis = "yaxis" + value["yaxis"][1:]
    assert whole["layout"]["yaxis_types"][yaxis] == ("log" if METRICS[metric].scale == "log" else "linear")
    shapes = [s for s in whole["layout"]["shapes"] if s.get("xref") == axis]
    return {"panel": whole["panel"], "data": data, "layout": {**whole["layout"], "shapes": shapes}}


def trace(chart, **meta):
    hits = [t for t in chart["data"] if t.get("meta") and all(t["meta"].get(k) == v for k, v in meta.items())]
    assert hits, f"no trace with {meta} in {[t.get('meta') for t in chart['data']]}"
    return hits[0]


# ---------------------------------------------------------------- tests
def test_tab_renders_recorded_data(tab, ui_server):
    """Issue 2: for a chosen run, the gradient-norm heatmap, the loss and its
    components, and the dead-ReLU fractions hold the recorded values."""
    run = "dying_relu"
    tab.select_runs([run])

    tab.show("gradients")
    body = values(ui_server, run, "grad_norm")
    hm = tab.chart(f"gradients:{run}")
    main = hm["data"][0]
    assert main["type"] == "heatmap"
    assert main["y"] == body["layers"]  # model order, names as given
    assert main["x"] == body["steps"]
    for j in range(len(body["layers"])):
        for i in range(len(body["steps"])):
            want = num(body["values"][i][j])
            assert same(main["customdata"][j][i], want), (j, i)
            if want and want > 0:  # the colour is log10 of the value
                assert main["z"][j][i] == pytest.approx(math.log10(want), abs=1e-9)
    assert "log colour scale" in hm["panel"]

    tab.show("loss")
    body = values(ui_server, run, "loss")
    assert body["layers"] == ["total", "ce", "l2"]
    for j, comp in enumerate(body["layers"]):
        t = trace(tab.chart(f"loss:{comp}"), run=run, role="value")
        assert t["x"] == body["steps"]
        assert all(same(t["y"][i], num(body["values"][i][j])) for i in range(len(body["steps"])))

    tab.show("activations")
    body = values(ui_server, run, "dead_fraction")
    hm = tab.chart(f"activations:{run}")
    main = hm["data"][0]
    assert [y.split(" · ")[0] for y in main["y"]] == body["layers"]
    assert all(y.endswith("· ReLU") for y in main["y"])
    for j in range(len(body["layers"])):
        assert all(same(main["customdata"][j][i], num(body["values"][i][j])) for i in range(len(body["steps"])))
    assert max(num(v) for v in body["values"][-1]) == 1.0  # dying_relu really has dead layers

    # The README's picture: the demo's runs, findings first.
    tab.select_runs(DEMO_RUNS)
    tab.show("overview")
    tab.screenshot("tab.png", height=1200)
    tab.assert_clean()


def test_overview_findings_first_then_figures(tab, ui_server):
    tab.select_runs(DEMO_RUNS)
    tab.show("overview")
    routes = {run: ui_server.get(f"data/plugin/diagnostics/findings?run={run}") for run in DEMO_RUNS}
    state = tab.frame.evaluate("document.querySelector('.findings').dataset.state")
    if all(status == 200 for status, _, _ in routes.values()):
        more = tab.frame.locator("button.more")
        if more.count():
            more.click()
            tab.wait_ready("overview")
        shown = tab.frame.evaluate(
            """[...document.querySelectorAll('.finding')].map(li => [li.dataset.run, li.dataset.kind,
                 li.querySelector('.finding-msg').textContent, li.querySelector('.sev').textContent])"""
        )
        expected = [
            [run, f["kind"], f["message"], f["severity"]]
            for run, (_, body, _) in routes.items()
            for f in json.loads(body)["findings"]
        ]
        assert sorted(shown) == sorted(expected)
        order = {"error": 0, "warning": 1, "info": 2}
        assert [order[s[3]] for s in shown] == sorted(order[s[3]] for s in shown)  # worst first
        assert state == "ok"
        if more.count():
            more.click()  # back to the first few
            tab.wait_ready("overview")
    else:  # findings.py not there yet: the space says so and the figures stand in
        assert state == "unavailable"
        assert "Findings are not available" in tab.frame.inner_text(".findings")

    figures = tab.frame.evaluate(
        """Object.fromEntries([...document.querySelectorAll('.figures-table tbody tr')].map(tr =>
             [tr.dataset.run, Object.fromEntries([...tr.querySelectorAll('td[data-key]')].map(td =>
               [td.dataset.key, td.dataset.value]))]))"""
    )
    assert sorted(figures) == sorted(DEMO_RUNS)
    for run in DEMO_RUNS:
        loss = values(ui_server, run, "loss", points=400)
        gnt = values(ui_server, run, "grad_norm_total", points=400)
        assert int(figures[run]["steps"]) == loss["num_steps"]
        total = [num(row[loss["layers"].index("total")]) for row in loss["values"]]
        grad = [num(row[0]) for row in gnt["values"]]
        assert same(float(figures[run]["loss"]), [v for v in total if math.isfinite(v)][-1])
        assert same(float(figures[run]["grad"]), [v for v in grad if math.isfinite(v)][-1])
        bad = [s for s, a, b in zip(loss["steps"], total, grad) if not (math.isfinite(a) and math.isfinite(b))]
        assert figures[run]["firstBad"] == (str(bad[0]) if bad else "")
    assert figures["diverging"]["firstBad"] != ""  # the demo's diverging run does reach NaN
    dead = values(ui_server, "diverging", "dead_fraction", points=400)["values"][-1]
    assert any(math.isnan(num(v)) for v in dead)  # its activations are NaN by the end...
    assert figures["diverging"]["dead"] == ""  # ...so the dead share is unknown ("–"), never 0 %

    chart = tab.chart("grad_norm_total")
    body = values(ui_server, "healthy", "grad_norm_total", points=400)
    t = trace(chart, run="healthy", role="value")
    assert t["x"] == body["steps"] and all(same(a, num(b[0])) for a, b in zip(t["y"], body["values"]))
    dead = trace(tab.chart("dead_share"), run="dying_relu", role="value")
    body = values(ui_server, "dying_relu", "dead_fraction", points=400)
    assert same(dead["y"][-1], 100 * np.mean([num(v) for v in body["values"][-1]]))
    shares = tab.chart("components")
    assert shares["dataset"]["run"] in DEMO_RUNS and shares["dataset"]["mode"] == "share"
    assert {t["meta"]["component"] for t in shares["data"]} == {"ce", "l2"}
    tab.screenshot("overview.png", height="content")

    if state == "ok":  # a finding opens the chart that shows it
        tab.frame.locator('.finding[data-kind="dead_relu"][data-run="dying_relu"] .finding-link').first.click()
        tab.wait_ready("activations")
        assert tab.frame.locator("[data-view=activations] .metric-select").input_value() == "dead_fraction"
    tab.assert_clean()


def test_gradient_flow_heatmap_profile_and_metrics(tab, ui_server):
    run = "diverging"
    key = f"gradients:{run}"
    tab.select_runs([run])
    tab.show("gradients")
    body = values(ui_server, run, "grad_norm")
    hm = tab.chart(key)
    # Non-finite cells are drawn by a trace of their own, exactly where the route has NaN/Inf.
    assert len(hm["data"]) == 2 and hm["data"][1]["type"] == "heatmap"
    drawn = {(j, i) for j, row in enumerate(hm["data"][1]["z"]) for i, c in enumerate(row) if c is not None}
    want = {(j, i) for i, row in enumerate(body["values"]) for j, v in enumerate(row) if not math.isfinite(num(v))}
    assert want and drawn == want
    assert "NaN/Inf (magenta) in 8 layers" in hm["panel"]

    # Clicking a cell selects its step for the profile and its layer for the other views.
    step, row = 100, body["layers"].index("2.weight")
    tab.click_cell(key, step, row)
    tab.frame.wait_for_function(
        "() => document.querySelector('[data-panel=\"gradients:profile\"]')?.dataset.stepLo === '100'"
    )
    tab.wait_ready("gradients")
    assert tab.frame.evaluate("tbDiag.state.layer") == "2"
    prof = tab.chart("gradients:profile")
    at = values(ui_server, run, "grad_norm", start=step, end=step)
    t = prof["data"][0]
    assert t["x"] == at["layers"]
    assert all(same(a, num(b)) for a, b in zip(t["y"], at["values"][0]))
    assert any(s.get("x0") == step for s in tab.chart(key)["layout"]["shapes"])

    # The other metrics, including the client-side gradient-to-weight ratio.
    metric_select = tab.frame.locator("[data-view=gradients] .metric-select")
    metric_select.select_option("grad_to_weight")
    tab.wait_ready("gradients")
    g, w = values(ui_server, run, "grad_norm"), values(ui_server, run, "weight_norm")
    ratio = tab.chart(key)["data"][0]
    for j, layer in enumerate(g["layers"]):
        wj = w["layers"].index(layer)
        for i in range(len(g["steps"])):
            expect = num(g["values"][i][j]) / num(w["values"][i][wj]) if num(w["values"][i][wj]) else float("nan")
            got = ratio["customdata"][j][i]
            assert same(float(got), expect, rel=1e-5), (layer, g["steps"][i], got, expect)
    for metric in ("grad_max_abs", "weight_norm", "update_ratio"):
        metric_select.select_option(metric)
        tab.wait_ready("gradients")
        body = values(ui_server, run, metric)
        data = tab.chart(key)["data"][0]
        assert data["y"] == body["layers"]
        assert all(same(float(data["customdata"][j][5]), num(body["values"][5][j])) for j in range(len(body["layers"])))

    # Layer names are searchable.
    metric_select.select_option("grad_norm")
    tab.wait_ready("gradients")
    tab.frame.fill("[data-view=gradients] .layer-search", r"\.weight$")
    tab.wait_chart(key, "gd.data[0].y.every(n => n.endsWith('.weight'))")
    tab.wait_ready("gradients")
    assert "4 of 8 layers match" in tab.frame.inner_text("[data-view=gradients] .toolbar")
    tab.frame.fill("[data-view=gradients] .layer-search", "")
    tab.wait_chart(key, "gd.data[0].y.length === 8")
    tab.wait_ready("gradients")

    # The selected layer opens in the drill-down with the selected step marked.
    tab.frame.get_by_role("button", name="Open layer “2” ›").click()
    tab.wait_ready("layer")
    assert tab.frame.evaluate("document.querySelector('.layer-heading').dataset.layer") == "2"
    chart = layer_chart(tab, "grad_norm")
    body = values(ui_server, run, "grad_norm", layer=["2.weight", "2.bias"])
    for j, layer in enumerate(["2.weight", "2.bias"]):
        t = trace(chart, run=run, layer=layer, role="value")
        assert all(same(a, finite_or_none(row[j])) for a, row in zip(t["y"], body["values"]))
    assert any(s.get("x0") == step for s in chart["layout"]["shapes"])

    # The screenshot: the vanishing-gradient run, where the heatmap tells the story.
    tab.select_runs(["vanishing_sigmoid"])
    tab.show("gradients")
    tab.click_cell("gradients:vanishing_sigmoid", 200, 0)
    tab.frame.wait_for_function(
        "() => document.querySelector('[data-panel=\"gradients:profile\"]')?.dataset.stepLo === '200'"
    )
    tab.wait_ready("gradients")
    tab.screenshot("gradients.png", height="content")
    tab.assert_clean()


def test_activations_heatmap_with_layer_types(tab, ui_server):
    runs = ["dying_relu", "healthy"]
    tab.select_runs(runs)
    tab.show("activations")
    for metric in ("act_std", "dead_fraction"):
        tab.frame.locator("[data-view=activations] .metric-select").select_option(metric)
        tab.wait_ready("activations")
        for run in runs:
            body = values(ui_server, run, metric)
            data = tab.chart(f"activations:{run}")["data"][0]
            assert data["y"] == [f"{n} · {t}" for n, t in zip(body["layers"], body["layer_types"])]
            for j in range(len(body["layers"])):
                cells = zip(data["customdata"][j], (row[j] for row in body["values"]))
                assert all(same(float(a), num(b)) for a, b in cells)
    # The profile overlays the runs, layers lined up by name, each run in its run-list colour.
    prof = tab.chart("activations:profile")
    swatches = tab.frame.evaluate(
        """Object.fromEntries([...document.querySelectorAll('.run-row')].map(r =>
             [r.dataset.run, getComputedStyle(r.querySelector('.swatch')).backgroundColor]))"""
    )
    colors = {t["name"]: t["color"] for t in prof["data"] if t["name"] in runs}
    assert sorted(colors) == runs
    assert all(_rgb(c) == swatches[run] for run, c in colors.items())
    tab.screenshot("activations.png", height="content")
    tab.assert_clean()


def _rgb(hex_color):
    n = int(hex_color[1:], 16)
    return f"rgb({n >> 16 & 255}, {n >> 8 & 255}, {n & 255})"


def test_loss_view_components_spread_spikes_nonfinite(tab, ui_server):
    tab.select_runs(["diverging", "healthy", "loss_only"])
    tab.show("loss")
    # Per-sample spread bands where recorded (the demo records the batch's CE percentiles).
    chart = tab.chart("loss:ce")
    lower, upper = [t for t in chart["data"] if t["meta"] == {"run": "healthy", "component": "ce", "role": "p05-p95"}]
    p05, p95 = values(ui_server, "healthy", "loss_p05"), values(ui_server, "healthy", "loss_p95")
    assert all(same(a, num(b[0])) for a, b in zip(lower["y"], p05["values"]))
    assert all(same(a, num(b[0])) for a, b in zip(upper["y"], p95["values"]))
    # Non-finite steps are marked where the route has NaN/Inf.
    total = tab.chart("loss:total")
    body = values(ui_server, "diverging", "loss")
    bad = [s for s, row in zip(body["steps"], body["values"]) if not math.isfinite(num(row[0]))]
    assert bad and trace(total, run="diverging", role="nonfinite")["x"] == bad
    # The validation loss (val_loss) is drawn over the training total.
    val = values(ui_server, "loss_only", "val_loss")
    t = trace(total, run="loss_only", role="validation")
    assert t["x"] == val["steps"] == VAL_STEPS and all(same(a, num(b[0])) for a, b in zip(t["y"], val["values"]))
    scale = tab.frame.locator("[data-view=loss] select")
    scale.select_option("log")
    tab.wait_ready("loss")
    assert tab.chart("loss:total")["layout"]["yaxis_type"] == "log"
    scale.select_option("auto")
    tab.wait_ready("loss")
    tab.select_runs(["diverging", "healthy", "dying_relu"])
    tab.screenshot("loss.png", height="content")
    tab.assert_clean()


def test_model_tree_and_layer_drilldown(tab, ui_server):
    run = "dying_relu"
    tab.select_runs([run])
    tab.show("model")
    structure = ui_server.plugin(f"structure?run={run}")["structure"]["modules"]
    nodes = tab.frame.evaluate(
        """[...document.querySelectorAll('.tree .node')].map(n =>
             ({name: n.dataset.module, status: n.dataset.status, text: n.innerText}))"""
    )
    assert [n["name"] for n in nodes] == [m["name"] for m in structure]
    for node, mod in zip(nodes, structure):
        assert mod["type"] in node["text"]
        for p in mod["params"]:
            assert "[" + "×".join(map(str, p["shape"])) + "]" in node["text"]
    by_name = {n["name"]: n for n in nodes}
    # The tree shows the findings' own verdicts (one rules engine), folded into modules.
    found = ui_server.plugin(f"findings?run={run}")
    rank = {"ok": 3, "info": 2, "warning": 1, "error": 0}
    named: dict[str, str] = {}
    for f in found["findings"]:
        for n in f["layers"]:
            mod = n.rsplit(".", 1)[0] if n.endswith((".weight", ".bias")) else n  # the demo's sites are nn.ReLU modules
            if mod in by_name and rank[f["severity"]] < rank.get(named.get(mod, "ok"), 3):
                named[mod] = f["severity"]
    assert any(f["kind"] == "dead_relu" for f in found["findings"])
    assert {k: v for k, v in named.items() if k} == {
        n["name"]: n["status"] for n in nodes if n["name"] and n["status"] != "ok"}
    assert all(by_name[m["name"]]["status"] == "ok" for m in structure if m["params"] and m["name"] not in named)
    worst = min(named.values(), key=rank.__getitem__)
    assert by_name[""]["status"] == worst == "error"  # the root shows the worst below it
    tab.screenshot("model.png")

    tab.frame.locator('.tree .node[data-module="2"]').click()
    tab.wait_ready("layer")
    assert tab.frame.evaluate("document.querySelector('.layer-heading').dataset.layer") == "2"
    tab.select_runs(DEMO_RUNS)
    chart = layer_chart(tab, "grad_norm")
    for r in ("dying_relu", "healthy", "diverging"):  # several runs overlaid
        body = values(ui_server, r, "grad_norm", layer=["2.weight"])
        t = trace(chart, run=r, layer="2.weight", role="value")
        assert all(same(a, finite_or_none(row[0])) for a, row in zip(t["y"], body["values"]))
    assert layer_chart(tab, "dead_fraction") is None  # module "2" is a Linear: no activation site
    picker = tab.frame.locator(".layer-picker")
    assert picker.locator("option").count() == 1  # the chosen module, until the picker is used
    picker.focus()  # as a user tabs to it (or presses on it): every module with a series
    assert picker.locator("option").all_inner_texts() == _modules_with_series(ui_server, DEMO_RUNS)
    picker.select_option("3")
    tab.wait_ready("layer")
    body = values(ui_server, run, "dead_fraction", layer=["3"])
    t = trace(layer_chart(tab, "dead_fraction"), run=run, layer="3", role="value")
    assert all(same(a, num(row[0])) for a, row in zip(t["y"], body["values"]))
    picker.focus()
    picker.select_option("2")
    tab.wait_ready("layer")
    tab.screenshot("layer.png", height="content")
    tab.assert_clean()


def test_hostile_names_are_text(tab):
    tab.select_runs([HOSTILE])
    tab.show("loss")
    names = tab.frame.evaluate("[...document.querySelectorAll('.run-row .run-name')].map(n => n.textContent)")
    assert HOSTILE in names
    heading = tab.on_chart(f"loss:{HOSTILE}", "box.querySelector('h3').textContent")
    assert HOSTILE in heading
    tab.show("overview")
    legend = tab.frame.evaluate("[...document.querySelectorAll('.legendtext')].map(t => t.textContent)")
    assert HOSTILE in legend  # Plotly drew the escaped name back as plain text
    cell = tab.frame.evaluate("document.querySelector('.figures-table tbody td.run-cell').textContent")
    assert HOSTILE in cell
    for view in ("gradients", "activations", "model", "layer"):
        tab.show(view)
    assert tab.frame.evaluate("document.querySelectorAll('img').length") == 0
    tab.page.wait_for_timeout(500)  # an onerror handler would have run by now
    tab.assert_clean()


def test_sparse_runs_get_clear_messages(tab):
    tab.select_runs(["single_step"])
    tab.show("gradients")
    assert "only one logged step" in tab.view_text("gradients")
    assert len(tab.chart("gradients:single_step")["data"][0]["x"]) == 1
    tab.show("loss")
    assert trace(tab.chart("loss:total"), run="single_step", role="value")["mode"] == "markers"

    tab.select_runs(["loss_only"])
    tab.show("gradients")
    assert "has no grad_norm recorded" in tab.view_text("gradients")
    tab.show("activations")
    assert "no dead_fraction recorded" in tab.view_text("activations")
    tab.show("model")
    assert "has no model structure summary" in tab.view_text("model")
    tab.show("layer")
    assert "no per-layer metrics" in tab.view_text("layer")
    tab.show("overview")
    assert "No grad_norm_total recorded" in tab.view_text("overview")
    tab.assert_clean()


def test_theme_follows_tensorboard_and_charts_export_png(tab):
    tab.select_runs(["healthy"])
    tab.show("gradients")
    key = "gradients:healthy"
    tab.page.evaluate("document.body.classList.add('dark-mode')")  # what TensorBoard's theme toggle does
    tab.frame.wait_for_function("document.documentElement.dataset.theme === 'dark'")
    tab.wait_chart(key, "gd._fullLayout.font.color === '#e8eaed'")
    tab.wait_ready("gradients")
    tab.screenshot("dark.png")
    tab.page.evaluate("document.body.classList.remove('dark-mode')")
    tab.wait_chart(key, "gd._fullLayout.font.color === '#212121'")
    png = tab.on_chart(key, "Plotly.toImage(gd, {format: 'png', width: 600, height: 300})")
    assert png.startswith("data:image/png;base64,")
    assert tab.frame.locator('[data-view=gradients] .modebar-btn[data-title="Download plot as a PNG"]').count() >= 1
    tab.assert_clean()


def test_live_run_updates_without_losing_zoom_or_selection(tab, ui_server, ui_logdir):
    key = "gradients:live"
    live = LiveRun(ui_logdir / "live")
    try:
        live.steps(6)
        tab.frame.wait_for_function("tbDiag.state.runs.some(r => r.run === 'live')", timeout=60_000)
        tab.select_runs(["live"])
        tab.show("gradients")
        tab.wait_chart(key, "gd.data[0].x.length === 6")
        tab.click_cell(key, 2, 0)
        tab.frame.wait_for_function(
            "() => document.querySelector('[data-panel=\"gradients:profile\"]')?.dataset.stepLo === '2'"
        )
        tab.wait_ready("gradients")
        tab.drag_x(key, 1, 4)
        zoomed = tab.chart(key)["layout"]["xrange"]
        assert 0.5 < zoomed[0] < 1.5 and 3.5 < zoomed[1] < 4.5

        live.steps(6)  # training goes on while the tab is open
        tab.wait_chart(key, "gd.data[0].x.length === 12")
        tab.wait_ready("gradients")
        body = values(ui_server, "live", "grad_norm")
        chart = tab.chart(key)
        assert chart["data"][0]["x"] == body["steps"] == list(range(12))
        assert all(same(chart["data"][0]["customdata"][0][i], num(row[0])) for i, row in enumerate(body["values"]))
        assert chart["layout"]["xrange"] == zoomed  # the zoom survived the update
        assert tab.frame.evaluate("document.querySelector('[data-panel=\"gradients:profile\"]').dataset.stepLo") == "2"
        assert tab.frame.evaluate("tbDiag.state.view") == "gradients"
    finally:
        live.close()
    tab.assert_clean()


def test_empty_logdir_says_so_until_a_run_appears(browser, tmp_path):
    with serve(str(tmp_path), plugins=_all_plugins()) as srv:
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        try:
            own = Tab(context.new_page(), srv)
            assert "No diagnostics recorded yet" in own.frame.inner_text(".banner")
            live = LiveRun(tmp_path / "first")
            try:
                live.steps(3)
                own.frame.wait_for_function("tbDiag.state.runs.length === 1", timeout=60_000)
                own.wait_chart("grad_norm_total", "gd.data.some(t => t.meta && t.meta.run === 'first')")
                assert own.frame.inner_text(".banner").strip() == ""
                assert own.frame.evaluate("[...tbDiag.state.selected]") == ["first"]
            finally:
                live.close()
            own.assert_clean()
        finally:
            context.close()


def test_model_view_draws_the_tree_before_the_findings(browser, tmp_path):
    """The model view does not wait for the findings: while they cannot be computed (background work held
    by a request in flight) the tree is drawn and says its verdicts are pending; they are added when ready."""
    from tb_diag_plugin.diagnostics_plugin import Config
    from tbserver import serve_with_plugin

    _train(tmp_path / "r", steps=12)
    config = Config(read_ahead_yield_s=600, findings_wait_s=0.0)
    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        srv.wait_for_runs(1)
        context = browser.new_context(viewport={"width": 1440, "height": 1000})
        try:
            page = context.new_page()
            with plugin.store.foreground():  # the read-ahead, which computes the findings, waits
                page.goto(srv.url + "#diagnostics")
                frame = Tab._find_frame(type("Page", (), {"page": page})())
                frame.click('[data-tab="model"]')
                frame.wait_for_function("document.querySelectorAll('.tree .node').length > 0", timeout=60_000)
                assert len(plugin.store.findings_cache) == 0, "the tree waited for the findings"
                names = frame.evaluate("[...document.querySelectorAll('.tree .node')].map(n => n.dataset.module)")
                structure = srv.plugin("structure?run=r")["structure"]["modules"]
                assert names == [m["name"] for m in structure]
                assert frame.evaluate("document.querySelector('.model-body').dataset.findings") == "pending"
            frame.wait_for_function("document.querySelector('[data-view=\"model\"]').dataset.state === 'ready'",
                                    timeout=60_000)
            assert frame.evaluate("document.querySelector('.model-body').dataset.findings") == "ready"
            assert len(plugin.store.findings_cache) == 1
        finally:
            context.close()


# ------------------------------------------- issue 23.5: the tab never mixes runs up
def _marked_rows(chart):
    """Row indices of a heatmap inside a selection frame (one frame spans adjacent rows)."""
    rects = [sh for sh in chart["layout"]["shapes"] if sh.get("type") == "rect" and sh.get("yref") == "y"]
    return {row for sh in rects for row in range(round(sh["y0"] + 0.5), round(sh["y1"] + 0.5))}


def _finding_link(tab, run, kind):
    return tab.frame.locator(f'.finding[data-kind="{kind}"][data-run="{run}"] .finding-link').first


def test_finding_click_marks_exactly_its_layers_in_its_own_run(tab, ui_server):
    tab.select_runs(DEMO_RUNS)
    tab.show("overview")
    finding = next(f for f in ui_server.plugin("findings?run=vanishing_sigmoid")["findings"]
                   if f["kind"] == "vanishing_gradient")
    assert len(finding["layers"]) > 2
    _finding_link(tab, "vanishing_sigmoid", "vanishing_gradient").click()
    tab.wait_ready("gradients")
    metric = tab.frame.locator("[data-view=gradients] .metric-select").input_value()
    for run in DEMO_RUNS:
        layers = values(ui_server, run, metric)["layers"]
        marked = {layers[i] for i in _marked_rows(tab.chart(f"gradients:{run}"))}
        # exactly the tensors the finding names, in its own run; nothing in the others (which have 0.weight too)
        assert marked == (set(finding["layers"]) if run == "vanishing_sigmoid" else set()), run
    tab.screenshot("finding_marks.png", height="content", folder=CHECKS)

    tab.show("overview")
    dead = next(f for f in ui_server.plugin("findings?run=dying_relu")["findings"] if f["kind"] == "dead_relu")
    _finding_link(tab, "dying_relu", "dead_relu").click()
    tab.wait_ready("activations")
    for run in ("dying_relu", "healthy", "diverging"):  # all three have ReLU sites 1, 3, 5
        layers = values(ui_server, run, "dead_fraction")["layers"]
        marked = {layers[i] for i in _marked_rows(tab.chart(f"activations:{run}"))}
        assert marked == (set(dead["layers"]) if run == "dying_relu" else set()), run
    tab.assert_clean()


def _modules_with_series(server, runs):
    """What the drill-down's picker lists for `runs` (in the server's order): each module that owns a series
    of a per-layer metric, once, in the order first met (run by run: parameters, activation sites, modules)."""
    order = [r["run"] for r in server.plugin("runs")["runs"] if r["run"] in runs]
    seen = {}
    for run in order:
        metrics = server.plugin(f"tags?run={urllib.parse.quote(run)}")["metrics"]
        for kind in ("param", "site", "module"):
            for spec in (m for m in METRIC_SPECS if m.layer_kind == kind):
                for n in metrics.get(spec.name, {}).get("layers", []):
                    seen.setdefault(module_of(n, kind) or "(model)", None)
    return list(seen)


def _site_type(ui_server, run, module):
    modules = ui_server.plugin(f"structure?run={run}")["structure"]["modules"]
    return next(m["type"] for m in modules if m["name"] == module)


def test_model_click_opens_that_runs_layer(tab, ui_server):
    tab.select_runs(DEMO_RUNS)
    for run in ("healthy", "vanishing_sigmoid"):
        tab.show("model")
        tab.frame.locator("[data-view=model] .toolbar select").select_option(run)
        tab.wait_ready("model")
        tab.frame.locator('.tree .node[data-module="1"]').click()
        tab.wait_ready("layer")
        heading = tab.frame.locator(".layer-heading")
        assert heading.get_attribute("data-runs") == run
        want = _site_type(ui_server, run, "1")
        other = "Sigmoid" if want == "ReLU" else "ReLU"
        assert f"1 ({want})" in heading.inner_text() and other not in heading.inner_text()
        metric = "dead_fraction" if want == "ReLU" else "saturation"
        chart = layer_chart(tab, metric)
        assert {t["meta"]["run"] for t in chart["data"]} == {run}
        body = values(ui_server, run, metric, layer=["1"])
        t = trace(chart, run=run, layer="1", role="value")
        assert all(same(a, finite_or_none(row[0])) for a, row in zip(t["y"], body["values"]))
    # Asked for, the other runs join; the heading names each run's type.
    tab.frame.locator(".layer-heading .compare").click()
    tab.wait_ready("layer")
    text = tab.frame.inner_text(".layer-heading")
    relu = [r for r in DEMO_RUNS if _site_type(ui_server, r, "1") == "ReLU"]
    assert f"ReLU in {', '.join(relu)}" in text and "Sigmoid in vanishing_sigmoid" in text
    assert {t["meta"]["run"] for t in layer_chart(tab, "act_std")["data"]} == set(DEMO_RUNS)
    tab.assert_clean()


def _palette():
    import re

    src = (pathlib.Path(__file__).parent.parent / "frontend_static" / "charts.js").read_text()
    return re.findall(r'"(#[0-9a-f]{6})"', re.search(r"const RUN_COLORS = \[(.*?)\];", src).group(1))


def _expected_colours(names, kept=None):
    """The colours the tab must give `names` (in the server's order) when it already gave `kept`
    ({run: colour}): each new run takes the palette slot of FNV-1a (32 bit) of its UTF-8 bytes, or
    the next slot that no listed run holds."""
    palette = _palette()
    slots = {n: palette.index(c) for n, c in (kept or {}).items()}
    used = {slots[n] for n in names if n in slots}
    for n in names:
        if n in slots:
            continue
        h = 0x811C9DC5
        for b in n.encode("utf-8"):
            h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
        k = h % len(palette)
        slots[n] = next(((k + p) % len(palette) for p in range(len(palette)) if (k + p) % len(palette) not in used), k)
        used.add(slots[n])
    return {n: palette[slots[n]] for n in names}


def _swatches(frame):
    return frame.evaluate(
        """Object.fromEntries([...document.querySelectorAll('.run-row')].map(r =>
             [r.dataset.run, getComputedStyle(r.querySelector('.swatch')).backgroundColor]))""")


def _legend(tab, key):
    """{run: colour} of a chart's legend entries, checking that Plotly drew each one."""
    shown = tab.on_chart(key, """(() => {
        const drawn = [...gd.querySelectorAll('.legendtext')].map(t => t.textContent);
        const entries = gd.data.filter(t => t.showlegend !== false).map(t => [t.meta.run, t.line.color]);
        return {on: gd._fullLayout.showlegend, drawn, entries,
                runs: [...new Set(gd.data.filter(t => t.meta && t.meta.role === 'value').map(t => t.meta.run))]};
    })()""")
    assert shown["on"] and sorted(shown["drawn"]) == sorted(r for r, _ in shown["entries"]), (key, shown)
    assert sorted(r for r, _ in shown["entries"]) == sorted(shown["runs"]), key  # every overlaid run, once
    return {r: _rgb(c) for r, c in shown["entries"]}


def test_run_colours_stay_with_the_run_and_every_overlay_has_a_legend(tab, ui_server, ui_logdir, browser):
    # Every chart that overlays runs has a legend, in the run list's colours.
    tab.select_runs(DEMO_RUNS)
    swatches = _swatches(tab.frame)
    charts = {"overview": ("grad_norm_total", "loss_total", "learning_rate", "dead_share"),
              "loss": ("loss:total", "loss:ce"), "layer": ("layer",)}
    for view, keys in charts.items():
        tab.show(view)
        if view == "layer":
            tab.frame.locator(".layer-picker").focus()
            tab.frame.locator(".layer-picker").select_option("0")
            tab.wait_ready("layer")
        for key in keys:
            legend = _legend(tab, key)
            # each run drawn there (vanishing_sigmoid has no ReLU: no dead share), in its run-list colour
            assert len(legend) > 1 and set(legend) <= set(DEMO_RUNS), key
            assert legend == {r: swatches[r] for r in legend}, key

    # A browser that meets these runs first, a reload, and a run that appears later.
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    try:
        other = Tab(context.new_page(), ui_server)
        names = other.frame.evaluate("tbDiag.state.runs.map(r => r.run)")
        first = _swatches(other.frame)
        assert first == {n: _rgb(c) for n, c in _expected_colours(names).items()}
        if len(names) <= len(_palette()):
            assert len(set(first.values())) == len(names)  # no two runs share a colour while the palette lasts
        other.page.reload()
        other.frame = other._find_frame()
        other.wait_ready("overview")
        assert _swatches(other.frame) == first
        live = LiveRun(ui_logdir / "another run")
        try:
            live.steps(2)
            other.frame.wait_for_function("tbDiag.state.runs.some(r => r.run === 'another run')", timeout=60_000)
            other.frame.wait_for_function("document.querySelectorAll('.run-row').length === tbDiag.state.runs.length")
            after = _swatches(other.frame)
            assert {n: c for n, c in after.items() if n in first} == first  # nobody's colour moved
            names = other.frame.evaluate("tbDiag.state.runs.map(r => r.run)")
            kept = {n: _expected_colours(list(first))[n] for n in first}
            assert after["another run"] == _rgb(_expected_colours(names, kept)["another run"])
        finally:
            live.close()
        other.assert_clean()
    finally:
        context.close()
    # the module's page sees the new run too (and adds it to its selection) before the next test chooses runs
    tab.frame.wait_for_function("tbDiag.state.runs.some(r => r.run === 'another run')", timeout=60_000)
    tab.assert_clean()


def test_model_view_marks_nonfinite_activation_sites(tab, ui_server):
    run = "diverging"
    tab.select_runs([run])
    tab.show("model")
    tab.frame.locator("[data-view=model] .toolbar select").select_option(run)
    tab.wait_ready("model")
    tab.frame.wait_for_function("document.querySelector('.model-body').dataset.findings === 'ready'", timeout=60_000)
    # Independently: the first step at which each site has a NaN/Inf value in any site metric.
    first = {}
    for metric in ("dead_fraction", "act_mean", "act_std", "saturation"):
        if metric not in next(r for r in ui_server.plugin("runs")["runs"] if r["run"] == run)["metrics"]:
            continue
        body = values(ui_server, run, metric, points=400)
        for j, site in enumerate(body["layers"]):
            counts = body.get("nonfinite") or [[0] * len(body["layers"])] * len(body["steps"])  # binned rows only
            bad = [s for s, row, nf in zip(body["steps"], body["values"], counts)
                   if not math.isfinite(num(row[j])) or nf[j]]
            if bad:
                first[site] = min(first.get(site, bad[0]), bad[0])
    assert len(first) >= 2  # the demo's diverging run: every ReLU site ends NaN
    nodes = tab.frame.evaluate("""Object.fromEntries([...document.querySelectorAll('.tree .node')].map(n =>
        [n.dataset.module, {status: n.dataset.status, nonfinite: n.dataset.nonfinite, text: n.innerText}]))""")
    for site, step in first.items():
        node = nodes[site]  # the demo's sites are nn.ReLU modules: the site is its own module
        assert node["nonfinite"] == f"{site}@{step}", (site, node)
        assert node["status"] in ("nonfinite", "error") and node["status"] != "ok", (site, node)
    # a site that no finding names is not "ok": it says NaN/Inf and from when
    found = ui_server.plugin(f"findings?run={run}")["layers"]
    quiet = [s for s in first if s not in found]
    assert quiet, "every NaN site is named by a finding: nothing left to check"
    for site in quiet:
        assert nodes[site]["status"] == "nonfinite" and f"NaN/Inf from step {first[site]}" in nodes[site]["text"]
    tab.screenshot("model_nonfinite.png", folder=CHECKS)
    tab.assert_clean()


def test_help_text_and_axes_follow_the_metric(tab, ui_server):
    tab.select_runs(["vanishing_sigmoid"])
    tab.show("activations")
    select = tab.frame.locator("[data-view=activations] .metric-select")
    helps = {}
    cases = (("saturation", "vanishing_sigmoid"), ("dead_fraction", "dying_relu"), ("act_mean", "dying_relu"))
    for metric, run in cases:
        tab.select_runs([run])
        select.select_option(metric)
        tab.wait_ready("activations")
        help_ = tab.frame.locator("[data-view=activations] .metric-help")
        assert help_.get_attribute("data-metric") == metric
        helps[metric] = help_.inner_text()
        z = tab.on_chart(f"activations:{run}", "[gd.data[0].zmin, gd.data[0].zmax]")
        yrange = tab.on_chart("activations:profile", "gd._fullLayout.yaxis.range")
        body = values(ui_server, run, metric)
        finite = [num(v) for row in body["values"] for v in row if math.isfinite(num(v))]
        if metric in ("saturation", "dead_fraction"):  # fractions: 0-1 on every axis
            assert 0 <= min(finite) and max(finite) <= 1
            assert z == [0, 1]
            assert -0.05 <= yrange[0] <= 0 and 1 <= yrange[1] <= 1.05, yrange
        else:
            assert z[0] < 0 or min(finite) >= 0  # signed data keeps its own range
    assert "saturat" in helps["saturation"].lower() and "dead" not in helps["saturation"].lower()
    assert "dead" in helps["dead_fraction"].lower() and "saturat" not in helps["dead_fraction"].lower()
    assert len(set(helps.values())) == 3
    tab.select_runs(["vanishing_sigmoid"])
    select.select_option("saturation")
    tab.wait_ready("activations")
    tab.screenshot("saturation.png", height="content", folder=CHECKS)
    tab.assert_clean()


def test_loss_component_share_leaves_nan_steps_blank(tab, ui_server):
    run = "diverging"
    tab.select_runs(DEMO_RUNS)
    tab.show("overview")
    tab.frame.locator(".comp-run").select_option(run)
    tab.wait_ready("overview")
    chart = tab.chart("components")
    assert chart["dataset"] == {**chart["dataset"], "run": run, "mode": "share"}
    body = values(ui_server, run, "loss", points=400)
    comps = [n for n in body["layers"] if n != "total"]
    rows = [[num(row[body["layers"].index(c)]) for c in comps] for row in body["values"]]
    nan_rows = [i for i, r in enumerate(rows) if not all(math.isfinite(x) for x in r)]
    assert nan_rows, "the diverging run has NaN loss steps"
    for c, name in enumerate(comps):
        t = trace(chart, run=run, component=name)
        for i, r in enumerate(rows):
            if i in nan_rows:  # a gap, never 0 % (nor 100 %)
                assert t["customdata"][i] is None and t["y"][i] is None, (name, body["steps"][i])
            else:
                total = sum(abs(x) for x in r)
                assert same(t["customdata"][i], 100 * abs(r[c]) / total, rel=1e-4)
                assert same(t["y"][i], sum(100 * abs(x) / total for x in r[: c + 1]), rel=1e-4)
    assert f"{len(nan_rows)} logged steps with a NaN/Inf component left blank" in chart["panel"]
    tab.screenshot("components_nan.png", folder=CHECKS)
    tab.assert_clean()


def test_each_runs_worst_finding_shows_without_show_all(tab, ui_server):
    tab.select_runs(DEMO_RUNS)
    tab.show("overview")
    tab.frame.wait_for_function("document.querySelector('.findings').dataset.state === 'ok'", timeout=60_000)
    shown = tab.frame.evaluate("""[...document.querySelectorAll('.finding')].filter(li => !li.hidden)
        .map(li => [li.dataset.run, li.dataset.kind, li.querySelector('.finding-msg').textContent])""")
    assert tab.frame.locator("button.more").count() == 1  # some are behind "Show all"...
    for run in DEMO_RUNS:
        found = ui_server.plugin(f"findings?run={run}")["findings"]
        if found:  # ...but never a run's worst (the route lists worst first)
            assert [run, found[0]["kind"], found[0]["message"]] in shown, run
    assert any(r == "vanishing_sigmoid" and k == "vanishing_gradient" for r, k, _ in shown)
    tab.assert_clean()


def test_overview_does_not_grow_with_the_runs(tab):
    def charts():
        tab.wait_ready("overview")
        return tab.frame.evaluate("""(() => {
            const g = document.querySelector('[data-view=overview] .small-multiples');
            return {panels: g.querySelectorAll('[data-panel]').length, height: g.getBoundingClientRect().height};
        })()""")

    tab.show("overview")
    tab.select_runs(["healthy"])
    one = charts()
    tab.select_runs(DEMO_RUNS + ["single_step", "loss_only", HOSTILE])
    many = charts()
    assert many["panels"] == one["panels"] == 5  # four headline signals and one loss-component chart
    assert many["height"] <= one["height"] + 30
    tab.screenshot("overview_many.png", height="content", folder=CHECKS)
    tab.assert_clean()


def test_loss_view_marks_the_spikes_the_findings_report(tab, ui_server):
    runs = ["loss_only", "healthy", "diverging"]
    tab.select_runs(runs)
    tab.show("loss")
    total = tab.chart("loss:total")
    for run in runs:
        spikes = [s for f in ui_server.plugin(f"findings?run={run}")["findings"]
                  if f["kind"] == "loss_spike" and "total" in f["layers"] for s in f["steps"]]
        drawn = [t["x"] for t in total["data"] if t.get("meta") == {"run": run, "component": "total", "role": "spike"}]
        assert drawn == ([spikes] if spikes else []), run
    assert trace(total, run="loss_only", role="spike")["x"] == [SPIKE_STEP]  # the one written into loss_only
    # one detector: the tab's own is gone
    assert tab.frame.evaluate("import('./static/charts.js').then(m => 'spikes' in m)") is False
    tab.assert_clean()
