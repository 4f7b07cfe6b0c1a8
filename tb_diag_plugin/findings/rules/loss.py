"""Findings rules on the loss: `loss_spike`, `loss_not_decreasing` and
`loss_component_dominance`."""

from __future__ import annotations

import math
import re
from typing import Optional

import numpy as np

from tb_diag_plugin import metadata
from tb_diag_plugin.findings.context import (
    CAUSE_KINDS,
    CUTOFF,
    Context,
    Rule,
    fmt,
    loss_total,
    lr_text,
    robust_z,
    step_noise,
    window,
)
from tb_diag_plugin.findings.thresholds import Thresholds


def _relative_decrease(v: np.ndarray, th: Thresholds) -> Optional[tuple[float, float, float]]:
    """(start, end, decrease as a share of |start|) over medians of the first and last windows."""
    if v.size < th.loss_min_points:
        return None
    w = window(v.size, th)
    start, end = float(np.median(v[:w])), float(np.median(v[-w:]))
    scale = abs(start)
    if scale < 1e-12:
        return None
    return start, end, (start - end) / scale


def _loss_spike(ctx: Context) -> None:
    th = ctx.th
    got = ctx.get("loss_spike", "loss", why="pass loss= to diag.step")
    if got is None:
        return
    (s,) = got
    steps, vals = ctx.before_cutoff(s)
    names = [metadata.TOTAL_LOSS] if metadata.TOTAL_LOSS in s.layers else list(s.layers)
    for name in names:
        v = vals[:, s.layers.index(name)]
        ok = np.isfinite(v)
        st, v = steps[ok], v[ok]
        spikes = _spikes(v, th)
        if not spikes:
            _jump(ctx, name, st, v, _between(ctx, name, st))
            continue
        worst = max(spikes, key=lambda t: t[1])
        at = ", ".join(str(int(st[i])) for i, _ in spikes[:5]) + (" ..." if len(spikes) > 5 else "")
        ctx.add(
            "loss_spike", "warning", [name], int(st[spikes[0][0]]), int(st[spikes[-1][0]]),
            f"Loss spikes: '{name}' spiked {len(spikes)} time(s) (steps {at}); the largest to {fmt(worst[1])}× "
            f"its running median, at step {int(st[worst[0]])}, and came back.",
            "Look at the batches of those steps (corrupt samples, wrong labels, outliers); clip gradients "
            "(clip_grad_norm_) so one batch cannot throw the weights far, or lower the learning rate.",
            steps=[int(st[i]) for i, _ in spikes],  # the Loss view marks these
        )


def _between(ctx: Context, name: str, st: np.ndarray) -> Optional[np.ndarray]:
    """The largest loss since the previous logged step, at each of `st` (NaN where not recorded)."""
    s = ctx.series.get("loss_max_between")
    if s is None or name not in s.layers or not s.steps.size:
        return None
    out = np.full(st.shape, np.nan)
    _, a, b = np.intersect1d(st, s.steps, return_indices=True)
    out[a] = np.where(s.present[b, s.layers.index(name)], s.values[b, s.layers.index(name)], np.nan)
    return out


def _jump(ctx: Context, name: str, st: np.ndarray, v: np.ndarray, peak: Optional[np.ndarray] = None) -> None:
    """A jump of `loss_jump` times the level before it, even right after the first logged step (the
    baseline may be a single value), whether or not it came back; unless loss_diverged reported it.
    `peak`, the largest loss since the previous logged step, shows a jump that fell between them."""
    th = ctx.th
    if v.size < 2 or any(f.kind == "loss_diverged" and f.severity != "info" for f in ctx.findings):
        return
    level = abs(float(np.median(v[: window(v.size, th)])))
    top = v if peak is None else np.fmax(v, np.where(np.isfinite(peak), peak, np.nan))
    best = None
    for i in range(1, v.size):
        base = float(np.median(v[max(0, i - th.spike_window): i]))
        if base > 0 and top[i] >= th.loss_jump * base and top[i] - base >= th.spike_min_rise * min(level, base):
            if best is None or top[i] / base > best[1]:
                best = (i, float(top[i]) / base, base)
    if best is None:
        return
    i, ratio, base = best
    hidden = top[i] > v[i]  # the jump fell on a step that was not logged
    where = f"between steps {int(st[i - 1])} and {int(st[i])}" if hidden else f"at step {int(st[i])}"
    start = float(v[0])
    after = v[i + 1:]
    back = np.flatnonzero(after <= max(start, base) * 1.5) if after.size else np.zeros(0, dtype=np.int64)
    if back.size:
        how = f"and came back to {fmt(float(after[back[0]]))} by step {int(st[i + 1 + back[0]])}"
    elif after.size:
        how = f"and never returned to its start ({fmt(start)}; {fmt(float(v[-1]))} at the end)"
    else:
        how = "at the last logged step"
    ctx.add(
        "loss_spike", "warning", [name], int(st[i]), int(st[-1] if not back.size else st[i + 1 + back[0]]),
        f"Loss jumped: '{name}' went from {fmt(base)} to {fmt(float(top[i]))} ({fmt(ratio)}×) {where}, {how}.",
        "A jump this large in one step is an over-large update: lower the learning rate"
        f"{lr_text(ctx)}, add a warm-up and clip gradients (torch.nn.utils.clip_grad_norm_(params, 1.0)); "
        "check the batch of that step for outliers.",
        steps=[int(st[i])],  # the Loss view marks the jump like any spike
    )


