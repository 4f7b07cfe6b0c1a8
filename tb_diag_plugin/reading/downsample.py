"""Server-side downsampling: bin consecutive steps, keep extremes and non-finite values.

A chart has a few hundred to a few thousand pixels across; a run may have
20,000 logged steps. Binning replaces each run of consecutive steps by its
mean, min and max over the finite values and the count of non-finite ones,
so a spike or a NaN inside a bin is never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


@dataclass
class Binned:
    """Rows are bins (or raw steps when `binned` is False); columns are layers."""

    binned: bool
    step_first: np.ndarray  # int64 [B]
    step_last: np.ndarray  # int64 [B]
    mean: np.ndarray  # float32 [B, L]: mean of finite values; NaN/Inf when the raw value is
    min: np.ndarray  # float32 [B, L]: min of finite values (NaN if none)
    max: np.ndarray  # float32 [B, L]: max of finite values (NaN if none)
    nonfinite: np.ndarray  # float32 [B, L]: count of NaN/Inf values in the bin
    present: np.ndarray  # float32 [B, L]: count of recorded values in the bin (0 = layer absent)


def reduce_groups(ufunc: np.ufunc, arr: np.ndarray, k: int, dtype=None) -> np.ndarray:
    """`ufunc` over consecutive groups of `k` rows (the last group may be shorter).

    Reshaping into (bins, k, L) and reducing axis 1 is ~10x faster than
    `ufunc.reduceat` along axis 0 on a large row-major matrix.
    """
    S = arr.shape[0]
    full = S // k
    parts = []
    if full:
        parts.append(ufunc.reduce(arr[: full * k].reshape(full, k, *arr.shape[1:]), axis=1, dtype=dtype))
    if S > full * k:
        parts.append(ufunc.reduce(arr[full * k :], axis=0, keepdims=True, dtype=dtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _masked(values: np.ndarray, finite: np.ndarray, present: np.ndarray, k: int):
    """(mean, min, max, nonfinite, present) per bin over the finite, present cells."""
    good = finite & present
    sums = reduce_groups(np.add, np.where(good, values, np.float32(0)), k, np.float64)
    counts = reduce_groups(np.add, good, k, np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / counts).astype(np.float32)
    mn = reduce_groups(np.minimum, np.where(good, values, np.float32(np.inf)), k)
    mx = reduce_groups(np.maximum, np.where(good, values, np.float32(-np.inf)), k)
    empty = counts == 0
    # A bin with no finite value has NaN for mean, min and max: the chart
    # draws it in the non-finite colour (or as absent, from `present`).
    mean[empty] = np.nan
    mn[empty] = np.nan
    mx[empty] = np.nan
    nonfinite = reduce_groups(np.add, ~finite & present, k, np.float32)
    return mean, mn, mx, nonfinite, reduce_groups(np.add, present, k, np.float32)


def bin_steps(steps: np.ndarray, values: np.ndarray, present: np.ndarray, points: int) -> Binned:
    """Downsample a steps x layers matrix to at most `points` rows.

    Bins hold `ceil(S / points)` consecutive logged steps each (the last one
    may hold fewer). With no more steps than `points` the rows are the raw
    steps (mean, min and max all equal the value, NaN and Inf kept as they are).
    """
    if points < 1:
        raise ValueError("points must be >= 1")
    S = steps.shape[0]
    values = values.astype(np.float32, copy=False)
    if S <= points:
        nonfinite = (~np.isfinite(values) & present).astype(np.float32)
        return Binned(False, steps, steps, values, values, values, nonfinite, present.astype(np.float32))
    return bin_rows(steps, values, present, bin_size(S, points))


def bin_size(num_steps: int, points: int) -> int:
    """Logged steps per bin when `num_steps` are binned to at most `points` rows (1: not binned)."""
    return 1 if num_steps <= points else -(-num_steps // points)


def bin_rows(steps: np.ndarray, values: np.ndarray, present: np.ndarray, k: int) -> Binned:
    """Bins of `k` consecutive rows (the last may hold fewer): what `bin_steps` computes once it has chosen
    `k`. Binning a run's rows piece by piece, each piece a multiple of `k` rows, gives the same bins."""
    S = steps.shape[0]
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    starts = np.arange(0, S, k)
    ends = np.minimum(starts + k, S) - 1
    first, last = steps[starts], steps[ends]
    # Every bin is first reduced as if all its cells were recorded and finite
    # (no masks, no temporaries the size of the run); the bins that hold a
    # NaN/Inf or an absent cell are then redone with masks, from their rows only.
    counts = (ends - starts + 1).astype(np.float32)[:, None]
    mean = (reduce_groups(np.add, values, k) / counts).astype(np.float32)
    mn, mx = reduce_groups(np.minimum, values, k), reduce_groups(np.maximum, values, k)
    nonfinite = np.zeros_like(mean)
    pres = np.repeat(counts, mean.shape[1], axis=1)
    row_ok = (finite & present).all(axis=1)
    if not row_ok.all():
        bad = np.unique(np.flatnonzero(~row_ok) // k)  # sorted: a short last bin comes last
        rows = np.concatenate([np.arange(b * k, min((b + 1) * k, S)) for b in bad])
        redo = _masked(values[rows], finite[rows], np.asarray(present)[rows], k)
        for out, part in zip((mean, mn, mx, nonfinite, pres), redo):
            out[bad] = part
    return Binned(True, first, last, mean, mn, mx, nonfinite, pres)


def step_window(steps: np.ndarray, start: Optional[int], end: Optional[int]) -> slice:
    """Index range of steps within [start, end] (inclusive); steps sorted."""
    lo = 0 if start is None else int(np.searchsorted(steps, start, side="left"))
    hi = steps.shape[0] if end is None else int(np.searchsorted(steps, end, side="right"))
    return slice(lo, hi)


def concat(parts: list[Binned]) -> Binned:
    """The bins of consecutive pieces of one run, as one `Binned`."""
    if len(parts) == 1:
        return parts[0]
    return Binned(parts[0].binned, *(np.concatenate([getattr(p, f) for p in parts]) for f in
                                     ("step_first", "step_last", "mean", "min", "max", "nonfinite", "present")))
