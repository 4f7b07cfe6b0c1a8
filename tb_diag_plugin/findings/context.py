"""What every findings rule shares: the `Rule` declaration, the `Finding` it reports, the
`Context` it reads and writes (series, thresholds, the NaN cutoff), and the helpers rules use
for persistence, windows, the common series and the wording of messages. Rules import these
from here and nothing from each other."""

from __future__ import annotations

import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from tb_diag_plugin import layer_groups, metadata
from tb_diag_plugin.findings.model_info import GATED_TYPES, ModelInfo
from tb_diag_plugin.findings.series import Series
from tb_diag_plugin.findings.thresholds import Thresholds
from tb_diag_plugin.series import PiecewiseSeries, read_rows, row_spans, spans


@dataclass(frozen=True)
class Rule:
    """One rule as data: what it reports, what it reads, what must run before it.

    `check` reads `ctx.series` and `ctx.th` and adds findings (or a note when a
    metric it needs is missing). `after` names the rules whose results on the
    context it uses (the NaN cutoff, the AMP-skipped steps); the registry runs
    those first and refuses a rule whose dependency is not registered.
    `severities` are the ones it may report (the registry checks them against the
    contract; `Context.add` refuses any other). `consequence_of` names the finding
    kinds whose cause explains this rule's findings: when such a finding (a cause,
    `Context.mark_primary`) began no later, this rule's findings drop to info and
    say which cause they follow from.
    """

    name: str
    kinds: tuple[str, ...]  # finding kinds it may report (the contract's FINDING_KINDS)
    metrics: tuple[str, ...]  # metrics it reads (the contract's METRICS)
    check: Callable[[Context], None]
    after: tuple[str, ...] = ()
    severities: tuple[str, ...] = metadata.SEVERITIES
    consequence_of: tuple[str, ...] = ()


@dataclass
class Finding:
    """One diagnosis: what, where (layers, steps), the numbers, what to try."""

    kind: str
    severity: str
    layers: list[str]
    first_step: int
    last_step: int
    message: str
    suggestion: str
    steps: Optional[list[int]] = None  # the steps of discrete events (loss_spike: each spike), else None

    def to_dict(self, run: str) -> dict:
        """JSON-safe dict with exactly the keys `tb-diag report --json` gives for a finding."""
        return {
            "run": str(run),
            "kind": self.kind,
            "severity": self.severity,
            "layers": [str(n) for n in self.layers],
            "first_step": int(self.first_step),
            "last_step": int(self.last_step),
            "message": self.message,
            "suggestion": self.suggestion,
            **({"steps": [int(s) for s in self.steps]} if self.steps is not None else {}),
        }


# Per-tensor (per-site) metrics of thousands of columns: `Context.before_cutoff` keeps them as float32
# (`Float64Rows`), not as a float64 copy held from the first rule that reads them to the last.
WIDE_METRICS = frozenset({"grad_norm", "weight_norm", "update_ratio", "dead_fraction", "saturation"})


