"""The heatmap views of a wide model in headless Chromium (issue 24 points 1 and 3): layers grouped to
the screen along the module tree, a group opened by a click, the group holding a NaN marked, and a
live poll that fetches nothing again while the run has not changed, then only the metric that grew.

Compared with the routes' answers and with the values written, on a real TensorBoard.
"""

from __future__ import annotations

import json
import struct
import urllib.parse

import numpy as np
import pytest
from test_browser import Tab, _all_plugins

from tb_diag_plugin.summary import EventWriter
from tbserver import serve

BLOCKS, EXPERTS = 40, 8
LAYERS = (["embed.weight"]
          + [f"model.layers.{b}.{p}" for b in range(BLOCKS)
             for p in [f"mlp.experts.{e}.{t}" for e in range(EXPERTS) for t in ("weight", "bias")] + ["attn.q.weight"]]
          + ["lm_head.weight"])
BAD_LAYER = "model.layers.17.mlp.experts.3.weight"
BAD_STEP = 12
RUN = "moe"


def _write(w: EventWriter, steps, with_weights: bool) -> None:
    rng = np.random.default_rng(steps[0])
    for s in steps:
        g = rng.lognormal(-3, 1, len(LAYERS)).astype(np.float32)
        if s == BAD_STEP:
            g[LAYERS.index(BAD_LAYER)] = np.nan
        items = [("grad_norm", LAYERS, (), g)]
        if with_weights:
            items.append(("weight_norm", LAYERS, (), np.ones(len(LAYERS), np.float32)))
        w.write_vectors(s, items)
    w.flush()


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    d = tmp_path_factory.mktemp("wide")
    w = EventWriter(str(d / RUN), flush_secs=1)
    _write(w, range(30), with_weights=True)
    with serve(str(d), plugins=_all_plugins()) as srv:
        srv.wait_for_runs(1)
        yield srv, w
    w.close()


def _values(server, **params):
    q = urllib.parse.urlencode({"run": RUN, "metric": "grad_norm", **params}, doseq=True)
    return server.plugin(f"values?{q}")


