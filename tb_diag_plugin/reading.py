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
from tb_diag_plugin.findings.series import Series

# `downsample` for "every stored sample" (0 would mean none).
ALL_SAMPLES = 2**62


@dataclass
class RunIndex:
    """What a run holds: metric -> [(tag, PluginData)], plus readable problems."""

    tags: dict[str, list[tuple[str, metadata.PluginData]]] = field(default_factory=dict)
    structure_tag: Optional[str] = None
    problems: list[str] = field(default_factory=list)
    # tag -> (max step, max wall time), or (latest step, its wall time, count) under the Python loader
    stamps: dict[str, tuple] = field(default_factory=dict)

    def version(self, metric: str) -> tuple:
        """Changes whenever one of the metric's tags gains a step: a cache key."""
        return tuple((tag, self.stamps.get(tag)) for tag, _ in self.tags.get(metric, []))

    def data_version(self) -> tuple:
        """Changes whenever any of the run's tags gains a step: a cache key for the whole run."""
        return tuple(sorted(self.stamps.items()))

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
    listing = _multiplexer_listing(provider)
    if listing is None:
        listing = {
            run: {tag: (ts.plugin_content, (ts.max_step, ts.max_wall_time)) for tag, ts in tags.items()}
            for run, tags in provider.list_tensors(
                ctx, experiment_id=experiment_id, plugin_name=metadata.PLUGIN_NAME
            ).items()
        }
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
        for tag, (content, stamp) in sorted(listing.get(run, {}).items()):
            try:
                pd = metadata.parse_plugin_data(content)
            except metadata.ContractError as e:
                idx.problems.append(f"tag {tag!r} skipped: {e}")
                continue
            if pd.kind != metadata.VECTOR:
                continue
            idx.tags.setdefault(pd.metric, []).append((tag, pd))
            idx.stamps[tag] = stamp
        for tag in blobs.get(run, {}):
            if tag == metadata.STRUCTURE_TAG:
                idx.structure_tag = tag
        if idx.tags or idx.structure_tag or idx.problems:
            out[run] = idx
    return out


def _multiplexer(provider):
    """The event multiplexer behind TensorBoard's Python loader (`--load_fast false`), or None."""
    if type(provider).__name__ != "MultiplexerDataProvider":
        return None
    return getattr(provider, "_multiplexer", None)


def _multiplexer_listing(provider) -> Optional[dict[str, dict[str, tuple[bytes, tuple]]]]:
    """Under the Python loader: run -> tag -> (plugin content, stamp) of our tensor tags, or None.

    `list_tensors` there walks every event of every tag in Python to find the
    largest step (100 ms for one 20,000-step run here, so seconds for a logdir
    of many runs, at every poll); the latest event's (step, wall time, count)
    changes whenever a tag gains a step, which is all a stamp is for.
    """
    mux = _multiplexer(provider)
    index = getattr(provider, "_index", None)
    if mux is None or index is None:
        return None
    try:
        from tensorboard.compat.proto import summary_pb2

        out: dict[str, dict[str, tuple[bytes, tuple]]] = {}
        for run, tags in index(metadata.PLUGIN_NAME, None, summary_pb2.DATA_CLASS_TENSOR).items():
            found = out[run] = {}
            for tag, summary_metadata in tags.items():
                events = mux.Tensors(run, tag)
                last = events[-1] if events else None
                stamp = (last.step, last.wall_time, len(events)) if last is not None else (None, None, 0)
                found[tag] = (summary_metadata.plugin_data.content, stamp)
        return out
    except Exception:  # another TensorBoard version: the public listing
        return None


def read_series(
    provider, ctx, experiment_id: str, run: str, metric: str, index: RunIndex, downsample: int
) -> tuple[Series, list[str]]:
    """Merge a metric's tags into a Series; returns it with readable problems.

    A datum whose length does not match its tag's layer list is skipped and
    reported, never misattributed to other layers. Where a step was written
    twice (a restarted job), the later datum wins.
    """
    entries = index.tags[metric]
    layers, layer_types = index.layers(metric)
    col = {n: j for j, n in enumerate(layers)}
    columns = _read_raw(provider, ctx, experiment_id, run, entries, downsample)
    if columns is None:
        tags = [t for t, _ in entries]
        result = provider.read_tensors(
            ctx,
            experiment_id=experiment_id,
            plugin_name=metadata.PLUGIN_NAME,
            run_tag_filter=_filter(run, tags),
            downsample=downsample,
        )
        data = result.get(run, {})
        columns = {
            tag: _columns([d.step for d in data.get(tag, [])], [d.numpy for d in data.get(tag, [])], len(pd.layers))
            for tag, pd in entries
        }
    problems: list[str] = []
    parts = []  # (steps, matrix, column indices), in tag order: later tags win on overlap
    for tag, pd in entries:
        steps, matrix, bad = columns[tag]
        if bad:
            problems.append(f"{metric}: {bad} step(s) of tag {tag!r} have the wrong shape and were skipped")
        if steps.size:
            parts.append((*_last_per_step(steps, matrix), np.array([col[n] for n in pd.layers], dtype=np.int64)))
    return Series(metric, layers, layer_types, *_merge(parts, len(layers))), problems


