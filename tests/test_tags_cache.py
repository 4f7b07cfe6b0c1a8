"""/tags is encoded once per data version of a run (issue 24 point 2): at 5,000 tensors it names every
layer of every metric (812 kB), which was rebuilt on every request. The cached part is kept in the
plugin's byte-bounded cache and answers nothing stale once the run changes.

On a real TensorBoard; every wait is on a condition (tbserver.until), never a sleep.
"""

from __future__ import annotations

import json

import numpy as np
from tensorboard.context import RequestContext

from tb_diag_plugin.diagnostics_plugin import Config
from tb_diag_plugin.summary import EventWriter
from tbserver import serve_with_plugin, until

LAYERS = [f"blocks.{b}.{p}" for b in range(40) for p in ("weight", "bias")]
SITES = [f"blocks.{b}.relu()" for b in range(40)]


def _tags_entries(plugin, run: str) -> list:
    """The /tags entries the plugin's cache holds for `run`: (data version, cached bytes)."""
    return [(key[1][3], value) for key, value in plugin.store.memory.entries()
            if key[0] == plugin.store.answers.name and key[1][:1] == ("tags",) and key[1][2] == run]


def test_tags_are_encoded_once_per_data_version_and_follow_the_run(tmp_path):
    run = "r"
    w = EventWriter(str(tmp_path / run), flush_secs=1)
    for s in range(5):
        w.write_vectors(s, [("grad_norm", LAYERS, (), np.ones(len(LAYERS), np.float32))])
    w.flush()
    with serve_with_plugin(str(tmp_path), config=Config(preload=False, index_ttl_s=0.0)) as (srv, plugin):
        srv.wait_for_runs(1)
        first = srv.plugin(f"tags?run={run}")
        assert first["run"] == run and first["problems"] == [] and first["has_structure"] is False
        assert first["metrics"] == {"grad_norm": {"layers": LAYERS, "layer_types": [""] * len(LAYERS)}}
        version = plugin.store.index(RequestContext(), "")[run].data_version()
        [(at, held)] = _tags_entries(plugin, run)
        assert at == version
        # Asked again: the same bytes, taken from the cache, not encoded again.
        assert srv.plugin(f"tags?run={run}") == first
        [(_, again)] = _tags_entries(plugin, run)
        assert again is held
        # The run gains a metric: the next answer names it (a new data version), never the cached one.
        w.write_vectors(5, [("dead_fraction", SITES, ["ReLU"] * len(SITES), np.zeros(len(SITES), np.float32))])
        w.flush()
        grown = until(lambda: (t := srv.plugin(f"tags?run={run}")) and "dead_fraction" in t["metrics"] and t)
        assert grown["metrics"]["dead_fraction"] == {"layers": SITES, "layer_types": ["ReLU"] * len(SITES)}
        assert grown["metrics"]["grad_norm"] == first["metrics"]["grad_norm"]
        now = plugin.store.index(RequestContext(), "")[run].data_version()
        assert now in {at for at, _ in _tags_entries(plugin, run)}
    w.close()


def test_a_complete_findings_answer_is_encoded_once_and_follows_the_run(tmp_path):
    """/findings?partial=true, once complete, is the same bytes on every request (encoded once, kept in the
    byte-bounded cache), equal to the answer computed independently; a new step gives a new answer."""
    run = "r"
    w = EventWriter(str(tmp_path / run), flush_secs=1)
    for s in range(30):
        w.write_vectors(s, [("loss", ["total"], (), np.array([1.0], np.float32)),
                            ("grad_norm", LAYERS, (), np.full(len(LAYERS), np.nan if s >= 20 else 1.0, np.float32))])
    w.flush()
    with serve_with_plugin(str(tmp_path), config=Config(preload=False, index_ttl_s=0.0)) as (srv, plugin):
        srv.wait_for_runs(1)
        path = f"data/plugin/diagnostics/findings?run={run}&partial=true&wait_ms=5000"
        first = until(lambda: (b := srv.get(path)[1]) and json.loads(b)["complete"] and b)
        body = json.loads(first)
        assert "nonfinite" in {f["kind"] for f in body["findings"]}  # the NaN gradients from step 20
        # the same bytes again, and the answer the blocking route computes
        assert srv.get(path)[1] == first
        whole = srv.plugin(f"findings?run={run}")
        assert body == {**json.loads(json.dumps(whole)), "complete": True}
        def held():  # (data version, bytes) of the kept encodings
            return [(k[1][3], v[1]) for k, v in plugin.store.memory.entries()
                    if k[0] == plugin.store.answers.name and k[1][:2] == ("findings", "")]

        version = plugin.store.index(RequestContext(), "")[run].data_version()
        assert held() == [(version, first)]
        # a new step: the answer of the new data version is encoded (and kept) for it
        w.write_vectors(30, [("loss", ["total"], (), np.array([2.0], np.float32))])
        w.flush()
        until(lambda: plugin.store.index(RequestContext(), "")[run].data_version() != version)
        now = plugin.store.index(RequestContext(), "")[run].data_version()
        grown = until(lambda: (b := srv.get(path)[1]) and json.loads(b)["complete"] and now in dict(held()) and b)
        assert dict(held())[now] == grown
    w.close()
