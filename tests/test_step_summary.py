"""Each metric's step-binned summary (`reading.stepbins`) answers the views' whole-run requests.

Every answer is compared with the event files read by TensorBoard's own
`EventFileLoader` and binned here by hand, on a run with NaN and Inf values,
a layer set that grows mid-run (two tags for one metric) and steps written
twice; with the metric held in memory, read on demand, and under a budget too
small for the summary (answered by binning, as before).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from tensorboard.context import RequestContext
from test_memory_budget import _bins_by_hand, _decode_f32, _independent, _values

from tb_diag_plugin import layer_groups, metadata
from tb_diag_plugin.reading import stepbins
from tb_diag_plugin.reading.ondemand import OnDemandSeries
from tb_diag_plugin.serving.config import Config
from tb_diag_plugin.summary import EventWriter
from tbserver import serve_with_plugin, until

STEPS, LAYERS = 1000, 60
LAYER_NAMES = [f"blocks.{i // 6}.{('attn', 'mlp')[i % 2]}{i % 3}.weight" for i in range(LAYERS)]
SITES = [f"blocks.{i}.relu" for i in range(10)]
POINTS = 100  # the summary's resolution: bins of 10 logged steps

# grad_norm: 1,000 x 60 float32 = 240 kB, over a quarter of 512 kB: read on demand; its summary (96 kB) is kept.
ON_DEMAND = Config(default_points=POINTS, cache_bytes=512 << 10)
IN_MEMORY = Config(default_points=POINTS)
TOO_SMALL = Config(default_points=POINTS, cache_bytes=128 << 10)  # neither the series nor its summary kept


def _write_run(logdir: str) -> None:
    rng = np.random.default_rng(3)
    with EventWriter(os.path.join(logdir, "big")) as w:
        for step in list(range(STEPS)) + list(range(600, 650)):  # a restarted stretch: the later data win
            g = rng.lognormal(-3, 1, LAYERS).astype(np.float32)
            if step % 37 == 5:
                g[step % LAYERS] = np.nan
            if step in (333, 620):
                g[17] = np.inf
            if step >= 990:
                g[5] = np.nan  # layer 5's last finite value is at step 989
            sites = SITES if step < 300 else SITES + ["head.relu"]
            w.write_vectors(step, [
                ("grad_norm", LAYER_NAMES, (), g),
                ("dead_fraction", sites, ["ReLU"] * len(sites), rng.random(len(sites)).astype(np.float32)),
                ("loss", [metadata.TOTAL_LOSS], (), np.array([1.0 / (step + 1)], np.float32))])


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stepbins")
    _write_run(str(d))
    return str(d)


def _check(a: dict, values: np.ndarray, present: np.ndarray, points: int) -> None:
    want = _bins_by_hand(values, present, points)
    for name in ("mean", "min", "max"):
        np.testing.assert_allclose(a[name], want[name], rtol=2e-6, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(a["nonfinite"], want["nonfinite"])


# (query, rows of the independent reading it covers, columns (None: all), points, the points that give its
# bins by hand: a request's bins are whole bins of the summary where its window lies on their edges)
REQUESTS = [
    ("points=100", slice(None), None, 100, 100),  # the summary's own bins
    ("points=20", slice(None), None, 20, 20),  # merged: bins of 50
    ("points=30", slice(None), None, 30, 25),  # bins of 34 rounded up to 40: merged, as with or without a summary
    ("points=30&layer={5}&layer={17}", slice(None), [5, 17], 30, 25),  # a drill-down's layers at a screen width
    ("points=100&layer={5}&layer={17}", slice(None), [5, 17], 100, 100),  # a drill-down's layers
    ("points=10&start=200&end=599", slice(200, 600), None, 10, 10),  # a window on the summary's bin edges
    ("points=100&start=200&end=599", slice(200, 600), None, 100, 100),  # finer than the summary: read
    ("points=7&start=203&end=611", slice(203, 612), None, 7, 7),  # off its edges: read
]


@pytest.mark.parametrize("config", [ON_DEMAND, IN_MEMORY, TOO_SMALL], ids=["on-demand", "in-memory", "too-small"])
def test_answers_from_the_summary_equal_tensorboards_reading_binned_by_hand(logdir, config):
    steps, layers, values, present = _independent(logdir, "grad_norm")
    assert steps.size == STEPS
    with serve_with_plugin(logdir, extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
        srv.wait_for_runs(1)
        until(lambda: srv.plugin("values?run=big&metric=grad_norm&points=1&start=999")["last_step"] == STEPS - 1)
        for query, rows, cols, _, points in REQUESTS:
            names = [] if cols is None else [layers[c] for c in cols]
            header, a = _values(srv, "metric=grad_norm&" + query.format(*layers))
            assert header["layers"] == (names or layers), query
            v, p = values[rows], present[rows]
            if cols is not None:
                v, p = v[:, cols], p[:, cols]
            _check(a, v, p, points)
            assert a["step_first"][0] == steps[rows][0] and a["step_last"][-1] == steps[rows][-1]
        idx = plugin.store.index(RequestContext(), "")["big"]
        series = plugin.store.series_and_key(RequestContext(), "", "big", "grad_norm", idx)[0]
        assert isinstance(series, OnDemandSeries) == (config is not IN_MEMORY)
        summary = plugin.store.step_summary(RequestContext(), "", "big", "grad_norm", idx, build=False)
        assert (summary is None) == (config is TOO_SMALL)
        assert plugin.store.memory.size <= config.cache_bytes
    if summary is not None:
        assert summary.k == 10 and summary.present.ndim == 1  # one tag holds every layer: counts per bin
        for query, rows, cols, points, _ in REQUESTS:
            served = stepbins.answer(summary, points, *_window(query), None if cols is None else np.array(cols))
            assert (served is None) == (rows != slice(None) and points != 10), query
        # The last finite value of each tensor (what the model view colours by).
        ok = present & np.isfinite(values)
        last = STEPS - 1 - np.argmax(ok[::-1], axis=0)
        np.testing.assert_array_equal(summary.last_step, steps[last])
        np.testing.assert_array_equal(summary.last_value, values[last, np.arange(LAYERS)].astype(np.float32))
        assert summary.last_step[5] == 989


def _window(query: str) -> tuple:
    args = dict(kv.split("=") for kv in query.split("&"))
    return (int(args["start"]) if "start" in args else None, int(args["end"]) if "end" in args else None)


def test_a_metric_over_several_tags_keeps_its_absent_cells_in_the_summary(logdir):
    """dead_fraction's layer set grows at step 300: `head.relu` is absent, then present, in every merge."""
    steps, layers, values, present = _independent(logdir, "dead_fraction")
    for config in (ON_DEMAND, IN_MEMORY):
        with serve_with_plugin(logdir, extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
            srv.wait_for_runs(1)
            for points in (100, 25):
                header, a = _values(srv, f"metric=dead_fraction&points={points}")
                assert header["layers"] == layers
                _check(a, values, present, points)
                want_present = np.add.reduceat(present, np.arange(0, steps.size, -(-steps.size // points)))
                np.testing.assert_array_equal(a["present"], want_present)
            idx = plugin.store.index(RequestContext(), "")["big"]
            summary = plugin.store.step_summary(RequestContext(), "", "big", "dead_fraction", idx, build=False)
            assert summary is not None and summary.present.ndim == 2


def test_the_preload_builds_every_summary_and_grouped_views_are_merged_from_it(logdir):
    """Once the preload has read the run, a grouped heatmap is aggregated from the summary's per-tensor
    bins, kept for opening a group (beside what the preload put there for the model view: each layer's
    first NaN/Inf, equal to the independent reading's); the bins and the groups equal those binned and
    aggregated by hand from the independent reading."""
    steps, layers, values, present = _independent(logdir, "grad_norm")
    config = dataclasses.replace(IN_MEMORY, preload_poll_s=0.2, preload_settle_poll_s=0.2)
    with serve_with_plugin(logdir, config=config) as (srv, plugin):
        srv.wait_for_runs(1)
        until(lambda: srv.plugin("values?run=big&metric=grad_norm&points=1&start=999")["last_step"] == STEPS - 1)
        until(lambda: plugin.preloader.preloaded_runs().get("big")
              == plugin.store.index(RequestContext(), "")["big"].data_version())
        scans = {key[0][2]: plugin.store.binned.peek(key) for key in plugin.store.binned.keys()}
        assert len(plugin.store.summaries.keys()) == 3 and set(scans) == {"grad_norm", "dead_fraction"}
        # the preload also reduced the group rows of the levels a heatmap opens at, whatever its points
        warmed = {k[1] for k in plugin.store.group_rows.keys() if k[0][0][2] == "grad_norm"}
        header, a = _values(srv, "metric=grad_norm&points=50&max_rows=8")
        assert len(plugin.store.binned.keys()) == len(scans)  # grouped from the summary: nothing binned
        shown = {k for k in header["layers"] if k not in layers}  # the groups' keys
        assert shown and shown <= warmed
        assert {k[1] for k in plugin.store.group_rows.keys() if k[0][0][2] == "grad_norm"} == warmed  # none new
    bad = present & ~np.isfinite(values)
    assert scans["grad_norm"] == {layers[j]: int(steps[np.argmax(bad[:, j])]) for j in range(LAYERS) if bad[:, j].any()}
    assert scans["grad_norm"]
    root = layer_groups.build(layers, "param")
    view = layer_groups.rows(root, 8)
    assert header["layers"] == [layers[r] if isinstance(r, int) else r.key for r in view]
    want = _bins_by_hand(values, present, 50)
    for j, r in enumerate(view):
        members = [r] if isinstance(r, int) else list(r.members)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(a["min"][:, j], np.nanmin(want["min"][:, members], axis=1), rtol=2e-6)
            np.testing.assert_allclose(a["max"][:, j], np.nanmax(want["max"][:, members], axis=1), rtol=2e-6)
        np.testing.assert_array_equal(a["nonfinite"][:, j], want["nonfinite"][:, members].sum(axis=1))
        # the mean of every finite value of the members in the bin (bins of 20 steps)
        v, ok = values[:, members], present[:, members] & np.isfinite(values[:, members])
        sums = np.add.reduceat(np.where(ok, v, 0).sum(axis=1), np.arange(0, STEPS, 20))
        np.testing.assert_allclose(a["mean"][:, j], sums / np.add.reduceat(ok.sum(axis=1), np.arange(0, STEPS, 20)),
                                   rtol=2e-6)


def _whole_summary_bins(S: int, points: int, summary_points: int) -> int:
    """The points that bin S steps as a whole-run request at `points` is binned: ceil(S / points) steps
    per bin, rounded up to whole bins of the summary's ceil(S / summary_points) (http_api.md)."""
    base = -(-S // summary_points)
    k = -(-S // points)
    k = -(-k // base) * base if k > base else k
    hand = -(-S // k)
    assert -(-S // hand) == k
    return hand


def _write_steps(logdir: str, steps, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with EventWriter(os.path.join(logdir, "grow")) as w:
        for step in steps:
            g = rng.lognormal(-3, 1, LAYERS).astype(np.float32)
            if step % 41 == 3:
                g[step % LAYERS] = np.nan
            w.write_vectors(step, [("grad_norm", LAYER_NAMES, (), g)])


def test_a_growing_run_extends_its_summary_and_a_rewritten_step_rebuilds_it(tmp_path):
    """750 steps (bins of 8), then 40 more: the 93 whole bins are kept, only the new steps read; then step
    700 written again (a restarted job): nothing kept. Each answer equals TensorBoard's reading."""
    logdir = str(tmp_path)
    _write_steps(logdir, range(750), 1)

    def check(srv, last: int) -> None:
        until(lambda: srv.plugin("values?run=grow&metric=grad_norm&points=1&start=0")["last_step"] == last)
        steps, _, values, present = _independent(logdir, "grad_norm", run="grow")
        for points in (100, 20):
            status, body, _ = srv.get(f"data/plugin/diagnostics/values?run=grow&format=f32&metric=grad_norm"
                                      f"&points={points}")
            assert status == 200
            _check(_decode_f32(body)[1], values, present, _whole_summary_bins(steps.size, points, 100))

    with serve_with_plugin(logdir, extra=["--diagnostics_preload", "false"], config=ON_DEMAND) as (srv, plugin):
        srv.wait_for_runs(1)

        def summary():
            idx = plugin.store.index(RequestContext(), "")["grow"]
            return plugin.store.step_summary(RequestContext(), "", "grow", "grad_norm", idx, build=False)

        check(srv, 749)
        assert summary().k == 8 and summary().reused == 0
        _write_steps(logdir, range(750, 790), 2)
        check(srv, 789)
        assert summary().k == 8 and summary().reused == 750 // 8
        _write_steps(logdir, [700, 790], 3)
        check(srv, 790)
        assert summary().k == 8 and summary().reused == 0
