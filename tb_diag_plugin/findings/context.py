"""What every findings rule shares: the `Rule` declaration, the `Finding` it reports, the
`_Context` it reads and writes (series, thresholds, the NaN cutoff), and helpers for
persistence, windows and the wording of messages."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from tb_diag_plugin.findings.model_info import ModelInfo
from tb_diag_plugin.findings.series import Series
from tb_diag_plugin.findings.thresholds import Thresholds


@dataclass(frozen=True)
class Rule:
    """One rule as data: what it reports, what it reads, what must run before it.

    `check` reads `ctx.series` and `ctx.th` and adds findings (or a note when a
    metric it needs is missing). `after` names the rules whose results on the
    context it uses (the NaN cutoff, the AMP-skipped steps); the registry runs
    those first and refuses a rule whose dependency is not registered.
    """

    name: str
    kinds: tuple[str, ...]  # finding kinds it may report (the contract's FINDING_KINDS)
    metrics: tuple[str, ...]  # metrics it reads (the contract's METRICS)
    check: Callable[[_Context], None]
    after: tuple[str, ...] = ()


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
        """JSON-safe dict with exactly the keys of DESIGN.md's `report --json`."""
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


@dataclass
class _Context:
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
        cutoff and handed out read-only (a 20k x 500 metric is 80 MB as float64).
        """
        key = (id(s), self.cutoff, self.amp_skipped.size)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is s:
            return hit[1]
        keep = np.ones(s.steps.shape, dtype=bool) if self.cutoff is None else s.steps < self.cutoff
        if self.amp_skipped.size:
            keep &= ~np.isin(s.steps, self.amp_skipped)
        everything = bool(keep.all())
        vals = (s.values if everything else s.values[keep]).astype(np.float64)
        all_present = 0 in s.present.strides and s.present.size > 0 and bool(s.present.flat[0])
        if not all_present:  # `present` is a broadcast True when every cell was recorded
            vals[~(s.present if everything else s.present[keep])] = np.nan
        steps = s.steps if everything else s.steps[keep]
        vals.setflags(write=False)
        self._memo[key] = (s, (steps, vals))
        return steps, vals

    def add(self, kind: str, severity: str, layers: Sequence[str], first: int, last: int, message: str,
            suggestion: str, steps: Optional[Sequence[int]] = None) -> None:
        self.findings.append(Finding(kind, severity, list(layers), int(first), int(last), message, suggestion,
                                     None if steps is None else [int(s) for s in steps]))

    def mark_primary(self) -> None:
        """The finding just added is a cause: symptoms that start with or after it fold below it."""
        self.primary.append(len(self.findings) - 1)


def _quiet(fn: Callable, *args, **kwargs):
    """numpy reductions over all-NaN slices: NaN, without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with np.errstate(all="ignore"):
            return fn(*args, **kwargs)


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.1e}"


def _pct(x: float) -> str:
    return f"{100 * x:.0f} %"


def _names(layers: Sequence[str], k: int = 4) -> str:
    shown = ", ".join(layers[:k])
    return shown if len(layers) <= k else f"{shown}, ... ({len(layers)} in all)"


def _window(n: int, th: Thresholds) -> int:
    return max(1, min(n, max(th.min_window, math.ceil(th.window_fraction * n))))


def _persistent(mask: np.ndarray, valid: np.ndarray, th: Thresholds) -> Optional[tuple[int, int]]:
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


def _is_bias(name: str) -> bool:
    return name.endswith("bias")


def _sibling_weight(name: str) -> str:
    return name[: -len("bias")] + "weight"


def _loss_total(ctx: _Context) -> Optional[tuple[np.ndarray, np.ndarray, list[str]]]:
    """(steps, values, layers) of the total loss before the cutoff: 'total', else the components' sum."""
    s = ctx.series.get("loss")
    if s is None or not s.steps.size:
        return None
    steps, vals = ctx.before_cutoff(s)
    if "total" in s.layers:
        v = vals[:, s.layers.index("total")]
        names = ["total"]
    else:
        v = vals.sum(axis=1)  # NaN where a component is absent
        names = list(s.layers)
    ok = np.isfinite(v)
    return steps[ok], v[ok], names


def _weights_over_start(ctx: _Context, names: Optional[Sequence[str]] = None):
    """(steps, [steps x tensors] weight norm over its first value) before the cutoff, or None.

    Weight tensors `names` (default: every one that is not a bias) whose first
    norm is at least `min_weight_norm`; a ratio to a near-zero start means nothing.
    """
    w = ctx.series.get("weight_norm")
    if w is None or not w.steps.size:
        return None
    steps, wv = ctx.before_cutoff(w)
    if names is None:
        cols = [j for j, n in enumerate(w.layers) if not _is_bias(n)]
    else:
        cols = [w.layers.index(n) for n in names if n in w.layers]
    if steps.size < 2 or not cols:
        return None
    wv = wv[:, cols]
    first = wv[0]
    keep = np.isfinite(first) & (first >= ctx.th.min_weight_norm)
    if not keep.any():
        return None
    return steps, wv[:, keep] / first[keep]


def _lr_text(ctx: _Context) -> str:
    lr = ctx.series.get("learning_rate")
    if lr is None or not lr.steps.size:
        return ""
    v = lr.values[lr.present]  # every parameter group
    v = v[np.isfinite(v)]
    if not v.size:
        return ""
    lo, hi = float(v.min()), float(v.max())
    return f" ({_fmt(lo)})" if lo == hi else f" ({_fmt(lo)}-{_fmt(hi)})"
