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


def bin_steps(steps: np.ndarray, values: np.ndarray, present: np.ndarray, points: int) -> Binned:
    """Downsample a steps x layers matrix to at most `points` rows.

    With no more steps than `points` the rows are the raw steps (mean, min
    and max all equal the value, NaN and Inf kept as they are).
    """
    if points < 1:
        raise ValueError("points must be >= 1")
    S = steps.shape[0]
    values = values.astype(np.float32, copy=False)
    finite = np.isfinite(values) & present
    nonfinite = (~np.isfinite(values) & present).astype(np.float32)
    if S <= points:
        return Binned(False, steps, steps, values, values, values, nonfinite, present.astype(np.float32))
    edges = np.linspace(0, S, points + 1).astype(np.int64)
    starts = np.unique(edges[:-1])
    ends = np.append(starts[1:], S) - 1
    safe = np.where(finite, values, 0.0).astype(np.float64)
    sums = np.add.reduceat(safe, starts, axis=0)
    counts = np.add.reduceat(finite.astype(np.float64), starts, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (sums / counts).astype(np.float32)
    mn = np.minimum.reduceat(np.where(finite, values, np.inf), starts, axis=0)
    mx = np.maximum.reduceat(np.where(finite, values, -np.inf), starts, axis=0)
    empty = counts == 0
    mn[empty] = np.nan
    mx[empty] = np.nan
    nf = np.add.reduceat(nonfinite, starts, axis=0)
    # A bin whose only values are non-finite keeps NaN as its mean: the
    # chart draws it in the non-finite colour.
    mean[empty] = np.nan
    return Binned(
        True,
        steps[starts],
        steps[ends],
        mean,
        mn.astype(np.float32),
        mx.astype(np.float32),
        nf.astype(np.float32),
        np.add.reduceat(present.astype(np.float32), starts, axis=0),
    )


def step_window(steps: np.ndarray, start: Optional[int], end: Optional[int]) -> slice:
    """Index range of steps within [start, end] (inclusive); steps sorted."""
    lo = 0 if start is None else int(np.searchsorted(steps, start, side="left"))
    hi = steps.shape[0] if end is None else int(np.searchsorted(steps, end, side="right"))
    return slice(lo, hi)
