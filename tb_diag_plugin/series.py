"""`Series`: one metric of one run as a steps x layers matrix, what the rules read.

numpy only, so the rules run (and are tested) without TensorBoard; the reader
(`reading`) builds these from TensorBoard's data provider. Outside `findings`
so that reading a run does not load the rules. `PiecewiseSeries` is what the rules
read of a metric too big to hold whole (read a span of rows at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np


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


# Rows read at a time from a metric read in pieces: about this many bytes of float64 values.
PIECE_BYTES = 32 << 20


class PiecewiseSeries:
    """A metric the rules read without holding it whole: `metric`, `layers`, `layer_types` and `steps` as a
    `Series` has them, its values read a span of rows at a time (`rows`) from a source that reads them where
    they lie (`reading.ondemand.OnDemandSeries`: anything with `pieces(k, window)` and `load()`).

    `values` and `present` still give the whole matrix to code that asks for it (read once, kept until
    `release`), so a rule that reads the metric whole is right, only not bounded in memory. `piece_bytes`:
    about how many bytes of float64 values a span of rows holds (`row_spans`).
    """

    def __init__(self, source, piece_bytes: int = PIECE_BYTES) -> None:
        self.piece_bytes = piece_bytes
        self.metric: str = source.metric
        self.layers: list[str] = source.layers
        self.layer_types: list[str] = source.layer_types
        self.steps: np.ndarray = source.steps
        self._source = source
        self._whole: Optional[Series] = None

    @property
    def values(self) -> np.ndarray:
        return self._load().values

    @property
    def present(self) -> np.ndarray:
        return self._load().present

    def layer(self, name: str) -> np.ndarray:
        """Values of one layer over steps (NaN where absent)."""
        return self.values[:, self.layers.index(name)]

    def rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(values float32, present) of rows lo..hi-1, read now (nothing kept)."""
        if self._whole is not None:
            return self._whole.values[lo:hi], self._whole.present[lo:hi]
        got = [(v, p) for _, v, p in self._source.pieces(1, slice(lo, hi))]
        if len(got) == 1:
            return got[0]
        if not got:
            return np.zeros((0, len(self.layers)), dtype=np.float32), np.zeros((0, len(self.layers)), dtype=bool)
        return np.concatenate([v for v, _ in got]), np.concatenate([np.asarray(p) for _, p in got])

    def release(self) -> None:
        """Forget the whole matrix, if it was read."""
        self._whole = None

    def _load(self) -> Series:
        if self._whole is None:
            self._whole = self._source.load()
        return self._whole


def spans(count: int, item_bytes: int, budget: int) -> Iterator[tuple[int, int]]:
    """(lo, hi) spans of `count` items (rows or columns) of `item_bytes` each, about `budget` bytes a span
    (at least one item)."""
    step = max(1, budget // max(1, item_bytes))
    for lo in range(0, count, step):
        yield lo, min(count, lo + step)


def row_spans(series, row_bytes: int = 8) -> Iterator[tuple[int, int]]:
    """(lo, hi) spans of `series`' rows of about `PIECE_BYTES` (a `PiecewiseSeries`' `piece_bytes`) each at
    `row_bytes` per value."""
    piece = series.piece_bytes if isinstance(series, PiecewiseSeries) else PIECE_BYTES
    return spans(series.steps.size, row_bytes * len(series.layers), piece)


def read_rows(series, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, present) of rows lo..hi-1 of a `Series` or a `PiecewiseSeries`."""
    if isinstance(series, PiecewiseSeries):
        return series.rows(lo, hi)
    return series.values[lo:hi], series.present[lo:hi]
