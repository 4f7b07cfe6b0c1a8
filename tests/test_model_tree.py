"""The model view's rows (`serving.model_tree`), compared with hand computations over small trees."""

from __future__ import annotations

import numpy as np
import pytest

from tb_diag_plugin.series import Series
from tb_diag_plugin.serving import model_tree


def _series(values: np.ndarray, present: np.ndarray) -> Series:
    L = values.shape[1]
    return Series("grad_norm", [f"l{j}" for j in range(L)], [""] * L, np.arange(values.shape[0]) * 10, values, present)


def test_first_nonfinite_is_the_first_recorded_nan_or_inf_of_each_layer():
    rng = np.random.default_rng(0)
    v = rng.lognormal(size=(300, 50)).astype(np.float32)
    p = np.ones(v.shape, bool)
    v[5, 7], v[100, 7], v[299, 49] = np.nan, np.inf, -np.inf
    v[3, 9], p[3, 9] = np.nan, False  # absent: not a recorded NaN
    v[40, 20] = 3e38
    v[41, 20] = 3e38  # the column sum overflows: a candidate, but no NaN/Inf
    bad = ~np.isfinite(v) & p
    want = {f"l{j}": int(np.argmax(bad[:, j])) * 10 for j in range(50) if bad[:, j].any()}
    assert model_tree.first_nonfinite(_series(v, p), chunk=64) == want == {"l7": 50, "l49": 2990}
    # Every column a candidate (absent cells everywhere): the whole matrix is scanned, same answer.
    p[0] = False
    v[0] = np.nan
    assert model_tree.first_nonfinite(_series(v, p), chunk=64) == want



@pytest.mark.parametrize("points", [16, 1000])  # bins of many steps, and bins of one step each
def test_first_nonfinite_from_the_step_summary_reads_only_the_bins_holding_a_nan(points):
    from tb_diag_plugin.reading import downsample
    from tb_diag_plugin.reading.stepbins import summarize

    rng = np.random.default_rng(1)
    v = rng.lognormal(size=(300, 50)).astype(np.float32)
    p = np.ones(v.shape, bool)
    v[5, 7], v[100, 7], v[299, 49], v[17, 3], v[18, 30] = np.nan, np.inf, -np.inf, np.nan, np.inf
    v[3, 9], p[3, 9] = np.nan, False  # absent: not a recorded NaN
    series = _series(v, p)
    bad = ~np.isfinite(v) & p
    want = {f"l{j}": int(np.argmax(bad[:, j])) * 10 for j in range(50) if bad[:, j].any()}
    read = []

    def raw(a, b, cols):
        read.append((b - a, len(cols)))
        m = (series.steps >= a) & (series.steps <= b)
        return downsample.bin_steps(series.steps[m], v[m][:, cols], p[m][:, cols], int(m.sum()))

    assert model_tree.first_nonfinite_summarized(summarize(series, points), series.layers, raw) == want
    assert sum(cols for _, cols in read) == len(want)  # each NaN layer read once, in one bin
    assert max(span for span, _ in read) < 300 * 10 // min(points, 300) * 2


def _modules(blocks: int) -> list[dict]:
    mods = [{"name": "", "type": "Net", "num_params": 0, "params": [], "sites": []}]
    for b in range(blocks):
        mods.append({"name": f"blocks.{b}", "type": "Block", "num_params": 0, "params": [], "sites": []})
        for part in ("a", "b"):
            name = f"blocks.{b}.{part}"
            mods.append({"name": name, "type": "Linear", "num_params": 3,
                         "params": [{"name": f"{name}.weight", "shape": [3], "numel": 3, "tracked": True}],
                         "sites": []})
    return mods