def _columns(steps: list[int], values: list[Any], width: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(steps, matrix [S, width] float32, number skipped) from one tag's data, skipping wrong shapes."""
    arrays = [_as_vector(v) for v in values]
    keep = [i for i, a in enumerate(arrays) if a is not None and a.size == width]
    matrix = np.stack([arrays[i] for i in keep]) if keep else np.zeros((0, width), dtype=np.float32)
    return np.array([steps[i] for i in keep], dtype=np.int64), matrix, len(arrays) - len(keep)


def _last_per_step(steps: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique steps, keeping the last datum written for each."""
    if steps.size < 2 or bool(np.all(steps[1:] > steps[:-1])):
        return steps, matrix
    uniq, first_in_reversed = np.unique(steps[::-1], return_index=True)
    return uniq, matrix[steps.size - 1 - first_in_reversed]


def _merge(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], L: int):
    """(steps, values, present) of the union of the parts' steps."""
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, L), dtype=np.float32), np.zeros((0, L), dtype=bool)
    if len(parts) == 1 and parts[0][2].size == L and bool(np.all(parts[0][2] == np.arange(L))):
        steps, matrix, _ = parts[0]  # one tag that holds every layer: no copy, nothing absent
        return steps, matrix, np.broadcast_to(np.True_, matrix.shape)
    steps = np.unique(np.concatenate([p[0] for p in parts]))
    values = np.full((steps.size, L), np.nan, dtype=np.float32)
    present = np.zeros((steps.size, L), dtype=bool)
    for tag_steps, matrix, cols in parts:
        rows = np.searchsorted(steps, tag_steps)[:, None]
        values[rows, cols[None, :]] = matrix
        present[rows, cols[None, :]] = True
    return steps, values, present


def _read_raw(provider, ctx, experiment_id, run, entries, downsample):
    """The tensors' bytes straight from TensorBoard's loaded protos, joined with one copy.

    Both of TensorBoard's data providers turn each step into a numpy array in
    Python (0.6 s of 1.1 s for 20,000 steps x 500 layers under the Rust data
    server here, more under the Python loader); joining the raw float32
    payloads is one copy. Returns None where this does not apply (another
    provider, an unexpected TensorBoard version); the caller then uses the
    public API.
    """
    found = _grpc_protos(provider, experiment_id, run, entries, downsample)
    if found is None:
        found = _multiplexer_protos(provider, run, entries, downsample)
    if found is None:
        return None
    from tensorboard.util import tensor_util

    out = {}
    for tag, pd in entries:
        steps, values = found.get(tag, ([], []))
        width = len(pd.layers)
        if not values:
            out[tag] = (np.zeros(0, dtype=np.int64), np.zeros((0, width), dtype=np.float32), 0)
            continue
        contents = [v.tensor_content for v in values]
        if {v.dtype for v in values} <= {1} and all(len(c) == 4 * width for c in contents):
            # DT_FLOAT tensors of the right length (the logger's own output): one copy, read-only.
            matrix = np.frombuffer(b"".join(contents), dtype="<f4").reshape(len(values), width)
            if not matrix.dtype.isnative:
                matrix = matrix.astype(np.float32)
            out[tag] = (np.array(steps, dtype=np.int64), matrix, 0)
        else:
            out[tag] = _columns(list(steps), [_quiet_ndarray(tensor_util, v) for v in values], width)
    return out


def _grpc_protos(provider, experiment_id, run, entries, downsample):
    """Under the Rust data server: tag -> (steps, TensorProtos) from one ReadTensors call, or None."""
    stub = getattr(provider, "_stub", None)
    if stub is None or type(provider).__name__ != "GrpcDataProvider":
        return None
    try:
        from tensorboard.data.proto import data_provider_pb2

        req = data_provider_pb2.ReadTensorsRequest(experiment_id=experiment_id)
        req.plugin_filter.plugin_name = metadata.PLUGIN_NAME
        req.run_tag_filter.runs.names[:] = [run]
        req.run_tag_filter.tags.names[:] = sorted(t for t, _ in entries)
        req.downsample.num_points = downsample
        res = stub.ReadTensors(req)
    except Exception:
        return None
    found = {}
    for run_entry in res.runs:
        if run_entry.run_name != run:
            continue
        for tag_entry in run_entry.tags:
            found[tag_entry.tag_name] = (tag_entry.data.step, list(tag_entry.data.value))
    return found


def _multiplexer_protos(provider, run, entries, downsample):
    """Under the Python loader: tag -> (steps, TensorProtos) from its event multiplexer, or None.

    Only when every stored sample is wanted (the loader has already applied
    its retention; `downsample` would otherwise pick a subset).
    """
    mux = _multiplexer(provider)
    if mux is None or downsample != ALL_SAMPLES:
        return None
    found = {}
    try:
        for tag, _ in entries:
            try:
                events = mux.Tensors(run, tag)
            except KeyError:  # the run or tag went away since the listing
                continue
            found[tag] = ([e.step for e in events], [e.tensor_proto for e in events])
    except Exception:
        return None
    return found


def _quiet_ndarray(tensor_util, value):
    try:
        return tensor_util.make_ndarray(value)
    except Exception:
        return None


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
    if arr.dtype.kind not in "fiu":
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
            idx.problems.extend(checker.run_problems(logdir, run))

    def runs(self) -> list[str]:
        return sorted(self.index)

    def series(self, run: str) -> dict[str, Series]:
        return read_run(self.provider, self.ctx, self.experiment_id, run, self.index[run])

    def structure(self, run: str) -> Optional[dict[str, Any]]:
        if self.index[run].structure_tag is None:
            return None
        return read_structure(self.provider, self.ctx, self.experiment_id, run)
