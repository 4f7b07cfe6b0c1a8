"""The plugin inside a real TensorBoard server, under both data backends.

Waits poll a condition or an event, without a wall-clock bound of their own (pytest's timeout
ends a hang); values are compared with the event files read independently of the plugin.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import json
import struct
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from tb_diag_logger import Diagnostics
from tb_diag_plugin.diagnostics_plugin import Config
from tbserver import serve, serve_with_plugin, until

STEPS = 3000
DEPTH = 20


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    """3,000 logged steps of a 20-layer model, plus the user's own add_scalar tags."""
    d = tmp_path_factory.mktemp("long")
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(DEPTH) for m in (nn.Linear(4, 4), nn.ReLU())])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = SummaryWriter(str(d / "deep"))
    x = torch.randn(8, 4)
    with Diagnostics(model, writer, every=1, optimizer=opt) as diag:
        for step in range(STEPS):
            loss = model(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            diag.step(step, loss=loss)
            opt.step()
            if step % 100 == 0:
                writer.add_scalar("user/loss", loss.item(), step)
    writer.close()
    return d


@pytest.fixture(scope="module", params=[False, True], ids=["python_loader", "rust_data_server"])
def server(request, long_run):
    with serve(str(long_run), load_fast=request.param) as srv:
        srv.wait_for_runs(1)
        yield srv


def _wait_complete(server, metric: str, n: int) -> dict:
    """The metric's /values once the loader has read `n` steps of it (it loads while serving)."""
    return until(lambda: (b := server.plugin(f"values?run=deep&metric={metric}&points=100000"))["num_steps"] >= n
                 and b, poll_s=0.5)


def _event_file_values(run_dir, metric: str) -> tuple[list[str], dict[int, np.ndarray]]:
    """(layers, step -> values) of `metric` read straight from the event files with TensorBoard's record
    loader and the contract's proto: not through the plugin's reading code."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    from tb_diag_plugin import plugin_data_pb2

    layers_of: dict[str, list[str]] = {}
    rows: dict[int, np.ndarray] = {}
    for path in sorted(glob.glob(str(run_dir / "events.out.tfevents.*"))):
        for event in event_file_loader.EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "diagnostics":
                    data = plugin_data_pb2.DiagnosticsPluginData.FromString(value.metadata.plugin_data.content)
                    layers_of[value.tag] = list(data.layers) if data.metric == metric else []
                if layers_of.get(value.tag):
                    rows[event.step] = tensor_util.make_ndarray(value.tensor)
    (layers,) = {tuple(v) for v in layers_of.values() if v}
    return list(layers), rows


def test_full_history_without_flags(server):
    body = _wait_complete(server, "grad_norm", STEPS)
    assert body["num_steps"] == STEPS, "retention default must keep every logged step"
    assert body["steps"] == list(range(STEPS))
    assert body["binned"] is False
    assert len(body["layers"]) == 2 * DEPTH
    assert body["layers"][:2] == ["0.weight", "0.bias"]
    assert len(body["values"]) == STEPS and all(len(r) == 2 * DEPTH for r in body["values"])


def test_values_equal_event_file(server, long_run):
    body = _wait_complete(server, "grad_norm", STEPS)
    layers, rows = _event_file_values(long_run / "deep", "grad_norm")
    assert body["layers"] == layers and body["steps"] == sorted(rows)
    expected = np.stack([rows[s] for s in body["steps"]])
    np.testing.assert_array_equal(np.array(body["values"], dtype=np.float32), expected)


def test_plugin_listed_enabled(server):
    listing = server.json("data/plugins_listing")
    assert listing["diagnostics"]["enabled"] is True
    assert listing["diagnostics"]["tab_name"] == "Diagnostics"
    assert listing["diagnostics"]["loading_mechanism"] == {
        "type": "IFRAME",
        "module_path": "/data/plugin/diagnostics/index.js",
    }


def test_user_scalars_still_visible(server):
    tags = server.json("data/plugin/scalars/tags")
    assert "user/loss" in tags["deep"]
    scalars = server.json("data/plugin/scalars/scalars?run=deep&tag=user/loss")
    assert [s[1] for s in scalars] == list(range(0, STEPS, 100))


def test_binned_values_keep_extremes(server):
    raw = _wait_complete(server, "grad_norm", STEPS)
    body = server.plugin("values?run=deep&metric=grad_norm&points=7")
    assert body["binned"] is True and len(body["steps"]) == 7
    assert body["steps"][0] == 0 and body["step_last"][-1] == STEPS - 1
    full = np.array(raw["values"], dtype=np.float64)
    mx = np.array(body["max"], dtype=np.float64)
    np.testing.assert_allclose(mx.max(axis=0), full.max(axis=0), rtol=1e-6)


def _decode_f32(body: bytes) -> tuple[dict, dict]:
    (hlen,) = struct.unpack("<I", body[:4])
    header = json.loads(body[4 : 4 + hlen])
    base = 4 + hlen
    assert base % 8 == 0
    arrays = {}
    for a in header["arrays"]:
        assert (base + a["offset"]) % 8 == 0, a  # the browser views arrays in place
        dtype = np.dtype(a["dtype"]).newbyteorder("<")
        arrays[a["name"]] = np.frombuffer(
            body, dtype=dtype, count=int(np.prod(a["shape"])), offset=base + a["offset"]
        ).reshape(a["shape"])
    return header, arrays


@pytest.mark.parametrize("points", [50, 100000])
def test_f32_format_matches_json(server, points):
    q = f"values?run=deep&metric=grad_norm&points={points}"
    status, blob, headers = server.get(
        f"data/plugin/diagnostics/{q}&format=f32", headers={"Accept-Encoding": "gzip"}
    )
    # Not gzipped: float32 barely compresses and gzip cost more time than it saved.
    assert status == 200 and headers.get("Content-Encoding") is None
    header, arrays = _decode_f32(blob)
    js = server.plugin(q)
    assert header["binned"] is js["binned"] is (points == 50)
    absent = np.array([[v is None for v in row] for row in js["values"]])
    as_f32 = lambda rows: np.array(  # noqa: E731
        [[np.nan if v is None else float(v) for v in row] for row in rows], dtype=np.float32
    )
    np.testing.assert_allclose(arrays["mean"][~absent], as_f32(js["values"])[~absent], rtol=1e-6)
    np.testing.assert_array_equal(arrays["step_first"], js["steps"])
    assert arrays["present"].dtype == np.uint8 and arrays["nonfinite"].dtype == np.uint8
    assert np.array_equal(arrays["present"] == 0, absent)
    if js["binned"]:
        np.testing.assert_allclose(arrays["min"][~absent], as_f32(js["min"])[~absent], rtol=1e-6)
        np.testing.assert_allclose(arrays["max"][~absent], as_f32(js["max"])[~absent], rtol=1e-6)
        np.testing.assert_array_equal(arrays["nonfinite"], js["nonfinite"])
    else:
        assert "min" not in arrays and "max" not in arrays  # equal to mean for single steps


@pytest.mark.parametrize(
    "query, status",
    [
        ("values?run=nope&metric=loss", 404),
        ("values?run=deep&metric=nope", 404),
        ("values?run=deep&metric=loss&layer=nope", 404),
        ("values?metric=loss", 400),
        ("values?run=deep", 400),
        ("values?run=deep&metric=loss&points=0", 400),
        ("values?run=deep&metric=loss&points=-5", 400),
        ("values?run=deep&metric=loss&points=1000000000000", 400),
        ("values?run=deep&metric=loss&points=abc", 400),
        ("values?run=deep&metric=loss&start=x", 400),
        ("values?run=deep&metric=loss&format=xml", 400),
        ("tags?run=nope", 404),
        ("tags", 400),
        ("structure?run=nope", 404),
        ("static/../setup.py", 404),
        ("static/%2e%2e%2fsetup.py", 404),
        ("static/..%5c..%5csetup.py", 404),
        ("static//etc/passwd", 404),
        ("static/nothing.js", 404),
    ],
)
def test_bad_parameters_give_json_4xx(server, query, status):
    code, body, headers = server.get("data/plugin/diagnostics/" + query)
    assert code == status, body[:300]
    assert headers["Content-Type"].startswith("application/json")
    err = json.loads(body)["error"]
    assert err and "Traceback" not in err


def test_static_files_and_plotly(server):
    code, body, headers = server.get("data/plugin/diagnostics/index.js")
    assert code == 200 and b"export function render" in body
    assert headers["Content-Type"].startswith("application/javascript")
    code, body, headers = server.get("data/plugin/diagnostics/plotly.js", headers={"Accept-Encoding": "gzip"})
    assert code == 200 and headers.get("Content-Encoding") == "gzip"
    assert len(gzip.decompress(body)) > 1_000_000


def test_structure_route(server):
    body = server.plugin("structure?run=deep")
    mods = {m["name"]: m for m in body["structure"]["modules"]}
    assert mods["0"]["type"] == "Linear" and mods["0"]["num_params"] == 20
    assert mods["1"]["type"] == "ReLU"
    assert [p["shape"] for p in mods["0"]["params"]] == [[4, 4], [4]]


def _wait_last_step(srv, last: int) -> dict:
    """Poll until the loader has read the whole file (it loads while serving)."""
    return until(lambda: (b := srv.plugin("values?run=deep&metric=loss&points=100000"))["last_step"] == last and b,
                 poll_s=0.5)


def test_user_retention_flag_wins(long_run):
    with serve(str(long_run), extra=["--samples_per_plugin", "diagnostics=50"]) as srv:
        srv.wait_for_runs(1)
        body = _wait_last_step(srv, STEPS - 1)
        assert body["num_steps"] == 50
        assert body["last_step"] == STEPS - 1  # the reservoir always keeps the latest


def test_own_flag_changes_default(long_run):
    with serve(str(long_run), extra=["--diagnostics_samples", "100"]) as srv:
        srv.wait_for_runs(1)
        assert _wait_last_step(srv, STEPS - 1)["num_steps"] == 100


def test_loss_components_and_dead_fraction(demo_server):
    tags = demo_server.plugin("tags?run=dying_relu")
    assert tags["metrics"]["loss"]["layers"] == ["total", "ce", "l2"]
    dead = demo_server.plugin("values?run=dying_relu&metric=dead_fraction&points=100000")
    last = np.array(dead["values"][-1], dtype=float)
    assert last.max() > 0.9, "the dying-ReLU demo must show dead units"
    healthy = demo_server.plugin("values?run=healthy&metric=loss&points=100000")
    total = np.array([r[0] for r in healthy["values"]], dtype=float)
    assert total[-10:].mean() < total[:10].mean() / 2


def test_contract_route_is_the_contract(demo_server):
    from tb_diag_plugin import metadata

    body = demo_server.plugin("contract")
    assert body == json.loads(json.dumps(metadata.contract_dict()))
    assert [m["name"] for m in body["metrics"]][:3] == ["grad_norm", "grad_max_abs", "grad_nonfinite"]
    assert body["finding_view"]["nonfinite"] == {"view": "gradients", "metric": "grad_norm"}
    assert set(body["finding_view"]) == set(body["finding_kinds"])


@pytest.mark.parametrize("run", ["dying_relu", "diverging", "vanishing_sigmoid"])
def test_findings_carry_each_named_layers_worst_verdict(demo_server, run):
    body = demo_server.plugin(f"findings?run={run}")
    tags = demo_server.plugin(f"tags?run={run}")["metrics"]
    assert body["findings"], run
    rank = {"error": 0, "warning": 1, "info": 2}
    order = demo_server.plugin("contract")["finding_kinds"]
    expect: dict[str, str] = {}
    for f in body["findings"]:
        for n in f["layers"]:
            if n not in expect or rank[f["severity"]] < rank[expect[n]]:
                expect[n] = f["severity"]
    assert {n: v["severity"] for n, v in body["layers"].items()} == expect
    for n, v in body["layers"].items():
        assert {f["kind"] for f in body["findings"] if n in f["layers"]} == set(v["kinds"])
        assert v["kinds"] == sorted(v["kinds"], key=order.index)
        if n in tags.get("grad_norm", {}).get("layers", []):
            assert v["layer_kind"] == "param", n
        elif n in tags.get("dead_fraction", {}).get("layers", []):
            assert v["layer_kind"] == "site", n


def test_diverging_demo_reaches_nan(demo_server):
    body = demo_server.plugin("values?run=diverging&metric=loss&points=100000")
    assert any(r[0] == "NaN" for r in body["values"])
    binned = demo_server.plugin("values?run=diverging&metric=loss&points=3")
    assert sum(r[0] for r in binned["nonfinite"]) > 0


def _tiny_logdir(path):
    model = nn.Linear(2, 1)
    with Diagnostics(model, logdir=str(path), every=1) as diag:
        loss = F.mse_loss(model(torch.ones(3, 2)), torch.zeros(3, 1))
        loss.backward()
        diag.step(0, loss=loss)


def test_single_step_run(tmp_path):
    _tiny_logdir(tmp_path / "one")
    with serve(str(tmp_path)) as srv:
        srv.wait_for_runs(1)
        body = srv.plugin("values?run=one&metric=grad_norm")
        assert body["num_steps"] == 1 and body["steps"] == [0]


@contextlib.contextmanager
def _serve_with_plugin(logdir, config=None):
    """The Rust data server on `logdir`, loaded, with the plugin object that serves it; no preload
    (these tests are about what the tab's requests start)."""
    with serve_with_plugin(str(logdir), load_fast=True, extra=["--diagnostics_preload", "false"],
                           config=config) as (srv, plugin):
        srv.wait_for_runs(1)
        _wait_complete(srv, "grad_norm", STEPS)
        yield srv, plugin


def _read_ahead_done(plugin, metrics) -> bool:
    # The findings come before the metrics no rule reads: wait for both.
    return len(plugin.store.findings_cache) > 0 and len(plugin.store.series_cache) >= len(metrics)


def test_tags_starts_a_read_ahead_that_fills_the_caches(long_run):
    """After /tags every metric of the run and its findings are in memory, read once each."""
    with _serve_with_plugin(long_run) as (srv, plugin):
        metrics = srv.plugin("tags?run=deep")["metrics"]
        until(lambda: _read_ahead_done(plugin, metrics))
        cached = {key[2] for key in plugin.store.series_cache.keys()}
        assert cached == set(metrics)
        # The answer the tab then gets is the cached one, equal to a fresh analysis.
        before = len(plugin.store.findings_cache)
        body = srv.plugin("findings?run=deep")
        assert len(plugin.store.findings_cache) == before and body["run"] == "deep"


def test_read_ahead_waits_while_a_request_is_answered(long_run):
    """The read-ahead yields the CPU to the requests in flight: it reaches its yield point while one
    is being answered, goes on only once none is (each read records the requests in flight), and
    reads every metric after."""
    config = Config(read_ahead_yield_s=3600.0)  # it yields for as long as the request lasts
    with _serve_with_plugin(long_run, config) as (srv, plugin):
        store = plugin.store
        store.series_cache.clear()
        at_yield = threading.Event()
        in_flight: list[tuple[str, int]] = []  # (what, requests in flight then), in order
        wait_idle, series = store.wait_idle, store.series

        def recording_wait_idle():
            at_yield.set()
            wait_idle()
            in_flight.append(("resumed", store._busy))

        def recording_series(ctx, eid, run, metric, idx):
            in_flight.append((metric, store._busy))
            return series(ctx, eid, run, metric, idx)

        store.wait_idle, store.series = recording_wait_idle, recording_series
        with store.foreground():  # as if a view's request were being answered
            metrics = srv.plugin("tags?run=deep")["metrics"]
            at_yield.wait()
            assert len(store.series_cache) == 0 and not in_flight, "the read-ahead read while a request was in flight"
        until(lambda: _read_ahead_done(plugin, metrics))
        assert in_flight[0] == ("resumed", 0)
        assert all(busy == 0 for _, busy in in_flight), in_flight
        assert {key[2] for key in store.series_cache.keys()} == set(metrics)


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_runs_give_each_metric_s_last_logged_step_and_follow_the_run(tmp_path, load_fast):
    """/runs' `last_steps`: the last step written for each metric (the gradient-flow profile is asked for
    there before the heatmap's data is in), from both of TensorBoard's loaders, and current as the run grows."""
    from tb_diag_plugin.summary import EventWriter

    layers = ["a.weight", "a.bias"]
    w = EventWriter(str(tmp_path / "r"), flush_secs=1)
    for s in range(11):
        vectors = [("loss", ["total"], (), np.array([1.0 / (s + 1)], np.float32))]
        if s % 3 == 0:  # a metric logged every 3 steps: its last step is not the run's
            vectors.append(("grad_norm", layers, (), np.ones(2, np.float32)))
        w.write_vectors(s, vectors)
    w.flush()
    with serve_with_plugin(str(tmp_path), load_fast=load_fast, config=Config(preload=False, index_ttl_s=0.0)) as (
            srv, _):
        srv.wait_for_runs(1)
        [run] = until(lambda: (r := srv.plugin("runs")["runs"]) and r[0]["last_steps"].get("loss") == 10 and r)
        assert run["last_steps"] == {"grad_norm": 9, "loss": 10}
        assert set(run["last_steps"]) == set(run["metrics"])
        w.write_vectors(12, [("grad_norm", layers, (), np.ones(2, np.float32))])
        w.flush()
        [run] = until(lambda: (r := srv.plugin("runs")["runs"]) and r[0]["last_steps"]["grad_norm"] == 12 and r)
        assert run["last_steps"]["loss"] == 10
    w.close()