def test_wide_model_groups_rows_marks_nan_and_opens_on_click(browser, wide):
    server, writer = wide
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    requests = []
    page.on("requestfinished", lambda r: requests.append(r))
    try:
        tab = Tab(page, server)
        tab.show("gradients")
        key = f"gradients:{RUN}"
        tab.wait_chart(key, "gd.data[0].y.length > 0")
        max_rows = int(tab.on_chart(key, "box.dataset.maxRows"))
        want = _values(server, points=1000, max_rows=max_rows)
        assert want["grouped"] and len(want["layers"]) <= max_rows < len(LAYERS)
        y = tab.chart(key)["data"][0]["y"]
        assert len(y) == len(want["layers"])
        # The group that holds the NaN tensor, and only it, is marked; its cell is non-finite.
        holding = [j for j, n in enumerate(want["layers"]) if BAD_LAYER.startswith(n + ".") or BAD_LAYER == n]
        assert len(holding) == 1
        marked = [j for j, label in enumerate(y) if label.startswith("⚠")]
        assert marked == holding
        assert want["nonfinite"][BAD_STEP][holding[0]] == 1
        # A click on a group's row opens it in place: its children take its row.
        group = want["layers"][holding[0]]
        rows_before = len(y)
        tab.click_cell(key, 3, holding[0])
        tab.wait_chart(key, f"gd.data[0].y.length !== {rows_before}")
        tab.wait_ready("gradients")
        opened = _values(server, points=1000, max_rows=max_rows, expand=[group])
        y2 = tab.chart(key)["data"][0]["y"]
        assert len(y2) == len(opened["layers"]) > rows_before
        assert not any(group == n for n in opened["layers"])

        # A finding's layers (as a click on it marks them) get rows of their own, framed, in a grouped view.
        tab.frame.evaluate("([run, layer]) => tbDiag.select({marked: {run, layers: [layer]}, layer: null})",
                           [RUN, BAD_LAYER])
        tab.wait_chart(key, f"gd.data[0].y.includes({BAD_LAYER!r})")
        tab.wait_ready("gradients")
        chart = tab.chart(key)
        row = chart["data"][0]["y"].index(BAD_LAYER)
        assert len(chart["data"][0]["y"]) < len(LAYERS)
        assert any(s["type"] == "rect" and s["y0"] <= row <= s["y1"] for s in chart["layout"]["shapes"])

        # A finding naming a layer in every block: the view opens rows for those that fit the screen (the
        # first always); the others stay in their blocks, which the server says hold them, and are framed.
        marked = [f"model.layers.{b}.mlp.experts.{b % EXPERTS}.weight" for b in range(BLOCKS)]
        tab.frame.evaluate("([run, layers]) => tbDiag.select({marked: {run, layers}, layer: null})", [RUN, marked])
        tab.wait_chart(key, f"gd.data[0].y.includes({marked[0]!r}) && !gd.data[0].y.includes({BAD_LAYER!r})")
        tab.wait_ready("gradients")
        want = _values(server, points=1000, max_rows=max_rows, expand=[group], reveal=marked)  # the block opened above
        rows, groups = want["layers"], want["groups"]
        chart = tab.chart(key)
        assert len(chart["data"][0]["y"]) == len(rows) <= max_rows
        assert chart["data"][0]["y"][rows.index(marked[0])] == marked[0]
        inside = {c: sum(m.startswith(n + ".") for m in marked) for c, (n, g) in enumerate(zip(rows, groups)) if g}
        assert {c: g.get("revealed", 0) for c, g in enumerate(groups) if g} == inside
        assert sum(n in marked for n in rows) > 1 and sum(inside.values()) > 1
        assert sum(inside.values()) + sum(n in marked for n in rows) == BLOCKS
        framed = {r for s in chart["layout"]["shapes"] if s["type"] == "rect"
                  for r in range(round(s["y0"] + 0.5), round(s["y1"] + 0.5))}
        assert framed == {c for c, n in enumerate(rows) if n in marked or inside.get(c)}
        tab.frame.evaluate("tbDiag.select({marked: null, layer: null})")
        tab.wait_ready("gradients")

        # Live polls of a run that has not changed fetch no view again: only /runs and /versions.
        def polls():
            return tab.frame.evaluate("tbDiag.state.lastUpdate ? tbDiag.state.lastUpdate.getTime() : 0")

        start = polls()
        seen = len(requests)
        for _ in range(2):
            last = polls()
            tab.frame.wait_for_function(f"() => tbDiag.state.lastUpdate && tbDiag.state.lastUpdate.getTime() > {last}",
                                        timeout=60_000)
        assert polls() > start
        during = [urllib.parse.urlparse(r.url).path.rsplit("/", 1)[-1] for r in requests[seen:]]
        assert "versions" in during
        assert set(during) <= {"runs", "versions"}, during
        # The run grows in grad_norm only: the next poll fetches grad_norm, never weight_norm again.
        seen = len(requests)
        _write(writer, range(30, 36), with_weights=False)
        tab.wait_chart(key, "gd.data[0].x.length === 36")
        tab.wait_ready("gradients")
        fetched = [urllib.parse.parse_qs(urllib.parse.urlparse(r.url).query) for r in requests[seen:]
                   if urllib.parse.urlparse(r.url).path.endswith("/values")]
        assert fetched and {q["metric"][0] for q in fetched} == {"grad_norm"}
        tab.assert_clean()
    finally:
        context.close()


