"""Read diagnostics back through TensorBoard's data provider.

One metric may be spread over several tags (one per layer set, see
`metadata.vector_tag`); here they are merged into one steps x layers matrix,
layers in order of first appearance. Used by the HTTP routes and by the CLI
(`LocalReader` reads a logdir without a server). No torch here; what
touches TensorBoard's internals is in `provider`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Optional

import numpy as np
from tensorboard import context as tb_context

from tb_diag_plugin import metadata
from tb_diag_plugin.reading import integrity
from tb_diag_plugin.reading import provider as tb_access
from tb_diag_plugin.reading.provider import ALL_SAMPLES, INTERNALS
from tb_diag_plugin.series import Series

__all__ = ["ALL_SAMPLES", "LocalReader", "RunIndex", "Series", "index_runs", "read_run", "read_series",
           "read_structure"]


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

    def last_step(self, metric: str) -> Optional[int]:
        """The last step logged for `metric` as its tags' listing says (None if it says none)."""
        steps = [self.stamps[tag][0] for tag, _ in self.tags.get(metric, []) if self.stamps.get(tag)]
        return int(max(steps)) if steps else None

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


def index_runs(provider, ctx, experiment_id: str, internals: Collection[str] = INTERNALS) -> dict[str, RunIndex]:
    """Every run that has diagnostics, with its metrics' tags (`internals`: see `provider.INTERNALS`)."""
    listing = tb_access.list_tensors(provider, ctx, experiment_id, internals)
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


def read_series(
    provider, ctx, experiment_id: str, run: str, metric: str, index: RunIndex, downsample: int,
    internals: Collection[str] = INTERNALS,
) -> tuple[Series, list[str]]:
    """Merge a metric's tags into a Series; returns it with readable problems.

    A datum whose length does not match its tag's layer list is skipped and
    reported, never misattributed to other layers. Where a step was written
    twice (a restarted job), the later datum wins.
    """
    entries = index.tags[metric]
    layers, layer_types = index.layers(metric)
    col = {n: j for j, n in enumerate(layers)}
    columns = tb_access.read_columns(provider, ctx, experiment_id, run, entries, downsample, internals)
    problems: list[str] = []
    parts = []  # (steps, matrix, column indices), in tag order: later tags win on overlap
    for tag, pd in entries:
        steps, matrix, bad = columns[tag]
        if bad:
            problems.append(f"{metric}: {bad} step(s) of tag {tag!r} have the wrong shape and were skipped")
        if steps.size:
            parts.append((*_last_per_step(steps, matrix), np.array([col[n] for n in pd.layers], dtype=np.int64)))
    return Series(metric, layers, layer_types, *_merge(parts, len(layers))), problems


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


def read_structure(provider, ctx, experiment_id: str, run: str) -> Optional[dict[str, Any]]:
    """The latest module-tree document of a run, or None; `metadata.ContractError` (a ValueError) when it
    is unreadable, of an unknown version or of the wrong shape (the caller ignores it with a note)."""
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
    return metadata.parse_structure(provider.read_blob(ctx, blob_key=data[-1].values[0].blob_key))


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
