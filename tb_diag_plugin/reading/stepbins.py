"""A metric's step-binned summary: every tensor's bins at screen resolution, built once per data version.

Binning a 20,000-step x 5,000-tensor metric for a view takes seconds (and a
metric that big is read from its event files); the views all ask for the
whole run at a few hundred to a thousand points. So the background builds,
once per metric, the bins of every tensor at `points` (`summarize`), and a
request whose bins are whole multiples of the summary's is answered from it
(`answer`): min of mins, max of maxes, sums of the non-finite and present
counts, means weighted by the count of finite values, the same guarantee
`downsample` gives (a NaN or a spike is never averaged away). A request for a
step window finer than the summary, or not on its bin edges, is read as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from tb_diag_plugin.reading import downsample


@dataclass
class StepSummary:
    """The bins of every column of a metric, `k` logged steps each (the last may hold fewer); with `k`
    1 the rows are the logged steps themselves. Counts are kept compact (see `columns`)."""

    points: int  # the resolution it was built for
    k: int
    steps: np.ndarray  # int64 [S]: the metric's logged steps
    step_first: np.ndarray  # int64 [B]
    step_last: np.ndarray  # int64 [B]
    mean: np.ndarray  # float32 [B, L]
    min: np.ndarray  # float32 [B, L]
    max: np.ndarray  # float32 [B, L]
    nonfinite: np.ndarray  # uint16 or float32 [B, L]
    present: np.ndarray  # uint16 or float32 [B, L], or float32 [B] when every column is recorded in every step
    last_value: np.ndarray  # float32 [L]: each column's last finite value (NaN when it has none)
    last_step: np.ndarray  # int64 [L]: the step of that value (-1 when none)
    origin: Optional[list] = None  # (tag, datum per step, columns) of each tag it was read from, if known
    reused: int = 0  # bins taken from the summary of an earlier version (none read again)

    @property
    def binned(self) -> bool:
        return self.k > 1

    def columns(self, cols: Optional[np.ndarray] = None, compact: bool = False) -> downsample.Binned:
        """The summary's own bins of columns `cols` (all when None), as `downsample.bin_steps` gives them;
        with `compact`, the counts as they are kept (uint16, `present` maybe a broadcast view) rather than
        float32 copies, for a caller that reduces them (`layer_groups.aggregate`)."""
        pick = (lambda a: a) if cols is None else (lambda a: a[:, cols])
        present = self.present
        if present.ndim == 1:
            width = self.mean.shape[1] if cols is None else len(cols)
            present = np.broadcast_to(present[:, None], (present.size, width))
        else:
            present = pick(present)
        nonfinite = pick(self.nonfinite)
        if not compact:
            nonfinite, present = nonfinite.astype(np.float32), np.asarray(present, dtype=np.float32)
        return downsample.Binned(self.binned, self.step_first, self.step_last, pick(self.mean), pick(self.min),
                                 pick(self.max), nonfinite, present)


def summarize(series, points: int, previous: Optional[StepSummary] = None) -> StepSummary:
    """The summary of every column of `series` (a `Series`, or an `OnDemandSeries` read a piece at a time)
    binned to at most `points` rows, as `downsample.bin_steps` bins them. `previous` (the summary of an
    earlier version of the same metric) gives its whole bins where the series only gained steps after
    them, with the same bin size: only the steps after them are read."""
    S, L = series.steps.size, len(series.layers)
    k = downsample.bin_size(S, points)
    origin = series.origin() if hasattr(series, "origin") else None
    reused = _reusable(previous, series, origin, k, points)
    last_value = np.full(L, np.nan, dtype=np.float32) if not reused else previous.last_value.copy()
    last_step = np.full(L, -1, dtype=np.int64) if not reused else previous.last_step.copy()
    parts = []
    if reused:
        head = previous.columns()
        parts.append(downsample.Binned(head.binned, *(getattr(head, f)[:reused] for f in _FIELDS)))
    for steps, values, present in _pieces(series, k, reused * k):
        parts.append(downsample.bin_rows(steps, values, present, k) if k > 1 else
                     downsample.bin_steps(steps, values, present, max(1, steps.size)))
        _last_finite(steps, values, present, last_value, last_step)
        del values, present
    b = downsample.concat(parts) if parts else downsample.bin_steps(
        series.steps, np.zeros((0, L), np.float32), np.zeros((0, L), bool), points)
    count = np.uint16 if k <= np.iinfo(np.uint16).max else np.float32
    lengths = _bin_lengths(S, k).astype(np.float32)
    present = lengths if bool(np.all(b.present == lengths[:, None])) else b.present.astype(count)
    return StepSummary(points, k, series.steps, b.step_first, b.step_last, b.mean, b.min, b.max,
                       b.nonfinite.astype(count), present, last_value, last_step, origin, reused)


_FIELDS = ("step_first", "step_last", "mean", "min", "max", "nonfinite", "present")


def _reusable(previous: Optional[StepSummary], series, origin, k: int, points: int) -> int:
    """How many of `previous`'s bins hold the same data in `series` (0: none can be reused): its whole bins,
    when it has the same points, bin size and layers and every step it saw still reads the same datum."""
    if previous is None or origin is None or previous.origin is None or previous.points != points:
        return 0
    n = previous.steps.size
    if previous.k != k or previous.mean.shape[1] != len(series.layers) or series.steps.size < n:
        return 0
    if not np.array_equal(series.steps[:n], previous.steps) or len(origin) != len(previous.origin):
        return 0
    for (tag, rows, cols), (old_tag, old_rows, old_cols) in zip(origin, previous.origin):
        if tag != old_tag or not np.array_equal(cols, old_cols) or not np.array_equal(rows[:n], old_rows):
            return 0  # a step written again (a restarted job), or a new layer set: read it all
    return n // k


def _last_finite(steps: np.ndarray, values: np.ndarray, present: np.ndarray, last_value: np.ndarray,
                 last_step: np.ndarray) -> None:
    """Update `last_value`/`last_step` with each column's last finite value in these rows, if it has one:
    read backwards a few rows at a time, and only for the columns not found yet (mostly one row)."""
    todo = np.arange(values.shape[1])
    hi = steps.size
    while todo.size and hi > 0:
        lo = max(0, hi - 16)
        ok = np.isfinite(values[lo:hi, todo]) & np.asarray(present[lo:hi])[:, todo]
        has = ok.any(axis=0)
        at = lo + (hi - lo - 1 - np.argmax(ok[::-1], axis=0))
        found = todo[has]
        last_value[found] = values[at[has], found]
        last_step[found] = steps[at[has]]
        todo = todo[~has]
        hi = lo


def _bin_lengths(S: int, k: int) -> np.ndarray:
    starts = np.arange(0, S, k)
    return np.minimum(starts + k, S) - starts


def _pieces(series, k: int, start: int = 0):
    """(steps, values, present) of consecutive whole bins of `series` from row `start`, all at once when in
    memory."""
    if hasattr(series, "pieces"):
        yield from series.pieces(k, slice(start, None))
    elif series.steps.size > start:
        yield series.steps[start:], series.values[start:], np.asarray(series.present)[start:]


def request_bin(steps: np.ndarray, points: int, start: Optional[int], end: Optional[int],
                summary_points: int) -> int:
    """Logged steps per bin of a request for the steps within [start, end] at most `points` rows: the
    fewest that fit, rounded up to whole bins of the run's summary at `summary_points` where the window
    lies on their edges, so that the summary answers it (a view asks for its pixel width, rarely a
    divisor of the run's length). Depends on the run's steps only, so an answer is the same whether the
    summary is built or not."""
    window = downsample.step_window(steps, start, end)
    lo, hi = window.start, window.stop
    want = downsample.bin_size(hi - lo, points)
    base = downsample.bin_size(steps.size, summary_points)
    if base > 1 and want > base and want % base and lo % base == 0 and (hi % base == 0 or hi == steps.size):
        return -(-want // base) * base
    return want


def answer(summary: StepSummary, points: int, start: Optional[int], end: Optional[int],
           cols: Optional[np.ndarray]) -> Optional[downsample.Binned]:
    """The bins of `request_bin` steps that `downsample.bin_rows` would give for columns `cols` of the steps
    within [start, end] at `points`, merged from `summary`; None when the summary cannot give them (a
    window finer than its bins, or not on their edges)."""
    got = _window(summary, points, start, end, cols)
    if got is None:
        return None
    b, want = got
    k = summary.k
    if want == k:
        return b
    if k == 1:  # the rows are the logged steps: bin them as `downsample` does, to the same floats
        return downsample.bin_rows(b.step_first, b.mean, b.present > 0, want)
    return _merge(b, want // k)


def own_bins(summary: StepSummary, points: int, start: Optional[int], end: Optional[int],
             cols: Optional[np.ndarray]) -> Optional[tuple[downsample.Binned, int]]:
    """(the summary's own bins of columns `cols` within [start, end], counts compact (`StepSummary.columns`),
    how many of them make one bin of the request): what `answer` merges, for a caller that reduces the
    columns first (`merge` then merges far fewer); None where `answer` would not merge bins (the
    summary's rows are single steps, or it cannot answer)."""
    got = None if summary.k == 1 else _window(summary, points, start, end, cols, compact=True)
    return None if got is None else (got[0], got[1] // summary.k)


def merge(b: downsample.Binned, m: int) -> downsample.Binned:
    """Bins of `m` consecutive bins of `b`, as `answer` merges the summary's (`b` may be columns reduced
    from them: `layer_groups.aggregate` keeps the counts that weigh the means)."""
    return b if m == 1 else _merge(b, m)


def _window(summary: StepSummary, points: int, start: Optional[int], end: Optional[int],
            cols: Optional[np.ndarray], compact: bool = False) -> Optional[tuple[downsample.Binned, int]]:
    """(the summary's bins of the steps within [start, end], columns `cols`; the request's bin size), or
    None when the request's bins are not whole bins of the summary's."""
    steps = summary.steps
    window = downsample.step_window(steps, start, end)
    lo, hi = window.start, window.stop
    if hi == lo:
        return None
    want = request_bin(steps, points, start, end, summary.points)
    k = summary.k
    if want % k or lo % k or (hi % k and hi != steps.size):
        return None
    b = summary.columns(cols, compact)
    first, last = lo // k, -(-hi // k)
    if first or last != b.mean.shape[0]:
        b = downsample.Binned(b.binned, *(getattr(b, f)[first:last] for f in _FIELDS))
    return b, want


def _merge(b: downsample.Binned, m: int) -> downsample.Binned:
    """Bins of `m` consecutive bins of `b` (the last may hold fewer): means weighted by each bin's count
    of finite values, min of mins and max of maxes over the bins that hold a finite value (a bin that
    holds none has NaN there, which `fmin`/`fmax` skip), summed counts. No masks and no second pass over
    the bins with a NaN: at 5,000 tensors nearly every bin holds one somewhere."""
    B = b.step_first.size
    ends = np.minimum(np.arange(0, B, m) + m, B) - 1
    finite = b.present - b.nonfinite  # the finite values behind each bin's mean
    weighted = b.mean * finite
    np.copyto(weighted, np.float32(0), where=finite == 0)  # the NaN mean of a bin without a finite value
    groups = downsample.reduce_groups
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = (groups(np.add, weighted, m, np.float64) / groups(np.add, finite, m, np.float64)).astype(np.float32)
    return downsample.Binned(True, b.step_first[::m], b.step_last[ends], mean, groups(np.fmin, b.min, m),
                             groups(np.fmax, b.max, m), groups(np.add, b.nonfinite, m, np.float32),
                             groups(np.add, b.present, m, np.float32))
