"""A metric too big for the cache, served by reading its event files for each request.

`OnDemandSeries` holds a metric's steps and layers (what an answer's header
says) and where each datum lies (`events.EventIndex`), not its values. A
request reads the steps in its window and the span of layers it asks for,
a piece at a time, and bins each piece as it is read (`downsample.bin_rows`:
pieces of whole bins give the bins of the whole), so no more than
`PIECE_BYTES` of values is in memory at once, however long the run.
The same merge rules as `reading.read_series`: layers in order of first
appearance, the last datum written for a step wins, a datum of the wrong
length is skipped and reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from tb_diag_plugin import metadata
from tb_diag_plugin.reading import downsample
from tb_diag_plugin.reading.events import EventIndex
from tb_diag_plugin.series import Series

# Values read and binned at a time (a piece is a whole number of bins, at least one).
PIECE_BYTES = 32 << 20


@dataclass
class _Part:
    tag: str
    rows: np.ndarray  # int64 [S]: the tag's datum (file order) at each merged step, -1 where it has none
    cols: np.ndarray  # int64 [width]: the merged column of each of the tag's layers


class OnDemandSeries:
    """One metric of one run: `steps`, `layers` and `layer_types` as a `Series` has them; values read
    from the event files when a request bins them (`bin_columns`) or asks for all of them (`load`)."""

    def __init__(self, metric: str, layers: list[str], layer_types: list[str], steps: np.ndarray,
                 parts: list[_Part], index: EventIndex) -> None:
        self.metric = metric
        self.layers = layers
        self.layer_types = layer_types
        self.steps = steps
        self._parts = parts
        self._index = index

    def bin_columns(self, points: int, start: Optional[int], end: Optional[int],
                    cols: np.ndarray, k: Optional[int] = None) -> downsample.Binned:
        """Columns `cols` of the steps within [start, end], binned to at most `points` rows, as
        `downsample.bin_steps` bins them from the whole matrix (or in bins of `k` steps, if given)."""
        window = downsample.step_window(self.steps, start, end)
        S = window.stop - window.start
        k = downsample.bin_size(S, points) if k is None else k
        out = []
        for steps, values, present in self.pieces(k, window, cols):
            if k == 1:
                out.append(downsample.bin_steps(steps, values, present, max(1, steps.size)))
            else:
                out.append(downsample.bin_rows(steps, values, present, k))
            del values, present
        release_memory()
        if not out:
            empty = np.zeros((0, len(cols)), dtype=np.float32)
            return downsample.bin_steps(self.steps[window], empty, empty.astype(bool), points)
        return downsample.concat(out)

    def origin(self) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(tag, its datum at each step or -1, its columns) per tag: equal for two versions' first steps
        exactly when those steps hold the same data (a step written again gets a later datum)."""
        return [(p.tag, p.rows, p.cols) for p in self._parts]

    def pieces(self, k: int, window: slice = slice(None), cols: Optional[np.ndarray] = None):
        """(steps, values, present) of consecutive pieces of the steps in `window` (all by default) and
        columns `cols` (all by default), each a whole number of bins of `k` rows and about `PIECE_BYTES`."""
        lo, hi, _ = window.indices(self.steps.size)
        cols = np.arange(len(self.layers)) if cols is None else cols
        piece = max(1, PIECE_BYTES // max(1, 5 * len(cols) * k)) * k  # 4 bytes of value + 1 of presence per cell
        for at in range(lo, hi, piece):
            rows = np.arange(at, min(hi, at + piece))
            values, present = self._read(rows, cols)
            yield self.steps[rows], values, present

    def load(self) -> Series:
        """Every value, as the `Series` `reading.read_series` would give (for the findings, which read
        a whole run; the caller does not keep it)."""
        cols = np.arange(len(self.layers))
        values, present = self._read(np.arange(self.steps.size), cols)
        return Series(self.metric, self.layers, self.layer_types, self.steps, values, present)

    def _read(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values, present) [len(rows), len(cols)] of merged rows `rows` and columns `cols`."""
        if len(self._parts) == 1:  # one tag with every row, asked for a run of its columns: no scatter
            part = self._parts[0]
            data = part.rows[rows]
            in_order = len(cols) and bool(np.all(part.cols == np.arange(len(self.layers))))
            if in_order and bool(np.all(np.diff(cols) == 1)) and bool(np.all(data >= 0)):
                values = self._index.read(part.tag, data, int(cols[0]), int(cols[-1]) + 1)
                return values, np.broadcast_to(np.True_, values.shape)
        values = np.full((rows.size, len(cols)), np.nan, dtype=np.float32)
        present = np.zeros((rows.size, len(cols)), dtype=bool)
        where = np.full(len(self.layers), -1, dtype=np.int64)
        where[cols] = np.arange(len(cols))
        for part in self._parts:
            at = where[part.cols]  # the request's column of each of the tag's layers, -1 if not asked
            mine = np.flatnonzero(at >= 0)
            if not mine.size:
                continue
            data = part.rows[rows]
            have = np.flatnonzero(data >= 0)
            if not have.size:
                continue
            lo, hi = int(mine[0]), int(mine[-1]) + 1  # the span of the tag's columns to read
            block = self._index.read(part.tag, data[have], lo, hi)
            values[np.ix_(have, at[mine])] = block[:, mine - lo]
            present[np.ix_(have, at[mine])] = True
        return values, present


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    """Give the memory freed by a read back to the system. glibc keeps freed blocks under 32 MiB
    (a piece's temporaries) in per-thread arenas: without this, each of TensorBoard's request
    threads kept a few hundred MB after on-demand reads (benchmarks/RESULTS.md)."""
    if _TRIM is not None:
        _TRIM(0)


def open_metric(index: EventIndex, metric: str, entries: Sequence[tuple[str, metadata.PluginData]],
                layers: list[str], layer_types: list[str]) -> tuple[OnDemandSeries, list[str]]:
    """The on-demand series of a metric whose tags are `entries` (as `RunIndex.tags[metric]`), with the
    problems found (data of the wrong length, skipped)."""
    col = {n: j for j, n in enumerate(layers)}
    found = []
    problems = []
    for tag, pd in entries:
        steps, _, _, lengths = index.tag(tag).arrays()
        ok = np.flatnonzero(lengths == 4 * len(pd.layers))
        if ok.size < steps.size:
            problems.append(f"{metric}: {steps.size - ok.size} step(s) of tag {tag!r} have the wrong shape "
                            "and were skipped")
        steps = steps[ok]
        if steps.size and not bool(np.all(steps[1:] > steps[:-1])):  # the last datum of a step wins
            uniq, first_in_reversed = np.unique(steps[::-1], return_index=True)
            steps, ok = uniq, ok[steps.size - 1 - first_in_reversed]
        found.append((tag, steps, ok, np.array([col[n] for n in pd.layers], dtype=np.int64)))
    merged = np.unique(np.concatenate([f[1] for f in found])) if found else np.zeros(0, dtype=np.int64)
    parts = []
    for tag, steps, data, cols in found:
        rows = np.full(merged.size, -1, dtype=np.int64)
        rows[np.searchsorted(merged, steps)] = data
        parts.append(_Part(tag, rows, cols))
    return OnDemandSeries(metric, layers, layer_types, merged.astype(np.int64), parts, index), problems