class SpilledRows:
    """A read-only [steps x tensors] float32 matrix kept in a file instead of memory, written once with each
    tensor's steps together (a block of tensors is one contiguous read). Each part indexed is read with
    `os.preadv` into an array of its own, never mapped: mapped pages count in the process's resident size, and
    the kernel maps the neighbours of each page read with it. So the rules' peak does not grow with the run's
    length (`Context.before_cutoff` keeps a metric read in pieces so). The file's name is removed as soon as
    it is open: only the open file holds its space, so nothing is left on disk even when the process is
    killed mid-analysis."""

    dtype = np.dtype(np.float32)

    def __init__(self, path: Optional[str], shape: tuple[int, int]) -> None:
        """`path` None: a new file in the temporary directory (`tempfile.gettempdir()`)."""
        self.shape: tuple[int, ...] = shape
        self.ndim = 2
        self.size = shape[0] * shape[1]
        if path is None:
            self._fd, path = tempfile.mkstemp(prefix="tb-diag-findings-", suffix=".f32")
        else:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.path = path
        try:
            os.unlink(path)
        except OSError:  # a file system that keeps no open file without a name: removed on close instead
            pass

    def write(self, at: int, block: np.ndarray) -> None:
        """Rows at..at+len(block)-1 (float32 [rows x tensors]): each tensor's run of them in its place."""
        if not block.size:
            return
        by_tensor = np.ascontiguousarray(block.T, dtype=np.float32)
        steps, row = self.shape[0], 4 * block.shape[0]
        rows = memoryview(by_tensor).cast("B")
        for j in range(by_tensor.shape[0]):
            if os.pwritev(self._fd, [rows[j * row: (j + 1) * row]], 4 * (j * steps + at)) != row:
                _transfer(os.pwritev, self._fd, by_tensor[j], 4 * (j * steps + at))  # a short write: all again

    def read(self, index, dtype=np.float32):
        """A copy of the part `index` of the [steps x tensors] matrix (C order, as numpy indexes a C array), as
        `dtype`: the tensors it names, over the span of steps it touches, read from the file (one read per run of
        whole tensors, else one per tensor), then indexed in memory."""
        box = _box(index, self.shape)
        if box is None:  # a form of index the rules do not use (a slice with a step, an empty one): all, then it
            whole = self._columns(np.arange(self.shape[1]), 0, self.shape[0])
            part = whole.T[index]
        else:
            (lo, hi), cols, within = box
            cols = np.arange(cols.start, cols.stop) if isinstance(cols, slice) else cols
            part = self._columns(cols, lo, hi).T[within]
        return np.array(part, dtype=dtype, order="C") if isinstance(part, np.ndarray) else dtype(part)

    def _columns(self, cols: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """[len(cols) x hi-lo]: steps lo..hi-1 of tensors `cols` (sorted, unique)."""
        steps = self.shape[0]
        out = np.empty((cols.size, hi - lo), dtype=np.float32)
        if lo == 0 and hi == steps:  # whole tensors: one read per run of consecutive ones
            breaks = np.flatnonzero(np.diff(cols) != 1) + 1
            for a, b in zip(np.r_[0, breaks].tolist(), np.r_[breaks, cols.size].tolist()):
                _transfer(os.preadv, self._fd, out[a:b], 4 * steps * int(cols[a]))
        else:  # a span of steps of each tensor: one read each, into its row of `out`
            row = 4 * (hi - lo)
            rows = memoryview(out).cast("B")
            for i, j in enumerate(cols.tolist()):
                if os.preadv(self._fd, [rows[i * row: (i + 1) * row]], 4 * (j * steps + lo)) != row:
                    _transfer(os.preadv, self._fd, out[i], 4 * (j * steps + lo))  # a short read: the rest
        return out

    def __getitem__(self, index):
        return self.read(index)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.read((slice(None),), np.float32 if dtype is None else dtype)

    def close(self) -> None:
        """Close the file (and remove it, where its name could not be removed at once)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _transfer(call: Callable, fd: int, buf: np.ndarray, offset: int) -> None:
    """os.preadv / os.pwritev of all of the contiguous `buf` at `offset`, in as many calls as it takes."""
    view = memoryview(buf).cast("B")
    done = 0
    while done < len(view):
        n = call(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"findings: {call.__name__} moved no bytes at offset {offset + done}")
        done += n


def _box(index, shape: tuple[int, ...]):
    """((row lo, hi), the columns to copy, `index` within them) for a [rows x columns] `index` made of an int, a
    slice of step 1, an integer array or a boolean mask per axis; None for any other form. The rows are the
    span `index` touches; the columns a slice, or the sorted columns an array names (not the span between)."""
    parts = index if isinstance(index, tuple) else (index,)
    if len(parts) > 2:
        return None
    parts += (slice(None),) * (2 - len(parts))
    picks, within = [], []
    for axis, part in enumerate(parts):
        n = shape[axis]
        if isinstance(part, slice):
            start, stop, step = part.indices(n)
            if step != 1 or stop <= start:
                return None
            picks.append(slice(start, stop))
            within.append(slice(0, stop - start))
            continue
        if isinstance(part, (int, np.integer)):
            if not -n <= part < n:
                return None
            part = int(part) % n
            picks.append(slice(part, part + 1))
            within.append(0)  # an int keeps the axis out of the answer, as numpy does
            continue
        if isinstance(part, list):
            part = np.asarray(part, dtype=np.int64 if not part else None)
        if not isinstance(part, np.ndarray):
            return None
        if part.dtype == bool:
            if part.shape != (n,):
                return None
            part = np.flatnonzero(part)
        if part.dtype.kind not in "iu" or part.size == 0 or part.min() < -n or part.max() >= n:
            return None
        part = np.where(part < 0, part + n, part)
        if axis == 0:
            lo = int(part.min())
            picks.append(slice(lo, int(part.max()) + 1))
            within.append(part - lo)
        else:
            cols = np.unique(part)
            picks.append(cols)
            within.append(np.searchsorted(cols, part))
    rows = picks[0]
    return (rows.start, rows.stop), picks[1], tuple(within)


class Float64Rows:
    """A read-only [steps x tensors] float32 matrix that reads as float64: indexing it gives the float64 copy
    of the part indexed (exactly the values a float64 copy of the whole would give there), and numpy functions
    given it whole get the whole as float64. Rules index a block of steps or tensors at a time, so that only
    that block is ever held as float64. The float32 values are an array, or a `SpilledRows` file."""

    dtype = np.dtype(np.float64)

    def __init__(self, values) -> None:
        self.kept = values  # the values as kept: float32 where recorded so (read-only), in memory or a file
        self.shape: tuple[int, ...] = values.shape
        self.ndim: int = values.ndim
        self.size: int = values.size

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(self.kept, SpilledRows):
            return self.kept.read(index, np.float64)
        part = self.kept[index]
        return part.astype(np.float64) if isinstance(part, np.ndarray) else np.float64(part)

    def __len__(self) -> int:
        return len(self.kept)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.kept).astype(np.float64 if dtype is None else dtype)


class _FiniteParts:
    """np.isfinite of a `SpilledRows`, a part at a time (indexing it gives the part's mask)."""

    def __init__(self, kept: SpilledRows) -> None:
        self.kept = kept
        self.shape = kept.shape

    def __getitem__(self, index) -> np.ndarray:
        return np.isfinite(self.kept[index])


def finite(values):
    """np.isfinite(values), of a `Float64Rows` without its float64 copy (a float32 is finite where its copy is);
    of one kept in a file, the mask of each part indexed."""
    kept = getattr(values, "kept", values)
    return _FiniteParts(kept) if isinstance(kept, SpilledRows) else np.isfinite(kept)


@dataclass
class Context:
    """One run as the rules see it: its series and thresholds, the findings so far, and shared state."""

    series: dict[str, Series]
    th: Thresholds
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nan_step: Optional[int] = None  # first step with NaN/Inf (not counting AMP-skipped steps)
    nan_first: dict[str, int] = field(default_factory=dict)  # source ("loss", "gradients", ...) -> first step
    cutoff: Optional[int] = None  # first step whose values describe a broken model (NaN, or blowing up)
    amp_skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # skipped by design
    _memo: dict = field(default_factory=dict, repr=False)  # before_cutoff's answers, by series and cutoff
    model: ModelInfo = field(default_factory=ModelInfo)  # what the structure document says (empty: unknown)
    primary: list[int] = field(default_factory=list)  # indices into findings: causes others may follow from
    rule: Optional[Rule] = None  # the rule now running (its declared severities bound `add`)
    rule_of: list[Rule] = field(default_factory=list)  # per finding, the rule that reported it

    def get(self, kind: str, *metrics: str, why: str = "") -> Optional[list[Series]]:
        """The metrics a rule needs, or None after noting which is missing."""
        out = []
        for m in metrics:
            s = self.series.get(m)
            if s is None or not s.layers or not s.steps.size:
                self.notes.append(f"{kind}: not checked, no '{m}' recorded" + (f" ({why})" if why else ""))
                return None
            out.append(s)
        return out

    def before_cutoff(self, s: Series) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values with NaN where absent) before the first NaN/Inf, without AMP-skipped steps.

        Several rules ask for the same series: the answer is computed once per
        cutoff and handed out read-only until no later rule reads the metric
        (`release`). The values read as float64; those of a per-tensor metric
        (`WIDE_METRICS`) are kept as the float32 they were recorded in
        (`Float64Rows`: each part a rule indexes is its float64 copy), so that a
        long run of thousands of tensors is not held twice its size per metric
        (the recorded matrix itself when every row is kept and every cell
        present). A metric read in pieces (`PiecewiseSeries`, one too big for
        the plugin's cache) gives only the rows kept, a span at a time; those of
        a per-tensor one are written to a file of this analysis (`SpilledRows`,
        removed by `release` or `close`) rather than held, so that the rules'
        memory does not follow the run's length.
        """
        key = (id(s), self.cutoff, self.amp_skipped.size)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is s:
            return hit[1]
        keep = np.ones(s.steps.shape, dtype=bool) if self.cutoff is None else s.steps < self.cutoff
        if self.amp_skipped.size:
            keep &= ~np.isin(s.steps, self.amp_skipped)
        everything = bool(keep.all())
        wide = s.metric in WIDE_METRICS
        if isinstance(s, PiecewiseSeries):
            vals = self._spilled(s, keep) if wide else None
            if vals is None:
                vals = _kept_in_memory(s, keep, wide)
        else:
            all_present = _every_cell(s.present) or (wide and bool(s.present.all()))
            kept = s.values if everything else s.values[keep]
            dtype = np.float32 if wide and kept.dtype == np.float32 else np.float64
            if dtype == kept.dtype and all_present:
                vals = kept.view()  # nothing to change: the recorded values (or the copy of the rows kept)
            else:
                vals = kept.astype(dtype)
                if not all_present:
                    vals[~(s.present if everything else s.present[keep])] = np.nan
        steps = s.steps if everything else s.steps[keep]
        if isinstance(vals, np.ndarray):
            vals.setflags(write=False)
        out = Float64Rows(vals) if wide else vals
        self._memo[key] = (s, (steps, out))
        return steps, out

    def release(self, metric: str) -> None:
        """No later rule reads `metric`: forget what was computed from it (and its values, if read whole
        from a `PiecewiseSeries`), so that a run's metrics are not all held at once."""
        s = self.series.get(metric)
        if s is None:
            return
        for key in [k for k, hit in self._memo.items() if hit[0] is s]:
            _close(self._memo.pop(key)[1][1])
        if isinstance(s, PiecewiseSeries):
            s.release()

    def close(self) -> None:
        """Forget every metric's answers and close the files of those kept on disk (`before_cutoff`)."""
        for hit in self._memo.values():
            _close(hit[1][1])
        self._memo.clear()

    def _spilled(self, s: PiecewiseSeries, keep: np.ndarray) -> Optional[SpilledRows]:
        """The rows `keep` of a float32 metric read in pieces, written to a file of this analysis (`SpilledRows`),
        or None when it is empty, not float32, or cannot be written (then it is kept in memory, as before)."""
        shape = (int(keep.sum()), len(s.layers))
        if not shape[0] or not shape[1]:
            return None
        kept = None
        try:
            kept = SpilledRows(None, shape)
            for at, block in _kept_spans(s, keep):
                if block.dtype != np.float32:
                    kept.close()
                    return None
                kept.write(at, block)
        except OSError:  # no room on disk: held in memory instead
            if kept is not None:
                kept.close()
            return None
        return kept

    def add(self, kind: str, severity: str, layers: Sequence[str], first: int, last: int, message: str,
            suggestion: str, steps: Optional[Sequence[int]] = None) -> None:
        """Report a finding (`steps`: the steps it marks, loss_spike only); ValueError for a kind or
        severity the running rule did not declare."""
        allowed = self.rule.severities if self.rule is not None else metadata.SEVERITIES
        if severity not in allowed:
            raise ValueError(f"finding {kind!r}: severity {severity!r} is not one of {list(allowed)}")
        if self.rule is not None and kind not in self.rule.kinds:
            raise ValueError(f"rule {self.rule.name!r} reported {kind!r}, which it does not declare")
        self.findings.append(Finding(kind, severity, unique(layers), int(first), int(last), message, suggestion,
                                     None if steps is None else [int(s) for s in steps]))
        self.rule_of.append(self.rule)

    def in_model_order(self, names: Sequence[str]) -> list[str]:
        """`names` without repeats, in the model's order (the structure document's), else in natural order."""
        order = self.model.order
        known = {n: i for i, n in enumerate(order)}
        return sorted(unique(names), key=lambda n: (known.get(n, len(known)), natural_key(n)))

    def layer_list(self, names: Sequence[str], k: int = 4) -> str:
        """`layer_list`, with the groups judged against what the running rule reads: a module every recorded
        tensor of which is named reads "all 32 mlp.experts of model.layers from 10 to 14 (5 of 40)"."""
        read = [self.series[m] for m in (self.rule.metrics if self.rule else ()) if m in self.series]
        return layer_groups.describe(names, recorded_with(names, read), shown=k)

    def mark_primary(self) -> None:
        """The finding just added is a cause: symptoms that start with or after it fold below it."""
        self.primary.append(len(self.findings) - 1)


def quiet(fn: Callable, *args, **kwargs):
    """numpy reductions over all-NaN slices: NaN, without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)


def fmt(x: float) -> str:
    """A number for a message: 3 significant digits, scientific notation outside [1e-3, 1e4)."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.1e}"


def pct(x: float) -> str:
    """A share as a percentage: '76 %'."""
    return f"{100 * x:.0f} %"


def times(r: float) -> str:
    """A ratio as a multiple: '245×'."""
    return f"{fmt(r)}\u00d7"


def smaller(r: float) -> str:
    """A share below 1 as '2.8e+03× smaller than' (what a reader compares), else '0.5×'."""
    if 0 < r < 1:
        return f"{fmt(1 / r)}\u00d7 smaller than"
    return f"{fmt(r)}\u00d7"


def span(lo: float, hi: float) -> str:
    """A range as 'from A to B' (one value when they are equal)."""
    return fmt(lo) if lo == hi else f"from {fmt(lo)} to {fmt(hi)}"


def unique(names: Sequence[str]) -> list[str]:
    """`names` without repeats, first occurrence kept."""
    return list(dict.fromkeys(str(n) for n in names))


def natural_key(name: str) -> tuple:
    """Sort key that puts '2' before '11' and 'h.2' before 'h.11'."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def quote(name: str) -> str:
    """A layer name as a message shows it: quoted, so that '1' reads as a name, not a number."""
    return f"'{name}'"


def layer_list(layers: Sequence[str], k: int = 4) -> str:
    """"'a', 'b', ... (12 in all)": the names quoted, without repeats, the first `k` shown; past `k`, the
    groups they form when that is shorter (`layer_groups.describe`: "{w1,w2}.weight of layers from 10 to 14")."""
    return layer_groups.describe(layers, shown=k)


def recorded_with(names: Sequence[str], series: Iterable[Series]) -> Optional[list[str]]:
    """The layers of the metrics among `series` that record every one of `names` (what "all" of a group
    means in the words for them), in their order; None when none does."""
    want = set(names)
    out = [n for s in series if len(s.layers) >= len(want) and want.issubset(s.layers) for n in s.layers]
    return out or None


def _kept_spans(s: PiecewiseSeries, keep: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(row of the rows kept, their values with NaN where absent) of `s`, a span of rows at a time: float32 as
    recorded, else float64."""
    at = 0
    for lo, hi in row_spans(s):
        part = keep[lo:hi]
        if not part.any():
            continue
        v, p = read_rows(s, lo, hi)
        block = (v if part.all() else v[part]).astype(np.float32 if v.dtype == np.float32 else np.float64)
        if not _every_cell(p):
            block[~(p if part.all() else p[part])] = np.nan
        yield at, block
        at += block.shape[0]


def _kept_in_memory(s: PiecewiseSeries, keep: np.ndarray, wide: bool) -> np.ndarray:
    """The rows `keep` of `s` in one array: float32 as recorded for a wide metric, else float64."""
    vals = None
    for at, block in _kept_spans(s, keep):
        if vals is None:
            dtype = np.float32 if wide and block.dtype == np.float32 else np.float64
            vals = np.empty((int(keep.sum()), len(s.layers)), dtype=dtype)
        vals[at: at + block.shape[0]] = block
    return np.empty((0, len(s.layers))) if vals is None else vals


def _close(values) -> None:
    """Remove the file of values kept on disk (`SpilledRows`)."""
    kept = getattr(values, "kept", None)
    if isinstance(kept, SpilledRows):
        kept.close()


def _every_cell(present: np.ndarray) -> bool:
    """Whether `present` is the broadcast True a reader gives when every cell was recorded (no scan)."""
    return 0 in present.strides and present.size > 0 and bool(present.flat[0])


# Bytes of one [steps x columns] float64 temporary of a rule that works a block of columns at a time.
BLOCK_BYTES = 16 << 20


def blocks(count: int, width: int, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[int, int]]:
    """(lo, hi) spans of `count` columns (or rows) of about `block_bytes` of float64 each, at `width` values per
    column (row): for rules whose work is per column (per step), so that a [steps x tensors] temporary of a
    long run of thousands of tensors is not held."""
    return spans(count, 8 * width, block_bytes)


def positions(names: Sequence[str]) -> dict[str, int]:
    """Each name's first index in `names` (what `names.index` gives): lookups in a loop over thousands of
    tensors that do not scan the list each time."""
    out: dict[str, int] = {}
    for j, n in enumerate(names):
        out.setdefault(n, j)
    return out


def window(n: int, th: Thresholds) -> int:
    """Logged steps that make a run's "start" or "end": max(min_window, window_fraction of n), at most n."""
    return max(1, min(n, max(th.min_window, math.ceil(th.window_fraction * n))))


# A normal distribution's standard deviation per median absolute deviation.
MAD_SIGMA = 1.4826


def robust_sigma(x: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of `x`: a standard deviation that outliers do not move."""
    return MAD_SIGMA * float(np.median(np.abs(x - np.median(x))))


def step_noise(x: np.ndarray) -> float:
    """A series' own noise, from its finite successive differences (a slow trend cancels out):
    robust_sigma(diff) / sqrt(2); 0.0 with fewer than 3 of them."""
    d = np.diff(x)
    d = d[np.isfinite(d)]
    return robust_sigma(d) / math.sqrt(2) if d.size >= 3 else 0.0


def step_noise_columns(x: np.ndarray) -> np.ndarray:
    """`step_noise` of each column of `x` [n, columns] at once, equal to it column by column: the medians
    are taken by one partition per group of columns with the same count of finite differences (NaN sorts
    after every number, so each column's order statistics are those of its finite values)."""
    with np.errstate(invalid="ignore"):  # inf - inf: not a finite difference either
        d = np.diff(x, axis=0)
    d[~np.isfinite(d)] = np.nan
    counts = np.isfinite(d).sum(axis=0)
    out = np.zeros(x.shape[1])
    for k in np.unique(counts[counts >= 3]).tolist():
        cols = np.flatnonzero(counts == k)
        dk = d[:, cols]
        mad = _middle(np.abs(dk - _middle(dk, k)), k)
        out[cols] = MAD_SIGMA * mad / math.sqrt(2)
    return out


def _middle(a: np.ndarray, k: int) -> np.ndarray:
    """np.median of the `k` finite values of each column of `a` (NaN elsewhere), computed as np.median does
    (the middle value, or the mean of the two middle values)."""
    lo, hi = (k - 1) // 2, k // 2
    part = np.partition(a, sorted({lo, hi}), axis=0)
    return part[hi] if lo == hi else (part[lo] + part[hi]) / 2


def nanmedian_of(values, cols: Sequence[int]) -> float:
    """np.nanmedian(values[:, cols]) (all of them: one number; NaN when every one is NaN), equal to it on the
    float64 copy, without that copy of a `Float64Rows`: its float32 values order as their float64 copies do,
    so the middle one (or the mean of the two middle ones, taken in float64) is the same. Of values kept in a
    file, the middle ones are found a block of columns at a time (`_middle_of_file`)."""
    kept = getattr(values, "kept", values)
    if isinstance(kept, SpilledRows):
        return _middle_of_file(kept, np.asarray(cols, dtype=np.int64))
    x = kept[:, np.asarray(cols, dtype=np.int64)].ravel()  # one copy, partitioned in place (NaN sorts last)
    n = x.size - int(np.count_nonzero(np.isnan(x)))
    if n == 0:
        return math.nan
    lo, hi = (n - 1) // 2, n // 2
    x.partition(sorted({lo, hi}))
    return _mean_of_middle(x[lo], x[hi], lo != hi)


def _mean_of_middle(a, b, two: bool) -> float:
    """The median from its middle value(s), as np.median gives it."""
    return float((np.float64(a) + np.float64(b)) / 2) if two else float(a)


def _order_keys(x: np.ndarray) -> np.ndarray:
    """Each non-NaN float32 of `x` as a uint32 that orders as the floats do (sign flipped, negatives inverted)."""
    u = x[~np.isnan(x)].view(np.uint32)
    return np.where(u >> 31 == 1, ~u, u | np.uint32(0x80000000))


def _of_key(key: int) -> np.float32:
    """The float32 of an `_order_keys` key."""
    u = np.uint32(key ^ 0x80000000 if key & 0x80000000 else ~np.uint32(key))
    return u.view(np.float32)


def _middle_of_file(kept: SpilledRows, cols: np.ndarray) -> float:
    """`nanmedian_of` of values kept in a file: the middle values found by their keys' high 16 bits (one count
    per block of columns), then their low 16 bits within the one or two counts that hold them (a second pass):
    exactly the values a partition of all of them would put in the middle, holding a block at a time."""
    spans = list(blocks(cols.size, kept.shape[0], BLOCK_BYTES // 2))
    high = np.zeros(1 << 16, dtype=np.int64)
    for lo, hi in spans:
        high += np.bincount(_order_keys(kept[:, cols[lo:hi]]) >> 16, minlength=1 << 16)
    n = int(high.sum())
    if n == 0:
        return math.nan
    below = np.cumsum(high)
    ranks = sorted({(n - 1) // 2, n // 2})
    tops = [int(np.searchsorted(below, r, side="right")) for r in ranks]
    low = {t: np.zeros(1 << 16, dtype=np.int64) for t in tops}
    for lo, hi in spans:
        keys = _order_keys(kept[:, cols[lo:hi]])
        for t in low:
            low[t] += np.bincount(keys[keys >> 16 == t] & 0xFFFF, minlength=1 << 16)
    found = []
    for r, t in zip(ranks, tops):
        within = r - (int(below[t - 1]) if t else 0)
        found.append(_of_key((t << 16) | int(np.searchsorted(np.cumsum(low[t]), within, side="right"))))
    return _mean_of_middle(found[0], found[-1], len(found) == 2)


def robust_z(value: float, window: np.ndarray, floor: float = 0.0) -> float:
    """The robust z-score the spike detectors share: how many robust standard deviations `value` lies
    above the median of `window`, the spread being max(floor, robust_sigma(window)); +-inf (0.0 at the
    median) when that spread is 0."""
    dev = float(value) - float(np.median(window))
    spread = max(floor, robust_sigma(window))
    if spread > 0:
        return dev / spread
    return math.copysign(math.inf, dev) if dev else 0.0


def persistent(mask: np.ndarray, valid: np.ndarray, th: Thresholds) -> Optional[tuple[int, int]]:
    """Indices (first, last) of a condition that persists, or None.

    `mask` and `valid` are per logged step; only valid steps count. It
    persists when it holds on `persist_fraction` of the valid steps (and on
    at least two, when there are two), or on each of the last `persist_tail`.
    """
    idx = np.flatnonzero(valid)
    if idx.size == 0:
        return None
    hits = mask[idx]
    need = max(min(2, idx.size), math.ceil(th.persist_fraction * idx.size))
    if hits.sum() >= need:
        true = idx[hits]
        return int(true[0]), int(true[-1])
    tail = min(th.persist_tail, idx.size)
    if idx.size >= 2 and tail >= 2 and hits[-tail:].all():
        # the final uninterrupted stretch
        start = idx.size - 1
        while start > 0 and hits[start - 1]:
            start -= 1
        return int(idx[start]), int(idx[-1])
    return None


def is_bias(name: str) -> bool:
    """A bias tensor (judged with its sibling weight, never against its own near-zero size)."""
    return name.endswith("bias")


def sibling_weight(name: str) -> str:
    """'fc.bias' -> 'fc.weight'."""
    return name[: -len("bias")] + "weight"


def loss_total(ctx: Context) -> Optional[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(steps, values, layers) of the total loss before the cutoff: 'total', else the components' sum."""
    s = ctx.series.get("loss")
    if s is None or not s.steps.size:
        return None
    steps, vals = ctx.before_cutoff(s)
    if metadata.TOTAL_LOSS in s.layers:
        v = vals[:, s.layers.index(metadata.TOTAL_LOSS)]
        names = [metadata.TOTAL_LOSS]
    else:
        v = vals.sum(axis=1)  # NaN where a component is absent
        names = list(s.layers)
    ok = np.isfinite(v)
    return steps[ok], v[ok], names


def weights_over_start(ctx: Context, names: Optional[Sequence[str]] = None):
    """(steps, tensors, ratio_of) before the cutoff, or None: ratio_of(rows, cols) is the weight norm over its
    first value at steps `rows` of tensors `cols` (slices of `steps` and of the `tensors` kept: a block at a
    time, never all of a long run's).

    Weight tensors `names` (default: every one that is not a bias) whose first
    norm is at least `min_weight_norm`; a ratio to a near-zero start means nothing.
    """
    w = ctx.series.get("weight_norm")
    if w is None or not w.steps.size:
        return None
    steps, wv = ctx.before_cutoff(w)
    if names is None:
        cols = [j for j, n in enumerate(w.layers) if not is_bias(n)]
    else:
        at = positions(w.layers)
        cols = [at[n] for n in names if n in at]
    if steps.size < 2 or not cols:
        return None
    first = wv[0, cols]
    keep = np.isfinite(first) & (first >= ctx.th.min_weight_norm)
    if not keep.any():
        return None
    kept, start = np.asarray(cols)[keep], first[keep]

    def ratio_of(rows: slice, cols: slice = slice(None)) -> np.ndarray:
        ratio = wv[rows, kept[cols]]  # a copy of the columns kept, divided in place
        ratio /= start[cols]
        return ratio

    return steps, int(kept.size), ratio_of


def lr_text(ctx: Context) -> str:
    """' (3e-3)' or ' (scheduled from 0.01 to 6e+04)': the recorded learning rate, for advice; '' if none."""
    lr = ctx.series.get("learning_rate")
    if lr is None or not lr.steps.size:
        return ""
    v = lr.values[lr.present]  # every parameter group
    v = v[np.isfinite(v)]
    if not v.size:
        return ""
    lo, hi = float(v.min()), float(v.max())
    if lo == hi:
        return f" ({fmt(lo)})"
    first = lr.values[0][lr.present[0]]
    first = first[np.isfinite(first)]
    climbs = first.size and float(first.max()) == lo and hi >= 100 * max(lo, 1e-30)
    return f" (scheduled {'to climb ' if climbs else ''}from {fmt(lo)} to {fmt(hi)})"


def clipped_share(ctx: Context) -> Optional[float]:
    """The share of logged steps (before the cutoff) whose gradient norm clipping changed, or None."""
    pre, post = ctx.series.get("grad_norm_preclip"), ctx.series.get("grad_norm_total")
    if pre is None or post is None or not pre.steps.size or not post.steps.size:
        return None
    psteps, pv = ctx.before_cutoff(pre)
    qsteps, qv = ctx.before_cutoff(post)
    _, pi, qi = np.intersect1d(psteps, qsteps, return_indices=True)
    p, q = pv[pi, 0], qv[qi, 0]
    ok = np.isfinite(p) & np.isfinite(q) & (p > 0)
    if ok.sum() < ctx.th.clip_min_points:
        return None
    return float((q[ok] < p[ok] * (1 - 1e-3)).mean())


def clipping_by_design(ctx: Context) -> bool:
    """A recurrent model whose gradients are clipped (on some logged step) while its loss falls: the recipe
    of RNN language models (SGD at lr ~20 with clip 0.25, pytorch/examples' word_language_model), where the
    clip threshold is meant to bound the step size."""
    if not any(t in GATED_TYPES for t in ctx.model.module_types.values()):
        return False
    share = clipped_share(ctx)
    got = loss_total(ctx)
    if not share or got is None or got[1].size < ctx.th.loss_min_points:
        return False
    v = got[1]
    w = window(v.size, ctx.th)
    start, end = float(np.median(v[:w])), float(np.median(v[-w:]))
    return start > 0 and end <= (1 - ctx.th.loss_min_decrease) * start


def total_grad(ctx: Context) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(steps, total gradient norm) on every logged step, NaN kept: recorded, else from the tensors' norms."""
    tot = ctx.series.get("grad_norm_total")
    if tot is not None and tot.steps.size:
        return tot.steps, np.where(tot.present[:, 0], tot.values[:, 0].astype(np.float64), np.nan)
    g = ctx.series.get("grad_norm")
    if g is None or not g.steps.size:
        return None
    out = np.empty(g.steps.size)
    for lo, hi in row_spans(g):  # a span of rows at a time: no float64 copy of the whole metric
        v, p = read_rows(g, lo, hi)
        vals = np.where(p, v.astype(np.float64), 0.0)
        out[lo:hi] = np.sqrt((vals**2).sum(axis=1))
    return g.steps, out


def model_column(ctx: Context, metric: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(steps, values) of a one-column model-level metric on every logged step (NaN where absent), or None."""
    s = ctx.series.get(metric)
    if s is None or not s.steps.size or not s.layers:
        return None
    return s.steps, np.where(s.present[:, 0], s.values[:, 0].astype(np.float64), np.nan)


# The NaN/Inf cutoff: `nonfinite` sets it, `exploding_gradient` moves it back to where the
# blow-up began; every rule that judges a healthy-looking stretch runs after both.
CUTOFF = ("nonfinite", "exploding_gradient")
# Findings that diagnose a cause in the loop's own wiring or settings: the symptoms they explain
# (gradients that explode or spike, a loss that stalls) declare them in `consequence_of`.
WIRING_CAUSES = ("not_in_optimizer", "grad_not_reset", "module_mode", "lr_collapsed", "lr_unbounded", "lr_zero",
                 "output_loss_mismatch")
# Every kind a rule marks as a cause (`Context.mark_primary`): what plain symptoms follow from
# (gradient_spike: only its early form, a blow-up in the first logged steps, is one).
CAUSE_KINDS = WIRING_CAUSES + (
    "nonfinite", "exploding_gradient", "gradient_spike", "vanishing_gradient", "dead_relu", "update_ratio", "adam_eps",
    "loss_diverged", "weight_norm_growth", "weight_decay_equilibrium", "no_gradient",
)
