"""Damaged and hostile event files, many runs, concurrent requests: no 500, nothing misattributed.

Fixtures are written with the contract's torch-free writer (`tb_diag_plugin.summary`). No
wall-clock bounds: a wait polls its condition until it holds (pytest's timeout ends a hang).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import os
import time
import tracemalloc

import numpy as np
import pytest
from tensorboard.compat.proto import summary_pb2

from tb_diag_plugin import metadata, plugin_data_pb2
from tb_diag_plugin.summary import EventWriter, structure_summary
from tbserver import serve, until

LAYERS = ["a.weight", "a.bias", "b.weight"]


def _write_good(run_dir, steps=20, layers=LAYERS):
    with EventWriter(str(run_dir)) as w:
        for s in range(steps):
            w.write_vectors(s, [("grad_norm", layers, (), np.arange(len(layers), dtype=np.float32) + s)])
    return glob.glob(os.path.join(str(run_dir), "events.out.tfevents.*"))[0]


def _raw_summary(writer, step, tag, content: bytes, tensor_values, dtype="f4"):
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    arr = np.asarray(tensor_values, dtype="<" + dtype)
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT if dtype == "f4" else types_pb2.DT_DOUBLE,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in arr.shape]
        ),
        tensor_content=arr.tobytes(),
    )
    meta = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=content),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    value = summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=meta)
    writer.add_summary(summary_pb2.Summary(value=[value]), step)


@pytest.fixture(scope="module")
def damaged_logdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("damaged")
    _write_good(d / "good")

    # Truncated in the middle of the last record.
    path = _write_good(d / "truncated")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7)
    old = time.time() - 3600  # a job that died an hour ago, not a writer mid-flush
    os.utime(path, (old, old))

    # A corrupted record in the middle (bytes flipped inside a record's payload).
    path = _write_good(d / "corrupted")
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid : mid + 8] = b"\xde\xad\xbe\xef" * 2
    open(path, "wb").write(bytes(data))

    # Our plugin name with malformed content, a newer and an older contract version,
    # and a tag whose tensors have the wrong shape for its layer list; plus a good tag.
    w = EventWriter(str(d / "mixed"))
    newer = plugin_data_pb2.DiagnosticsPluginData(version=99, metric="grad_norm", layers=["x"]).SerializeToString()
    older = plugin_data_pb2.DiagnosticsPluginData(version=0, metric="grad_norm", layers=["x"]).SerializeToString()
    wrong = plugin_data_pb2.DiagnosticsPluginData(version=1, metric="act_mean", layers=["p", "q"]).SerializeToString()
    for s in range(5):
        _raw_summary(w, s, "diagnostics/garbage", b"\xff\x01\x02not a proto", [1.0])
        _raw_summary(w, s, "diagnostics/newer", newer, [1.0])
        _raw_summary(w, s, "diagnostics/older", older, [1.0])
        _raw_summary(w, s, "diagnostics/act_mean/wrong", wrong, [1.0, 2.0, 3.0] if s % 2 else [1.0, 2.0])
        _raw_summary(w, s, "diagnostics/matrix", wrong, [[1.0, 2.0], [3.0, 4.0]])
    w.write_vectors(0, [("loss", ["total"], (), np.array([1.5], dtype=np.float32))])
    w.close()

    # Structure documents this reader cannot use: not JSON, a newer version, the wrong shape.
    for run, blob in STRUCTURES.items():
        with EventWriter(str(d / run)) as w:
            w.write_vectors(0, [("loss", ["total"], (), np.array([1.0], dtype=np.float32))])
            summ = structure_summary({"version": 1, "modules": []})
            summ.value[0].tensor.string_val[0] = blob
            w.add_summary(summ, 0)
    return d


# run -> a structure blob the reader must ignore with a note, and the words of that note
STRUCTURES = {
    "badstructure": b"{not json",
    "newerstructure": json.dumps({"version": 99, "modules": [], "optimizer": None}).encode(),
    "shapelessstructure": json.dumps({"version": 1, "modules": {"0": "Linear"}}).encode(),
}
NOTES = {"badstructure": "not JSON", "newerstructure": "newer tb-diag", "shapelessstructure": "no module list"}
RUNS = 5 + len(STRUCTURES) - 1  # good, truncated, corrupted, mixed and the structure runs


def _loaded(srv) -> bool:
    """Every run listed and every readable step of the damaged files loaded."""
    runs = {r["run"]: r for r in srv.plugin("runs")["runs"]}
    if len(runs) < RUNS:
        return False
    good = srv.plugin("values?run=good&metric=grad_norm&points=1000")
    truncated = srv.get("data/plugin/diagnostics/values?run=truncated&metric=grad_norm&points=1000")
    return good["num_steps"] == 20 and truncated[0] == 200 and {"loss", "act_mean"} <= set(runs["mixed"]["metrics"])


@pytest.fixture(scope="module", params=[False, True], ids=["python_loader", "rust_data_server"])
def damaged_server(request, damaged_logdir):
    with serve(str(damaged_logdir), load_fast=request.param) as srv:
        until(lambda: _loaded(srv))
        yield srv


def test_good_run_untouched(damaged_server):
    body = damaged_server.plugin("values?run=good&metric=grad_norm&points=1000")
    assert body["num_steps"] == 20
    assert body["values"][5] == [5.0, 6.0, 7.0]


def test_truncated_file_serves_what_is_readable(damaged_server):
    body = damaged_server.plugin("values?run=truncated&metric=grad_norm&points=1000")
    assert 15 <= body["num_steps"] <= 19
    for step, row in zip(body["steps"], body["values"]):
        assert row == [float(step), step + 1.0, step + 2.0]  # nothing shifted or misattributed


def test_corrupted_record_never_500(damaged_server):
    status, body, _ = damaged_server.get("data/plugin/diagnostics/values?run=corrupted&metric=grad_norm")
    assert status in (200, 404)
    if status == 200:
        for step, row in zip(json.loads(body)["steps"], json.loads(body)["values"]):
            assert row == [float(step), step + 1.0, step + 2.0]


def test_damaged_event_files_are_named_in_runs(damaged_server):
    runs = {r["run"]: r for r in damaged_server.plugin("runs")["runs"]}
    assert runs["good"]["problems"] == []
    (corrupted,) = runs["corrupted"]["problems"]
    assert "is damaged" in corrupted and "TensorBoard stops reading this file there" in corrupted
    (truncated,) = runs["truncated"]["problems"]
    assert "ends in an incomplete record" in truncated
    assert damaged_server.plugin("tags?run=corrupted")["problems"] == [corrupted]


def test_report_names_damaged_files(damaged_logdir, capsys):
    import io

    from tb_diag_plugin import report

    report.run(str(damaged_logdir), as_json=True, fail_on=None, out=io.StringIO())
    notes = capsys.readouterr().err.splitlines()
    assert any(n.startswith("tb-diag report: corrupted: event file") and "is damaged" in n for n in notes)
    assert any(n.startswith("tb-diag report: truncated: ") and "incomplete record" in n for n in notes)
    assert not any(n.startswith("tb-diag report: good:") and "event file" in n for n in notes)


def test_tab_shows_what_cannot_be_shown(damaged_logdir, browser):
    """The problems of the selected runs are visible in the tab, as text, with a marker on each run."""
    from test_browser import Tab, _all_plugins

    with serve(str(damaged_logdir), plugins=_all_plugins()) as srv:
        until(lambda: _loaded(srv))
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            tab = Tab(page, srv)
            tab.select_runs(["corrupted", "truncated", "mixed"])  # more runs than the tab selects by default
            box = tab.frame.locator(".run-problems")
            box.wait_for(state="visible", timeout=0)  # no bound of its own: pytest's timeout ends a hang
            text = box.inner_text()
            assert "is damaged" in text and "TensorBoard stops reading" in text  # corrupted
            assert "incomplete record" in text  # truncated
            assert "newer tb-diag" in text  # mixed: a tag from a newer contract
            warned = tab.frame.evaluate(
                "[...document.querySelectorAll('.run-row')].filter(r => r.querySelector('.run-warn'))"
                ".map(r => r.dataset.run)"
            )
            assert set(warned) >= {"corrupted", "truncated", "mixed"} and "good" not in warned
            tab.screenshot("data-problems.png")
            tab.select_runs(["good"])
            assert tab.frame.locator(".run-problems").is_hidden()
            assert not [e for e in tab.errors if e.startswith("pageerror")]
        finally:
            page.close()


def test_malformed_tags_are_reported_not_fatal(damaged_server):
    runs = {r["run"]: r for r in damaged_server.plugin("runs")["runs"]}
    mixed = runs["mixed"]
    text = " ".join(mixed["problems"])
    assert "newer tb-diag" in text and "undecodable" in text and "no contract version" in text
    assert "loss" in mixed["metrics"]
    assert damaged_server.plugin("values?run=mixed&metric=loss")["values"] == [[1.5]]


def test_wrong_shapes_skipped_with_a_warning(damaged_server):
    body = damaged_server.plugin("values?run=mixed&metric=act_mean&points=100")
    assert body["layers"] == ["p", "q"]
    # Only the 2-element vectors at even steps fit the layer list.
    assert body["steps"] == [0, 2, 4] and body["values"][0] == [1.0, 2.0]
    assert any("wrong shape" in p for p in body["problems"])


@pytest.mark.parametrize("run", sorted(STRUCTURES))
def test_bad_structure_is_ignored_with_a_note(damaged_server, run):
    """A structure document that is not JSON, of a newer version or of the wrong shape: /structure is a
    404 that says why, the findings are still computed (general advice) with the same note, never a 500."""
    status, body, headers = damaged_server.get(f"data/plugin/diagnostics/structure?run={run}")
    error = json.loads(body)["error"]
    assert status == 404 and "unreadable and was ignored" in error and NOTES[run] in error, error
    findings = damaged_server.plugin(f"findings?run={run}")
    assert any("model structure unreadable" in n and NOTES[run] in n for n in findings["skipped"]), findings


def test_every_route_on_every_run_never_500(damaged_server):
    runs = [r["run"] for r in damaged_server.plugin("runs")["runs"]]
    for run in runs:
        from urllib.parse import quote

        for route in ("tags", "structure", "values"):
            for metric in ("grad_norm", "loss", "act_mean", "nope"):
                q = f"{route}?run={quote(run)}&metric={metric}&format=f32"
                status, body, _ = damaged_server.get("data/plugin/diagnostics/" + q)
                assert status in (200, 400, 404), (q, status, body[:300])


def test_many_runs_and_concurrent_requests(tmp_path):
    """200 runs in one logdir; 50 concurrent /values requests answer correctly; memory recorded."""
    for i in range(200):
        with EventWriter(str(tmp_path / f"run{i:03d}")) as w:
            w.write_vectors(0, [("loss", ["total"], (), np.array([float(i)], dtype=np.float32))])
    big = [f"l{j}" for j in range(500)]
    rng = np.random.default_rng(0)
    expected = rng.random((500, 500), dtype=np.float32)
    with EventWriter(str(tmp_path / "big")) as w:
        for s in range(500):
            w.write_vectors(s, [("grad_norm", big, (), expected[s])])
    with serve(str(tmp_path)) as srv:
        runs = srv.wait_for_runs(201)
        assert len(runs) == 201
        # What answering allocates (numpy buffers included), not this process's high-water mark.
        tracemalloc.start()

        def fetch(i):
            if i % 2:
                return i, srv.plugin(f"values?run=run{i:03d}&metric=loss")
            return i, srv.plugin("values?run=big&metric=grad_norm&points=100000")

        with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(fetch, range(50)))
        for i, body in results:
            if i % 2:
                assert body["values"] == [[float(i)]]
            else:
                np.testing.assert_allclose(np.array(body["values"], dtype=np.float32), expected, rtol=1e-6)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # Each of the 25 requests for the big run may hold its answer a few times over while it is in
    # flight (float lists, JSON text); more than that is a copy per layer or answers kept after.
    answer = len(json.dumps(expected.tolist()))
    print(f"peak traced memory {peak / 2**20:.0f} MB answering 50 concurrent requests ({answer / 2**20:.1f} MB each)")
    assert peak < 25 * 8 * answer


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_restarted_job_and_changed_layer_sets_merge_by_step(tmp_path, load_fast):
    """A job restarted from step 5 writes steps 5-9 again (the later value wins); a layer that
    appears at step 10 gets its own tag; both loaders give the same matrix."""
    with EventWriter(str(tmp_path / "run")) as w:
        for s in range(10):
            w.write_vectors(s, [("grad_norm", ["a", "b"], (), np.array([s, -s], dtype=np.float32))])
        for s in range(5, 15):  # the restarted job
            layers = ["a", "b"] if s < 10 else ["a", "b", "c"]
            w.write_vectors(s, [("grad_norm", layers, (), np.arange(len(layers), dtype=np.float32) + 100 * s)])
    with serve(str(tmp_path), load_fast=load_fast) as srv:
        srv.wait_for_runs(1)
        body = until(lambda: (b := srv.plugin("values?run=run&metric=grad_norm&points=1000"))["last_step"] == 14
                     and b)
    assert body["layers"] == ["a", "b", "c"] and body["steps"] == list(range(15))
    rows = body["values"]
    assert rows[2] == [2.0, -2.0, None]
    assert rows[7] == [700.0, 701.0, None]  # the restarted job's value, not the first one's
    assert rows[12] == [1200.0, 1201.0, 1202.0]


def test_fuzzed_route_parameters_never_500(damaged_server):
    """Random values, types, repeats and encodings for every parameter of every route:
    200 or a 4xx with a JSON message, never 500, never a traceback."""
    import random
    from urllib.parse import quote

    rnd = random.Random(7)
    runs = [r["run"] for r in damaged_server.plugin("runs")["runs"]]
    atoms = runs + [
        "", " ", "0", "-1", "1e3", "NaN", "inf", "9" * 30, "2147483648", "-0", "0x10", "1.5", "true", "null",
        "grad_norm", "loss", "act_mean", "../etc/passwd", "%00", "\x00", "<script>", "é运行", "a" * 5000,
        "json", "f32", "csv", "a.weight", "total", "x",
    ]
    names = ["run", "metric", "points", "start", "end", "layer", "format", "tag", "step"]
    routes = ["runs", "tags", "values", "structure", "findings"]
    for _ in range(400):
        route = rnd.choice(routes)
        params = [(rnd.choice(names), rnd.choice(atoms)) for _ in range(rnd.randint(0, 6))]
        query = "&".join(f"{quote(k)}={quote(v, safe='')}" for k, v in params)
        status, body, headers = damaged_server.get(f"data/plugin/diagnostics/{route}?{query}")
        assert status in (200, 400, 404), (route, query[:300], status, body[:300])
        if status != 200:
            message = json.loads(body)["error"]
            assert message and "Traceback" not in message and 'File "' not in message


@pytest.mark.parametrize("load_fast", [False, True], ids=["python_loader", "rust_data_server"])
def test_fast_read_path_equals_the_public_api(damaged_logdir, tmp_path, load_fast):
    """The plugin joins the loaded protos' float32 bytes itself (reading.provider); on every
    metric of every damaged run, and on float64 and wrong-shape tensors, it gives exactly what
    TensorBoard's public read_tensors gives. Under the Python loader its listing (no walk over every
    event) names the same tags, problems and latest steps as list_tensors."""
    import shutil

    from tensorboard import context as tb_context
    from tensorboard.plugins.core import core_plugin

    from tb_diag_plugin import reading
    from tb_diag_plugin.diagnostics_plugin import DiagnosticsLoader

    logdir = tmp_path / "logs"
    shutil.copytree(damaged_logdir, logdir)
    pd = plugin_data_pb2.DiagnosticsPluginData(version=1, metric="grad_norm", layers=["a", "b"]).SerializeToString()
    with EventWriter(str(logdir / "doubles")) as w:
        for s in range(6):
            values = [s, -s, 0.5] if s == 3 else [s, -s]  # one step of the wrong shape
            _raw_summary(w, s, "diagnostics/grad_norm/d", pd, values, dtype="f8" if s % 2 else "f4")
    made = []

    class Capturing(DiagnosticsLoader):
        def load(self, context):
            made.append(context.data_provider)
            return super().load(context)

    with serve(str(logdir), load_fast=load_fast, plugins=[core_plugin.CorePluginLoader(), Capturing()]):
        provider, ctx = made[0], tb_context.RequestContext()

        def doubles_loaded():
            index = reading.index_runs(provider, ctx, "")
            done = "doubles" in index and index["doubles"].stamps.get("diagnostics/grad_norm/d", (0,))[0] == 5
            return done and len(index) >= RUNS + 1 and index

        index = until(doubles_loaded)
        # the listing: the Python loader's fast one against list_tensors
        public_index = reading.index_runs(provider, ctx, "", internals=())
        assert sorted(public_index) == sorted(index)
        for run, idx in index.items():
            other = public_index[run]
            assert (idx.tags, idx.problems, idx.structure_tag) == (other.tags, other.problems, other.structure_tag), run
            assert {t: s[0] for t, s in idx.stamps.items()} == {t: s[0] for t, s in other.stamps.items()}, run
        compared = 0
        for run, idx in index.items():
            for metric in idx.tags:
                fast = reading.read_series(provider, ctx, "", run, metric, idx, reading.ALL_SAMPLES)
                public = reading.read_series(provider, ctx, "", run, metric, idx, reading.ALL_SAMPLES, internals=())
                assert fast[1] == public[1], (run, metric)
                a, b = fast[0], public[0]
                assert (a.layers, a.layer_types) == (b.layers, b.layer_types)
                np.testing.assert_array_equal(a.steps, b.steps)
                np.testing.assert_array_equal(a.values, b.values)
                np.testing.assert_array_equal(np.broadcast_to(a.present, a.values.shape), b.present)
                compared += 1
    assert compared >= 4
    doubles = reading.read_series(provider, ctx, "", "doubles", "grad_norm", index["doubles"], reading.ALL_SAMPLES)
    assert doubles[0].steps.tolist() == [0, 1, 2, 4, 5] and "1 step(s)" in doubles[1][0]
    assert doubles[0].values[:, 1].tolist() == [0, -1, -2, -4, -5]
