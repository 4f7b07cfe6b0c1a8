"""One byte budget for every cache of the plugin, and runs bigger than it served from their event files.

The bytes the cache holds are counted independently of its own accounting:
by tracemalloc, which sees every buffer numpy allocates. The values served
past the budget are compared with the event files read by TensorBoard's own
`EventFileLoader` and binned here by hand.
"""

from __future__ import annotations

import gc
import glob
import json
import os
import struct
import tracemalloc

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.context import RequestContext
from tensorboard.util import tensor_util

from tb_diag_plugin import metadata
from tb_diag_plugin.cache import ByteLRU, nbytes
from tb_diag_plugin.reading.ondemand import OnDemandSeries
from tb_diag_plugin.serving.config import Config
from tb_diag_plugin.summary import EventWriter
from tbserver import serve_with_plugin, until

NUMPY_DOMAIN = 389047  # numpy's tracemalloc domain (NPY_TRACE_DOMAIN)
STEPS, LAYERS = 700, 240
LAYER_NAMES = [f"blocks.{i // 6}.{('conv', 'bn')[i % 2]}{i % 3}.weight" for i in range(LAYERS)]
SITES = [f"blocks.{i}.relu" for i in range(40)]


def _numpy_bytes_alive() -> int:
    gc.collect()
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.DomainFilter(True, NUMPY_DOMAIN)])
    return sum(t.size for t in snap.traces)


def test_the_cache_never_holds_more_bytes_than_its_budget_counted_by_tracemalloc():
    """Entries of every shape the store keeps (matrices, views of a bigger matrix, broadcasts, tuples):
    after each insertion, what numpy still has allocated (all held by the cache) is within the budget."""
    budget = 3 << 20
    rng = np.random.default_rng(0)
    tracemalloc.start()
    try:
        c = ByteLRU(budget)
        floor = _numpy_bytes_alive()
        for i in range(40):
            rows = int(rng.integers(50, 400))
            kind = i % 4
            if kind == 0:
                make = lambda r=rows: np.ones((r, 500), np.float32)  # noqa: E731
            elif kind == 1:  # a column of a big matrix: it keeps the whole matrix alive
                make = lambda r=rows: np.ones((r, 2000), np.float32)[:, 3]  # noqa: E731
            elif kind == 2:
                make = lambda r=rows: (np.arange(r), np.ones((r, 300), np.float32),  # noqa: E731
                                       np.broadcast_to(np.True_, (r, 300)))
            else:
                make = lambda r=rows: {"mean": np.zeros((r, 100)), "view": np.zeros((r, 100))[::2]}  # noqa: E731
            c.get(("k", i), make)
            del make
            held = _numpy_bytes_alive() - floor
            assert held <= budget, (i, held)
            assert held <= c.size + 64 * 1024, (i, held, c.size)  # the cache's count is not below the truth
        assert len(c) < 40  # entries were evicted to stay within it
    finally:
        tracemalloc.stop()


def test_a_view_is_counted_as_the_buffer_it_keeps_alive():
    big = np.zeros((1000, 100), np.float32)
    assert nbytes(big[:, 5]) == big.nbytes
    assert nbytes((big, big[:10])) == big.nbytes + 64  # one buffer, counted once
    assert nbytes(np.frombuffer(b"\0" * 400, np.float32)) == 400


# --------------------------------------------------------------- a run bigger than the budget
def _write_run(logdir: str) -> None:
    """A run with NaN and Inf values, a layer set that grows mid-run (two tags for one metric) and a
    restarted stretch (steps written twice: the later data win)."""
    rng = np.random.default_rng(7)
    with EventWriter(os.path.join(logdir, "big")) as w:
        for step in list(range(STEPS)) + list(range(600, 650)):
            g = rng.lognormal(-3, 1, LAYERS).astype(np.float32)
            if step % 97 == 5:
                g[step % LAYERS] = np.nan
            if step == 333:
                g[17] = np.inf
            sites = SITES if step < 300 else SITES + ["head.relu"]
            items = [("grad_norm", LAYER_NAMES, (), g),
                     ("dead_fraction", sites, ["ReLU"] * len(sites), rng.random(len(sites)).astype(np.float32)),
                     ("loss", [metadata.TOTAL_LOSS], (), np.array([1.0 / (step + 1)], np.float32))]
            w.write_vectors(step, items)


