"""The heatmap views of a wide model in headless Chromium (issue 24 points 1 and 3): layers grouped to
the screen along the module tree, a group opened by a click, the group holding a NaN marked, and a
live poll that fetches nothing again while the run has not changed, then only the metric that grew.

Compared with the routes' answers and with the values written, on a real TensorBoard.
"""

from __future__ import annotations

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
