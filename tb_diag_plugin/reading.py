"""Read diagnostics back through TensorBoard's data provider.

One metric may be spread over several tags (one per layer set, see
`metadata.vector_tag`); here they are merged into one steps x layers matrix,
layers in order of first appearance. Used by the HTTP routes and by the CLI
(`local_provider` reads a logdir without a server). No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from tensorboard import context as tb_context

from tb_diag_plugin import integrity, metadata

# `downsample` for "every stored sample" (0 would mean none).
ALL_SAMPLES = 2**62


@dataclass
class Series:
    """One metric of one run: values[i, j] is layer j at steps[i].

    `present` is False where a layer had no value at a step (it was not in
    that step's layer set); such cells hold NaN, which is distinct from a
    recorded NaN only through `present`.
    """

    metric: str
    layers: list[str]
    layer_types: list[str]
    steps: np.ndarray  # int64 [S]
    values: np.ndarray  # float32 [S, L]
    present: np.ndarray  # bool [S, L]

    def layer(self, name: str) -> np.ndarray:
        """Values of one layer over steps (NaN where absent)."""
        return self.values[:, self.layers.index(name)]


@dataclass
class RunIndex:
    """What a run holds: metric -> [(tag, PluginData)], plus readable problems."""

    tags: dict[str, list[tuple[str, metadata.PluginData]]] = field(default_factory=dict)
    structure_tag: Optional[str] = None
    problems: list[str] = field(default_factory=list)

    def layers(self, metric: str) -> tuple[list[str], list[str]]:
        names: list[str] = []
        types: dict[str, str] = {}
        for _, pd in self.tags.get(metric, []):
            for i, n in enumerate(pd.layers):
                if n not in types:
                    names.append(n)
                    types[n] = pd.layer_types[i] if pd.layer_types else ""
        return names, [types[n] for n in names]


def index_runs(provider, ctx, experiment_id: str) -> dict[str, RunIndex]:
    """Every run that has diagnostics, with its metrics' tags."""
    listing = provider.list_tensors(ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME)
    blobs = {}
    try:
        blobs = provider.list_blob_sequences(
            ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME
        )
    except Exception:  # a provider without blob support still serves vectors
        blobs = {}
    out: dict[str, RunIndex] = {}
    for run in sorted(set(listing) | set(blobs)):
        idx = RunIndex()
        for tag, ts in sorted(listing.get(run, {}).items()):
            try:
                pd = metadata.parse_plugin_data(ts.plugin_content)
            except metadata.ContractError as e:
                idx.problems.append(f"tag {tag!r} skipped: {e}")
                continue
            if pd.kind != metadata.VECTOR:
                continue
            idx.tags.setdefault(pd.metric, []).append((tag, pd))
        for tag in blobs.get(run, {}):
            if tag == metadata.STRUCTURE_TAG:
                idx.structure_tag = tag
        if idx.tags or idx.structure_tag or idx.problems:
            out[run] = idx
    return out


def read_series(
    provider, ctx, experiment_id: str, run: str, metric: str, index: RunIndex, downsample: int
) -> tuple[Series, list[str]]:
    """Merge a metric's tags into a Series; returns it with readable problems.

    A datum whose length does not match its tag's layer list is skipped and
    reported, never misattributed to other layers.
    """
    entries = index.tags[metric]
    layers, layer_types = index.layers(metric)
    col = {n: j for j, n in enumerate(layers)}
    tag_cols = {tag: np.array([col[n] for n in pd.layers], dtype=np.int64) for tag, pd in entries}
    result = provider.read_tensors(
        ctx,
        experiment_id=experiment_id,
        plugin_name=metadata.PLUGIN_NAME,
        run_tag_filter=_filter(run, [t for t, _ in entries]),
        downsample=downsample,
    )
    data = result.get(run, {})
    problems: list[str] = []
    rows: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    L = len(layers)
    for tag, _ in entries:
        cols = tag_cols[tag]
        bad = 0
        for datum in data.get(tag, []):
            arr = _as_vector(datum.numpy)
            if arr is None or arr.size != cols.size:
                bad += 1
                continue
            vals, pres = rows.get(datum.step, (None, None))
            if vals is None:
                vals = np.full(L, np.nan, dtype=np.float32)
                pres = np.zeros(L, dtype=bool)
                rows[datum.step] = (vals, pres)
            vals[cols] = arr
            pres[cols] = True
        if bad:
            problems.append(f"{metric}: {bad} step(s) of tag {tag!r} have the wrong shape and were skipped")
    steps = np.array(sorted(rows), dtype=np.int64)
    if steps.size:
        values = np.stack([rows[s][0] for s in steps])
        present = np.stack([rows[s][1] for s in steps])
    else:
        values = np.zeros((0, L), dtype=np.float32)
        present = np.zeros((0, L), dtype=bool)
    return Series(metric, layers, layer_types, steps, values, present), problems


def read_structure(provider, ctx, experiment_id: str, run: str) -> Optional[dict[str, Any]]:
    """The latest module-tree document of a run, or None."""
    seqs = provider.read_blob_sequences(
        ctx,
        experiment_id=experiment_id,
        plugin_name=metadata.PLUGIN_NAME,
        run_tag_filter=_filter(run, [metadata.STRUCTURE_TAG]),
        downsample=1,
    )
    data = seqs.get(run, {}).get(metadata.STRUCTURE_TAG, [])
    if not data or not data[-1].values:
        return None
    blob = provider.read_blob(ctx, blob_key=data[-1].values[0].blob_key)
    doc = json.loads(blob.decode("utf-8"))
    if not isinstance(doc, dict) or not isinstance(doc.get("modules"), list):
        raise ValueError("structure document is malformed")
    return doc


def read_run(
    provider, ctx, experiment_id: str, run: str, index: RunIndex, downsample: int = ALL_SAMPLES
) -> dict[str, Series]:
    """Every metric of a run (for findings and export)."""
    out = {}
    for metric in index.tags:
        series, problems = read_series(provider, ctx, experiment_id, run, metric, index, downsample)
        index.problems.extend(problems)
        out[metric] = series
    return out


def _as_vector(value: Any) -> Optional[np.ndarray]:
    try:
        arr = np.asarray(value)
    except Exception:
        return None
    if arr.dtype.kind not in "fiu" or arr.ndim > 1:
        return None
    return arr.reshape(-1).astype(np.float32, copy=False)


def _filter(run: str, tags: list[str]):
    from tensorboard.data import provider as tb_provider

    return tb_provider.RunTagFilter(runs=[run], tags=tags)


class LocalReader:
    """Reads a logdir without a server (for `tb-diag report` and `export`).

    Loads every diagnostics sample (no reservoir downsampling) with
    TensorBoard's own event multiplexer.
    """

    def __init__(self, logdir: str) -> None:
        from tensorboard.backend.event_processing import data_provider as tb_dp
        from tensorboard.backend.event_processing import plugin_event_multiplexer as pem

        mux = pem.EventMultiplexer(
            tensor_size_guidance={metadata.PLUGIN_NAME: 0}, max_reload_threads=2
        )
        mux.AddRunsFromDirectory(logdir)
        mux.Reload()
        self.provider = tb_dp.MultiplexerDataProvider(mux, logdir)
        self.ctx = tb_context.RequestContext()
        self.experiment_id = ""
        self.index = index_runs(self.provider, self.ctx, self.experiment_id)
        checker = integrity.EventFileChecker()
        for run, idx in self.index.items():
            run_dir = integrity.run_directory(logdir, run)
            if run_dir:
                idx.problems.extend(checker.problems(run_dir))

    def runs(self) -> list[str]:
        return sorted(self.index)

    def series(self, run: str) -> dict[str, Series]:
        return read_run(self.provider, self.ctx, self.experiment_id, run, self.index[run])

    def structure(self, run: str) -> Optional[dict[str, Any]]:
        if self.index[run].structure_tag is None:
            return None
        return read_structure(self.provider, self.ctx, self.experiment_id, run)