# ------------------------------------------- the model view and the overview (issue 24 points 1-2)
def _moe_run(w: EventWriter, blocks: int, bad: bool) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """A mixture-of-experts run with its structure: `blocks` blocks of 8 experts (a Linear and a ReLU
    call each) and an attention projection; returns (parameters, sites, the last step's dead fractions
    and gradient norms)."""
    params = ["embed.weight"]
    sites = []
    modules = [{"name": "", "type": "MoE", "num_params": 0, "params": [], "sites": []},
               {"name": "embed", "type": "Embedding", "num_params": 64,
                "params": [{"name": "embed.weight", "shape": [8, 8], "numel": 64, "tracked": True}], "sites": []}]
    for b in range(blocks):
        modules.append({"name": f"model.layers.{b}", "type": "Block", "num_params": 0, "params": [], "sites": []})
        q = f"model.layers.{b}.attn.q"
        modules.append({"name": q, "type": "Linear", "num_params": 16,
                        "params": [{"name": f"{q}.weight", "shape": [4, 4], "numel": 16, "tracked": True}],
                        "sites": []})
        params.append(f"{q}.weight")
        for e in range(EXPERTS):
            m = f"model.layers.{b}.mlp.experts.{e}"
            modules.append({"name": m, "type": "Linear", "num_params": 20,
                            "params": [{"name": f"{m}.weight", "shape": [4, 4], "numel": 16, "tracked": True},
                                       {"name": f"{m}.bias", "shape": [4], "numel": 4, "tracked": True}],
                            "sites": [{"name": f"{m}.relu()", "type": "F.relu", "kind": "relu"}]})
            params += [f"{m}.weight", f"{m}.bias"]
            sites.append(f"{m}.relu()")
    w.write_structure(0, {"version": 1, "modules": modules, "optimizer": None})
    rng = np.random.default_rng(blocks)
    dead = None
    for s in range(30):
        g = rng.lognormal(-3, 1, len(params)).astype(np.float32)
        if bad and s == BAD_STEP:
            g[params.index(BAD_LAYER)] = np.nan
        dead = rng.uniform(0, 1, len(sites)).astype(np.float32)
        w.write_vectors(s, [("grad_norm", params, (), g), ("dead_fraction", sites, ["F.relu"] * len(sites), dead),
                            ("grad_norm_total", [""], (), np.array([float(np.nansum(g ** 2)) ** 0.5], np.float32)),
                            ("loss", ["total"], (), np.array([1.0 / (s + 1)], np.float32))])
    w.flush()
    return params, sites, dead, g


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    """The same model at 2 and at 60 blocks (64 and 1,022 tensors); the big one has a NaN tensor."""
    d = tmp_path_factory.mktemp("sizes")
    runs = {}
    for run, blocks in (("moe_small", 2), ("moe_big", 60)):
        with EventWriter(str(d / run), flush_secs=1) as w:
            runs[run] = _moe_run(w, blocks, bad=run == "moe_big")
    with serve(str(d), plugins=_all_plugins()) as srv:
        srv.wait_for_runs(2)
        yield srv, runs


def _f32_header(body: bytes) -> dict:
    (n,) = struct.unpack("<I", body[:4])
    return json.loads(body[4:4 + n])