def _spikes(v: np.ndarray, th: Thresholds) -> list[tuple[int, float]]:
    """Indices and sizes (x running median) of the loss spikes that recovered."""
    out: list[tuple[int, float]] = []
    n = v.size
    min_prev = max(3, th.spike_window // 2)
    if n <= min_prev:
        return out
    level = abs(float(np.median(v[: window(n, th)])))
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
    run_sigma = step_noise(np.log(v)) if positive else 0.0
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
        # Multiplicative noise: measure in log space where the loss is positive.
        z = robust_z(math.log(float(v[i])), np.log(prev), floor=run_sigma) if positive else robust_z(v[i], prev)
        if z < z_need:
            continue
        after = v[i + 1: i + 1 + th.spike_recovery]
        if after.size == 0 or not (after < base + 0.5 * rise).any():
            continue  # no recovery: divergence, not a spike
        spiked[i] = True
        out.append((int(i), float(v[i]) / base))
    return out


def _loss_not_decreasing(ctx: Context) -> None:
    th = ctx.th
    loss = loss_total(ctx)
    if loss is None:
        ctx.notes.append("loss_not_decreasing: not checked, no 'loss' recorded (pass loss= to diag.step)")
        return
    steps, v, names = loss
    name = metadata.TOTAL_LOSS if names == [metadata.TOTAL_LOSS] else " + ".join(names)
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
    lr = lr_text(ctx)
    ctx.add(
        "loss_not_decreasing", "warning", names, int(steps[0]), int(steps[-1]),
        f"Loss not decreasing: '{name}' went from {fmt(start)} to {fmt(end)} (median of the first and last "
        f"logged steps, {fmt(-100 * frac)} % change) from step {int(steps[0])} to {int(steps[-1])}.",
        f"Check that the learning rate{lr} is not 0 or tiny and that the optimizer owns the model's "
        "parameters, that the labels match the inputs (shuffled together), and that the model can fit "
        "one small batch; see the other findings for the cause.",
    )


def _stuck_data_term(ctx: Context, total_start: float):
    """(name, steps, start, end, decrease) of a data term, at least half the loss, that does not fall."""
    s = ctx.series.get("loss")
    if s is None or metadata.TOTAL_LOSS not in s.layers or abs(total_start) <= 0:
        return None
    spread = ctx.series.get("loss_p50")
    per_sample = set(spread.layers) if spread is not None else set()
    steps, vals = ctx.before_cutoff(s)
    for j, n in enumerate(s.layers):
        if n == metadata.TOTAL_LOSS or _role(n, n in per_sample) != "data":
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


def _dominance(ctx: Context) -> None:
    th = ctx.th
    s = ctx.series.get("loss")
    comps = [n for n in (s.layers if s is not None else []) if n != metadata.TOTAL_LOSS]
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
            w = window(vb.size, th)
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
                f"One loss term dominates: '{a}' is {fmt(typical)}× '{b}' (median over {hit.size} logged steps, "
                f"from step {int(st[hit[0]])} to {int(st[hit[-1]])}) while '{b}' went from {fmt(b0)} to {fmt(b_end)}"
                + ("" if known else "; if '" + b + "' is the data term it is being swamped") + ".",
                f"Scale '{a}' down (its coefficient is too large; try about {fmt(_pow10(typical))}× smaller) "
                f"so that '{b}' drives the gradients; typical weight decay is 1e-4 to 1e-2.",
            )


def _pow10(x: float) -> float:
    return 10.0 ** max(1, math.ceil(math.log10(max(x, 1.0))))


LOSS_SPIKE = Rule("loss_spike", ("loss_spike",), ("loss", "learning_rate", "loss_max_between"), _loss_spike,
                  after=CUTOFF + ("loss_diverged",), severities=("warning",), consequence_of=CAUSE_KINDS)
LOSS_NOT_DECREASING = Rule(
    "loss_not_decreasing", ("loss_not_decreasing",), ("loss", "loss_p50", "learning_rate"), _loss_not_decreasing,
    after=CUTOFF, severities=("warning",), consequence_of=CAUSE_KINDS,
)
DOMINANCE = Rule(
    "loss_component_dominance", ("loss_component_dominance",), ("loss", "loss_p50"), _dominance, after=CUTOFF,
    severities=("warning", "info"),
)
