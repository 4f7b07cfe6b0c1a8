"""What goes over HTTP: query arguments in, JSON errors and the /values answer (JSON or f32) out."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from typing import Callable, Optional, Sequence

import numpy as np
from tensorboard import errors
from tensorboard.backend import http_util
from werkzeug import wrappers

from tb_diag_plugin import layer_groups, metadata
from tb_diag_plugin.reading import Series, downsample, stepbins

logger = logging.getLogger(__name__)


def json_route(fn: Callable) -> Callable:
    """Turn typed errors and bad input into 4xx JSON; never a traceback."""

    @functools.wraps(fn)
    @wrappers.Request.application
    def wrapper(self, request):
        try:
            return fn(self, request)
        except errors.PublicError as e:
            return http_util.Respond(
                request, {"error": str(e)}, "application/json", code=e.http_code
            )
        except Exception as e:  # a bug of ours: logged in full, answered without a traceback
            logger.exception("diagnostics route %s failed", request.path)
            return http_util.Respond(
                request, {"error": f"internal error ({type(e).__name__}); see the TensorBoard log"},
                "application/json", code=500,
            )

    return wrapper


def arg_int(request, name: str, default: Optional[int], lo: int, hi: int) -> Optional[int]:
    """The integer query argument `name`, or `default`; InvalidArgumentError outside [lo, hi]."""
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.InvalidArgumentError(f"{name} must be an integer, got {raw[:40]!r}") from None
    if not lo <= value <= hi:
        raise errors.InvalidArgumentError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def arg_bool(request, name: str) -> bool:
    """The query argument `name` as true/false (absent: false)."""
    raw = request.args.get(name, "false")
    if raw not in ("true", "false"):
        raise errors.InvalidArgumentError(f"{name} must be true or false, got {raw[:20]!r}")
    return raw == "true"


def respond(request, body: bytes, content_type: str, encoding: Optional[str]):
    return http_util.Respond(request, body, content_type, content_encoding=encoding)


def json_bytes(obj) -> bytes:
    """`obj` encoded as `http_util.Respond` encodes a dict (TensorBoard's NaN strings, ASCII escapes)."""
    return json.dumps(_cleanse(obj), ensure_ascii=True).encode("utf-8")


def version_text(version) -> str:
    """A data version (a tuple of tag stamps) as a short opaque string for the tab to compare."""
    return hashlib.blake2b(repr(version).encode("utf-8"), digest_size=8).hexdigest()


def tags_json(idx) -> bytes:
    """The metrics part of a /tags answer, JSON-encoded: each metric's layers and their types."""
    metrics = {}
    for metric in sorted(idx.tags):
        layers, types = idx.layers(metric)
        metrics[metric] = {"layers": layers, "layer_types": types}
    return json.dumps(metrics).encode("utf-8")


def values_answer(run: str, metric: str, series: Series, problems: list[str], points: int,
                  start: Optional[int], end: Optional[int], fmt: str, wanted: list[str],
                  max_rows: Optional[int] = None, expand: Sequence[str] = (), reveal: Sequence[str] = (),
                  version: str = "", binned: Optional[Callable] = None, group_rows: Optional[tuple] = None):
    """(body, content type, content encoding) of a /values answer: the layers `wanted` (all when empty)
    between steps `start` and `end`, binned to at most `points` rows, and with `max_rows`, grouped along
    the module tree to at most that many layer rows (`layer_groups.rows`). `binned(make)` (optional)
    returns a cached result of `make()`, the binned columns; `group_rows` (optional: a cache part and the
    key of these bins) keeps each group's row, so that opening a group aggregates only its children. A series
    with a step-binned summary (`RunStore.series_and_key`) is answered from it where it can be (the same bins
    as without it)."""
    # A grouped view of a summarized metric: the summary's own bins are grouped, then the groups' bins merged
    # (a few dozen columns merged, not 5,000); the same cells as grouping the merged bins.
    own = _from_summary(metric, series, points, start, end, wanted, own=True) if max_rows is not None else None
    if own is not None:
        cols, b, m = own
    else:  # kept by `binned` (a grouped view's): opening a group regroups them without binning again
        cols, b = (binned or (lambda make: make()))(
            lambda: _from_summary(metric, series, points, start, end, wanted)
            or bin_columns(metric, series, points, start, end, wanted))
    names = [series.layers[j] for j in cols]
    types = [series.layer_types[j] for j in cols]
    groups = None
    if max_rows is not None and names:
        rows = None if group_rows is None else (group_rows[0], _rows_key(group_rows[1], own is not None))
        names, types, groups, b = _grouped(metric, names, types, b, max_rows, expand, reveal,
                                           layer_tree(series, metric, names), rows)
    if own is not None:
        b = stepbins.merge(b, m)
    header = {
        "run": run,
        "metric": metric,
        "layers": names,
        "layer_types": types,
        "num_steps": int(series.steps.size),
        "first_step": int(series.steps[0]) if series.steps.size else None,
        "last_step": int(series.steps[-1]) if series.steps.size else None,
        "binned": b.binned,
        "problems": problems,
        "data_version": version,
    }
    if max_rows is not None:
        header.update(grouped=groups is not None and any(g is not None for g in groups),
                      num_layers=len(cols), groups=groups)
    if fmt == "f32":
        return _f32_body(header, b, with_range=b.binned or bool(header.get("grouped")))
    absent = b.present == 0
    header.update(
        steps=b.step_first.tolist(),
        step_last=b.step_last.tolist(),
        values=_json_matrix(b.mean, absent),
    )
    if b.binned or header.get("grouped"):
        header.update(min=_json_matrix(b.min, absent), max=_json_matrix(b.max, absent),
                      nonfinite=b.nonfinite.astype(np.int64).tolist())
    return json.dumps(_cleanse(header), allow_nan=False).encode("utf-8"), "application/json", None


def _rows_key(binned_key: tuple, own: bool) -> tuple:
    """The key of a grouped view's group rows: the bins they are reduced from. The summary's own bins (`own`)
    do not depend on the request's points, so neither does their key: the background warms them once
    (`warm_group_rows`) for whatever screen asks. `binned_key`: (version, points, start, end, layers)."""
    version, points, start, end, wanted = binned_key
    return (version, None if own else points, start, end, wanted, own)


def warm_group_rows(part, series, metric: str, version, max_rows: int) -> int:
    """Reduce, from the metric's step summary, the row of every group on the levels of its module tree that
    a grouped view of the whole run opens at (those of at most `max_rows` rows), into `part` (the store's
    group rows), so that a view's first answer only gathers and merges them. The number of group rows."""
    if len(series.layers) < 2:
        return 0
    summary_of = getattr(series, "summary", None)
    summary = summary_of(True) if summary_of is not None else None
    if summary is None:
        return 0
    own = _from_summary(metric, series, summary.points, None, None, [], own=True)
    if own is None:  # a run shorter than the summary's points: its rows are the steps themselves
        return 0
    _, b, _ = own
    groups = [r for level in layer_groups.levels(layer_tree(series, metric, series.layers), max_rows)
              for r in level if isinstance(r, layer_groups.Group)]
    _aggregate(b, groups, (part, _rows_key((version, None, None, None, ()), True)))
    return len(groups)


def _from_summary(metric: str, series, points: int, start: Optional[int], end: Optional[int],
                  wanted: Sequence[str], own: bool = False) -> Optional[tuple]:
    """(columns, binned values) merged from the series' step-binned summary (built now for a request of
    the whole run and every layer, which costs what binning it would; else only if built or being
    built), or None; with `own`, (columns, the summary's own bins, how many make one answer bin) where
    they are to be merged (`stepbins.own_bins`)."""
    summary_of = getattr(series, "summary", None)
    if summary_of is None:
        return None
    summary = summary_of(not wanted and start is None and end is None)
    if summary is None:
        return None
    cols = _columns(metric, series, wanted)
    if own:
        got = stepbins.own_bins(summary, points, start, end, cols if wanted else None)
        return None if got is None else (cols, *got)
    b = stepbins.answer(summary, points, start, end, cols if wanted else None)
    return None if b is None else (cols, b)


def _columns(metric: str, series, wanted: Sequence[str]) -> np.ndarray:
    """The column of each layer `wanted` (all when empty); NotFoundError names a layer the metric lacks."""
    if not wanted:
        return np.arange(len(series.layers))
    pos = {n: j for j, n in enumerate(series.layers)}
    missing = [w for w in wanted if w not in pos]
    if missing:
        raise errors.NotFoundError(f"metric {metric!r} has no layer {missing[0][:200]!r}")
    return np.array([pos[w] for w in wanted], dtype=np.int64)


def bin_columns(metric: str, series: Series, points: int, start: Optional[int], end: Optional[int],
                wanted: Sequence[str]) -> tuple[np.ndarray, downsample.Binned]:
    """(columns, binned values): the layers `wanted` (all when empty) between steps `start` and `end`,
    binned to at most `points` rows; NotFoundError names a layer the metric does not have."""
    cols = _columns(metric, series, wanted)
    # The bins a summary would give (`stepbins.request_bin`), so that an answer does not depend on it.
    window = downsample.step_window(series.steps, start, end)
    summary_points = getattr(series, "summary_points", None)
    k = (downsample.bin_size(window.stop - window.start, points) if summary_points is None
         else stepbins.request_bin(series.steps, points, start, end, summary_points))
    if hasattr(series, "bin_columns"):  # too big for the cache: read from the event files (reading.ondemand)
        return cols, series.bin_columns(points, start, end, cols, k)
    values, present = series.values[window], series.present[window]  # views, not copies
    if wanted:
        values, present = values[:, cols], present[:, cols]
    if k == 1:
        return cols, downsample.bin_steps(series.steps[window], values, present, points)
    return cols, downsample.bin_rows(series.steps[window], values, present, k)


def layer_tree(series, metric: str, names: list[str]) -> layer_groups.Row:
    """The module tree of `names` (`layer_groups.build`): kept on the series (cached per data version)
    when they are all of its layers, since building it for 5,000 tensors takes longer than answering."""
    spec = metadata.METRICS.get(metric)
    kind = spec.layer_kind if spec else ""
    if names != series.layers:  # a request's own layers
        return layer_groups.tree(names, kind)
    kept = getattr(series, "layer_tree", None)
    if kept is None or kept[0] != kind:
        kept = series.layer_tree = (kind, layer_groups.tree(names, kind))
    return kept[1]


def _grouped(metric: str, names: list[str], types: list[str], b: downsample.Binned, max_rows: int,
             expand: Sequence[str], reveal: Sequence[str], root: layer_groups.Row, rows: Optional[tuple] = None):
    """(row names, row types, per-row group description or None, binned rows) of a grouped answer; `rows`
    (a cache part, the key of `b`) keeps each group's row for the next answer from the same bins."""
    pos = {n: j for j, n in enumerate(names)}
    unknown = [r for r in reveal if r not in pos]
    if unknown:
        raise errors.NotFoundError(f"metric {metric!r} has no layer {unknown[0][:200]!r}")
    try:
        view = layer_groups.rows(root, max_rows, expand, [pos[r] for r in reveal], reveal_rows=max_rows)
    except ValueError as e:
        raise errors.NotFoundError(str(e)) from None
    agg = _aggregate(b, view, rows)
    binned = downsample.Binned(b.binned, b.step_first, b.step_last, agg.mean, agg.min, agg.max,
                               agg.nonfinite, agg.present)
    row_names = [names[r] if isinstance(r, int) else r.key for r in view]
    row_types = [types[r] if isinstance(r, int) else "" for r in view]
    groups = [None if isinstance(r, int) else {"label": r.label, "members": len(r.members)} for r in view]
    # The revealed layers that did not get a row of their own: their groups say how many they hold.
    row_of = np.empty(len(names), np.int64)
    for i, r in enumerate(view):
        row_of[[r] if isinstance(r, int) else r.members] = i
    for i, n in zip(*np.unique(row_of[[pos[r] for r in reveal]], return_counts=True)):
        if groups[i] is not None:
            groups[i]["revealed"] = int(n)
    return row_names, row_types, groups, binned


def _aggregate(b: downsample.Binned, view: list, rows: Optional[tuple]) -> layer_groups.Aggregated:
    """`layer_groups.aggregate` of `b` over `view`, with each group's row taken from the cache `rows` where
    an earlier answer from the same bins computed it (a group's row depends on its members only: the
    same numbers): opening one group of 5,000 tensors aggregates its children, not the 5,000 again."""
    if rows is None:
        return layer_groups.aggregate(b.mean, b.min, b.max, b.nonfinite, b.present, view)
    part, at = rows
    groups = [i for i, r in enumerate(view) if not isinstance(r, int)]
    got = {i: part.peek((at, view[i].key)) for i in groups}
    missing = [i for i in groups if got[i] is None]
    if missing:
        new = layer_groups.aggregate(b.mean, b.min, b.max, b.nonfinite, b.present, [view[i] for i in missing])
        for c, i in enumerate(missing):
            cols = tuple(np.ascontiguousarray(a[:, c])
                         for a in (new.mean, new.min, new.max, new.nonfinite, new.present))
            got[i] = part.get((at, view[i].key), lambda cols=cols: cols)
    out = [np.zeros((b.mean.shape[0], len(view)), np.float32) for _ in range(5)]
    for i in groups:
        for a, col in zip(out, got[i]):
            a[:, i] = col
    leaves = [i for i, r in enumerate(view) if isinstance(r, int)]
    if leaves:
        src = [view[i] for i in leaves]
        for a, whole in zip(out, (b.mean, b.min, b.max, b.nonfinite, b.present)):
            a[:, leaves] = whole[:, src]
    return layer_groups.Aggregated(*out)


def _f32_body(header: dict, b: downsample.Binned, with_range: bool):
    # Not gzipped: float32 values barely compress. The counts go as the smallest unsigned type that
    # holds them, and min/max only when rows are bins (else they equal mean).
    arrays = [("step_first", b.step_first.astype(np.float64)), ("step_last", b.step_last.astype(np.float64)),
              ("mean", b.mean)]
    if with_range:
        arrays += [("min", b.min), ("max", b.max)]
    arrays += [("nonfinite", _counts(b.nonfinite)), ("present", _counts(b.present))]
    offset = 0
    layout = []
    chunks = []
    for name, arr in arrays:
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        data = np.ascontiguousarray(arr, dtype=dtype).tobytes()
        layout.append({"name": name, "dtype": np.dtype(arr.dtype).name, "shape": list(arr.shape), "offset": offset})
        chunks.append(data)
        offset += len(data)
        pad = -offset % 8  # every array starts 8-byte aligned, so the browser can view it in place
        chunks.append(b"\0" * pad)
        offset += pad
    header["arrays"] = layout
    head = json.dumps(header, allow_nan=False).encode("utf-8")
    head += b" " * (-(len(head) + 4) % 8)
    body = struct.pack("<I", len(head)) + head + b"".join(chunks)
    return body, "application/octet-stream", None


def _counts(a: np.ndarray) -> np.ndarray:
    """Whole-number counts in the smallest of uint8, uint16 or float32 that holds them."""
    top = float(a.max()) if a.size else 0.0
    if top <= 255:
        return a.astype(np.uint8)
    if top <= 65535:
        return a.astype(np.uint16)
    return a.astype(np.float32)


def _cleanse(obj):
    """TensorBoard's JSON convention: NaN and infinities as strings."""
    from tensorboard.backend import json_util

    return json_util.Cleanse(obj)


def _json_matrix(values: np.ndarray, absent: np.ndarray) -> list:
    """Rows as lists; absent cells null, non-finite cells as TensorBoard's JSON strings."""
    out = values.astype(object)
    out[absent] = None
    return out.tolist()
