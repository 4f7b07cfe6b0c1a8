"""Findings: why a training run goes wrong, from its recorded series.

Pure functions over `reading.Series` (numpy only: TensorBoard imports this
module, so no torch). `analyze` runs every rule on what was recorded and
returns the findings, worst first, and a note for each rule that could not
run because a metric is missing. The same rules serve the tab, its HTTP
route and `tb-diag report`.

Conventions every rule follows, to keep false alarms out:

- A condition must *persist* (`Thresholds.persist_fraction` of the logged
  steps, or the last `persist_tail` of them) unless the rule is about single
  events (non-finite values, loss spikes).
- Once a run has produced NaN/Inf (loss, weights, or gradients outside an
  AMP-skipped step) the later steps describe a broken model; rules other
  than `nonfinite` only look at the steps before.
- Gradients are compared with the model's own other layers and its own
  history rather than with absolute constants alone: their scale depends on
  the loss, the batch size and the architecture.
- Biases, normalisation parameters and zero-initialised tensors are judged
  with their siblings or left out where their small size is normal.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from tb_diag_plugin.reading import Series

KINDS = (
    "nonfinite",
    "exploding_gradient",
    "vanishing_gradient",
    "dead_relu",
    "saturated_activation",
    "update_ratio",
    "loss_spike",
    "loss_not_decreasing",
    "loss_component_dominance",
)
# The metric whose chart shows each kind (for the tab's links from a finding to its heatmap).
KIND_METRIC = {
    "nonfinite": "grad_nonfinite",
    "exploding_gradient": "grad_norm",
    "vanishing_gradient": "grad_norm",
    "dead_relu": "dead_fraction",
    "saturated_activation": "saturation",
    "update_ratio": "update_ratio",
    "loss_spike": "loss",
    "loss_not_decreasing": "loss",
    "loss_component_dominance": "loss",
}
SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


@dataclass
class Thresholds:
    """Every constant a rule uses, with where its default comes from. Override any field.

    Shared
        persist_fraction (0.5): a condition counts when it holds on at least
            this share of the logged steps a rule looks at ...
        persist_tail (3): ... or on each of the last this-many logged steps
            (a fault that appeared late and is still there at the end).
        window_fraction (0.1), min_window (3): "start" and "end" of a run are
            the medians of its first and last max(min_window, 10 %) logged
            steps; medians keep one noisy batch from deciding.
        min_weight_norm (1e-3): tensors with a smaller L2 norm (zero-initialised
            biases, LayerNorm/BatchNorm shifts) are left out of ratios to
            their own weights, which would be meaningless.

    nonfinite
        amp_min_scale (1.0): under a GradScaler, a step skipped for
            non-finite gradients is by design; once the scale has fallen
            below 1 the gradients overflow unscaled and it is a fault.

    exploding_gradient
        explode_growth (100): total gradient norm this many times its start
            (the first logged value, or the early median if lower), on two
            logged steps in a row or right before NaN/Inf. Healthy runs of
            the suite and its variants grew at most 32x (SGD with momentum,
            logged every step); divergence grows by 1e4 to 1e17.
        explode_grad_to_weight (3000): a weight tensor whose gradient norm is
            this many times its own norm. Healthy: median 0.03-1, and 300
            for a summed (not averaged) MSE over 4096 outputs; N(0, 1) or
            N(0, 4) initialisations of deep ReLU nets give 7e3-6e6. SGD at
            lr 1e-3 would move such weights by 3x their size per step.

    vanishing_gradient
        vanish_ratio (1e-3): a tensor's gradient norm below this share of
            the model's largest, at the same step. Healthy weight tensors of
            the suite and its variants stay above 1e-2 (the lowest: a
            LayerNorm gain in the last of 8 residual blocks); a sigmoid
            passes back at most 1/4, so 5 sigmoid layers already lose ~1e-3.
        vanish_drop (1000), vanish_soft_ratio (1e-2): also vanishing, a layer
            whose share fell 1000x below its own share at the start and is
            under 1e-2 of the largest (gradients that collapsed during
            training).
        l2_floor_tolerance (1.02): an L2 term in the loss (DESIGN.md's own
            example adds 1e-4 * sum(p**2)) gives every weight a gradient
            2*lam*w that hides vanishing data gradients. When at least 3 (and
            a quarter of the) weight tensors share the smallest gradient-to-
            weight ratio to within 2 %, that ratio is taken as 2*lam and
            removed before comparing layers. Data gradients never line up
            that closely; the 20-layer sigmoid demo's 17 hidden layers sit
            at 2.00e-4 = 2 x 1e-4 exactly.
        l2_floor_contrast (10): ... and only where some weight tensor's ratio
            is 10x the floor or more (its data gradient clearly dominates):
            when every tensor sits on the floor the regulariser swamps the
            data everywhere, which loss_component_dominance reports.

    dead_relu
        dead_fraction (0.5): share of a ReLU site's units that were not
            positive for any sample of a logged batch (SageMaker Debugger's
            DeadRelu uses the same 50 % per layer). Healthy ReLU layers
            measured 0-28 % (the most with a batch of 8). With batches of a
            few samples a live unit is often "dead" for the batch: raise it.
        dead_error_fraction (0.99): a site this dead passes (almost) no
            gradient: error.

    saturated_activation
        saturation_fraction (0.25): share of a sigmoid/tanh site's outputs
            where the derivative is below 5 % of its peak (the logger's
            definition). Healthy hidden tanh/sigmoid layers measured 0-7 %;
            N(0, 1) weights on a 64-wide layer give ~30-40 %.
        saturation_improved (0.1): saturation that appears only later while
            the loss still falls by this share afterwards is taken as
            confident outputs (a sigmoid output under BCE), reported as info.

    update_ratio (||dw|| / ||w|| per optimizer step, weight tensors only)
        update_ratio_high (0.1): the median weight tensor changes by 10 %
            of its norm in one step. The usual healthy range is ~1e-3
            (Karpathy's rule of thumb); no logged step of a healthy run of
            the suite or its variants went above 0.1 (the most: 0.088, Adam
            at 1e-2), Adam at 0.1-0.3 and SGD at 2-3 reach 0.2-4.
        update_ratio_low (1e-6): even the fastest-moving weight tensor
            changes by under a millionth per step: nothing is learned in any
            practical number of steps.
        update_min_points (3), update_min_fraction (0.05): too-large updates
            must show on at least max(3, 5 % of) logged steps after the first
            (Adam's first step is lr / rms(w) by construction).
        update_weight_growth (4): or the median weight tensor's norm grew 4x
            over its first value: over-large steps that inflated the weights
            until the ratio looks moderate again (Adam at lr 0.1). Healthy
            runs of the suite and its variants grew at most 1.75x.

    loss_spike
        spike_window (20): the loss is compared with the previous this-many
            logged values (earlier spikes left out) ...
        spike_ratio (2): ... must exceed their median by this factor,
        spike_mad (4): by this many robust standard deviations (1.4826 x
            median absolute deviation) of the log-loss, in the window or over
            the run, whichever is larger (minibatch noise is multiplicative);
            for a run of n logged steps at least sqrt(2 ln n) + 1, one more
            than the expected largest of n normal draws (long runs offer
            more chances). Injected spikes measure 4.3-13; healthy runs
            reach 4.8 only near zero loss, where spike_min_rise rejects
            them; no spike in 160 synthetic log-normal noise runs of 300 and
            20,000 steps.
        spike_over_max (1.5): and their maximum by half again: minibatch
            noise, heavy-tailed with small batches, is not a spike (a
            batch of 8 samples gave isolated 4-6x excursions, never 1.5x
            the previous 20 values' maximum).
        spike_min_rise (0.5): It must rise by at least half the loss's
            starting level, i.e. undo a large part of what training achieved
            (a near-zero loss that triples on a hard batch is noise). The
            healthy runs' largest excursions rose 0.2-0.6 of it; none met
            all of these conditions at once.
        spike_recovery (10): it must come back below half way within this
            many logged steps; a jump that stays is divergence, reported by
            the other rules.

    loss_not_decreasing
        loss_min_decrease (0.05): the end-of-run loss must be at least 5 %
            below the start. Healthy runs of the suite and its variants fell
            18-99.7 %; lr 0, random labels and lr 1e-9 change it under 3 %.
        loss_min_points (8): fewer logged steps say nothing about a trend.

    loss_component_dominance
        dominance_ratio (10): a regulariser or auxiliary term at least 10x
            the data term, i.e. over 90 % of the loss value ...
        dominance_unlearned (0.5): ... while the data term is still above
            half its starting value (once the data is fitted, a weight-decay
            term larger than a near-zero data loss is normal).
        dominance_min_fraction (0.1): on at least this share of logged steps.
    """

    persist_fraction: float = 0.5
    persist_tail: int = 3
    window_fraction: float = 0.1
    min_window: int = 3
    min_weight_norm: float = 1e-3
    amp_min_scale: float = 1.0
    explode_growth: float = 100.0
    explode_grad_to_weight: float = 3000.0
    vanish_ratio: float = 1e-3
    vanish_drop: float = 1000.0
    vanish_soft_ratio: float = 1e-2
    l2_floor_tolerance: float = 1.02
    l2_floor_contrast: float = 10.0
    dead_fraction: float = 0.5
    dead_error_fraction: float = 0.99
    saturation_fraction: float = 0.25
    saturation_improved: float = 0.1
    update_ratio_high: float = 0.1
    update_ratio_low: float = 1e-6
    update_min_points: int = 3
    update_min_fraction: float = 0.05
    update_weight_growth: float = 4.0
    spike_window: int = 20
    spike_ratio: float = 2.0
    spike_mad: float = 4.0
    spike_over_max: float = 1.5
    spike_min_rise: float = 0.5
    spike_recovery: int = 10
    loss_min_decrease: float = 0.05
    loss_min_points: int = 8
    dominance_ratio: float = 10.0
    dominance_unlearned: float = 0.5
    dominance_min_fraction: float = 0.1

    def replace(self, **changes: float) -> Thresholds:
        """A copy with some fields changed; unknown names raise TypeError."""
        return Thresholds(**{**asdict(self), **changes})


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
        }


def analyze(
    series: dict[str, Series], thresholds: Optional[Thresholds] = None
) -> tuple[list[Finding], list[str]]:
    """Run every rule over one run's series.

    Returns the findings sorted worst first (error, warning, info; then the
    earliest first step) and readable notes on rules that could not run
    because a metric is missing or too short.
    """
    ctx = _Context(series, thresholds or Thresholds())
    for rule in _RULES:
        rule(ctx)
    # Worst first; at equal severity and step, causes (gradients, units) before symptoms (the loss).
    found = sorted(ctx.findings, key=lambda f: (SEVERITY_RANK.get(f.severity, 9), f.first_step, KINDS.index(f.kind)))
    return found, ctx.notes


# ------------------------------------------------------------------ helpers
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
        """(steps, values with NaN where absent) before the first NaN/Inf, without AMP-skipped steps."""
        vals = np.where(s.present, s.values.astype(np.float64), np.nan)
        keep = np.ones(s.steps.shape, dtype=bool) if self.cutoff is None else s.steps < self.cutoff
        if self.amp_skipped.size:
            keep &= ~np.isin(s.steps, self.amp_skipped)
        return s.steps[keep], vals[keep]

    def add(self, kind: str, severity: str, layers: Sequence[str], first: int, last: int, message: str,
            suggestion: str) -> None:
        self.findings.append(Finding(kind, severity, list(layers), int(first), int(last), message, suggestion))


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


def _relative_decrease(v: np.ndarray, th: Thresholds) -> Optional[tuple[float, float, float]]:
    """(start, end, decrease as a share of |start|) over medians of the first and last windows."""
    if v.size < th.loss_min_points:
        return None
    w = _window(v.size, th)
    start, end = float(np.median(v[:w])), float(np.median(v[-w:]))
    scale = abs(start)
    if scale < 1e-12:
        return None
    return start, end, (start - end) / scale


# -------------------------------------------------------------------- rules
def _nonfinite(ctx: _Context) -> None:
    """NaN/Inf in the loss, gradients, weights or activations: where it started."""
    sources: list[tuple[str, Series, np.ndarray]] = []  # (what, series, bad[S, L])
    loss = ctx.series.get("loss")
    if loss is not None and loss.steps.size:
        sources.append(("loss", loss, loss.present & ~np.isfinite(loss.values)))
    grad = ctx.series.get("grad_norm")
    if grad is not None and grad.steps.size:
        bad = grad.present & ~np.isfinite(grad.values)
        nf = ctx.series.get("grad_nonfinite")
        if nf is not None and nf.layers == grad.layers and np.array_equal(nf.steps, grad.steps):
            bad |= nf.present & (np.nan_to_num(nf.values, nan=1.0) > 0)
        by_design = _amp_by_design(ctx, grad.steps)
        ctx.amp_skipped = grad.steps[by_design]
        bad &= ~by_design[:, None]
        sources.append(("gradients", grad, bad))
    weights = ctx.series.get("weight_norm")
    if weights is not None and weights.steps.size:
        sources.append(("weights", weights, weights.present & ~np.isfinite(weights.values)))
    act = ctx.series.get("act_mean")
    if act is not None and act.steps.size:
        sources.append(("activations", act, act.present & ~np.isfinite(act.values)))
    if not sources:
        ctx.notes.append("nonfinite: not checked, no loss, gradient, weight or activation metrics recorded")
        return
    firsts = {}
    for what, s, bad in sources:
        rows = np.flatnonzero(bad.any(axis=1))
        if rows.size:
            firsts[what] = (int(s.steps[rows[0]]), int(s.steps[rows[-1]]), int(rows.size))
    if not firsts:
        return
    first = min(f[0] for f in firsts.values())
    last = max(f[1] for f in firsts.values())
    ctx.nan_step = ctx.cutoff = first
    ctx.nan_first = {what: f[0] for what, f in firsts.items()}
    layers: list[str] = []
    parts: list[str] = []
    for what, s, bad in sources:
        if what not in firsts:
            continue
        f0 = firsts[what][0]
        if f0 == first:
            row = int(np.flatnonzero(s.steps == first)[0])
            names = [s.layers[j] for j in np.flatnonzero(bad[row])]
            layers += names
            parts.append(f"{what} {_names(names, 3)} ({len(names)}/{len(s.layers)})")
        else:
            parts.append(f"{what} from step {f0}")
    steps_bad = max(f[2] for f in firsts.values())
    before = _growth_before(ctx, first)
    if before is not None:
        cause = f"{before} before it"
        suggestion = (
            "The run diverged: lower the learning rate (try 10x lower), add gradient clipping "
            "(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)) or a warm-up, and check the "
            "initialisation."
        )
    else:
        cause = "with no growth of the gradients or the loss before it"
        suggestion = (
            "A sudden NaN/Inf points at the computation, not the step size: look for log(0), division "
            "by zero, sqrt at 0 or exp overflow in the loss and the model (add an eps or clamp, use "
            "F.log_softmax / F.binary_cross_entropy_with_logits), and for bad values in the batch; "
            "torch.autograd.set_detect_anomaly(True) names the operation."
        )
    ctx.add(
        "nonfinite", "error", layers, first, last,
        f"NaN/Inf first at step {first} ({cause}): " + "; ".join(parts)
        + f"; {steps_bad} logged step(s) affected, last at {last}.",
        suggestion,
    )


def _amp_by_design(ctx: _Context, steps: np.ndarray) -> np.ndarray:
    """Per step: the GradScaler skipped it (non-finite gradients are expected), scale still sane."""
    out = np.zeros(steps.shape, dtype=bool)
    skipped = ctx.series.get("amp_skipped")
    if skipped is None or not skipped.steps.size:
        return out
    scale = ctx.series.get("amp_scale")
    sk = {int(s): bool(v >= 0.5) for s, v in zip(skipped.steps, np.nan_to_num(skipped.values[:, 0]))}
    sc = {}
    if scale is not None and scale.steps.size:
        sc = {int(s): float(v) for s, v in zip(scale.steps, scale.values[:, 0])}
    for i, s in enumerate(steps):
        s = int(s)
        if sk.get(s, False):
            value = sc.get(s, math.inf)
            out[i] = not (math.isfinite(value) and value < ctx.th.amp_min_scale)
    return out


def _total_grad(ctx: _Context) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(steps, total gradient norm), all logged steps, NaN kept."""
    tot = ctx.series.get("grad_norm_total")
    if tot is not None and tot.steps.size:
        return tot.steps, np.where(tot.present[:, 0], tot.values[:, 0].astype(np.float64), np.nan)
    g = ctx.series.get("grad_norm")
    if g is None or not g.steps.size:
        return None
    vals = np.where(g.present, g.values.astype(np.float64), 0.0)
    return g.steps, np.sqrt((vals**2).sum(axis=1))


def _growth(v: np.ndarray, th: Thresholds) -> Optional[float]:
    """How many times its start (first value, or the early median if lower) `v` reached at its end."""
    if v.size < 2:
        return None
    base = min(float(v[0]), float(np.median(v[: _window(v.size, th)])))
    peak = float(v[-min(3, v.size):].max())
    return peak / base if base > 0 else None


def _growth_before(ctx: _Context, first_bad: int) -> Optional[str]:
    """'gradients grew 1e6x' (or the loss) up to the first NaN/Inf, when something grew 10x or more."""
    found = []
    tg = _total_grad(ctx)
    if tg is not None:
        steps, v = tg
        found.append(("gradients", _growth(v[(steps < first_bad) & np.isfinite(v)], ctx.th)))
    loss = ctx.series.get("loss")
    if loss is not None and "total" in loss.layers and loss.steps.size:
        v = np.where(loss.present[:, loss.layers.index("total")],
                     loss.values[:, loss.layers.index("total")].astype(np.float64), np.nan)
        found.append(("the loss", _growth(v[(loss.steps <= first_bad) & np.isfinite(v)], ctx.th)))
    grew = [(what, g) for what, g in found if g is not None and g >= 10]
    if not grew:
        return None
    what, g = max(grew, key=lambda t: t[1])
    return f"{what} grew {_fmt(g)}x"


def _exploding(ctx: _Context) -> None:
    th = ctx.th
    got = ctx.get("exploding_gradient", "grad_norm", why="gradients are recorded on logged steps after backward")
    if got is None:
        return
    (g,) = got
    steps, gv = ctx.before_cutoff(g)
    if steps.size == 0:
        return
    flagged: dict[str, None] = {}
    first = last = blowup = None
    detail = []

    # 1. Growth of the total norm over its own start.
    tg = _total_grad(ctx)
    if tg is not None:
        tsteps, tv = tg
        keep = np.isin(tsteps, steps) & np.isfinite(tv)
        tsteps, tv = tsteps[keep], tv[keep]
        if tv.size >= 2:
            # The start is the first value (a run can blow up within its first few logged steps),
            # or the early median when that is lower.
            w = _window(tv.size, th)
            base = min(float(tv[0]), float(np.median(tv[:w])))
            high = tv >= th.explode_growth * base if base > 0 else np.zeros(tv.shape, dtype=bool)
            high[0] = False
            run_ok = high[1:] & high[:-1]
            ends_in_nan = ctx.nan_step is not None and high.size and high[-1]
            if run_ok.any() or ends_in_nan:
                hit = np.flatnonzero(high)
                first, last = int(tsteps[hit[0]]), int(tsteps[hit[-1]])
                peak = float(tv[hit].max())
                rows = np.isin(steps, tsteps[hit])
                lbase = np.fmin(gv[0], _quiet(np.nanmedian, gv[: _window(gv.shape[0], th)], axis=0))
                lpeak = _quiet(np.nanmax, gv[rows], axis=0)
                grew = [g.layers[j] for j in range(len(g.layers))
                        if lbase[j] > 0 and lpeak[j] >= th.explode_growth * lbase[j]]
                for n in grew or g.layers:
                    flagged[n] = None
                detail.append(
                    f"the total gradient norm grew from {_fmt(base)} to {_fmt(peak)} "
                    f"({_fmt(peak / base)}x) by step {last}"
                    + (", then NaN/Inf" if ctx.nan_step is not None else "")
                )
                blowup = first

    # 2. Gradients that overflowed: non-finite while the loss was finite, or while other layers'
    #    gradients were finite but far above their start (a NaN loss, e.g. log(0), is not this).
    grads_first = ctx.nan_step is not None and ctx.nan_first.get("gradients") == ctx.nan_step
    if blowup is None and grads_first:
        over = _overflow(ctx, g, th)
        if over is not None:
            names, why = over
            for n in names:
                flagged[n] = None
            first = ctx.nan_step if first is None else min(first, ctx.nan_step)
            last = ctx.nan_step if last is None else max(last, ctx.nan_step)
            blowup = ctx.nan_step
            detail.append(why)

    # 3. Gradients far larger than the weights they update.
    w_series = ctx.series.get("weight_norm")
    if w_series is not None and w_series.steps.size:
        ratio, rsteps, names = _per_weight(g, w_series, ctx, th)
        if ratio is not None:
            valid = np.isfinite(ratio)
            worst = []
            for j, n in enumerate(names):
                if _is_bias(n):
                    continue  # a bias near 0 makes any gradient look huge next to it
                span = _persistent(ratio[:, j] >= th.explode_grad_to_weight, valid[:, j], th)
                if span is not None:
                    flagged[n] = None
                    worst.append(float(_quiet(np.nanmedian, ratio[:, j])))
                    first = int(rsteps[span[0]]) if first is None else min(first, int(rsteps[span[0]]))
                    last = int(rsteps[span[1]]) if last is None else max(last, int(rsteps[span[1]]))
            if worst:
                detail.append(
                    f"{len(worst)} layer(s) have gradients {_fmt(min(worst))}-{_fmt(max(worst))}x their "
                    f"weight norm (healthy: below 1)"
                )
    if not flagged:
        return
    if blowup is not None and ctx.nan_step is not None:
        # From here on the run blows up into NaN: what the other rules would see is its consequence.
        ctx.cutoff = min(ctx.nan_step, blowup)
    layers = list(flagged)
    severity = "error" if ctx.nan_step is not None else "warning"
    ctx.add(
        "exploding_gradient", severity, layers, first, last,
        f"Exploding gradients in {_names(layers)}: " + "; ".join(detail) + ".",
        "Lower the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0)), use a "
        "scaled initialisation (kaiming_normal_ for ReLU, xavier for tanh) and normalisation layers "
        "(BatchNorm/LayerNorm) or residual connections in deep stacks.",
    )


def _overflow(ctx: _Context, g: Series, th: Thresholds) -> Optional[tuple[list[str], str]]:
    """At the first non-finite gradient step: the layers that overflowed, and why it is an overflow."""
    step = ctx.nan_step
    rows = np.flatnonzero(g.steps == step)
    if not rows.size:
        return None
    row = np.where(g.present[rows[0]], g.values[rows[0]].astype(np.float64), np.nan)
    before = g.steps < step
    if before.any():
        early = np.where(g.present[before], g.values[before].astype(np.float64), np.nan)
        base = np.fmin(early[0], _quiet(np.nanmedian, early[: _window(early.shape[0], th)], axis=0))
    else:
        base = np.full(row.shape, np.nan)
    grown = np.isfinite(row) & (row >= th.explode_growth * base)
    loss = ctx.series.get("loss")
    loss_ok = None
    if loss is not None and "total" in loss.layers:
        lr = np.flatnonzero(loss.steps == step)
        if lr.size and loss.present[lr[0], loss.layers.index("total")]:
            v = float(loss.values[lr[0], loss.layers.index("total")])
            loss_ok = v if math.isfinite(v) else None
    if not grown.any() and loss_ok is None:
        return None
    names = [n for j, n in enumerate(g.layers) if grown[j] or np.isposinf(row[j])]
    why = f"gradients overflowed to inf at step {step}"
    if loss_ok is not None:
        why += f" while the loss was still finite ({_fmt(loss_ok)})"
    if grown.any():
        least = float(np.nanmin(row[grown] / base[grown]))
        why += f"; {int(grown.sum())} layer(s) were at {_fmt(least)}x or more of their start"
    return names or list(g.layers), why


def _per_weight(g: Series, w: Series, ctx: _Context, th: Thresholds):
    """grad/weight norm per layer at common steps, layers with a non-negligible weight norm only."""
    gsteps, gv = ctx.before_cutoff(g)
    wsteps, wv = ctx.before_cutoff(w)
    common, gi, wi = np.intersect1d(gsteps, wsteps, return_indices=True)
    if common.size == 0:
        return None, None, None
    names = [n for n in g.layers if n in w.layers]
    if not names:
        return None, None, None
    gm = gv[gi][:, [g.layers.index(n) for n in names]]
    wm = wv[wi][:, [w.layers.index(n) for n in names]]
    ratio = np.where(wm >= th.min_weight_norm, gm / np.where(wm > 0, wm, 1.0), np.nan)
    return ratio, common, names


def _vanishing(ctx: _Context) -> None:
    th = ctx.th
    got = ctx.get("vanishing_gradient", "grad_norm")
    if got is None:
        return
    (g,) = got
    steps, gv = ctx.before_cutoff(g)
    if steps.size == 0 or len(g.layers) < 2:
        if len(g.layers) < 2:
            ctx.notes.append("vanishing_gradient: not checked, needs gradients of two or more tensors")
        return
    gv = np.where(np.isfinite(gv), gv, np.nan)
    raw = gv
    gv, l2 = _without_l2(ctx, steps, gv, g.layers)
    top = _quiet(np.nanmax, gv, axis=1)
    valid_row = np.isfinite(top) & (top > 0)
    share = gv / np.where(valid_row, top, np.nan)[:, None]
    w = _window(steps.size, th)
    share0 = _quiet(np.nanmedian, share[:w], axis=0)
    low = share < th.vanish_ratio
    collapsed = (share < th.vanish_soft_ratio) & (share < share0[None, :] / th.vanish_drop)
    cand = low | collapsed
    valid = np.isfinite(share)
    zero = np.nan_to_num(raw, nan=1.0) == 0

    spans: dict[str, tuple[int, int]] = {}
    for j, n in enumerate(g.layers):
        span = _persistent(cand[:, j], valid[:, j], th)
        if span is not None:
            spans[n] = span
    vanishing, no_grad, redundant = [], [], []
    for n in spans:
        j = g.layers.index(n)
        if zero[valid[:, j], j].all():
            no_grad.append(n)
        elif _is_bias(n) and _sibling_weight(n) in g.layers and _sibling_weight(n) not in spans:
            # A bias is judged with its own weight: a bias right before BatchNorm/LayerNorm (or a
            # key-projection bias under softmax) gets ~0 gradient by construction, harmlessly.
            ws = share[:, g.layers.index(_sibling_weight(n))]
            if _quiet(lambda a, b: np.nanmedian(a / b), share[:, j], ws) < th.vanish_ratio:
                redundant.append(n)
        else:
            vanishing.append(n)

    if vanishing:
        idx = [g.layers.index(n) for n in vanishing]
        first = min(spans[n][0] for n in vanishing)
        last = max(spans[n][1] for n in vanishing)
        med = _quiet(np.nanmedian, share[:, idx], axis=0)
        med = med[np.isfinite(med) & (med > 0)]
        lead = _quiet(np.nanargmax, _quiet(np.nanmedian, gv, axis=0))
        rng = f"{_fmt(float(med.min()))}-{_fmt(float(med.max()))}x" if med.size else "a vanishing share of"
        sat = ctx.series.get("saturation")
        hint = ""
        if sat is not None and sat.layers:
            types = sorted({t for t in sat.layer_types if t}) or ["sigmoid/tanh"]
            hint = (f" The model has {len(sat.layers)} {'/'.join(types)} activation site(s): their derivative "
                    "is at most 1/4 (sigmoid) or 1 (tanh) and far less in saturation.")
        if l2 is not None:
            hint += (f" An L2 term in the loss gives every weight a gradient of {_fmt(l2)} x its norm; "
                     "beyond that, these tensors get almost nothing from the data.")
        ctx.add(
            "vanishing_gradient", "warning", vanishing, int(steps[first]), int(steps[last]),
            f"{len(vanishing)} tensor(s) ({_names(vanishing)}) get gradients {rng} those of "
            f"{g.layers[int(lead)]} (median over steps) from step {int(steps[first])}.{hint}",
            "Use ReLU/GELU instead of sigmoid/tanh in hidden layers, He/Xavier initialisation "
            "(weights neither tiny nor huge), normalisation (BatchNorm/LayerNorm) or residual connections; "
            "a shallower network also helps.",
        )
    if redundant:
        first = min(spans[n][0] for n in redundant)
        last = max(spans[n][1] for n in redundant)
        ctx.add(
            "vanishing_gradient", "info", redundant, int(steps[first]), int(steps[last]),
            f"{_names(redundant)} get gradients under {_fmt(th.vanish_ratio)}x those of their own weights. "
            "A bias followed by normalisation (BatchNorm/LayerNorm subtracts it again) has no effect.",
            "If the layer feeds a normalisation layer, construct it with bias=False; nothing else changes.",
        )
    if no_grad:
        first = min(spans[n][0] for n in no_grad)
        last = max(spans[n][1] for n in no_grad)
        ctx.add(
            "vanishing_gradient", "info", no_grad, int(steps[first]), int(steps[last]),
            f"{_names(no_grad)} received an exactly zero gradient on every logged step.",
            "If they should learn: check that they are used in forward and that the units feeding them "
            "are not dead (see dead_relu); unused parameters are better removed or frozen (requires_grad=False).",
        )


def _without_l2(ctx: _Context, steps: np.ndarray, gv: np.ndarray,
                names: list[str]) -> tuple[np.ndarray, Optional[float]]:
    """Gradient norms with an L2 regulariser's share taken out, where the recording shows one.

    `loss + lam * sum(w**2)` adds 2*lam*w to every gradient. Where the data gradient has vanished,
    that term is all that is left: several weight tensors then have the same gradient-to-weight
    ratio, 2*lam, to within a percent or two, which data gradients never do. At such steps the data
    part is estimated as sqrt(g^2 - (2*lam*|w|)^2) (the data gradient roughly orthogonal to w).
    Returns (gradient norms, the median 2*lam where found, else None).
    """
    w = ctx.series.get("weight_norm")
    if w is None or not w.steps.size:
        return gv, None
    wsteps, wv = ctx.before_cutoff(w)
    row_of = {int(s): i for i, s in enumerate(wsteps)}
    rows = np.array([row_of.get(int(s), -1) for s in steps], dtype=np.int64)
    col_of = {n: j for j, n in enumerate(w.layers)}
    cols = np.array([col_of.get(n, -1) for n in names], dtype=np.int64)
    known = (rows[:, None] >= 0) & (cols[None, :] >= 0)
    wm = np.where(known, wv[np.maximum(rows, 0)[:, None], np.maximum(cols, 0)[None, :]], np.nan)
    weights = np.array([not _is_bias(n) for n in names]) & (cols >= 0)
    if weights.sum() < 3:
        return gv, None
    ratio = np.where(wm >= ctx.th.min_weight_norm, gv / np.where(wm > 0, wm, 1.0), np.nan)
    rw = ratio[:, weights]
    floor = _quiet(np.nanmin, rw, axis=1)
    at_floor = (rw <= floor[:, None] * ctx.th.l2_floor_tolerance).sum(axis=1)
    need = max(3, math.ceil(0.25 * int(weights.sum())))
    # Some tensors must stand well above the floor: when all sit on it, the regulariser swamps the
    # data everywhere (loss_component_dominance), which is not one layer starving another.
    contrast = _quiet(np.nanmax, rw, axis=1) >= ctx.th.l2_floor_contrast * floor
    has = np.isfinite(floor) & (floor > 0) & (at_floor >= need) & contrast
    if not has.any():
        return gv, None
    decay = np.where(np.isfinite(wm), floor[:, None] * wm, 0.0)
    data = np.sqrt(np.clip(gv**2 - decay**2, 0.0, None))
    return np.where(has[:, None], data, gv), float(np.median(floor[has]))


def _dead_relu(ctx: _Context) -> None:
    th = ctx.th
    got = ctx.get("dead_relu", "dead_fraction", why="no ReLU-family activation sites, or activations=False")
    if got is None:
        return
    (d,) = got
    steps, dv = ctx.before_cutoff(d)
    if steps.size == 0:
        return
    valid = np.isfinite(dv)
    hits = []
    for j, n in enumerate(d.layers):
        span = _persistent(dv[:, j] >= th.dead_fraction, valid[:, j], th)
        if span is not None:
            hits.append((n, span, float(_quiet(np.nanmedian, dv[span[0]: span[1] + 1, j]))))
    if not hits:
        return
    layers = [h[0] for h in hits]
    first = min(h[1][0] for h in hits)
    last = max(h[1][1] for h in hits)
    worst = max(h[2] for h in hits)
    severity = "error" if worst >= th.dead_error_fraction else "warning"
    shares = ", ".join(f"{n} {_pct(f)}" for n, _, f in hits[:6])
    ctx.add(
        "dead_relu", severity, layers, int(steps[first]), int(steps[last]),
        f"Dead ReLU units (never positive on a logged batch) since step {int(steps[first])}: {shares}"
        + (f" and {len(hits) - 6} more" if len(hits) > 6 else "") + ".",
        "Dead units get no gradient and never recover: lower the learning rate, check the initialisation "
        "(kaiming, biases not negative), add normalisation before the ReLU, or use LeakyReLU/GELU.",
    )


def _saturated(ctx: _Context) -> None:
    th = ctx.th
    got = ctx.get("saturated_activation", "saturation", why="no sigmoid/tanh activation sites")
    if got is None:
        return
    (s,) = got
    steps, sv = ctx.before_cutoff(s)
    if steps.size == 0:
        return
    valid = np.isfinite(sv)
    w = _window(steps.size, th)
    loss = _loss_total(ctx)
    warn, confident = [], []
    for j, n in enumerate(s.layers):
        high = sv[:, j] >= th.saturation_fraction
        span = _persistent(high, valid[:, j], th)
        if span is None:
            continue
        share = float(_quiet(np.nanmedian, sv[span[0]: span[1] + 1, j]))
        from_start = bool(_quiet(np.nanmedian, sv[:w, j]) >= th.saturation_fraction)
        entry = (n, span, share, from_start)
        if not from_start and loss is not None and _improved_after(loss, int(steps[span[0]]), th):
            confident.append(entry)
        else:
            warn.append(entry)
    for group, severity in ((warn, "warning"), (confident, "info")):
        if not group:
            continue
        layers = [e[0] for e in group]
        first = int(steps[min(e[1][0] for e in group)])
        last = int(steps[max(e[1][1] for e in group)])
        shares = ", ".join(f"{n} {_pct(f)}" for n, _, f, _ in group[:6])
        if severity == "warning":
            since = "from the first logged steps" if any(e[3] for e in group) else f"since step {first}"
            ctx.add(
                "saturated_activation", severity, layers, first, last,
                f"Saturated sigmoid/tanh outputs (in the flat tails, gradient under 5 % of its peak) {since}: "
                f"{shares}.",
                "The inputs to these activations are too large: scale the initialisation down "
                "(xavier_uniform_), standardise the input features, add normalisation before the "
                "activation, or lower the learning rate; ReLU/GELU do not saturate.",
            )
        else:
            ctx.add(
                "saturated_activation", severity, layers, first, last,
                f"{shares} saturate from step {first} while the loss keeps falling: confident outputs.",
                "Expected for an output sigmoid trained with BCE. For a hidden layer, check that the "
                "gradients below it do not vanish.",
            )


def _improved_after(loss: tuple[np.ndarray, np.ndarray, list[str]], step: int, th: Thresholds) -> bool:
    """Whether the loss fell by `saturation_improved` of its value at `step` by the end."""
    steps, v, _ = loss
    after = v[steps >= step]
    before = v[steps <= step]
    if after.size < 2 or before.size < 1:
        return False
    w = _window(after.size, th)
    at = float(np.median(before[-w:]))
    end = float(np.median(after[-w:]))
    return at > 0 and end <= at * (1 - th.saturation_improved)


def _update_ratio(ctx: _Context) -> None:
    th = ctx.th
    got = ctx.get("update_ratio", "update_ratio", why="pass optimizer= to Diagnostics")
    if got is None:
        return
    (u,) = got
    steps, uv = ctx.before_cutoff(u)
    if steps.size == 0:
        return
    # Weight tensors only: biases and norm shifts start at 0, where ||dw||/||w|| is meaningless.
    wn = ctx.series.get("weight_norm")
    cols = [j for j, n in enumerate(u.layers) if not _is_bias(n)]
    if wn is not None and wn.steps.size:
        wsteps, wv = ctx.before_cutoff(wn)
        common, ui, wi = np.intersect1d(steps, wsteps, return_indices=True)
        steps, uv = common, uv[ui]
        w_at = {n: wv[wi, wn.layers.index(n)] for n in u.layers if n in wn.layers}
        for j, n in enumerate(u.layers):
            if n in w_at:
                uv[:, j] = np.where(w_at[n] >= th.min_weight_norm, uv[:, j], np.nan)
    if not cols:
        cols = list(range(len(u.layers)))
    names = [u.layers[j] for j in cols]
    uv = uv[:, cols]
    uv = np.where(np.isfinite(uv), uv, np.nan)
    if steps.size == 0 or np.isnan(uv).all():
        return
    med = _quiet(np.nanmedian, uv, axis=1)
    # For "too small", only tensors that got a gradient: no gradient means no update whatever the
    # learning rate (dead units, vanishing gradients: their own rules say so).
    top = _quiet(np.nanmax, np.where(_has_grad(ctx, steps, names), uv, np.nan), axis=1)

    # Too large: after the first logged step (Adam's first update is lr/rms(w) by construction).
    high = med > th.update_ratio_high
    high[0] = False
    need = max(th.update_min_points, math.ceil(th.update_min_fraction * steps.size))
    growth = _weight_growth(ctx, names)
    if high.sum() < need and growth is not None and growth[0] >= th.update_weight_growth:
        # Large updates that piled up: the weights inflated (an over-large Adam step grows the
        # weights until the ratio looks moderate again).
        g, at = growth
        ctx.add(
            "update_ratio", "warning", names, int(steps[0]), at,
            f"Updates too large: the median weight tensor's norm grew {_fmt(g)}x by step {at} "
            f"(healthy runs: under 2x); update ratios median {_fmt(float(np.nanmedian(med)))}, "
            f"up to {_fmt(float(np.nanmax(med)))}.",
            f"The learning rate{_lr_text(ctx)} is too high: lower it about 10x, or add weight decay, "
            "warm-up and gradient clipping.",
        )
        return
    if high.sum() >= need:
        hit = np.flatnonzero(high)
        per = _quiet(np.nanmedian, uv[hit], axis=0)
        layers = [n for n, r in zip(names, per) if r > th.update_ratio_high] or names
        peak = float(np.nanmax(med[hit]))
        ctx.add(
            "update_ratio", "error" if peak >= 1.0 else "warning", layers, int(steps[hit[0]]), int(steps[hit[-1]]),
            f"Updates too large: the median weight tensor changes by {_fmt(float(np.median(med[hit])))} of its "
            f"norm per step (up to {_fmt(peak)}) on {hit.size} of {steps.size} logged steps; healthy is ~1e-3.",
            f"The learning rate{_lr_text(ctx)} is too high: lower it about "
            f"{_fmt(10 ** max(1, round(math.log10(max(peak, 1e-12) / 1e-3) - 0.5)))}x, or add warm-up "
            "and gradient clipping.",
        )
        return

    # Too small: even the fastest-moving tensor barely moves, on most of the run.
    low = top < th.update_ratio_low
    span = _persistent(low, np.isfinite(top), th)
    if span is not None and low.sum() >= max(2, math.ceil(th.persist_fraction * np.isfinite(top).sum())):
        sel = low & np.isfinite(top)
        typical = float(np.median(top[sel]))
        lr = _lr_text(ctx)
        zero = typical == 0
        ctx.add(
            "update_ratio", "warning", names, int(steps[span[0]]), int(steps[span[1]]),
            ("Weights do not change at all: update ratio 0" if zero else
             f"Updates too small: the fastest-moving weight tensor changes by {_fmt(typical)} of its norm "
             "per step") + f" on {int(sel.sum())} of {steps.size} logged steps; healthy is ~1e-3.",
            (f"The learning rate{lr} is 0 or the optimizer does not own these parameters." if zero else
             f"The learning rate{lr} is far too low: raise it about "
             f"{_fmt(10 ** max(1, round(math.log10(1e-3 / max(typical, 1e-30)) - 0.5)))}x"
             " (or check the schedule and that the optimizer owns these parameters)."),
        )


def _weight_growth(ctx: _Context, names: list[str]) -> Optional[tuple[float, int]]:
    """(largest growth of the median weight tensor's norm over its first value, the step), or None."""
    w = ctx.series.get("weight_norm")
    if w is None or not w.steps.size:
        return None
    steps, wv = ctx.before_cutoff(w)
    cols = [w.layers.index(n) for n in names if n in w.layers]
    if steps.size < 2 or not cols:
        return None
    wv = wv[:, cols]
    first = wv[0]
    keep = np.isfinite(first) & (first >= ctx.th.min_weight_norm)
    if not keep.any():
        return None
    growth = _quiet(np.nanmedian, wv[:, keep] / first[keep], axis=1)
    if not np.isfinite(growth).any():
        return None
    i = int(np.nanargmax(growth))
    return float(growth[i]), int(steps[i])


def _has_grad(ctx: _Context, steps: np.ndarray, names: list[str]) -> np.ndarray:
    """[steps x names]: the tensor had a non-zero finite gradient at that step (True if unknown)."""
    out = np.ones((steps.size, len(names)), dtype=bool)
    g = ctx.series.get("grad_norm")
    if g is None or not g.steps.size:
        return out
    row_of = {int(s): i for i, s in enumerate(g.steps)}
    col_of = {n: j for j, n in enumerate(g.layers)}
    rows = np.array([row_of.get(int(s), -1) for s in steps], dtype=np.int64)
    cols = np.array([col_of.get(n, -1) for n in names], dtype=np.int64)
    known = (rows[:, None] >= 0) & (cols[None, :] >= 0)
    vals = g.values[rows[:, None], cols[None, :]].astype(np.float64)
    pres = g.present[rows[:, None], cols[None, :]]
    alive = pres & np.isfinite(vals) & (vals > 0)
    return np.where(known, alive, True)


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


def _loss_spike(ctx: _Context) -> None:
    th = ctx.th
    s = ctx.series.get("loss")
    if s is None or not s.steps.size:
        ctx.notes.append("loss_spike: not checked, no 'loss' recorded (pass loss= to diag.step)")
        return
    steps, vals = ctx.before_cutoff(s)
    names = ["total"] if "total" in s.layers else list(s.layers)
    for name in names:
        v = vals[:, s.layers.index(name)]
        ok = np.isfinite(v)
        st, v = steps[ok], v[ok]
        spikes = _spikes(v, th)
        if not spikes:
            continue
        worst = max(spikes, key=lambda t: t[1])
        at = ", ".join(str(int(st[i])) for i, _ in spikes[:5]) + (" ..." if len(spikes) > 5 else "")
        ctx.add(
            "loss_spike", "warning", [name], int(st[spikes[0][0]]), int(st[spikes[-1][0]]),
            f"Loss '{name}' spiked {len(spikes)} time(s) (steps {at}); the largest to {_fmt(worst[1])}x "
            f"its running median, at step {int(st[worst[0]])}, and came back.",
            "Look at the batches of those steps (corrupt samples, wrong labels, outliers); clip gradients "
            "(clip_grad_norm_) so one batch cannot throw the weights far, or lower the learning rate.",
        )


def _spikes(v: np.ndarray, th: Thresholds) -> list[tuple[int, float]]:
    """Indices and sizes (x running median) of the loss spikes that recovered."""
    out: list[tuple[int, float]] = []
    n = v.size
    min_prev = max(3, th.spike_window // 2)
    if n <= min_prev:
        return out
    level = abs(float(np.median(v[: _window(n, th)])))
    # Noise outliers grow with the number of draws: ask for the expected maximum of n normals.
    z_need = max(th.spike_mad, math.sqrt(2 * math.log(n)) + 1.0)
    # Cheap necessary conditions first (the window's minimum bounds its median from below).
    padded = np.concatenate([np.full(th.spike_window - 1, np.inf), v])
    lows = np.lib.stride_tricks.sliding_window_view(padded, th.spike_window).min(axis=1)[: n]  # min of v[i-W:i]
    lows = np.concatenate([[np.inf], lows[:-1]])
    cand = np.flatnonzero((v >= th.spike_ratio * lows) & (v - lows >= th.spike_min_rise * level))
    if not cand.size:
        return out
    # The run's own noise level, from successive differences (a slow trend cancels out): a window
    # of 20 alone sometimes looks calmer than the run is.
    positive = bool((v > 0).all())
    run_sigma = 0.0
    if positive:
        d = np.diff(np.log(v))
        run_sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)
    spiked = np.zeros(n, dtype=bool)
    for i in cand[cand >= min_prev]:
        lo = max(0, i - th.spike_window)
        prev = v[lo:i][~spiked[lo:i]]  # an earlier spike is not part of the baseline
        if prev.size < 3:
            continue
        base = float(np.median(prev))
        if base <= 0:
            continue
        rise = float(v[i]) - base
        if v[i] < th.spike_ratio * base or rise < th.spike_min_rise * level or v[i] < th.spike_over_max * prev.max():
            continue
        if positive:  # multiplicative noise: measure in log space
            lp = np.log(prev)
            dev = math.log(float(v[i])) - float(np.median(lp))
            sigma = max(run_sigma, 1.4826 * float(np.median(np.abs(lp - np.median(lp)))))
        else:
            dev, sigma = rise, 1.4826 * float(np.median(np.abs(prev - base)))
        if dev < z_need * sigma:
            continue
        after = v[i + 1: i + 1 + th.spike_recovery]
        if after.size == 0 or not (after < base + 0.5 * rise).any():
            continue  # no recovery: divergence, not a spike
        spiked[i] = True
        out.append((int(i), float(v[i]) / base))
    return out


def _loss_not_decreasing(ctx: _Context) -> None:
    th = ctx.th
    loss = _loss_total(ctx)
    if loss is None:
        ctx.notes.append("loss_not_decreasing: not checked, no 'loss' recorded (pass loss= to diag.step)")
        return
    steps, v, names = loss
    name = "total" if names == ["total"] else " + ".join(names)
    dec = _relative_decrease(v, th)
    if dec is None:
        if v.size < th.loss_min_points:
            ctx.notes.append(
                f"loss_not_decreasing: not checked, needs {th.loss_min_points} logged finite loss values "
                f"(has {v.size})"
            )
        return
    start, end, frac = dec
    if frac >= th.loss_min_decrease:
        # The total fell; but a regulariser shrinking can carry it while the data term stands still.
        stuck = _stuck_data_term(ctx, start)
        if stuck is None:
            return
        name, steps, start, end, frac = stuck
        names = [name]
    lr = _lr_text(ctx)
    ctx.add(
        "loss_not_decreasing", "warning", names, int(steps[0]), int(steps[-1]),
        f"Loss '{name}' went from {_fmt(start)} to {_fmt(end)} (median of the first and last logged steps, "
        f"{_fmt(-100 * frac)} % change) over steps {int(steps[0])}-{int(steps[-1])}.",
        f"Check that the learning rate{lr} is not 0 or tiny and that the optimizer owns the model's "
        "parameters, that the labels match the inputs (shuffled together), and that the model can fit "
        "one small batch; see the other findings for the cause.",
    )


def _stuck_data_term(ctx: _Context, total_start: float):
    """(name, steps, start, end, decrease) of a data term, at least half the loss, that does not fall."""
    s = ctx.series.get("loss")
    if s is None or "total" not in s.layers or abs(total_start) <= 0:
        return None
    spread = ctx.series.get("loss_p50")
    per_sample = set(spread.layers) if spread is not None else set()
    steps, vals = ctx.before_cutoff(s)
    for j, n in enumerate(s.layers):
        if n == "total" or _role(n, n in per_sample) != "data":
            continue
        ok = np.isfinite(vals[:, j])
        dec = _relative_decrease(vals[ok, j], ctx.th)
        if dec is not None and dec[2] < ctx.th.loss_min_decrease and abs(dec[0]) >= 0.5 * abs(total_start):
            return n, steps[ok], dec[0], dec[1], dec[2]
    return None


_DATA_NAMES = re.compile(
    r"(^|[^a-z])(ce|xent|cross_?entropy|nll|bce|mse|mae|huber|smooth_?l1|recon\w*|data|task|main|"
    r"likelihood|ctc|cls|classification|regression|pred\w*|lm|mlm|logits?|target|supervised)($|[^a-z])"
)
_REG_NAMES = re.compile(
    r"(^|[^a-z])(l1|l2|reg\w*|penalty|wd|weight_?decay|decay|kl|kld|aux\w*|entropy|sparsity|sparse|ortho\w*|"
    r"smooth(ness)?|tv|lasso|ridge|prior|commit\w*|balance|load_?balanc\w*|z_?loss|norm)($|[^a-z])"
)


def _role(name: str, per_sample: bool) -> str:
    low = name.lower()
    if per_sample:
        return "data"
    if _REG_NAMES.search(low) and not _DATA_NAMES.search(low):
        return "reg"
    if _DATA_NAMES.search(low):
        return "data"
    return "unknown"


def _dominance(ctx: _Context) -> None:
    th = ctx.th
    s = ctx.series.get("loss")
    comps = [n for n in (s.layers if s is not None else []) if n != "total"]
    if s is None or len(comps) < 2:
        ctx.notes.append("loss_component_dominance: not checked, needs two or more components "
                         "(diag.step(..., losses={'ce': ce, 'l2': l2}))")
        return
    spread = ctx.series.get("loss_p50")
    per_sample = set(spread.layers) if spread is not None else set()
    roles = {n: _role(n, n in per_sample) for n in comps}
    steps, vals = ctx.before_cutoff(s)
    mag = np.abs(vals)
    reported: set[str] = set()
    for a in comps:
        for b in comps:
            if a == b or a in reported:
                continue
            ra, rb = roles[a], roles[b]
            if ra == "data" or rb == "reg":
                continue
            known = ra == "reg" or rb == "data"
            va, vb = mag[:, s.layers.index(a)], mag[:, s.layers.index(b)]
            ok = np.isfinite(va) & np.isfinite(vb)
            if ok.sum() < 2:
                continue
            st, va, vb = steps[ok], va[ok], vb[ok]
            w = _window(vb.size, th)
            b0 = float(np.median(vb[:w]))
            ratio = va / np.maximum(vb, 1e-30)
            dom = (ratio >= th.dominance_ratio) & (vb >= th.dominance_unlearned * b0)
            need = max(2, math.ceil(th.dominance_min_fraction * vb.size))
            early = bool(np.median(ratio[:w]) >= th.dominance_ratio)
            b_end = float(np.median(vb[-w:]))
            stalled = b0 > 0 and b_end >= (1 - th.loss_min_decrease) * b0
            if not (dom.sum() >= need or (early and stalled and vb.size >= 2)):
                continue
            hit = np.flatnonzero(dom) if dom.any() else np.arange(w)
            typical = float(np.median(ratio[hit]))
            reported.add(a)
            ctx.add(
                "loss_component_dominance", "warning" if known else "info", [a, b],
                int(st[hit[0]]), int(st[hit[-1]]),
                f"'{a}' is {_fmt(typical)}x '{b}' (median over {hit.size} logged steps, "
                f"{int(st[hit[0]])}-{int(st[hit[-1]])}) while '{b}' went from {_fmt(b0)} to {_fmt(b_end)}"
                + ("" if known else "; if '" + b + "' is the data term it is being swamped") + ".",
                f"Scale '{a}' down (its coefficient is too large; try about {_fmt(_pow10(typical))}x smaller) "
                f"so that '{b}' drives the gradients; typical weight decay is 1e-4 to 1e-2.",
            )


def _pow10(x: float) -> float:
    return 10.0 ** max(1, math.ceil(math.log10(max(x, 1.0))))


_RULES: tuple[Callable[[_Context], None], ...] = (
    _nonfinite,  # first: sets the cutoff the other rules respect
    _exploding,
    _vanishing,
    _dead_relu,
    _saturated,
    _update_ratio,
    _loss_spike,
    _loss_not_decreasing,
    _dominance,
)

__all__ = ["KINDS", "KIND_METRIC", "SEVERITIES", "Finding", "Thresholds", "analyze"]