def _independent(logdir: str, metric: str, run: str = "big") -> tuple[np.ndarray, list[str], np.ndarray]:
    """(steps, layers, values [S, L] with NaN where absent) of `metric`, from TensorBoard's own loader."""
    by_step: dict[int, dict[str, float]] = {}
    layers: list[str] = []
    for path in sorted(glob.glob(os.path.join(logdir, run, "*tfevents*"))):
        names: dict[str, list[str]] = {}
        for ev in event_file_loader.EventFileLoader(path).Load():
            for v in ev.summary.value:
                if not v.tag.startswith(f"{metadata.PLUGIN_NAME}/{metric}/"):
                    continue
                if v.metadata.plugin_data.content:
                    names[v.tag] = list(metadata.parse_plugin_data(v.metadata.plugin_data.content).layers)
                row = by_step.setdefault(ev.step, {})
                for name, x in zip(names[v.tag], tensor_util.make_ndarray(v.tensor).reshape(-1)):
                    row[name] = float(x)
                    if name not in layers:
                        layers.append(name)
    steps = np.array(sorted(by_step))
    values = np.full((steps.size, len(layers)), np.nan)
    present = np.zeros(values.shape, bool)
    for i, s in enumerate(steps):
        for name, x in by_step[s].items():
            values[i, layers.index(name)] = x
            present[i, layers.index(name)] = True
    return steps, layers, values, present


