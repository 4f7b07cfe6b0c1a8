"""What the model view's answer is made from, read once per data version and kept in the store: the
structure document, each layer's first recorded NaN/Inf, the gradient norms of the last logged step;
and `warm`, which the background runs once a run is read.

The route (`/model`) and the background readers both call these: the preload reads them once a run's
step summaries are built, so that the model view's first visit finds them in memory (at 20,000 steps x
5,000 tensors, reading and keeping the structure and scanning for NaN/Inf took about half a second).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from tb_diag_plugin import metadata
from tb_diag_plugin.reading import RunIndex, read_structure
from tb_diag_plugin.series import Series
from tb_diag_plugin.serving import model_tree, wire
from tb_diag_plugin.serving.store import RunStore


def structure(store: RunStore, ctx, eid: str, run: str, idx: RunIndex) -> tuple[Optional[dict], Optional[str]]:
    """(structure document or None, why it is unusable or None), read once per version of its tag."""
    if idx.structure_tag is None:
        return None, None

    def read():
        try:
            return read_structure(store.provider, ctx, eid, run), None
        except ValueError as e:  # metadata.ContractError
            return None, f"model structure of run {run[:200]!r} is unreadable and was ignored: {e}"

    return store.answers.get(("structure", eid, run, idx.stamps.get(idx.structure_tag)), read)


def modules(store: RunStore, ctx, eid: str, run: str, idx: RunIndex) -> tuple[model_tree.Modules, Optional[dict],
                                                                               Optional[str]]:
    """(the model's modules and their tree, the structure document or None, why it is unusable or None):
    built once per data version of the run (the layers named in it, and the document's tag, can change)."""
    doc, note = structure(store, ctx, eid, run, idx)
    mods = store.answers.get(
        ("modules", eid, run, idx.data_version()),
        lambda: model_tree.Modules(model_tree.modules_of(doc, {m: idx.layers(m) for m in idx.tags})))
    return mods, doc, note


def nonfinite(store: RunStore, ctx, eid: str, run: str, idx: RunIndex) -> dict[str, tuple[int, str]]:
    """Layer -> (first step of a recorded NaN/Inf, its layer kind) over the metrics the model view scans,
    each metric's scan kept per its data version."""
    out: dict[str, tuple[int, str]] = {}
    for metric in model_tree.SCAN_METRICS:
        if metric not in idx.tags:
            continue
        # Once per data version. A metric read on demand (too big for the cache) is scanned through its
        # step summary (only the bins holding a NaN/Inf read again), or read whole when it has none.
        first = store.binned.get(
            ((eid, run, metric, idx.version(metric)), "first_nonfinite"),
            lambda m=metric: _first_nonfinite(store, ctx, eid, run, m, idx))
        for layer, step in first.items():
            if layer not in out or step < out[layer][0]:
                out[layer] = (step, metadata.METRICS[metric].layer_kind)
    return out


def _first_nonfinite(store: RunStore, ctx, eid: str, run: str, metric: str, idx: RunIndex) -> dict[str, int]:
    """`model_tree.first_nonfinite` of one metric, from its step summary when it is read on demand."""
    series, _, key = store.series_and_key(ctx, eid, run, metric, idx)
    if not isinstance(series, Series):
        summary = store.summary_of(series, key)
        if summary is not None:
            return model_tree.first_nonfinite_summarized(
                summary, series.layers, lambda a, b, cols: series.bin_columns(b - a + 1, a, b, cols))
    return model_tree.first_nonfinite(store.series(ctx, eid, run, metric, idx)[0])


def last_values(store: RunStore, ctx, eid: str, run: str, idx: RunIndex) -> tuple[Optional[int], dict[str, float]]:
    """`model_tree.last_values` of the gradient norms: of the last logged step only, when read on demand."""
    if model_tree.VALUE_METRIC not in idx.tags:
        return None, {}
    series = store.series_and_key(ctx, eid, run, model_tree.VALUE_METRIC, idx)[0]
    if isinstance(series, Series) or not series.steps.size:
        return model_tree.last_values(series)

    def read():  # from the event files: once per data version
        last = int(series.steps[-1])
        b = series.bin_columns(1, last, last, np.arange(len(series.layers)))
        return last, {n: float(b.mean[0, j]) for j, n in enumerate(series.layers) if b.present[0, j]}

    return store.binned.get(((eid, run, model_tree.VALUE_METRIC, idx.version(model_tree.VALUE_METRIC)),
                             "last_values"), read)


def warm(store: RunStore, ctx, eid: str, run: str, idx: RunIndex) -> None:
    """Read what the model view's answer is made from into the store, and build each metric's module tree and
    its group rows (what a grouped heatmap's first answer would otherwise build): the background's last task."""
    modules(store, ctx, eid, run, idx)
    nonfinite(store, ctx, eid, run, idx)
    last_values(store, ctx, eid, run, idx)
    for metric in idx.tags:
        series, _, version = store.series_and_key(ctx, eid, run, metric, idx)
        if len(series.layers) > 1:
            wire.layer_tree(series, metric, series.layers)
            # the group rows a grouped heatmap's first answer is made from, for any screen
            wire.warm_group_rows(store.group_rows, series, metric, version, metadata.HEATMAP_MAX_ROWS)