def test_overview_and_model_answers_do_not_grow_with_the_model(browser, two_sizes):
    server, runs = two_sizes
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    answers: list[tuple[dict, bytes]] = []

    def keep(response):
        url = urllib.parse.urlparse(response.url)
        if url.path.endswith(("/values", "/model")) and response.ok:
            answers.append(({k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()} | {"route": url.path},
                            response.body()))

    page.on("response", keep)
    try:
        tab = Tab(page, server)
        tab.select_runs(["moe_small", "moe_big"])
        tab.show("overview")
        # The overview's answers: the same rows and (up to the run's name) the same bytes for 64 and 1,022 tensors.
        over = {(q["run"], q["metric"]): body for q, body in answers if q["route"].endswith("/values")}
        for metric in ("dead_fraction", "grad_norm", "loss", "grad_norm_total"):
            if ("moe_big", metric) not in over:
                continue
            small, big = (_f32_header(over[(r, metric)]) for r in ("moe_small", "moe_big"))
            assert len(small["layers"]) == len(big["layers"]), metric
            assert len(over[("moe_big", metric)]) <= len(over[("moe_small", metric)]) + 64, metric
        assert len(_f32_header(over[("moe_big", "dead_fraction")])["layers"]) == 1
        # ...and what it draws is still the mean over every site, computed here from the values written.
        dead = next(t for t in tab.chart("dead_share")["data"] if t["meta"] == {"run": "moe_big", "role": "value",
                                                                                "layer": ""})
        assert dead["y"][-1] == pytest.approx(100 * float(np.mean(runs["moe_big"][2])), rel=1e-5)

        tab.select_runs(["moe_big"])
        answers.clear()
        tab.show("model")
        tab.frame.wait_for_function("document.querySelector('.model-body').dataset.findings === 'ready'",
                                    timeout=60_000)
        max_rows = int(tab.frame.evaluate("document.querySelector('.model-body').dataset.maxRows"))
        want = server.plugin(f"model?run=moe_big&max_rows={max_rows}")
        rows = tab.frame.evaluate("""[...document.querySelectorAll('.tree .node')].map(n =>
            ({module: n.dataset.module ?? null, group: n.dataset.group ?? null, status: n.dataset.status,
              nonfinite: n.dataset.nonfinite, text: n.innerText}))""")
        assert [r["group"] or r["module"] for r in rows] == [r["key"] for r in want["rows"]]
        # Bounded by the screen, not the model: 602 modules, at most 4 x max_rows rows with the sick branch open.
        assert want["num_modules"] == 2 + 60 * (2 + EXPERTS) and len(rows) <= 4 * max_rows < want["num_modules"]
        small = server.plugin(f"model?run=moe_small&max_rows={max_rows}")
        assert [r["key"] for r in small["rows"]] == ["", "embed"] + [
            n for b in range(2) for n in [f"model.layers.{b}", f"model.layers.{b}.attn.q"]
            + [f"model.layers.{b}.mlp.experts.{e}" for e in range(EXPERTS)]]
        # The NaN tensor's module is opened and marked, from the step of its NaN.
        bad_module = BAD_LAYER.rsplit(".", 1)[0]
        node = next(r for r in rows if r["module"] == bad_module)
        assert node["status"] in ("nonfinite", "error") and node["nonfinite"] == f"{BAD_LAYER}@{BAD_STEP}"
        assert bad_module in want["opened"]
        # Closed, the tree marks the one group that holds it, and no other.
        closed = server.plugin(f"model?run=moe_big&max_rows={max_rows}&open=false")
        holding = [r["key"] for r in closed["rows"]
                   if r["key"] == "" or bad_module == r["key"] or bad_module.startswith(r["key"] + ".")]
        assert len(closed["rows"]) <= max_rows
        for r in closed["rows"]:
            marked = r["key"] in holding and r["group"]
            assert (r["nonfinite_layers"], r["first_nonfinite"]) == ((1, BAD_STEP) if marked else (0, None)), r
        assert any(r["group"] for r in closed["rows"] if r["key"] in holding)
        # A group's gradient norms: mean, min and max of its members' last values, from the values written.
        last = dict(zip(runs["moe_big"][0], runs["moe_big"][3]))
        block = next(r for r in want["rows"] if r["group"] and r["key"] == "model.layers.5")
        mine = [v for n, v in last.items() if n.startswith("model.layers.5.")]
        assert block["grad_norm"]["count"] == len(mine) == 1 + 2 * EXPERTS
        assert block["grad_norm"]["mean"] == pytest.approx(float(np.mean(mine)), rel=1e-6)
        assert (block["grad_norm"]["min"], block["grad_norm"]["max"]) == pytest.approx((min(mine), max(mine)), rel=1e-6)
        # Every group row the tab drew says ⚠ exactly when it holds a NaN/Inf layer.
        for r, w in zip(rows, want["rows"]):
            if w["group"]:
                assert r["text"].startswith("⚠") == (w["nonfinite_layers"] > 0), r
        # A click on a group opens it in place: the rows become the server's with that group expanded.
        group = next(r["key"] for r in want["rows"] if r["group"] and r["key"] != "model.layers.17")
        tab.frame.locator(f'.tree .node[data-group="{group}"]').click()
        tab.frame.wait_for_function(f"!document.querySelector('.tree .node[data-group=\"{group}\"]')", timeout=60_000)
        tab.wait_ready("model")
        opened = server.plugin(f"model?run=moe_big&max_rows={max_rows}&expand={urllib.parse.quote(group)}")
        keys = tab.frame.evaluate(
            "[...document.querySelectorAll('.tree .node')].map(n => n.dataset.group ?? n.dataset.module)")
        assert keys == [r["key"] for r in opened["rows"]] and f"{group}.attn.q" in keys
        assert not tab.frame.locator(f'.tree .node[data-group="{group}"]').count()  # its module's own row remains
        # Bad input is a 4xx with its reason, never a 500.
        for query, code in (("open=maybe", 400), ("max_rows=0", 400), ("expand=nope", 404),
                            ("reveal=nope.weight", 404), ("wait_ms=99999", 400)):
            status, body, _ = server.get(f"/data/plugin/diagnostics/model?run=moe_big&{query}")
            assert status == code and "error" in json.loads(body), (query, status, body[:200])
        # The tab's model answers were each bounded by the rows it asked for.
        for q, body in answers:
            if q["route"].endswith("/model"):
                assert len(json.loads(body)["rows"]) <= 4 * int(q["max_rows"])
        tab.assert_clean()
    finally:
        context.close()