def _bins_by_hand(values: np.ndarray, present: np.ndarray, points: int):
    """(mean, min, max, nonfinite) per bin of ceil(S / points) rows over the finite present values."""
    S = values.shape[0]
    k = -(-S // points)
    out = {"mean": [], "min": [], "max": [], "nonfinite": []}
    for lo in range(0, S, k):
        v, p = values[lo:lo + k], present[lo:lo + k]
        good = p & np.isfinite(v)
        with np.errstate(invalid="ignore"):
            n = good.sum(axis=0)
            out["mean"].append(np.where(n > 0, np.where(good, v, 0).sum(axis=0) / np.maximum(n, 1), np.nan))
            out["min"].append(np.where(n > 0, np.where(good, v, np.inf).min(axis=0), np.nan))
            out["max"].append(np.where(n > 0, np.where(good, v, -np.inf).max(axis=0), np.nan))
        out["nonfinite"].append((p & ~np.isfinite(v)).sum(axis=0))
    return {name: np.array(rows) for name, rows in out.items()}


def _decode_f32(body: bytes) -> tuple[dict, dict]:
    (hlen,) = struct.unpack("<I", body[:4])
    header = json.loads(body[4:4 + hlen])
    arrays = {}
    for a in header["arrays"]:
        arrays[a["name"]] = np.frombuffer(body, dtype=np.dtype(a["dtype"]).newbyteorder("<"),
                                          count=int(np.prod(a["shape"])), offset=4 + hlen + a["offset"]
                                          ).reshape(a["shape"])
    return header, arrays


def _values(srv, query: str) -> tuple[dict, dict]:
    status, body, _ = srv.get(f"data/plugin/diagnostics/values?run=big&format=f32&{query}")
    assert status == 200, body[:300]
    return _decode_f32(body)


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    _write_run(str(d))
    return str(d)


# grad_norm: 700 x 240 float32 = 672 kB, over a quarter of a 1 MiB budget: read on demand.
SMALL = Config(cache_bytes=1 << 20)


@pytest.mark.parametrize("points,load_fast", [(64, False), (5000, False), (64, True)])
def test_a_metric_over_the_budget_is_served_from_the_event_files_equal_to_tensorboards_reading(
        logdir, points, load_fast):
    """Under both loaders (the Rust data server's listing has no step count: the size is bounded
    from the last step, then counted in the files)."""
    steps, layers, values, present = _independent(logdir, "grad_norm")
    with serve_with_plugin(logdir, load_fast=load_fast, extra=["--diagnostics_preload", "false"],
                           config=SMALL) as (srv, plugin):
        srv.wait_for_runs(1)
        # The Rust data server loads in the background: on until it has the run's last step.
        until(lambda: srv.plugin("values?run=big&metric=grad_norm&points=1&start=699")["last_step"] == STEPS - 1)
        header, a = _values(srv, f"metric=grad_norm&points={points}")
        key = next(k for k in plugin.store.series_cache.keys() if k[2] == "grad_norm")
        assert isinstance(plugin.store.series_cache.peek(key)[0], OnDemandSeries)
        assert header["layers"] == layers and header["num_steps"] == steps.size == STEPS
        if points < steps.size:
            want = _bins_by_hand(values, present, points)
            assert header["binned"] and a["step_first"][0] == 0 and a["step_last"][-1] == STEPS - 1
            for name in ("mean", "min", "max"):
                np.testing.assert_allclose(a[name], want[name], rtol=2e-6, equal_nan=True, err_msg=name)
            np.testing.assert_array_equal(a["nonfinite"], want["nonfinite"])
        else:
            np.testing.assert_array_equal(a["step_first"], steps)
            np.testing.assert_array_equal(a["mean"], values.astype(np.float32))  # NaN and Inf as written
        assert plugin.store.memory.size <= SMALL.cache_bytes


def test_a_step_window_and_chosen_layers_read_on_demand_equal_tensorboards_reading(logdir):
    steps, layers, values, present = _independent(logdir, "grad_norm")
    pick = [layers[3], layers[200], layers[17]]
    cols = [3, 200, 17]
    with serve_with_plugin(logdir, extra=["--diagnostics_preload", "false"], config=SMALL) as (srv, _):
        srv.wait_for_runs(1)
        query = "metric=grad_norm&points=40&start=100&end=520&" + "&".join(f"layer={n}" for n in pick)
        header, a = _values(srv, query)
    assert header["layers"] == pick
    rows = (steps >= 100) & (steps <= 520)
    want = _bins_by_hand(values[rows][:, cols], present[rows][:, cols], 40)
    assert a["step_first"][0] == 100 and a["step_last"][-1] == 520
    for name in ("mean", "min", "max"):
        np.testing.assert_allclose(a[name], want[name], rtol=2e-6, equal_nan=True, err_msg=name)
    np.testing.assert_array_equal(a["nonfinite"], want["nonfinite"])


def test_a_metric_over_several_tags_is_merged_on_demand_as_when_cached(logdir):
    """dead_fraction's layer set grows at step 300 (two tags): absent cells stay absent, read on demand
    (a budget too small for it) and read whole (the default budget) alike."""
    tiny = Config(cache_bytes=64 << 10)
    steps, layers, values, present = _independent(logdir, "dead_fraction")
    answers = []
    for config in (tiny, Config()):
        with serve_with_plugin(logdir, extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
            srv.wait_for_runs(1)
            answers.append(_values(srv, "metric=dead_fraction&points=50"))
            idx = plugin.store.index(RequestContext(), "")["big"]
            series = plugin.store.series_and_key(RequestContext(), "", "big", "dead_fraction", idx)[0]
            assert isinstance(series, OnDemandSeries) == (config is tiny)
    (h1, a1), (h2, a2) = answers
    assert h1["layers"] == h2["layers"] == layers
    want = _bins_by_hand(values, present, 50)
    for name in ("mean", "min", "max"):
        np.testing.assert_allclose(a1[name], want[name], rtol=2e-6, equal_nan=True)
        np.testing.assert_array_equal(a1[name], a2[name])
    np.testing.assert_array_equal(a1["present"], a2["present"])
    assert a1["present"][0, -1] == 0 and a1["present"][-1, -1] > 0  # head.relu: absent, then present


def test_eviction_keeps_answers_correct_and_the_findings_equal(logdir):
    """A budget that holds about one answer: every request evicts the last, each answer is still the
    independent reading's, and the findings (read whole, not kept) are those of the default budget."""
    steps, layers, values, present = _independent(logdir, "grad_norm")
    tiny = Config(cache_bytes=200 << 10)
    findings = []
    for config in (tiny, Config()):
        with serve_with_plugin(logdir, extra=["--diagnostics_preload", "false"], config=config) as (srv, plugin):
            srv.wait_for_runs(1)
            if config is tiny:
                for points in (30, 64, 30, 100, 64):
                    _, a = _values(srv, f"metric=grad_norm&points={points}")
                    want = _bins_by_hand(values, present, points)
                    np.testing.assert_allclose(a["max"], want["max"], rtol=2e-6, equal_nan=True)
                    assert plugin.store.memory.size <= tiny.cache_bytes
                keys = plugin.store.answers.keys()
                assert len(keys) < 4  # earlier answers were evicted
            findings.append(srv.plugin("findings?run=big"))
    assert findings[0]["findings"] == findings[1]["findings"]


def test_the_budget_is_the_diagnostics_cache_mb_flag(tmp_path):
    import argparse

    from tensorboard.plugins import base_plugin

    from tb_diag_plugin.diagnostics_plugin import DiagnosticsLoader

    with serve_with_plugin(str(tmp_path), extra=["--diagnostics_cache_mb", "3",
                                                 "--diagnostics_preload", "false"]) as (_, plugin):
        assert plugin.store.memory.max_bytes == 3 << 20
        assert plugin.config.max_series_bytes == (3 << 20) // 4
    with pytest.raises(base_plugin.FlagsError, match="diagnostics_cache_mb"):
        DiagnosticsLoader().fix_flags(argparse.Namespace(diagnostics_cache_mb=0))