def test_groups_carry_the_worst_status_the_nan_and_the_gradient_range_of_their_members():
    mods = _modules(100)  # 301 modules
    grads = {f"blocks.{b}.{p}.weight": float(b + (p == "b")) for b in range(100) for p in "ab"}
    grads["blocks.42.a.weight"] = float("nan")
    verdicts = {"blocks.7.b.weight": {"severity": "warning", "kinds": ["vanishing_gradient"], "layer_kind": "param"}}
    nonfinite = {"blocks.42.a.weight": (120, "param")}
    closed = model_tree.answer("r", mods, verdicts, nonfinite, (99, grads), max_rows=40, open_unhealthy=False)
    rows = closed["rows"]
    assert len(rows) <= 40 and closed["num_modules"] == 301 and closed["opened"] == []
    holding = [r for r in rows if r["nonfinite_layers"]]
    assert len(holding) == 1 and holding[0]["group"] and holding[0]["first_nonfinite"] == 120
    assert holding[0]["nonfinite"] == [["blocks.42.a.weight", 120]]
    assert holding[0]["status"] == "nonfinite"
    for r in rows:  # the gradient norms of each group: its members', by hand
        if r["group"] and r["key"] != "":
            lo, hi = (int(x) for x in r["key"][len("blocks["):-1].split(":"))
            mine = [grads[f"blocks.{b}.{p}.weight"] for b in range(lo, hi) for p in "ab"]
            fin = [x for x in mine if np.isfinite(x)]
            assert r["grad_norm"]["count"] == len(mine) and r["grad_norm"]["nonfinite"] == len(mine) - len(fin)
            assert (r["grad_norm"]["mean"], r["grad_norm"]["min"], r["grad_norm"]["max"]) == pytest.approx(
                (np.mean(fin), min(fin), max(fin)))
    assert rows[0]["key"] == "" and rows[0]["status"] == "nonfinite"  # the root: the worst below it
    # Open (the default): the NaN's module first, then the warning, each with its own row.
    opened = model_tree.answer("r", mods, verdicts, nonfinite, (99, grads), max_rows=40)
    keys = [r["key"] for r in opened["rows"]]
    assert opened["opened"] == ["blocks.42.a", "blocks.7.b"]
    assert "blocks.42.a" in keys and "blocks.7.b" in keys and len(keys) <= 4 * 40
    row = next(r for r in opened["rows"] if r["key"] == "blocks.7.b")
    assert (row["status"], row["why"]) == ("warning", "weight: vanishing gradient")
    assert next(r for r in opened["rows"] if r["key"] == "blocks.7.a")["status"] == "ok"
    # A finding's layer is revealed through its module; unknown names are errors, not empty answers.
    assert "blocks.99.b" in [r["key"] for r in model_tree.answer(
        "r", mods, None, {}, (None, {}), max_rows=10, reveal=["blocks.99.b.weight"])["rows"]]
    with pytest.raises(ValueError, match="no module or layer"):
        model_tree.answer("r", mods, None, {}, (None, {}), max_rows=10, reveal=["nope.weight"])
    with pytest.raises(ValueError, match="no group"):
        model_tree.answer("r", mods, None, {}, (None, {}), max_rows=10, expand=["nope"])


def test_a_small_model_is_every_module_in_order_and_nothing_is_ok_before_the_findings():
    mods = _modules(2)
    pending = model_tree.answer("r", mods, None, {}, (None, {}), max_rows=40)
    assert [r["key"] for r in pending["rows"]] == [m["name"] for m in mods]
    assert not any(r["group"] for r in pending["rows"]) and not pending["findings_complete"]
    assert {r["status"] for r in pending["rows"]} == {"none"}
    done = model_tree.answer("r", mods, {}, {}, (None, {}), max_rows=40)
    assert {r["key"]: r["status"] for r in done["rows"]}["blocks.1.a"] == "ok"


def test_the_model_answer_is_the_same_when_its_series_are_read_on_demand(tmp_path):
    """A run whose series do not fit the cache (read from the event files per request): the same rows."""
    from tensorboard.context import RequestContext
    from test_browser_scale import BAD_LAYER, BAD_STEP, _moe_run

    from tb_diag_plugin.diagnostics_plugin import Config
    from tb_diag_plugin.summary import EventWriter
    from tbserver import serve_with_plugin

    with EventWriter(str(tmp_path / "moe"), flush_secs=1) as w:
        _moe_run(w, 20, bad=True)
    answers = []
    for config in (Config(cache_bytes=16 << 10), Config()):
        with serve_with_plugin(str(tmp_path), extra=["--diagnostics_preload", "false"], config=config) as (srv, p):
            srv.wait_for_runs(1)
            srv.plugin("findings?run=moe")
            answers.append(srv.plugin("model?run=moe&max_rows=12"))
            ctx = RequestContext()
            series = p.store.series_and_key(ctx, "", "moe", "grad_norm", p.store.index(ctx, "")["moe"])[0]
            assert isinstance(series, Series) == (config.cache_bytes > 1 << 20)  # else read on demand
    tiny, default = answers
    assert tiny["rows"] == default["rows"] and tiny["grad_step"] == default["grad_step"] == 29
    bad = next(r for r in default["rows"] if r["key"] == BAD_LAYER.rsplit(".", 1)[0])
    assert bad["nonfinite"] == [[BAD_LAYER, BAD_STEP]]
